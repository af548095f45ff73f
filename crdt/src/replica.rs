//! One node's replica of its documents: the store, the in-memory index of
//! every document's heads, a bounded cache of loaded documents, the node's
//! durable identity (meta, actor id, hybrid logical clock) and the end of
//! its change log.
//!
//! Everything that reads or changes documents goes through here:
//!
//! - [`Replica::load`] materialises a document (cache, share, store; a
//!   document whose snapshot fails to load is rebuilt from its raw change
//!   log, A-10, or else set aside as damaged, below).
//! - [`Replica::write`] makes one local change (after the role check) and
//!   [`Replica::record`] adds received changes; both stage everything the
//!   commit needs (change bytes, heads, query rows, a snapshot every
//!   [`SNAPSHOT_EVERY`] changes) in a [`Txn`] and leave the changed
//!   document in the cache.
//! - [`Replica::persist`] makes a batch durable; [`Replica::committed`]
//!   then applies the transaction's in-memory effects (meta, index, log
//!   end) and hands back what the other parts react to ([`Committed`]:
//!   changes to gossip, documents touched). If the commit fails,
//!   [`Replica::forget`] drops the touched documents from the cache, so
//!   memory matches the store again.
//!
//! The engine decides *when* to commit (alone, or staged for a group
//! commit); the replica only knows *how*. It imports nothing from the
//! sync protocol, the commands or the engine.
//!
//! **Damaged documents** (A-8, A-10). A document whose stored changes do
//! not rebuild it to its stored heads is set aside ([`Replica::load`]
//! calls `set_aside`): its stored change rows are sorted into *kept* ones
//! (bytes that parse to the hash they are stored under, whose whole
//! ancestry is such rows, reachable from the stored heads) and *dropped*
//! ones (everything else, deleted, so they are never loaded or streamed
//! again); it is recorded as [`Damaged`] (with the stored heads and the
//! dropped changes this node wrote, which may exist nowhere else) and in
//! the quarantine table, and it leaves the index. From then on it is
//! refused to every reader and writer, reconciliation sees this node
//! lacking it, and the sessions ask every peer that may hold it for a
//! whole copy (`Sessions::request_repairs`). Changes that arrive for it
//! are checked like any others and applied to the kept changes only
//! ([`Replica::repair_base`]). It is served again once that copy is whole
//! and either knows the stored heads or came as a causally closed history
//! from a peer (a state that peer held): the commit stores a fresh
//! snapshot, replaces any stored row of the same hash (damage may have
//! moved one to another document), clears the damaged record and the
//! quarantine row, puts the document back in the index and emits
//! [`UiEvent::DocumentRepaired`]. Changes it held before the damage and
//! the rebuilt copy lacks (local changes no peer received) are lost; they
//! are counted in that event and a quarantine row names them for review.
//!
//! Invariants: a cached document is the stored one plus, at most, the
//! changes of the transactions not yet committed or forgotten; the index
//! changes only after a commit; a document is shared with other engines
//! only when it has no changes waiting for their dependencies; a damaged
//! document is never in the index and never served.

use crate::actor::{node_hash as actor_hash, Actor};
use crate::api::{CommandError, Now, Output, SessionId, UiEvent};
use crate::cache::{CacheSizes, DocCache};
use crate::derive;
use crate::derive::Applied;
use crate::doc::{guard, parse_change, At, Doc, DocError, Hash32};
use crate::hlc::HlcClock;
use crate::ids::{DocKey, Kind, NodeId, Role};
use crate::index::{Index, IndexFrom};
use crate::model::PresenceEvent;
use crate::policy;
#[cfg(not(any(test, feature = "share")))]
use crate::replica::no_share::DocShare;
#[cfg(any(test, feature = "share"))]
use crate::share::DocShare;
use crate::signing::{Author, Directory, Seal, Signer, Trust};
use crate::store::{
    Batch, ChangeRecord, Cursor, Damaged, DocState, Meta, Projection, Store, StoreError,
};
use automerge::Change;
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Heads as short hex, for error messages (the first 8 hex digits each).
fn heads_hex(heads: &[Hash32]) -> String {
    let parts: Vec<String> = heads
        .iter()
        .map(|h| h[..4].iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    format!("[{}]", parts.join(","))
}

/// Signs the changes this node made while it ran without its key (offline
/// commands) or before changes were signed: every unsigned change whose
/// actor is this node with this role. Unsigned changes of other authors
/// stay unsigned and are never relayed.
fn sign_own_unsigned<S: Store>(
    store: &mut S,
    signer: &Signer,
    role: Role,
    node_id: &NodeId,
    checked: u64,
) -> Result<u64, StoreError> {
    let own = actor_hash(node_id.as_str());
    let mut after = checked;
    loop {
        let page = store.unsigned(after, 4096)?;
        let Some((last, _)) = page.last() else {
            return Ok(after);
        };
        after = *last;
        let seals: Vec<(Hash32, Seal)> = page
            .iter()
            .filter_map(|(_, c)| {
                let change = parse_change(&c.bytes).ok()?;
                let actor = Actor::from_bytes(&change.actor_id().to_bytes())?;
                (actor.node_hash == own && actor.role == role).then(|| {
                    let seal = Seal {
                        author: own,
                        sig: signer.sign(&c.hash),
                    };
                    (c.hash, seal)
                })
            })
            .collect();
        if !seals.is_empty() {
            store.commit(&Batch {
                seals,
                ..Default::default()
            })?;
        }
    }
}

/// A new document with its first change and the rows derived from it,
/// built from nothing but its writes: a bulk import builds these on
/// several threads ([`crate::par::map`]) and the engine records them in order
/// ([`Replica::record_fresh`]). Building is most of an import's work
/// (Automerge, validation of the result, the rows).
pub(crate) struct Fresh {
    key: DocKey,
    /// Kept only when asked: a bulk import drops it on the thread that
    /// built it (freeing an Automerge document is not free), and its
    /// change is all the replica needs until the commit.
    doc: Option<Doc>,
    /// `None` when the writes changed nothing (none to write).
    change: Option<Change>,
    projection: Projection,
}

impl Fresh {
    /// `writes` as the first change of a new document `key` by `actor`.
    pub(crate) fn build(
        key: DocKey,
        actor: Actor,
        now: Now,
        writes: &[(String, Option<String>)],
        keep_doc: bool,
    ) -> Result<Fresh, CommandError> {
        let mut doc = Doc::new(key.clone());
        let change = doc
            .write(actor, (now.wall_ms / 1000) as i64, "", writes)
            .map_err(|e| CommandError::Rejected(e.to_string()))?;
        let projection = match guard("read", || derive::projection(&doc)) {
            Ok(Ok(p)) => p,
            Ok(Err(e)) | Err(e) => return Err(CommandError::Rejected(e.to_string())),
        };
        Ok(Fresh {
            key,
            doc: keep_doc.then_some(doc),
            change,
            projection,
        })
    }
}

/// A compacted snapshot is stored after this many logged changes.
pub(crate) const SNAPSHOT_EVERY: u32 = 32;

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

/// One command's or frame's pending writes, committed at once.
#[derive(Default)]
pub(crate) struct Txn {
    pub(crate) batch: Batch,
    pub(crate) touched: BTreeSet<DocKey>,
    /// New heads of each changed document, and whether it is whole (no
    /// changes waiting for their dependencies).
    heads: BTreeMap<DocKey, (Vec<Hash32>, bool)>,
    /// New changes to gossip, with the session they came from.
    gossip: Vec<Gossip>,
    pub(crate) meta: Option<Meta>,
    /// Credentials received from a peer (also in `batch.credentials`):
    /// kept in the directory once the commit is durable, never before.
    pub(crate) authors: Vec<(crate::signing::AuthorHash, Author, Arc<[u8]>)>,
    /// Damaged documents this transaction rebuilds, with how many of the
    /// changes they held before the damage the rebuilt copy lacks.
    pub(crate) repaired: BTreeMap<DocKey, u32>,
}

/// A new change to push to connected peers.
pub(crate) struct Gossip {
    pub(crate) key: DocKey,
    pub(crate) bytes: Vec<u8>,
    pub(crate) hash: Hash32,
    /// `None` for a change made offline, not relayed until signed.
    pub(crate) seal: Option<Seal>,
    /// The session it arrived on (not sent back there).
    pub(crate) from: Option<SessionId>,
}

/// What a durable transaction means for the other parts of the engine.
pub(crate) struct Committed {
    pub(crate) gossip: Vec<Gossip>,
    /// Outbox documents changed (headquarters refreshes its mail state).
    pub(crate) outbox: Vec<DocKey>,
    /// Presence documents changed (arrivals, shelter staleness).
    pub(crate) presence: Vec<DocKey>,
}

pub(crate) struct Replica<S: Store> {
    pub(crate) store: S,
    pub(crate) meta: Meta,
    pub(crate) actor: Actor,
    pub(crate) hlc: HlcClock,
    pub(crate) index: Index,
    cache: DocCache,
    /// Documents materialised by other engines in this process (simulator,
    /// `share` feature; always `None` in a node).
    pub(crate) share: Option<DocShare>,
    /// The newest entry of our change log.
    pub(crate) log_end: Option<Cursor>,
    /// Our signing key and the verifier of everyone's credentials.
    pub(crate) trust: Trust,
    /// Verified author credentials (ours included).
    pub(crate) directory: Directory,
    /// Set while a bulk import runs: a document that `write` creates
    /// leaves the cache as soon as its change is recorded (see
    /// `unsettled`). Imported documents are written once and rarely read
    /// soon after; cached, each pushed an older document out and was
    /// itself freed later, cold (freeing evicted documents was a seventh
    /// of an import's CPU).
    pub(crate) write_once: bool,
    /// Documents created under `write_once` whose transaction is not
    /// durable yet, with their one change: the store and the index do not
    /// have them until the commit, so a later command of the same group
    /// that reads one gets it rebuilt from this change (not a new empty
    /// document, which would fork it). Emptied by `committed` and
    /// `forget`.
    unsettled: FxHashMap<DocKey, Vec<u8>>,
    /// Threads a bulk import builds its new documents on (see [`Fresh`]
    /// and [`crate::par::map`]); 1 builds them on the engine's own thread.
    pub(crate) build_threads: usize,
    /// Documents set aside as damaged, waiting for a peer's copy (never in
    /// the index, never served).
    pub(crate) damaged: BTreeMap<DocKey, Damaged>,
    #[cfg(feature = "mutants")]
    deferred: Option<Batch>,
}

impl<S: Store> Replica<S> {
    /// What the document cache holds now.
    pub(crate) fn cache_sizes(&self) -> CacheSizes {
        self.cache.sizes()
    }

    /// Write-once documents not yet durable (see `unsettled`).
    pub(crate) fn unsettled_len(&self) -> usize {
        self.unsettled.len()
    }

    /// Opens the node's replica: checks the store belongs to this node,
    /// bumps and persists the incarnation (so the actor id is new), and
    /// loads the index (see [`IndexFrom`]).
    pub(crate) fn open(
        mut store: S,
        node_id: &NodeId,
        role: Role,
        cache_docs: usize,
        now: Now,
        index: IndexFrom,
        trust: Trust,
    ) -> Result<Self, EngineError> {
        let meta = match store.load_meta()? {
            Some(m) => {
                if &m.node_id != node_id || m.role != role {
                    return Err(EngineError::WrongNode {
                        found: m.node_id,
                        found_role: m.role,
                        expected: node_id.clone(),
                        expected_role: role,
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
                node_id: node_id.clone(),
                role,
                incarnation: 1,
                hlc: Default::default(),
                audit_seq: 0,
                audit_head: String::new(),
                unsigned_checked: 0,
            },
        };
        let mut hlc = HlcClock::new(meta.hlc);
        let meta = Meta {
            hlc: hlc.tick(now.wall_ms),
            ..meta
        };
        // Our own credential must name us; stored ones are checked again
        // (one expired since is dropped from memory: its changes already
        // held stay, new ones are refused). Every stored credential of an
        // author is kept (a rotated node's older changes carry its older
        // keys), in the order they arrived; our own comes last, as our
        // newest.
        let mut directory = Directory::default();
        for (_, cred) in store.credentials()? {
            let _ = directory.admit(&cred, &*trust.verifier);
        }
        let mut credentials = Vec::new();
        if let Some(signer) = &trust.signer {
            // Our own credential is taken as given (a device clock outside
            // its validity must not stop the node, B-2); the driver checked
            // that it binds this signing key.
            let own = signer.credential().clone();
            let h = directory.own(
                Author {
                    node: node_id.clone(),
                    role,
                    key: signer.public_key(),
                    serial: Vec::new(),
                },
                own.clone(),
            );
            credentials.push((h, own.to_vec()));
        }
        store.commit(&Batch {
            meta: Some(meta.clone()),
            credentials,
            ..Default::default()
        })?;
        let mut meta = meta;
        if let Some(signer) = &trust.signer {
            let checked =
                sign_own_unsigned(&mut store, signer, role, node_id, meta.unsigned_checked)?;
            if checked != meta.unsigned_checked {
                meta.unsigned_checked = checked;
                store.commit(&Batch {
                    meta: Some(meta.clone()),
                    ..Default::default()
                })?;
            }
        }
        let mut index = match index {
            IndexFrom::Identical(i) => Index::from_map(i.0),
            IndexFrom::Over(base) => Index::build_over(&base, store.doc_index()?),
            IndexFrom::Store => Index::build(store.doc_index()?),
        };
        let damaged: BTreeMap<DocKey, Damaged> = store
            .damaged()?
            .into_iter()
            .map(|d| (d.key.clone(), d))
            .collect();
        for k in damaged.keys() {
            index.remove(k);
        }
        let actor = Actor::new(role, node_id, meta.incarnation);
        let log_end = store.log_end()?;
        Ok(Replica {
            store,
            meta,
            actor,
            hlc,
            index,
            cache: DocCache::new(cache_docs.max(16)),
            share: None,
            log_end,
            trust,
            directory,
            write_once: false,
            unsettled: FxHashMap::default(),
            build_threads: 1,
            damaged,
            #[cfg(feature = "mutants")]
            deferred: None,
        })
    }

    /// A document, from the cache, the share or the store; `None` if this
    /// node does not hold it.
    pub(crate) fn load(&mut self, key: &DocKey) -> Result<Option<&Doc>, StoreError> {
        if self.damaged.contains_key(key) {
            // Its cached copy, if any, is a repair in progress.
            return Err(StoreError::Corrupt(format!(
                "{key}: quarantined: its stored changes were damaged; waiting for a copy from a peer"
            )));
        }
        if !self.cache.contains(key) {
            if let Some(change) = self.unsettled.get(key) {
                let doc = Doc::load(key.clone(), None, std::slice::from_ref(change))
                    .map_err(|e| StoreError::Corrupt(format!("{key}: {e}")))?;
                self.cache.insert(Arc::new(doc));
                return Ok(self.cache.get(key).map(|d| &**d));
            }
            // The index names every document the store holds (built from
            // it, changed only after a commit), so a key it lacks is not
            // stored: no store round trip for a document not created yet.
            if self.index.get(key).is_none() {
                return Ok(None);
            }
            let shared = match (&self.share, self.index.get(key)) {
                (Some(share), Some(e)) if e.whole => share.doc(key, &e.at.heads),
                _ => None,
            };
            if let Some(doc) = shared {
                self.cache.insert(doc);
                return Ok(self.cache.get(key).map(|d| &**d));
            }
            let Some(stored) = self.store.load_doc(key)? else {
                return Ok(None);
            };
            // What was loaded must be exactly what the index (the stored
            // heads) names: a change row lost or moved to another document,
            // or a snapshot position pointing past changes, would otherwise
            // load cleanly and serve an older value. Automerge checks
            // each chunk's own checksum; only this checks the set.
            let expected = self.index.get(key).map(|e| e.at.heads.clone());
            let checked = |r: Result<Doc, DocError>| -> Result<Doc, String> {
                let d = r.map_err(|e| e.to_string())?;
                match &expected {
                    Some(h) if *h != d.heads() => Err(format!(
                        "{key}: loaded heads {} differ from the stored heads {}",
                        heads_hex(&d.heads()),
                        heads_hex(h)
                    )),
                    _ => Ok(d),
                }
            };
            let doc = match checked(Doc::load(
                key.clone(),
                stored.snapshot.as_deref(),
                &stored.changes,
            )) {
                Ok(d) => d,
                Err(first) => {
                    // A damaged snapshot: rebuild from the raw change log.
                    let all = self.store.doc_changes(key)?;
                    match checked(Doc::load(key.clone(), None, &all)) {
                        Ok(d) => d,
                        Err(_) => {
                            // Never served: set aside until a peer's copy
                            // rebuilds it.
                            self.set_aside(key, &first);
                            return Err(StoreError::Corrupt(first));
                        }
                    }
                }
            };
            let doc = Arc::new(doc);
            let whole = !doc.has_waiting();
            self.index.set_whole(key, whole);
            if let (Some(share), true) = (&self.share, whole) {
                share.put_doc(doc.clone());
            }
            self.cache.insert(doc);
        }
        Ok(self.cache.get(key).map(|d| &**d))
    }

    /// Every applied change of a document, in canonical order: what a peer
    /// that holds none of it is sent. A document not in the cache is read
    /// from its stored change log without being built, when those changes
    /// are exactly the history the index names (each change parses, none
    /// twice, every dependency among them, and the ones nothing depends on
    /// are the stored heads). Otherwise, and for a cached, unsettled or
    /// damaged document, it is [`Replica::load`]ed, which finds damage and
    /// sets it aside. A new node's first sync reads every document once;
    /// building each (and pushing the working set out of the cache) cost
    /// the sender a quarter of that sync.
    pub(crate) fn history(&mut self, key: &DocKey) -> Result<Option<Vec<Change>>, StoreError> {
        let cold = !self.cache.contains(key)
            && !self.unsettled.contains_key(key)
            && !self.damaged.contains_key(key);
        if let (true, Some(entry)) = (cold, self.index.get(key)) {
            let heads = entry.at.heads.clone();
            if let Some(changes) = self.stored_history(key, heads)? {
                return Ok(Some(changes));
            }
        }
        Ok(self.load(key)?.map(|d| d.changes_since(&[])))
    }

    /// The stored changes of `key` in canonical order if they are exactly
    /// the history whose heads are `heads` (see [`Replica::history`]).
    fn stored_history(
        &self,
        key: &DocKey,
        mut heads: Vec<Hash32>,
    ) -> Result<Option<Vec<Change>>, StoreError> {
        let mut changes = Vec::new();
        for bytes in self.store.doc_changes(key)? {
            match self.parse(&bytes) {
                Ok(c) => changes.push(Arc::unwrap_or_clone(c)),
                Err(_) => return Ok(None),
            }
        }
        let hashes: FxHashSet<Hash32> = changes.iter().map(|c| c.hash().0).collect();
        if hashes.len() != changes.len() {
            return Ok(None);
        }
        let mut depended_on = FxHashSet::default();
        for d in changes.iter().flat_map(|c| c.deps()) {
            if !hashes.contains(&d.0) {
                return Ok(None);
            }
            depended_on.insert(d.0);
        }
        let mut tips: Vec<Hash32> = hashes.difference(&depended_on).copied().collect();
        tips.sort_unstable();
        heads.sort_unstable();
        Ok((tips == heads).then(|| crate::doc::canonical_order(changes)))
    }

    /// Sets a document whose stored changes failed to rebuild it aside as
    /// damaged (see the module docs): sorts its rows into kept and dropped
    /// ones, deletes the dropped ones, records the damage and takes the
    /// document out of the index and the cache. If that commit fails the
    /// document is still refused here, and found damaged again at the next
    /// start.
    fn set_aside(&mut self, key: &DocKey, reason: &str) {
        let heads = self.index.get(key).map_or(vec![], |e| e.at.heads.clone());
        let records = self.store.doc_records(key).unwrap_or_default();
        // Intact rows: bytes that parse to the hash they are stored under.
        let mut intact: FxHashMap<Hash32, Vec<Hash32>> = FxHashMap::default();
        for r in &records {
            if let Ok(c) = parse_change(&r.bytes) {
                if c.hash().0 == r.hash {
                    intact.insert(r.hash, c.deps().iter().map(|d| d.0).collect());
                }
            }
        }
        // Whole: intact with every ancestor intact (rows are in log order,
        // nearly always dependencies first, so this settles in a pass or two).
        let mut whole: FxHashSet<Hash32> = FxHashSet::default();
        loop {
            let before = whole.len();
            for r in &records {
                if let Some(deps) = intact.get(&r.hash) {
                    if !whole.contains(&r.hash) && deps.iter().all(|d| whole.contains(d)) {
                        whole.insert(r.hash);
                    }
                }
            }
            if whole.len() == before {
                break;
            }
        }
        // Kept: whole and reachable from the stored heads, so a row that
        // damage moved here from another document is not applied.
        let mut reached: FxHashSet<Hash32> = FxHashSet::default();
        let mut stack: Vec<Hash32> = heads.clone();
        while let Some(h) = stack.pop() {
            if let Some(deps) = intact.get(&h) {
                if reached.insert(h) {
                    stack.extend(deps.iter().copied());
                }
            }
        }
        let own = self.actor.node_hash;
        let mut dropped = Vec::new();
        let mut at_risk = Vec::new();
        for r in &records {
            if whole.contains(&r.hash) && reached.contains(&r.hash) {
                continue;
            }
            dropped.push(r.hash);
            // Ours, or unsigned (made offline here): maybe held nowhere else.
            if r.seal.is_none_or(|s| s.author == own) {
                at_risk.push(r.hash);
            }
        }
        let damage = Damaged {
            key: key.clone(),
            heads,
            at_risk,
        };
        let why = format!(
            "{reason}; set aside, {} of {} stored changes dropped, waiting for a copy from a peer",
            dropped.len(),
            records.len()
        );
        let _ = self.store.commit(&Batch {
            damaged: vec![damage.clone()],
            drop_changes: dropped,
            quarantine: vec![(key.clone(), why)],
            ..Default::default()
        });
        self.index.remove(key);
        self.cache.remove(key);
        self.damaged.insert(key.clone(), damage);
    }

    /// The copy of a damaged document that received changes are applied
    /// to: the repair in progress if cached, else one built from its kept
    /// rows (and changes received for it since).
    pub(crate) fn repair_base(&mut self, key: &DocKey) -> Result<Arc<Doc>, StoreError> {
        if let Some(d) = self.cache.remove(key) {
            return Ok(d);
        }
        let rows = self.store.doc_changes(key)?;
        Doc::load(key.clone(), None, &rows)
            .map(Arc::new)
            .map_err(|e| StoreError::Corrupt(format!("{key}: {e}")))
    }

    /// Puts a document (back) into the cache.
    pub(crate) fn put_back(&mut self, doc: Arc<Doc>) {
        self.cache.insert(doc);
    }

    /// The cached document to change in place (copied first if another
    /// engine shares it); a new empty one if it does not exist yet.
    fn load_or_new(&mut self, key: &DocKey) -> Result<&mut Doc, StoreError> {
        if self.load(key)?.is_none() {
            self.cache.insert(Arc::new(Doc::new(key.clone())));
        }
        Ok(Arc::make_mut(
            self.cache.get_mut(key).expect("just inserted"),
        ))
    }

    /// Takes a document out of the cache to change it: the caller puts it
    /// back only if the change is valid, so a failed change leaves no trace
    /// in memory. `None` for a document this node does not have yet.
    pub(crate) fn take(&mut self, key: &DocKey) -> Result<Option<Arc<Doc>>, StoreError> {
        if self.load(key)?.is_none() {
            return Ok(None);
        }
        Ok(self.cache.remove(key))
    }

    /// Writes fields of a document as one local change, validating the
    /// result, and records everything in the transaction. Refused unless
    /// this node's role may write the document.
    pub(crate) fn write(
        &mut self,
        txn: &mut Txn,
        key: &DocKey,
        writes: Vec<(String, Option<String>)>,
        now: Now,
    ) -> Result<(), CommandError> {
        if !policy::may_write(self.meta.role, &self.meta.node_id, key) {
            return Err(CommandError::Forbidden {
                role: self.meta.role,
                action: format!("write {} documents", key.kind),
            });
        }
        if self.is_fresh(key)? {
            let fresh = Fresh::build(key.clone(), self.actor, now, &writes, true);
            return self.record_fresh(txn, fresh?);
        }
        let actor = self.actor;
        let share = self.share.is_some();
        let doc = self.load_or_new(key)?;
        let before = if share { doc.heads() } else { vec![] };
        let change = match doc.write(actor, (now.wall_ms / 1000) as i64, "", &writes) {
            Ok(c) => c,
            Err(e) => {
                // After a panic the cached document is in an unknown state.
                self.evict(key);
                return Err(CommandError::Rejected(e.to_string()));
            }
        };
        let Some(change) = change else { return Ok(()) };
        let projection = match guard("read", || derive::projection(doc)) {
            Ok(Ok(p)) => Arc::new(p),
            Ok(Err(e)) | Err(e) => {
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
        let seal = self.seal(&change);
        self.record(txn, key, vec![(change, seal)], projection, None);
        Ok(())
    }

    /// Our signature of a change we made (none while offline).
    fn seal(&self, change: &Change) -> Option<Seal> {
        self.trust.signer.as_ref().map(|s| Seal {
            author: self.actor.node_hash,
            sig: s.sign(&change.hash().0),
        })
    }

    /// Whether writing `key` now creates it as a write-once document (a
    /// bulk import's new document: built as a [`Fresh`], recorded by
    /// [`Replica::record_fresh`]).
    pub(crate) fn is_fresh(&mut self, key: &DocKey) -> Result<bool, StoreError> {
        Ok(self.write_once && self.load(key)?.is_none())
    }

    /// Whether recording a new document needs the document itself, not
    /// just its change: to share it (simulator) or to snapshot a rebuilt
    /// one. [`Fresh::build`] is told to keep it then.
    pub(crate) fn needs_doc(&self, txn: &Txn, key: &DocKey) -> bool {
        self.share.is_some() || txn.repaired.contains_key(key)
    }

    /// Records a document [`Fresh::build`] made (for a key
    /// [`Replica::is_fresh`] said so of), as `write` records any change;
    /// then the document leaves the cache and waits in `unsettled` until
    /// the commit.
    pub(crate) fn record_fresh(&mut self, txn: &mut Txn, fresh: Fresh) -> Result<(), CommandError> {
        let Fresh {
            key,
            doc,
            change,
            projection,
        } = fresh;
        if !policy::may_write(self.meta.role, &self.meta.node_id, &key) {
            return Err(CommandError::Forbidden {
                role: self.meta.role,
                action: format!("write {} documents", key.kind),
            });
        }
        let Some(change) = change else { return Ok(()) };
        let projection = Arc::new(projection);
        txn.touched.insert(key.clone());
        let seal = self.seal(&change);
        let bytes = change.raw_bytes().to_vec();
        match doc {
            // Shared (simulator) or rebuilt: recorded from the cache like
            // any change, then freed while its memory is still warm.
            Some(doc) if self.needs_doc(txn, &key) => {
                let doc = Arc::new(doc);
                if let Some(share) = &self.share {
                    let applied = Applied {
                        doc: doc.clone(),
                        projection: Ok(projection.clone()),
                    };
                    share.put_applied(&[], &[change.hash().0], applied);
                }
                self.cache.insert(doc);
                self.record(txn, &key, vec![(change, seal)], projection, None);
                self.cache.remove(&key);
            }
            // Its change is all the commit needs: one head, nothing
            // waiting, no snapshot (a first change).
            Some(_) | None => {
                let heads = vec![change.hash().0];
                self.unsettled.remove(&key);
                self.cache.pin(&key);
                self.stage(txn, &key, vec![(change, seal)], None, heads, true, None);
                txn.batch.projections.push((key.clone(), projection));
            }
        }
        self.unsettled.insert(key, bytes);
        Ok(())
    }

    /// Adds new changes of a document (already applied to the cached doc
    /// and validated, which gave `projection`) and its new heads, query
    /// rows and maybe a snapshot to the transaction.
    pub(crate) fn record(
        &mut self,
        txn: &mut Txn,
        key: &DocKey,
        changes: Vec<(Change, Option<Seal>)>,
        projection: Arc<Projection>,
        from: Option<SessionId>,
    ) {
        // A document with a second change in the group is the cache's
        // again (it was loaded to be changed).
        self.unsettled.remove(key);
        // Until the commit the store holds an older state: never dropped.
        self.cache.pin(key);
        let tail = self.index.get(key).map_or(0, |e| e.tail) + changes.len() as u32;
        let doc = self.cache.get(key).expect("recorded documents are loaded");
        let heads = doc.heads();
        // A snapshot that fails is skipped: the change log has everything.
        // A rebuilt document gets one at once: its load then needs none of
        // the rows older than the rebuild.
        let snapshot = (tail >= SNAPSHOT_EVERY || txn.repaired.contains_key(key))
            .then(|| doc.save().ok())
            .flatten();
        let whole = !doc.has_waiting();
        self.stage(txn, key, changes, from, heads, whole, snapshot);
        txn.batch.projections.push((key.clone(), projection));
    }

    /// The rows of `record`: the changes, to the log and to gossip, and
    /// the document's new heads (and snapshot).
    #[allow(clippy::too_many_arguments)]
    fn stage(
        &mut self,
        txn: &mut Txn,
        key: &DocKey,
        changes: Vec<(Change, Option<Seal>)>,
        from: Option<SessionId>,
        heads: Vec<Hash32>,
        whole: bool,
        snapshot: Option<Vec<u8>>,
    ) {
        for (c, seal) in changes {
            let hash = c.hash().0;
            let bytes = c.raw_bytes().to_vec();
            txn.batch.changes.push(ChangeRecord {
                key: key.clone(),
                hash,
                bytes: bytes.clone(),
                seal,
            });
            txn.gossip.push(Gossip {
                key: key.clone(),
                bytes,
                hash,
                seal,
                from,
            });
        }
        // A batch's snapshot of a document covers every change of it in the
        // batch, so only the newest state of each document is kept. `heads`
        // has a key exactly when `docs` holds its state (both are written
        // only here), so the scan runs only for a document recorded twice
        // (a scan per record made a batch quadratic).
        if txn.heads.contains_key(key) {
            txn.batch.docs.retain(|d| d.key != *key);
        }
        txn.batch.docs.push(DocState {
            key: key.clone(),
            heads: heads.clone(),
            snapshot,
        });
        txn.heads.insert(key.clone(), (heads, whole));
    }

    /// Parses a received change (once per process with a share).
    pub(crate) fn parse(&self, bytes: &[u8]) -> Result<Arc<Change>, DocError> {
        match &self.share {
            Some(share) => share.parse(bytes),
            None => parse_change(bytes).map(Arc::new),
        }
    }

    /// `base` with `new` applied, and the rows derived from the result;
    /// from the share when another engine already computed exactly this.
    pub(crate) fn apply_changes(
        &mut self,
        base: Arc<Doc>,
        new: &[Change],
    ) -> Result<Applied, DocError> {
        // A document with changes waiting for dependencies is more than its
        // heads: neither looked up nor offered.
        let share = self.share.clone().filter(|_| !base.has_waiting());
        let (heads, added): (Vec<Hash32>, Vec<Hash32>) = match &share {
            Some(_) => (base.heads(), new.iter().map(|c| c.hash().0).collect()),
            None => Default::default(),
        };
        if let Some(hit) = share
            .as_ref()
            .and_then(|s| s.applied(&base.key, &heads, &added))
        {
            return Ok(hit);
        }
        // Not shared with anyone: changed in place, no copy.
        // A panic in either step drops `doc` (the caller's copy of the
        // document is gone from the cache too, so nothing half-applied stays).
        let mut doc = Arc::try_unwrap(base).unwrap_or_else(|shared| (*shared).clone());
        doc.apply(new.to_vec())?;
        let projection = guard("read", || derive::projection(&doc))?
            .map(Arc::new)
            .map_err(|e| e.to_string());
        let applied = Applied {
            doc: Arc::new(doc),
            projection,
        };
        if let (Some(s), false) = (&share, applied.doc.has_waiting()) {
            s.put_applied(&heads, &added, applied.clone());
        }
        Ok(applied)
    }

    /// The presence events of a document this node holds (`None` if it
    /// holds none or they do not parse).
    pub(crate) fn presence_events(&mut self, key: &DocKey) -> Option<Arc<Vec<PresenceEvent>>> {
        let share = self.share.clone();
        let doc = self.load(key).ok()??;
        match &share {
            Some(s) => s.presence_events(doc),
            None => derive::presence_events(doc).map(Arc::new),
        }
        .ok()
    }

    /// Presence document of a person: their household's, or their own for
    /// a field-registered person.
    pub(crate) fn presence_key(&self, person_id: &str) -> Result<DocKey, CommandError> {
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

    fn evict(&mut self, key: &DocKey) {
        self.cache.remove(key);
    }

    /// Drops every document a failed transaction touched from the cache,
    /// so memory matches the store again.
    pub(crate) fn forget(&mut self, txn: &Txn) {
        for k in txn.touched.iter().chain(txn.heads.keys()) {
            self.evict(k);
            self.cache.unpin(k);
            self.unsettled.remove(k);
        }
    }

    /// Makes a batch durable.
    pub(crate) fn persist(&mut self, batch: &Batch) -> Result<(), StoreError> {
        #[cfg(feature = "mutants")]
        if crate::mutants::active(crate::mutants::Mutant::SkipDurability) && !batch.ops.is_empty() {
            // The planted bug: acknowledge first, write on the next input.
            self.deferred = Some(batch.clone());
            return Ok(());
        }
        self.store.commit(batch)
    }

    /// With the `SkipDurability` mutant: the write it put off.
    #[cfg(feature = "mutants")]
    pub(crate) fn persist_deferred(&mut self) {
        if let Some(b) = self.deferred.take() {
            let _ = self.store.commit(&b);
        }
    }

    /// The in-memory effects of a durable transaction: meta, index, a
    /// `DocumentChanged` event per document, log end. Returns what the
    /// other parts react to.
    pub(crate) fn committed(&mut self, mut txn: Txn, out: &mut Vec<Output>) -> Committed {
        if let Some(m) = txn.meta.take() {
            self.meta = m;
        }
        let mut done = Committed {
            gossip: Vec::new(),
            outbox: Vec::new(),
            presence: Vec::new(),
        };
        // The documents whose newest staged state carries a snapshot, in
        // one pass (a search per document made a batch quadratic).
        let mut snapshotted = BTreeMap::new();
        for d in &txn.batch.docs {
            snapshotted.insert(&d.key, d.snapshot.is_some());
        }
        for (key, (heads, whole)) in txn.heads {
            if let Some(lost) = txn.repaired.get(&key) {
                self.damaged.remove(&key);
                out.push(Output::Event(UiEvent::DocumentRepaired {
                    kind: key.kind,
                    id: key.id.clone(),
                    lost_changes: *lost,
                }));
            }
            if self.damaged.contains_key(&key) {
                // Received changes of a damaged document not whole yet:
                // stored, still refused, still out of the index.
                self.unsettled.remove(&key);
                self.cache.unpin(&key);
                continue;
            }
            let snap = snapshotted.get(&key).copied().unwrap_or(false);
            // `whole` is known at `record`: the document may have left the
            // cache since (a frame with more documents than the cache holds).
            // One `At` per (document, heads) for every engine that shares.
            let at = match &self.share {
                Some(s) => s.at(&key, heads),
                None => Arc::new(At::new(&key, heads)),
            };
            self.index.update(&key, at, whole, snap);
            // Durable and in the index: loaded from the store from now on.
            self.unsettled.remove(&key);
            self.cache.unpin(&key);
            match key.kind {
                Kind::Outbox => done.outbox.push(key.clone()),
                Kind::Presence => done.presence.push(key.clone()),
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
        for (h, author, cred) in txn.authors {
            self.directory.insert(h, author, cred);
        }
        done.gossip = txn.gossip;
        done
    }
}

/// Without the `share` feature a replica has no share: this stand-in has no
/// values, so `Option<DocShare>` is always `None` and the code that would
/// consult one compiles away.
#[cfg(not(any(test, feature = "share")))]
mod no_share {
    use crate::derive::Applied;
    use crate::doc::{Doc, DocError, Hash32};
    use crate::ids::DocKey;
    use crate::model::PresenceEvent;
    use automerge::Change;
    use std::sync::Arc;

    pub(crate) enum DocShare {}

    impl Clone for DocShare {
        fn clone(&self) -> Self {
            match *self {}
        }
    }

    impl DocShare {
        pub(crate) fn doc(&self, _: &DocKey, _: &[Hash32]) -> Option<Arc<Doc>> {
            match *self {}
        }
        pub(crate) fn put_doc(&self, _: Arc<Doc>) {
            match *self {}
        }
        pub(crate) fn applied(&self, _: &DocKey, _: &[Hash32], _: &[Hash32]) -> Option<Applied> {
            match *self {}
        }
        pub(crate) fn put_applied(&self, _: &[Hash32], _: &[Hash32], _: Applied) {
            match *self {}
        }
        pub(crate) fn parse(&self, _: &[u8]) -> Result<Arc<Change>, DocError> {
            match *self {}
        }
        pub(crate) fn presence_events(&self, _: &Doc) -> Result<Arc<Vec<PresenceEvent>>, DocError> {
            match *self {}
        }
        pub(crate) fn at(&self, _: &DocKey, _: Vec<Hash32>) -> Arc<crate::doc::At> {
            match *self {}
        }
    }
}
