//! Records the git commit for `postern --version` as `POSTERN_GIT_COMMIT`.
//!
//! A build from a source tarball has no repository, and a build machine may have no
//! `git`: both get "unknown" instead of a failed build.

use std::path::Path;
use std::process::Command;

fn main() {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let root = Path::new(&manifest_dir);
    // Only ask git when this crate is itself a checkout (`.git` is a directory, or a file
    // in a worktree). Otherwise git walks up and could report the commit of some
    // unrelated repository the tarball was unpacked inside.
    let commit = if root.join(".git").exists() {
        git(root, &["rev-parse", "--short", "HEAD"])
    } else {
        None
    };
    println!(
        "cargo:rustc-env=POSTERN_GIT_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );

    println!("cargo:rerun-if-changed=build.rs");
    // Rebuild when HEAD moves: HEAD itself (checkout), the branch it points at (commit),
    // and packed-refs (gc). `--git-path` resolves these for worktrees as well.
    if commit.is_some() {
        for path in ["HEAD", "packed-refs"] {
            if let Some(p) = git(root, &["rev-parse", "--git-path", path]) {
                println!("cargo:rerun-if-changed={}", root.join(p).display());
            }
        }
        if let Some(branch) = git(root, &["symbolic-ref", "-q", "HEAD"])
            && let Some(p) = git(root, &["rev-parse", "--git-path", &branch])
        {
            println!("cargo:rerun-if-changed={}", root.join(p).display());
        }
    }
}

/// Runs git in `dir`; `None` on any failure, including git not being installed.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}
