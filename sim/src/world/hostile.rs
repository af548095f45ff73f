//! Hostile peers: a compromised shelter node that, besides running its
//! honest engine, sends one forged or hostile change on one of its open
//! sessions (issue 12, E-5). The frames go down the same ordered stream as
//! the node's own, so the receiver takes them through the very code that
//! handles every frame; only the expected complaint about the sender is not
//! an `honest_peer_violation`.
//!
//! Kinds (`KINDS`, one drawn per fault):
//!
//! - `forged_invented_hq`: a registry change "by hq" under an invented node
//!   hash (no credential exists);
//! - `forged_borrowed_hq`: the same under the real hq's node hash, signed
//!   with the shelter's own key;
//! - `forged_role`: its own node hash with the hq role;
//! - `forged_doc`: its own actor and key on a registry document, which a
//!   shelter may not write;
//! - `revoked_author`: a person change signed by a node revoked for the
//!   whole run ([`REVOKED_NODE`]), with its credential (quarantined without
//!   blaming the relay);
//! - `presence_elsewhere`: its own signed check-in at another shelter;
//! - `garbage_change`: random bytes as a change;
//! - `panic_change`: hq-1's signed changes ending in one that panics
//!   Automerge's apply (`crdt/tests/core/fixtures/hostile-change.bin`).
//!
//! What must happen is checked when the frame is delivered: the change is
//! never stored, and it is counted (unverified, rejected or panicked) with
//! the forger's session closed (`hostile_change_not_refused`); the hashes
//! of every hostile change are kept, and at the end no node may hold one
//! (`unverifiable_change_applied`, with the seal check of every stored
//! change).

use super::*;
use crdt::actor::{node_hash, Actor};
use crdt::doc::{encode, Doc};
use crdt::signing::Signer;
use crdt::testkit::testca;
use crdt::wire::DocChanges;

pub(super) const KINDS: [&str; 8] = [
    "forged_invented_hq",
    "forged_borrowed_hq",
    "forged_role",
    "forged_doc",
    "revoked_author",
    "presence_elsewhere",
    "garbage_change",
    "panic_change",
];

/// A node id every simulated node's verifier holds revoked from the start.
pub const REVOKED_NODE: &str = "shelter-revoked";

/// The hostile part of a delivery: what was sent and what must follow.
pub(super) struct HostileNote {
    kind: u8,
    /// Hashes of the hostile changes (none for garbage).
    hashes: Vec<[u8; 32]>,
    /// The frame with the changes (after it, the receiver's answer is
    /// checked); the credentials go before it.
    last: bool,
}

/// Length-prefixed changes of the committed apply-path crasher.
fn panic_changes() -> Vec<Vec<u8>> {
    let raw: &[u8] = include_bytes!("../../../crdt/tests/core/fixtures/hostile-change.bin");
    let mut out = Vec::new();
    let mut i = 0;
    while i + 4 <= raw.len() {
        let n = u32::from_be_bytes(raw[i..i + 4].try_into().expect("4 bytes")) as usize;
        out.push(raw[i + 4..i + 4 + n].to_vec());
        i += 4 + n;
    }
    out
}

impl World {
    /// The document a kind writes, for choosing a receiver that may hold it.
    fn hostile_key(&self, kind: u8, n: u64) -> DocKey {
        let k = |kind, id: String| DocKey::new(kind, id).expect("valid id");
        match kind {
            0..=3 => k(Kind::Registry, format!("h-forged-{n}")),
            4 => k(Kind::Person, format!("p-revoked-{n}")),
            5 => {
                let h = self.household_of.values().next().cloned();
                k(Kind::Presence, h.unwrap_or_else(|| "h0".into()))
            }
            6 => k(Kind::Person, format!("p-garbage-{n}")),
            _ => k(Kind::Shelter, "s-fuzz".into()),
        }
    }

    /// Node `c` (a compromised shelter) sends a hostile change of `kind`
    /// on one of its open sessions.
    pub(super) fn hostile(&mut self, c: usize, kind: u8) {
        let kind = kind % KINDS.len() as u8;
        let n = self.fault_rng.next_u64() % 1_000_000;
        let key = self.hostile_key(kind, n);
        let hq1 = NodeId::new("hq-1").expect("valid id");
        let peers: Vec<(usize, u8, usize)> = (0..self.links.len())
            .filter_map(|l| {
                let k = &self.links[l];
                let (side, to) = match (k.a == c, k.b == c) {
                    (true, _) => (0, k.b),
                    (_, true) => (1, k.a),
                    _ => return None,
                };
                let node = &self.nodes[to];
                (k.up
                    && !k.broken
                    && node.engine.is_some()
                    && crdt::policy::may_hold(node.role, &node.id, &key)
                    // The crasher's first changes are hq-1's own (a clone
                    // of its actor, reported as such there).
                    && !(kind == 7 && node.id == hq1))
                    .then_some((l, side, to))
            })
            .collect();
        if peers.is_empty() {
            self.count("hostile_no_peer");
            return;
        }
        let (l, side, _to) = peers[range(&mut self.fault_rng, 0, peers.len() as u64) as usize];
        let me = self.nodes[c].id.clone();
        let my_seed = testca::seed(&me);
        let my_key = Signer::new(&my_seed, vec![]);
        let cred = |node: &NodeId, role: Role| testca::credential(node, role, &testca::seed(node));
        let write = |actor: Actor, fields: Vec<(String, Option<String>)>| {
            Doc::new(key.clone())
                .write(actor, (T0_WALL_MS / 1000) as i64, "", &fields)
                .expect("writes")
                .expect("a change")
        };
        // A well-formed household, so a forgery that got past the seal
        // check would be applied, not refused as malformed.
        let field = || {
            let h = Household {
                household_id: key.id.clone(),
                ..crdt::testkit::household(1_000_000 + n as usize, 1)
            };
            vec![(crdt::derive::HOUSEHOLD_FIELD.to_string(), Some(encode(&h)))]
        };
        let mut creds = vec![];
        let mut dc = DocChanges::new(key.clone());
        let mut hashes = vec![];
        let mut sign_with = |dc: &mut DocChanges, bytes: Vec<u8>, h: [u8; 32], s: &Signer| {
            dc.push(bytes, &s.sign(&h));
            hashes.push(h);
        };
        match kind {
            0..=3 => {
                let actor = match kind {
                    0 => Actor {
                        role: Role::Hq,
                        node_hash: node_hash("hq-forged"),
                        incarnation: 1,
                    },
                    1 => {
                        creds.push(cred(&hq1, Role::Hq));
                        Actor {
                            role: Role::Hq,
                            node_hash: node_hash(hq1.as_str()),
                            incarnation: 1_000,
                        }
                    }
                    2 => Actor::new(Role::Hq, &me, 1_000),
                    _ => Actor::new(Role::Shelter, &me, 1_000),
                };
                creds.push(cred(&me, Role::Shelter));
                let ch = write(actor, field());
                sign_with(&mut dc, ch.raw_bytes().to_vec(), ch.hash().0, &my_key);
            }
            4 => {
                let revoked = NodeId::new(REVOKED_NODE).expect("valid id");
                creds.push(cred(&revoked, Role::Shelter));
                let person = FieldPerson {
                    person_id: key.id.clone(),
                    name: "不明".into(),
                    kana: "フメイ".into(),
                    birth_date: None,
                    registered_by: revoked.clone(),
                    note: String::new(),
                };
                let ch = write(
                    Actor::new(Role::Shelter, &revoked, 1),
                    vec![("person".into(), Some(encode(&person)))],
                );
                let key = Signer::new(&testca::seed(&revoked), vec![]);
                sign_with(&mut dc, ch.raw_bytes().to_vec(), ch.hash().0, &key);
            }
            5 => {
                creds.push(cred(&me, Role::Shelter));
                let other = self
                    .idx(Role::Shelter)
                    .into_iter()
                    .map(|s| self.nodes[s].id.to_string())
                    .find(|s| s != me.as_str())
                    .unwrap_or_else(|| "shelter-elsewhere".into());
                let person = self
                    .household_of
                    .iter()
                    .find(|(_, h)| **h == key.id)
                    .map(|(p, _)| p.clone())
                    .unwrap_or_else(|| "p0".into());
                let id = format!("e-hostile-{n}");
                let ev = PresenceEvent {
                    event_id: id.clone(),
                    op_id: id.clone(),
                    person_id: person,
                    action: PresenceAction::CheckIn,
                    shelter_id: other,
                    to_shelter: None,
                    hlc: crdt::hlc::Hlc {
                        wall_ms: T0_WALL_MS + self.now,
                        counter: 0,
                    },
                    node: me.clone(),
                    wall_ms: T0_WALL_MS + self.now,
                    prev: vec![],
                };
                let ch = write(
                    Actor::new(Role::Shelter, &me, 1_000),
                    vec![(format!("ev:{id}"), Some(encode(&ev)))],
                );
                sign_with(&mut dc, ch.raw_bytes().to_vec(), ch.hash().0, &my_key);
            }
            6 => {
                let len = range(&mut self.fault_rng, 1, 300) as usize;
                let mut bytes = vec![0u8; len];
                self.fault_rng.fill_bytes(&mut bytes);
                // Often shaped like a change chunk, so the parser goes deep.
                if len > 8 && chance(&mut self.fault_rng, 0.5) {
                    bytes[..4].copy_from_slice(&[0x85, 0x6f, 0x4a, 0x83]);
                }
                dc.push(bytes, &[0u8; 64]);
            }
            _ => {
                creds.push(cred(&hq1, Role::Hq));
                let key = Signer::new(&testca::seed(&hq1), vec![]);
                for b in panic_changes() {
                    let h = crdt::doc::parse_change(&b)
                        .expect("fixture parses")
                        .hash()
                        .0;
                    sign_with(&mut dc, b, h, &key);
                }
            }
        }
        let mut frames = vec![];
        if !creds.is_empty() {
            frames.push(wire::encode(&Frame::Authors { creds }).expect("encodes"));
        }
        let changes = Frame::Changes {
            docs: vec![dc],
            upto: None,
        };
        frames.push(wire::encode(&changes).expect("encodes"));
        self.count(&format!("hostile_{}", KINDS[kind as usize]));
        let gen = self.links[l].gen;
        let last = frames.len() - 1;
        for (i, bytes) in frames.into_iter().enumerate() {
            // Down the compromised node's own ordered stream, after
            // everything it sent before (its hello first).
            let dir = side as usize;
            let k = &mut self.links[l];
            let arrive = (self.now + k.rtt_ms / 2).max(k.last_arrival[dir]);
            k.last_arrival[dir] = arrive;
            let note = Box::new(HostileNote {
                kind,
                hashes: hashes.clone(),
                last: i == last,
            });
            self.push(
                arrive,
                Ev::Deliver {
                    link: l,
                    gen,
                    dir: side,
                    bytes,
                    changes: None,
                    hostile: Some(note),
                    stray: false,
                },
            );
        }
    }

    /// Delivers a hostile frame from `from` to `to` and checks the
    /// receiver's answer (see the module docs).
    pub(super) fn deliver_hostile(
        &mut self,
        from: usize,
        to: usize,
        session: SessionId,
        bytes: Vec<u8>,
        note: Box<HostileNote>,
    ) {
        let before = self.nodes[to].engine.as_ref().map(|e| e.stats());
        // The receiver already closed this session (an earlier violation,
        // or the forger backed off and refused at once): the frame is
        // dropped unread, which is a refusal. What it holds must still
        // never be stored, which the end-of-run scan checks.
        let open = self.nodes[to]
            .engine
            .as_ref()
            .is_some_and(|e| e.has_session(session));
        self.hostile_from = Some(from);
        let rest = self.input(to, Input::Frame { session, bytes });
        self.hostile_from = None;
        self.after_outputs(to, rest, None);
        self.forged.extend(note.hashes.iter().copied());
        if !open {
            if note.last {
                self.count("hostile_on_closed_session");
            }
            return;
        }
        let (true, Some(before)) = (note.last, before) else {
            return;
        };
        let Some(e) = self.nodes[to].engine.as_ref() else {
            return;
        };
        let after = e.stats();
        let name = KINDS[note.kind as usize];
        let (who, by) = (self.nodes[to].id.clone(), self.nodes[from].id.clone());
        let stored: Vec<String> = note
            .hashes
            .iter()
            .filter(|h| e.store().mem.hashes.contains_key(*h))
            .map(|h| h[..4].iter().map(|b| format!("{b:02x}")).collect())
            .collect();
        let closed = !e.has_session(session);
        let refused = match note.kind {
            0..=3 | 5 => after.changes_unverified > before.changes_unverified && closed,
            4 => after.changes_unverified > before.changes_unverified,
            6 => after.changes_rejected > before.changes_rejected,
            // Refused without running it again when the same crasher
            // arrived before.
            _ => {
                (after.panics > before.panics || after.changes_rejected > before.changes_rejected)
                    && closed
            }
        };
        if !stored.is_empty() {
            let v = check::v(
                check::UNVERIFIED_APPLIED,
                self.now,
                format!("{who} stored {name} change(s) {stored:?} from {by}"),
            );
            self.violate(v);
        }
        if !refused {
            let v = check::v(
                check::HOSTILE_NOT_REFUSED,
                self.now,
                format!("{who} took a {name} change from {by} without counting it or closing the session"),
            );
            self.violate(v);
        } else {
            self.count("hostile_refused");
        }
    }

    /// `check::unverifiable` over every change stored at every running
    /// node, and no hostile change held anywhere. Each distinct (change,
    /// seal) is verified once; above 400,000 stored changes in all, every
    /// n-th.
    pub(super) fn verify_stored_changes(&mut self) {
        let total: usize = self
            .nodes
            .iter()
            .filter_map(|n| n.engine.as_ref().map(|e| e.store().mem.log.len()))
            .sum();
        let stride = total.div_ceil(400_000).max(1);
        let mut out = vec![];
        let mut seen: BTreeSet<([u8; 32], [u8; 64])> = BTreeSet::new();
        for n in &self.nodes {
            let Some(e) = n.engine.as_ref() else { continue };
            for c in e.store().mem.log.iter().step_by(stride) {
                let c = &c.change;
                if self.forged.contains(&c.hash) {
                    out.push(format!(
                        "{} holds hostile change {} of {}",
                        n.id,
                        hex4(&c.hash),
                        c.key
                    ));
                    continue;
                }
                if let Some(s) = &c.seal {
                    if !seen.insert((c.hash, s.sig)) {
                        continue;
                    }
                }
                if let Some(why) =
                    check::unverifiable(&self.known, &c.key, &c.hash, &c.bytes, c.seal.as_ref())
                {
                    out.push(format!(
                        "{} holds {} change {}: {why}",
                        n.id,
                        c.key,
                        hex4(&c.hash)
                    ));
                }
            }
        }
        for d in out.into_iter().take(20) {
            let v = check::v(check::UNVERIFIED_APPLIED, self.now, d);
            self.violate(v);
        }
    }
}

fn hex4(h: &[u8; 32]) -> String {
    h[..4].iter().map(|b| format!("{b:02x}")).collect()
}
