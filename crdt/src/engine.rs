//! The engine: one node's whole decision-making, driven by inputs.
//!
//! `Engine::handle(input, now, rng)` takes one [`Input`] and returns the
//! [`Output`]s the driver must carry out: replies (sent only after their
//! commit), frames for sessions, mail to send, UI events. It is a
//! dispatcher over the parts it owns, each in its own module and none
//! importing the engine:
//!
//! - [`Replica`](crate::replica): store, index, cache, identity, log end;
//!   loading, writing and recording documents.
//! - [`Sessions`](crate::sessions): the sync protocol with every peer,
//!   over the borrowed replica; reconciliation itself is pure functions in
//!   [`crate::reconcile`].
//! - [`Commands`](crate::commands) and [`Queries`](crate::queries):
//!   operator requests over the borrowed replica.
//! - [`Mail`](crate::mail): headquarters' family-mail state.
//!
//! What the engine itself decides is *when* things are committed and what
//! follows a commit. Every command's effects, its audit entries and its
//! recorded result are one transaction; [`Engine::handle_batch`] stages the
//! transactions of consecutive commands and makes them durable in one
//! store commit (group commit), releasing replies only after it. After a
//! commit ([`Replica::committed`](crate::replica::Replica::committed)) new
//! changes are gossiped to connected peers, headquarters refreshes its mail
//! state from changed outboxes, and changed presence documents are scanned
//! for arrivals and shelter activity.
//!
//! Module layering inside `crdt` (each imports only modules listed before
//! it; `tests/core/layers.rs` checks it): data and rules (`ids`, `text`,
//! `model`, `doc`, `derive`, `views`, `policy`, `wire`, `store`, `api`, …),
//! then `index`, `replica`, `reconcile`, then `sessions`, `commands`,
//! `mail`, then `queries`, then `engine`.

use crate::api::*;
use crate::commands::Commands;
use crate::doc::{Doc, Hash32};
use crate::ids::{DocKey, Kind, NodeId, Role};
use crate::mail::{Attempt, Mail, MailConfig};
use crate::model::{MailState, PresenceAction};
use crate::queries::Queries;
use crate::replica::{Replica, Txn};
use crate::sessions::Sessions;
pub use crate::sessions::SEND_WINDOW;
use crate::store::{Batch, Meta, Store, StoreError};
use crate::text::TextError;
use rand_core::RngCore;
use std::collections::{BTreeMap, BTreeSet};

pub use crate::cache::CacheSizes;
pub use crate::commands::{
    MAX_HOUSEHOLDS_PER_IMPORT, MAX_PERSONS_PER_COMMAND, MAX_RECORDS_PER_IMPORT,
};
pub use crate::index::{DocIndex, IndexFrom};
pub use crate::replica::EngineError;
pub use crate::sessions::SessionSizes;

/// Documents kept loaded.
const DEFAULT_CACHE_DOCS: usize = 2048;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub node_id: NodeId,
    pub role: Role,
    /// The shelter this node serves (shelter role); defaults to the node id.
    pub shelter_id: Option<String>,
    pub cache_docs: usize,
    /// Headquarters only: the primary plans family mail at once; a backup
    /// waits `mail_takeover_ms` after it first sees an arrival, so the
    /// primary's claim usually reaches it first (D-7).
    pub mail_primary: bool,
    pub mail_lease_ms: u64,
    pub mail_takeover_ms: u64,
    /// Family mail text per language (see [`crate::mailtext`]).
    pub mail_templates: crate::mailtext::MailTemplates,
    /// This node's signing key and the verifier of authors' credentials
    /// (see [`crate::signing`]).
    pub trust: crate::signing::Trust,
    /// Push every new change to every connected peer, as protocol 2 did,
    /// instead of along the tree (never prune a link): for comparisons in
    /// the simulator.
    pub flood: bool,
    /// How many change hashes a session remembers as carried, per
    /// generation (it keeps one to two generations; see
    /// `sessions::Recent`): the bound on each session's memory of what it
    /// sent and received. Default 16,384 (at most about 1.3 MiB a session).
    pub session_memory: usize,
    /// Bytes of a session's frames the transport may hold unwritten
    /// before catch-up waits and new changes are announced instead of
    /// pushed (see [`SEND_WINDOW`], the default, and `Input::Sent`).
    pub send_window: usize,
    /// Threads a bulk import builds its new documents on (pure work, each
    /// document from its own record; the engine records them in order, so
    /// the outcome is the same for any count). Default 1: the engine's own
    /// thread; a node sets its core count.
    pub build_threads: usize,
    /// A planted bug this engine carries (simulator only; see
    /// [`crate::mutants`]).
    #[cfg(feature = "mutants")]
    pub mutant: Option<crate::mutants::Mutant>,
}

impl EngineConfig {
    pub fn new(node_id: NodeId, role: Role, trust: crate::signing::Trust) -> Self {
        EngineConfig {
            trust,
            shelter_id: (role == Role::Shelter).then(|| node_id.as_str().to_string()),
            node_id,
            role,
            cache_docs: DEFAULT_CACHE_DOCS,
            mail_primary: true,
            mail_lease_ms: 5 * 60_000,
            mail_takeover_ms: 10 * 60_000,
            mail_templates: Default::default(),
            flood: false,
            session_memory: crate::sessions::RECENT_GENERATION,
            send_window: SEND_WINDOW,
            build_threads: 1,
            #[cfg(feature = "mutants")]
            mutant: None,
        }
    }
}

#[cfg(any(test, feature = "testkit"))]
impl EngineConfig {
    /// A configuration signing with a test credential
    /// ([`crate::testkit::testca`]): tests, benches and the simulator.
    pub fn for_tests(node_id: NodeId, role: Role) -> Self {
        let trust = crate::testkit::testca::trust(&node_id, role);
        Self::new(node_id, role, trust)
    }
}

/// Counters the simulator and benchmarks read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub frames_sent: u64,
    pub bytes_sent: u64,
    pub changes_applied: u64,
    /// Received changes this node already held (sent by several peers).
    pub changes_known: u64,
    pub changes_rejected: u64,
    pub violations: u64,
    /// Received changes that panicked Automerge and were quarantined.
    pub panics: u64,
    /// Received changes that failed signature or author verification
    /// (quarantined, never applied or relayed).
    pub changes_unverified: u64,
    /// Changes held unsigned (stored before changes were signed) that were
    /// not relayed.
    pub unsigned_withheld: u64,
    /// Author credentials relayed to this node that it refused.
    pub credentials_refused: u64,
    /// Reconciliation ranges answered for peers, and index entries scanned
    /// to answer them.
    pub reconcile_ranges: u64,
    pub reconcile_scanned: u64,
    /// Sessions refused because their peer was backed off after a
    /// violation.
    pub backed_off_refusals: u64,
    /// Sessions refused because the peer already had two open with us.
    pub excess_sessions_refused: u64,
    pub duplicate_mail_risk: u64,
    pub commits: u64,
    /// The live tree: change hashes announced instead of pushed, documents
    /// asked for after a missed announcement (`Graft`), kinds pruned.
    pub announced: u64,
    pub grafts: u64,
    pub prunes: u64,
    /// Documents peers grafted that this node does not hold (ignored).
    pub grafts_unknown: u64,
    /// Whole copies of damaged documents asked of peers, and damaged
    /// documents rebuilt from a peer's copy.
    pub repair_requests: u64,
    pub docs_repaired: u64,
    /// Catch-up passes that waited because a session's send window was
    /// full (its transport had not written what it was given).
    pub window_waits: u64,
}

/// How many entries each part of an engine's in-memory state holds (open
/// sessions' sets summed over the sessions). Counts, not bytes: for
/// finding what grows with time or with sessions in long runs (the
/// simulator's `--census-hours`); nothing decides anything by them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    /// The sync protocol's state.
    pub sessions: SessionSizes,
    /// Verified author credentials.
    pub directory: usize,
    /// Index entries (one per document held).
    pub index: usize,
    /// Materialised documents.
    pub cache: CacheSizes,
    /// Documents written once by a bulk import, not durable yet.
    pub unsettled: usize,
    pub shelter_seen: usize,
    pub mail_states: usize,
}

pub struct Engine<S: Store> {
    cfg: EngineConfig,
    replica: Replica<S>,
    sessions: Sessions,
    /// Headquarters: family mail (empty elsewhere).
    mail: Mail,
    /// Wall ms of the last presence change attributed to each shelter.
    shelter_seen: BTreeMap<String, u64>,
    /// Break-glass grants and per-operator medical read counts.
    access: crate::access::MedicalAccess,
    commits: u64,
    /// Transactions staged for one group commit (see `handle_batch`).
    group: Option<Group>,
}

struct Group {
    txns: Vec<Txn>,
    /// Results of the group's commands by op id, for retries within it.
    ops: BTreeMap<String, String>,
    /// Replies held until the group is durable.
    replies: Vec<Output>,
    meta_before: Meta,
}

impl<S: Store> Engine<S> {
    /// Opens the node's state: checks the store belongs to this node, bumps
    /// and persists the incarnation (so the actor id is new), loads the
    /// document index.
    pub fn open(store: S, cfg: EngineConfig, now: Now) -> Result<Self, EngineError> {
        Self::open_indexed(store, cfg, now, IndexFrom::Store)
    }

    /// This engine's document index, to open engines on copies of its
    /// store without building the index again (see [`Engine::open_indexed`]).
    /// Cheap: the copies share memory until they change.
    pub fn doc_index(&self) -> DocIndex {
        DocIndex(self.replica.index.map.clone())
    }

    /// [`Engine::open`] with the index of an engine on an identical store
    /// (the simulator opens hundreds of nodes on copies of one provisioned
    /// store), or built from the store over such an index (a restarted
    /// node's), see [`IndexFrom`].
    pub fn open_indexed(
        store: S,
        cfg: EngineConfig,
        now: Now,
        index: IndexFrom,
    ) -> Result<Self, EngineError> {
        #[cfg(feature = "mutants")]
        let _mutant = crate::mutants::enter(cfg.mutant);
        let mut replica = Replica::open(
            store,
            &cfg.node_id,
            cfg.role,
            cfg.cache_docs,
            now,
            index,
            cfg.trust.clone(),
        )?;
        replica.build_threads = cfg.build_threads;
        let mail = Mail::new(MailConfig {
            primary: cfg.mail_primary,
            lease_ms: cfg.mail_lease_ms,
            takeover_ms: cfg.mail_takeover_ms,
            templates: cfg.mail_templates.clone(),
        });
        let sessions = Sessions::new(cfg.flood, cfg.session_memory, cfg.send_window);
        let mut e = Engine {
            cfg,
            replica,
            sessions,
            mail,
            shelter_seen: BTreeMap::new(),
            access: Default::default(),
            commits: 0,
            group: None,
        };
        if e.cfg.role == Role::Hq {
            let txn = e.mail.recover(&mut e.replica, now);
            let mut sink = Vec::new();
            e.commit(txn, now, &mut sink)?;
        }
        Ok(e)
    }

    /// Shares materialised documents with the other engines of this process
    /// (see [`crate::share`]); the simulator sets one for all its nodes.
    #[cfg(any(test, feature = "share"))]
    pub fn set_share(&mut self, share: crate::share::DocShare) {
        self.replica.share = Some(share);
    }

    /// The store, for fault injection by the simulator and for tests.
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.replica.store
    }
    pub fn store(&self) -> &S {
        &self.replica.store
    }
    pub fn into_store(self) -> S {
        self.replica.store
    }
    pub fn stats(&self) -> Stats {
        let s = &self.sessions.stats;
        Stats {
            frames_sent: s.frames_sent,
            bytes_sent: s.bytes_sent,
            changes_applied: s.changes_applied,
            changes_known: s.changes_known,
            changes_rejected: s.changes_rejected,
            violations: s.violations,
            panics: s.panics,
            changes_unverified: s.changes_unverified,
            unsigned_withheld: s.unsigned_withheld,
            credentials_refused: s.credentials_refused,
            reconcile_ranges: s.reconcile_ranges,
            reconcile_scanned: s.reconcile_scanned,
            backed_off_refusals: s.backed_off_refusals,
            excess_sessions_refused: s.excess_sessions_refused,
            duplicate_mail_risk: self.mail.duplicate_risk,
            commits: self.commits,
            announced: s.announced,
            grafts: s.grafts,
            prunes: s.prunes,
            grafts_unknown: s.grafts_unknown,
            repair_requests: s.repair_requests,
            docs_repaired: s.docs_repaired,
            window_waits: s.window_waits,
        }
    }
    /// How many entries each part of the in-memory state holds now.
    pub fn footprint(&self) -> Footprint {
        Footprint {
            sessions: self.sessions.sizes(),
            directory: self.replica.directory.len(),
            index: self.replica.index.len(),
            cache: self.replica.cache_sizes(),
            unsettled: self.replica.unsettled_len(),
            shelter_seen: self.shelter_seen.len(),
            mail_states: self.mail.states().len(),
        }
    }
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }
    pub fn incarnation(&self) -> u32 {
        self.replica.meta.incarnation
    }
    pub fn actor(&self) -> crate::actor::Actor {
        self.replica.actor
    }
    /// Every document this node holds, with its heads.
    pub fn heads(&self) -> impl Iterator<Item = (&DocKey, &[Hash32])> {
        self.replica
            .index
            .map
            .iter()
            .map(|(k, e)| (k, e.at.heads.as_slice()))
    }
    /// A digest of every document of `kind` this node holds with its
    /// heads: equal digests mean equal document sets at equal heads (up to
    /// a 128-bit collision). Kept up to date as documents change.
    pub fn kind_fingerprint(&self, kind: Kind) -> u128 {
        self.replica.index.kind_fingerprint(kind)
    }

    /// The heads this node holds of a document.
    pub fn doc_heads(&self, key: &DocKey) -> Option<&[Hash32]> {
        self.replica.index.get(key).map(|e| e.at.heads.as_slice())
    }

    /// Whether a session is open (frames on it are processed).
    pub fn has_session(&self, session: SessionId) -> bool {
        self.sessions.contains(session)
    }
    /// Whether the index knows `key` to have no changes waiting for their
    /// dependencies (only such documents are shared with other engines).
    pub fn is_whole(&self, key: &DocKey) -> Option<bool> {
        self.replica.index.get(key).map(|e| e.whole)
    }
    pub fn doc_count(&self) -> usize {
        self.replica.index.len()
    }
    pub fn mail_states(&self) -> &BTreeMap<(String, String), MailState> {
        self.mail.states()
    }

    /// Loads a document (from cache or store) for read-only inspection.
    pub fn doc(&mut self, key: &DocKey) -> Result<Option<&Doc>, StoreError> {
        self.replica.load(key)
    }

    /// Message-ID for an (arrival, contact) pair: the same on every HQ node
    /// and every retry.
    pub fn message_id(person: &str, contact: &str) -> String {
        crate::mail::message_id(person, contact)
    }

    /// Handles one input: hands it to the part it concerns, then lets
    /// sessions send what they have queued.
    pub fn handle(&mut self, input: Input, now: Now, rng: &mut dyn RngCore) -> Vec<Output> {
        let mut out = Vec::new();
        #[cfg(feature = "mutants")]
        let _mutant = crate::mutants::enter(self.cfg.mutant);
        #[cfg(feature = "mutants")]
        self.replica.persist_deferred();
        match input {
            Input::Command {
                op_id,
                operator,
                cmd,
            } => {
                let result = self.command(&op_id, &operator, cmd, now, rng, &mut out);
                let reply = Output::Reply { op_id, result };
                match &mut self.group {
                    Some(g) => g.replies.push(reply),
                    None => out.push(reply),
                }
            }
            Input::Query { query } => out.push(Output::QueryReply(self.query(query))),
            Input::Connected {
                session,
                node,
                role,
                initiator,
            } => self.sessions.connected(
                &self.replica,
                session,
                node,
                role,
                initiator,
                now,
                &mut out,
            ),
            Input::Frame { session, bytes } => {
                let received =
                    self.sessions
                        .frame(&mut self.replica, session, &bytes, now, &mut out);
                if let Some(txn) = received {
                    if let Err(e) = self.commit(txn, now, &mut out) {
                        self.sessions
                            .storage_failed(session, e.to_string(), &mut out);
                    }
                }
            }
            Input::Disconnected { session } => self.sessions.disconnected(session),
            Input::Sent { session, bytes } => self.sessions.sent(session, bytes),
            Input::MailOutcome {
                message_id,
                outcome,
            } => {
                if let Some(txn) = self
                    .mail
                    .outcome(&mut self.replica, &message_id, outcome, now)
                {
                    let _ = self.commit(txn, now, &mut out);
                }
            }
            Input::Tick => {
                if self.cfg.role == Role::Hq {
                    let batch = self.mail.next_scan();
                    self.note_presence(&batch, now);
                    self.plan_mail(now, &mut out);
                }
                self.sessions.tick_cursors(self.replica.log_end, &mut out);
                self.sessions.request_repairs(&self.replica, now, &mut out);
                let txn = self.sessions.tick_tree(&mut self.replica, now, &mut out);
                // A failed commit only leaves those cursors behind: the
                // next session resumes from an earlier position.
                let _ = self.commit(txn, now, &mut out);
            }
        }
        self.sessions.drain(&mut self.replica, &mut out);
        out
    }

    /// Handles several inputs with one durable commit for all consecutive
    /// commands among them (group commit). Every reply is released only
    /// after the commit that holds its writes; if that commit fails, every
    /// command of the group that had succeeded is answered with the storage
    /// error instead and nothing of it remains in memory.
    ///
    /// Within a group, a command sees the documents written by earlier
    /// commands of the group, but not yet their query rows (a person
    /// registered in the group cannot be checked in by the same group).
    pub fn handle_batch(
        &mut self,
        inputs: Vec<Input>,
        now: Now,
        rng: &mut dyn RngCore,
    ) -> Vec<Output> {
        #[cfg(feature = "mutants")]
        let _mutant = crate::mutants::enter(self.cfg.mutant);
        let mut out = Vec::new();
        for input in inputs {
            if matches!(input, Input::Command { .. }) {
                if self.group.is_none() {
                    self.group = Some(Group {
                        txns: Vec::new(),
                        ops: BTreeMap::new(),
                        replies: Vec::new(),
                        meta_before: self.replica.meta.clone(),
                    });
                }
                out.extend(self.handle(input, now, rng));
            } else {
                self.flush_group(now, &mut out);
                self.group = None;
                out.extend(self.handle(input, now, rng));
            }
        }
        self.flush_group(now, &mut out);
        self.group = None;
        out
    }

    /// Commits the staged group and releases its replies.
    fn flush_group(&mut self, now: Now, out: &mut Vec<Output>) {
        let Some(g) = &mut self.group else { return };
        let txns = std::mem::take(&mut g.txns);
        let replies = std::mem::take(&mut g.replies);
        g.ops.clear();
        let mut merged = Batch::default();
        let mut in_merged = BTreeSet::new();
        for t in &txns {
            let b = &t.batch;
            if b.meta.is_some() {
                merged.meta = b.meta.clone();
            }
            merged.changes.extend(b.changes.iter().cloned());
            for d in &b.docs {
                // As in `record`: the newest state of a document wins, so an
                // earlier snapshot never claims a later change of the group.
                if !in_merged.insert(d.key.clone()) {
                    merged.docs.retain(|x| x.key != d.key);
                }
                merged.docs.push(d.clone());
            }
            merged.projections.extend(b.projections.iter().cloned());
            merged.ops.extend(b.ops.iter().cloned());
            merged.peer_heads.extend(b.peer_heads.iter().cloned());
            merged.quarantine.extend(b.quarantine.iter().cloned());
        }
        let result = if merged.is_empty() {
            Ok(())
        } else {
            self.replica.store.commit(&merged)
        };
        match result {
            Ok(()) => {
                let meta_now = self.replica.meta.clone();
                if let Some(g) = &mut self.group {
                    g.meta_before = meta_now;
                }
                for t in txns {
                    self.after_commit(t, now, out);
                }
                out.extend(replies);
            }
            Err(e) => {
                if let Some(g) = &self.group {
                    self.replica.meta = g.meta_before.clone();
                }
                for t in &txns {
                    self.replica.forget(t);
                }
                out.extend(replies.into_iter().map(|r| match r {
                    Output::Reply {
                        op_id,
                        result: Ok(_),
                    } => Output::Reply {
                        op_id,
                        result: Err(CommandError::Storage(e.clone())),
                    },
                    other => other,
                }));
            }
        }
    }

    /// Commits a transaction (or stages it in the current group); on
    /// success applies its in-memory effects, on failure forgets every
    /// touched document so memory matches the store again.
    fn commit(&mut self, mut txn: Txn, now: Now, out: &mut Vec<Output>) -> Result<(), StoreError> {
        if txn.batch.is_empty() {
            return Ok(());
        }
        if let Some(m) = &txn.meta {
            txn.batch.meta = Some(m.clone());
        }
        if let Some(group) = &mut self.group {
            // Group commit: stage now, make durable in `handle_batch`
            // before any reply of the group is released.
            if let Some(m) = txn.meta.take() {
                self.replica.meta = m;
            }
            group.txns.push(txn);
            return Ok(());
        }
        if let Err(e) = self.replica.persist(&txn.batch) {
            self.replica.forget(&txn);
            return Err(e);
        }
        self.after_commit(txn, now, out);
        Ok(())
    }

    /// What follows a durable transaction: the replica's own effects
    /// (index, events, log end), gossip to connected peers, mail state,
    /// arrivals and shelter activity.
    fn after_commit(&mut self, txn: Txn, now: Now, out: &mut Vec<Output>) {
        self.commits += 1;
        let done = self.replica.committed(txn, out);
        self.sessions.gossip(
            done.gossip,
            self.replica.log_end,
            &self.replica.directory,
            out,
        );
        if self.cfg.role == Role::Hq {
            for k in done.outbox {
                self.mail.refresh(&mut self.replica, &k);
            }
        }
        self.note_presence(&done.presence, now);
    }

    /// Notes, from changed presence documents, when each shelter was last
    /// heard of (the staleness headquarters shows) and, on headquarters,
    /// which persons arrived (for family mail).
    fn note_presence(&mut self, keys: &[DocKey], now: Now) {
        for k in keys {
            let Some(evs) = self.replica.presence_events(k) else {
                continue;
            };
            for e in evs.iter() {
                let at = e.wall_ms.min(now.wall_ms);
                match self.shelter_seen.get_mut(&e.shelter_id) {
                    Some(seen) => *seen = (*seen).max(at),
                    None => {
                        self.shelter_seen.insert(e.shelter_id.clone(), at);
                    }
                }
                if e.action == PresenceAction::CheckIn && self.cfg.role == Role::Hq {
                    self.mail.arrived(&e.person_id, now);
                }
            }
        }
    }

    /// Headquarters, on a tick: plan mail for new arrivals, then claim and
    /// send what is due, each claim committed before its send.
    fn plan_mail(&mut self, now: Now, out: &mut Vec<Output>) {
        let txn = self.mail.plan(&mut self.replica, now);
        let _ = self.commit(txn, now, out);
        // Due after the plan is committed: new arrivals are due at once.
        for (pair, state) in self.mail.due(&self.replica, now) {
            match self.mail.attempt(&mut self.replica, pair, state, now) {
                Attempt::Cancel(txn) => {
                    let _ = self.commit(txn, now, out);
                }
                Attempt::Send(txn, req) => {
                    if self.commit(txn, now, out).is_ok() {
                        out.push(Output::SendMail(req));
                    }
                }
                Attempt::Skip => {}
            }
        }
    }

    fn commands(&mut self) -> Commands<'_, S> {
        Commands {
            r: &mut self.replica,
            shelter_id: &self.cfg.shelter_id,
            access: &mut self.access,
            known_persons: BTreeSet::new(),
        }
    }

    /// One command: idempotent by op id (a retry gets the recorded result,
    /// A-3), run, recorded and committed (or staged in the group).
    fn command(
        &mut self,
        op_id: &str,
        operator: &Operator,
        cmd: Command,
        now: Now,
        rng: &mut dyn RngCore,
        out: &mut Vec<Output>,
    ) -> Result<Reply, CommandError> {
        // Before anything can answer with (or log) a value from it.
        crate::api::guard_individual_numbers(&(op_id, &operator.0, &cmd))?;
        crate::ids::check_id_str(op_id).map_err(|r| {
            CommandError::Invalid(TextError::Invalid {
                field: "op_id",
                reason: r.into(),
            })
        })?;
        crate::text::check_text("operator", &operator.0, 100, true)?;
        let staged = self.group.as_ref().and_then(|g| g.ops.get(op_id).cloned());
        if let Some(prev) = staged.or(self.replica.store.op_result(op_id)?) {
            return serde_json::from_str(&prev)
                .map_err(|e| CommandError::Rejected(format!("recorded result unreadable: {e}")));
        }
        let mut txn = Txn::default();
        // Audited reads: never recorded as op results (each read is its
        // own audit entry), and a refusal is audited too (E-4).
        let read_denied = match &cmd {
            Command::ReadMedical { .. } => Some(("medical_read_denied", "medical")),
            Command::CheckEligibility { .. } => Some(("eligibility_check_denied", "eligibility")),
            _ => None,
        };
        // Medical reads and break-glass grants are audited in detail when
        // refused or not found: the record, the reason code, why.
        let medical = match &cmd {
            Command::ReadMedical {
                person_id, reason, ..
            }
            | Command::BreakGlass {
                person_id, reason, ..
            } => Some((person_id.clone(), reason.clone())),
            _ => None,
        };
        let is_read = read_denied.is_some() || medical.is_some();
        let action = cmd.name();
        let reply = match self.commands().run(&mut txn, operator, cmd, now, rng) {
            Ok(r) => r,
            Err(e) => {
                if !txn.touched.is_empty()
                    && self.group.as_ref().is_some_and(|g| !g.txns.is_empty())
                {
                    // Staged work of the group may share these documents:
                    // make it durable before forgetting ours.
                    self.flush_group(now, out);
                }
                self.replica.forget(&txn);
                // A refused audited read is still audited (E-4).
                if let (Some((denied, record)), CommandError::Forbidden { .. }, None) =
                    (read_denied, &e, &medical)
                {
                    let mut audit_txn = Txn::default();
                    if self
                        .commands()
                        .audit(&mut audit_txn, operator, denied, record, "", false, now)
                        .is_ok()
                    {
                        let _ = self.commit(audit_txn, now, out);
                    }
                }
                // A refused or not-found medical read is still audited
                // (E-4): the record when its id is valid, the reason code
                // when it is one of the list, and why it was refused.
                if let (Some((person, reason)), false) =
                    (&medical, matches!(e, CommandError::Storage(_)))
                {
                    let record = match DocKey::new(Kind::Medical, person) {
                        Ok(k) => k.to_string(),
                        Err(_) => "medical".to_string(),
                    };
                    let reason = crate::access::AccessReason::parse(reason)
                        .map(|r| r.code())
                        .unwrap_or("-");
                    let why = match &e {
                        CommandError::Rejected(m) => m
                            .split_once(':')
                            .map(|(c, _)| c)
                            .unwrap_or("rejected")
                            .to_string(),
                        other => other.code().to_string(),
                    };
                    let outcome = if matches!(e, CommandError::NotFound { .. }) {
                        "not_found"
                    } else {
                        "denied"
                    };
                    let mut audit_txn = Txn::default();
                    if self
                        .commands()
                        .audit(
                            &mut audit_txn,
                            operator,
                            &format!("{action}_{outcome}"),
                            &record,
                            &format!("{reason} ({why})"),
                            false,
                            now,
                        )
                        .is_ok()
                    {
                        let _ = self.commit(audit_txn, now, out);
                    }
                }
                return Err(e);
            }
        };
        if !is_read {
            let recorded = serde_json::to_string(&reply).expect("replies serialize");
            if let Some(g) = &mut self.group {
                g.ops.insert(op_id.to_string(), recorded.clone());
            }
            txn.batch.ops.push((op_id.to_string(), recorded));
        }
        self.commit(txn, now, out)?;
        Ok(reply)
    }

    /// Wall ms of the last presence change seen per shelter (the
    /// staleness headquarters shows; see [`crate::queries::from_projections`]).
    pub fn shelter_seen(&self) -> &BTreeMap<String, u64> {
        &self.shelter_seen
    }

    fn query(&mut self, q: Query) -> Result<QueryReply, CommandError> {
        crate::api::guard_individual_numbers(&q)?;
        Queries {
            r: &mut self.replica,
            sessions: &self.sessions,
            mail: &self.mail,
            shelter_seen: &self.shelter_seen,
            shelter_id: &self.cfg.shelter_id,
        }
        .run(q)
    }
}
