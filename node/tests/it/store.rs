//! Real-file tests of `node::store`: the shared `Store` conformance suite on
//! SQLite, durability across reopen, refusal of foreign, newer and corrupt
//! files, disk full on a small tmpfs, an interrupted migration
//! the data-dir lock, and a model-based property test that runs
//! random batches against `MemStore` and `SqliteStore` side by side and
//! compares every query.

use crdt::hlc::Hlc;
use crdt::store::{
    conformance, Batch, ChangeRecord, DocState, LocationRow, LocationStatus, MemStore, Meta,
    PersonRow, Projection, ShelterRow, Store, StoreError,
};
use crdt::{DocKey, Kind, NodeId, Role};
use node::store::schema::{APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION};
use node::store::{DataDirLock, LockError, SqliteStore, DB_FILE_NAME};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

fn key(kind: Kind, id: &str) -> DocKey {
    DocKey::new(kind, id).unwrap()
}

fn meta(inc: u32) -> Meta {
    Meta {
        node_id: NodeId::new("shelter-1").unwrap(),
        role: Role::Shelter,
        incarnation: inc,
        hlc: Hlc {
            wall_ms: 1_700_000_000_000,
            counter: inc,
        },
        audit_seq: 3,
        audit_head: "abc".into(),
        unsigned_checked: 2,
    }
}

fn person(id: &str, hh: &str, name: &str, kana: &str) -> PersonRow {
    PersonRow {
        person_id: id.into(),
        household_id: Some(hh.into()),
        name: name.into(),
        kana: kana.into(),
        search_key: crdt::text::search_key(kana),
        birth_date: Some("1950-01-01".into()),
        district: Some("旭町".into()),
    }
}

/// A batch touching every table, with `n` changes of `change_len` bytes.
fn full_batch(n: u8, change_len: usize) -> Batch {
    let pres = key(Kind::Presence, "h1");
    let reg = key(Kind::Registry, "h1");
    Batch {
        meta: Some(meta(1)),
        changes: (0..n)
            .map(|i| ChangeRecord {
                key: if i % 2 == 0 {
                    pres.clone()
                } else {
                    reg.clone()
                },
                hash: [i; 32],
                bytes: vec![i; change_len],
                seal: (i % 2 == 0).then_some(crdt::signing::Seal {
                    author: [i; 8],
                    sig: [i; 64],
                }),
            })
            .collect(),
        docs: vec![
            DocState {
                key: pres.clone(),
                heads: vec![[1; 32], [2; 32]],
                snapshot: Some(vec![9; 100]),
            },
            DocState {
                key: reg.clone(),
                heads: vec![[3; 32]],
                snapshot: None,
            },
        ],
        projections: vec![
            (
                reg.clone(),
                Projection {
                    persons: vec![
                        person("p1", "h1", "山田 太郎", "ヤマダ タロウ"),
                        person("p2", "h1", "山田 花子", "やまだ はなこ"),
                    ],
                    cards: vec![("1234567890123".into(), "h1".into(), "p1".into())],
                    ..Default::default()
                }
                .into(),
            ),
            (
                pres.clone(),
                Projection {
                    locations: vec![LocationRow {
                        person_id: "p1".into(),
                        shelter_id: "s1".into(),
                        status: LocationStatus::In,
                        since_ms: 42,
                        conflict: true,
                    }],
                    ..Default::default()
                }
                .into(),
            ),
        ],
        ops: vec![("op-1".into(), "{\"ok\":true}".into())],
        peer_heads: vec![(NodeId::new("hq-1").unwrap(), 1, pres.clone(), vec![[1; 32]])],
        quarantine: vec![(key(Kind::Medical, "p9"), "checksum mismatch".into())],
        cursors: vec![(
            NodeId::new("hq-1").unwrap(),
            crdt::store::Cursor {
                seq: 3,
                hash: [3; 32],
            },
        )],
        credentials: vec![([7; 8], vec![1, 2, 3])],
        seals: vec![],
        damaged: vec![crdt::store::Damaged {
            key: key(Kind::Medical, "p9"),
            heads: vec![[5; 32]],
            at_risk: vec![[6; 32]],
        }],
        drop_changes: vec![],
        repaired: vec![],
    }
}

/// Every query of the trait over a fixed universe of keys, as one
/// comparable string; two stores with the same answers give the same dump.
fn dump(s: &dyn Store) -> String {
    let mut out = String::new();
    let mut line = |l: String| {
        out.push_str(&l);
        out.push('\n');
    };
    line(format!("meta {:?}", s.load_meta()));
    line(format!("index {:?}", s.doc_index()));
    line(format!("damaged {:?}", s.damaged()));
    for k in universe_keys() {
        line(format!("doc {k:?} {:?}", s.load_doc(&k)));
        line(format!("changes {k:?} {:?}", s.doc_changes(&k)));
        line(format!("records {k:?} {:?}", s.doc_records(&k)));
        for p in PEERS {
            for inc in 0..3 {
                line(format!(
                    "peer {p} {inc} {k:?} {:?}",
                    s.peer_heads(&NodeId::new(*p).unwrap(), inc, &k)
                ));
            }
        }
    }
    for op in OPS.iter().chain(["op-1", "nope"].iter()) {
        line(format!("op {op} {:?}", s.op_result(op)));
    }
    line(format!("quarantined {:?}", s.quarantined()));
    // Sequence numbers only have to increase (SQLite may leave gaps).
    let log = s
        .log_since(0, 10_000)
        .map(|l| l.into_iter().map(|(_, c)| c).collect::<Vec<_>>());
    line(format!(
        "log {:?} end {:?}",
        log,
        s.log_end().map(|e| e.map(|c| c.hash))
    ));
    for p in PEERS {
        line(format!(
            "cursor {p} {:?}",
            s.sync_cursor(&NodeId::new(*p).unwrap())
        ));
    }
    for p in PERSON_IDS.iter().chain(["nope"].iter()) {
        line(format!("person {p} {:?}", s.person(p)));
        line(format!("location {p} {:?}", s.location(p)));
    }
    for (limit, offset) in [
        (0, 0),
        (1, 0),
        (2, 1),
        (3, 2),
        (100, 0),
        (usize::MAX, 0),
        (usize::MAX, usize::MAX),
        (1, usize::MAX),
    ] {
        line(format!(
            "persons {limit} {offset} {:?}",
            s.persons(limit, offset)
        ));
    }
    let mut keys: Vec<String> = ["", "%", "_", "\\", "\0", "%a", "a_", "ア", "ヤマダ", "zz"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    keys.extend(ALPHABET.iter().map(|c| crdt::text::search_key(c)));
    for k in keys {
        for limit in [0, 2, usize::MAX] {
            line(format!("search {k:?} {limit} {:?}", s.search(&k, limit)));
        }
    }
    for c in CARDS.iter().chain(["1234567890123"].iter()) {
        line(format!("card {c} {:?}", s.household_by_card(c)));
    }
    for h in HOUSEHOLDS.iter().chain(["nope"].iter()) {
        line(format!("members {h} {:?}", s.household_members(h)));
    }
    line(format!("shelters {:?}", s.shelters()));
    line(format!("occupancy {:?}", s.occupancy()));
    line(format!("conflicts {:?}", s.conflicts()));
    for sh in [None, Some("s1"), Some("s9")] {
        line(format!("evacuees {sh:?} {:?}", s.evacuees(sh)));
    }
    line(format!("withheld {:?}", s.withheld()));
    line(format!("districts {:?}", s.district_counts()));
    for d in ["d0", "d1", "d2", "旭町", "nope"] {
        for (after, limit) in [("", 0), ("", 3), ("", usize::MAX), ("p", 2)] {
            line(format!(
                "unaccounted {d} {after} {limit} {:?}",
                s.unaccounted(d, after, limit)
            ));
        }
    }
    for sh in ["s1", "s2", "nope"] {
        line(format!("roster {sh} {:?}", s.roster(sh)));
    }
    for b in [1, 1000, 3_600_000] {
        line(format!("arrivals {b} {:?}", s.arrivals(b)));
    }
    out
}

struct Dir {
    dir: tempfile::TempDir,
}
impl Dir {
    fn new() -> Dir {
        Dir {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn db(&self) -> PathBuf {
        self.dir.path().join(DB_FILE_NAME)
    }
}

/// Bytes of every file in a directory, by name.
fn dir_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn conformance_suite_on_real_files() {
    let d = Dir::new();
    let n = AtomicU32::new(0);
    conformance::run_all(|| {
        let path = d
            .dir
            .path()
            .join(format!("c{}.db", n.fetch_add(1, Ordering::SeqCst)));
        Box::new(SqliteStore::open(&path).unwrap())
    });
    assert_eq!(n.load(Ordering::SeqCst), 13);
}

/// Migration 5 and offline writes (signed changes): changes stored unsigned
/// (a version 4 database, or a command run while the node was stopped) are
/// signed by the node at its next start with its key when it authored them;
/// another author's unsigned change stays unsigned (never relayed).
#[test]
fn unsigned_own_changes_are_signed_at_the_next_start() {
    use crdt::api::{Command, Input, Now, Operator};
    use crdt::engine::{Engine, EngineConfig};
    let d = Dir::new();
    let now = Now {
        wall_ms: 1_790_000_000_000,
        mono_ms: 0,
        wall_trusted: true,
    };
    let mut rng =
        <rand_chacha::ChaCha8Rng as rand_chacha::rand_core::SeedableRng>::seed_from_u64(1);
    let hq = NodeId::new("hq-1").unwrap();
    // Offline: no key, the import is stored unsigned.
    let mut e = Engine::open(
        SqliteStore::open(&d.db()).unwrap(),
        EngineConfig::new(hq.clone(), Role::Hq, crdt::signing::Trust::offline()),
        now,
    )
    .unwrap();
    e.handle(
        Input::Command {
            op_id: "imp".into(),
            operator: Operator("op".into()),
            cmd: Command::ImportHouseholds {
                households: vec![crdt::testkit::household(1, 2)],
            },
        },
        now,
        &mut rng,
    );
    let mut store = e.into_store();
    let unsigned = store.unsigned(0, 100).unwrap();
    assert!(!unsigned.is_empty(), "offline changes are stored unsigned");
    // Another node's change, stored unsigned (as before version 5).
    let foreign = {
        let key = DocKey::new(Kind::Person, "p-x").unwrap();
        let mut doc = crdt::doc::Doc::new(key.clone());
        let actor = crdt::actor::Actor::new(Role::Shelter, &NodeId::new("shelter-1").unwrap(), 1);
        let c = doc
            .write(actor, 0, "", &[("f".into(), Some("\"v\"".into()))])
            .unwrap()
            .unwrap();
        ChangeRecord {
            key,
            hash: c.hash().0,
            bytes: c.raw_bytes().to_vec(),
            seal: None,
        }
    };
    store
        .commit(&Batch {
            changes: vec![foreign.clone()],
            ..Default::default()
        })
        .unwrap();
    drop(store);
    // The node starts with its key.
    let e = Engine::open(
        SqliteStore::open(&d.db()).unwrap(),
        EngineConfig::for_tests(hq.clone(), Role::Hq),
        now,
    )
    .unwrap();
    let store = e.into_store();
    let still: Vec<_> = store
        .unsigned(0, 100)
        .unwrap()
        .into_iter()
        .map(|(_, c)| c.hash)
        .collect();
    assert_eq!(
        still,
        vec![foreign.hash],
        "only the foreign change stays unsigned"
    );
    let key = crdt::signing::public_key(&crdt::testkit::testca::seed(&hq));
    let seals = store
        .seals(&unsigned.iter().map(|(_, c)| c.hash).collect::<Vec<_>>())
        .unwrap();
    for ((_, c), seal) in unsigned.iter().zip(seals) {
        let seal = seal.expect("signed at start");
        assert_eq!(seal.author, crdt::actor::node_hash("hq-1"));
        assert!(crdt::signing::verify(&key, &c.hash, &seal.sig));
    }
    // The search is not repeated over what it has seen: the foreign
    // change lies at or below the mark.
    let foreign_seq = store.unsigned(0, 100).unwrap()[0].0;
    let checked = store.load_meta().unwrap().unwrap().unsigned_checked;
    assert!(
        checked >= foreign_seq,
        "searched up to {checked}, foreign change at {foreign_seq}"
    );
    drop(store);
    // A later offline command writes past the mark, and the next start
    // still signs it.
    let mut e = Engine::open(
        SqliteStore::open(&d.db()).unwrap(),
        EngineConfig::new(hq.clone(), Role::Hq, crdt::signing::Trust::offline()),
        now,
    )
    .unwrap();
    e.handle(
        Input::Command {
            op_id: "imp-2".into(),
            operator: Operator("op".into()),
            cmd: Command::ImportHouseholds {
                households: vec![crdt::testkit::household(2, 2)],
            },
        },
        now,
        &mut rng,
    );
    let later: Vec<_> = e.into_store().unsigned(0, 100).unwrap();
    assert!(later.len() > 1, "the second offline import is unsigned");
    let e = Engine::open(
        SqliteStore::open(&d.db()).unwrap(),
        EngineConfig::for_tests(hq.clone(), Role::Hq),
        now,
    )
    .unwrap();
    let still: Vec<_> = e
        .into_store()
        .unsigned(0, 100)
        .unwrap()
        .into_iter()
        .map(|(_, c)| c.hash)
        .collect();
    assert_eq!(
        still,
        vec![foreign.hash],
        "the later offline changes are signed too"
    );
}

/// Migration 3 derives the do-not-disclose rows of contacts documents
/// stored before it (a version 2 database has no `withheld` table).
#[test]
fn migration_3_derives_withheld_from_stored_contacts() {
    use crdt::api::{Command, Input, Now, Operator, Output};
    use crdt::engine::{Engine, EngineConfig};
    use crdt::model::{Disclosure, Household, Member};
    let d = Dir::new();
    let now = Now {
        wall_ms: 1_790_000_000_000,
        mono_ms: 0,
        wall_trusted: true,
    };
    let mut rng =
        <rand_chacha::ChaCha8Rng as rand_chacha::rand_core::SeedableRng>::seed_from_u64(1);
    let mut e = Engine::open(
        SqliteStore::open(&d.db()).unwrap(),
        EngineConfig::for_tests(NodeId::new("hq-1").unwrap(), Role::Hq),
        now,
    )
    .unwrap();
    let member = |p: &str| Member {
        person_id: p.into(),
        name: "山田".into(),
        kana: "ヤマダ".into(),
        birth_date: "1950-01-01".into(),
        card_user_id: None,
    };
    for (op, cmd) in [
        (
            "h",
            Command::ImportHouseholds {
                households: vec![Household {
                    household_id: "h1".into(),
                    address: "三条市".into(),
                    members: vec![member("p1"), member("p2")],
                }],
            },
        ),
        (
            "c",
            Command::PutContacts {
                person_id: "p2".into(),
                contacts: vec![],
                disclosure: Disclosure {
                    do_not_disclose: true,
                    share_shelter: false,
                },
            },
        ),
    ] {
        let out = e.handle(
            Input::Command {
                op_id: op.into(),
                operator: Operator("t".into()),
                cmd,
            },
            now,
            &mut rng,
        );
        assert!(matches!(
            out.last(),
            Some(Output::Reply { result: Ok(_), .. })
        ));
    }
    assert_eq!(e.store().withheld().unwrap().len(), 1);
    drop(e);
    let c = rusqlite::Connection::open(d.db()).unwrap();
    // Back to what version 2 had: no withheld table (3), no district (4),
    // no seals (5), no arrivals index (6), no damaged table (7).
    c.execute_batch(
        "DROP TABLE damaged; DROP TABLE withheld; DROP INDEX persons_district; \
         ALTER TABLE persons DROP COLUMN district; \
         DROP INDEX changes_unsigned; DROP TABLE authors; \
         ALTER TABLE changes DROP COLUMN seal; DROP INDEX locations_in_since; \
         PRAGMA user_version = 2;",
    )
    .unwrap();
    drop(c);
    let s = SqliteStore::open(&d.db()).unwrap();
    assert_eq!(
        s.withheld().unwrap().into_iter().collect::<Vec<_>>(),
        ["p2"]
    );
}

/// Migration 8: the credentials of a version 7 store (one per author)
/// move over as they were, and from then on an author keeps several (a
/// rotated certificate beside the old one), in arrival order.
#[test]
fn migration_8_keeps_the_credentials_and_then_several_per_author() {
    let d = Dir::new();
    drop(SqliteStore::open(&d.db()).unwrap());
    let c = rusqlite::Connection::open(d.db()).unwrap();
    // Back to what version 7 had: one credential per author.
    c.execute_batch(
        "DROP TABLE authors; \
         CREATE TABLE authors (author BLOB PRIMARY KEY CHECK (length(author) = 8), cred BLOB NOT NULL); \
         INSERT INTO authors VALUES (x'0202020202020202', x'02'), (x'0101010101010101', x'0101'); \
         PRAGMA user_version = 7;",
    )
    .unwrap();
    drop(c);
    let mut s = SqliteStore::open(&d.db()).unwrap();
    assert_eq!(
        s.credentials().unwrap(),
        vec![([1; 8], vec![1, 1]), ([2; 8], vec![2])]
    );
    s.commit(&Batch {
        credentials: vec![([1; 8], vec![1, 2]), ([1; 8], vec![1, 1])],
        ..Default::default()
    })
    .unwrap();
    drop(s);
    let s = SqliteStore::open(&d.db()).unwrap();
    assert_eq!(
        s.credentials().unwrap(),
        vec![
            ([1; 8], vec![1, 1]),
            ([1; 8], vec![1, 2]),
            ([2; 8], vec![2])
        ]
    );
}

/// Issue 12: a peer that declares a new incarnation at every session (its
/// hello says which; nothing certifies it) leaves at most one hint row per
/// document, in SQLite as in memory: the hints of a new incarnation
/// replace the peer's older ones instead of adding to them.
#[test]
fn peer_hints_stay_one_per_document_whatever_incarnations_a_peer_declares() {
    let d = Dir::new();
    let mut s = SqliteStore::open(&d.db()).unwrap();
    let mut m = MemStore::new();
    let peer = NodeId::new("hq-1").unwrap();
    // 200 incarnations, each knowing 5 of 20 documents (not the same 5).
    for inc in 0..200u32 {
        let peer_heads = (0..5)
            .map(|j| {
                let k = key(Kind::Presence, &format!("h{}", (inc * 3 + j) % 20));
                (peer.clone(), inc, k, vec![[inc as u8; 32]])
            })
            .collect();
        let b = Batch {
            peer_heads,
            ..Default::default()
        };
        s.commit(&b).unwrap();
        m.commit(&b).unwrap();
    }
    let c = rusqlite::Connection::open(d.db()).unwrap();
    let rows: i64 = c
        .query_row("SELECT COUNT(*) FROM peer_heads", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 5, "SQLite rows");
    assert_eq!(m.peer_heads.len(), 5, "in-memory rows");
    assert_eq!(dump(&s), dump(&m));
}

/// Version 9 drops the old hints (keyed by `node.iN`) and keys them by the
/// peer's node id and incarnation.
#[test]
fn migration_9_drops_the_hints_keyed_by_incarnation() {
    let d = Dir::new();
    drop(SqliteStore::open(&d.db()).unwrap());
    let c = rusqlite::Connection::open(d.db()).unwrap();
    c.execute_batch(
        "DROP TABLE peer_heads; \
         CREATE TABLE peer_heads (peer TEXT NOT NULL, kind INTEGER NOT NULL, doc_id TEXT NOT NULL, \
           heads BLOB NOT NULL CHECK (length(heads) % 32 = 0), PRIMARY KEY (peer, kind, doc_id)); \
         INSERT INTO peer_heads VALUES ('hq-1.i1', 2, 'h1', zeroblob(32)), ('hq-1.i2', 2, 'h1', zeroblob(32)); \
         PRAGMA user_version = 8;",
    )
    .unwrap();
    drop(c);
    let mut s = SqliteStore::open(&d.db()).unwrap();
    let peer = NodeId::new("hq-1").unwrap();
    let k = key(Kind::Presence, "h1");
    s.commit(&Batch {
        peer_heads: vec![(peer.clone(), 3, k.clone(), vec![[3; 32]])],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.peer_heads(&peer, 3, &k).unwrap(), Some(vec![[3; 32]]));
    let c = rusqlite::Connection::open(d.db()).unwrap();
    let rows: i64 = c
        .query_row("SELECT COUNT(*) FROM peer_heads", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 1);
}

#[test]
fn fresh_store_carries_application_id_version_and_wal() {
    let d = Dir::new();
    let s = SqliteStore::open(&d.db()).unwrap();
    assert_eq!(s.db_path(), d.db());
    assert_eq!(s.integrity_check().unwrap(), "ok");
    drop(s);
    let c = rusqlite::Connection::open(d.db()).unwrap();
    let app: i32 = c
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .unwrap();
    let ver: u32 = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    let mode: String = c
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(app, APPLICATION_ID);
    assert_eq!(app.to_be_bytes(), *b"KZNA");
    assert_eq!(ver, SCHEMA_VERSION);
    assert_eq!(mode, "wal");
}

#[test]
fn commit_survives_drop_and_reopen() {
    let d = Dir::new();
    let mut s = SqliteStore::open(&d.db()).unwrap();
    let mut m = MemStore::new();
    let b = full_batch(20, 300);
    s.commit(&b).unwrap();
    m.commit(&b).unwrap();
    let digest = s.content_digest().unwrap();
    let before = dump(&s);
    assert_eq!(before, dump(&m));
    drop(s);
    // Reopening twice: migrations must not run again or change anything.
    for _ in 0..2 {
        let s = SqliteStore::open(&d.db()).unwrap();
        assert_eq!(s.content_digest().unwrap(), digest);
        assert_eq!(dump(&s), before);
        assert_eq!(s.integrity_check().unwrap(), "ok");
    }
    let ro = SqliteStore::open_readonly(&d.db()).unwrap();
    assert_eq!(dump(&ro), before);
}

#[test]
fn read_only_store_refuses_commits_and_changes_nothing() {
    let d = Dir::new();
    let mut s = SqliteStore::open(&d.db()).unwrap();
    s.commit(&full_batch(4, 10)).unwrap();
    let digest = s.content_digest().unwrap();
    drop(s);
    let mut ro = SqliteStore::open_readonly(&d.db()).unwrap();
    let err = ro.commit(&full_batch(8, 10)).unwrap_err();
    assert!(matches!(err, StoreError::Io(_)), "{err:?}");
    assert_eq!(ro.content_digest().unwrap(), digest);
    drop(ro);
    assert_eq!(
        SqliteStore::open(&d.db())
            .unwrap()
            .content_digest()
            .unwrap(),
        digest
    );
}

#[test]
fn foreign_files_are_refused_untouched() {
    let d = Dir::new();
    // Another program's SQLite file with its own application_id.
    let other = d.dir.path().join("other.db");
    {
        let c = rusqlite::Connection::open(&other).unwrap();
        c.execute_batch("PRAGMA application_id = 1234; CREATE TABLE t (x);")
            .unwrap();
    }
    // A SQLite file with tables and no application_id at all.
    let plain = d.dir.path().join("plain.db");
    {
        let c = rusqlite::Connection::open(&plain).unwrap();
        c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
    }
    for path in [&other, &plain] {
        let bytes = std::fs::read(path).unwrap();
        let err = SqliteStore::open(path).unwrap_err();
        assert!(matches!(err, StoreError::Foreign(_)), "{path:?}: {err:?}");
        assert!(std::fs::read(path).unwrap() == bytes, "{path:?} changed");
    }
    let msg = SqliteStore::open(&other).unwrap_err().to_string();
    assert!(msg.contains("0x000004d2"), "{msg}");

    // Not an SQLite file at all: a clean error, file untouched.
    let text = d.dir.path().join("notes.txt");
    std::fs::write(
        &text,
        "this is not a database, it is a shopping list\n".repeat(100),
    )
    .unwrap();
    let bytes = std::fs::read(&text).unwrap();
    let err = SqliteStore::open(&text).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    assert!(std::fs::read(&text).unwrap() == bytes, "file changed");
}

#[test]
fn newer_schema_is_refused_without_writing() {
    let d = Dir::new();
    let mut s = SqliteStore::open(&d.db()).unwrap();
    s.commit(&full_batch(4, 10)).unwrap();
    drop(s);
    {
        let c = rusqlite::Connection::open(d.db()).unwrap();
        c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
    }
    let before = dir_bytes(d.dir.path());
    assert!(before.contains_key(DB_FILE_NAME));
    let err = SqliteStore::open(&d.db()).unwrap_err();
    assert_eq!(
        err,
        StoreError::TooNew {
            found: SCHEMA_VERSION + 1,
            known: SCHEMA_VERSION
        }
    );
    assert!(err.to_string().contains("newer than this program"));
    assert!(dir_bytes(d.dir.path()) == before, "files changed");
    // A read-only connection cannot remove the WAL index it had to create
    // for reading, but it writes no database content.
    let err = SqliteStore::open_readonly(&d.db()).unwrap_err();
    assert!(matches!(err, StoreError::TooNew { .. }));
    let after = dir_bytes(d.dir.path());
    assert!(
        after[DB_FILE_NAME] == before[DB_FILE_NAME],
        "database changed"
    );
    assert!(
        after.get("kizuna.db-wal").is_none_or(|w| w.is_empty()),
        "WAL frames written"
    );
}

/// the process dies while the first migration's transaction is open
/// (uncommitted pages already spilled into the WAL). The files as they
/// were at that moment must open as a clean, fully migrated store.
#[test]
fn interrupted_migration_is_rerun() {
    let d = Dir::new();
    let crashed = Dir::new();
    {
        let c = rusqlite::Connection::open(d.db()).unwrap();
        c.execute_batch("PRAGMA journal_mode = WAL; PRAGMA cache_size = 1;")
            .unwrap();
        c.execute_batch("BEGIN IMMEDIATE").unwrap();
        c.execute_batch(MIGRATIONS[0]).unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
        for i in 0..200 {
            c.execute(
                "INSERT INTO ops (op_id, result) VALUES (?1, ?2)",
                rusqlite::params![format!("op-{i}"), "x".repeat(500)],
            )
            .unwrap();
        }
        // "Crash": copy the files while the transaction is still open.
        for (name, bytes) in dir_bytes(d.dir.path()) {
            std::fs::write(crashed.dir.path().join(name), bytes).unwrap();
        }
        assert!(
            std::fs::metadata(crashed.dir.path().join("kizuna.db-wal"))
                .unwrap()
                .len()
                > 0,
            "the test wants uncommitted frames in the WAL"
        );
        c.execute_batch("ROLLBACK").unwrap();
    }
    let s = SqliteStore::open(&crashed.db()).unwrap();
    assert_eq!(s.integrity_check().unwrap(), "ok");
    assert_eq!(s.op_result("op-1").unwrap(), None);
    assert_eq!(dump(&s), dump(&MemStore::new()));
}

fn flip(path: &Path, offsets: &[usize]) {
    let mut b = std::fs::read(path).unwrap();
    for &o in offsets {
        if o < b.len() {
            b[o] ^= 0xFF;
        }
    }
    std::fs::write(path, b).unwrap();
}

/// Opens a damaged file and, if that works, runs every query. Any outcome
/// is fine except a panic; returns whether damage was reported.
fn probe_damaged(path: &Path) -> bool {
    match SqliteStore::open(path) {
        Err(e) => {
            assert!(
                matches!(
                    e,
                    StoreError::Corrupt(_) | StoreError::Foreign(_) | StoreError::Io(_)
                ),
                "{e:?}"
            );
            true
        }
        Ok(mut s) => {
            let _ = dump(&s);
            let _ = s.content_digest();
            let _ = s.commit(&full_batch(3, 10));
            let _ = dump(&s);
            !matches!(s.integrity_check().as_deref(), Ok("ok"))
        }
    }
}

/// flipped bytes anywhere in the file give `Corrupt` or another clean
/// error (or, where SQLite cannot see the damage, a working store), never
/// a panic.
#[test]
fn corrupted_files_fail_cleanly() {
    let d = Dir::new();
    let mut s = SqliteStore::open(&d.db()).unwrap();
    let mut b = full_batch(60, 700);
    std::sync::Arc::make_mut(&mut b.projections[0].1).persons = (0..300)
        .map(|i| person(&format!("p{i:04}"), "h1", "山田 太郎", "ヤマダ タロウ"))
        .collect();
    s.commit(&b).unwrap();
    drop(s); // checkpoints: everything is now in the main file
    let good = std::fs::read(d.db()).unwrap();
    let page = 4096;
    let pages = good.len() / page;
    assert!(pages >= 10, "{pages} pages");
    let copy = d.dir.path().join("copy.db");
    let reset = || {
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", copy.display()));
        }
        std::fs::write(&copy, &good).unwrap();
    };

    // One damaged spot at a time: page headers, cell pointers, payload.
    let mut detected = 0;
    let mut cases = 0;
    for p in 0..pages {
        let base = p * page + if p == 0 { 100 } else { 0 };
        for off in [0, 3, 5, 8, 200, page / 2, page - 10] {
            if p == 0 && off > page - 200 {
                continue;
            }
            reset();
            flip(&copy, &[base + off]);
            cases += 1;
            if probe_damaged(&copy) {
                detected += 1;
            }
        }
    }
    eprintln!("single flips: {detected} of {cases} detected");
    // Every b-tree page's type byte is damage SQLite must see.
    assert!(detected >= pages - 1, "{detected} of {cases}");

    // Damage on every page at once must be refused at open.
    reset();
    let offsets: Vec<usize> = (1..pages).map(|p| p * page).collect();
    flip(&copy, &offsets);
    let err = SqliteStore::open(&copy).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");

    // A damaged header (magic string) is reported, not followed.
    reset();
    flip(&copy, &[0, 1, 2]);
    let err = SqliteStore::open(&copy).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");

    // Truncated in the middle of a page.
    reset();
    std::fs::write(&copy, &good[..good.len() / 2 + 17]).unwrap();
    let _ = probe_damaged(&copy);

    // The original is untouched by all of this.
    assert!(std::fs::read(d.db()).unwrap() == good, "original changed");
    assert_eq!(
        SqliteStore::open(&d.db())
            .unwrap()
            .integrity_check()
            .unwrap(),
        "ok"
    );
}

/// Unmounts on drop, also when the test fails.
struct Tmpfs(PathBuf);
impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the file system holding `path` until writes fail with ENOSPC.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 4096];
    loop {
        match f.write_all(&chunk).and_then(|_| f.sync_all()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
}

/// on a full file system a commit returns `Full`, nothing of it is
/// visible, reads keep working, and commits succeed again once space is
/// freed, with no damage to the file.
#[test]
fn disk_full_rejects_the_commit_and_recovers() {
    let d = Dir::new();
    let mnt = d.dir.path().join("mnt");
    // A test that cannot set up fails: `make test` runs as root (setup.sh
    // needs it anyway), and the VFS-simulated ENOSPC in `faults.rs` is
    // no substitute for a real full file system.
    let _tmpfs = Tmpfs::mount(&mnt, "1m")
        .unwrap_or_else(|reason| panic!("cannot set up a full file system: {reason}"));
    let db = mnt.join(DB_FILE_NAME);
    let mut s = SqliteStore::open(&db).unwrap();
    let mut m = MemStore::new();
    let base = full_batch(4, 100);
    s.commit(&base).unwrap();
    m.commit(&base).unwrap();
    let digest = s.content_digest().unwrap();

    let filler = mnt.join("filler");
    fill(&filler);
    let big = Batch {
        changes: (0..64)
            .map(|i| ChangeRecord {
                key: key(Kind::Registry, "big"),
                hash: [100 + i; 32],
                bytes: vec![i; 4000],
                seal: None,
            })
            .collect(),
        ops: vec![("op-big".into(), "{}".into())],
        ..Default::default()
    };
    let err = s.commit(&big).unwrap_err();
    assert_eq!(err, StoreError::Full, "{err}");
    assert_eq!(err.to_string(), "storage full: the write was not saved");
    // Nothing of the failed batch is visible; reads still work.
    assert_eq!(s.content_digest().unwrap(), digest);
    assert_eq!(dump(&s), dump(&m));
    assert_eq!(s.op_result("op-big").unwrap(), None);
    // Still full: still refused, still unchanged.
    assert_eq!(s.commit(&big).unwrap_err(), StoreError::Full);
    assert_eq!(s.content_digest().unwrap(), digest);

    std::fs::remove_file(&filler).unwrap();
    s.commit(&big).unwrap();
    m.commit(&big).unwrap();
    assert_eq!(dump(&s), dump(&m));
    assert_eq!(s.integrity_check().unwrap(), "ok");
    drop(s);
    let s = SqliteStore::open(&db).unwrap();
    assert_eq!(dump(&s), dump(&m));
    assert_eq!(s.integrity_check().unwrap(), "ok");
}

#[test]
fn data_dir_lock_is_exclusive_and_released_on_drop() {
    let d = Dir::new();
    let dir = d.dir.path().join("data");
    let lock = DataDirLock::acquire(&dir).unwrap();
    assert_eq!(lock.dir(), dir);
    let err = DataDirLock::acquire(&dir).unwrap_err();
    assert!(matches!(err, LockError::Held { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    assert!(msg.contains("another kizuna is running"), "{msg}");
    assert!(
        msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
    drop(lock);
    let _again = DataDirLock::acquire(&dir).unwrap();
}

#[test]
fn data_dir_lock_reports_unusable_dirs() {
    let d = Dir::new();
    let file = d.dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = DataDirLock::acquire(&file).unwrap_err();
    assert!(matches!(err, LockError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("a-file"));
}

// ---- model-based property test: MemStore vs SqliteStore ----

const PERSON_IDS: &[&str] = &["p1", "p2", "p3", "p4"];
const HOUSEHOLDS: &[&str] = &["h1", "h2"];
const CARDS: &[&str] = &["c1", "c2"];
const SHELTERS: &[&str] = &["s1", "s2", "s3"];
const OPS: &[&str] = &["o1", "o2", "o3"];
const PEERS: &[&str] = &["n1", "n2"];
const KINDS: &[Kind] = &[Kind::Presence, Kind::Shelter, Kind::Medical, Kind::Registry];
const DOC_IDS: &[&str] = &["a", "b", "b.c"];
/// Pieces of names and keys: folding pairs (ｱ/ア/あ, A/a), SQL wildcards,
/// an escape character, white space and NUL.
const ALPHABET: &[&str] = &["a", "A", "ｱ", "ア", "あ", "山", "%", "_", "\\", " ", "\0"];

fn universe_keys() -> Vec<DocKey> {
    KINDS
        .iter()
        .flat_map(|k| DOC_IDS.iter().map(move |id| key(*k, id)))
        .collect()
}

fn pick<T: Clone + std::fmt::Debug + 'static>(xs: &'static [T]) -> impl Strategy<Value = T> {
    proptest::sample::select(xs)
}

fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(pick(ALPHABET), 0..4).prop_map(|v| v.concat())
}

fn doc_key() -> impl Strategy<Value = DocKey> {
    (pick(KINDS), pick(DOC_IDS)).prop_map(|(k, id)| key(k, id))
}

fn hash() -> impl Strategy<Value = [u8; 32]> {
    (0u8..12).prop_map(|n| [n; 32])
}

fn heads() -> impl Strategy<Value = Vec<[u8; 32]>> {
    proptest::collection::vec(hash(), 0..3)
}

fn meta_strategy() -> impl Strategy<Value = Meta> {
    (
        any::<u32>(),
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
        text(),
    )
        .prop_map(|(inc, wall_ms, counter, audit_seq, audit_head)| Meta {
            node_id: NodeId::new("n1").unwrap(),
            role: Role::Hq,
            incarnation: inc,
            hlc: Hlc { wall_ms, counter },
            audit_seq,
            audit_head,
            unsigned_checked: u64::from(inc),
        })
}

fn person_strategy() -> impl Strategy<Value = PersonRow> {
    (
        pick(PERSON_IDS),
        proptest::option::of(pick(HOUSEHOLDS)),
        text(),
        text(),
        any::<bool>(),
        text(),
        proptest::option::of(text()),
    )
        .prop_map(|(pid, hh, name, kana, folded, raw_key, birth)| PersonRow {
            person_id: pid.into(),
            household_id: hh.map(Into::into),
            search_key: if folded {
                crdt::text::search_key(&kana)
            } else {
                raw_key
            },
            // A few districts, some persons without one.
            district: birth.as_ref().map(|b| format!("d{}", b.len() % 3)),
            name,
            kana,
            birth_date: birth,
        })
}

fn status() -> impl Strategy<Value = LocationStatus> {
    pick(&[
        LocationStatus::In,
        LocationStatus::Out,
        LocationStatus::Pending,
    ])
}

fn since_ms() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..4, Just(u64::MAX), Just(1 << 63), any::<u64>()]
}

fn projection() -> impl Strategy<Value = Projection> {
    (
        proptest::collection::vec(person_strategy(), 0..4),
        proptest::collection::vec(
            (pick(CARDS), pick(HOUSEHOLDS), pick(PERSON_IDS))
                .prop_map(|(c, h, p)| (c.to_string(), h.to_string(), p.to_string())),
            0..3,
        ),
        proptest::collection::vec(
            (
                pick(PERSON_IDS),
                pick(SHELTERS),
                status(),
                since_ms(),
                any::<bool>(),
            )
                .prop_map(|(p, s, status, since_ms, conflict)| LocationRow {
                    person_id: p.into(),
                    shelter_id: s.into(),
                    status,
                    since_ms,
                    conflict,
                }),
            0..4,
        ),
        proptest::collection::vec(
            (pick(SHELTERS), text(), prop_oneof![0u32..3, Just(u32::MAX)]).prop_map(
                |(s, name, capacity)| ShelterRow {
                    shelter_id: s.into(),
                    name,
                    capacity,
                },
            ),
            0..3,
        ),
        proptest::collection::vec(pick(PERSON_IDS).prop_map(String::from), 0..2),
    )
        .prop_map(
            |(persons, cards, locations, shelters, withheld)| Projection {
                persons,
                cards,
                locations,
                shelters,
                withheld,
            },
        )
}

fn batch() -> impl Strategy<Value = Batch> {
    (
        proptest::option::of(meta_strategy()),
        proptest::collection::vec(
            (
                doc_key(),
                hash(),
                proptest::collection::vec(any::<u8>(), 0..4),
                proptest::option::of(any::<[u8; 8]>()),
            )
                .prop_map(|(key, hash, bytes, author)| ChangeRecord {
                    key,
                    hash,
                    bytes,
                    seal: author.map(|author| crdt::signing::Seal {
                        author,
                        sig: [author[0]; 64],
                    }),
                }),
            0..5,
        ),
        proptest::collection::vec(
            (
                doc_key(),
                heads(),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..4)),
            )
                .prop_map(|(key, heads, snapshot)| DocState {
                    key,
                    heads,
                    snapshot,
                }),
            0..3,
        ),
        proptest::collection::vec((doc_key(), projection()), 0..3),
        proptest::collection::vec(
            (pick(OPS), text()).prop_map(|(o, r)| (o.to_string(), r)),
            0..3,
        ),
        proptest::collection::vec(
            (pick(PEERS), 0..3u32, doc_key(), heads())
                .prop_map(|(p, inc, k, h)| (NodeId::new(p).unwrap(), inc, k, h)),
            0..3,
        ),
        proptest::collection::vec((doc_key(), text()), 0..2),
        proptest::collection::vec(
            (pick(PEERS), any::<u64>(), any::<[u8; 32]>()).prop_map(|(p, seq, hash)| {
                (
                    NodeId::new(p).unwrap(),
                    crdt::store::Cursor {
                        seq: seq >> 1,
                        hash,
                    },
                )
            }),
            0..2,
        ),
    )
        .prop_map(
            |(meta, changes, docs, projections, ops, peer_heads, quarantine, cursors)| Batch {
                meta,
                changes,
                docs,
                projections: projections
                    .into_iter()
                    .map(|(k, p)| (k, std::sync::Arc::new(p)))
                    .collect(),
                ops,
                peer_heads,
                quarantine,
                cursors,
                ..Default::default()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn sqlite_store_answers_like_mem_store(batches in proptest::collection::vec(batch(), 1..6)) {
        let d = Dir::new();
        let mut s = SqliteStore::open(&d.db()).unwrap();
        let mut m = MemStore::new();
        for b in &batches {
            m.commit(b).unwrap();
            s.commit(b).unwrap();
            prop_assert_eq!(dump(&s), dump(&m));
        }
        let digest = s.content_digest().unwrap();
        drop(s);
        let s = SqliteStore::open(&d.db()).unwrap();
        prop_assert_eq!(s.content_digest().unwrap(), digest);
        prop_assert_eq!(dump(&s), dump(&m));
    }
}
