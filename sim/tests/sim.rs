//! The simulator's own suite: determinism, a small sweep, every checker
//! firing on a hand-made bad state, regression seeds and (with
//! `--features mutants`) every planted mutant caught.
//!
//! The sweep runs in-process (debug build), sized to stay well under a
//! minute; CI runs the large sweeps through the release binary.

use crdt::api::{MailRequest, Reply};
use crdt::doc::parse_change;
use crdt::hlc::Hlc;
use crdt::model::{AuditEntry, PresenceAction, PresenceEvent};
use crdt::store::{LocationRow, LocationStatus, Projection};
use crdt::wire::{DocChanges, Frame};
use crdt::{DocKey, Kind, NodeId, Role};
use sim::check::{self, *};
use sim::scenario::Scenario;
use std::collections::{BTreeMap, BTreeSet};

fn scenario(name: &str) -> Scenario {
    let path = format!("{}/scenarios/{name}", env!("CARGO_MANIFEST_DIR"));
    Scenario::load(&path).expect("scenario loads")
}

fn strip(s: &sim::world::Summary) -> String {
    let mut v = serde_json::to_value(s).unwrap();
    v.as_object_mut().unwrap().remove("wall_ms");
    v.as_object_mut().unwrap().remove("peak_rss_bytes");
    v.to_string()
}

#[test]
fn same_seed_same_trace() {
    let sc = scenario("ci-small.toml");
    for seed in [3, 11, 42] {
        let a = sim::run_seed(&sc, seed, None);
        let b = sim::run_seed(&sc, seed, None);
        assert_eq!(a.trace_hash, b.trace_hash, "seed {seed}");
        assert_eq!(strip(&a), strip(&b), "seed {seed}");
    }
    let a = sim::run_seed(&sc, 3, None);
    let b = sim::run_seed(&sc, 4, None);
    assert_ne!(a.trace_hash, b.trace_hash);
}

/// Sharing materialised documents between engines (`crdt::share`) is
/// invisible: every output of every node, so the whole run, is the same.
#[test]
fn sharing_documents_changes_nothing() {
    // ci-medium 184: changes waiting for dependencies (see regressions).
    for (name, seeds) in [("ci-small.toml", [5, 23]), ("ci-medium.toml", [9, 184])] {
        let mut sc = scenario(name);
        for seed in seeds {
            sc.share_docs = Some(64);
            let shared = sim::run_seed(&sc, seed, None);
            sc.share_docs = None;
            let alone = sim::run_seed(&sc, seed, None);
            assert!(shared.invariant_violations.is_empty(), "{name} {seed}");
            assert_eq!(strip(&shared), strip(&alone), "{name} seed {seed}");
        }
    }
}

/// A provisioned scenario starts every node with the registry and the
/// shelters; without provisioning only HQ has them at the start.
#[test]
fn provisioned_nodes_start_with_the_registry() {
    let mut sc = scenario("ci-medium.toml");
    let docs = sc.registry.households + sc.nodes.shelters;
    let w = sim::world::World::new(sc.clone(), 1);
    let counts = w.doc_counts();
    assert!(
        counts.iter().all(|c| c.is_some_and(|n| n >= docs)),
        "{counts:?}"
    );
    sc.registry.provisioned = false;
    let w = sim::world::World::new(sc, 1);
    let counts = w.doc_counts();
    assert!(counts[1..].iter().all(|c| *c == Some(0)), "{counts:?}");
}

#[test]
fn small_sweep_has_no_violations() {
    let sc = scenario("ci-small.toml");
    let mut failing = vec![];
    for seed in 100..112 {
        let s = sim::run_seed(&sc, seed, None);
        assert!(s.finished);
        if !s.invariant_violations.is_empty() {
            failing.push((seed, s.invariant_violations));
        }
    }
    assert!(failing.is_empty(), "{failing:#?}");
}

/// The simulator's indexed store keeps the `Store` contract.
#[test]
fn simstore_conformance() {
    crdt::store::conformance::run_all(|| Box::new(sim::simstore::SimStore::default()));
}

/// Stores that share their query tables (every store of a simulated
/// world does) answer every query from their own documents, like a plain
/// `MemStore`: another store's documents, or names this store's rows no
/// longer mention, change no answer.
#[test]
fn stores_sharing_query_tables_answer_like_a_plain_store() {
    use crdt::store::{Batch, MemStore, PersonRow, ShelterRow, Store};
    use sim::simstore::{QueryNames, SimStore};
    use std::sync::Arc;
    let key = |id: &str| DocKey::new(Kind::Presence, id).unwrap();
    let person = |p: &str, h: &str| PersonRow {
        person_id: p.into(),
        household_id: Some(h.into()),
        name: String::new(),
        kana: String::new(),
        search_key: String::new(),
        birth_date: None,
        district: None,
    };
    let at = |p: &str, s: &str, conflict: bool| LocationRow {
        person_id: p.into(),
        shelter_id: s.into(),
        status: LocationStatus::In,
        since_ms: 1,
        conflict,
    };
    let rows = |persons: Vec<PersonRow>, locations: Vec<LocationRow>, card: Option<&str>| {
        let cards = card
            .map(|c| {
                let p = &persons[0];
                (
                    c.to_string(),
                    p.household_id.clone().unwrap(),
                    p.person_id.clone(),
                )
            })
            .into_iter()
            .collect();
        Arc::new(Projection {
            persons,
            cards,
            locations,
            shelters: vec![],
            withheld: vec![],
        })
    };
    let batch = |docs: Vec<(&str, Arc<Projection>)>| Batch {
        projections: docs.into_iter().map(|(k, p)| (key(k), p)).collect(),
        ..Default::default()
    };
    let names = QueryNames::default();
    let mut other = SimStore::with_names(&names);
    let mut ours = SimStore::with_names(&names);
    let mut plain = MemStore::new();
    // Another store holds documents ours lacks, and ours's documents at
    // other versions.
    let shelter = Arc::new(Projection {
        shelters: vec![ShelterRow {
            shelter_id: "s9".into(),
            name: String::new(),
            capacity: 3,
        }],
        ..Default::default()
    });
    other
        .commit(&batch(vec![
            (
                "h1",
                rows(
                    vec![person("p1", "h1")],
                    vec![at("p1", "s9", true)],
                    Some("c1"),
                ),
            ),
            (
                "h0",
                rows(
                    vec![person("p2", "h1")],
                    vec![at("p2", "s9", false)],
                    Some("c2"),
                ),
            ),
            ("s9", shelter),
        ]))
        .unwrap();
    for b in [
        batch(vec![
            (
                "h1",
                rows(
                    vec![person("p1", "h1")],
                    vec![at("p1", "s1", false)],
                    Some("c1"),
                ),
            ),
            (
                "h2",
                rows(vec![person("p3", "h2")], vec![at("p3", "s1", true)], None),
            ),
        ]),
        // h1 no longer mentions p1, card c1 or household h1; h3 does.
        batch(vec![
            (
                "h1",
                rows(
                    vec![person("p4", "h4")],
                    vec![at("p4", "s2", false)],
                    Some("c4"),
                ),
            ),
            (
                "h3",
                rows(vec![person("p1", "h3")], vec![at("p1", "s2", false)], None),
            ),
        ]),
    ] {
        ours.commit(&b).unwrap();
        plain.commit(&b).unwrap();
        for p in ["p1", "p2", "p3", "p4"] {
            assert_eq!(ours.person(p).unwrap(), plain.person(p).unwrap(), "{p}");
            assert_eq!(ours.location(p).unwrap(), plain.location(p).unwrap(), "{p}");
        }
        for c in ["c1", "c2", "c4"] {
            assert_eq!(
                ours.person_by_card(c).unwrap(),
                plain.person_by_card(c).unwrap()
            );
            assert_eq!(
                ours.household_by_card(c).unwrap(),
                plain.household_by_card(c).unwrap()
            );
        }
        for h in ["h1", "h2", "h3", "h4"] {
            assert_eq!(
                ours.household_members(h).unwrap(),
                plain.household_members(h).unwrap(),
                "{h}"
            );
        }
        assert_eq!(ours.shelters().unwrap(), plain.shelters().unwrap());
        assert_eq!(ours.occupancy().unwrap(), plain.occupancy().unwrap());
        assert_eq!(ours.conflicts().unwrap(), plain.conflicts().unwrap());
    }
    assert_eq!(ours.location("p1").unwrap().unwrap().shelter_id, "s2");
    assert!(ours.shelters().unwrap().is_empty());
}

#[derive(serde::Deserialize)]
struct Regressions {
    case: Vec<Case>,
}
#[derive(serde::Deserialize)]
struct Case {
    scenario: String,
    seed: u64,
    note: String,
}

#[test]
fn regression_seeds_pass() {
    let text = std::fs::read_to_string(format!("{}/regressions.toml", env!("CARGO_MANIFEST_DIR")))
        .unwrap();
    let r: Regressions = toml::from_str(&text).unwrap();
    for c in r.case {
        let s = sim::run_seed(&scenario(&c.scenario), c.seed, None);
        assert!(
            s.invariant_violations.is_empty(),
            "{} seed {} ({}): {:?}",
            c.scenario,
            c.seed,
            c.note,
            s.invariant_violations
        );
    }
}

fn ev(
    id: &str,
    person: &str,
    action: PresenceAction,
    shelter: &str,
    prev: &[&str],
) -> PresenceEvent {
    PresenceEvent {
        event_id: id.into(),
        op_id: id.into(),
        person_id: person.into(),
        action,
        shelter_id: shelter.into(),
        to_shelter: None,
        hlc: Hlc::default(),
        node: NodeId::new("shelter-1").unwrap(),
        wall_ms: 0,
        prev: prev.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn acked_write_lost_fires() {
    let acked: BTreeSet<String> = ["e-1".into(), "e-2".into()].into();
    let present: BTreeSet<String> = ["e-1".into()].into();
    let v = check::acked_writes("shelter-1", &acked, &present, 5);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].name, ACKED_WRITE_LOST);
    assert!(check::acked_writes("shelter-1", &acked, &acked, 5).is_empty());
}

#[test]
fn applied_twice_fires() {
    let mut a = ev("e-1", "p1", PresenceAction::CheckIn, "s1", &[]);
    let mut b = ev("e-2", "p1", PresenceAction::CheckIn, "s1", &[]);
    a.op_id = "op".into();
    b.op_id = "op".into();
    let v = check::applied_twice("presence/h1", &[a.clone(), b], 0);
    assert_eq!(v[0].name, APPLIED_TWICE);
    assert!(check::applied_twice("presence/h1", &[a], 0).is_empty());
    let r1 = Reply::Presence {
        event_ids: vec!["e-1".into()],
        already: vec![],
    };
    let r2 = Reply::Presence {
        event_ids: vec!["e-9".into()],
        already: vec![],
    };
    assert_eq!(
        check::replay_reply("op", &r1, &r2, 0).unwrap().name,
        APPLIED_TWICE
    );
    assert!(check::replay_reply("op", &r1, &r1, 0).is_none());
}

#[test]
fn conflict_dropped_fires() {
    let evs = vec![
        ev("e-1", "p1", PresenceAction::CheckIn, "s1", &[]),
        ev("e-2", "p1", PresenceAction::CheckIn, "s2", &[]),
    ];
    let mut row = LocationRow {
        person_id: "p1".into(),
        shelter_id: "s2".into(),
        status: LocationStatus::In,
        since_ms: 0,
        conflict: false,
    };
    let rows = BTreeMap::from([("p1".to_string(), row.clone())]);
    let v = check::conflicts("presence/h1", &evs, &rows, 0);
    assert_eq!(v[0].name, CONFLICT_DROPPED);
    row.conflict = true;
    let rows = BTreeMap::from([("p1".to_string(), row)]);
    assert!(check::conflicts("presence/h1", &evs, &rows, 0).is_empty());
    // Sequential events are no conflict.
    let seq = vec![
        ev("e-1", "p1", PresenceAction::CheckIn, "s1", &[]),
        ev("e-2", "p1", PresenceAction::CheckIn, "s2", &["e-1"]),
    ];
    assert!(check::conflicts("presence/h1", &seq, &BTreeMap::new(), 0).is_empty());
}

#[test]
fn role_leak_fires() {
    let frame = Frame::Changes {
        docs: vec![DocChanges::new(DocKey::new(Kind::Medical, "p1").unwrap())],
        upto: None,
    };
    let shelter = NodeId::new("shelter-1").unwrap();
    assert_eq!(
        check::role_leak(&shelter, Role::Shelter, &frame, 0)[0].name,
        ROLE_LEAK
    );
    let amb = NodeId::new("amb-1").unwrap();
    assert!(check::role_leak(&amb, Role::Ambulance, &frame, 0).is_empty());
}

#[test]
fn audit_missing_fires() {
    let entry = |seq| AuditEntry {
        seq,
        operator: "op".into(),
        node: NodeId::new("amb-1").unwrap(),
        action: "medical_read".into(),
        record: "medical/p1".into(),
        wall_ms: 0,
        hlc: Hlc::default(),
        clock_trusted: true,
        reason: "r".into(),
        break_glass: false,
        prev_hash: String::new(),
        hash: String::new(),
    };
    assert_eq!(
        check::audit("amb-1", &[0, 1], &[entry(0)], 0)[0].name,
        AUDIT_MISSING
    );
    assert_eq!(
        check::audit("amb-1", &[0], &[entry(0), entry(0)], 0).len(),
        1
    );
    assert!(check::audit("amb-1", &[0, 1], &[entry(0), entry(1)], 0).is_empty());
}

#[test]
fn converged_fires() {
    let key = DocKey::new(Kind::Presence, "h1").unwrap();
    let h1 = [[1u8; 32]];
    let h2 = [[2u8; 32]];
    let p = Projection::default();
    let a = Replica {
        node: "a",
        heads: Some(&h1),
        projection: Some(&p),
    };
    let b = Replica {
        node: "b",
        heads: Some(&h2),
        projection: Some(&p),
    };
    let c = Replica {
        node: "c",
        heads: None,
        projection: None,
    };
    assert_eq!(check::converged(&key, &[a, b], 0).unwrap().name, CONVERGED);
    let a = Replica {
        node: "a",
        heads: Some(&h1),
        projection: Some(&p),
    };
    assert!(check::converged(&key, &[a, c], 0).is_some());
    let a = Replica {
        node: "a",
        heads: Some(&h1),
        projection: Some(&p),
    };
    let b = Replica {
        node: "b",
        heads: Some(&h1),
        projection: Some(&p),
    };
    assert!(check::converged(&key, &[a, b], 0).is_none());
}

fn mail(p: &str, c: &str, mid: &str) -> MailRequest {
    MailRequest {
        message_id: mid.into(),
        to: "x@example.jp".into(),
        subject: "s".into(),
        body: "b".into(),
        person_id: p.into(),
        contact_id: c.into(),
    }
}

#[test]
fn mail_checkers_fire() {
    let mut l = MailLedger::default();
    assert_eq!(
        l.on_send(&mail("p1", "c1", "<a>"), false, 0)[0].name,
        MAIL_NOT_CONSENTED
    );
    assert!(l.on_accept("p1", "c1", 0).is_empty());
    // A second acceptance with no unknown outcome before is a duplicate.
    assert_eq!(l.on_accept("p1", "c1", 0)[0].name, MAIL_DUPLICATE);
    // A resend after an indeterminate outcome is allowed, and counted.
    l.on_unknown("p1", "c1");
    assert!(l.on_accept("p1", "c1", 0).is_empty());
    assert_eq!(l.duplicates, 2);
    // A resend must carry the same message id.
    assert_eq!(
        l.on_send(&mail("p1", "c1", "<b>"), true, 0)[0].name,
        MAIL_MESSAGE_ID
    );
    let expected: BTreeSet<(String, String)> = [("p2".into(), "c9".into())].into();
    assert_eq!(l.missing(&expected, 0)[0].name, MAIL_MISSING);
    let mut body = mail("p3", "c3", "<c>");
    body.body = "番号 1234 5678 9018".into();
    let v = l.on_send(&body, true, 0);
    assert!(
        v.iter().any(|v| v.name == INDIVIDUAL_NUMBER_LEAK)
            || !crdt::text::contains_individual_number(&body.body)
    );
}

#[test]
fn individual_number_scan() {
    // Find a valid 12-digit number by its check digit.
    let n = (0..10)
        .map(|d| format!("12345678901{d}"))
        .find(|s| crdt::text::is_individual_number(s))
        .unwrap();
    assert_eq!(
        check::individual_numbers(format!("x \"{n}\" y").as_bytes()),
        1
    );
    // Part of a longer digit run (a 13-digit card id) or of a hex token: no.
    assert_eq!(check::individual_numbers(format!("{n}7").as_bytes()), 0);
    assert_eq!(check::individual_numbers(format!("ab{n}cd").as_bytes()), 0);
    // No exemption for what follows `e:` (audit keys are 16 digits now).
    assert_eq!(check::individual_numbers(format!("e:{n}").as_bytes()), 1);
    assert_eq!(check::individual_numbers(b"e:000000000000"), 1);
    // Stored documents are scanned decoded: full-width and hyphenated too.
    let key = DocKey::new(Kind::Medical, "p1").unwrap();
    let actor = crdt::actor::Actor::new(Role::Hq, &NodeId::new("hq-1").unwrap(), 1);
    let wide: String = n
        .chars()
        .map(|c| char::from_u32(c as u32 - '0' as u32 + '０' as u32).unwrap())
        .collect();
    for text in [wide, format!("{}-{}-{}", &n[..4], &n[4..8], &n[8..])] {
        let mut doc = crdt::doc::Doc::new(key.clone());
        doc.write(actor, 0, "m", &[("f".into(), Some(format!("\"{text}\"")))])
            .unwrap();
        assert_eq!(check::doc_individual_numbers(&doc), 1, "{text}");
    }
    let mut doc = crdt::doc::Doc::new(key);
    doc.write(
        actor,
        0,
        "m",
        &[("f".into(), Some("\"1970-01-01\"".into()))],
    )
    .unwrap();
    assert_eq!(check::doc_individual_numbers(&doc), 0);
    // Inside a hex hash (a Message-ID): not a number someone wrote.
    assert_eq!(check::text_individual_numbers(&format!("<ab{n}cd@x>")), 0);
    assert_eq!(check::text_individual_numbers(&format!("番号 {n}。")), 1);
}

#[test]
fn rebuilt_differs_fires() {
    let key = DocKey::new(Kind::Presence, "h1").unwrap();
    let (a, b) = ([1u8; 32], [2u8; 32]);
    let rows = Projection::default();
    assert!(check::rebuilt("n", &key, &[a, b], Some(&[b, a]), Some(&rows), None, 0).is_none());
    let v = check::rebuilt("n", &key, &[a], Some(&[a, b]), None, None, 0).unwrap();
    assert_eq!(v.name, REBUILT_DIFFERS);
    let other = Projection {
        locations: vec![LocationRow {
            person_id: "p1".into(),
            status: LocationStatus::In,
            shelter_id: "s".into(),
            since_ms: 0,
            conflict: false,
        }],
        ..Default::default()
    };
    let v = check::rebuilt("n", &key, &[a], Some(&[a]), Some(&other), Some(&rows), 0).unwrap();
    assert_eq!(v.name, REBUILT_DIFFERS);
}

#[cfg(feature = "mutants")]
#[test]
fn every_mutant_is_caught() {
    let sc = scenario("ci-small.toml");
    // Each is caught within the first 20 seeds (`make test` runs the same
    // through the binary with 50).
    let results = sim::catch_mutants(&sc, 50, 0);
    let survivors: Vec<_> = results.iter().filter(|r| r.caught_at.is_none()).collect();
    assert!(survivors.is_empty(), "{results:?}");
}

/// A mutant belongs to the engines of one world: a clean world run right
/// after (or beside) a mutant one is unaffected.
#[cfg(feature = "mutants")]
#[test]
fn mutants_are_per_world() {
    let sc = scenario("ci-small.toml");
    let clean = sim::run_seed(&sc, 7, None);
    let mutant = std::thread::spawn({
        let sc = sc.clone();
        move || sim::run_seed_mutant(&sc, 7, Some(crdt::mutants::Mutant::WallClockLww), None)
    });
    let again = sim::run_seed(&sc, 7, None);
    let mutant = mutant.join().unwrap();
    assert_eq!(clean.trace_hash, again.trace_hash);
    assert!(again.invariant_violations.is_empty());
    assert_ne!(mutant.trace_hash, clean.trace_hash);
}

#[test]
fn received_change_lost_fires() {
    let key = DocKey::new(Kind::Presence, "h1").unwrap();
    let mut doc = crdt::doc::Doc::new(key.clone());
    let actor = crdt::actor::Actor::new(Role::Shelter, &NodeId::new("shelter-1").unwrap(), 0);
    let c = doc
        .write(actor, 0, "m", &[("f".into(), Some("\"v\"".into()))])
        .unwrap()
        .unwrap();
    let frame = Frame::Changes {
        docs: vec![DocChanges {
            key,
            changes: vec![c.raw_bytes().to_vec()],
            sigs: vec![0; 64],
        }],
        upto: None,
    };
    let parse = |b: &[u8]| parse_change(b).map(std::sync::Arc::new);
    let v = check::received_changes("shelter-2", &frame, |_, _| false, parse, 0);
    assert_eq!(v[0].name, RECEIVED_CHANGE_LOST);
    assert!(check::received_changes("shelter-2", &frame, |_, _| true, parse, 0).is_empty());
}

/// `unverifiable_change_applied`: the checker takes a change only with a
/// seal by its actor's author, from a known credential whose role may
/// write the document, unrevoked, over the change hash.
#[test]
fn unverifiable_change_fires() {
    use crdt::actor::Actor;
    use crdt::signing::{Seal, Signer};
    use crdt::testkit::testca;
    let shelter = NodeId::new("shelter-1").unwrap();
    let revoked = NodeId::new(sim::world::REVOKED_NODE).unwrap();
    let mut known = KnownAuthors::default();
    known.add(&shelter, Role::Shelter);
    known.add(&revoked, Role::Shelter);
    known.revoked.insert(revoked.clone());
    let person = DocKey::new(Kind::Person, "p1").unwrap();
    let registry = DocKey::new(Kind::Registry, "h1").unwrap();
    let change = |key: &DocKey, actor: Actor| {
        let mut d = crdt::doc::Doc::new(key.clone());
        d.write(actor, 0, "", &[("f".into(), Some("\"v\"".into()))])
            .unwrap()
            .unwrap()
    };
    let sealed = |c: &automerge::Change, node: &NodeId, by: &NodeId| Seal {
        author: crdt::actor::node_hash(node.as_str()),
        sig: Signer::new(&testca::seed(by), vec![]).sign(&c.hash().0),
    };
    let check = |key: &DocKey, c: &automerge::Change, seal: Option<Seal>| {
        check::unverifiable(&known, key, &c.hash().0, c.raw_bytes(), seal.as_ref())
    };
    let good = change(&person, Actor::new(Role::Shelter, &shelter, 1));
    assert_eq!(
        check(&person, &good, Some(sealed(&good, &shelter, &shelter))),
        None
    );
    assert!(check(&person, &good, None).is_some(), "unsigned");
    let other = NodeId::new("shelter-2").unwrap();
    assert!(
        check(&person, &good, Some(sealed(&good, &shelter, &other))).is_some(),
        "another key"
    );
    let as_hq = change(&person, Actor::new(Role::Hq, &shelter, 1));
    assert!(
        check(&person, &as_hq, Some(sealed(&as_hq, &shelter, &shelter))).is_some(),
        "a borrowed role"
    );
    let reg = change(&registry, Actor::new(Role::Shelter, &shelter, 1));
    assert!(
        check(&registry, &reg, Some(sealed(&reg, &shelter, &shelter))).is_some(),
        "a document its role may not write"
    );
    let rev = change(&person, Actor::new(Role::Shelter, &revoked, 1));
    assert!(
        check(&person, &rev, Some(sealed(&rev, &revoked, &revoked))).is_some(),
        "a revoked author"
    );
    let unknown = NodeId::new("shelter-9").unwrap();
    let unk = change(&person, Actor::new(Role::Shelter, &unknown, 1));
    assert!(
        check(&person, &unk, Some(sealed(&unk, &unknown, &unknown))).is_some(),
        "an author with no credential"
    );
}

/// A stray copy of a frame is introduced, as a session would, with the
/// credentials of every author in it, also when there are more than one
/// `Authors` frame holds. A catch-up frame in a mesh of more than 64
/// authors carries such changes; introduced with only 64 credentials, an
/// early stray copy reached its receiver before the session's own
/// `Authors` frames, and the receiver flagged the honest sender
/// ("unverifiable change: author has no verified credential", thousands
/// of `honest_peer_violation`s in noto-2024).
#[test]
fn a_stray_copy_is_introduced_with_every_author() {
    use crdt::actor::Actor;
    use crdt::signing::{Directory, Proven, Signer};
    use crdt::testkit::testca;
    let mut sc = scenario("ci-small.toml");
    let authors = crdt::wire::MAX_CREDS_PER_FRAME + 6;
    sc.nodes.shelters = authors;
    let w = sim::world::World::new(sc, 1);
    let mut docs = Vec::new();
    let mut signed = Vec::new();
    for i in 1..=authors {
        let node = NodeId::new(format!("shelter-{i}")).unwrap();
        let key = DocKey::new(Kind::Person, &format!("p{i}")).unwrap();
        let c = crdt::doc::Doc::new(key.clone())
            .write(
                Actor::new(Role::Shelter, &node, 1),
                0,
                "",
                &[("f".into(), Some("\"v\"".into()))],
            )
            .unwrap()
            .unwrap();
        let sig = Signer::new(&testca::seed(&node), vec![]).sign(&c.hash().0);
        let mut d = DocChanges::new(key.clone());
        d.push(c.raw_bytes().to_vec(), &sig);
        docs.push(d);
        signed.push((key, c, sig));
    }
    let frame = Frame::Changes { docs, upto: None };
    // The receiver: a directory that knows no one yet, as a node that
    // never heard of these authors (the copy came before the session's
    // own credentials).
    let verifier = testca::TestVerifier::default();
    let mut directory = Directory::default();
    for bytes in w.credentials_for(&frame) {
        let Frame::Authors { creds } = crdt::wire::decode(&bytes).unwrap() else {
            panic!("not an Authors frame");
        };
        assert!(creds.len() <= crdt::wire::MAX_CREDS_PER_FRAME);
        for cred in creds {
            directory.admit(&cred, &verifier).unwrap();
        }
    }
    for (key, c, sig) in &signed {
        let checked = directory.check(
            &verifier,
            &c.actor_id().to_bytes(),
            key,
            &c.hash().0,
            sig,
            &Proven::default(),
        );
        assert!(checked.is_ok(), "{key}: {checked:?}");
    }
}

/// Every kind of hostile change from a compromised shelter is refused
/// where it arrives and never stored anywhere, and the run is otherwise
/// clean (the expected complaints about the forger are not violations).
#[test]
fn hostile_changes_are_refused_and_never_stored() {
    let sc = scenario("ci-small.toml");
    let mut sent: BTreeMap<String, u64> = BTreeMap::new();
    for seed in 0..3 {
        let mut mix = sim::world::FaultMix::draw(&sc, seed);
        (mix.crashes, mix.crash_after_ack, mix.partitions, mix.clog) = (false, false, false, false);
        (mix.io_errors, mix.skew, mix.smtp_down, mix.restore_backup) = (false, false, false, false);
        mix.crash_during_mail = false;
        mix.hostile = true;
        mix.events_per_hour = 40.0;
        let mut w = sim::world::World::with_mix(sc.clone(), seed, mix);
        let s = w.run(None);
        assert!(s.finished && s.converged, "seed {seed}");
        assert!(
            s.invariant_violations.is_empty(),
            "seed {seed}: {:#?}",
            s.invariant_violations
        );
        for (k, n) in &s.faults_injected {
            if k.starts_with("hostile_") {
                *sent.entry(k.clone()).or_default() += n;
            }
        }
    }
    for kind in [
        "forged_invented_hq",
        "forged_borrowed_hq",
        "forged_role",
        "forged_doc",
        "revoked_author",
        "presence_elsewhere",
        "garbage_change",
        "panic_change",
    ] {
        assert!(
            sent.contains_key(&format!("hostile_{kind}")),
            "{kind} never sent: {sent:?}"
        );
    }
    assert!(
        sent.get("hostile_refused").copied().unwrap_or(0) >= 8,
        "{sent:?}"
    );
}
