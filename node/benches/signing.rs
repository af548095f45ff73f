//! What signed changes cost (issue 12), before and after in one run.
//!
//! `cargo bench -p node --bench signing -- --residents 20000 --docs 100000`
//!
//! 1. Ed25519 signing and verification of change hashes, per second.
//! 2. Durable check-ins per second on a real SQLite file, in groups of 32
//!    (as the driver commits them): the same registry file opened by an
//!    engine that signs (after) and by one without a key (before: changes
//!    stored unsigned), in alternating rounds so both see the same file
//!    state; every check-in is checked written.
//! 3. Sync bytes per change: the same check-in changes framed as the wire
//!    sends them now and in the unsigned layout of protocol version 1.
//! 4. Initial sync of `--docs` registry households from headquarters to a
//!    new shelter engine (in memory, frames delivered in order): its time,
//!    and the time to verify that many signatures alone, in batches of a
//!    frame's changes as the engine does (the part of the sync that did not
//!    exist before signing). The receiver is checked to
//!    hold every document and the sender's heads.
//!
//! Prints a table and a JSON line.

/// The parts of `benches/support/` this benchmark uses (each benchmark
/// compiles only what it uses).
mod support {
    pub mod registry;
    pub mod shelter;
}

use crdt::api::*;
use crdt::engine::{Engine, EngineConfig};
use crdt::signing::{Signer, Trust};
use crdt::store::{MemStore, Store};
use crdt::{NodeId, Role};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;
use std::time::Instant;
use support::{registry::*, shelter::*};

fn main() {
    let residents = arg("--residents", 20_000) as usize;
    let docs = arg("--docs", 100_000) as usize;
    let rounds = arg("--rounds", 20) as usize;

    // 1. Raw signature cost.
    let signer = Signer::new(&[7; 32], vec![]);
    let n = 20_000;
    let hashes: Vec<[u8; 32]> = (0..n)
        .map(|i| *blake3::hash(&(i as u64).to_le_bytes()).as_bytes())
        .collect();
    let t = Instant::now();
    let sigs: Vec<_> = hashes.iter().map(|h| signer.sign(h)).collect();
    let sign_per_sec = n as f64 / t.elapsed().as_secs_f64();
    let key = signer.public_key();
    let t = Instant::now();
    let ok = hashes
        .iter()
        .zip(&sigs)
        .filter(|(h, s)| crdt::signing::verify(&key, h, s))
        .count();
    let verify_per_sec = n as f64 / t.elapsed().as_secs_f64();
    assert_eq!(ok, n, "every signature verifies");
    let items: Vec<([u8; 32], [u8; 32], crdt::signing::Sig)> = hashes
        .iter()
        .zip(&sigs)
        .map(|(h, s)| (key, *h, *s))
        .collect();
    let batch_per_sec = |per_batch: usize| {
        let t = Instant::now();
        let ok = items
            .chunks(per_batch)
            .filter(|b| crdt::signing::verify_all(b))
            .count();
        assert_eq!(ok, n.div_ceil(per_batch), "every batch verifies");
        n as f64 / t.elapsed().as_secs_f64()
    };
    let batch_64 = batch_per_sec(64);

    // 2. Durable check-ins, signed and unsigned, on one file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kizuna.db");
    let hq = build_registry(&path, residents);
    drop(hq);
    let hq_id = NodeId::new("hq-1").unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut next = 0usize;
    let mut op = 0usize;
    let mut secs = [0.0f64; 2];
    let mut count = [0usize; 2];
    let mut frame_changes: Vec<Vec<u8>> = Vec::new();
    for round in 0..rounds {
        let signed = round % 2 == 0;
        let trust = if signed {
            crdt::testkit::testca::trust(&hq_id, Role::Hq)
        } else {
            Trust::offline()
        };
        let store = node::store::SqliteStore::open(&path).unwrap();
        let mut e = Engine::open(
            store,
            EngineConfig::new(hq_id.clone(), Role::Hq, trust),
            now(),
        )
        .unwrap();
        if round == 0 {
            put_shelter(&mut e, &mut rng);
        }
        let before = e.store().log_end().unwrap().map_or(0, |c| c.seq);
        let group = 32;
        let inputs: Vec<Input> = (0..group * 4)
            .map(|_| {
                op += 1;
                next += 1;
                Input::Command {
                    op_id: format!("ci-{op}"),
                    operator: Operator("bench".into()),
                    cmd: Command::CheckIn {
                        person_ids: vec![person_of((next * 7_919) % residents)],
                        shelter_id: Some("s1".into()),
                    },
                }
            })
            .collect();
        let t = Instant::now();
        let mut written = 0;
        for chunk in inputs.chunks(group) {
            let out = e.handle_batch(chunk.to_vec(), now(), &mut rng);
            written += out
                .iter()
                .filter(|o| matches!(o, Output::Reply { result: Ok(Reply::Presence { event_ids, .. }), .. } if event_ids.len() == 1))
                .count();
        }
        secs[signed as usize] += t.elapsed().as_secs_f64();
        count[signed as usize] += written;
        assert_eq!(written, group * 4, "every check-in written");
        if signed && frame_changes.is_empty() {
            frame_changes = e
                .store()
                .log_since(before, 64)
                .unwrap()
                .into_iter()
                .map(|(_, c)| c.bytes)
                .collect();
        }
    }
    let unsigned_cps = count[0] as f64 / secs[0];
    let signed_cps = count[1] as f64 / secs[1];

    // 3. Bytes per change on the wire.
    let key0 = crdt::DocKey::new(crdt::Kind::Presence, "h1").unwrap();
    let mut dc = crdt::wire::DocChanges::new(key0.clone());
    for c in &frame_changes {
        dc.push(c.clone(), &[0; 64]);
    }
    let v2 = crdt::wire::encode(&crdt::wire::Frame::Changes {
        docs: vec![dc],
        upto: None,
    })
    .unwrap()
    .len();
    #[derive(serde::Serialize)]
    struct V1Doc {
        key: crdt::DocKey,
        changes: Vec<serde_bytes::ByteBuf>,
    }
    #[derive(serde::Serialize)]
    enum V1Frame {
        _Hello,
        _Resume,
        _Reconcile,
        Changes {
            docs: Vec<V1Doc>,
            upto: Option<crdt::store::Cursor>,
        },
    }
    let v1 = postcard::to_allocvec(&V1Frame::Changes {
        docs: vec![V1Doc {
            key: key0,
            changes: frame_changes
                .iter()
                .map(|c| serde_bytes::ByteBuf::from(c.clone()))
                .collect(),
        }],
        upto: None,
    })
    .unwrap()
    .len();
    let per_change = |b: usize| b as f64 / frame_changes.len() as f64;

    // 4. Initial sync of a registry.
    let (sync_s, changes_synced, frames) = initial_sync(docs);
    let per_frame = changes_synced.div_ceil(frames.max(1)).clamp(1, n);
    let t = Instant::now();
    let mut verified = 0;
    while verified < changes_synced {
        let b = per_frame.min(changes_synced - verified);
        assert!(crdt::signing::verify_all(&items[..b]));
        verified += b;
    }
    let verify_s = t.elapsed().as_secs_f64();

    println!("signatures per second        {sign_per_sec:.0} signed, {verify_per_sec:.0} verified one by one, {batch_64:.0} verified in batches of 64");
    println!(
        "durable check-ins per second {unsigned_cps:.0} unsigned, {signed_cps:.0} signed ({:+.1} %), {} and {} check-ins in groups of 32",
        (signed_cps / unsigned_cps - 1.0) * 100.0,
        count[0],
        count[1]
    );
    println!(
        "wire bytes per change        {:.1} unsigned (v1), {:.1} signed (v2), {} check-in changes",
        per_change(v1),
        per_change(v2),
        frame_changes.len()
    );
    println!(
        "initial sync                 {docs} documents, {changes_synced} changes in {frames} frames: {sync_s:.2} s, of which verifying {verify_s:.2} s in batches of {per_frame} ({:.1} %; without it {:.2} s)",
        verify_s / sync_s * 100.0,
        sync_s - verify_s
    );
    println!(
        "{}",
        serde_json::json!({
            "sign_per_sec": sign_per_sec,
            "verify_per_sec": verify_per_sec,
            "verify_per_sec_batches_of_64": batch_64,
            "checkins_per_sec_unsigned": unsigned_cps,
            "checkins_per_sec_signed": signed_cps,
            "bytes_per_change_v1": per_change(v1),
            "bytes_per_change_v2": per_change(v2),
            "initial_sync_docs": docs,
            "initial_sync_changes": changes_synced,
            "initial_sync_s": sync_s,
            "initial_sync_verify_s": verify_s,
        })
    );
}

/// Headquarters with `docs` one-person households syncs them to a new
/// shelter. Returns the seconds, the changes the shelter applied and the
/// frames carried.
fn initial_sync(docs: usize) -> (f64, usize, usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let open = |id: &str, role| {
        let mut cfg = EngineConfig::for_tests(NodeId::new(id).unwrap(), role);
        // Frames are carried without a transport, written at once: no
        // send window (the engines are never told `Input::Sent`).
        cfg.send_window = usize::MAX;
        Engine::open(MemStore::new(), cfg, now()).unwrap()
    };
    let mut hq = open("hq-1", Role::Hq);
    let mut sh = open("shelter-1", Role::Shelter);
    for (b, chunk) in (0..docs).collect::<Vec<_>>().chunks(5_000).enumerate() {
        let out = hq.handle(
            Input::Command {
                op_id: format!("imp-{b}"),
                operator: Operator("bench".into()),
                cmd: Command::ImportHouseholds {
                    households: chunk
                        .iter()
                        .map(|&i| crdt::testkit::bulk_household(i, "新潟県三条市"))
                        .collect(),
                },
            },
            now(),
            &mut rng,
        );
        assert!(matches!(
            out.last(),
            Some(Output::Reply { result: Ok(_), .. })
        ));
    }
    let t = Instant::now();
    let mut q: VecDeque<(usize, Input)> = VecDeque::new();
    q.push_back((
        0,
        Input::Connected {
            session: 1,
            node: NodeId::new("shelter-1").unwrap(),
            role: Role::Shelter,
            initiator: true,
        },
    ));
    q.push_back((
        1,
        Input::Connected {
            session: 2,
            node: NodeId::new("hq-1").unwrap(),
            role: Role::Hq,
            initiator: false,
        },
    ));
    let mut frames = 0;
    loop {
        while let Some((i, input)) = q.pop_front() {
            let out = if i == 0 {
                hq.handle(input, now(), &mut rng)
            } else {
                sh.handle(input, now(), &mut rng)
            };
            for o in out {
                if let Output::Send { bytes, .. } = o {
                    frames += 1;
                    let (to, session) = if i == 0 { (1, 2) } else { (0, 1) };
                    q.push_back((to, Input::Frame { session, bytes }));
                }
            }
        }
        let mut more = false;
        for (i, e) in [&mut hq, &mut sh].into_iter().enumerate() {
            for o in e.handle(Input::Tick, now(), &mut rng) {
                if let Output::Send { bytes, .. } = o {
                    frames += 1;
                    more = true;
                    let (to, session) = if i == 0 { (1, 2) } else { (0, 1) };
                    q.push_back((to, Input::Frame { session, bytes }));
                }
            }
        }
        if !more && q.is_empty() {
            break;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let kinds = [crdt::Kind::Registry];
    let held = |e: &Engine<MemStore>| {
        e.heads()
            .filter(|(k, _)| kinds.contains(&k.kind))
            .map(|(k, h)| (k.clone(), h.to_vec()))
            .collect::<Vec<_>>()
    };
    let (a, b) = (held(&hq), held(&sh));
    assert_eq!(a.len(), docs, "hq holds every household");
    assert_eq!(a, b, "the shelter converged on headquarters' registry");
    let st = sh.stats();
    assert_eq!(st.changes_unverified, 0);
    (secs, st.changes_applied as usize, frames)
}
