//! The LDAP credential source (`postern::auth::ldap`) against a real OpenLDAP `slapd`
//! (Debian's `slapd` and `ldap-utils`, installed by `.ci/run`), started privately on
//! loopback with a database generated here: users under `ou=people`, one locked by the
//! `ppolicy` overlay, a service account, two entries sharing a `cn`.
//!
//! Direct bind and search+bind, StartTLS and ldaps with an rcgen CA (and a wrong one),
//! injection attempts in the user name, the empty-password bypass, and slapd killed,
//! stopped and restarted mid-run.
//!
//! Without slapd a test skips loudly, unless `CI` is set: then it fails.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use postern::auth::ldap::{
    DEFAULT_SEARCH_FILTER, Down, Mode, Refusal, Settings, Source, Stage, Verdict,
};
use tempfile::TempDir;

use common::certs::{CertPaths, TestCerts};
use common::{STEP, accepts, free_port, run, wait_until, within};

const SLAPD: &str = "/usr/sbin/slapd";
const SLAPADD: &str = "/usr/sbin/slapadd";
const LDAPMODIFY: &str = "/usr/bin/ldapmodify";
const MODULES: &str = "/usr/lib/ldap";

const SUFFIX: &str = "dc=example,dc=test";
const PEOPLE: &str = "ou=people,dc=example,dc=test";
const ROOT_DN: &str = "cn=admin,dc=example,dc=test";
const ROOT_PASSWORD: &str = "admin-secret";
const SERVICE_DN: &str = "cn=postern,ou=services,dc=example,dc=test";
const SERVICE_PASSWORD: &str = "service-secret";

/// Each verification's limit in these tests: short, so a hang shows quickly.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The directory's users (their passwords are in the LDIF below).
const ALICE: (&str, &str) = ("alice", "secret");
const BOB: (&str, &str) = ("bob", "bob-password");
/// Locked by ppolicy (`pwdAccountLockedTime: 000001010000Z`, locked for good).
const CAROL: (&str, &str) = ("carol", "carol-password");
/// A user name with a comma: its DN holds an escaped one.
const SMITH: (&str, &str) = ("smith, john", "comma-password");
/// Under `ou=admins,ou=people`: what DN injection would reach.
const EVE: (&str, &str) = ("eve", "eve-password");

const DATA: &str = r"dn: dc=example,dc=test
objectClass: dcObject
objectClass: organization
o: Example
dc: example

dn: ou=people,dc=example,dc=test
objectClass: organizationalUnit
ou: people

dn: ou=admins,ou=people,dc=example,dc=test
objectClass: organizationalUnit
ou: admins

dn: ou=services,dc=example,dc=test
objectClass: organizationalUnit
ou: services

dn: ou=policies,dc=example,dc=test
objectClass: organizationalUnit
ou: policies

dn: cn=default,ou=policies,dc=example,dc=test
objectClass: organizationalRole
objectClass: pwdPolicy
cn: default
pwdAttribute: userPassword
pwdLockout: TRUE
pwdMaxFailure: 1000

dn: cn=postern,ou=services,dc=example,dc=test
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: postern
userPassword: service-secret

dn: uid=alice,ou=people,dc=example,dc=test
objectClass: inetOrgPerson
uid: alice
cn: Alice Liddell
sn: Liddell
mail: alice@example.test
userPassword: secret

dn: uid=bob,ou=people,dc=example,dc=test
objectClass: inetOrgPerson
uid: bob
cn: twin
sn: Builder
userPassword: bob-password

dn: uid=bob2,ou=people,dc=example,dc=test
objectClass: inetOrgPerson
uid: bob2
cn: twin
sn: Builder
userPassword: bob-password

dn: uid=carol,ou=people,dc=example,dc=test
objectClass: inetOrgPerson
uid: carol
cn: Carol
sn: Locked
userPassword: carol-password
pwdAccountLockedTime: 000001010000Z

dn: uid=smith\2C john,ou=people,dc=example,dc=test
objectClass: inetOrgPerson
uid: smith, john
cn: John Smith
sn: Smith
userPassword: comma-password

# Two accounts slapd keeps apart whose names Unicode case folding merges: xß and xẞ.
dn:: dWlkPXjDnyxvdT1wZW9wbGUsZGM9ZXhhbXBsZSxkYz10ZXN0
objectClass: inetOrgPerson
uid:: eMOf
cn: Eszett
sn: Small
userPassword: small-password

dn:: dWlkPXjhup4sb3U9cGVvcGxlLGRjPWV4YW1wbGUsZGM9dGVzdA==
objectClass: inetOrgPerson
uid:: eOG6ng==
cn: Eszett
sn: Capital
userPassword: capital-password

# A user who set her mail (some directories let users edit it) to alice's.
dn: uid=mallory,ou=people,dc=example,dc=test
objectClass: inetOrgPerson
uid: mallory
cn: Mallory
sn: Self-Service
mail: alice@example.test
userPassword: mallory-password

dn: uid=eve,ou=admins,ou=people,dc=example,dc=test
objectClass: inetOrgPerson
uid: eve
cn: Eve
sn: Admin
userPassword: eve-password
";

/// Whether slapd can run here. Prints a loud SKIP when not, and fails when `CI` is set.
fn available() -> bool {
    let missing: Vec<String> = [
        SLAPD.to_string(),
        SLAPADD.to_string(),
        LDAPMODIFY.to_string(),
        format!("{MODULES}/back_mdb.so"),
        format!("{MODULES}/ppolicy.so"),
        "/etc/ldap/schema/inetorgperson.schema".to_string(),
    ]
    .into_iter()
    .filter(|path| !Path::new(path).exists())
    .collect();
    if missing.is_empty() {
        return true;
    }
    eprintln!(
        "\n*** SKIP: slapd cannot run here: missing {}. `.ci/run` installs slapd and \
         ldap-utils. ***\n",
        missing.join(", ")
    );
    assert!(
        std::env::var_os("CI").is_none(),
        "slapd must be runnable in CI (.ci/run): missing {}",
        missing.join(", ")
    );
    false
}

/// A private slapd on two loopback ports (`ldap://` with StartTLS, and `ldaps://`),
/// its configuration, database and certificates in a tempdir; killed on drop.
struct Slapd {
    dir: TempDir,
    certs: CertPaths,
    ldap_port: u16,
    ldaps_port: u16,
    child: Option<Child>,
}

impl Slapd {
    /// Loads the database and starts slapd, or `None` (after a SKIP) without one.
    fn start() -> Option<Slapd> {
        if !available() {
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = TestCerts::generate().write_to(dir.path());
        std::fs::create_dir(dir.path().join("db")).expect("mkdir db");
        std::fs::write(dir.path().join("data.ldif"), DATA).expect("write data.ldif");
        let mut slapd = Slapd {
            dir,
            certs,
            ldap_port: 0,
            ldaps_port: 0,
            child: None,
        };
        std::fs::write(slapd.dir.path().join("slapd.conf"), slapd.config()).expect("conf");
        // slapadd, offline: it may set pwdAccountLockedTime, which ppolicy manages.
        run(
            Command::new(SLAPADD)
                .arg("-f")
                .arg(slapd.dir.path().join("slapd.conf"))
                .arg("-l")
                .arg(slapd.dir.path().join("data.ldif")),
            b"",
            STEP,
        )
        .assert_success("slapadd");
        // A port taken between free_port() and slapd's bind: try fresh ones.
        for _ in 0..3 {
            slapd.ldap_port = free_port();
            slapd.ldaps_port = free_port();
            if slapd.spawn() {
                return Some(slapd);
            }
        }
        panic!("slapd did not start: {}", slapd.log());
    }

    fn config(&self) -> String {
        let dir = self.dir.path().display();
        let CertPaths { ca, cert, key } = &self.certs;
        format!(
            r#"include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
modulepath {MODULES}
moduleload back_mdb
moduleload ppolicy
pidfile {dir}/slapd.pid
argsfile {dir}/slapd.args
TLSCACertificateFile {ca}
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
# Accept binds with a DN and no password as anonymous ones (RFC 4513 §5.1.2), as
# Active Directory long did: the server postern must never send such a bind to.
allow bind_anon_dn

database mdb
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PASSWORD}
directory {dir}/db
maxsize 16777216
overlay ppolicy
ppolicy_default "cn=default,ou=policies,{SUFFIX}"
ppolicy_use_lockout
access to attrs=userPassword by anonymous auth by * none
access to * by dn.exact="{SERVICE_DN}" read by self read by * none
"#,
            ca = ca.display(),
            cert = cert.display(),
            key = key.display(),
        )
    }

    /// Starts slapd on the current ports; false when it exits instead of listening.
    fn spawn(&mut self) -> bool {
        let log = std::fs::File::create(self.dir.path().join("slapd.log")).expect("log");
        let urls = format!(
            "ldap://127.0.0.1:{}/ ldaps://127.0.0.1:{}/",
            self.ldap_port, self.ldaps_port
        );
        // -d: stay in the foreground (a child we can kill); 256 logs each operation
        // ("conn=1001 op=0 BIND dn=\"...\" method=128"), which the tests read.
        let mut child = Command::new(SLAPD)
            .args(["-d", "256", "-h", &urls, "-f"])
            .arg(self.dir.path().join("slapd.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn slapd");
        let started = Instant::now();
        loop {
            if accepts(([127, 0, 0, 1], self.ldap_port).into())
                && accepts(([127, 0, 0, 1], self.ldaps_port).into())
            {
                self.child = Some(child);
                return true;
            }
            if child.try_wait().expect("try_wait").is_some() {
                return false;
            }
            assert!(
                started.elapsed() < STEP,
                "slapd not listening: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills slapd (SIGKILL: no goodbye to its clients).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts slapd again on the same ports.
    fn restart(&mut self) {
        self.kill();
        // The ports are ours: only a slow release can delay the bind.
        wait_until(STEP, "slapd restarted", || self.spawn().then_some(()));
    }

    /// Sends a signal (`STOP`, `CONT`) to slapd.
    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("slapd running").id().to_string();
        run(
            Command::new("kill").args([&format!("-{name}"), &pid]),
            b"",
            STEP,
        )
        .assert_success("kill");
    }

    fn ldap_url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.ldap_port)
    }

    fn ldaps_url(&self) -> String {
        format!("ldaps://127.0.0.1:{}", self.ldaps_port)
    }

    /// Changes the directory as its administrator, with `ldapmodify`.
    fn modify(&self, ldif: &str) {
        run(
            Command::new(LDAPMODIFY).args([
                "-x",
                "-H",
                &self.ldap_url(),
                "-D",
                ROOT_DN,
                "-w",
                ROOT_PASSWORD,
            ]),
            ldif.as_bytes(),
            STEP,
        )
        .assert_success("ldapmodify");
    }

    /// The DNs of the simple binds slapd has received, in order.
    fn binds(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|line| line.contains(" BIND dn=") && line.contains("method=128"))
            .filter_map(|line| line.split('"').nth(1))
            .map(str::to_owned)
            .collect()
    }

    /// How many connections slapd has accepted.
    fn accepted(&self) -> usize {
        self.log()
            .lines()
            .filter(|line| line.contains(" ACCEPT from "))
            .count()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("slapd.log")).unwrap_or_default()
    }

    fn ca(&self) -> PathBuf {
        self.certs.ca.clone()
    }

    /// Search-then-bind settings against this slapd.
    fn search_settings(&self) -> Settings {
        Settings {
            url: self.ldap_url(),
            mode: Mode::SearchBind {
                base: PEOPLE.into(),
                filter_template: DEFAULT_SEARCH_FILTER.into(),
                bind_dn: SERVICE_DN.into(),
                bind_password: SERVICE_PASSWORD.into(),
            },
            starttls: false,
            ca: None,
            timeout: TIMEOUT,
            pool_size: 2,
        }
    }

    /// Direct-bind settings against this slapd.
    fn direct_settings(&self, user_dn_template: &str) -> Settings {
        Settings {
            mode: Mode::DirectBind {
                user_dn_template: user_dn_template.into(),
            },
            ..self.search_settings()
        }
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- slapd log ---\n{}", self.log());
        }
    }
}

async fn verify(source: &Source, (user, password): (&str, &str)) -> Verdict {
    within("verify", source.verify(user, password.as_bytes())).await
}

#[track_caller]
fn assert_down(verdict: &Verdict, stage: Stage) {
    assert!(
        matches!(verdict, Verdict::Down(Down { stage: s, .. }) if *s == stage),
        "expected Down at {stage:?}, got {verdict:?}"
    );
}

/// A raw ldap3 connection, for what the tests check behind postern's back.
async fn raw(url: &str) -> ldap3::Ldap {
    let (driver, ldap) = within("raw connect", ldap3::LdapConnAsync::new(url))
        .await
        .expect("raw connect");
    tokio::spawn(driver.drive());
    ldap
}

#[tokio::test]
async fn direct_bind() {
    let Some(slapd) = Slapd::start() else { return };
    let source = Source::new(slapd.direct_settings(&format!("uid=%u,{PEOPLE}"))).unwrap();

    assert_eq!(verify(&source, ALICE).await, Verdict::Valid);
    assert_eq!(verify(&source, BOB).await, Verdict::Valid);
    assert_eq!(
        verify(&source, ("alice", "wrong")).await,
        Verdict::Invalid(Refusal::WrongPassword)
    );
    // slapd answers invalidCredentials for a DN it does not hold, as for a wrong password.
    assert_eq!(
        verify(&source, ("nobody", "secret")).await,
        Verdict::Invalid(Refusal::WrongPassword)
    );
    assert_eq!(
        verify(&source, CAROL).await,
        Verdict::Invalid(Refusal::Locked)
    );
    // The comma is escaped into the DN (RFC 4514) and slapd finds the entry.
    assert_eq!(verify(&source, SMITH).await, Verdict::Valid);
    assert_eq!(
        verify(&source, ("smith", "comma-password")).await,
        Verdict::Invalid(Refusal::WrongPassword)
    );

    let report = within("check", source.check()).await.expect("check");
    assert!(report.contains("users bind as uid=%u"), "{report}");
}

#[tokio::test]
async fn direct_bind_user_names_cannot_reach_other_entries() {
    let Some(slapd) = Slapd::start() else { return };
    // Eve's entry and password are real: through a template naming her OU she is in.
    let admins = Source::new(slapd.direct_settings(&format!("uid=%u,ou=admins,{PEOPLE}"))).unwrap();
    assert_eq!(verify(&admins, EVE).await, Verdict::Valid);

    // Unescaped, "eve,ou=admins" would make uid=eve,ou=admins,ou=people,...: her entry.
    let people = Source::new(slapd.direct_settings(&format!("uid=%u,{PEOPLE}"))).unwrap();
    for user in [
        "eve,ou=admins",
        "eve+cn=Eve,ou=admins",
        "eve,ou=admins,ou=people,dc=example,dc=test\0",
        "*",
        ")(",
        "\0",
        r"\00",
        "alice)(|(uid=*",
        "#alice",
        "alice\\",
    ] {
        for password in [EVE.1, ALICE.1] {
            let verdict = verify(&people, (user, password)).await;
            assert!(
                matches!(verdict, Verdict::Invalid(_)),
                "{user:?} / {password}: {verdict:?}"
            );
        }
    }
    // The same names over a raw connection, unescaped, show what was at stake.
    let mut ldap = raw(&slapd.ldap_url()).await;
    let unescaped = format!("uid=eve,ou=admins,{PEOPLE}");
    let result = within("raw bind", ldap.simple_bind(&unescaped, EVE.1))
        .await
        .expect("raw bind");
    assert_eq!(result.rc, 0, "the attack's target DN binds: {result:?}");
}

#[tokio::test]
async fn an_empty_password_is_never_sent() {
    let Some(slapd) = Slapd::start() else { return };
    for settings in [
        slapd.direct_settings(&format!("uid=%u,{PEOPLE}")),
        slapd.search_settings(),
    ] {
        let source = Source::new(settings).unwrap();
        assert_eq!(
            verify(&source, ("alice", "")).await,
            Verdict::Invalid(Refusal::EmptyPassword)
        );
    }
    assert_eq!(slapd.binds(), Vec::<String>::new(), "no bind reached slapd");

    // This slapd, like many directories, takes a DN with no password as an anonymous
    // bind and says success (RFC 4513 §5.1.2): the bypass is real here.
    let mut ldap = raw(&slapd.ldap_url()).await;
    let alice_dn = format!("uid=alice,{PEOPLE}");
    let result = within("raw bind", ldap.simple_bind(&alice_dn, ""))
        .await
        .expect("raw bind");
    assert_eq!(result.rc, 0, "unauthenticated bind accepted: {result:?}");
}

#[tokio::test]
async fn search_then_bind() {
    let Some(slapd) = Slapd::start() else { return };
    let source = Source::new(slapd.search_settings()).unwrap();

    assert_eq!(verify(&source, ALICE).await, Verdict::Valid);
    assert_eq!(verify(&source, BOB).await, Verdict::Valid);
    // Found below ou=people: the search is a subtree search.
    assert_eq!(verify(&source, EVE).await, Verdict::Valid);
    assert_eq!(verify(&source, SMITH).await, Verdict::Valid);
    assert_eq!(
        verify(&source, ("alice", "wrong")).await,
        Verdict::Invalid(Refusal::WrongPassword)
    );
    // An unknown user costs a bind too, as a wrong password does (to a DN that
    // cannot exist), so the two take the same round trips.
    let before = slapd.binds().len();
    assert_eq!(
        verify(&source, ("nobody", "secret")).await,
        Verdict::Invalid(Refusal::NoSuchUser)
    );
    wait_until(STEP, "slapd logs the decoy bind", || {
        let binds = slapd.binds();
        (binds.len() > before).then_some(())
    });
    assert_eq!(
        slapd.binds().last().map(String::as_str),
        Some(format!("cn=postern-no-such-user,{PEOPLE}").as_str())
    );
    // A user name that would be a wildcard matches nothing.
    assert_eq!(
        verify(&source, ("al*", ALICE.1)).await,
        Verdict::Invalid(Refusal::NoSuchUser)
    );

    // Locked by the password policy: refused with the right password...
    assert_eq!(
        verify(&source, CAROL).await,
        Verdict::Invalid(Refusal::Locked)
    );
    // ...and let in once an administrator unlocks the account.
    slapd.modify(&format!(
        "dn: uid=carol,{PEOPLE}\nchangetype: modify\ndelete: pwdAccountLockedTime\n"
    ));
    assert_eq!(verify(&source, CAROL).await, Verdict::Valid);

    let report = within("check", source.check()).await.expect("check");
    assert!(
        report.contains(&format!("bound as {SERVICE_DN}")) && report.contains("found"),
        "{report}"
    );
}

#[tokio::test]
async fn a_search_must_find_exactly_one_entry() {
    let Some(slapd) = Slapd::start() else { return };
    // bob and bob2 share cn=twin and a password.
    let mut settings = slapd.search_settings();
    if let Mode::SearchBind {
        filter_template, ..
    } = &mut settings.mode
    {
        *filter_template = "(cn=%u)".into();
    }
    let source = Source::new(settings).unwrap();
    assert_eq!(
        verify(&source, ("twin", BOB.1)).await,
        Verdict::Invalid(Refusal::Ambiguous)
    );
    assert_eq!(
        verify(&source, ("Alice Liddell", ALICE.1)).await,
        Verdict::Valid
    );
}

#[tokio::test]
async fn search_user_names_cannot_change_the_filter() {
    let Some(slapd) = Slapd::start() else { return };
    let template = "(&(objectClass=inetOrgPerson)(uid=%u))";
    let mut settings = slapd.search_settings();
    if let Mode::SearchBind {
        filter_template, ..
    } = &mut settings.mode
    {
        *filter_template = template.into();
    }
    let source = Source::new(settings).unwrap();
    let injections = [
        "*",
        "al*",
        "a*e",
        ")(",
        "alice)(|(uid=*",
        // Balanced for this template: unescaped, a valid filter that finds alice.
        "alice)(|(uid=*)",
        "*)(uid=alice",
        "alice)(uid=alice",
        "alice\0",
        "\0",
        r"\00",
        r"alice\00",
        r"al\2a",
        "alice)",
        "(alice",
    ];
    for user in injections {
        let verdict = verify(&source, (user, ALICE.1)).await;
        // A control character is refused before anything is sent.
        let refusal = if user.contains('\0') {
            Refusal::UserName
        } else {
            Refusal::NoSuchUser
        };
        assert_eq!(
            verdict,
            Verdict::Invalid(refusal),
            "{user:?} with alice's password"
        );
    }
    assert_eq!(verify(&source, ALICE).await, Verdict::Valid);

    // Put in unescaped, the same names would find alice: the service account's own
    // searches with the raw filters.
    let mut ldap = raw(&slapd.ldap_url()).await;
    within("raw bind", ldap.simple_bind(SERVICE_DN, SERVICE_PASSWORD))
        .await
        .expect("raw bind")
        .success()
        .expect("service bind");
    for user in ["al*", "a*e", "alice)(|(uid=*)", "*)(uid=alice"] {
        let filter = template.replace("%u", user);
        let (entries, _) = within(
            "raw search",
            ldap.search(PEOPLE, ldap3::Scope::Subtree, &filter, vec!["1.1"]),
        )
        .await
        .expect("raw search")
        .success()
        .expect("raw search result");
        assert!(!entries.is_empty(), "{filter} finds alice");
    }
}

#[tokio::test]
async fn the_service_account_and_search_base_must_work() {
    let Some(slapd) = Slapd::start() else { return };
    let wrong_service = Settings {
        mode: Mode::SearchBind {
            base: PEOPLE.into(),
            filter_template: DEFAULT_SEARCH_FILTER.into(),
            bind_dn: SERVICE_DN.into(),
            bind_password: "not-the-service-password".into(),
        },
        ..slapd.search_settings()
    };
    let source = Source::new(wrong_service).unwrap();
    // A directory refusing postern's own account is not the client's wrong password.
    assert_down(&verify(&source, ALICE).await, Stage::ServiceBind);
    let down = within("check", source.check()).await.unwrap_err();
    assert_eq!(down.stage, Stage::ServiceBind);
    assert!(down.detail.contains("invalidCredentials"), "{down}");

    let missing_base = Settings {
        mode: Mode::SearchBind {
            base: format!("ou=nowhere,{SUFFIX}"),
            filter_template: DEFAULT_SEARCH_FILTER.into(),
            bind_dn: SERVICE_DN.into(),
            bind_password: SERVICE_PASSWORD.into(),
        },
        ..slapd.search_settings()
    };
    let source = Source::new(missing_base).unwrap();
    assert_down(&verify(&source, ALICE).await, Stage::Search);
    let down = within("check", source.check()).await.unwrap_err();
    assert!(down.detail.contains("noSuchObject"), "{down}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_verifications_share_a_bounded_pool() {
    let Some(slapd) = Slapd::start() else { return };
    let source = std::sync::Arc::new(Source::new(slapd.search_settings()).unwrap());
    // The start-up probes (one per port) are connections too.
    let before = wait_until(STEP, "probes logged", || {
        let accepted = slapd.accepted();
        (accepted >= 2).then_some(accepted)
    });
    let mut tasks = Vec::new();
    for round in 0..10 {
        for (credentials, expected) in [
            (ALICE, Verdict::Valid),
            (("alice", "wrong"), Verdict::Invalid(Refusal::WrongPassword)),
            (BOB, Verdict::Valid),
            (("nobody", "x"), Verdict::Invalid(Refusal::NoSuchUser)),
        ] {
            let source = source.clone();
            tasks.push(tokio::spawn(async move {
                let verdict = verify(&source, credentials).await;
                assert_eq!(verdict, expected, "round {round}: {credentials:?}");
            }));
        }
    }
    for task in tasks {
        within("verification task", task).await.expect("task");
    }
    // pool_size 2: at most two service connections and two bind connections, opened
    // once and reused by all 40 verifications.
    let accepted = slapd.accepted() - before;
    assert!((2..=4).contains(&accepted), "{accepted} connections");
}

#[tokio::test]
async fn starttls_and_ldaps_with_the_test_ca() {
    let Some(slapd) = Slapd::start() else { return };
    let starttls = Settings {
        starttls: true,
        ca: Some(slapd.ca()),
        ..slapd.search_settings()
    };
    let ldaps = Settings {
        url: slapd.ldaps_url(),
        ca: Some(slapd.ca()),
        ..slapd.search_settings()
    };
    let ldaps_direct = Settings {
        url: slapd.ldaps_url(),
        ca: Some(slapd.ca()),
        ..slapd.direct_settings(&format!("uid=%u,{PEOPLE}"))
    };
    for (settings, transport) in [
        (starttls.clone(), "StartTLS"),
        (ldaps.clone(), "TLS"),
        (ldaps_direct, "TLS"),
    ] {
        let source = Source::new(settings).unwrap();
        assert_eq!(verify(&source, ALICE).await, Verdict::Valid, "{transport}");
        assert_eq!(
            verify(&source, ("alice", "wrong")).await,
            Verdict::Invalid(Refusal::WrongPassword)
        );
        let report = within("check", source.check()).await.expect("check");
        assert!(report.contains(&format!("({transport})")), "{report}");
    }

    // A CA that did not sign slapd's certificate: the directory cannot be trusted,
    // which is a source down, not a refusal.
    let other = tempfile::tempdir().unwrap();
    let wrong_ca = TestCerts::generate().write_to(other.path()).ca;
    for settings in [starttls, ldaps] {
        let source = Source::new(Settings {
            ca: Some(wrong_ca.clone()),
            ..settings
        })
        .unwrap();
        let verdict = verify(&source, ALICE).await;
        assert_down(&verdict, Stage::Connect);
        let Verdict::Down(down) = verdict else {
            unreachable!()
        };
        assert!(down.detail.to_lowercase().contains("certificate"), "{down}");
        assert_eq!(
            within("check", source.check()).await.unwrap_err().stage,
            Stage::Connect
        );
    }
}

#[tokio::test]
async fn slapd_gone_mid_run_is_down_within_the_timeout_and_back_after() {
    let Some(mut slapd) = Slapd::start() else {
        return;
    };
    let search = Source::new(slapd.search_settings()).unwrap();
    let direct = Source::new(slapd.direct_settings(&format!("uid=%u,{PEOPLE}"))).unwrap();
    let sources = [&search, &direct];
    // Idle connections now wait in both pools.
    for source in sources {
        assert_eq!(verify(source, ALICE).await, Verdict::Valid);
    }

    // Killed: the idle connections are dead, new ones are refused.
    slapd.kill();
    for source in sources {
        let started = Instant::now();
        let verdict = verify(source, ALICE).await;
        assert_down(&verdict, Stage::Connect);
        assert!(started.elapsed() < TIMEOUT + Duration::from_secs(1));
        assert!(within("check", source.check()).await.is_err());
    }

    // Back: the pools fill with fresh connections.
    slapd.restart();
    for source in sources {
        assert_eq!(verify(source, ALICE).await, Verdict::Valid);
        assert_eq!(
            verify(source, ("alice", "wrong")).await,
            Verdict::Invalid(Refusal::WrongPassword)
        );
    }

    // Stopped (SIGSTOP): connections open but nothing answers. Each verification
    // gives up at its timeout instead of hanging.
    slapd.signal("STOP");
    for source in sources {
        let started = Instant::now();
        let verdict = verify(source, ALICE).await;
        let took = started.elapsed();
        assert!(matches!(verdict, Verdict::Down(_)), "{verdict:?}");
        assert!(
            took >= TIMEOUT && took < TIMEOUT + Duration::from_secs(1),
            "{took:?}"
        );
    }
    slapd.signal("CONT");
    for source in sources {
        assert_eq!(verify(source, ALICE).await, Verdict::Valid);
    }

    // Killed again while idle connections wait: the first verification afterwards
    // must not be spent on them once slapd is back.
    slapd.restart();
    for source in sources {
        assert_eq!(verify(source, BOB).await, Verdict::Valid);
    }
}

// === through postern ===

/// postern serving with this slapd as its source (search+bind over StartTLS with the
/// test CA, as a site would run it), with its operations endpoint.
fn postern_over(slapd: &Slapd) -> (common::Postern, tempfile::TempDir, common::RawBackend) {
    postern_over_with(slapd, &[])
}

/// [`postern_over`] with more flags.
fn postern_over_with(
    slapd: &Slapd,
    flags: &[(&str, &str)],
) -> (common::Postern, tempfile::TempDir, common::RawBackend) {
    let secrets = tempfile::tempdir().expect("tempdir");
    let password_file = secrets.path().join("bind-password");
    std::fs::write(&password_file, format!("{SERVICE_PASSWORD}\n")).expect("write password");
    let backend = common::RawBackend::start();
    let postern = common::Postern::builder(backend.addr)
        .without_flag("--users")
        .without_flag("--auth-mechanisms")
        .listen("--metrics-listen", common::V4)
        .flag("--ldap-url", slapd.ldap_url())
        .flag("--ldap-starttls", "true")
        .flag("--ldap-ca", slapd.ca().display().to_string())
        .flag("--ldap-search-base", PEOPLE)
        .flag("--ldap-bind-dn", SERVICE_DN)
        .flag(
            "--ldap-bind-password-file",
            password_file.display().to_string(),
        )
        .flag("--ldap-timeout", "2s");
    let postern = flags
        .iter()
        .fold(postern, |builder, (name, value)| builder.flag(name, *value))
        .start();
    (postern, secrets, backend)
}

/// The directory binds ` ALICE `, `Alice`, fullwidth `ａｌｉｃｅ` and `𝐚lice` as one entry
/// (`uid` matches after RFC 4518's preparation): the session goes on as the account
/// the entry names, `alice`, so every spelling shares its sending budget and is logged
/// as it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spellings_the_directory_binds_as_one_entry_share_its_sending_budget() {
    let Some(slapd) = Slapd::start() else { return };
    let (mut postern, _secrets, _backend) = postern_over_with(
        &slapd,
        &[
            ("--max-messages-per-user", "1/1h"),
            ("--log-format", "json"),
        ],
    );
    let listen = postern.addr("--listen-tls");
    let (mut first, _) = common::SmtpClient::connect_implicit(listen, postern.tls_config()).await;
    first.auth_plain(ALICE.0, ALICE.1, "235").await;
    first.send_one_and_quit("alice@example.test").await;
    for spelling in [" ALICE ", "Alice", "alice  ", "ａｌｉｃｅ", "𝐚lice"] {
        let (mut client, _) =
            common::SmtpClient::connect_implicit(listen, postern.tls_config()).await;
        client.auth_plain(spelling, ALICE.1, "235").await;
        client
            .cmd("MAIL FROM:<alice@example.test>", "451 4.7.1")
            .await;
        client.cmd("QUIT", "221").await;
        let closed = postern.wait_session_closed(client.local_addr());
        assert_eq!(
            common::postern::log_field(&closed, "user"),
            "alice",
            "{spelling:?}: {closed}"
        );
    }
}

/// Two accounts the directory keeps apart, `xß` and `xẞ`, whose names Unicode case
/// folding merges: each goes on under its own name, with its own budget. And a direct
/// bind reads the account's name from the entry as its user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_entry_is_its_own_account_whatever_folds_their_names_together() {
    let Some(slapd) = Slapd::start() else { return };
    let (mut postern, _secrets, _backend) = postern_over_with(
        &slapd,
        &[
            ("--max-messages-per-user", "1/1h"),
            ("--log-format", "json"),
        ],
    );
    let listen = postern.addr("--listen-tls");
    for (user, password) in [("xẞ", "capital-password"), ("xß", "small-password")] {
        let (mut client, _) =
            common::SmtpClient::connect_implicit(listen, postern.tls_config()).await;
        client.auth_plain(user, password, "235").await;
        client.send_one_and_quit("x@example.test").await;
        let closed = postern.wait_session_closed(client.local_addr());
        assert_eq!(
            common::postern::log_field(&closed, "user"),
            user,
            "{closed}"
        );
    }

    // Direct bind: the same spellings go on as the entry's own uid.
    let backend = common::RawBackend::start();
    let mut direct = common::Postern::builder(backend.addr)
        .without_flag("--users")
        .without_flag("--auth-mechanisms")
        .flag("--ldap-url", slapd.ldap_url())
        .flag("--ldap-starttls", "true")
        .flag("--ldap-ca", slapd.ca().display().to_string())
        .flag("--ldap-user-dn", format!("uid=%u,{PEOPLE}"))
        .flag("--log-format", "json")
        .start();
    let listen = direct.addr("--listen-tls");
    for spelling in [" ALICE ", "ａｌｉｃｅ"] {
        let (mut client, _) =
            common::SmtpClient::connect_implicit(listen, direct.tls_config()).await;
        client.auth_plain(spelling, ALICE.1, "235").await;
        client.cmd("QUIT", "221").await;
        let closed = direct.wait_session_closed(client.local_addr());
        assert_eq!(
            common::postern::log_field(&closed, "user"),
            "alice",
            "{spelling:?}: {closed}"
        );
    }
}

/// With `(|(mail=%u)(uid=%u))`, mallory, who set her own mail to alice's, logs in as
/// mallory and goes on as mallory: the account is the value her login matched, not the
/// first attribute her entry has. alice's budget stays hers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_cannot_name_itself_after_another_account() {
    let Some(slapd) = Slapd::start() else { return };
    let (mut postern, _secrets, _backend) = postern_over_with(
        &slapd,
        &[
            ("--ldap-search-filter", "(|(mail=%u)(uid=%u))"),
            ("--max-messages-per-user", "1/1h"),
            ("--log-format", "json"),
        ],
    );
    let listen = postern.addr("--listen-tls");
    for (user, password) in [("mallory", "mallory-password"), ALICE] {
        let (mut client, _) =
            common::SmtpClient::connect_implicit(listen, postern.tls_config()).await;
        client.auth_plain(user, password, "235").await;
        client.send_one_and_quit("x@example.test").await;
        let closed = postern.wait_session_closed(client.local_addr());
        assert_eq!(
            common::postern::log_field(&closed, "user"),
            user,
            "{closed}"
        );
    }
}

/// Wrong passwords under many spellings of one name the directory binds as one entry
/// meet one per-user failure limit: then even the right password, under yet another
/// spelling, gets 454 from the network that guessed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spellings_of_one_name_share_its_failure_window() {
    let Some(slapd) = Slapd::start() else { return };
    let (postern, _secrets, _backend) = postern_over_with(
        &slapd,
        &[
            ("--max-auth-failures-per-user", "2"),
            ("--auth-failure-delay", "0s"),
        ],
    );
    let listen = postern.addr("--listen-tls");
    for spelling in ["alice", "ＡＬＩＣＥ", "𝖺𝗅𝗂𝖼𝖾"] {
        let (mut client, _) =
            common::SmtpClient::connect_implicit(listen, postern.tls_config()).await;
        let expected = if spelling == "𝖺𝗅𝗂𝖼𝖾" {
            "454 4.7.0"
        } else {
            "535 5.7.8"
        };
        client.auth_plain(spelling, "wrong", expected).await;
    }
    let (mut client, _) = common::SmtpClient::connect_implicit(listen, postern.tls_config()).await;
    client.auth_plain("ａｌｉｃｅ", ALICE.1, "454 4.7.0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postern_logs_in_against_the_directory_and_refuses_injections() {
    let Some(slapd) = Slapd::start() else { return };
    let (postern, _secrets, _backend) = postern_over(&slapd);
    let listen = postern.addr("--listen-tls");
    let (mut client, ehlo) =
        common::SmtpClient::connect_implicit(listen, postern.tls_config()).await;
    assert!(
        ehlo.lines.iter().any(|l| l == "AUTH PLAIN LOGIN"),
        "PLAIN and LOGIN only: {}",
        ehlo.raw
    );
    client.auth_plain(ALICE.0, ALICE.1, "235").await;
    client.cmd("MAIL FROM:<alice@example.test>", "250").await;

    // LOGIN through swaks, a real client.
    let out = common::tools::swaks(
        &postern,
        common::tools::Listener::StartTls,
        &[
            "--auth",
            "LOGIN",
            "--auth-user",
            BOB.0,
            "--auth-password",
            BOB.1,
        ],
    );
    assert!(out.stdout.contains("235 2.7.0"), "{out}");

    // Wrong passwords, the locked account, and names built to widen the search or
    // climb the tree: each a plain 535 (a NUL cannot even be framed in PLAIN: 501).
    for (user, password, expected) in [
        ("alice", "wrong", "535 5.7.8"),
        (CAROL.0, CAROL.1, "535 5.7.8"),
        ("*", ALICE.1, "535 5.7.8"),
        ("alice)(uid=*", ALICE.1, "535 5.7.8"),
        ("*)(|(uid=*", EVE.1, "535 5.7.8"),
        ("eve,ou=admins", EVE.1, "535 5.7.8"),
        ("alice\0", ALICE.1, "501 5.5.2"),
    ] {
        let (mut client, _) =
            common::SmtpClient::connect_implicit(listen, postern.tls_config()).await;
        client
            .cmd(
                &format!("AUTH PLAIN {}", common::plain_response(user, password)),
                expected,
            )
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postern_says_454_and_unready_while_the_directory_is_down() {
    let Some(mut slapd) = Slapd::start() else {
        return;
    };
    let (postern, _secrets, _backend) = postern_over(&slapd);
    let listen = postern.addr("--listen-tls");
    let admin = postern.addr("--metrics-listen");
    common::wait_status(admin, "/readyz", 200).await;
    slapd.kill();
    let (mut client, _) = common::SmtpClient::connect_implicit(listen, postern.tls_config()).await;
    client
        .cmd(
            &format!("AUTH PLAIN {}", common::plain_response(ALICE.0, ALICE.1)),
            "454 4.7.0",
        )
        .await;
    common::wait_status(admin, "/readyz", 503).await;
    slapd.restart();
    common::wait_status(admin, "/readyz", 200).await;
    let (mut client, _) = common::SmtpClient::connect_implicit(listen, postern.tls_config()).await;
    client.auth_plain(ALICE.0, ALICE.1, "235").await;
}
