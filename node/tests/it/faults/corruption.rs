//! Corruption (A-8, A-9, A-10) in copies of a real store: a node opened on
//! a damaged file either refuses it, refuses the damaged document, or
//! serves exactly what some committed state held; a medical value that
//! was never written is never served.
//!
//! Two kinds of damage. **Targeted**: rows of one medical document edited
//! the way a flipped bit could leave them (a change's bytes, a change
//! moved to another document or gone, a damaged snapshot, a snapshot
//! position past its tail, wrong stored heads); each case names the
//! outcome it must have (rebuilt from the change log and served right, or
//! quarantined and refused) while every other document is still served.
//! **Random**: single bit flips at seeded random offsets of the database
//! file (checkpointed) and of the WAL (uncheckpointed commits), plaintext
//! and SQLCipher-encrypted; each trial's served state is compared with the
//! states of every committed prefix.
//!
//! What a plaintext store cannot promise, and the campaign counts instead
//! of asserting: projection rows (names, locations) carry no checksum, so
//! a flip in their text is served; and a flipped WAL frame ends the WAL
//! there (SQLite's torn-write rule), so the commits after it are rolled
//! back. Encrypted stores check an HMAC on every page, so there every
//! flip in the database file must be detected or harmless.
//!
//! Replay: `KIZUNA_CORRUPTION_SEED` fixes the seed (a failure prints it),
//! `KIZUNA_CORRUPTION_TRIALS` the number of flips per campaign.

use super::*;
use certs::storagekey::StorageKey;
use crdt::api::{Query, QueryReply};
use crdt::model::ConsentBasis;
use std::path::PathBuf;
use std::sync::Arc;

const PERSONS: usize = 30;
/// Persons with a medical profile; the first gets enough changes for a
/// compacted snapshot plus a tail.
const MEDICAL: [usize; 4] = [0, 1, 2, 3];
/// Persons whose served record (name, household, location) is compared.
const LOOKED_UP: usize = 14;

/// What a node serves from a store, per person: the medical view and the
/// person record (JSON), or the error it answered with.
#[derive(Clone, Debug, PartialEq)]
struct Served {
    medical: BTreeMap<String, Result<String, String>>,
    persons: BTreeMap<String, Result<String, String>>,
}

enum Probe {
    /// Open refused the file (store or engine).
    Refused(String),
    Served(Served),
}

fn files(dir: &Path) -> (PathBuf, PathBuf) {
    let db = dir.join(DB_FILE_NAME);
    let wal = dir.join(format!("{DB_FILE_NAME}-wal"));
    (db, wal)
}

/// Copies the database and its WAL (never the index, which SQLite
/// rebuilds from the WAL) from `from` into a fresh `to`.
fn copy_store(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    let (db, wal) = files(from);
    let (tdb, twal) = files(to);
    std::fs::copy(db, tdb).unwrap();
    if wal.exists() {
        std::fs::copy(wal, twal).unwrap();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// Opens the store in `dir` as the node does and asks for every medical
/// profile (audited reads, each by its own operator so no rate limit
/// applies) and every looked-up person.
fn probe(dir: &Path, opts: &OpenOptions) -> Probe {
    let (db, _) = files(dir);
    let store = match SqliteStore::open_with(&db, opts) {
        Ok(s) => s,
        Err(e) => return Probe::Refused(e.to_string()),
    };
    let d = match Driver::start(store, config()) {
        Ok(d) => d,
        Err(e) => return Probe::Refused(e.to_string()),
    };
    let mut served = Served {
        medical: BTreeMap::new(),
        persons: BTreeMap::new(),
    };
    for (n, i) in MEDICAL.iter().enumerate() {
        let p = person(*i);
        let r = d.command_blocking(
            format!("read-{n}"),
            Operator(format!("reader-{n}")),
            Command::ReadMedical {
                person_id: p.clone(),
                reason: "clinic_care".into(),
                break_glass: false,
            },
        );
        let v = match r {
            Ok(Reply::Medical { view, .. }) => Ok(serde_json::to_string(&view).unwrap()),
            Ok(other) => panic!("unexpected reply {other:?}"),
            Err(e) => Err(e.to_string()),
        };
        served.medical.insert(p, v);
    }
    let rt = runtime();
    for i in 0..LOOKED_UP {
        let p = person(i);
        let r = rt.block_on(d.query(Query::Person {
            person_id: p.clone(),
        }));
        let v = match r {
            Ok(reply @ QueryReply::Person(_)) => Ok(serde_json::to_string(&reply).unwrap()),
            Ok(other) => Ok(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
        };
        served.persons.insert(p, v);
    }
    drop(d.shutdown().expect("the engine thread must not panic"));
    Probe::Served(served)
}

/// A store with registry persons, check-ins and medical profiles, closed
/// cleanly (`clean`: everything checkpointed into the database file), then
/// reopened for `tail` more commands; `prefixes[k]` is a copy of the files
/// after the k-th of those (WAL included), taken while the node runs.
struct Fixture {
    _tmp: tempfile::TempDir,
    opts: OpenOptions,
    clean: PathBuf,
    prefixes: Vec<PathBuf>,
}

fn medical(d: &DriverHandle, op: String, i: usize, text: String, consent: bool) {
    let r = d
        .command_blocking(
            op,
            operator(),
            Command::PutMedical {
                person_id: person(i),
                update: MedicalUpdate {
                    blood_type: Some(BloodType::APos),
                    consent: consent.then_some(ConsentBasis::Consented),
                    add: vec![(MedicalSection::Allergy, text)],
                    ..Default::default()
                },
            },
        )
        .unwrap();
    assert!(matches!(r, Reply::Done), "{r:?}");
}

fn check_in(d: &DriverHandle, op: String, i: usize) {
    let r = d
        .command_blocking(
            op,
            operator(),
            Command::CheckIn {
                person_ids: vec![person(i)],
                shelter_id: Some(SHELTERS[i % 2].into()),
            },
        )
        .unwrap();
    assert!(matches!(r, Reply::Presence { .. }), "{r:?}");
}

fn fixture(encrypted: bool) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let opts = OpenOptions {
        key: encrypted.then(|| Arc::new(StorageKey::generate().unwrap())),
        ..OpenOptions::default()
    };
    let live = tmp.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let (db, _) = files(&live);
    seed(&db, &opts, PERSONS);
    let d = Driver::start(SqliteStore::open_with(&db, &opts).unwrap(), config()).unwrap();
    for i in 0..10 {
        check_in(&d, format!("ck-{i}"), i);
    }
    // More changes than a snapshot needs (32), so person 0's profile is a
    // snapshot plus a tail of changes.
    for n in 0..40 {
        medical(&d, format!("m0-{n}"), 0, format!("allergy {n}"), n == 0);
    }
    for i in MEDICAL.into_iter().skip(1) {
        for n in 0..3 {
            medical(&d, format!("m{i}-{n}"), i, format!("note {i}.{n}"), n == 0);
        }
    }
    drop(d.shutdown().unwrap());
    assert!(
        !files(&live).1.exists(),
        "a clean close checkpoints and removes the WAL"
    );
    let clean = tmp.path().join("clean");
    copy_store(&live, &clean);

    // Commits that stay in the WAL (far below the checkpoint threshold).
    let d = Driver::start(SqliteStore::open_with(&db, &opts).unwrap(), config()).unwrap();
    let mut prefixes = Vec::new();
    let mut snap = |k: usize| {
        let to = tmp.path().join(format!("prefix-{k}"));
        copy_store(&live, &to);
        prefixes.push(to);
    };
    snap(0);
    let steps: [&dyn Fn(&DriverHandle, usize); 6] = [
        &|d, k| check_in(d, format!("w-{k}"), 10),
        &|d, k| medical(d, format!("w-{k}"), 0, "latex".into(), false),
        &|d, k| medical(d, format!("w-{k}"), 1, "penicillin".into(), false),
        &|d, k| check_in(d, format!("w-{k}"), 11),
        &|d, k| medical(d, format!("w-{k}"), 2, "peanuts".into(), false),
        &|d, k| medical(d, format!("w-{k}"), 0, "shellfish".into(), false),
    ];
    for (k, step) in steps.iter().enumerate() {
        step(&d, k);
        snap(k + 1);
    }
    assert!(
        std::fs::metadata(files(prefixes.last().unwrap()).1)
            .unwrap()
            .len()
            > 0,
        "the last prefix must hold commits in its WAL"
    );
    drop(d.shutdown().unwrap());
    Fixture {
        _tmp: tmp,
        opts,
        clean,
        prefixes,
    }
}

/// What an undamaged copy of `dir` serves (probed on a scratch copy: a
/// probe writes audit entries and checkpoints).
fn served(dir: &Path, opts: &OpenOptions) -> Served {
    let scratch = dir.with_extension("truth");
    copy_store(dir, &scratch);
    match probe(&scratch, opts) {
        Probe::Served(s) => {
            for (p, v) in s.medical.iter().chain(&s.persons) {
                assert!(v.is_ok(), "undamaged store: {p}: {v:?}");
            }
            s
        }
        Probe::Refused(e) => panic!("undamaged store refused: {e}"),
    }
}

fn flip_bit(path: &Path, offset: usize, bit: u8) {
    let mut b = std::fs::read(path).unwrap();
    b[offset] ^= 1 << bit;
    std::fs::write(path, b).unwrap();
}

/// Counts of one campaign.
#[derive(Debug, Default)]
struct Tally {
    trials: u64,
    refused_at_open: u64,
    /// Trials where at least one read was refused (damage found on load).
    refused_reads: u64,
    /// Served exactly the newest committed state.
    newest: u64,
    /// Served exactly an older committed state (the WAL was cut short).
    rolled_back: u64,
    /// Medical reads answered with a value no committed state held, or
    /// "not found" for a profile that exists: must stay 0.
    wrong_medical: u64,
    /// Person records (names, locations) served with values no committed
    /// state held.
    wrong_records: u64,
    failures: Vec<String>,
}

/// Runs `trials` single-bit flips; `wal_share` of them (in percent) land
/// in the WAL of the newest prefix, the rest in the database file of the
/// clean copy.
fn campaign(f: &Fixture, seed: u64, trials: u64, wal_share: u64) -> Tally {
    let truths: Vec<Served> = f.prefixes.iter().map(|p| served(p, &f.opts)).collect();
    let clean_truth = served(&f.clean, &f.opts);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut t = Tally::default();
    let scratch = f.clean.with_file_name("trial");
    for trial in 0..trials {
        let in_wal = below(&mut rng, 100) < wal_share;
        let (source, allowed): (&Path, Vec<&Served>) = if in_wal {
            (f.prefixes.last().unwrap(), truths.iter().collect())
        } else {
            (&f.clean, vec![&clean_truth])
        };
        copy_store(source, &scratch);
        let (db, wal) = files(&scratch);
        let target = if in_wal { wal } else { db };
        let len = std::fs::metadata(&target).unwrap().len();
        let offset = below(&mut rng, len) as usize;
        let bit = below(&mut rng, 8) as u8;
        flip_bit(&target, offset, bit);
        let place = format!(
            "trial {trial}: bit {bit} of byte {offset} of the {}",
            if in_wal { "WAL" } else { "database file" }
        );
        t.trials += 1;
        let s = match probe(&scratch, &f.opts) {
            Probe::Refused(_) => {
                t.refused_at_open += 1;
                continue;
            }
            Probe::Served(s) => s,
        };
        if s.medical
            .values()
            .chain(s.persons.values())
            .any(Result::is_err)
        {
            t.refused_reads += 1;
        }
        let newest = *allowed.last().unwrap();
        if s == *newest {
            t.newest += 1;
        } else if allowed.contains(&&s) {
            t.rolled_back += 1;
        }
        for (p, v) in &s.medical {
            let held = allowed.iter().any(|a| a.medical[p] == *v);
            let refused = v.as_ref().is_err_and(|e| !e.contains("not found"));
            if !held && !refused {
                t.wrong_medical += 1;
                t.failures
                    .push(format!("{place}: medical profile of {p} served as {v:?}"));
            }
        }
        for (p, v) in &s.persons {
            if v.is_ok() && !allowed.iter().any(|a| a.persons[p] == *v) {
                t.wrong_records += 1;
                if f.opts.key.is_some() {
                    t.failures
                        .push(format!("{place}: person {p} served as {v:?}"));
                }
            }
        }
    }
    t
}

fn trials() -> u64 {
    env_u64("KIZUNA_CORRUPTION_TRIALS", 120)
}

/// A-8/A-9, plaintext: no flip in the database file or the WAL makes the
/// node serve a medical value that was never committed.
#[test]
fn bit_flips_in_a_plaintext_store_never_serve_a_wrong_medical_value() {
    let seed = env_u64("KIZUNA_CORRUPTION_SEED", 0x636f7272);
    let f = fixture(false);
    let t = campaign(&f, seed, trials(), 40);
    eprintln!("plaintext, seed {seed:#x}: {t:?}");
    assert!(
        t.failures.is_empty(),
        "replay with KIZUNA_CORRUPTION_SEED={seed}: {:#?}",
        t.failures
    );
    // The campaign must have exercised both outcomes that matter.
    assert!(t.refused_at_open + t.refused_reads > 0, "{t:?}");
    assert!(t.newest > 0, "{t:?}");
}

/// A-8, encrypted: every page carries an HMAC, so every flip in the
/// database file is refused or lands where it changes nothing served, and
/// a WAL flip at worst rolls back to an earlier committed state.
#[test]
fn bit_flips_in_an_encrypted_store_are_detected_or_harmless() {
    let seed = env_u64("KIZUNA_CORRUPTION_SEED", 0x63697068);
    let f = fixture(true);
    let t = campaign(&f, seed, trials(), 30);
    eprintln!("encrypted, seed {seed:#x}: {t:?}");
    assert!(
        t.failures.is_empty(),
        "replay with KIZUNA_CORRUPTION_SEED={seed}: {:#?}",
        t.failures
    );
    assert_eq!(t.wrong_records, 0, "{t:?}");
    assert!(t.refused_at_open > 0, "{t:?}");
}

/// Edits rows of a copy with plain SQL (the damage a flip could do), with
/// the store's own checks out of the way.
fn damage(dir: &Path, f: &dyn Fn(&rusqlite::Connection)) {
    let (db, _) = files(dir);
    let c = rusqlite::Connection::open(db).unwrap();
    f(&c);
}

/// Rewrites one blob column of one row with `edit` applied.
fn edit_blob(c: &rusqlite::Connection, table: &str, col: &str, row: &str, edit: fn(&mut Vec<u8>)) {
    let mut b: Vec<u8> = c
        .query_row(&format!("SELECT {col} FROM {table} WHERE {row}"), [], |r| {
            r.get(0)
        })
        .unwrap();
    edit(&mut b);
    let n = c
        .execute(&format!("UPDATE {table} SET {col} = ?1 WHERE {row}"), [b])
        .unwrap();
    assert_eq!(n, 1);
}

fn medical_key_sql(i: usize) -> String {
    format!(
        "kind = {} AND doc_id = '{}'",
        Kind::Medical.code(),
        person(i)
    )
}

type Case = (
    &'static str,
    Box<dyn Fn(&rusqlite::Connection)>,
    usize,
    bool,
);

/// A-8/A-10: each targeted damage to one medical document's rows has its
/// stated outcome, and every other document is still served as committed.
#[test]
fn damaged_medical_rows_are_rebuilt_or_quarantined_never_served_wrong() {
    let f = fixture(false);
    let truth = served(&f.clean, &f.opts);
    let m0 = medical_key_sql(0);
    let m1 = medical_key_sql(1);
    let docs0 = format!("kind = {} AND id = '{}'", Kind::Medical.code(), person(0));
    let docs1 = format!("kind = {} AND id = '{}'", Kind::Medical.code(), person(1));
    let newest1 = format!("seq = (SELECT max(seq) FROM changes WHERE {m1})");
    let sql = |s: String| -> Box<dyn Fn(&rusqlite::Connection)> {
        Box::new(move |c| c.execute_batch(&s).unwrap())
    };
    // (what, damage, damaged person, true = rebuilt from the change log
    // and served right, false = quarantined and refused)
    let cases: Vec<Case> = vec![
        (
            "a flipped bit in the newest change",
            {
                let row = newest1.clone();
                Box::new(move |c| edit_blob(c, "changes", "bytes", &row, |b| b[40] ^= 0x10))
            },
            1,
            false,
        ),
        (
            "the newest change moved to another document",
            sql(format!(
                "UPDATE changes SET doc_id = 'p9999999' WHERE {newest1}"
            )),
            1,
            false,
        ),
        (
            "the newest change gone",
            sql(format!("DELETE FROM changes WHERE {newest1}")),
            1,
            false,
        ),
        (
            "stored heads of another state",
            sql(format!(
                "UPDATE docs SET heads = zeroblob(32) WHERE {docs1}"
            )),
            1,
            false,
        ),
        (
            "a damaged snapshot",
            {
                let row = docs0.clone();
                Box::new(move |c| {
                    edit_blob(c, "docs", "snapshot", &row, |b| {
                        let mid = b.len() / 2;
                        b[mid] ^= 0x04
                    })
                })
            },
            0,
            true,
        ),
        (
            "the snapshot position past the tail",
            sql(format!(
                "UPDATE docs SET snapshot_seq = (SELECT max(seq) FROM changes WHERE {m0}) \
                 WHERE {docs0}"
            )),
            0,
            true,
        ),
    ];
    // The fixture must have what the cases damage: a snapshot with a tail.
    {
        let c = rusqlite::Connection::open(files(&f.clean).0).unwrap();
        let (snap, tail): (i64, i64) = c
            .query_row(
                &format!(
                    "SELECT length(snapshot), (SELECT count(*) FROM changes \
                     WHERE {m0} AND seq > docs.snapshot_seq) FROM docs WHERE {docs0}"
                ),
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert!(snap > 200 && tail > 0, "snapshot {snap} bytes, tail {tail}");
    }
    let scratch = f.clean.with_file_name("case");
    for (what, hurt, damaged, rebuilt) in cases {
        copy_store(&f.clean, &scratch);
        damage(&scratch, &*hurt);
        let Probe::Served(s) = probe(&scratch, &f.opts) else {
            panic!("{what}: the node refused the whole store");
        };
        let p = person(damaged);
        if rebuilt {
            assert_eq!(s.medical[&p], truth.medical[&p], "{what}");
        } else {
            let e = s.medical[&p].as_ref().expect_err(what);
            assert!(e.contains("corrupt"), "{what}: {e}");
            let q = SqliteStore::open_with(&files(&scratch).0, &f.opts)
                .unwrap()
                .quarantined()
                .unwrap();
            assert!(
                q.iter().any(|(k, _)| k.id == p),
                "{what}: not quarantined: {q:?}"
            );
        }
        for (other, v) in &s.medical {
            if *other != p {
                assert_eq!(*v, truth.medical[other], "{what}: {other}");
            }
        }
        assert_eq!(s.persons, truth.persons, "{what}");
    }
}

/// Issue 14 item 3 (A-8, A-10), end to end: two real `kizuna` processes
/// (headquarters and an ambulance) over real QUIC, each on its own SQLite
/// file. The ambulance holds a medical profile synced from headquarters;
/// while both are stopped, a bit of one of the profile's stored changes is
/// flipped in the ambulance's file. Restarted alone, the ambulance refuses
/// the profile (never a wrong value) and counts it as quarantined; once
/// headquarters is back, the ambulance gets a good copy through the normal
/// sync protocol with no operator action, serves the right value again
/// and clears the quarantine, and still does after its next restart.
/// Deadlines only guard against hangs.
#[test]
fn a_damaged_medical_profile_is_refetched_from_a_peer_over_quic() {
    use crate::support::proc::{ok, poll, run_kizuna, Node};
    use std::time::Duration;
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let ca = root.join("ca");
    certs::ca::init_ca(&ca, "Refetch Test CA").unwrap();
    let issue = |role: Role, id: &str, dir: &Path| {
        certs::ca::issue_sealed_at(
            &ca,
            role,
            &NodeId::new(id).unwrap(),
            &dir.join("certs"),
            30,
            time::OffsetDateTime::now_utc(),
            None,
        )
        .unwrap();
    };
    let hq_dir = root.join("hq");
    issue(Role::Hq, "hq-1", &hq_dir);
    let mut hq = Node::new(&hq_dir, None, "");
    let csv = root.join("registry.csv");
    std::fs::write(
        &csv,
        "household_id,address,person_id,name,kana,birth_date,card_user_id\n\
         h-1,新潟県三条市,p-1,山田 花子,ヤマダ ハナコ,1950-01-01,\n\
         h-1,新潟県三条市,p-2,山田 太郎,ヤマダ タロウ,1952-02-02,\n",
    )
    .unwrap();
    ok(run_kizuna(
        &[
            "registry",
            "import",
            "--data-dir",
            hq.data().to_str().unwrap(),
            csv.to_str().unwrap(),
            "--node-id",
            "hq-1",
        ],
        &[],
    ));
    hq.add_operator();
    let amb_dir = root.join("amb");
    issue(Role::Ambulance, "amb-1", &amb_dir);
    // Plaintext, so the test can damage a row with plain SQL.
    let mut amb = Node::new(&amb_dir, Some(hq.quic), "[storage]\nencrypt = false\n");
    amb.add_operator();

    // Headquarters writes the profile in three changes.
    hq.start();
    for body in [
        r#"{"blood_type":"AB-","consent":"consented","add":[["allergy","ペニシリン"]]}"#,
        r#"{"add":[["allergy","ラテックス"]]}"#,
        r#"{"add":[["condition","ぜんそく"]]}"#,
    ] {
        let r = hq.api("POST", "/api/v1/persons/p-1/medical", body);
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let status = |n: &Node| -> serde_json::Value {
        let r = n.api("GET", "/api/v1/status", "");
        assert_eq!(r.status, 200, "{}", r.body);
        serde_json::from_str(&r.body).unwrap()
    };
    let medical_docs = |s: &serde_json::Value| s["documents_by_kind"]["medical"].as_u64();
    let read = |n: &Node| {
        n.api(
            "GET",
            "/api/v1/persons/p-1/medical?reason=emergency_transport",
            "",
        )
    };
    let right = |body: &str| {
        body.contains("AB-")
            && body.contains("ペニシリン")
            && body.contains("ラテックス")
            && body.contains("ぜんそく")
    };
    // The ambulance's first sync brings the document whole (one frame,
    // one commit).
    amb.start();
    poll(
        Duration::from_secs(180),
        "the profile at the ambulance",
        || (medical_docs(&status(&amb)) == Some(1)).then_some(()),
    );
    let r = read(&amb);
    assert!(r.status == 200 && right(&r.body), "{} {}", r.status, r.body);
    amb.stop();
    hq.stop();

    // A flipped bit in the newest stored change of the profile.
    let db = amb.data().join(DB_FILE_NAME);
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        let row = format!(
            "seq = (SELECT max(seq) FROM changes WHERE kind = {} AND doc_id = 'p-1')",
            Kind::Medical.code()
        );
        edit_blob(&c, "changes", "bytes", &row, |b| b[40] ^= 0x10);
    }

    // Alone, the ambulance refuses the profile and quarantines it.
    amb.start();
    let r = read(&amb);
    assert!(r.status >= 400, "a damaged profile was served: {}", r.body);
    assert!(!right(&r.body), "{}", r.body);
    let s = status(&amb);
    assert_eq!(s["quarantined"].as_u64(), Some(1), "{s}");
    assert_eq!(medical_docs(&s), None, "{s}");
    let r = read(&amb);
    assert!(
        r.status >= 400 && r.body.contains("quarantined"),
        "{} {}",
        r.status,
        r.body
    );

    // Headquarters comes back: the ambulance asks for the profile and
    // rebuilds it from headquarters' copy, by itself.
    hq.start();
    poll(
        Duration::from_secs(180),
        "the profile rebuilt at the ambulance",
        || {
            let s = status(&amb);
            (s["quarantined"].as_u64() == Some(0) && medical_docs(&s) == Some(1)).then_some(())
        },
    );
    let r = read(&amb);
    assert!(r.status == 200 && right(&r.body), "{} {}", r.status, r.body);
    let log = std::fs::read_to_string(amb.log()).unwrap();
    assert!(
        log.contains("damaged document rebuilt from a peer's copy"),
        "no repair logged"
    );
    assert!(!log.contains("ペニシリン"), "a medical value in the log");
    hq.stop();
    amb.stop();
    {
        let s = SqliteStore::open(&db).unwrap();
        assert!(s.damaged().unwrap().is_empty());
        assert!(s.quarantined().unwrap().is_empty());
        assert_eq!(s.integrity_check().unwrap(), "ok");
    }
    // After a restart the rebuilt profile loads from the file alone.
    amb.start();
    let r = read(&amb);
    assert!(r.status == 200 && right(&r.body), "{} {}", r.status, r.body);
    assert_eq!(status(&amb)["quarantined"].as_u64(), Some(0));
    amb.stop();
}
