//! The simulated world: nodes running the real `crdt::engine::Engine` on
//! `SimStore`, links with delay, bandwidth, loss, duplication and
//! reordering, an SMTP server, and a fault schedule drawn from one seed.
//!
//! Time is simulated milliseconds in a discrete event queue (ordered by
//! time, then insertion order), so one seed replays exactly. Each purpose
//! (workload, faults, network, SMTP, each node's engine) draws from its own
//! ChaCha8 sub-stream derived from the seed, so adding a draw in one place
//! does not shift every other choice.

use crate::check::{self, MailLedger, Replica, Violation};
use crate::scenario::Scenario;
use crate::simstore::{QueryNames, SimStore};
use crdt::api::*;
use crdt::engine::{DocIndex, Engine, EngineConfig, IndexFrom};
use crdt::model::*;
use crdt::share::DocShare;
use crdt::store::{Batch, DocState, Store, StoreError, StorePool};
use crdt::text::CardUserId;
use crdt::wire::{self, Frame};
use crdt::{DocKey, Kind, NodeId, Role};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

mod census;
mod checks;
mod faults;
mod hostile;
mod network;
mod run;
mod smtp;
mod workload;

use faults::*;
use hostile::*;
use network::*;
use workload::*;

pub use faults::FaultMix;
pub use hostile::REVOKED_NODE;
pub use network::Profile;
pub use run::{memory_total, peak_rss};

/// A planted bug (`crdt::mutants`); without the feature none can be named.
#[cfg(feature = "mutants")]
pub type MutantArg = crdt::mutants::Mutant;
#[cfg(not(feature = "mutants"))]
pub type MutantArg = std::convert::Infallible;

/// Simulated time 0 on the wall clock (2026-09-21).
pub const T0_WALL_MS: u64 = 1_790_000_000_000;

pub fn sub_rng(seed: u64, purpose: &str) -> ChaCha8Rng {
    let h = blake3::hash(format!("kizuna-sim|{seed}|{purpose}").as_bytes());
    ChaCha8Rng::from_seed(*h.as_bytes())
}

fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}
fn range(rng: &mut ChaCha8Rng, lo: u64, hi: u64) -> u64 {
    if hi <= lo {
        lo
    } else {
        lo + rng.next_u64() % (hi - lo)
    }
}
fn chance(rng: &mut ChaCha8Rng, p: f64) -> bool {
    unit(rng) < p
}

struct Node {
    id: NodeId,
    role: Role,
    cfg: EngineConfig,
    engine: Option<Engine<SimStore>>,
    parked: Option<SimStore>,
    skew_ms: i64,
    /// Simulated time the node is switched on: no link comes up before.
    join_at_ms: u64,
    epoch: u32,
    rng: ChaCha8Rng,
    crash_after_ack: bool,
    crash_after_mail: bool,
    /// A copy of the store, with the epoch it was taken in and what was
    /// acknowledged by then (D-5: restore from backup).
    backup: Option<(SimStore, u32, BTreeMap<String, DocKey>, Vec<u64>)>,
    /// Acknowledged presence events: event id -> presence document.
    acked: BTreeMap<String, DocKey>,
    /// Audit sequence numbers of successful medical reads.
    reads: Vec<u64>,
}

enum Ev {
    Deliver {
        link: usize,
        gen: u32,
        dir: u8,
        bytes: Vec<u8>,
        /// The same frame decoded, when it carries changes.
        changes: Option<Box<Frame>>,
        /// Sent by a compromised node (`hostile`): not the sender's engine.
        hostile: Option<Box<HostileNote>>,
        /// A stray copy (the duplication and reordering faults).
        stray: bool,
    },
    TickAll,
    /// A frame of `node`'s `session` left it (its last byte went onto the
    /// link): the engine is told it was written (`Input::Sent`), which
    /// opens its send window.
    Sent {
        node: usize,
        session: SessionId,
        bytes: usize,
    },
    Cmd {
        node: usize,
        op_id: String,
        cmd: Command,
        resubmit: bool,
    },
    MailResp {
        hq: usize,
        epoch: u32,
        req: MailRequest,
        outcome: MailOutcome,
        accepted: bool,
    },
    Fault(Fault),
    /// One-way cut: the session times out.
    Timeout(usize),
    /// Every 30 s (5 s once healed): bring up links that may be up.
    LinkMaint,
    /// Once: the same, after a disconnect, restart, heal or join.
    Reconnect,
    Check,
    Heal,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub seed: u64,
    pub scenario: String,
    pub nodes: usize,
    pub simulated_hours: f64,
    pub faults: Option<FaultMix>,
    pub faults_injected: BTreeMap<String, u64>,
    pub invariant_violations: Vec<Violation>,
    pub converged: bool,
    pub convergence_rounds: Option<u64>,
    pub convergence_ms: Option<u64>,
    pub acked_writes: u64,
    pub acked_writes_lost: u64,
    pub duplicate_mails: u64,
    pub mails_accepted: u64,
    pub commands: u64,
    pub commands_failed: u64,
    pub frames: u64,
    pub bytes: u64,
    /// Changes received by nodes: new to the receiver, and already held
    /// (the same change from several peers, or a stray copy).
    pub changes_new: u64,
    pub changes_already_held: u64,
    /// Changes received per new change, (new + held) / new: how much of
    /// what nodes receive they already held (1.0 means every change once).
    pub received_per_new: f64,
    /// The live tree (protocol 3): change hashes announced instead of
    /// pushed, documents grafted after a missed announcement, kinds pruned.
    pub announced: u64,
    pub grafts: u64,
    pub prunes: u64,
    /// Changes delivered in stray copies (the duplication and reordering
    /// faults) to open sessions: each is one receipt the protocol did not
    /// cause (the copy or the frame it copies brings it a second time).
    pub stray_changes: u64,
    /// `received_per_new` without the stray copies.
    pub received_per_new_protocol: f64,
    pub trace_hash: String,
    pub wall_ms: u64,
    pub peak_rss_bytes: u64,
    pub finished: bool,
    /// Documents rebuilt from stored changes at the end, over all nodes.
    pub docs_rebuilt: u64,
    /// Stored documents scanned (decoded) for Individual Numbers.
    pub docs_scanned: u64,
    /// Commands carrying an Individual Number, and how many were refused.
    pub adversarial_inputs: u64,
    pub adversarial_refused: u64,
    /// Transfers acknowledged.
    pub transfers: u64,
    /// Why a run stopped before the end of the scenario.
    pub stopped: Option<String>,
    /// (simulated ms, true arrivals acknowledged, arrivals known at HQ)
    #[serde(skip)]
    pub arrivals_curve: Vec<(u64, u64, u64)>,
}

pub struct World {
    pub sc: Scenario,
    pub seed: u64,
    pub now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    nodes: Vec<Node>,
    links: Vec<Link>,
    /// Blocked directed node pairs (partitions).
    blocked: BTreeSet<(usize, usize)>,
    net_rng: ChaCha8Rng,
    fault_rng: ChaCha8Rng,
    smtp_rng: ChaCha8Rng,
    mix: FaultMix,
    healed: bool,
    smtp_down_until: u64,
    hasher: blake3::Hasher,
    pub summary: Summary,
    violations: Vec<Violation>,
    /// Names already reported, with counts (details are kept for the first few).
    violation_counts: BTreeMap<&'static str, u64>,
    ledger: MailLedger,
    mail_inflight: BTreeMap<usize, BTreeMap<String, (String, String)>>,
    last_sender: BTreeMap<(String, String), usize>,
    /// Truth: (person, contact) pairs that may be mailed.
    consented: BTreeSet<(String, String)>,
    contact_pairs: BTreeMap<String, Vec<String>>,
    /// person -> household (presence document id)
    household_of: BTreeMap<String, String>,
    first_replies: BTreeMap<String, Reply>,
    true_arrivals: BTreeSet<String>,
    converged_at: Option<u64>,
    pub progress: Option<indicatif::ProgressBar>,
    /// Print a [`World::census`] line on stderr every this many simulated
    /// ms (reads only; the run is the same without it).
    pub census_every_ms: Option<u64>,
    /// Stop (reporting how far the run got) when resident memory passes
    /// this many bytes, instead of being killed by the kernel.
    pub max_rss: Option<u64>,
    hq: Vec<usize>,
    checks_done: u64,
    share: Option<DocShare>,
    /// With `share`: one copy of each change's bytes for every store.
    pool: Option<StorePool>,
    /// The index of the store every node was provisioned with: a
    /// restarted node builds its index over it, sharing what agrees.
    provisioned: Option<DocIndex>,
    /// The query tables every store of this world shares.
    names: QueryNames,
    /// `groups_of`, computed once per class of document.
    holder_groups: BTreeMap<(Kind, Option<String>), Vec<Vec<usize>>>,
    /// Op ids of commands carrying an Individual Number.
    adversarial: BTreeSet<String>,
    /// While a hostile frame is handed over: its sender, whom the
    /// receiver is expected to flag.
    hostile_from: Option<usize>,
    /// Times of the reconnects scheduled by broken links (each reconnects
    /// every link that is down): a link that breaks while one is due
    /// within its own delay waits for that one, so sessions refused at
    /// once (a backed-off peer) do not multiply the reconnects.
    reconnects_due: BTreeSet<u64>,
    /// Hashes of every hostile change sent: no node may ever hold one.
    forged: BTreeSet<[u8; 32]>,
    /// The credentials the checker trusts (every node's, and the revoked).
    known: check::KnownAuthors,
    /// The planted bug every engine of this world carries (mutant runs).
    #[cfg(feature = "mutants")]
    mutant: Option<crdt::mutants::Mutant>,
}

impl World {
    pub fn new(sc: Scenario, seed: u64) -> World {
        let mix = FaultMix::draw(&sc, seed);
        World::with_mix(sc, seed, mix)
    }

    pub fn with_mix(sc: Scenario, seed: u64, mix: FaultMix) -> World {
        World::build(sc, seed, mix, None)
    }

    /// A world whose every engine carries the planted bug `m`.
    #[cfg(feature = "mutants")]
    pub fn with_mutant(sc: Scenario, seed: u64, m: Option<crdt::mutants::Mutant>) -> World {
        let mix = FaultMix::draw(&sc, seed);
        World::build(sc, seed, mix, m)
    }

    fn build(
        sc: Scenario,
        seed: u64,
        mix: FaultMix,
        #[allow(unused_variables)] mutant: Option<MutantArg>,
    ) -> World {
        let mut w = World {
            seed,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            nodes: vec![],
            links: vec![],
            blocked: BTreeSet::new(),
            net_rng: sub_rng(seed, "net"),
            fault_rng: sub_rng(seed, "faults"),
            smtp_rng: sub_rng(seed, "smtp"),
            mix: mix.clone(),
            healed: false,
            smtp_down_until: 0,
            hasher: blake3::Hasher::new(),
            summary: Summary {
                seed,
                scenario: sc.name.clone(),
                faults: Some(mix),
                ..Default::default()
            },
            violations: vec![],
            violation_counts: BTreeMap::new(),
            ledger: MailLedger::default(),
            mail_inflight: BTreeMap::new(),
            last_sender: BTreeMap::new(),
            consented: BTreeSet::new(),
            contact_pairs: BTreeMap::new(),
            household_of: BTreeMap::new(),
            first_replies: BTreeMap::new(),
            true_arrivals: BTreeSet::new(),
            converged_at: None,
            progress: None,
            census_every_ms: None,
            max_rss: None,
            hq: vec![],
            checks_done: 0,
            share: sc.share_docs.map(DocShare::new),
            pool: sc.share_docs.map(|_| StorePool::default()),
            provisioned: None,
            names: QueryNames::default(),
            holder_groups: BTreeMap::new(),
            adversarial: BTreeSet::new(),
            hostile_from: None,
            reconnects_due: BTreeSet::new(),
            forged: BTreeSet::new(),
            known: check::KnownAuthors::default(),
            #[cfg(feature = "mutants")]
            mutant,
            sc,
        };
        w.build_nodes();
        w.build_links();
        w.build_workload();
        w.build_faults();
        w.push(0, Ev::LinkMaint);
        w.push(1, Ev::TickAll);
        w.push(w.sc.check_every_ms, Ev::Check);
        let heal = w.sc.chaos_end_ms();
        w.push(heal, Ev::Heal);
        w
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at.max(self.now), self.seq), ev);
    }

    fn violate(&mut self, v: Violation) {
        let c = self.violation_counts.entry(v.name).or_default();
        *c += 1;
        if *c <= 5 {
            self.violations.push(v);
        }
    }

    // ----- construction -----------------------------------------------------

    fn build_nodes(&mut self) {
        let n = &self.sc.nodes;
        let mut spec: Vec<(Role, bool)> = vec![];
        spec.extend((0..n.hq).map(|_| (Role::Hq, true)));
        spec.extend((0..n.backup_hq).map(|_| (Role::Hq, false)));
        spec.extend((0..n.shelters).map(|_| (Role::Shelter, true)));
        spec.extend((0..n.clinics).map(|_| (Role::Clinic, true)));
        spec.extend((0..n.ambulances).map(|_| (Role::Ambulance, true)));
        spec.extend((0..n.facilities).map(|_| (Role::Facility, true)));
        let mut counters: BTreeMap<&str, usize> = BTreeMap::new();
        let mut skew_rng = sub_rng(self.seed, "skew");
        // One verifier for all: a node revoked for the whole run, whose
        // changes hostile nodes relay (`hostile`).
        let revoked = NodeId::new(REVOKED_NODE).expect("valid id");
        let verifier = Arc::new(crdt::testkit::testca::TestVerifier::default());
        verifier
            .revoked
            .write()
            .expect("fresh lock")
            .insert(revoked.clone());
        self.known.add(&revoked, Role::Shelter);
        self.known.revoked.insert(revoked);
        for (i, (role, primary)) in spec.into_iter().enumerate() {
            let c = counters.entry(role_prefix(role)).or_default();
            *c += 1;
            let id = NodeId::new(format!("{}-{}", role_prefix(role), c)).expect("valid id");
            let trust = crdt::testkit::testca::trust_with(&id, role, verifier.clone());
            let mut cfg = EngineConfig::new(id.clone(), role, trust);
            self.known.add(&id, role);
            cfg.mail_primary = primary;
            cfg.flood = self.sc.flood;
            #[cfg(feature = "mutants")]
            {
                cfg.mutant = self.mutant;
            }
            if let Some(c) = self.sc.cache_docs {
                cfg.cache_docs = c;
            }
            let skew_ms = if self.mix.skew && role != Role::Hq && chance(&mut skew_rng, 0.5) {
                let mag = if chance(&mut skew_rng, 0.2) {
                    range(&mut skew_rng, 0, 3 * 86_400_000)
                } else {
                    range(&mut skew_rng, 0, 10 * 60_000)
                } as i64;
                if chance(&mut skew_rng, 0.5) {
                    mag
                } else {
                    -mag
                }
            } else {
                0
            };
            if role == Role::Hq {
                self.hq.push(i);
            }
            let mut node = Node {
                id,
                role,
                cfg,
                engine: None,
                parked: Some(self.new_store()),
                skew_ms,
                join_at_ms: 0,
                epoch: 0,
                rng: sub_rng(self.seed, &format!("node-{i}")),
                crash_after_ack: false,
                crash_after_mail: false,
                backup: None,
                acked: BTreeMap::new(),
                reads: vec![],
            };
            let now = Self::node_now(&node, 0);
            let store = node.parked.take().expect("fresh");
            node.engine = Some(
                self.open(store, &node.cfg, now, IndexFrom::Store)
                    .expect("fresh store opens"),
            );
            self.nodes.push(node);
        }
        self.summary.nodes = self.nodes.len();
    }

    fn new_store(&self) -> SimStore {
        let mut s = SimStore::with_names(&self.names);
        s.mem.pool = self.pool.clone();
        s
    }

    /// Opens a node's engine on its store, sharing documents with the
    /// other nodes when the scenario says so.
    fn open(
        &self,
        store: SimStore,
        cfg: &EngineConfig,
        now: Now,
        index: IndexFrom,
    ) -> Result<Engine<SimStore>, crdt::engine::EngineError> {
        let mut e = Engine::open_indexed(store, cfg.clone(), now, index)?;
        if let Some(s) = &self.share {
            e.set_share(s.clone());
        }
        Ok(e)
    }

    fn idx(&self, role: Role) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].role == role)
            .collect()
    }

    fn node_now(n: &Node, t: u64) -> Now {
        let wall = (T0_WALL_MS as i64 + t as i64 + n.skew_ms).max(0) as u64;
        Now {
            wall_ms: wall,
            mono_ms: t,
            wall_trusted: n.skew_ms.abs() < 60_000,
        }
    }

    fn hash_input(&mut self, i: usize, input: &Input) {
        self.hasher.update(&self.now.to_le_bytes());
        self.hasher.update(&(i as u64).to_le_bytes());
        match input {
            Input::Frame { session, bytes } => {
                self.hasher.update(&session.to_le_bytes());
                self.hasher.update(bytes);
            }
            Input::Command { op_id, .. } => {
                self.hasher.update(b"cmd");
                self.hasher.update(op_id.as_bytes());
            }
            Input::Sent { session, bytes } => {
                self.hasher.update(b"sent");
                self.hasher.update(&session.to_le_bytes());
                self.hasher.update(&(*bytes as u64).to_le_bytes());
            }
            other => {
                self.hasher.update(format!("{other:?}").as_bytes());
            }
        }
    }

    /// Hands one input to node `i` and carries out its outputs.
    fn input(&mut self, i: usize, input: Input) -> Vec<Output> {
        if self.nodes[i].engine.is_none() {
            return vec![];
        }
        self.hash_input(i, &input);
        let now = Self::node_now(&self.nodes[i], self.now);
        let node = &mut self.nodes[i];
        let engine = node.engine.as_mut().expect("checked");
        let outs = engine.handle(input, now, &mut node.rng);
        for o in &outs {
            match o {
                Output::Send { session, bytes } => {
                    self.hasher.update(&session.to_le_bytes());
                    self.hasher.update(bytes);
                }
                Output::Reply { op_id, result } => {
                    self.hasher.update(op_id.as_bytes());
                    self.hasher.update(format!("{result:?}").as_bytes());
                }
                Output::SendMail(m) => {
                    self.hasher.update(m.message_id.as_bytes());
                }
                Output::Close { session, .. } => {
                    self.hasher.update(&session.to_le_bytes());
                }
                _ => {}
            }
        }
        let mut rest = vec![];
        for o in &outs {
            // Every simulated node is honest: a peer violation raised
            // between them is a bug in one of the two (or in the check).
            if let Output::Event(UiEvent::PeerViolation { node_id, reason }) = o {
                if self
                    .hostile_from
                    .is_some_and(|h| &self.nodes[h].id == node_id)
                {
                    self.count("hostile_flagged");
                    continue;
                }
                let v = check::v(
                    check::PEER_VIOLATION,
                    self.now,
                    format!("{} flagged {node_id}: {reason}", self.nodes[i].id),
                );
                self.violate(v);
            }
        }
        for o in outs {
            match o {
                Output::Send { session, bytes } => self.send(i, session, bytes),
                Output::Close { session, .. } => {
                    let (l, gen, _) = sid_parts(session);
                    if l < self.links.len() && self.links[l].gen == gen {
                        self.disconnect(l);
                    }
                }
                Output::SendMail(req) => self.send_mail(i, req),
                other => rest.push(other),
            }
        }
        rest
    }

    // ----- network ----------------------------------------------------------

    fn command(&mut self, i: usize, op_id: String, cmd: Command, resubmit: bool) {
        if self.nodes[i].engine.is_none() {
            return;
        }
        self.summary.commands += 1;
        let track = match &cmd {
            Command::CheckIn { person_ids, .. }
            | Command::CheckOut { person_ids, .. }
            | Command::Transfer { person_ids, .. } => person_ids
                .first()
                .and_then(|p| self.household_of.get(p))
                .and_then(|h| DocKey::new(Kind::Presence, h.clone()).ok()),
            _ => None,
        };
        let is_checkin = matches!(cmd, Command::CheckIn { .. });
        let is_transfer = matches!(cmd, Command::Transfer { .. });
        let adversarial = self.adversarial.contains(&op_id);
        let persons: Vec<String> = match &cmd {
            Command::CheckIn { person_ids, .. } => person_ids.clone(),
            _ => vec![],
        };
        let rest = self.input(
            i,
            Input::Command {
                op_id: op_id.clone(),
                operator: Operator("sim-operator".into()),
                cmd,
            },
        );
        let mut wrote = false;
        for o in &rest {
            if let Output::Reply { result, .. } = o {
                match result {
                    Ok(reply) => {
                        wrote = true;
                        if adversarial {
                            self.violate(check::v(
                                check::INDIVIDUAL_NUMBER_LEAK,
                                self.now,
                                format!(
                                    "{}: op {op_id} carrying an Individual Number was accepted",
                                    self.nodes[i].id
                                ),
                            ));
                        }
                        if is_transfer {
                            self.summary.transfers += 1;
                        }
                        if resubmit {
                            if let Some(first) = self.first_replies.get(&op_id) {
                                if let Some(v) = check::replay_reply(&op_id, first, reply, self.now)
                                {
                                    self.violate(v);
                                }
                            }
                        } else {
                            self.first_replies.insert(op_id.clone(), reply.clone());
                        }
                        match reply {
                            Reply::Presence { event_ids, .. } => {
                                if let Some(k) = &track {
                                    for e in event_ids {
                                        self.nodes[i].acked.insert(e.clone(), k.clone());
                                        self.summary.acked_writes += 1;
                                    }
                                }
                                if is_checkin {
                                    self.true_arrivals.extend(persons.iter().cloned());
                                }
                            }
                            Reply::Medical { audit_seq, .. } => {
                                self.nodes[i].reads.push(*audit_seq);
                                self.summary.acked_writes += 1;
                            }
                            _ => {}
                        }
                    }
                    Err(e) => {
                        self.summary.commands_failed += 1;
                        if adversarial && matches!(e, CommandError::Invalid(_)) {
                            self.summary.adversarial_refused += 1;
                        }
                    }
                }
            }
        }
        self.after_outputs(i, rest, Some(wrote));
    }

    fn after_outputs(&mut self, i: usize, _rest: Vec<Output>, acked: Option<bool>) {
        if acked == Some(true) && self.nodes[i].crash_after_ack && !self.healed {
            self.nodes[i].crash_after_ack = false;
            let down = range(&mut self.fault_rng, 1_000, 120_000);
            self.crash(i, down);
        }
    }

    // ----- faults -----------------------------------------------------------

    fn count(&mut self, what: &str) {
        *self.summary.faults_injected.entry(what.into()).or_default() += 1;
    }
}
