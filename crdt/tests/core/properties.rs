//! Property tests of the core: merge order and duplication do not matter,
//! save/load equals replay, wire frames round-trip, projections equal a
//! rebuild. Case counts add up to more than 10,000 per run.

use crdt::actor::Actor;
use crdt::derive;
use crdt::doc::{encode, Doc};
use crdt::hlc::Hlc;
use crdt::model::{PresenceAction, PresenceEvent};
use crdt::wire::{self, DocChanges, Frame, Item, Range, RangeBody};
use crdt::{DocKey, Kind, NodeId, Role};
use proptest::prelude::*;

fn key() -> DocKey {
    DocKey::new(Kind::Presence, "h1").unwrap()
}

/// Up to 5 actors each write a few presence events and field edits to
/// their own fork of a shared base; returns every change made.
fn make_changes(script: &[(u8, u8, bool)]) -> (Doc, Vec<automerge::Change>) {
    let base_actor = Actor::new(Role::Hq, &NodeId::new("base").unwrap(), 1);
    let mut base = Doc::new(key());
    base.write(
        base_actor,
        0,
        "",
        &[(
            "ev:e-base".into(),
            Some(encode(&event("e-base", 0, 0, &[]))),
        )],
    )
    .unwrap();
    let mut forks: Vec<Doc> = (0..5).map(|_| base.clone()).collect();
    let mut all = base.am.get_changes(&[]);
    for (i, (actor, n, checkout)) in script.iter().enumerate() {
        let a = (*actor % 5) as usize;
        let actor_id = Actor::new(Role::Shelter, &NodeId::new(format!("s{a}")).unwrap(), 1);
        let id = format!("e-{i}");
        let mut ev = event(&id, *n as u64, a, &[]);
        if *checkout {
            ev.action = PresenceAction::CheckOut;
        }
        let c = forks[a]
            .write(
                actor_id,
                i as i64,
                "",
                &[(format!("ev:{id}"), Some(encode(&ev)))],
            )
            .unwrap()
            .unwrap();
        all.push(c);
    }
    (base, all)
}

fn event(id: &str, wall: u64, shelter: usize, prev: &[&str]) -> PresenceEvent {
    PresenceEvent {
        event_id: id.into(),
        op_id: id.into(),
        person_id: format!("p{}", wall % 3),
        action: PresenceAction::CheckIn,
        shelter_id: format!("s{shelter}"),
        to_shelter: None,
        hlc: Hlc {
            wall_ms: wall,
            counter: 0,
        },
        node: NodeId::new(format!("s{shelter}")).unwrap(),
        wall_ms: wall,
        prev: prev.iter().map(|s| s.to_string()).collect(),
    }
}

fn state(d: &Doc) -> (Vec<[u8; 32]>, crdt::store::Projection) {
    let mut h = d.heads();
    h.sort();
    (h, derive::projection(d).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// Any permutation and duplication of the changes gives identical heads
    /// and derived state.
    #[test]
    fn merge_is_commutative_and_idempotent(script in prop::collection::vec((0u8..5, 0u8..20, any::<bool>()), 1..12), perm_seed in any::<u64>(), dups in prop::collection::vec(any::<prop::sample::Index>(), 0..6)) {
        let (_, changes) = make_changes(&script);
        let mut a = Doc::new(key());
        a.apply(changes.clone()).unwrap();
        let mut shuffled = changes.clone();
        for d in &dups {
            shuffled.push(d.get(&changes).clone());
        }
        // Deterministic shuffle from the seed.
        let mut s = perm_seed;
        for i in (1..shuffled.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (s >> 33) as usize % (i + 1));
        }
        let mut b = Doc::new(key());
        // One at a time: out-of-order changes wait for their dependencies.
        for c in shuffled {
            b.apply(vec![c]).unwrap();
        }
        prop_assert_eq!(state(&a), state(&b));
    }

    /// Saving and loading a document equals replaying its changes.
    #[test]
    fn save_then_load_equals_replay(script in prop::collection::vec((0u8..5, 0u8..20, any::<bool>()), 1..10)) {
        let (_, changes) = make_changes(&script);
        let mut a = Doc::new(key());
        a.apply(changes.clone()).unwrap();
        let loaded = Doc::load(key(), Some(&a.save().unwrap()), &[]).unwrap();
        let raw: Vec<Vec<u8>> = changes.iter().map(|c| c.raw_bytes().to_vec()).collect();
        let replayed = Doc::load(key(), None, &raw).unwrap();
        prop_assert_eq!(state(&loaded), state(&a));
        prop_assert_eq!(state(&replayed), state(&a));
    }

    /// Projections derived incrementally equal a rebuild from all changes.
    #[test]
    fn projection_equals_rebuild(script in prop::collection::vec((0u8..5, 0u8..20, any::<bool>()), 1..10), split in any::<prop::sample::Index>()) {
        let (_, changes) = make_changes(&script);
        let cut = split.index(changes.len() + 1);
        let mut inc = Doc::new(key());
        inc.apply(changes[..cut].to_vec()).unwrap();
        let _ = derive::projection(&inc).unwrap();
        inc.apply(changes[cut..].to_vec()).unwrap();
        let mut fresh = Doc::new(key());
        fresh.apply(changes).unwrap();
        prop_assert_eq!(derive::projection(&inc).unwrap(), derive::projection(&fresh).unwrap());
    }
}

fn arb_key() -> impl Strategy<Value = DocKey> {
    (0u8..9, "[a-z0-9][a-z0-9._-]{0,20}")
        .prop_map(|(k, id)| DocKey::new(Kind::from_code(k).unwrap(), id).unwrap())
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    let item = (arb_key(), prop::collection::vec(any::<[u8; 32]>(), 0..3))
        .prop_map(|(key, heads)| Item { key, heads });
    let body = prop_oneof![
        (any::<[u8; 16]>(), any::<u32>())
            .prop_map(|(fp, count)| RangeBody::Fingerprint { fp, count }),
        (prop::collection::vec(item, 0..5), 1u8..4)
            .prop_map(|(items, stage)| RangeBody::Items { items, stage }),
        prop::collection::vec((arb_key(), any::<[u8; 8]>()), 0..5)
            .prop_map(|items| RangeBody::Digests { items }),
    ];
    let range = (
        prop::option::of(arb_key()),
        prop::option::of(arb_key()),
        body,
    )
        .prop_map(|(lo, hi, body)| Range { lo, hi, body });
    prop_oneof![
        (
            any::<u16>(),
            "[a-z][a-z0-9-]{0,10}",
            0u8..5,
            any::<u32>(),
            prop::option::of((any::<u64>(), any::<[u8; 32]>()))
        )
            .prop_map(|(version, n, r, incarnation, resume)| Frame::Hello {
                version,
                node: NodeId::new(n).unwrap(),
                role: Role::ALL[r as usize],
                incarnation,
                resume: resume.map(|(seq, hash)| crdt::store::Cursor { seq, hash }),
            }),
        any::<bool>().prop_map(|ok| Frame::Resume { ok }),
        (prop::collection::vec(range, 0..6), any::<bool>())
            .prop_map(|(ranges, more)| Frame::Reconcile { ranges, more }),
        prop::collection::vec(
            (
                arb_key(),
                prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..4)
            )
                .prop_map(|(key, changes)| DocChanges {
                    key,
                    sigs: vec![7; changes.len() * 64],
                    changes,
                }),
            0..5
        )
        .prop_map(|docs| Frame::Changes { docs, upto: None }),
        (any::<u16>(), "[ -~]{0,40}").prop_map(|(code, reason)| Frame::Bye { code, reason }),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 0..4)
            .prop_map(|creds| Frame::Authors { creds }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn wire_frames_round_trip(f in arb_frame()) {
        let bytes = wire::encode(&f).unwrap();
        prop_assert_eq!(wire::decode(&bytes).unwrap(), f);
    }

    /// Arbitrary bytes never panic the decoder.
    #[test]
    fn wire_decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = wire::decode(&bytes);
        let _ = crdt::doc::parse_change(&bytes);
    }
}
