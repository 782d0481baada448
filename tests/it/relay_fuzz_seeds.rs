//! Runs every seed of the `relay` fuzz target (`fuzz/seeds/relay/`) through the same
//! checking harness in a plain `cargo test`, so the target's code and invariants are
//! built and exercised without nightly or cargo-fuzz.

use crate::common::relay_harness;

#[test]
fn every_relay_seed_passes_the_fuzz_invariants() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/relay");
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .expect("fuzz/seeds/relay")
        .map(|entry| entry.expect("a seed").path())
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 8, "only {} seeds", seeds.len());
    for seed in seeds {
        let data = std::fs::read(&seed).expect("a readable seed");
        let name = seed.display().to_string();
        let outcome = std::panic::catch_unwind(|| relay_harness::run_fuzz(&data));
        assert!(outcome.is_ok(), "seed {name} broke an invariant");
    }
}
