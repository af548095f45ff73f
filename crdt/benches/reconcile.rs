//! Reconciliation cost after a partition.
//!
//! `cargo bench -p crdt --bench reconcile -- --docs 100000 --divergence 0.01`
//! builds two headquarters engines sharing the same registry documents,
//! lets each edit a different `divergence` fraction of them while apart,
//! reconnects them and counts what crosses the wire until both are idle.
//! It compares that with the encoded size of just the missing changes and
//! with Automerge's own sync protocol run on every document, like for
//! like: our first meeting (no cursors) against Automerge from fresh sync
//! states, and our resumed meeting (cursors kept) against Automerge from
//! the sync states both sides saved at their last meeting. Every run goes
//! until nothing is sent and is checked converged.

use automerge::sync::{self, SyncDoc};
use crdt::api::*;
use crdt::engine::{Engine, EngineConfig};
use crdt::model::Household;
use crdt::store::MemStore;
use crdt::testkit::bulk_household;
use crdt::{Kind, NodeId, Role};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

fn now(ms: u64) -> Now {
    Now {
        wall_ms: ms,
        mono_ms: ms,
        wall_trusted: true,
    }
}

fn arg(name: &str, default: f64) -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let docs = arg("--docs", 100_000.0) as usize;
    let divergence = arg("--divergence", 0.01);
    let t0 = 1_790_000_000_000u64;
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let started = Instant::now();

    let cfg = |n: &str| {
        let mut c = EngineConfig::for_tests(NodeId::new(n).unwrap(), Role::Hq);
        c.cache_docs = 4096;
        // The bench carries frames without a transport, written at once:
        // no send window (the engines are never told `Input::Sent`).
        c.send_window = usize::MAX;
        c
    };
    let mut a = Engine::open(MemStore::new(), cfg("hq-a"), now(t0)).unwrap();
    for (b, chunk) in (0..docs).collect::<Vec<_>>().chunks(10_000).enumerate() {
        let households = chunk
            .iter()
            .map(|&i| bulk_household(i, "新潟県三条市"))
            .collect();
        let out = a.handle(
            Input::Command {
                op_id: format!("import-{b}"),
                operator: Operator("bench".into()),
                cmd: Command::ImportHouseholds { households },
            },
            now(t0),
            &mut rng,
        );
        assert!(matches!(
            out.last(),
            Some(Output::Reply { result: Ok(_), .. })
        ));
    }
    // The second node meets the first and receives every document over
    // the sync protocol, which leaves each holding a cursor into the other.
    let mut b = Engine::open(MemStore::new(), cfg("hq-b"), now(t0)).unwrap();
    let t_initial = Instant::now();
    let (initial_bytes, initial_rounds) = sync(&mut a, &mut b, &mut rng, now(t0 + 500));
    eprintln!(
        "initial sync of {docs} documents: {initial_bytes} bytes, {initial_rounds} rounds, {:?}",
        t_initial.elapsed()
    );
    eprintln!("built {docs} shared documents in {:?}", started.elapsed());

    // The Automerge baseline for resumed peers: per document, sync two
    // copies with Automerge's own protocol now (before the edits) and keep
    // each side's persisted sync state, as a node would between meetings.
    let keys: Vec<_> = a
        .heads()
        .map(|(k, _)| k.clone())
        .filter(|k| k.kind == Kind::Registry)
        .collect();
    let mut saved: BTreeMap<_, (Vec<u8>, Vec<u8>)> = BTreeMap::new();
    for k in &keys {
        let mut da = a.doc(k).unwrap().unwrap().am.fork();
        let mut db = b.doc(k).unwrap().unwrap().am.fork();
        let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
        am_sync(&mut da, &mut db, &mut sa, &mut sb);
        saved.insert(k.clone(), (sa.encode(), sb.encode()));
    }

    // Independent edits while apart.
    let n_edit = ((docs as f64) * divergence).round() as usize;
    let mut missing_bytes = 0usize;
    for (side, engine) in [&mut a, &mut b].into_iter().enumerate() {
        let mut picked = BTreeSet::new();
        while picked.len() < n_edit {
            picked.insert(rng.next_u64() as usize % docs);
        }
        let before = engine.stats().commits;
        let households: Vec<Household> = picked
            .iter()
            .map(|&i| bulk_household(i, &format!("避難先 {side}")))
            .collect();
        let before_log = engine.store().log.len();
        engine.handle(
            Input::Command {
                op_id: format!("edit-{side}"),
                operator: Operator("bench".into()),
                cmd: Command::ImportHouseholds { households },
            },
            now(t0 + 1000),
            &mut rng,
        );
        assert!(engine.stats().commits > before);
        missing_bytes += engine
            .store()
            .log
            .iter()
            .skip(before_log)
            .map(|c| c.change.bytes.len())
            .sum::<usize>();
    }

    // Automerge's sync protocol on every document, run until neither side
    // has anything to send and checked converged: from fresh sync states
    // (the baseline for a first meeting), and from the states saved at the
    // last meeting (the baseline for resumed peers).
    let t_naive = Instant::now();
    let (mut naive_bytes, mut naive_resumed_bytes) = (0usize, 0usize);
    // The same split by whether the document was edited while apart:
    // (documents, fresh bytes, resumed bytes) for unchanged and edited.
    let mut split = [(0usize, 0usize, 0usize); 2];
    for k in &keys {
        let fork = |e: &mut Engine<MemStore>| e.doc(k).unwrap().unwrap().am.fork();
        let (mut da, mut db) = (fork(&mut a), fork(&mut b));
        let (mut ha, mut hb) = (da.get_heads(), db.get_heads());
        ha.sort();
        hb.sort();
        let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
        let fresh = am_sync(&mut da, &mut db, &mut sa, &mut sb);
        let (mut da, mut db) = (fork(&mut a), fork(&mut b));
        let (ea, eb) = &saved[k];
        let (mut sa, mut sb) = (
            sync::State::decode(ea).unwrap(),
            sync::State::decode(eb).unwrap(),
        );
        // A saved state holds exactly the heads both sides had in common.
        assert!(!sa.shared_heads.is_empty() && sa.shared_heads == sb.shared_heads);
        let resumed = am_sync(&mut da, &mut db, &mut sa, &mut sb);
        naive_bytes += fresh;
        naive_resumed_bytes += resumed;
        let s = &mut split[usize::from(ha != hb)];
        s.0 += 1;
        s.1 += fresh;
        s.2 += resumed;
    }
    eprintln!(
        "automerge sync (fresh and resumed) over {} documents took {:?}",
        keys.len(),
        t_naive.elapsed()
    );

    // A first meeting over the same data: copies without cursors.
    let strip = |e: &Engine<MemStore>, n: &str| {
        let mut st = e.store().clone();
        st.cursors.clear();
        st.meta = None;
        Engine::open(st, cfg(n), now(t0)).unwrap()
    };
    let (mut fa, mut fb) = (strip(&a, "hq-c"), strip(&b, "hq-d"));
    let (first_bytes, first_rounds) = sync(&mut fa, &mut fb, &mut rng, now(t0 + 2000));
    assert_converged(&fa, &fb, "first meeting");
    drop((fa, fb));

    // Kizuna, peers met before: reconnect and run until both are idle.
    let t_sync = Instant::now();
    let (wire_bytes, rounds) = sync(&mut a, &mut b, &mut rng, now(t0 + 2000));
    let wall_ms = t_sync.elapsed().as_millis();
    eprintln!("stats a={:?} b={:?}", a.stats(), b.stats());
    assert_converged(&a, &b, "resumed");

    println!("documents            {docs}");
    println!("edited per side      {n_edit}");
    println!("bytes on wire        {wire_bytes}");
    println!("lower bound bytes    {missing_bytes}");
    println!("like for like (bytes on the wire, every run checked converged):");
    println!(
        "  first meeting: kizuna {first_bytes}, automerge from fresh sync states {naive_bytes} ({:.1}x)",
        naive_bytes as f64 / first_bytes.max(1) as f64
    );
    println!(
        "  resumed:       kizuna {wire_bytes}, automerge from saved sync states {naive_resumed_bytes} ({:.1}x)",
        naive_resumed_bytes as f64 / wire_bytes.max(1) as f64
    );
    // Why Automerge resuming can cost more than starting fresh here: its
    // resumed opening names the shared heads (32 bytes each) in place of a
    // Bloom filter of the whole history, and these documents have a
    // history of one or two changes, whose filter is smaller than a hash.
    for (name, (n, fresh, resumed)) in ["unchanged", "edited"].iter().zip(split) {
        println!(
            "  automerge per {name} document ({n}): fresh {:.1} B, resumed {:.1} B",
            fresh as f64 / n.max(1) as f64,
            resumed as f64 / n.max(1) as f64
        );
    }
    println!("round trips          {}", rounds.div_ceil(2));
    println!(
        "first meeting bytes  {first_bytes} ({} round trips)",
        first_rounds.div_ceil(2)
    );
    println!("initial sync bytes   {initial_bytes}");
    println!("reconcile wall ms    {wall_ms}");
    println!(
        "{}",
        serde_json::json!({
            "docs": docs, "divergence": divergence, "bytes_on_wire": wire_bytes, "lower_bound_bytes": missing_bytes,
        "round_trips": rounds.div_ceil(2), "wall_ms": wall_ms,
            "ratio_to_lower_bound": wire_bytes as f64 / missing_bytes.max(1) as f64,
            "first_meeting_bytes": first_bytes, "first_meeting_round_trips": first_rounds.div_ceil(2),
            "first_meeting_ratio_to_lower_bound": first_bytes as f64 / missing_bytes.max(1) as f64,
            "automerge_fresh_bytes": naive_bytes, "automerge_resumed_bytes": naive_resumed_bytes,
            "first_meeting_automerge_fresh_over_ours": naive_bytes as f64 / first_bytes.max(1) as f64,
            "resumed_automerge_resumed_over_ours": naive_resumed_bytes as f64 / wire_bytes.max(1) as f64,
        })
    );
}

/// Automerge's sync protocol between two copies of one document until
/// neither side sends anything; asserts they converged. Returns the bytes
/// of the sync messages.
fn am_sync(
    da: &mut automerge::Automerge,
    db: &mut automerge::Automerge,
    sa: &mut sync::State,
    sb: &mut sync::State,
) -> usize {
    let mut bytes = 0;
    for _ in 0..1_000 {
        let mut moved = false;
        if let Some(m) = da.generate_sync_message(sa) {
            let b = m.encode();
            bytes += b.len();
            db.receive_sync_message(sb, sync::Message::decode(&b).unwrap())
                .unwrap();
            moved = true;
        }
        if let Some(m) = db.generate_sync_message(sb) {
            let b = m.encode();
            bytes += b.len();
            da.receive_sync_message(sa, sync::Message::decode(&b).unwrap())
                .unwrap();
            moved = true;
        }
        if !moved {
            let (mut ha, mut hb) = (da.get_heads(), db.get_heads());
            ha.sort();
            hb.sort();
            assert_eq!(ha, hb, "automerge sync stopped before converging");
            return bytes;
        }
    }
    panic!("automerge sync did not finish in 1,000 rounds");
}

/// Every registry document has the same heads on both engines.
fn assert_converged(a: &Engine<MemStore>, b: &Engine<MemStore>, what: &str) {
    let heads = |e: &Engine<MemStore>| -> BTreeMap<_, _> {
        e.heads()
            .filter(|(k, _)| k.kind == Kind::Registry)
            .map(|(k, h)| {
                let mut h = h.to_vec();
                h.sort();
                (k.clone(), h)
            })
            .collect()
    };
    let (ha, hb) = (heads(a), heads(b));
    let differ = ha.iter().filter(|(k, h)| hb.get(*k) != Some(*h)).count()
        + hb.keys().filter(|k| !ha.contains_key(*k)).count();
    assert_eq!(differ, 0, "{what}: {differ} documents differ after sync");
}

/// Connects two engines, runs rounds (every frame of a round delivered
/// before the next) until neither sends anything, disconnects. Returns the
/// bytes on the wire (length prefixes included) and the number of rounds.
fn sync(
    a: &mut Engine<MemStore>,
    b: &mut Engine<MemStore>,
    rng: &mut ChaCha8Rng,
    at: Now,
) -> (usize, usize) {
    let (na, nb) = (a.config().node_id.clone(), b.config().node_id.clone());
    let engines = [a, b];
    let mut inbox: Vec<Vec<Input>> = vec![
        vec![Input::Connected {
            session: 1,
            node: nb,
            role: Role::Hq,
            initiator: true,
        }],
        vec![Input::Connected {
            session: 2,
            node: na,
            role: Role::Hq,
            initiator: false,
        }],
    ];
    let (mut bytes, mut rounds) = (0usize, 0usize);
    loop {
        let mut next: Vec<Vec<Input>> = vec![vec![], vec![]];
        let mut sent = false;
        for side in 0..2 {
            let mut inputs = std::mem::take(&mut inbox[side]);
            inputs.push(Input::Tick);
            for input in inputs {
                for o in engines[side].handle(input, at, rng) {
                    if let Output::Send { bytes: f, .. } = o {
                        bytes += f.len() + 4;
                        let to = 1 - side;
                        next[to].push(Input::Frame {
                            session: if to == 0 { 1 } else { 2 },
                            bytes: f,
                        });
                        sent = true;
                    }
                }
            }
        }
        if !sent {
            break;
        }
        rounds += 1;
        inbox = next;
        assert!(rounds < 100_000, "no quiescence");
    }
    engines[0].handle(Input::Disconnected { session: 1 }, at, rng);
    engines[1].handle(Input::Disconnected { session: 2 }, at, rng);
    (bytes, rounds)
}
