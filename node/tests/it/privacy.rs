//! Privacy at the node's edges, on real `kizuna` processes and real files:
//!
//! - an ambulance node's data at rest: canary names and medical values,
//!   written by real check-ins, medical updates and QUIC sync, never appear
//!   in the raw bytes of any file in its data directory (database, WAL,
//!   index), in its temporary directory or in its log, while an otherwise
//!   identical node with encryption switched off shows them (the scan's
//!   negative control); the data directory is 0700 and every file 0600;
//! - a missing or wrong storage key is refused with the message in Japanese
//!   and English, and nothing is created or changed; an encrypted database
//!   is never opened without its key, a plaintext one never with a key;
//! - `kizuna store encrypt` turns a plaintext database into an encrypted
//!   one with the same content, and the node runs on it;
//! - the Individual-Number guard: every disguise of a valid number, in any
//!   id or text field of an API body, header or query, and in any CSV cell
//!   of an import, is refused, changes nothing, and is never echoed or
//!   logged.

use crate::support::proc::{hq_from_csv, http, ok, poll, run_kizuna, Node};
use crdt::store::Store;
use node::store::{OpenOptions, SqliteStore, DB_FILE_NAME};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Names and medical values no real data holds, to look for in raw bytes.
const CANARY_NAME: &str = "CanaryNameQx7Ja";
const CANARY_NAME_JA: &str = "籠鳥カナリア";
const CANARY_MEDICAL: &str = "CanaryAllergyZq9";
const CANARY_LOCAL: &str = "CanaryLocalMedKp4";
/// Registry households of canary persons, each with a Latin and a
/// Japanese name and a card user id that no real card has.
const CANARY_HOUSEHOLDS: usize = 25;

/// Japanese canary names: 籠鳥 and two kanji numerals.
fn canary_name_ja(i: usize) -> String {
    const K: [char; 10] = ['零', '壱', '弐', '参', '肆', '伍', '陸', '漆', '捌', '玖'];
    format!("籠鳥{}{}", K[i / 10 % 10], K[i % 10])
}

fn canary_name(i: usize) -> String {
    format!("CanaryNm{i:03}Vw")
}

fn canary_card(i: usize) -> String {
    format!("19870{i:08}")
}

/// Allergies and conditions entered at headquarters.
fn canary_conditions() -> Vec<String> {
    (0..20).map(|i| format!("CanaryCond{i:02}Hx")).collect()
}

/// Individual-Number-shaped strings (valid check digit) submitted in
/// medical notes and names: refused, so never stored or logged anywhere.
fn canary_individual_numbers() -> Vec<String> {
    (0..1000u32)
        .map(|i| format!("{:011}", 31_415_926_000u64 + u64::from(i) * 7))
        .flat_map(|p| (0..10).map(move |d| format!("{p}{d}")))
        .filter(|s| crdt::text::is_individual_number(s))
        .take(12)
        .collect()
}

/// Every canary with its class: values the ambulance stores (names, card
/// user ids, medical values) and values nothing may store.
fn canaries() -> &'static [(String, &'static str)] {
    static ALL: std::sync::OnceLock<Vec<(String, &'static str)>> = std::sync::OnceLock::new();
    ALL.get_or_init(|| {
        let mut v: Vec<(String, &'static str)> = [CANARY_NAME, CANARY_NAME_JA]
            .into_iter()
            .map(|c| (c.to_string(), "name"))
            .collect();
        v.push((CANARY_MEDICAL.into(), "medical"));
        v.push((CANARY_LOCAL.into(), "medical"));
        for i in 0..CANARY_HOUSEHOLDS {
            v.push((canary_name(i), "name"));
            v.push((canary_name_ja(i), "name"));
            v.push((canary_card(i), "card"));
        }
        v.extend(canary_conditions().into_iter().map(|c| (c, "medical")));
        v.extend(
            canary_individual_numbers()
                .into_iter()
                .map(|c| (c, "individual-number")),
        );
        v
    })
}

/// Every regular file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(files(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Which canaries appear in the raw bytes of which files under `dir`.
fn canaries_in(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let mut found = Vec::new();
    for f in files(dir) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        for (c, _) in canaries() {
            if contains(&bytes, c) {
                found.push((f.clone(), c.as_str()));
            }
        }
    }
    found
}

/// The data directory is 0700, every directory in it 0700, every file 0600.
fn assert_private(dir: &Path) {
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(dir), 0o700, "{}", dir.display());
    let all = files(dir);
    assert!(!all.is_empty(), "{} is empty", dir.display());
    for f in all {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
        let parent = f.parent().unwrap();
        assert_eq!(mode(parent), 0o700, "{}", parent.display());
    }
}

/// The registry CSV with the canary household.
fn registry_csv(dir: &Path) -> PathBuf {
    let p = dir.join("registry.csv");
    std::fs::write(
        &p,
        format!(
            "household_id,address,person_id,name,kana,birth_date,card_user_id\n\
             h-1,新潟県三条市,p-1,{CANARY_NAME_JA},カナリア,1950-01-01,1000000000001\n\
             h-1,新潟県三条市,p-2,{CANARY_NAME},カナリア ニ,1952-02-02,1000000000002\n\
             h-2,新潟県三条市,p-3,山田 太郎,ヤマダ タロウ,1970-03-03,\n{}",
            (0..CANARY_HOUSEHOLDS)
                .map(|i| format!(
                    "hc-{i},新潟県三条市,pc-{i}a,{},カナリア,1960-01-01,{}\n\
                     hc-{i},新潟県三条市,pc-{i}b,{},カナリア,1961-01-01,\n",
                    canary_name(i),
                    canary_card(i),
                    canary_name_ja(i)
                ))
                .collect::<String>()
        ),
    )
    .unwrap();
    p
}

struct Pki {
    ca: PathBuf,
}

impl Pki {
    fn new(root: &Path) -> Pki {
        let ca = root.join("ca");
        certs::ca::init_ca(&ca, "Privacy Test CA").unwrap();
        Pki { ca }
    }
    fn issue(
        &self,
        role: crdt::Role,
        id: &str,
        dir: &Path,
        seal: Option<&certs::storagekey::StorageKey>,
    ) {
        certs::ca::issue_sealed_at(
            &self.ca,
            role,
            &crdt::NodeId::new(id).unwrap(),
            &dir.join("certs"),
            30,
            time::OffsetDateTime::now_utc(),
            seal,
        )
        .unwrap();
    }
}

fn hq(root: &Path, pki: &Pki) -> Node {
    let dir = root.join("hq");
    pki.issue(crdt::Role::Hq, "hq-1", &dir, None);
    hq_from_csv(&dir, &registry_csv(root))
}

/// An ambulance node with its data encrypted (its default), the storage
/// key in a key file and its node key sealed with it.
fn encrypted_ambulance(root: &Path, pki: &Pki, hq_quic: SocketAddr) -> Node {
    let dir = root.join("amb-enc");
    std::fs::create_dir_all(&dir).unwrap();
    let key = certs::storagekey::generate_key_file(&dir.join("storage.key")).unwrap();
    pki.issue(crdt::Role::Ambulance, "amb-1", &dir, Some(&key));
    let mut n = Node::new(
        &dir,
        Some(hq_quic),
        "[storage]\nkey_file = \"storage.key\"\n",
    );
    n.add_operator();
    n
}

#[test]
fn ambulance_data_at_rest_never_shows_a_canary() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let pki = Pki::new(root);
    let mut hq = hq(root, &pki);
    let mut enc = encrypted_ambulance(root, &pki, hq.quic);
    // The control: the same node with encryption switched off.
    let plain_dir = root.join("amb-plain");
    pki.issue(crdt::Role::Ambulance, "amb-2", &plain_dir, None);
    let mut plain = Node::new(&plain_dir, Some(hq.quic), "[storage]\nencrypt = false\n");
    plain.add_operator();
    for n in [&mut hq, &mut enc, &mut plain] {
        n.start();
    }

    // Real check-ins and a medical update at hq.
    let r = hq.api(
        "POST",
        "/api/v1/shelters",
        r#"{"shelter_id":"s-1","name":"体育館","capacity":100}"#,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = hq.api(
        "POST",
        "/api/v1/checkins",
        r#"{"person_ids":["p-1","p-2"],"shelter_id":"s-1"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = hq.api(
        "POST",
        "/api/v1/persons/p-1/medical",
        &format!(
            r#"{{"blood_type":"A+","consent":"consented","add":[["allergy","{CANARY_MEDICAL} ペニシリン"]]}}"#
        ),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    for c in canary_conditions() {
        let r = hq.api(
            "POST",
            "/api/v1/persons/p-1/medical",
            &format!(r#"{{"add":[["condition","{c}"]]}}"#),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    // Individual-Number-shaped input is refused wherever it is sent.
    let refuse_numbers = |n: &Node| {
        for c in canary_individual_numbers() {
            let r = n.api(
                "POST",
                "/api/v1/persons/p-1/medical",
                &format!(r#"{{"add":[["allergy","note {c}"]]}}"#),
            );
            assert!((400..500).contains(&r.status), "{}: {}", r.status, r.body);
        }
    };
    refuse_numbers(&hq);
    let last_condition = canary_conditions().pop().unwrap();
    let last_person = format!("pc-{}b", CANARY_HOUSEHOLDS - 1);

    // Sync over QUIC: both ambulances show the profile (and the registry).
    for n in [&enc, &plain] {
        poll(
            Duration::from_secs(180),
            "the medical profile at the ambulance",
            || {
                let r = n.api(
                    "GET",
                    "/api/v1/persons/p-1/medical?reason=emergency_transport",
                    "",
                );
                (r.status == 200
                    && r.body.contains(CANARY_MEDICAL)
                    && r.body.contains(&last_condition))
                .then_some(())
            },
        );
        poll(
            Duration::from_secs(180),
            "the registry at the ambulance",
            || {
                let r = n.api("GET", "/api/v1/persons/p-2", "");
                let last = n.api("GET", &format!("/api/v1/persons/{last_person}"), "");
                (r.status == 200
                    && r.body.contains(CANARY_NAME)
                    && last.status == 200
                    && last.body.contains(&canary_name_ja(CANARY_HOUSEHOLDS - 1)))
                .then_some(())
            },
        );
        refuse_numbers(n);
        // A medical update on the ambulance itself.
        let r = n.api(
            "POST",
            "/api/v1/persons/p-1/medical",
            &format!(r#"{{"add":[["condition","{CANARY_LOCAL}"]]}}"#),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        let r = n.api(
            "GET",
            "/api/v1/persons/p-1/medical?reason=emergency_transport",
            "",
        );
        assert!(r.body.contains(CANARY_LOCAL), "{}", r.body);
    }

    let check = |phase: &str, enc: &Node, plain: &Node| {
        // The WAL is live while the node runs and checkpointed after.
        let found = canaries_in(&enc.data());
        assert!(
            found.is_empty(),
            "{phase}: plaintext at rest on the encrypted ambulance: {found:?}"
        );
        let found = canaries_in(&enc.dir.join("tmp"));
        assert!(found.is_empty(), "{phase}: plaintext temp files: {found:?}");
        let head = std::fs::read(enc.data().join(DB_FILE_NAME)).unwrap();
        assert_ne!(&head[..16], node::store::SQLITE_HEADER, "{phase}");
        // The negative control proves the scan sees plaintext.
        let found = canaries_in(&plain.data());
        for (c, class) in canaries() {
            let shown = found.iter().any(|(_, x)| x == c);
            match *class {
                "name" | "medical" => assert!(
                    shown,
                    "{phase}: the control does not show {class} {c}: {found:?}"
                ),
                "individual-number" => assert!(!shown, "{phase}: {c} stored in the control"),
                _ => {}
            }
        }
        for n in [enc, plain] {
            assert_private(&n.data());
        }
    };
    check("running", &enc, &plain);
    assert!(
        enc.data().join(format!("{DB_FILE_NAME}-wal")).exists(),
        "the running node has a WAL to scan"
    );
    // An online backup of the encrypted node stays encrypted; without the
    // key it is refused and writes nothing. The plain control's backup
    // shows the canaries, so the scan would see a plaintext copy.
    let key_file = enc.dir.join("storage.key");
    let backup = |n: &Node, out: &Path, key: Option<&Path>| {
        let data = n.data();
        let mut args = vec![
            "backup",
            "create",
            "--data-dir",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(k) = key {
            args.extend(["--storage-key-file", k.to_str().unwrap()]);
        }
        run_kizuna(&args, &[])
    };
    let refused = backup(&enc, &root.join("bk-nokey"), None);
    assert!(!refused.status.success(), "a backup without the key");
    assert!(!root.join("bk-nokey").exists());
    ok(backup(&enc, &root.join("bk-enc"), Some(&key_file)));
    let found = canaries_in(&root.join("bk-enc"));
    assert!(found.is_empty(), "plaintext in the backup: {found:?}");
    let head = std::fs::read(root.join("bk-enc").join(DB_FILE_NAME)).unwrap();
    assert_ne!(&head[..16], node::store::SQLITE_HEADER, "backup header");
    ok(backup(&plain, &root.join("bk-plain"), None));
    assert!(
        !canaries_in(&root.join("bk-plain")).is_empty(),
        "the control backup shows no canary"
    );
    for n in [&mut enc, &mut plain, &mut hq] {
        n.stop();
    }
    check("stopped", &enc, &plain);
    // `config check` reads what `run` reads: the storage key, the sealed
    // node key, the encrypted database.
    let text = ok(run_kizuna(
        &["config", "check", enc.config().to_str().unwrap()],
        &[],
    ));
    assert!(text.contains("config ok"), "{text}");
    // The backup restores under the same key into a new data directory.
    let restored = root.join("restored");
    ok(run_kizuna(
        &[
            "backup",
            "restore",
            "--from",
            root.join("bk-enc").to_str().unwrap(),
            "--data-dir",
            restored.to_str().unwrap(),
            "--storage-key-file",
            key_file.to_str().unwrap(),
        ],
        &[],
    ));
    let found = canaries_in(&restored);
    assert!(found.is_empty(), "plaintext after restore: {found:?}");
    assert_private(&hq.data());
    let at_hq = canaries_in(&hq.data());
    assert!(
        !at_hq
            .iter()
            .any(|(_, c)| canary_individual_numbers().iter().any(|n| n == c)),
        "an Individual Number stored at hq: {at_hq:?}"
    );
    assert!(canaries().len() >= 100, "{} canaries", canaries().len());
    eprintln!(
        "{} canaries: none at rest on the encrypted ambulance, none in any log",
        canaries().len()
    );
    // Logs carry ids, never names or conditions, on every node.
    for n in [&enc, &plain, &hq] {
        let log = std::fs::read(n.log()).unwrap();
        assert!(
            log.len() > 1000,
            "{} logged almost nothing",
            n.log().display()
        );
        for (c, _) in canaries() {
            assert!(!contains(&log, c), "{} logs {c}", n.log().display());
        }
    }
    // And the data is there, under the key.
    let key = Arc::new(
        certs::storagekey::read(&certs::storagekey::KeySource::File(
            enc.dir.join("storage.key"),
        ))
        .unwrap(),
    );
    let store = SqliteStore::open_checked(
        &enc.data().join(DB_FILE_NAME),
        &OpenOptions {
            read_only: true,
            key: Some(key),
            ..Default::default()
        },
    )
    .unwrap();
    let doc = store
        .load_doc(&crdt::DocKey::new(crdt::Kind::Medical, "p-1").unwrap())
        .unwrap()
        .expect("medical document");
    assert!(doc.snapshot.is_some() || !doc.changes.is_empty());
    assert_eq!(store.integrity_check().unwrap(), "ok");
}

/// A snapshot of a directory: every file and its bytes (the lock file's
/// only content is the pid of its last holder, a hint).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    files(dir)
        .into_iter()
        .map(|f| {
            let b = match f.file_name() == Some(node::store::LOCK_FILE_NAME.as_ref()) {
                true => Vec::new(),
                false => std::fs::read(&f).unwrap(),
            };
            (f, b)
        })
        .collect()
}

#[test]
fn missing_or_wrong_keys_are_refused_and_nothing_is_created() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let pki = Pki::new(root);

    // No key configured on an ambulance: refused before the data
    // directory exists.
    let dir = root.join("amb-nokey");
    pki.issue(crdt::Role::Ambulance, "amb-1", &dir, None);
    let n = Node::new(&dir, None, "");
    let (code, text) = n.refused();
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("暗号化") && text.contains("encrypt their data at rest"),
        "{text}"
    );
    assert!(!n.data().exists());

    // A key file that is not there.
    let n = Node::new(&dir, None, "[storage]\nkey_file = \"missing.key\"\n");
    let (code, text) = n.refused();
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("暗号鍵がありません") && text.contains("storage key missing"),
        "{text}"
    );
    assert!(!n.data().exists());

    // A key in plaintext on disk while encrypting: refused.
    let dir = root.join("amb-plainkey");
    pki.issue(crdt::Role::Ambulance, "amb-2", &dir, None);
    certs::storagekey::generate_key_file(&dir.join("storage.key")).unwrap();
    let n = Node::new(&dir, None, "[storage]\nkey_file = \"storage.key\"\n");
    let (code, text) = n.refused();
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("平文") && text.contains("kizuna certs seal"),
        "{text}"
    );
    assert!(!n.data().exists());
    // Sealed with `kizuna certs seal`, it starts.
    ok(run_kizuna(
        &[
            "certs",
            "seal",
            "--key",
            dir.join("certs/node.key.pem").to_str().unwrap(),
            "--storage-key-file",
            dir.join("storage.key").to_str().unwrap(),
        ],
        &[],
    ));
    let sealed = std::fs::read_to_string(dir.join("certs/node.key.pem")).unwrap();
    assert!(sealed.contains("KIZUNA SEALED PRIVATE KEY") && !sealed.contains("BEGIN PRIVATE KEY"));
    let mut n = n;
    n.add_operator();
    n.start();
    n.stop();
    // The wrong key: the sealed node key does not open.
    let before = snapshot(&n.data());
    std::fs::remove_file(dir.join("storage.key")).unwrap();
    certs::storagekey::generate_key_file(&dir.join("storage.key")).unwrap();
    let (code, text) = n.refused();
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("暗号鍵が違う") && text.contains("wrong storage key"),
        "{text}"
    );
    assert_eq!(
        snapshot(&n.data()),
        before,
        "a refused start changed the data directory"
    );

    // Keys as systemd credentials: the node key in plaintext is fine
    // there (systemd keeps it in memory), and the database key decides.
    let dir = root.join("amb-cred");
    pki.issue(crdt::Role::Ambulance, "amb-3", &dir, None);
    let creds = dir.join("credentials");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::rename(
        dir.join("certs/node.key.pem"),
        creds.join("kizuna-node-key"),
    )
    .unwrap();
    certs::storagekey::generate_key_file(&creds.join("kizuna-storage-key")).unwrap();
    let cfg_certs = format!("[storage]\nkey_credential = \"kizuna-storage-key\"\n",);
    let mut n = Node::new(&dir, None, &cfg_certs);
    let text = std::fs::read_to_string(n.config()).unwrap().replace(
        "[certs]\ndir = \"certs\"\n",
        &format!(
            "[certs]\ncert = \"certs/node.crt.pem\"\nca = \"certs/ca.crt.pem\"\nkey = \"{}\"\n",
            creds.join("kizuna-node-key").display()
        ),
    );
    std::fs::write(n.config(), text).unwrap();
    // Without $CREDENTIALS_DIRECTORY the credential cannot be found.
    let (code, text) = n.refused();
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("CREDENTIALS_DIRECTORY"), "{text}");
    assert!(!n.data().exists());
    n.envs.push(("CREDENTIALS_DIRECTORY".into(), creds.clone()));
    n.add_operator();
    n.start();
    n.stop();
    let head = std::fs::read(n.data().join(DB_FILE_NAME)).unwrap();
    assert_ne!(&head[..16], node::store::SQLITE_HEADER);
    assert_private(&n.data());
    let before = snapshot(&n.data());
    // Another database key: refused, nothing changed, never a fresh
    // database over the encrypted one.
    std::fs::remove_file(creds.join("kizuna-storage-key")).unwrap();
    certs::storagekey::generate_key_file(&creds.join("kizuna-storage-key")).unwrap();
    let (code, text) = n.refused();
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("暗号鍵が違うか")
            && text.contains("wrong storage key, or the file is damaged"),
        "{text}"
    );
    assert_eq!(snapshot(&n.data()), before);
    // Encryption switched off in the config: the encrypted database is
    // not opened without its key (and not replaced).
    let text = std::fs::read_to_string(n.config())
        .unwrap()
        .replace("key_credential = \"kizuna-storage-key\"", "encrypt = false");
    std::fs::write(n.config(), text).unwrap();
    let (code, text) = n.refused();
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("暗号化されていますが")
            && text.contains("the database is encrypted, but no storage key"),
        "{text}"
    );
    assert_eq!(snapshot(&n.data()), before);

    // A plaintext database is never used as if encrypted.
    let mut hq = hq(root, &pki);
    hq.start();
    hq.stop();
    let before = snapshot(&hq.data());
    certs::storagekey::generate_key_file(&hq.dir.join("storage.key")).unwrap();
    let mut text = std::fs::read_to_string(hq.config()).unwrap();
    text.push_str("[storage]\nencrypt = true\nkey_file = \"storage.key\"\n");
    std::fs::write(hq.config(), text).unwrap();
    // (its node key sealed, so the database is what is refused)
    ok(run_kizuna(
        &[
            "certs",
            "seal",
            "--key",
            hq.dir.join("certs/node.key.pem").to_str().unwrap(),
            "--storage-key-file",
            hq.dir.join("storage.key").to_str().unwrap(),
        ],
        &[],
    ));
    let (code, text) = hq.refused();
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("kizuna store encrypt"), "{text}");
    assert_eq!(snapshot(&hq.data()), before);
}

#[test]
fn plaintext_database_encrypted_in_place() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let pki = Pki::new(root);
    let mut hq = hq(root, &pki);
    hq.start();
    let r = hq.api(
        "POST",
        "/api/v1/persons/p-1/medical",
        &format!(r#"{{"consent":"consented","add":[["allergy","{CANARY_MEDICAL}"]]}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    hq.stop();
    let db = hq.data().join(DB_FILE_NAME);
    let digest = SqliteStore::open_readonly(&db)
        .unwrap()
        .content_digest()
        .unwrap();
    assert!(
        !canaries_in(&hq.data()).is_empty(),
        "the plaintext database shows its data"
    );
    // A copy left by an interrupted run is not in the way.
    std::fs::write(hq.data().join("kizuna.db.encrypting"), b"partial").unwrap();

    let key_file = hq.dir.join("storage.key");
    certs::storagekey::generate_key_file(&key_file).unwrap();
    let data = hq.data();
    let (d, k) = (data.to_str().unwrap(), key_file.to_str().unwrap());
    let out = ok(run_kizuna(
        &["store", "encrypt", "--data-dir", d, "--storage-key-file", k],
        &[],
    ));
    assert!(out.contains("encrypted"), "{out}");
    let found = canaries_in(&hq.data());
    assert!(found.is_empty(), "plaintext after encrypting: {found:?}");
    assert!(!hq.data().join("kizuna.db.encrypting").exists());
    assert_private(&hq.data());
    let key = Arc::new(
        certs::storagekey::read(&certs::storagekey::KeySource::File(key_file.clone())).unwrap(),
    );
    let opts = OpenOptions {
        read_only: true,
        key: Some(key),
        ..Default::default()
    };
    assert_eq!(
        SqliteStore::open_checked(&db, &opts)
            .unwrap()
            .content_digest()
            .unwrap(),
        digest,
        "the encrypted database holds exactly what the plaintext one did"
    );
    // Without the key nothing opens it, and a second run refuses.
    let err = SqliteStore::open_readonly(&db).unwrap_err().to_string();
    assert!(err.contains("no storage key"), "{err}");
    let o = run_kizuna(
        &["store", "encrypt", "--data-dir", d, "--storage-key-file", k],
        &[],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already encrypted"));
    // Commands on a stopped node take the key; without it they refuse.
    let export = root.join("export");
    let o = run_kizuna(
        &[
            "docs",
            "export",
            "--data-dir",
            d,
            "--out",
            export.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--storage-key-file"));
    ok(run_kizuna(
        &[
            "docs",
            "export",
            "--data-dir",
            d,
            "--out",
            export.to_str().unwrap(),
            "--storage-key-file",
            k,
        ],
        &[],
    ));
    assert!(export.join("index.json").exists());
    // The node runs on it with the key in its config (node key sealed).
    ok(run_kizuna(
        &[
            "certs",
            "seal",
            "--key",
            hq.dir.join("certs/node.key.pem").to_str().unwrap(),
            "--storage-key-file",
            k,
        ],
        &[],
    ));
    let mut text = std::fs::read_to_string(hq.config()).unwrap();
    text.push_str("[storage]\nencrypt = true\nkey_file = \"storage.key\"\n");
    std::fs::write(hq.config(), text).unwrap();
    hq.start();
    let r = hq.api(
        "GET",
        "/api/v1/persons/p-1/medical?reason=emergency_treatment",
        "",
    );
    assert!(r.body.contains(CANARY_MEDICAL), "{}", r.body);
    hq.stop();
    assert!(canaries_in(&hq.data()).is_empty());
}

/// Twelve digits that pass the Individual Number check digit.
fn individual_number() -> String {
    (0..10)
        .map(|d| format!("40123456789{d}"))
        .find(|s| crdt::text::is_individual_number(s))
        .unwrap()
}

/// The number as people write it, or someone hiding it would.
fn disguises(n: &str) -> Vec<String> {
    let wide: String = n
        .chars()
        .map(|c| char::from_u32(c as u32 - '0' as u32 + '０' as u32).unwrap())
        .collect();
    vec![
        n.to_string(),
        format!("{} {} {}", &n[..4], &n[4..8], &n[8..]),
        format!("{}-{}-{}", &n[..4], &n[4..8], &n[8..]),
        format!("{}.{}.{}", &n[..4], &n[4..8], &n[8..]),
        format!("{}/{}/{}", &n[..4], &n[4..8], &n[8..]),
        wide.clone(),
        format!("{}\u{200B}{}", &n[..6], &n[6..]),
        format!("{}\u{2060}－{}", &wide[..12], &n[4..]),
        format!("番号 {}　{}", &n[..6], &n[6..]),
    ]
}

/// Neither the number nor any disguise of it in `text`.
fn assert_not_echoed(text: &str, n: &str, what: &str) {
    let digits: String = text.chars().filter(|c| c.is_ascii_digit()).collect();
    assert!(!digits.contains(n), "{what} echoes the number: {text}");
    for d in disguises(n) {
        assert!(!text.contains(&d), "{what} echoes {d:?}: {text}");
    }
    assert!(
        !text.contains(&n[4..]),
        "{what} echoes part of the number: {text}"
    );
}

#[test]
fn individual_numbers_are_refused_at_the_api_and_import_and_never_echoed() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let pki = Pki::new(root);
    let mut hq = hq(root, &pki);
    let digest = |hq: &Node| {
        SqliteStore::open_readonly(&hq.data().join(DB_FILE_NAME))
            .unwrap()
            .content_digest()
            .unwrap()
    };
    hq.start();
    let r = hq.api(
        "POST",
        "/api/v1/shelters",
        r#"{"shelter_id":"s-1","name":"体育館","capacity":100}"#,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let before = digest(&hq);
    let n = individual_number();
    let json = |s: &str| serde_json::to_string(s).unwrap();
    let auth = format!("Bearer {}", hq.token);
    for d in disguises(&n) {
        let q = json(&d);
        let id = json(&format!("p-{d}"));
        let requests: Vec<(&str, String, String, Option<String>)> = vec![
            (
                "POST",
                "/api/v1/persons".into(),
                format!(r#"{{"name":{q},"kana":"ヤマダ"}}"#),
                None,
            ),
            (
                "POST",
                "/api/v1/persons".into(),
                format!(r#"{{"name":"山田","kana":"ヤマダ","note":{q}}}"#),
                None,
            ),
            (
                "POST",
                "/api/v1/persons".into(),
                format!(r#"{{"name":"山田","kana":"ヤマダ","op_id":{id}}}"#),
                None,
            ),
            (
                "POST",
                "/api/v1/checkins".into(),
                format!(r#"{{"person_ids":[{id}],"shelter_id":"s-1"}}"#),
                None,
            ),
            (
                "POST",
                "/api/v1/checkins".into(),
                format!(r#"{{"person_ids":["p-1"],"shelter_id":{q}}}"#),
                None,
            ),
            (
                "POST",
                "/api/v1/checkins".into(),
                r#"{"person_ids":["p-3"],"shelter_id":"s-1"}"#.into(),
                Some(format!("op-{n}")),
            ),
            (
                "POST",
                "/api/v1/shelters".into(),
                format!(r#"{{"shelter_id":{q},"name":"x","capacity":1}}"#),
                None,
            ),
            (
                "POST",
                "/api/v1/shelters".into(),
                format!(r#"{{"shelter_id":"s-9","name":{q},"capacity":1}}"#),
                None,
            ),
            (
                "POST",
                "/api/v1/persons/p-1/medical".into(),
                format!(r#"{{"add":[["allergy",{q}]]}}"#),
                None,
            ),
            (
                "POST",
                "/api/v1/persons/p-1/medical".into(),
                format!(r#"{{"edit":[["allergy",{q},"x"]]}}"#),
                None,
            ),
            (
                "POST",
                "/api/v1/persons/p-1/medical".into(),
                format!(r#"{{"remove":[["allergy",{id}]]}}"#),
                None,
            ),
            (
                "PUT",
                "/api/v1/persons/p-1/contacts".into(),
                format!(
                    r#"{{"contacts":[{{"contact_id":{id},"name":"花子","email":"h@example.jp","consent":true}}],"disclosure":{{"do_not_disclose":false,"share_shelter":true}}}}"#
                ),
                None,
            ),
            (
                "PUT",
                "/api/v1/persons/p-1/contacts".into(),
                format!(
                    r#"{{"contacts":[{{"contact_id":"c1","name":{q},"email":"h@example.jp","consent":true}}],"disclosure":{{"do_not_disclose":false,"share_shelter":true}}}}"#
                ),
                None,
            ),
            (
                "POST",
                "/api/v1/shelters".into(),
                format!(r#"{{"shelter_id":"s-9","name":"x","capacity":{q}}}"#),
                None,
            ),
        ];
        for (method, path, body, key) in requests {
            let mut headers = vec![("Authorization", auth.as_str())];
            if let Some(k) = &key {
                headers.push(("Idempotency-Key", k.as_str()));
            }
            let r = http(hq.http, method, &path, &headers, &body).expect("API answers");
            assert!(
                (400..500).contains(&r.status),
                "{method} {path} {body}: {} {}",
                r.status,
                r.body
            );
            assert_not_echoed(&r.body, &n, &format!("{method} {path} {body}"));
        }
        // In the path and in a query string too.
        let enc: String = format!("p-{d}")
            .bytes()
            .map(|b| format!("%{b:02X}"))
            .collect();
        for path in [
            format!("/api/v1/persons/{enc}"),
            format!("/api/v1/persons/{enc}/medical?reason=x"),
            format!("/api/v1/search?q={enc}"),
            format!("/api/v1/households/by-card/{enc}"),
        ] {
            let r = hq.api("GET", &path, "");
            assert!(
                (400..500).contains(&r.status),
                "{path}: {} {}",
                r.status,
                r.body
            );
            assert_not_echoed(&r.body, &n, &path);
        }
    }
    assert_eq!(
        digest(&hq),
        before,
        "a refused request changed the database"
    );
    hq.stop();
    let log = std::fs::read_to_string(hq.log()).unwrap();
    assert_not_echoed(&log, &n, "the node's log");

    // Import: the number in any cell of any data set, in any disguise.
    let before = digest(&hq);
    let data = hq.data();
    for (i, d) in disguises(&n).iter().enumerate() {
        let cell = if d.contains(' ') || d.contains('　') {
            format!("\"{d}\"")
        } else {
            d.clone()
        };
        let files = [
            ("registry", format!(
                "household_id,address,person_id,name,kana,birth_date,card_user_id\n\
                 h-9,三条市,p-9,山田 三郎,ヤマダ サブロウ,1980-01-01,\n\
                 h-9,{cell},p-10,山田 四郎,ヤマダ シロウ,1981-01-01,\n"
            )),
            ("registry", format!(
                "household_id,address,person_id,name,kana,birth_date,card_user_id\n\
                 h-{cell},三条市,p-9,山田 三郎,ヤマダ サブロウ,1980-01-01,\n"
            )),
            ("registry", format!(
                "household_id,address,person_id,name,kana,birth_date,card_user_id\n\
                 h-9,三条市,p-9,山田 三郎,ヤマダ サブロウ,1980-01-01,{cell}\n"
            )),
            ("medical", format!(
                "person_id,blood_type,consent,allergies,conditions,medications,family_doctor,emergency_contacts\n\
                 p-1,A+,同意,ペニシリン,{cell},,,\n"
            )),
            ("contacts", format!(
                "person_id,contact_id,contact_name,relation,email,language,consent,consent_date,do_not_disclose,share_shelter\n\
                 p-1,c-{cell},山田 花子,長女,hanako@example.jp,ja,同意,2026-04-01,0,1\n"
            )),
            ("shelters", format!(
                "shelter_id,name,address,district,capacity,kind,status\n\
                 s-2,{cell},新潟県三条市,旭地区,300,指定避難所,開設\n"
            )),
        ];
        for (j, (set, text)) in files.iter().enumerate() {
            let f = root.join(format!("in-{i}-{j}.csv"));
            std::fs::write(&f, text).unwrap();
            let args: Vec<&str> = match *set {
                "registry" => vec!["registry", "import"],
                other => vec!["import", other],
            };
            let mut all = args.clone();
            all.extend(["--data-dir", data.to_str().unwrap(), f.to_str().unwrap()]);
            let o = run_kizuna(&all, &[]);
            let out = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            assert_eq!(o.status.code(), Some(2), "{set} {d:?}: {out}");
            assert!(out.contains("individual-number"), "{set} {d:?}: {out}");
            assert_not_echoed(&out, &n, &format!("import {set}"));
        }
    }
    assert_eq!(digest(&hq), before, "a refused import changed the database");
}
