//! The driver's group commit: inputs waiting in the channel share one
//! durable commit, and every reply reaches the caller that asked.

use crdt::api::{Command, Operator, Query, QueryReply, Reply};
use crdt::engine::EngineConfig;
use crdt::model::{Household, Member, ShelterInfo};
use crdt::store::{LocationStatus, Store};
use crdt::{NodeId, Role};
use node::driver::{Driver, DriverHandle};
use node::store::{SqliteStore, DB_FILE_NAME};
use std::path::Path;

const PERSONS: usize = 96;

fn start(dir: &Path) -> DriverHandle {
    let store = SqliteStore::open(&dir.join(DB_FILE_NAME)).unwrap();
    let d = Driver::start(
        store,
        EngineConfig::for_tests(NodeId::new("hq-1").unwrap(), Role::Hq),
    )
    .unwrap();
    let households = (0..PERSONS / 3)
        .map(|h| Household {
            household_id: format!("h{h:03}"),
            address: "三条市".into(),
            members: (0..3)
                .map(|m| Member {
                    person_id: format!("p{:03}", h * 3 + m),
                    name: "山田 太郎".into(),
                    kana: "ヤマダ タロウ".into(),
                    birth_date: "1970-01-01".into(),
                    card_user_id: None,
                })
                .collect(),
        })
        .collect();
    d.command_blocking(
        "seed".into(),
        Operator("t".into()),
        Command::ImportHouseholds { households },
    )
    .unwrap();
    for s in ["s-01", "s-02"] {
        d.command_blocking(
            format!("shelter-{s}"),
            Operator("t".into()),
            Command::PutShelter {
                shelter: ShelterInfo {
                    shelter_id: s.into(),
                    name: "体育館".into(),
                    capacity: 1000,
                    location: String::new(),
                    needs: String::new(),
                    ..Default::default()
                },
            },
        )
        .unwrap();
    }
    d
}

fn shelter(i: usize) -> String {
    format!("s-0{}", 1 + i % 2)
}

fn checkin(d: &DriverHandle, i: usize) -> impl std::future::Future<Output = (usize, Reply)> {
    let d = d.clone();
    async move {
        let r = d
            .command(
                format!("op-{i}"),
                Operator("t".into()),
                Command::CheckIn {
                    person_ids: vec![format!("p{i:03}")],
                    shelter_id: Some(shelter(i)),
                },
            )
            .await
            .unwrap_or_else(|e| panic!("check-in {i}: {e}"));
        (i, r)
    }
}

fn wal_bytes(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("kizuna.db-wal"))
        .map(|m| m.len())
        .unwrap_or(0)
}

/// 96 check-ins, 8 queries and a duplicate op id, all sent before any is
/// answered: every caller gets its own answer (the right person's event,
/// the query's own reply type), everything is on disk, and the WAL grew by
/// far less than the same check-ins committed one by one (they shared
/// commits).
#[test]
fn concurrent_commands_share_commits_and_replies_route_to_callers() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // One by one: each awaited before the next is sent.
    let seq = tempfile::tempdir().unwrap();
    let d = start(seq.path());
    let before = wal_bytes(seq.path());
    rt.block_on(async {
        for i in 0..PERSONS {
            let (_, r) = checkin(&d, i).await;
            assert!(matches!(r, Reply::Presence { ref event_ids, .. } if event_ids.len() == 1));
        }
    });
    let seq_wal = wal_bytes(seq.path()) - before;
    d.shutdown().unwrap();

    // All at once: `join_all` sends every command in its first poll.
    let conc = tempfile::tempdir().unwrap();
    let d = start(conc.path());
    let before = wal_bytes(conc.path());
    let (checkins, queries, dup) = rt.block_on(async {
        let checkins = futures_util::future::join_all((0..PERSONS).map(|i| checkin(&d, i)));
        let queries = futures_util::future::join_all((0..8).map(|q| {
            let d = d.clone();
            async move {
                let query = if q % 2 == 0 {
                    Query::Status
                } else {
                    Query::Person {
                        person_id: format!("p{q:03}"),
                    }
                };
                (q, d.query(query).await.unwrap())
            }
        }));
        // The same op id as check-in 5, sent again while it is in flight.
        let dup = checkin(&d, 5);
        tokio::join!(checkins, queries, dup)
    });
    let conc_wal = wal_bytes(conc.path()) - before;

    let mut event_ids = std::collections::BTreeSet::new();
    for (i, r) in &checkins {
        match r {
            Reply::Presence {
                event_ids: e,
                already,
            } => {
                assert_eq!(e.len(), 1, "check-in {i}: {r:?}");
                assert!(already.is_empty());
                assert!(event_ids.insert(e[0].clone()), "event id twice: {r:?}");
            }
            other => panic!("check-in {i} got {other:?}"),
        }
    }
    assert_eq!(
        dup.1, checkins[5].1,
        "a retry in flight gets the same answer"
    );
    for (q, r) in &queries {
        match (q % 2, r) {
            (0, QueryReply::Status(s)) => assert_eq!(s.node_id.as_str(), "hq-1"),
            (1, QueryReply::Person(Some(p))) => {
                assert_eq!(p.person.person_id, format!("p{q:03}"))
            }
            _ => panic!("query {q} got someone else's reply: {r:?}"),
        }
    }
    let store = d.shutdown().unwrap().unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    for i in 0..PERSONS {
        let l = store.location(&format!("p{i:03}")).unwrap().unwrap();
        assert_eq!((l.status, l.shelter_id), (LocationStatus::In, shelter(i)));
    }
    eprintln!("WAL growth: one by one {seq_wal} bytes, concurrent {conc_wal} bytes");
    assert!(
        conc_wal * 3 < seq_wal,
        "concurrent check-ins did not share commits: WAL +{conc_wal} vs +{seq_wal} one by one"
    );
}
