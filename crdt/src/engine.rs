//! The engine: one node's whole decision-making, driven by inputs.
//!
//! `Engine::handle(input, now, rng)` takes one [`Input`] and returns the
//! [`Output`]s the driver must carry out: replies (sent only after their
//! commit), frames for sessions, mail to send, UI events. Storage goes
//! through the synchronous [`Store`]; every command's effects, its audit
//! entries and its recorded result are one [`Batch`], committed before the
//! reply is produced.
//!
//! Documents are loaded on demand into a bounded cache; an index of every
//! document's heads stays in memory for range reconciliation. Sessions
//! follow [`crate::wire`]: `Hello`, then range-based set reconciliation over
//! the documents both roles may hold, then live push of new changes to every
//! connected peer that may hold them, deduplicated by change hash.

use crate::actor::Actor;
use crate::api::*;
use crate::cache::DocCache;
use crate::derive::{self, EVENT_PREFIX, HOUSEHOLD_FIELD, PERSON_FIELD, SHELTER_FIELD};
use crate::doc::{encode, Doc, DocError, Hash32};
use crate::hlc::HlcClock;
use crate::ids::{DocKey, Kind, NodeId, Role};
use crate::model::*;
use crate::policy;
use crate::session::Session;
use crate::share::{Applied, DocShare};
use crate::store::{upsert, Batch, ChangeRecord, Cursor, DocState, Meta, Store, StoreError};
use crate::text::{check_text, search_key, TextError};
use crate::views;
use crate::wire::{DocChanges, Frame};
use automerge::Change;
use imbl::OrdMap;
use rand_core::RngCore;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Documents kept loaded.
const DEFAULT_CACHE_DOCS: usize = 2048;
/// A compacted snapshot is stored after this many logged changes.
const SNAPSHOT_EVERY: u32 = 32;
pub const MAX_PERSONS_PER_COMMAND: usize = 200;
pub const MAX_HOUSEHOLDS_PER_IMPORT: usize = 20_000;
/// Records per [`Command::Import`] batch.
pub const MAX_RECORDS_PER_IMPORT: usize = 20_000;

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
}

impl EngineConfig {
    pub fn new(node_id: NodeId, role: Role) -> Self {
        EngineConfig {
            shelter_id: (role == Role::Shelter).then(|| node_id.as_str().to_string()),
            node_id,
            role,
            cache_docs: DEFAULT_CACHE_DOCS,
            mail_primary: true,
            mail_lease_ms: 5 * 60_000,
            mail_takeover_ms: 10 * 60_000,
            mail_templates: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "this database belongs to node {found} ({found_role}), not {expected} ({expected_role})"
    )]
    WrongNode {
        found: NodeId,
        found_role: Role,
        expected: NodeId,
        expected_role: Role,
    },
}

/// An engine's index of the documents in its store (heads, fingerprints).
#[derive(Clone)]
pub struct DocIndex(OrdMap<DocKey, IndexEntry>);

#[derive(Clone, Debug, Default)]
pub(crate) struct IndexEntry {
    pub(crate) heads: Vec<Hash32>,
    pub(crate) fp: u128,
    /// Changes logged since the last snapshot.
    tail: u32,
    /// Known to hold no changes waiting for dependencies, so the document
    /// is exactly what its heads name (only then is it looked up in a
    /// share). False until this engine has seen it loaded or changed.
    pub(crate) whole: bool,
}

/// A mail state that still needs a send or a decision.
fn is_open(s: &MailState) -> bool {
    matches!(
        s.status,
        MailStatus::Pending | MailStatus::Indeterminate | MailStatus::Sending
    )
}

fn item_fp(key: &DocKey, heads: &[Hash32]) -> u128 {
    let mut h = blake3::Hasher::new();
    h.update(&key.to_bytes());
    h.update(&crate::doc::heads_digest(heads));
    u128::from_le_bytes(h.finalize().as_bytes()[..16].try_into().expect("16 bytes"))
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
    pub duplicate_mail_risk: u64,
    pub commits: u64,
}

/// One command's or frame's pending writes, committed at once.
#[derive(Default)]
pub(crate) struct Txn {
    pub(crate) batch: Batch,
    pub(crate) touched: BTreeSet<DocKey>,
    /// New heads of each changed document, and whether it is whole (no
    /// changes waiting for their dependencies).
    heads: BTreeMap<DocKey, (Vec<Hash32>, bool)>,
    /// New changes to gossip, with the session they came from.
    gossip: Vec<(DocKey, Vec<u8>, Hash32, Option<SessionId>)>,
    pub(crate) meta: Option<Meta>,
}

pub struct Engine<S: Store> {
    pub(crate) store: S,
    pub(crate) cfg: EngineConfig,
    pub(crate) meta: Meta,
    pub(crate) actor: Actor,
    pub(crate) hlc: HlcClock,
    pub(crate) index: OrdMap<DocKey, IndexEntry>,
    /// Per kind, the XOR of the index fingerprints of its documents.
    kind_fp: [u128; Kind::ALL.len()],
    cache: DocCache,
    /// Documents materialised by other engines in this process (simulator).
    pub(crate) share: Option<DocShare>,
    pub(crate) sessions: BTreeMap<SessionId, Session>,
    pub(crate) peers: BTreeMap<NodeId, (Role, Option<u64>)>,
    /// The newest entry of our change log.
    pub(crate) log_end: Option<Cursor>,
    /// Headquarters: family mail state per (person, contact).
    mail: BTreeMap<(String, String), MailState>,
    /// Keys of `mail` still to send or resolve (see [`is_open`]).
    mail_open: BTreeSet<(String, String)>,
    /// Headquarters backup: when each arrival was first seen here.
    arrivals_seen: BTreeMap<String, u64>,
    /// Headquarters: presence documents still to scan for arrivals after a
    /// restart (arrivals seen before a crash are not lost).
    arrival_scan: Vec<DocKey>,
    /// Shelters: wall ms of the last presence change attributed to each.
    shelter_seen: BTreeMap<String, u64>,
    pub(crate) stats: Stats,
    /// Transactions staged for one group commit (see `handle_batch`).
    group: Option<Group>,
    #[cfg(feature = "mutants")]
    deferred: Option<Batch>,
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
        Self::open_indexed(store, cfg, now, None)
    }

    /// This engine's document index, to open engines on copies of its
    /// store without building the index again (see [`Engine::open_indexed`]).
    /// Cheap: the copies share memory until they change.
    pub fn doc_index(&self) -> DocIndex {
        DocIndex(self.index.clone())
    }

    /// [`Engine::open`] with the index of an engine on an identical store
    /// (the simulator opens hundreds of nodes on copies of one provisioned
    /// store). `None` builds it from the store.
    pub fn open_indexed(
        mut store: S,
        cfg: EngineConfig,
        now: Now,
        index: Option<DocIndex>,
    ) -> Result<Self, EngineError> {
        let meta = match store.load_meta()? {
            Some(m) => {
                if m.node_id != cfg.node_id || m.role != cfg.role {
                    return Err(EngineError::WrongNode {
                        found: m.node_id,
                        found_role: m.role,
                        expected: cfg.node_id,
                        expected_role: cfg.role,
                    });
                }
                #[allow(unused_mut)]
                let mut bump = 1;
                #[cfg(feature = "mutants")]
                if crate::mutants::active(crate::mutants::Mutant::ReuseActor) {
                    bump = 0;
                }
                Meta {
                    incarnation: m.incarnation + bump,
                    ..m
                }
            }
            None => Meta {
                node_id: cfg.node_id.clone(),
                role: cfg.role,
                incarnation: 1,
                hlc: Default::default(),
                audit_seq: 0,
                audit_head: String::new(),
            },
        };
        let mut hlc = HlcClock::new(meta.hlc);
        let meta = Meta {
            hlc: hlc.tick(now.wall_ms),
            ..meta
        };
        store.commit(&Batch {
            meta: Some(meta.clone()),
            ..Default::default()
        })?;
        let index = match index {
            Some(DocIndex(i)) => i,
            None => store
                .doc_index()?
                .into_iter()
                .map(|(key, heads)| {
                    let fp = item_fp(&key, &heads);
                    (
                        key,
                        IndexEntry {
                            heads,
                            fp,
                            tail: 0,
                            whole: false,
                        },
                    )
                })
                .collect(),
        };
        let mut kind_fp = [0u128; Kind::ALL.len()];
        for (k, e) in index.iter() {
            kind_fp[k.kind.code() as usize] ^= e.fp;
        }
        let actor = Actor::new(cfg.role, &cfg.node_id, meta.incarnation);
        let log_end = store.log_end()?;
        let cache_docs = cfg.cache_docs.max(16);
        let mut e = Engine {
            store,
            cfg,
            meta,
            actor,
            hlc,
            index,
            kind_fp,
            cache: DocCache::new(cache_docs),
            share: None,
            sessions: BTreeMap::new(),
            peers: BTreeMap::new(),
            mail: BTreeMap::new(),
            mail_open: BTreeSet::new(),
            arrivals_seen: BTreeMap::new(),
            shelter_seen: BTreeMap::new(),
            stats: Stats::default(),
            log_end,
            arrival_scan: Vec::new(),
            group: None,
            #[cfg(feature = "mutants")]
            deferred: None,
        };
        if e.cfg.role == Role::Hq {
            e.arrival_scan = e
                .index
                .keys()
                .filter(|k| k.kind == Kind::Presence)
                .cloned()
                .collect();
            e.recover_mail(now)?;
        }
        Ok(e)
    }

    /// Shares materialised documents with the other engines of this process
    /// (see [`crate::share`]); the simulator sets one for all its nodes.
    pub fn set_share(&mut self, share: DocShare) {
        self.share = Some(share);
    }

    /// The store, for fault injection by the simulator and for tests.
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }
    pub fn store(&self) -> &S {
        &self.store
    }
    pub fn into_store(self) -> S {
        self.store
    }
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }
    pub fn incarnation(&self) -> u32 {
        self.meta.incarnation
    }
    pub fn actor(&self) -> Actor {
        self.actor
    }
    /// Every document this node holds, with its heads.
    pub fn heads(&self) -> impl Iterator<Item = (&DocKey, &[Hash32])> {
        self.index.iter().map(|(k, e)| (k, e.heads.as_slice()))
    }
    /// A digest of every document of `kind` this node holds with its
    /// heads: equal digests mean equal document sets at equal heads (up to
    /// a 128-bit collision). Kept up to date as documents change.
    pub fn kind_fingerprint(&self, kind: Kind) -> u128 {
        self.kind_fp[kind.code() as usize]
    }

    /// The heads this node holds of a document.
    pub fn doc_heads(&self, key: &DocKey) -> Option<&[Hash32]> {
        self.index.get(key).map(|e| e.heads.as_slice())
    }

    /// Whether a session is open (frames on it are processed).
    pub fn has_session(&self, session: SessionId) -> bool {
        self.sessions.contains_key(&session)
    }
    /// Whether the index knows `key` to have no changes waiting for their
    /// dependencies (only such documents are shared with other engines).
    pub fn is_whole(&self, key: &DocKey) -> Option<bool> {
        self.index.get(key).map(|e| e.whole)
    }
    pub fn doc_count(&self) -> usize {
        self.index.len()
    }
    pub fn mail_states(&self) -> &BTreeMap<(String, String), MailState> {
        &self.mail
    }

    /// Loads a document (from cache or store) for read-only inspection.
    pub fn doc(&mut self, key: &DocKey) -> Result<Option<&Doc>, StoreError> {
        Ok(self.load(key)?.map(|d| &*d))
    }

    pub fn handle(&mut self, input: Input, now: Now, rng: &mut dyn RngCore) -> Vec<Output> {
        let mut out = Vec::new();
        #[cfg(feature = "mutants")]
        if let Some(b) = self.deferred.take() {
            let _ = self.store.commit(&b);
        }
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
            } => self.connected(session, node, role, initiator, &mut out),
            Input::Frame { session, bytes } => self.frame(session, &bytes, now, &mut out),
            Input::Disconnected { session } => {
                self.sessions.remove(&session);
            }
            Input::MailOutcome {
                message_id,
                outcome,
            } => self.mail_outcome(&message_id, outcome, now, &mut out),
            Input::Tick => {
                if self.cfg.role == Role::Hq {
                    let n = self.arrival_scan.len().saturating_sub(500);
                    let batch = self.arrival_scan.split_off(n);
                    self.note_presence(&batch, now);
                    self.plan_mail(now, &mut out);
                }
                self.tick_cursors(&mut out);
            }
        }
        self.drain(&mut out);
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
        let mut out = Vec::new();
        for input in inputs {
            if matches!(input, Input::Command { .. }) {
                if self.group.is_none() {
                    self.group = Some(Group {
                        txns: Vec::new(),
                        ops: BTreeMap::new(),
                        replies: Vec::new(),
                        meta_before: self.meta.clone(),
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
        for t in &txns {
            let b = &t.batch;
            if b.meta.is_some() {
                merged.meta = b.meta.clone();
            }
            merged.changes.extend(b.changes.iter().cloned());
            for d in &b.docs {
                // As in `record`: the newest state of a document wins, so an
                // earlier snapshot never claims a later change of the group.
                merged.docs.retain(|x| x.key != d.key);
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
            self.store.commit(&merged)
        };
        match result {
            Ok(()) => {
                let meta_now = self.meta.clone();
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
                    self.meta = g.meta_before.clone();
                }
                for t in &txns {
                    self.forget(t);
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

    // ----- storage plumbing -------------------------------------------------

    pub(crate) fn load(&mut self, key: &DocKey) -> Result<Option<&Doc>, StoreError> {
        if !self.cache.contains(key) {
            let shared = match (&self.share, self.index.get(key)) {
                (Some(share), Some(e)) if e.whole => share.doc(key, &e.heads),
                _ => None,
            };
            if let Some(doc) = shared {
                self.cache_insert(doc);
                return Ok(self.cache.get(key).map(|d| &**d));
            }
            let Some(stored) = self.store.load_doc(key)? else {
                return Ok(None);
            };
            let doc = match Doc::load(key.clone(), stored.snapshot.as_deref(), &stored.changes) {
                Ok(d) => d,
                Err(first) => {
                    // A damaged snapshot: rebuild from the raw change log.
                    let all = self.store.doc_changes(key)?;
                    match Doc::load(key.clone(), None, &all) {
                        Ok(d) => d,
                        Err(_) => {
                            let _ = self.store.commit(&Batch {
                                quarantine: vec![(key.clone(), first.to_string())],
                                ..Default::default()
                            });
                            return Err(StoreError::Corrupt(first.to_string()));
                        }
                    }
                }
            };
            let doc = Arc::new(doc);
            let whole = !doc.has_waiting();
            if let Some(e) = self.index.get_mut(key) {
                e.whole = whole;
            }
            if let (Some(share), true) = (&self.share, whole) {
                share.put_doc(doc.clone());
            }
            self.cache_insert(doc);
        }
        Ok(self.cache.get(key).map(|d| &**d))
    }

    pub(crate) fn cache_insert(&mut self, doc: Arc<Doc>) {
        self.cache.insert(doc);
    }

    /// The cached document to change in place (copied first if another
    /// engine shares it); a new empty one if it does not exist yet.
    fn load_or_new(&mut self, key: &DocKey) -> Result<&mut Doc, StoreError> {
        if self.load(key)?.is_none() {
            self.cache_insert(Arc::new(Doc::new(key.clone())));
        }
        Ok(Arc::make_mut(
            self.cache.get_mut(key).expect("just inserted"),
        ))
    }

    /// Takes a document out of the cache to change it: the caller puts it
    /// back only if the change is valid, so a failed change leaves no trace
    /// in memory. `None` for a document this node does not have yet.
    pub(crate) fn take_doc(&mut self, key: &DocKey) -> Result<Option<Arc<Doc>>, StoreError> {
        if self.load(key)?.is_none() {
            return Ok(None);
        }
        Ok(self.cache.remove(key))
    }

    /// Writes fields of a document as one local change, validating the
    /// result, and records everything in the transaction.
    fn write(
        &mut self,
        txn: &mut Txn,
        key: &DocKey,
        writes: Vec<(String, Option<String>)>,
        now: Now,
    ) -> Result<(), CommandError> {
        if !policy::may_write(self.cfg.role, &self.cfg.node_id, key) {
            return Err(CommandError::Forbidden {
                role: self.cfg.role,
                action: format!("write {} documents", key.kind),
            });
        }
        let actor = self.actor;
        let share = self.share.is_some();
        let doc = self.load_or_new(key)?;
        let before = if share { doc.heads() } else { vec![] };
        let change = doc
            .write(actor, (now.wall_ms / 1000) as i64, "", &writes)
            .map_err(|e| CommandError::Rejected(e.to_string()))?;
        let Some(change) = change else { return Ok(()) };
        let projection = match derive::projection(doc) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                self.evict(key);
                return Err(CommandError::Rejected(e.to_string()));
            }
        };
        // Shared only when it is exactly what its heads name.
        if let (Some(share), Some(doc)) = (&self.share, self.cache.get(key)) {
            if !doc.has_waiting() {
                let applied = Applied {
                    doc: doc.clone(),
                    projection: Ok(projection.clone()),
                };
                share.put_applied(&before, &[change.hash().0], applied);
            }
        }
        txn.touched.insert(key.clone());
        self.record(txn, key, vec![change], projection, None);
        Ok(())
    }

    /// Adds new changes of a document (already applied to the cached doc
    /// and validated, which gave `projection`) and its new heads, query
    /// rows and maybe a snapshot to the transaction.
    pub(crate) fn record(
        &mut self,
        txn: &mut Txn,
        key: &DocKey,
        changes: Vec<Change>,
        projection: Arc<crate::store::Projection>,
        from: Option<SessionId>,
    ) {
        let tail = self.index.get(key).map_or(0, |e| e.tail) + changes.len() as u32;
        let doc = self.cache.get(key).expect("recorded documents are loaded");
        let heads = doc.heads();
        for c in changes {
            let hash = c.hash().0;
            let bytes = c.raw_bytes().to_vec();
            txn.batch.changes.push(ChangeRecord {
                key: key.clone(),
                hash,
                bytes: bytes.clone(),
            });
            txn.gossip.push((key.clone(), bytes, hash, from));
        }
        let snapshot = (tail >= SNAPSHOT_EVERY).then(|| doc.save());
        // A batch's snapshot of a document covers every change of it in the
        // batch, so only the newest state of each document is kept.
        txn.batch.docs.retain(|d| d.key != *key);
        txn.batch.docs.push(DocState {
            key: key.clone(),
            heads: heads.clone(),
            snapshot,
        });
        txn.batch.projections.push((key.clone(), projection));
        let whole = !doc.has_waiting();
        txn.heads.insert(key.clone(), (heads, whole));
    }

    fn evict(&mut self, key: &DocKey) {
        self.cache.remove(key);
    }

    /// Commits a transaction; on success applies its in-memory effects and
    /// queues gossip, on failure forgets every touched document so memory
    /// matches the store again.
    pub(crate) fn commit(
        &mut self,
        mut txn: Txn,
        now: Now,
        out: &mut Vec<Output>,
    ) -> Result<(), StoreError> {
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
                self.meta = m;
            }
            group.txns.push(txn);
            return Ok(());
        }
        #[cfg(feature = "mutants")]
        let deferred = crate::mutants::active(crate::mutants::Mutant::SkipDurability)
            && !txn.batch.ops.is_empty();
        #[cfg(not(feature = "mutants"))]
        let deferred = false;
        let res = if deferred {
            #[cfg(feature = "mutants")]
            {
                self.deferred = Some(txn.batch.clone());
            }
            Ok(())
        } else {
            self.store.commit(&txn.batch)
        };
        if let Err(e) = res {
            self.forget(&txn);
            return Err(e);
        }
        self.after_commit(txn, now, out);
        Ok(())
    }

    /// Drops every document a failed transaction touched from the cache,
    /// so memory matches the store again.
    fn forget(&mut self, txn: &Txn) {
        for k in txn.touched.iter().chain(txn.heads.keys()) {
            self.evict(k);
        }
    }

    /// The in-memory effects of a durable transaction: index, gossip to
    /// connected peers, mail planning.
    fn after_commit(&mut self, mut txn: Txn, now: Now, out: &mut Vec<Output>) {
        let meta = txn.meta.take();
        self.stats.commits += 1;
        if let Some(m) = meta {
            self.meta = m;
        }
        let mut outbox_touched = Vec::new();
        let mut presence_touched = Vec::new();
        for (key, (heads, whole)) in txn.heads {
            let fp = item_fp(&key, &heads);
            let snap = txn
                .batch
                .docs
                .iter()
                .rev()
                .find(|d| d.key == key)
                .is_some_and(|d| d.snapshot.is_some());
            let kind_fp = &mut self.kind_fp[key.kind.code() as usize];
            upsert(&mut self.index, &key, IndexEntry::default, |e| {
                *kind_fp ^= e.fp ^ fp;
                e.fp = fp;
                e.heads = heads;
                // Known at `record`: the document may have left the cache
                // since (a frame with more documents than the cache holds).
                e.whole = whole;
                e.tail = if snap { 0 } else { e.tail + 1 };
            });
            match key.kind {
                Kind::Outbox => outbox_touched.push(key.clone()),
                Kind::Presence => presence_touched.push(key.clone()),
                _ => {}
            }
            out.push(Output::Event(UiEvent::DocumentChanged {
                kind: key.kind,
                id: key.id.clone(),
            }));
        }
        if !txn.batch.changes.is_empty() {
            self.log_end = self.store.log_end().ok().flatten();
        }
        // Push every new change to each connected peer that may hold it
        // and does not have it; live sessions learn the new log end with
        // the last frame.
        let mut per_session: BTreeMap<SessionId, Vec<DocChanges>> = BTreeMap::new();
        for (key, bytes, hash, from) in txn.gossip {
            for (sid, s) in self.sessions.iter_mut() {
                if Some(*sid) == from
                    || !s.hello
                    || !may_send(s.role, &s.node, &key)
                    || !s.seen.insert(hash)
                {
                    continue;
                }
                let docs = per_session.entry(*sid).or_default();
                match docs.last_mut() {
                    Some(d) if d.key == key => d.changes.push(bytes.clone()),
                    _ => docs.push(DocChanges {
                        key: key.clone(),
                        changes: vec![bytes.clone()],
                    }),
                }
            }
        }
        for (sid, docs) in per_session {
            let live = self.sessions.get(&sid).is_some_and(|s| s.is_live());
            let frames = crate::session::chunk_docs(docs);
            let last = frames.len() - 1;
            for (i, docs) in frames.into_iter().enumerate() {
                let upto = if live && i == last {
                    self.log_end
                } else {
                    None
                };
                if let (Some(c), Some(s)) = (upto, self.sessions.get_mut(&sid)) {
                    s.upto_sent = c.seq;
                }
                self.send(sid, &Frame::Changes { docs, upto }, out);
            }
        }
        if self.cfg.role == Role::Hq {
            for k in outbox_touched {
                self.refresh_mail(&k);
            }
        }
        self.note_presence(&presence_touched, now);
    }

    fn new_id(&self, prefix: &str, rng: &mut dyn RngCore) -> String {
        format!("{prefix}{:016x}", rng.next_u64())
    }

    // ----- commands ---------------------------------------------------------

    fn command(
        &mut self,
        op_id: &str,
        operator: &Operator,
        cmd: Command,
        now: Now,
        rng: &mut dyn RngCore,
        out: &mut Vec<Output>,
    ) -> Result<Reply, CommandError> {
        crate::ids::check_id_str(op_id).map_err(|r| {
            CommandError::Invalid(TextError::Invalid {
                field: "op_id",
                reason: r.into(),
            })
        })?;
        check_text("operator", &operator.0, 100, true)?;
        let staged = self.group.as_ref().and_then(|g| g.ops.get(op_id).cloned());
        if let Some(prev) = staged.or(self.store.op_result(op_id)?) {
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
        let is_read = read_denied.is_some();
        let reply = match self.run_command(&mut txn, operator, cmd, now, rng) {
            Ok(r) => r,
            Err(e) => {
                if !txn.touched.is_empty()
                    && self.group.as_ref().is_some_and(|g| !g.txns.is_empty())
                {
                    // Staged work of the group may share these documents:
                    // make it durable before forgetting ours.
                    self.flush_group(now, out);
                }
                self.forget(&txn);
                // A refused audited read is still audited (E-4).
                if let (Some((action, record)), CommandError::Forbidden { .. }) = (read_denied, &e)
                {
                    let mut audit_txn = Txn::default();
                    if self
                        .audit(&mut audit_txn, operator, action, record, "", false, now)
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

    fn run_command(
        &mut self,
        txn: &mut Txn,
        operator: &Operator,
        cmd: Command,
        now: Now,
        rng: &mut dyn RngCore,
    ) -> Result<Reply, CommandError> {
        self.hlc.tick(now.wall_ms);
        match cmd {
            Command::ImportHouseholds { households } => self.import(txn, households, now),
            Command::PutShelter { shelter } => {
                self.put_shelter(txn, shelter, now)?;
                Ok(Reply::Done)
            }
            Command::Import { records } => self.import_records(txn, records, now),
            Command::UpdateShelter {
                shelter_id,
                open,
                capacity,
            } => {
                let key = DocKey::new(Kind::Shelter, &shelter_id)
                    .map_err(|e| CommandError::Rejected(e.to_string()))?;
                let current = match self.load(&key)? {
                    Some(doc) => derive::shelter(doc)?,
                    None => None,
                };
                let mut s = current.ok_or(CommandError::NotFound {
                    what: "shelter",
                    id: shelter_id,
                })?;
                if let Some(o) = open {
                    s.open = o;
                }
                if let Some(c) = capacity {
                    s.capacity = c;
                }
                self.put_shelter(txn, s, now)?;
                Ok(Reply::Done)
            }
            Command::CheckEligibility { person_id } => {
                self.check_eligibility(txn, operator, person_id, now)
            }
            Command::RecordExport { what, scope, count } => {
                check_text("what", &what, 100, true)?;
                check_text("scope", &scope, 200, false)?;
                let seq = self.audit(
                    txn,
                    operator,
                    "export",
                    &format!("export/{what}"),
                    &format!("{scope}; {count} records"),
                    false,
                    now,
                )?;
                Ok(Reply::Audited { audit_seq: seq })
            }
            Command::RegisterPerson {
                name,
                kana,
                birth_date,
                note,
            } => {
                if let Some(b) = &birth_date {
                    check_birth_date("birth_date", b, now.wall_ms)?;
                }
                let person_id = self.new_id("f-", rng);
                let p = FieldPerson {
                    person_id: person_id.clone(),
                    name,
                    kana,
                    birth_date,
                    registered_by: self.cfg.node_id.clone(),
                    note,
                };
                p.validate()?;
                let key = DocKey::new(Kind::Person, &person_id).expect("generated ids are valid");
                self.write(
                    txn,
                    &key,
                    vec![(PERSON_FIELD.into(), Some(encode(&p)))],
                    now,
                )?;
                Ok(Reply::Registered { person_id })
            }
            Command::CheckIn {
                person_ids,
                shelter_id,
            } => self.presence(
                txn,
                person_ids,
                PresenceAction::CheckIn,
                shelter_id,
                None,
                now,
                rng,
            ),
            Command::CheckOut {
                person_ids,
                shelter_id,
            } => self.presence(
                txn,
                person_ids,
                PresenceAction::CheckOut,
                shelter_id,
                None,
                now,
                rng,
            ),
            Command::Transfer {
                person_ids,
                from_shelter,
                to_shelter,
            } => self.presence(
                txn,
                person_ids,
                PresenceAction::Transfer,
                from_shelter,
                Some(to_shelter),
                now,
                rng,
            ),
            Command::PutMedical { person_id, update } => {
                self.put_medical(txn, &person_id, update, now, rng)
            }
            Command::ReadMedical {
                person_id,
                reason,
                break_glass,
            } => {
                check_text("reason", &reason, 200, true)?;
                if !policy::may_read(self.cfg.role, Kind::Medical) {
                    return Err(CommandError::Forbidden {
                        role: self.cfg.role,
                        action: "read medical profiles".into(),
                    });
                }
                let key = DocKey::new(Kind::Medical, &person_id)
                    .map_err(|e| CommandError::Rejected(e.to_string()))?;
                let view = match self.load(&key)? {
                    Some(doc) => {
                        views::medical(doc).map_err(|e| CommandError::Rejected(e.to_string()))?
                    }
                    None => {
                        return Err(CommandError::NotFound {
                            what: "medical profile",
                            id: person_id,
                        })
                    }
                };
                let seq = self.audit(
                    txn,
                    operator,
                    "medical_read",
                    &key.to_string(),
                    &reason,
                    break_glass,
                    now,
                )?;
                Ok(Reply::Medical {
                    person_id,
                    view,
                    audit_seq: seq,
                })
            }
            Command::PutEligibility {
                person_id,
                eligibility,
            } => {
                self.put_eligibility(txn, &person_id, eligibility, now)?;
                Ok(Reply::Done)
            }
            Command::PutContacts {
                person_id,
                contacts,
                disclosure,
            } => {
                self.put_contacts(txn, &person_id, contacts, disclosure, now)?;
                Ok(Reply::Done)
            }
        }
    }

    /// Writes only the fields whose value differs from the document's
    /// (a field with concurrent values is always rewritten, which resolves
    /// it), so re-importing the same records adds no change.
    fn write_changed(
        &mut self,
        txn: &mut Txn,
        key: &DocKey,
        writes: Vec<(String, Option<String>)>,
        now: Now,
    ) -> Result<(), CommandError> {
        let writes: Vec<(String, Option<String>)> = match self.load(key)? {
            None => writes.into_iter().filter(|(_, v)| v.is_some()).collect(),
            Some(doc) => writes
                .into_iter()
                .filter(|(name, v)| match (doc.field(name), v) {
                    (None, None) => false,
                    (Some(f), Some(v)) => !(f.conflicts.is_empty() && &f.value == v),
                    _ => true,
                })
                .collect(),
        };
        if writes.is_empty() {
            return Ok(());
        }
        self.write(txn, key, writes, now)
    }

    /// Refuses before anything else is looked at (a forbidden import must
    /// say "forbidden", not "unknown person").
    fn may_write(&self, key: &DocKey) -> Result<(), CommandError> {
        if policy::may_write(self.cfg.role, &self.cfg.node_id, key) {
            Ok(())
        } else {
            Err(CommandError::Forbidden {
                role: self.cfg.role,
                action: format!("write {} documents", key.kind),
            })
        }
    }

    /// Records about a person need the person (registry or field).
    fn require_person(&self, person_id: &str) -> Result<(), CommandError> {
        crate::ids::check_id_str(person_id).map_err(|r| TextError::Invalid {
            field: "person_id",
            reason: r.into(),
        })?;
        match self.store.person(person_id)? {
            Some(_) => Ok(()),
            None => Err(CommandError::NotFound {
                what: "person",
                id: person_id.to_string(),
            }),
        }
    }

    fn put_shelter(
        &mut self,
        txn: &mut Txn,
        shelter: ShelterInfo,
        now: Now,
    ) -> Result<(), CommandError> {
        let key = DocKey::new(Kind::Shelter, &shelter.shelter_id)
            .map_err(|e| CommandError::Rejected(e.to_string()))?;
        self.may_write(&key)?;
        shelter.validate()?;
        self.write_changed(
            txn,
            &key,
            vec![(SHELTER_FIELD.into(), Some(encode(&shelter)))],
            now,
        )
    }

    fn put_eligibility(
        &mut self,
        txn: &mut Txn,
        person_id: &str,
        eligibility: Eligibility,
        now: Now,
    ) -> Result<(), CommandError> {
        let key = DocKey::new(Kind::Eligibility, person_id)
            .map_err(|e| CommandError::Rejected(e.to_string()))?;
        self.may_write(&key)?;
        eligibility.validate()?;
        self.require_person(person_id)?;
        self.write_changed(
            txn,
            &key,
            vec![(views::ELIGIBILITY.into(), Some(encode(&eligibility)))],
            now,
        )
    }

    fn put_contacts(
        &mut self,
        txn: &mut Txn,
        person_id: &str,
        contacts: Vec<FamilyContact>,
        disclosure: Disclosure,
        now: Now,
    ) -> Result<(), CommandError> {
        if contacts.len() > MAX_CONTACTS_PER_PERSON {
            return Err(TextError::Invalid {
                field: "contacts",
                reason: "at most 10 contacts per person".into(),
            }
            .into());
        }
        let key = DocKey::new(Kind::Contacts, person_id)
            .map_err(|e| CommandError::Rejected(e.to_string()))?;
        self.may_write(&key)?;
        self.require_person(person_id)?;
        let mut writes = vec![(views::DISCLOSURE.to_string(), Some(encode(&disclosure)))];
        let existing: Vec<String> = match self.load(&key)? {
            Some(d) => d
                .fields()
                .into_keys()
                .filter(|k| k.starts_with(views::CONTACT_PREFIX))
                .collect(),
            None => vec![],
        };
        let mut names = BTreeSet::new();
        for c in &contacts {
            c.validate()?;
            let name = format!("{}{}", views::CONTACT_PREFIX, c.contact_id);
            if !names.insert(name.clone()) {
                return Err(TextError::Invalid {
                    field: "contact_id",
                    reason: "duplicate contact id".into(),
                }
                .into());
            }
            writes.push((name, Some(encode(c))));
        }
        for old in existing.into_iter().filter(|k| !names.contains(k)) {
            writes.push((old, None));
        }
        self.write_changed(txn, &key, writes, now)
    }

    /// Replaces a person's medical profile with an imported one. Entry ids
    /// are derived from (section, text), so unchanged entries keep their
    /// ids and the same profile again writes nothing; consent keeps its
    /// original record while its basis is unchanged.
    fn replace_medical(
        &mut self,
        txn: &mut Txn,
        m: MedicalProfile,
        now: Now,
    ) -> Result<(), CommandError> {
        let key = DocKey::new(Kind::Medical, &m.person_id)
            .map_err(|e| CommandError::Rejected(e.to_string()))?;
        self.may_write(&key)?;
        self.require_person(&m.person_id)?;
        let (fields, consent): (BTreeSet<String>, Option<ConsentBasis>) = match self.load(&key)? {
            Some(d) => (
                d.fields().into_keys().collect(),
                views::medical(d)
                    .map_err(|e| CommandError::Rejected(e.to_string()))?
                    .consent
                    .map(|c| c.basis),
            ),
            None => (BTreeSet::new(), None),
        };
        let mut writes = vec![(
            views::BLOOD_TYPE.to_string(),
            m.blood_type.map(|b| encode(&b)),
        )];
        if consent != Some(m.consent) {
            writes.push((
                views::CONSENT.to_string(),
                Some(encode(&Consent {
                    basis: m.consent,
                    recorded_by: self.cfg.node_id.clone(),
                    wall_ms: now.wall_ms,
                })),
            ));
        }
        let mut wanted = BTreeSet::new();
        for (section, text) in m.entries {
            let e = MedicalEntry { text };
            e.validate()?;
            let h = blake3::hash(format!("{}|{}", section.as_str(), e.text).as_bytes());
            let name = format!("{}:i{}", section.as_str(), &h.to_hex()[..16]);
            if wanted.insert(name.clone()) {
                writes.push((name, Some(encode(&e))));
            }
        }
        for old in fields {
            if old != views::BLOOD_TYPE && old != views::CONSENT && !wanted.contains(&old) {
                writes.push((old, None));
            }
        }
        self.write_changed(txn, &key, writes, now)
    }

    fn import_records(
        &mut self,
        txn: &mut Txn,
        records: ImportRecords,
        now: Now,
    ) -> Result<Reply, CommandError> {
        let (dataset, n) = (records.dataset(), records.len());
        if n > MAX_RECORDS_PER_IMPORT {
            return Err(CommandError::Rejected(format!(
                "at most {MAX_RECORDS_PER_IMPORT} records per import batch"
            )));
        }
        let mut seen = BTreeSet::new();
        let mut once = |id: &str| {
            if seen.insert(id.to_string()) {
                Ok(())
            } else {
                Err(CommandError::Rejected(format!(
                    "{id} appears twice in one {dataset} batch"
                )))
            }
        };
        match records {
            ImportRecords::Shelters(v) => {
                for s in v {
                    once(&s.shelter_id)?;
                    self.put_shelter(txn, s, now)?;
                }
            }
            ImportRecords::Contacts(v) => {
                for c in v {
                    once(&c.person_id)?;
                    self.put_contacts(txn, &c.person_id, c.contacts, c.disclosure, now)?;
                }
            }
            ImportRecords::Medical(v) => {
                for m in v {
                    once(&m.person_id)?;
                    self.replace_medical(txn, m, now)?;
                }
            }
            ImportRecords::Eligibility(v) => {
                for (p, e) in v {
                    once(&p)?;
                    self.put_eligibility(txn, &p, e, now)?;
                }
            }
        }
        Ok(Reply::ImportedRecords {
            dataset: dataset.to_string(),
            records: n,
        })
    }

    /// Clinic nodes answer from their replica, offline; hq sees the same
    /// status with the insurance numbers masked. Every check is audited.
    fn check_eligibility(
        &mut self,
        txn: &mut Txn,
        operator: &Operator,
        person_id: String,
        now: Now,
    ) -> Result<Reply, CommandError> {
        let masked = match self.cfg.role {
            Role::Clinic => false,
            Role::Hq => true,
            role => {
                return Err(CommandError::Forbidden {
                    role,
                    action: "check insurance eligibility".into(),
                })
            }
        };
        let key = DocKey::new(Kind::Eligibility, &person_id)
            .map_err(|e| CommandError::Rejected(e.to_string()))?;
        let on_date = crate::jst::date(now.wall_ms);
        let found = match self.load(&key)? {
            Some(doc) => {
                views::eligibility_all(doc).map_err(|e| CommandError::Rejected(e.to_string()))?
            }
            None => None,
        };
        let (status, record) = match found {
            None => (EligibilityStatus::Unknown, None),
            // Two crossed imports that disagree: say so, do not guess.
            Some((e, others)) if !others.is_empty() => (EligibilityStatus::Unknown, Some(e)),
            Some((e, _)) => (e.status_on(&on_date), Some(e)),
        };
        let seq = self.audit(
            txn,
            operator,
            "eligibility_check",
            &key.to_string(),
            &format!("insurance eligibility: {status:?}"),
            false,
            now,
        )?;
        Ok(Reply::Eligibility {
            person_id,
            status,
            record: record.map(|e| if masked { e.masked() } else { e }),
            masked,
            on_date,
            audit_seq: seq,
        })
    }

    fn import(
        &mut self,
        txn: &mut Txn,
        households: Vec<Household>,
        now: Now,
    ) -> Result<Reply, CommandError> {
        if households.len() > MAX_HOUSEHOLDS_PER_IMPORT {
            return Err(CommandError::Rejected(format!(
                "at most {MAX_HOUSEHOLDS_PER_IMPORT} households per import batch"
            )));
        }
        let mut cards = BTreeMap::new();
        let mut persons = BTreeSet::new();
        for h in &households {
            h.validate()?;
            for m in &h.members {
                check_birth_date("birth_date", &m.birth_date, now.wall_ms)?;
                if !persons.insert(m.person_id.clone()) {
                    return Err(CommandError::Rejected(format!(
                        "person {} appears twice",
                        m.person_id
                    )));
                }
                if let Some(c) = &m.card_user_id {
                    if cards.insert(c.clone(), h.household_id.clone()).is_some() {
                        return Err(CommandError::Rejected(format!(
                            "card user ID of person {} appears twice",
                            m.person_id
                        )));
                    }
                    if let Some(other) = self.store.household_by_card(c.as_str())? {
                        if other != h.household_id {
                            return Err(CommandError::Rejected(format!(
                                "card user ID of person {} already belongs to household {other}",
                                m.person_id
                            )));
                        }
                    }
                }
            }
        }
        let mut n = 0;
        for h in &households {
            let key = DocKey::new(Kind::Registry, &h.household_id).expect("validated");
            n += h.members.len();
            self.write(
                txn,
                &key,
                vec![(HOUSEHOLD_FIELD.into(), Some(encode(h)))],
                now,
            )?;
        }
        Ok(Reply::Imported {
            households: households.len(),
            persons: n,
        })
    }

    /// Presence document of a person: their household's, or their own for
    /// a field-registered person.
    fn presence_key(&self, person_id: &str) -> Result<DocKey, CommandError> {
        let p = self
            .store
            .person(person_id)?
            .ok_or_else(|| CommandError::NotFound {
                what: "person",
                id: person_id.to_string(),
            })?;
        let id = p.household_id.unwrap_or(p.person_id);
        DocKey::new(Kind::Presence, id).map_err(|e| CommandError::Rejected(e.to_string()))
    }

    #[allow(clippy::too_many_arguments)]
    fn presence(
        &mut self,
        txn: &mut Txn,
        person_ids: Vec<String>,
        action: PresenceAction,
        shelter: Option<String>,
        to: Option<String>,
        now: Now,
        rng: &mut dyn RngCore,
    ) -> Result<Reply, CommandError> {
        if person_ids.is_empty() || person_ids.len() > MAX_PERSONS_PER_COMMAND {
            return Err(TextError::Invalid {
                field: "person_ids",
                reason: format!("give 1 to {MAX_PERSONS_PER_COMMAND} persons"),
            }
            .into());
        }
        let shelter = match (shelter, &self.cfg.shelter_id) {
            (Some(s), Some(own)) if self.cfg.role == Role::Shelter && &s != own => {
                return Err(CommandError::Forbidden {
                    role: self.cfg.role,
                    action: format!("record presence at another shelter ({s})"),
                })
            }
            (Some(s), _) => s,
            (None, Some(own)) => own.clone(),
            (None, None) => {
                return Err(TextError::Invalid {
                    field: "shelter_id",
                    reason: "required on this node".into(),
                }
                .into())
            }
        };
        crate::ids::check_id_str(&shelter).map_err(|r| TextError::Invalid {
            field: "shelter_id",
            reason: r.into(),
        })?;
        if let Some(t) = &to {
            crate::ids::check_id_str(t).map_err(|r| TextError::Invalid {
                field: "to_shelter",
                reason: r.into(),
            })?;
            if self.store.shelters()?.iter().all(|s| &s.shelter_id != t) {
                return Err(CommandError::NotFound {
                    what: "shelter",
                    id: t.clone(),
                });
            }
        }
        let mut per_doc: BTreeMap<DocKey, Vec<String>> = BTreeMap::new();
        for p in &person_ids {
            crate::ids::check_id_str(p).map_err(|r| TextError::Invalid {
                field: "person_ids",
                reason: r.into(),
            })?;
            per_doc
                .entry(self.presence_key(p)?)
                .or_default()
                .push(p.clone());
        }
        let mut event_ids = Vec::new();
        let mut already = Vec::new();
        for (key, persons) in per_doc {
            let state = match self.load(&key)? {
                Some(doc) => derive::locations(
                    &derive::presence_events(doc)
                        .map_err(|e| CommandError::Rejected(e.to_string()))?,
                ),
                None => BTreeMap::new(),
            };
            let mut writes = Vec::new();
            for person in persons {
                let cur = state.get(&person);
                let here = cur.map(|c| (c.location.status, c.location.shelter_id.as_str()));
                let in_here = here == Some((crate::store::LocationStatus::In, shelter.as_str()));
                let conflict = cur.is_some_and(|c| c.location.conflict);
                match action {
                    PresenceAction::CheckIn if in_here && !conflict => {
                        already.push(person);
                        continue;
                    }
                    PresenceAction::CheckOut
                        if !in_here
                            && here.is_some_and(|(s, sh)| {
                                s == crate::store::LocationStatus::Out && sh == shelter
                            }) =>
                    {
                        already.push(person);
                        continue;
                    }
                    PresenceAction::CheckOut | PresenceAction::Transfer
                        if !in_here && !conflict =>
                    {
                        return Err(CommandError::Rejected(format!(
                            "person {person} is not checked in at shelter {shelter}"
                        )));
                    }
                    _ => {}
                }
                let event_id = self.new_id("e-", rng);
                let ev = PresenceEvent {
                    event_id: event_id.clone(),
                    op_id: event_id.clone(),
                    person_id: person.clone(),
                    action,
                    shelter_id: shelter.clone(),
                    to_shelter: to.clone(),
                    hlc: self.hlc.tick(now.wall_ms),
                    node: self.cfg.node_id.clone(),
                    wall_ms: now.wall_ms,
                    prev: cur
                        .map(|c| c.heads.iter().map(|h| h.event_id.clone()).collect())
                        .unwrap_or_default(),
                };
                writes.push((format!("{EVENT_PREFIX}{event_id}"), Some(encode(&ev))));
                event_ids.push(event_id);
            }
            if !writes.is_empty() {
                self.write(txn, &key, writes, now)?;
            }
        }
        Ok(Reply::Presence { event_ids, already })
    }

    fn put_medical(
        &mut self,
        txn: &mut Txn,
        person_id: &str,
        u: MedicalUpdate,
        now: Now,
        rng: &mut dyn RngCore,
    ) -> Result<Reply, CommandError> {
        let key = DocKey::new(Kind::Medical, person_id)
            .map_err(|e| CommandError::Rejected(e.to_string()))?;
        let existing: BTreeSet<String> = match self.load(&key)? {
            Some(d) => d.fields().into_keys().collect(),
            None => BTreeSet::new(),
        };
        let mut writes = Vec::new();
        if let Some(b) = u.blood_type {
            writes.push((views::BLOOD_TYPE.to_string(), Some(encode(&b))));
        }
        if let Some(basis) = u.consent {
            writes.push((
                views::CONSENT.to_string(),
                Some(encode(&Consent {
                    basis,
                    recorded_by: self.cfg.node_id.clone(),
                    wall_ms: now.wall_ms,
                })),
            ));
        }
        for (section, text) in u.add {
            let e = MedicalEntry { text };
            e.validate()?;
            writes.push((
                format!("{}:{}", section.as_str(), self.new_id("m-", rng)),
                Some(encode(&e)),
            ));
        }
        for (section, id, text) in u.edit {
            let name = format!("{}:{id}", section.as_str());
            if !existing.contains(&name) {
                return Err(CommandError::NotFound {
                    what: "medical entry",
                    id: name,
                });
            }
            let e = MedicalEntry { text };
            e.validate()?;
            writes.push((name, Some(encode(&e))));
        }
        for (section, id) in u.remove {
            let name = format!("{}:{id}", section.as_str());
            if !existing.contains(&name) {
                return Err(CommandError::NotFound {
                    what: "medical entry",
                    id: name,
                });
            }
            writes.push((name, None));
        }
        if writes.is_empty() {
            return Err(CommandError::Rejected("nothing to change".into()));
        }
        self.write(txn, &key, writes, now)?;
        Ok(Reply::Done)
    }

    /// Appends one entry to this node's audit chain; returns its sequence.
    #[allow(clippy::too_many_arguments)]
    fn audit(
        &mut self,
        txn: &mut Txn,
        operator: &Operator,
        action: &str,
        record: &str,
        reason: &str,
        break_glass: bool,
        now: Now,
    ) -> Result<u64, CommandError> {
        let mut meta = txn.meta.clone().unwrap_or_else(|| self.meta.clone());
        let mut entry = AuditEntry {
            seq: meta.audit_seq,
            operator: operator.0.clone(),
            node: self.cfg.node_id.clone(),
            action: action.to_string(),
            record: record.to_string(),
            wall_ms: now.wall_ms,
            hlc: self.hlc.tick(now.wall_ms),
            clock_trusted: now.wall_trusted,
            reason: reason.to_string(),
            break_glass,
            prev_hash: meta.audit_head.clone(),
            hash: String::new(),
        };
        entry.hash = entry.compute_hash();
        let key =
            DocKey::new(Kind::Audit, self.cfg.node_id.as_str()).expect("node ids are document ids");
        self.write(
            txn,
            &key,
            vec![(
                format!("{}{:016}", views::AUDIT_PREFIX, entry.seq),
                Some(encode(&entry)),
            )],
            now,
        )?;
        meta.audit_seq += 1;
        meta.audit_head = entry.hash.clone();
        meta.hlc = self.hlc.last();
        txn.meta = Some(meta);
        Ok(entry.seq)
    }

    // ----- queries ----------------------------------------------------------

    fn query(&mut self, q: Query) -> Result<QueryReply, CommandError> {
        Ok(match q {
            Query::Status => {
                let mut peers: Vec<PeerStatus> = self
                    .peers
                    .iter()
                    .map(|(n, (role, last))| PeerStatus {
                        node_id: n.clone(),
                        role: *role,
                        connected: self.sessions.values().any(|s| &s.node == n && s.hello),
                        last_sync: *last,
                    })
                    .collect();
                peers.sort_by(|a, b| a.node_id.cmp(&b.node_id));
                let open: Vec<&MailState> = self
                    .mail
                    .values()
                    .filter(|m| {
                        !matches!(
                            m.status,
                            MailStatus::Sent | MailStatus::FailedPermanent | MailStatus::Cancelled
                        )
                    })
                    .collect();
                QueryReply::Status(Status {
                    node_id: self.cfg.node_id.clone(),
                    role: self.cfg.role,
                    incarnation: self.meta.incarnation,
                    peers,
                    documents: self.index.len(),
                    quarantined: self.store.quarantined()?.len(),
                    violations: self.stats.violations,
                    mail_queue: open.len(),
                    mail_oldest_ms: open.iter().map(|m| m.next_attempt_ms).min(),
                    duplicate_mail_risk: self.stats.duplicate_mail_risk,
                })
            }
            Query::Persons { limit, offset } => {
                QueryReply::Persons(self.store.persons(limit.min(1000), offset)?)
            }
            Query::Search { q, limit } => {
                check_text("q", &q, 100, true)?;
                QueryReply::Persons(self.store.search(&search_key(&q), limit.min(200))?)
            }
            Query::HouseholdByCard { card_user_id } => {
                let card = crate::text::CardUserId::parse(&card_user_id)?;
                match self.store.household_by_card(card.as_str())? {
                    None => QueryReply::Household(None),
                    Some(h) => {
                        let members = self
                            .store
                            .household_members(&h)?
                            .into_iter()
                            .map(|p| -> Result<_, StoreError> {
                                let l = self.store.location(&p.person_id)?;
                                Ok((p, l))
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        // The holder comes from the same cards row as the
                        // household, so it is one of the members.
                        let holder = self.store.person_by_card(card.as_str())?;
                        QueryReply::Household(Some(HouseholdView {
                            household_id: h,
                            members,
                            holder,
                        }))
                    }
                }
            }
            Query::Person { person_id } => {
                crate::ids::check_id_str(&person_id).map_err(|r| TextError::Invalid {
                    field: "person_id",
                    reason: r.into(),
                })?;
                match self.store.person(&person_id)? {
                    None => QueryReply::Person(None),
                    Some(person) => {
                        let location = self.store.location(&person_id)?;
                        let mut conflicts = Vec::new();
                        if location.as_ref().is_some_and(|l| l.conflict) {
                            let key = self.presence_key(&person_id)?;
                            if let Some(doc) = self.load(&key)? {
                                if let Ok(evs) = derive::presence_events(doc) {
                                    if let Some(pp) = derive::locations(&evs).remove(&person_id) {
                                        conflicts = pp.heads;
                                    }
                                }
                            }
                        }
                        QueryReply::Person(Some(PersonDetail {
                            person,
                            location,
                            conflicts,
                        }))
                    }
                }
            }
            Query::Shelters => {
                let occ = self.store.occupancy()?;
                QueryReply::Shelters(
                    self.store
                        .shelters()?
                        .into_iter()
                        .map(|s| ShelterView {
                            occupancy: occ.get(&s.shelter_id).copied().unwrap_or(0),
                            last_sync: self.shelter_seen.get(&s.shelter_id).copied(),
                            shelter: s,
                        })
                        .collect(),
                )
            }
            Query::Conflicts => QueryReply::Conflicts(self.store.conflicts()?),
            Query::Evacuees {
                shelter_id,
                with_address,
            } => {
                if let Some(s) = &shelter_id {
                    crate::ids::check_id_str(s).map_err(|r| TextError::Invalid {
                        field: "shelter_id",
                        reason: r.into(),
                    })?;
                }
                let withheld = self.store.withheld()?;
                let rows = self.store.evacuees(shelter_id.as_deref())?;
                let mut addresses: BTreeMap<String, Option<String>> = BTreeMap::new();
                let mut out = Vec::with_capacity(rows.len());
                for (person, location) in rows {
                    let address = match (&person.household_id, with_address) {
                        (Some(h), true) => {
                            if !addresses.contains_key(h) {
                                let a = match DocKey::new(Kind::Registry, h) {
                                    Ok(k) => match self.load(&k)? {
                                        Some(doc) => derive::household(doc)
                                            .ok()
                                            .flatten()
                                            .map(|hh| hh.address),
                                        None => None,
                                    },
                                    Err(_) => None,
                                };
                                addresses.insert(h.clone(), a);
                            }
                            addresses[h].clone()
                        }
                        _ => None,
                    };
                    out.push(Evacuee {
                        withheld: withheld.contains(&person.person_id),
                        person,
                        location,
                        address,
                    });
                }
                QueryReply::Evacuees(out)
            }
            Query::ShelterInfos => {
                let keys: Vec<DocKey> = self
                    .index
                    .keys()
                    .filter(|k| k.kind == Kind::Shelter)
                    .cloned()
                    .collect();
                let mut out = Vec::new();
                for k in keys {
                    if let Some(doc) = self.load(&k)? {
                        if let Ok(Some(s)) = derive::shelter(doc) {
                            out.push(s);
                        }
                    }
                }
                QueryReply::ShelterInfos(out)
            }
            Query::Outbox => QueryReply::Outbox(
                self.mail
                    .iter()
                    .map(|((p, c), s)| OutboxRow {
                        person_id: p.clone(),
                        contact_id: c.clone(),
                        state: s.clone(),
                    })
                    .collect(),
            ),
        })
    }

    // ----- family mail (headquarters) ---------------------------------------

    fn recover_mail(&mut self, now: Now) -> Result<(), StoreError> {
        let keys: Vec<DocKey> = self
            .index
            .keys()
            .filter(|k| k.kind == Kind::Outbox)
            .cloned()
            .collect();
        for k in &keys {
            self.refresh_mail(k);
        }
        // Sends in flight when we stopped have an unknown outcome (G-5).
        let mut txn = Txn::default();
        let mine: Vec<((String, String), MailState)> = self
            .mail
            .iter()
            .filter(|(_, s)| s.status == MailStatus::Sending && s.claimed_by == self.cfg.node_id)
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        for ((person, contact), mut s) in mine {
            s.status = MailStatus::Indeterminate;
            s.indeterminate += 1;
            s.next_attempt_ms = now.wall_ms;
            self.stats.duplicate_mail_risk += 1;
            let _ = self.put_mail(&mut txn, &person, &contact, &s, now);
        }
        let mut sink = Vec::new();
        self.commit(txn, now, &mut sink)
    }

    fn refresh_mail(&mut self, key: &DocKey) {
        let Ok(Some(doc)) = self.load(key) else {
            return;
        };
        let Ok(states) = views::outbox(doc) else {
            return;
        };
        let person = key.id.clone();
        for (contact, s) in states {
            let k = (person.clone(), contact);
            if is_open(&s) {
                self.mail_open.insert(k.clone());
            } else {
                self.mail_open.remove(&k);
            }
            self.mail.insert(k, s);
        }
    }

    fn put_mail(
        &mut self,
        txn: &mut Txn,
        person: &str,
        contact: &str,
        s: &MailState,
        now: Now,
    ) -> Result<(), CommandError> {
        let key =
            DocKey::new(Kind::Outbox, person).map_err(|e| CommandError::Rejected(e.to_string()))?;
        self.write(
            txn,
            &key,
            vec![(format!("{}{contact}", views::MAIL_PREFIX), Some(encode(s)))],
            now,
        )?;
        // `self.mail` follows the document once the write is committed
        // (`after_commit` refreshes it), never before.
        Ok(())
    }

    /// Notes, from changed presence documents, when each shelter was last
    /// heard of (the staleness headquarters shows) and, on headquarters,
    /// which persons arrived (for family mail).
    fn note_presence(&mut self, keys: &[DocKey], now: Now) {
        let share = self.share.clone();
        for k in keys {
            let Ok(Some(doc)) = self.load(k) else {
                continue;
            };
            let evs = match &share {
                Some(s) => s.presence_events(doc),
                None => derive::presence_events(doc).map(Arc::new),
            };
            let Ok(evs) = evs else {
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
                    self.arrivals_seen
                        .entry(e.person_id.clone())
                        .or_insert(now.wall_ms);
                }
            }
        }
    }

    /// Message-ID for an (arrival, contact) pair: the same on every HQ node
    /// and every retry.
    pub fn message_id(person: &str, contact: &str) -> String {
        let h = blake3::hash(format!("kizuna-safety|{person}|{contact}").as_bytes());
        format!("<{}@safety.kizuna.invalid>", &h.to_hex()[..32])
    }

    fn plan_mail(&mut self, now: Now, out: &mut Vec<Output>) {
        // 1. New arrivals get one pending state per consented contact.
        // Arrivals that already have mail (planned here or by the other
        // HQ) need nothing more: forget them, so this stays short.
        let planned: Vec<String> = self
            .arrivals_seen
            .keys()
            .filter(|p| {
                self.mail
                    .range(((*p).clone(), String::new())..)
                    .next()
                    .is_some_and(|((mp, _), _)| mp == *p)
            })
            .cloned()
            .collect();
        for p in &planned {
            self.arrivals_seen.remove(p);
        }
        let ready: Vec<String> = self
            .arrivals_seen
            .iter()
            .filter(|(_, seen)| {
                self.cfg.mail_primary || now.wall_ms >= *seen + self.cfg.mail_takeover_ms
            })
            .map(|(p, _)| p.clone())
            .take(500)
            .collect();
        let mut txn = Txn::default();
        for person in ready {
            let key = match DocKey::new(Kind::Contacts, &person) {
                Ok(k) => k,
                Err(_) => continue,
            };
            let contacts = match self.load(&key) {
                Ok(Some(d)) => views::contacts(d).unwrap_or_default(),
                _ => Default::default(),
            };
            self.arrivals_seen.remove(&person);
            if contacts.disclosure.do_not_disclose {
                continue;
            }
            for c in contacts
                .contacts
                .iter()
                .filter(|c| c.consent)
                .take(MAX_CONTACTS_PER_PERSON)
            {
                let s = MailState {
                    message_id: Self::message_id(&person, &c.contact_id),
                    status: MailStatus::Pending,
                    attempts: 0,
                    claimed_by: self.cfg.node_id.clone(),
                    lease_until_ms: now.wall_ms + self.cfg.mail_lease_ms,
                    next_attempt_ms: now.wall_ms,
                    reason: String::new(),
                    indeterminate: 0,
                };
                let _ = self.put_mail(&mut txn, &person, &c.contact_id, &s, now);
            }
        }
        let _ = self.commit(txn, now, out);
        // 2. Due sends: ours, or others' whose lease expired (takeover).
        let due: Vec<((String, String), MailState)> = self
            .mail_open
            .iter()
            .filter_map(|k| self.mail.get_key_value(k))
            .filter(|(_, s)| s.next_attempt_ms <= now.wall_ms)
            .filter(|(_, s)| {
                if s.claimed_by == self.cfg.node_id {
                    s.status != MailStatus::Sending
                } else {
                    s.lease_until_ms < now.wall_ms
                }
            })
            .map(|(k, s)| (k.clone(), s.clone()))
            .take(50)
            .collect();
        for ((person, contact), mut s) in due {
            let mut txn = Txn::default();
            let Some(req) = self.mail_request(&person, &contact) else {
                s.status = MailStatus::Cancelled;
                s.reason = "consent withdrawn or do-not-disclose".into();
                let _ = self.put_mail(&mut txn, &person, &contact, &s, now);
                let _ = self.commit(txn, now, out);
                continue;
            };
            if s.claimed_by != self.cfg.node_id && s.status == MailStatus::Sending {
                // Another HQ was sending and went quiet: outcome unknown.
                s.indeterminate += 1;
                self.stats.duplicate_mail_risk += 1;
            }
            s.status = MailStatus::Sending;
            #[cfg(feature = "mutants")]
            if crate::mutants::active(crate::mutants::Mutant::MailSentEarly) {
                s.status = MailStatus::Sent;
            }
            s.claimed_by = self.cfg.node_id.clone();
            s.lease_until_ms = now.wall_ms + self.cfg.mail_lease_ms;
            s.attempts += 1;
            if self.put_mail(&mut txn, &person, &contact, &s, now).is_ok()
                && self.commit(txn, now, out).is_ok()
            {
                out.push(Output::SendMail(req));
            }
        }
    }

    /// Builds the mail, re-checking consent at send time (G-7).
    fn mail_request(&mut self, person: &str, contact_id: &str) -> Option<MailRequest> {
        let key = DocKey::new(Kind::Contacts, person).ok()?;
        let view = views::contacts(self.load(&key).ok()??).ok()?;
        if view.disclosure.do_not_disclose {
            return None;
        }
        let c = view
            .contacts
            .iter()
            .find(|c| c.contact_id == contact_id && c.consent)?;
        let p = self.store.person(person).ok()??;
        let loc = self.store.location(person).ok()?;
        let shelter = if view.disclosure.share_shelter {
            loc.as_ref()
                .and_then(|l| {
                    self.store
                        .shelters()
                        .ok()?
                        .into_iter()
                        .find(|s| s.shelter_id == l.shelter_id)
                })
                .map(|s| s.name)
        } else {
            None
        };
        let when = loc.map(|l| l.since_ms).unwrap_or(0);
        let (subject, body) =
            self.cfg
                .mail_templates
                .for_language(&c.language)
                .render(&crate::mailtext::MailFacts {
                    name: &p.name,
                    contact: &c.name,
                    arrived_ms: when,
                    shelter: shelter.as_deref(),
                });
        Some(MailRequest {
            message_id: Self::message_id(person, contact_id),
            to: c.email.clone(),
            subject,
            body,
            person_id: person.to_string(),
            contact_id: contact_id.to_string(),
        })
    }

    fn mail_outcome(
        &mut self,
        message_id: &str,
        outcome: MailOutcome,
        now: Now,
        out: &mut Vec<Output>,
    ) {
        let Some(((person, contact), mut s)) = self
            .mail
            .iter()
            .find(|(_, s)| s.message_id == message_id)
            .map(|(k, s)| (k.clone(), s.clone()))
        else {
            return;
        };
        match outcome {
            MailOutcome::Sent => s.status = MailStatus::Sent,
            MailOutcome::Permanent(r) => {
                s.status = MailStatus::FailedPermanent;
                s.reason = r.chars().take(200).collect();
            }
            MailOutcome::Transient(r) => {
                s.status = MailStatus::Pending;
                s.reason = r.chars().take(200).collect();
                s.next_attempt_ms = now.wall_ms + (30_000u64 << s.attempts.min(7)).min(3_600_000);
            }
            MailOutcome::Indeterminate(r) => {
                s.status = MailStatus::Indeterminate;
                s.indeterminate += 1;
                self.stats.duplicate_mail_risk += 1;
                s.reason = r.chars().take(200).collect();
                s.next_attempt_ms = now.wall_ms + 30_000;
            }
        }
        // The outcome must reach the other headquarters node, or it would
        // take the send over when the lease runs out: commit with gossip.
        let mut txn = Txn::default();
        if self.put_mail(&mut txn, &person, &contact, &s, now).is_ok() {
            let _ = self.commit(txn, now, out);
        }
    }
}

/// May this document be sent to a peer of this role and id?
pub(crate) fn may_send(role: Role, node: &NodeId, key: &DocKey) -> bool {
    #[cfg(feature = "mutants")]
    if crate::mutants::active(crate::mutants::Mutant::MedicalToShelter)
        && key.kind == Kind::Medical
        && role == Role::Shelter
    {
        return true;
    }
    policy::may_hold(role, node, key)
}

impl From<DocError> for CommandError {
    fn from(e: DocError) -> Self {
        CommandError::Rejected(e.to_string())
    }
}
