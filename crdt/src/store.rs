//! The synchronous storage contract the engine writes through, and an
//! in-memory implementation for tests and the simulator.
//!
//! A [`Batch`] is one transaction: new changes appended to the raw change
//! log, the heads (and now and then a compacted snapshot) of every touched
//! document, the projection rows derived from those documents, recorded
//! operation results (for idempotent retries) and sync state. `commit`
//! returns only once the batch is durable; the engine acknowledges nothing
//! before that. The same [`conformance`] suite runs against [`MemStore`]
//! here and against the SQLite store in `node`.

use crate::doc::Hash32;
use crate::hlc::Hlc;
use crate::ids::{DocKey, NodeId, Role};
use crate::signing::{AuthorHash, Seal};
use imbl::{OrdMap, Vector};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Updates `m[k]` in place, inserting `new()` first when absent: one tree
/// walk for a key that exists (`OrdMap::entry` walks twice).
pub fn upsert<K: Ord + Clone, V: Clone>(
    m: &mut OrdMap<K, V>,
    k: &K,
    new: impl FnOnce() -> V,
    update: impl FnOnce(&mut V),
) {
    match m.get_mut(k) {
        Some(v) => update(v),
        None => {
            let mut v = new();
            update(&mut v);
            m.insert(k.clone(), v);
        }
    }
}

/// Where each change is in a [`MemStore`]'s log, by hash: a base shared by
/// every copy of the store, and this copy's own entries over it.
///
/// The simulator opens hundreds of nodes on copies of one provisioned
/// store. A persistent hash map (as this was) shares memory between the
/// copies only until they write: change hashes are uniform, so each new
/// change copies a different path of the tree, about 1.5 to 2.4 KB per
/// change per node. Here a copy's own changes cost one plain map entry, and
/// the base is never copied. [`ChangePositions::share`] folds a copy's own
/// entries into a new base, once, before it is copied many times.
#[derive(Clone, Debug, Default)]
pub struct ChangePositions {
    base: Arc<FxHashMap<Hash32, usize>>,
    /// This copy's entries; `None` removes a base entry.
    own: FxHashMap<Hash32, Option<usize>>,
    len: usize,
}

impl ChangePositions {
    pub fn get(&self, h: &Hash32) -> Option<&usize> {
        match self.own.get(h) {
            Some(v) => v.as_ref(),
            None => self.base.get(h),
        }
    }
    pub fn contains_key(&self, h: &Hash32) -> bool {
        self.get(h).is_some()
    }
    pub fn insert(&mut self, h: Hash32, at: usize) -> Option<usize> {
        let old = self.get(&h).copied();
        self.own.insert(h, Some(at));
        if old.is_none() {
            self.len += 1;
        }
        old
    }
    pub fn remove(&mut self, h: &Hash32) -> Option<usize> {
        let old = self.get(h).copied();
        if old.is_some() {
            if self.base.contains_key(h) {
                self.own.insert(*h, None);
            } else {
                self.own.remove(h);
            }
            self.len -= 1;
        }
        old
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Every (hash, position), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Hash32, &usize)> {
        let own = self
            .own
            .iter()
            .filter_map(|(h, v)| v.as_ref().map(|v| (h, v)));
        let base = self.base.iter().filter(|(h, _)| !self.own.contains_key(*h));
        own.chain(base)
    }
    /// Fold this copy's own entries into its base, so that copies made
    /// from now on share all of them.
    pub fn share(&mut self) {
        if self.own.is_empty() {
            return;
        }
        let mut base: FxHashMap<Hash32, usize> = (*self.base).clone();
        // Taken, not drained: a drained map keeps its capacity, and every
        // copy would allocate that much again.
        for (h, v) in std::mem::take(&mut self.own) {
            match v {
                Some(at) => base.insert(h, at),
                None => base.remove(&h),
            };
        }
        self.base = Arc::new(base);
    }
}

impl PartialEq for ChangePositions {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().all(|(h, v)| other.get(h) == Some(v))
    }
}
impl Eq for ChangePositions {}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("storage full: the write was not saved")]
    Full,
    #[error("storage I/O error: {0}")]
    Io(String),
    #[error("database is corrupt: {0}")]
    Corrupt(String),
    #[error("database belongs to another node or program: {0}")]
    Foreign(String),
    #[error("database version {found} is newer than this program (knows up to {known})")]
    TooNew { found: u32, known: u32 },
}

/// Identity and clocks of the node owning the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub node_id: NodeId,
    pub role: Role,
    /// Bumped and persisted at every start; part of the actor id.
    pub incarnation: u32,
    pub hlc: Hlc,
    /// Next audit sequence number and chain head.
    pub audit_seq: u64,
    pub audit_head: String,
    /// The change log up to this sequence number has been searched for
    /// this node's own unsigned changes (those written by commands run
    /// without its key), so a start searches only what came after: the
    /// unsigned changes of other authors stored before changes were signed
    /// are not parsed again at every start.
    #[serde(default)]
    pub unsigned_checked: u64,
}

/// A raw Automerge change, addressed by its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeRecord {
    pub key: DocKey,
    pub hash: Hash32,
    pub bytes: Vec<u8>,
    /// The author's signature. Every change recorded by this version has
    /// one; `None` only for a change stored before changes were signed,
    /// which is kept but never relayed.
    pub seal: Option<Seal>,
}

/// New heads of a touched document, with a compacted snapshot from time
/// to time (the change log stays beside it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocState {
    pub key: DocKey,
    pub heads: Vec<Hash32>,
    pub snapshot: Option<Vec<u8>>,
}

/// A person as the query tables know them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PersonRow {
    pub person_id: String,
    pub household_id: Option<String>,
    pub name: String,
    pub kana: String,
    pub search_key: String,
    pub birth_date: Option<String>,
    /// The address district of a registry resident (see
    /// [`crate::derive::district_of`]); `None` for persons registered in
    /// the field.
    #[serde(default)]
    pub district: Option<String>,
}

/// Residents of one address district, and how many of them are accounted
/// for (have any presence: checked in, out or pending somewhere).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DistrictCount {
    pub district: String,
    pub residents: u32,
    pub accounted: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocationStatus {
    In,
    Out,
    /// Derived from events whose predecessors have not arrived yet (D-4).
    Pending,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LocationRow {
    pub person_id: String,
    pub shelter_id: String,
    pub status: LocationStatus,
    pub since_ms: u64,
    /// Concurrent, disagreeing events exist for this person (D-1).
    pub conflict: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ShelterRow {
    pub shelter_id: String,
    pub name: String,
    pub capacity: u32,
}

/// All query rows derived from one document. Committing it replaces
/// whatever that document derived before.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Projection {
    pub persons: Vec<PersonRow>,
    /// (card user id, household id, person id)
    pub cards: Vec<(String, String, String)>,
    pub locations: Vec<LocationRow>,
    pub shelters: Vec<ShelterRow>,
    /// Persons who asked that nothing about them be disclosed (from their
    /// contacts document; headquarters only).
    pub withheld: Vec<String>,
}

/// A position in another node's change log: "I durably hold every change
/// of your log up to `seq`, whose hash is `hash`". Kept by the receiving
/// node, in the same transaction as the changes, so it rolls back together
/// with them; the sending node checks the hash, so a sender restored from
/// an old backup (whose log diverged) is detected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub seq: u64,
    pub hash: Hash32,
}

/// One atomic, durable write.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub meta: Option<Meta>,
    pub changes: Vec<ChangeRecord>,
    pub docs: Vec<DocState>,
    /// Shared, not copied: engines in one process that derived the same
    /// rows hand the same allocation to their stores.
    pub projections: Vec<(DocKey, Arc<Projection>)>,
    /// (operation id, result JSON) for idempotent retries (A-3, D-3).
    pub ops: Vec<(String, String)>,
    /// What a peer (its certified node id, in the incarnation it declared
    /// in its hello) was last known to hold of a document: hints for later
    /// sends. A peer has hints of one incarnation at a time: writing one of
    /// another incarnation drops the peer's older ones first, so its stored
    /// hints are at most one per document we hold (the engine keeps hints
    /// only about those), whatever incarnations it declares.
    pub peer_heads: Vec<(NodeId, u32, DocKey, Vec<Hash32>)>,
    /// Documents that failed to load or validate, with the reason.
    pub quarantine: Vec<(DocKey, String)>,
    /// Documents whose stored changes are damaged: not served until a
    /// peer's copy rebuilds them (A-8, A-10; see `crate::replica`).
    pub damaged: Vec<Damaged>,
    /// Logged changes to delete, by hash: the damaged rows of a damaged
    /// document (so they are neither streamed to peers nor loaded again).
    pub drop_changes: Vec<Hash32>,
    /// Damaged documents rebuilt in this batch: their damaged record and
    /// quarantine row are cleared (a quarantine row in the same batch, a
    /// report of lost changes, is written after), and their changes in this
    /// batch replace any stored row with the same hash (a row moved to
    /// another document by damage).
    pub repaired: Vec<DocKey>,
    /// How far into each peer's change log we hold everything.
    pub cursors: Vec<(NodeId, Cursor)>,
    /// Newly verified author credentials (see [`crate::signing`]).
    pub credentials: Vec<(AuthorHash, Vec<u8>)>,
    /// Seals for changes already stored unsigned (a change keeps the first
    /// seal it gets).
    pub seals: Vec<(Hash32, Seal)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.meta.is_none()
            && self.changes.is_empty()
            && self.docs.is_empty()
            && self.projections.is_empty()
            && self.ops.is_empty()
            && self.peer_heads.is_empty()
            && self.quarantine.is_empty()
            && self.damaged.is_empty()
            && self.drop_changes.is_empty()
            && self.repaired.is_empty()
            && self.cursors.is_empty()
            && self.credentials.is_empty()
            && self.seals.is_empty()
    }
}

/// A document whose stored changes could not be trusted, set aside until
/// a peer's copy rebuilds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damaged {
    pub key: DocKey,
    /// The heads the store named for it when the damage was found (what a
    /// rebuilt copy should know; they may be damaged themselves).
    pub heads: Vec<Hash32>,
    /// Dropped changes this node wrote (or that were unsigned): the ones
    /// that may exist nowhere else. A rebuilt copy that lacks any of them
    /// is reported as having lost them.
    pub at_risk: Vec<Hash32>,
}

/// A stored document: the newest snapshot (if any) and the logged changes
/// not yet folded into it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredDoc {
    pub snapshot: Option<Vec<u8>>,
    pub changes: Vec<Vec<u8>>,
}

pub trait Store {
    fn load_meta(&self) -> Result<Option<Meta>, StoreError>;
    /// Every document with its heads, in key order.
    fn doc_index(&self) -> Result<Vec<(DocKey, Vec<Hash32>)>, StoreError>;
    fn load_doc(&self, key: &DocKey) -> Result<Option<StoredDoc>, StoreError>;
    /// Every logged change of a document, for rebuilding a damaged one.
    fn doc_changes(&self, key: &DocKey) -> Result<Vec<Vec<u8>>, StoreError>;
    /// Every logged change of a document as stored (hash column, bytes,
    /// seal), in log order: what sorting damaged rows from intact ones reads.
    fn doc_records(&self, key: &DocKey) -> Result<Vec<ChangeRecord>, StoreError>;
    /// Every document set aside as damaged and not rebuilt yet, in key order.
    fn damaged(&self) -> Result<Vec<Damaged>, StoreError>;
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError>;
    /// The stored seals of changes by hash, in order (`None` for a change
    /// not held or held unsigned): what relaying a document's changes sends.
    fn seals(&self, hashes: &[Hash32]) -> Result<Vec<Option<Seal>>, StoreError>;
    /// Every verified author credential held: by author hash, and each
    /// author's in the order they were first stored (an author has several
    /// after a rotation; storing one held already changes nothing).
    fn credentials(&self) -> Result<Vec<(AuthorHash, Vec<u8>)>, StoreError>;
    /// Logged changes without a seal, in log order after `after`, at most
    /// `limit`.
    fn unsigned(&self, after: u64, limit: usize) -> Result<Vec<(u64, ChangeRecord)>, StoreError>;

    fn op_result(&self, op_id: &str) -> Result<Option<String>, StoreError>;
    /// The heads `peer` was last known to hold of `key` in `incarnation`;
    /// `None` if none are stored, or only of another incarnation (a peer
    /// restored from a backup may have lost what its earlier run held).
    fn peer_heads(
        &self,
        peer: &NodeId,
        incarnation: u32,
        key: &DocKey,
    ) -> Result<Option<Vec<Hash32>>, StoreError>;
    fn quarantined(&self) -> Result<Vec<(DocKey, String)>, StoreError>;

    /// The local change log in order: entries with a sequence number above
    /// `after`, at most `limit` of them. Sequence numbers start at 1,
    /// increase and are never reused; they may have gaps.
    fn log_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, ChangeRecord)>, StoreError>;
    /// The hash of the change logged at `seq`, if any.
    fn log_at(&self, seq: u64) -> Result<Option<Hash32>, StoreError>;
    /// The newest log entry.
    fn log_end(&self) -> Result<Option<Cursor>, StoreError>;
    /// How far into `peer`'s log we hold everything (see [`Cursor`]).
    fn sync_cursor(&self, peer: &NodeId) -> Result<Option<Cursor>, StoreError>;

    fn person(&self, person_id: &str) -> Result<Option<PersonRow>, StoreError>;
    /// Which of `person_ids` have a person row: one read for a whole
    /// import batch (a store may answer in one transaction).
    fn known_persons(&self, person_ids: &[&str]) -> Result<BTreeSet<String>, StoreError> {
        let mut known = BTreeSet::new();
        for p in person_ids {
            if self.person(p)?.is_some() {
                known.insert(p.to_string());
            }
        }
        Ok(known)
    }
    fn persons(&self, limit: usize, offset: usize) -> Result<Vec<PersonRow>, StoreError>;
    /// Persons whose search key contains `key` (already folded with
    /// [`crate::text::search_key`]; matched literally, no wildcards).
    fn search(&self, key: &str, limit: usize) -> Result<Vec<PersonRow>, StoreError>;
    /// The household of the card's holder: the first `cards` row for it
    /// in source order (document kind, document id, position).
    fn household_by_card(&self, card_user_id: &str) -> Result<Option<String>, StoreError>;
    /// The card's holder (a person id), from the same row as
    /// [`Store::household_by_card`].
    fn person_by_card(&self, card_user_id: &str) -> Result<Option<String>, StoreError>;
    fn household_members(&self, household_id: &str) -> Result<Vec<PersonRow>, StoreError>;
    fn location(&self, person_id: &str) -> Result<Option<LocationRow>, StoreError>;
    fn shelters(&self) -> Result<Vec<ShelterRow>, StoreError>;
    /// Persons currently checked in, per shelter.
    fn occupancy(&self) -> Result<BTreeMap<String, u32>, StoreError>;
    fn conflicts(&self) -> Result<Vec<LocationRow>, StoreError>;
    /// Every person with a location (as [`Store::location`] gives it),
    /// optionally only those at one shelter, with their person row, in
    /// person id order. Persons without a person row are left out.
    fn evacuees(
        &self,
        shelter_id: Option<&str>,
    ) -> Result<Vec<(PersonRow, LocationRow)>, StoreError>;
    /// Persons with the do-not-disclose flag.
    fn withheld(&self) -> Result<std::collections::BTreeSet<String>, StoreError>;
    /// Registry residents per address district (persons with a district),
    /// with how many have any location row; in district order.
    fn district_counts(&self) -> Result<Vec<DistrictCount>, StoreError>;
    /// Residents of `district` without any location row, in person id
    /// order, after `after` (a person id; `""` for the first page).
    fn unaccounted(
        &self,
        district: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<PersonRow>, StoreError>;
    /// Persons checked in now, counted by `since_ms / bucket_ms` (the start
    /// of the bucket in ms), in time order.
    fn arrivals(&self, bucket_ms: u64) -> Result<Vec<(u64, u32)>, StoreError>;
    /// Location rows of persons in (or pending in) one shelter, in person
    /// id order: the shelter's roster.
    fn roster(&self, shelter_id: &str) -> Result<Vec<LocationRow>, StoreError>;
}

/// [`Store::evacuees`] over rows in source order: each person's first
/// location and first person row, filtered by shelter after choosing.
pub fn evacuees_from<'a>(
    locations: impl Iterator<Item = &'a LocationRow>,
    persons: impl Iterator<Item = &'a PersonRow>,
    shelter_id: Option<&str>,
) -> Vec<(PersonRow, LocationRow)> {
    let mut loc: BTreeMap<&str, &LocationRow> = BTreeMap::new();
    for l in locations {
        loc.entry(l.person_id.as_str()).or_insert(l);
    }
    let mut per: HashMap<&str, &PersonRow> = HashMap::new();
    for p in persons {
        if loc.contains_key(p.person_id.as_str()) {
            per.entry(p.person_id.as_str()).or_insert(p);
        }
    }
    loc.into_iter()
        .filter(|(_, l)| shelter_id.is_none_or(|s| l.shelter_id == s))
        .filter_map(|(id, l)| Some(((*per.get(id)?).clone(), l.clone())))
        .collect()
}

/// A change in `MemStore`'s log: what it is, shared with every other store
/// that logged the same change (see [`StorePool`]), and whether this store
/// deleted it.
///
/// The simulator's nodes log the same changes hundreds of times over; an
/// entry held the key, hash, bytes and seal itself (about 96 bytes and the
/// key's own allocation per change per node), and is now one pointer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedChange {
    pub change: Arc<Logged>,
    /// Deleted (a damaged row of a damaged document): its position stays
    /// taken, as a deleted SQLite row's sequence number does, but it is
    /// neither loaded nor streamed.
    pub dropped: bool,
}

/// A logged change as every store holding it alike holds it. Never changed
/// in place: a store that seals or rebuilds a change makes its own.
#[derive(Debug, PartialEq, Eq)]
pub struct Logged {
    pub key: DocKey,
    pub hash: Hash32,
    pub bytes: Arc<[u8]>,
    pub seal: Option<Seal>,
}

impl LoggedChange {
    pub fn record(&self) -> ChangeRecord {
        let c = &self.change;
        ChangeRecord {
            key: c.key.clone(),
            hash: c.hash,
            bytes: c.bytes.to_vec(),
            seal: c.seal,
        }
    }
}

/// One copy of each logged change for many in-memory stores (the
/// simulator's nodes all log the same changes). A change is named by its
/// hash, so equal hashes are equal bytes.
#[derive(Clone, Debug, Default)]
pub struct StorePool(Arc<Mutex<PoolMap>>);
type PoolMap = HashMap<Hash32, Arc<Logged>>;

impl StorePool {
    /// The shared entry for `c`: the bytes and seal first pooled under its
    /// hash (a seal arriving later is pooled for stores logging it after),
    /// under `c`'s own key.
    fn change(&self, c: &ChangeRecord) -> Arc<Logged> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(c.hash).or_insert_with(|| {
            Arc::new(Logged {
                key: c.key.clone(),
                hash: c.hash,
                bytes: Arc::from(c.bytes.as_slice()),
                seal: c.seal,
            })
        });
        if e.seal.is_none() && c.seal.is_some() {
            *e = Arc::new(Logged {
                key: e.key.clone(),
                hash: e.hash,
                bytes: e.bytes.clone(),
                seal: c.seal,
            });
        }
        if e.key == c.key {
            e.clone()
        } else {
            Arc::new(Logged {
                key: c.key.clone(),
                hash: c.hash,
                bytes: e.bytes.clone(),
                seal: e.seal,
            })
        }
    }
}

impl PartialEq for StorePool {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for StorePool {}

/// Everything a store holds, in plain maps; the in-memory store is just
/// this, and the conformance suite compares real stores against it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemStore {
    pub meta: Option<Meta>,
    pub log: Vector<LoggedChange>,
    /// Where change bytes are kept when shared with other stores.
    pub pool: Option<StorePool>,
    /// Positions in `log` of each document's changes.
    pub by_doc: OrdMap<DocKey, Vec<usize>>,
    /// Every logged change's hash and its position in `log` (a hash map:
    /// hashes are uniform, and ordered lookups cost a 32-byte comparison
    /// per level).
    pub hashes: ChangePositions,
    /// Each author's credentials in the order first stored.
    pub credentials: OrdMap<AuthorHash, Vec<Vec<u8>>>,
    pub docs: OrdMap<DocKey, (Vec<Hash32>, Option<Arc<[u8]>>, usize)>,
    pub projections: OrdMap<DocKey, Arc<Projection>>,
    pub ops: OrdMap<String, String>,
    pub peer_heads: OrdMap<(NodeId, DocKey), Vec<Hash32>>,
    /// The incarnation each peer's `peer_heads` are of.
    pub peer_incarnations: OrdMap<NodeId, u32>,
    pub quarantine: OrdMap<DocKey, String>,
    pub damaged: OrdMap<DocKey, Damaged>,
    pub cursors: OrdMap<NodeId, Cursor>,
    /// Fault injection: the next N commits fail with this error.
    pub fail_commits: Option<(u32, StoreError)>,
    pub commits: u64,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }
    /// Ready this store to be copied many times: what it holds so far is
    /// then shared by the copies, however they write (see
    /// [`ChangePositions`]).
    pub fn share(&mut self) {
        self.hashes.share();
    }
    fn doc_positions(&self, key: &DocKey) -> impl Iterator<Item = usize> + '_ {
        self.by_doc.get(key).into_iter().flatten().copied()
    }
    fn all_persons(&self) -> impl Iterator<Item = &PersonRow> {
        self.projections.values().flat_map(|p| p.persons.iter())
    }
    fn all_locations(&self) -> impl Iterator<Item = &LocationRow> {
        self.projections.values().flat_map(|p| p.locations.iter())
    }
}

impl Store for MemStore {
    fn load_meta(&self) -> Result<Option<Meta>, StoreError> {
        Ok(self.meta.clone())
    }
    fn doc_index(&self) -> Result<Vec<(DocKey, Vec<Hash32>)>, StoreError> {
        Ok(self
            .docs
            .iter()
            .map(|(k, (h, _, _))| (k.clone(), h.clone()))
            .collect())
    }
    fn load_doc(&self, key: &DocKey) -> Result<Option<StoredDoc>, StoreError> {
        let Some((_, snap, snap_at)) = self.docs.get(key) else {
            return Ok(None);
        };
        let changes = self
            .doc_positions(key)
            .filter(|&i| i >= *snap_at)
            .map(|i| self.log[i].change.bytes.to_vec())
            .collect();
        Ok(Some(StoredDoc {
            snapshot: snap.as_deref().map(<[u8]>::to_vec),
            changes,
        }))
    }
    fn doc_changes(&self, key: &DocKey) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self
            .doc_positions(key)
            .map(|i| self.log[i].change.bytes.to_vec())
            .collect())
    }
    fn doc_records(&self, key: &DocKey) -> Result<Vec<ChangeRecord>, StoreError> {
        Ok(self
            .doc_positions(key)
            .map(|i| self.log[i].record())
            .collect())
    }
    fn damaged(&self) -> Result<Vec<Damaged>, StoreError> {
        Ok(self.damaged.values().cloned().collect())
    }
    fn seals(&self, hashes: &[Hash32]) -> Result<Vec<Option<Seal>>, StoreError> {
        Ok(hashes
            .iter()
            .map(|h| self.hashes.get(h).and_then(|&i| self.log[i].change.seal))
            .collect())
    }
    fn unsigned(&self, after: u64, limit: usize) -> Result<Vec<(u64, ChangeRecord)>, StoreError> {
        let start = (after as usize).min(self.log.len());
        Ok((start..self.log.len())
            .filter(|&i| self.log[i].change.seal.is_none() && !self.log[i].dropped)
            .take(limit)
            .map(|i| ((i + 1) as u64, self.log[i].record()))
            .collect())
    }
    fn credentials(&self) -> Result<Vec<(AuthorHash, Vec<u8>)>, StoreError> {
        Ok(self
            .credentials
            .iter()
            .flat_map(|(h, cs)| cs.iter().map(|c| (*h, c.clone())))
            .collect())
    }
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        if let Some((n, e)) = &mut self.fail_commits {
            if *n > 0 {
                *n -= 1;
                return Err(e.clone());
            }
        }
        self.commits += 1;
        if let Some(m) = &batch.meta {
            self.meta = Some(m.clone());
        }
        for h in &batch.drop_changes {
            if let Some(i) = self.hashes.remove(h) {
                let mut e = self.log[i].clone();
                if let Some(v) = self.by_doc.get_mut(&e.change.key) {
                    v.retain(|&p| p != i);
                }
                e.dropped = true;
                self.log.set(i, e);
            }
        }
        for c in &batch.changes {
            let at = self.log.len();
            if let (Some(&i), true) = (self.hashes.get(&c.hash), batch.repaired.contains(&c.key)) {
                // A rebuilt document's verified change replaces the row
                // with its hash (damage may have moved or altered it).
                let mut e = self.log[i].clone();
                let old = &e.change;
                if old.key != c.key || *old.bytes != c.bytes[..] {
                    if let Some(v) = self.by_doc.get_mut(&old.key) {
                        v.retain(|&p| p != i);
                    }
                    upsert(&mut self.by_doc, &c.key, Vec::new, |v| {
                        let at = v.partition_point(|&p| p < i);
                        v.insert(at, i);
                    });
                    e.change = Arc::new(Logged {
                        key: c.key.clone(),
                        hash: old.hash,
                        bytes: Arc::from(c.bytes.as_slice()),
                        seal: old.seal.or(c.seal),
                    });
                    self.log.set(i, e);
                }
                continue;
            }
            if !self.hashes.contains_key(&c.hash) {
                self.hashes.insert(c.hash, at);
                upsert(&mut self.by_doc, &c.key, Vec::new, |v| v.push(at));
                let change = match &self.pool {
                    Some(p) => p.change(c),
                    None => Arc::new(Logged {
                        key: c.key.clone(),
                        hash: c.hash,
                        bytes: Arc::from(c.bytes.as_slice()),
                        seal: c.seal,
                    }),
                };
                self.log.push_back(LoggedChange {
                    change,
                    dropped: false,
                });
            }
        }
        for (h, c) in &batch.credentials {
            upsert(&mut self.credentials, h, Vec::new, |cs| {
                if !cs.contains(c) {
                    cs.push(c.clone());
                }
            });
        }
        for (h, seal) in &batch.seals {
            if let Some(&i) = self.hashes.get(h) {
                let mut e = self.log[i].clone();
                if e.change.seal.is_none() {
                    let old = &e.change;
                    e.change = Arc::new(Logged {
                        key: old.key.clone(),
                        hash: old.hash,
                        bytes: old.bytes.clone(),
                        seal: Some(*seal),
                    });
                    self.log.set(i, e);
                }
            }
        }
        for d in &batch.docs {
            let at = self.log.len();
            upsert(
                &mut self.docs,
                &d.key,
                || (vec![], None, 0),
                |e| {
                    e.0 = d.heads.clone();
                    if let Some(s) = &d.snapshot {
                        e.1 = Some(Arc::from(s.as_slice()));
                        e.2 = at;
                    }
                },
            );
        }
        for (k, p) in &batch.projections {
            self.projections.insert(k.clone(), p.clone());
        }
        for (k, v) in &batch.ops {
            self.ops.entry(k.clone()).or_insert_with(|| v.clone());
        }
        for (p, inc, k, h) in &batch.peer_heads {
            if self.peer_incarnations.insert(p.clone(), *inc) != Some(*inc) {
                // Rare (a peer's restart): scanning every hint is fine.
                let older: Vec<_> = (self.peer_heads.keys())
                    .filter(|(q, _)| q == p)
                    .cloned()
                    .collect();
                for k in older {
                    self.peer_heads.remove(&k);
                }
            }
            self.peer_heads.insert((p.clone(), k.clone()), h.clone());
        }
        for k in &batch.repaired {
            self.damaged.remove(k);
            self.quarantine.remove(k);
        }
        for d in &batch.damaged {
            self.damaged.insert(d.key.clone(), d.clone());
        }
        for (k, r) in &batch.quarantine {
            self.quarantine.insert(k.clone(), r.clone());
        }
        for (p, c) in &batch.cursors {
            self.cursors.insert(p.clone(), *c);
        }
        Ok(())
    }
    fn log_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, ChangeRecord)>, StoreError> {
        let start = (after as usize).min(self.log.len());
        Ok((start..self.log.len())
            .filter(|&i| !self.log[i].dropped)
            .take(limit)
            .map(|i| ((i + 1) as u64, self.log[i].record()))
            .collect())
    }
    fn log_at(&self, seq: u64) -> Result<Option<Hash32>, StoreError> {
        Ok(seq
            .checked_sub(1)
            .and_then(|i| self.log.get(i as usize))
            .filter(|c| !c.dropped)
            .map(|c| c.change.hash))
    }
    fn log_end(&self) -> Result<Option<Cursor>, StoreError> {
        // The newest entry not dropped (SQLite's max(seq) of the rows left).
        Ok(self
            .log
            .iter()
            .enumerate()
            .rev()
            .find(|(_, c)| !c.dropped)
            .map(|(i, c)| Cursor {
                seq: i as u64 + 1,
                hash: c.change.hash,
            }))
    }
    fn sync_cursor(&self, peer: &NodeId) -> Result<Option<Cursor>, StoreError> {
        Ok(self.cursors.get(peer).copied())
    }
    fn op_result(&self, op_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self.ops.get(op_id).cloned())
    }
    fn peer_heads(
        &self,
        peer: &NodeId,
        incarnation: u32,
        key: &DocKey,
    ) -> Result<Option<Vec<Hash32>>, StoreError> {
        if self.peer_incarnations.get(peer) != Some(&incarnation) {
            return Ok(None);
        }
        Ok(self.peer_heads.get(&(peer.clone(), key.clone())).cloned())
    }
    fn quarantined(&self) -> Result<Vec<(DocKey, String)>, StoreError> {
        Ok(self
            .quarantine
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
    fn person(&self, person_id: &str) -> Result<Option<PersonRow>, StoreError> {
        Ok(self
            .all_persons()
            .find(|p| p.person_id == person_id)
            .cloned())
    }
    fn persons(&self, limit: usize, offset: usize) -> Result<Vec<PersonRow>, StoreError> {
        let mut all: Vec<_> = self.all_persons().cloned().collect();
        all.sort_by(|a, b| a.person_id.cmp(&b.person_id));
        Ok(all.into_iter().skip(offset).take(limit).collect())
    }
    fn search(&self, key: &str, limit: usize) -> Result<Vec<PersonRow>, StoreError> {
        let mut all: Vec<_> = self
            .all_persons()
            .filter(|p| {
                p.search_key.contains(key) || crate::text::search_key(&p.name).contains(key)
            })
            .cloned()
            .collect();
        all.sort_by(|a, b| a.person_id.cmp(&b.person_id));
        all.truncate(limit);
        Ok(all)
    }
    fn household_by_card(&self, card_user_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .projections
            .values()
            .flat_map(|p| p.cards.iter())
            .find(|c| c.0 == card_user_id)
            .map(|c| c.1.clone()))
    }
    fn person_by_card(&self, card_user_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .projections
            .values()
            .flat_map(|p| p.cards.iter())
            .find(|c| c.0 == card_user_id)
            .map(|c| c.2.clone()))
    }
    fn household_members(&self, household_id: &str) -> Result<Vec<PersonRow>, StoreError> {
        let mut v: Vec<_> = self
            .all_persons()
            .filter(|p| p.household_id.as_deref() == Some(household_id))
            .cloned()
            .collect();
        v.sort_by(|a, b| a.person_id.cmp(&b.person_id));
        Ok(v)
    }
    fn location(&self, person_id: &str) -> Result<Option<LocationRow>, StoreError> {
        Ok(self
            .all_locations()
            .find(|l| l.person_id == person_id)
            .cloned())
    }
    fn shelters(&self) -> Result<Vec<ShelterRow>, StoreError> {
        let mut v: Vec<_> = self
            .projections
            .values()
            .flat_map(|p| p.shelters.iter())
            .cloned()
            .collect();
        v.sort();
        Ok(v)
    }
    fn occupancy(&self) -> Result<BTreeMap<String, u32>, StoreError> {
        let mut m = BTreeMap::new();
        for l in self
            .all_locations()
            .filter(|l| l.status == LocationStatus::In)
        {
            *m.entry(l.shelter_id.clone()).or_insert(0) += 1;
        }
        Ok(m)
    }
    fn conflicts(&self) -> Result<Vec<LocationRow>, StoreError> {
        let mut v: Vec<_> = self
            .all_locations()
            .filter(|l| l.conflict)
            .cloned()
            .collect();
        v.sort();
        Ok(v)
    }
    fn evacuees(
        &self,
        shelter_id: Option<&str>,
    ) -> Result<Vec<(PersonRow, LocationRow)>, StoreError> {
        Ok(evacuees_from(
            self.all_locations(),
            self.all_persons(),
            shelter_id,
        ))
    }
    fn withheld(&self) -> Result<std::collections::BTreeSet<String>, StoreError> {
        Ok(self
            .projections
            .values()
            .flat_map(|p| p.withheld.iter().cloned())
            .collect())
    }
    fn district_counts(&self) -> Result<Vec<DistrictCount>, StoreError> {
        let located: std::collections::BTreeSet<&str> =
            self.all_locations().map(|l| l.person_id.as_str()).collect();
        let mut m: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
        for p in self.all_persons() {
            if let Some(d) = &p.district {
                let e = m.entry(d.as_str()).or_default();
                e.0 += 1;
                e.1 += u32::from(located.contains(p.person_id.as_str()));
            }
        }
        Ok(m.into_iter()
            .map(|(d, (residents, accounted))| DistrictCount {
                district: d.to_string(),
                residents,
                accounted,
            })
            .collect())
    }
    fn unaccounted(
        &self,
        district: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<PersonRow>, StoreError> {
        let located: std::collections::BTreeSet<&str> =
            self.all_locations().map(|l| l.person_id.as_str()).collect();
        let mut v: Vec<_> = self
            .all_persons()
            .filter(|p| p.district.as_deref() == Some(district))
            .filter(|p| p.person_id.as_str() > after && !located.contains(p.person_id.as_str()))
            .cloned()
            .collect();
        v.sort_by(|a, b| a.person_id.cmp(&b.person_id));
        v.truncate(limit);
        Ok(v)
    }
    fn arrivals(&self, bucket_ms: u64) -> Result<Vec<(u64, u32)>, StoreError> {
        let bucket_ms = bucket_ms.max(1);
        let mut m: BTreeMap<u64, u32> = BTreeMap::new();
        for l in self
            .all_locations()
            .filter(|l| l.status == LocationStatus::In)
        {
            *m.entry(l.since_ms / bucket_ms * bucket_ms).or_default() += 1;
        }
        Ok(m.into_iter().collect())
    }
    fn roster(&self, shelter_id: &str) -> Result<Vec<LocationRow>, StoreError> {
        let mut v: Vec<_> = self
            .all_locations()
            .filter(|l| l.shelter_id == shelter_id && l.status != LocationStatus::Out)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.person_id.cmp(&b.person_id));
        Ok(v)
    }
}

/// The one suite every `Store` implementation must pass. Call each
/// function with a fresh, empty store. Test builds only (`testkit`).
#[cfg(any(test, feature = "testkit"))]
pub mod conformance {
    use super::*;
    use crate::ids::Kind;

    fn key(kind: Kind, id: &str) -> DocKey {
        DocKey::new(kind, id).unwrap()
    }

    fn person(id: &str, hh: &str, name: &str, kana: &str) -> PersonRow {
        PersonRow {
            person_id: id.into(),
            household_id: Some(hh.into()),
            name: name.into(),
            kana: kana.into(),
            search_key: crate::text::search_key(kana),
            birth_date: Some("1950-01-01".into()),
            district: Some("旭町".into()),
        }
    }

    fn meta(inc: u32) -> Meta {
        Meta {
            node_id: NodeId::new("n1").unwrap(),
            role: Role::Shelter,
            incarnation: inc,
            hlc: Hlc {
                wall_ms: 5,
                counter: inc,
            },
            audit_seq: 0,
            audit_head: String::new(),
            unsigned_checked: 0,
        }
    }

    fn change(k: &DocKey, n: u8) -> ChangeRecord {
        ChangeRecord {
            key: k.clone(),
            hash: [n; 32],
            bytes: vec![n; 3],
            seal: Some(Seal {
                author: [n; 8],
                sig: [n.wrapping_add(1); 64],
            }),
        }
    }

    pub fn meta_round_trip(s: &mut dyn Store) {
        assert_eq!(s.load_meta().unwrap(), None);
        let mut b = Batch::default();
        b.meta = Some(meta(1));
        s.commit(&b).unwrap();
        assert_eq!(s.load_meta().unwrap(), Some(meta(1)));
        b.meta = Some(meta(2));
        s.commit(&b).unwrap();
        assert_eq!(s.load_meta().unwrap().unwrap().incarnation, 2);
    }

    pub fn changes_docs_and_snapshots(s: &mut dyn Store) {
        let k = key(Kind::Presence, "h1");
        let other = key(Kind::Registry, "h1");
        let b = Batch {
            changes: vec![change(&k, 1), change(&k, 2), change(&other, 9)],
            docs: vec![
                DocState {
                    key: k.clone(),
                    heads: vec![[2; 32]],
                    snapshot: None,
                },
                DocState {
                    key: other.clone(),
                    heads: vec![[9; 32]],
                    snapshot: None,
                },
            ],
            ..Default::default()
        };
        s.commit(&b).unwrap();
        // Re-committing a known change is a no-op (dedup by hash).
        s.commit(&Batch {
            changes: vec![change(&k, 1)],
            ..Default::default()
        })
        .unwrap();
        let d = s.load_doc(&k).unwrap().unwrap();
        assert_eq!(d.snapshot, None);
        assert_eq!(d.changes, vec![vec![1; 3], vec![2; 3]]);
        // A snapshot folds earlier changes; later ones stay in the tail.
        s.commit(&Batch {
            docs: vec![DocState {
                key: k.clone(),
                heads: vec![[2; 32]],
                snapshot: Some(vec![7, 7]),
            }],
            ..Default::default()
        })
        .unwrap();
        s.commit(&Batch {
            changes: vec![change(&k, 3)],
            docs: vec![DocState {
                key: k.clone(),
                heads: vec![[3; 32]],
                snapshot: None,
            }],
            ..Default::default()
        })
        .unwrap();
        let d = s.load_doc(&k).unwrap().unwrap();
        assert_eq!(d.snapshot, Some(vec![7, 7]));
        assert_eq!(d.changes, vec![vec![3; 3]]);
        assert_eq!(s.doc_changes(&k).unwrap().len(), 3);
        let idx = s.doc_index().unwrap();
        assert_eq!(
            idx,
            vec![(k.clone(), vec![[3; 32]]), (other.clone(), vec![[9; 32]])]
                .into_iter()
                .collect::<BTreeMap<_, _>>()
                .into_iter()
                .collect::<Vec<_>>()
        );
        assert_eq!(s.load_doc(&key(Kind::Medical, "nope")).unwrap(), None);
    }

    pub fn projections_replace_per_document(s: &mut dyn Store) {
        let r1 = key(Kind::Registry, "h1");
        let r2 = key(Kind::Registry, "h2");
        let p1 = Projection {
            persons: vec![
                person("p1", "h1", "山田 太郎", "ヤマダ タロウ"),
                person("p2", "h1", "山田 花子", "やまだ はなこ"),
            ],
            cards: vec![("1234567890123".into(), "h1".into(), "p1".into())],
            ..Default::default()
        };
        let p2 = Projection {
            persons: vec![person("p3", "h2", "佐藤 一郎", "サトウ イチロウ")],
            ..Default::default()
        };
        s.commit(&Batch {
            projections: vec![(r1.clone(), p1.into()), (r2.clone(), p2.into())],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            s.household_by_card("1234567890123").unwrap().as_deref(),
            Some("h1")
        );
        assert_eq!(s.household_by_card("9999999999999").unwrap(), None);
        assert_eq!(s.household_members("h1").unwrap().len(), 2);
        assert_eq!(
            s.persons(10, 0)
                .unwrap()
                .iter()
                .map(|p| p.person_id.as_str())
                .collect::<Vec<_>>(),
            vec!["p1", "p2", "p3"]
        );
        assert_eq!(s.persons(1, 1).unwrap()[0].person_id, "p2");
        let hits = s.search(&crate::text::search_key("ﾔﾏﾀﾞ"), 10).unwrap();
        assert_eq!(hits.len(), 2);
        // Wildcards are literal.
        assert!(s.search("%", 10).unwrap().is_empty());
        assert!(s.search("_", 10).unwrap().is_empty());
        // Replacing h1's projection removes rows it no longer derives.
        let p1b = Projection {
            persons: vec![person("p1", "h1", "山田 太郎", "ヤマダ タロウ")],
            ..Default::default()
        };
        s.commit(&Batch {
            projections: vec![(r1.clone(), p1b.into())],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.household_members("h1").unwrap().len(), 1);
        assert_eq!(s.household_by_card("1234567890123").unwrap(), None);
        assert!(s.person("p2").unwrap().is_none());
        assert!(s.person("p3").unwrap().is_some());
    }

    /// A card names its holder and the holder's household, both from the
    /// first row for it in source order; rows go with their document.
    pub fn cards_name_holder_and_household(s: &mut dyn Store) {
        let r1 = key(Kind::Registry, "h1");
        let r2 = key(Kind::Registry, "h2");
        let card = |c: &str, h: &str, p: &str| (c.to_string(), h.to_string(), p.to_string());
        let p1 = Projection {
            persons: vec![
                person("p1", "h1", "山田 太郎", "ヤマダ タロウ"),
                person("p2", "h1", "山田 花子", "ヤマダ ハナコ"),
            ],
            cards: vec![
                card("1111111111111", "h1", "p1"),
                card("2222222222222", "h1", "p2"),
                card("4444444444444", "h1", "p2"),
            ],
            ..Default::default()
        };
        let p2 = Projection {
            persons: vec![person("p3", "h2", "佐藤 一郎", "サトウ イチロウ")],
            // The same card in a later document: the earlier row wins.
            cards: vec![
                card("4444444444444", "h2", "p3"),
                card("3333333333333", "h2", "p3"),
            ],
            ..Default::default()
        };
        s.commit(&Batch {
            projections: vec![(r2.clone(), p2.into()), (r1.clone(), p1.into())],
            ..Default::default()
        })
        .unwrap();
        let both = |s: &dyn Store, c: &str| {
            (
                s.household_by_card(c).unwrap(),
                s.person_by_card(c).unwrap(),
            )
        };
        let some = |h: &str, p: &str| (Some(h.to_string()), Some(p.to_string()));
        assert_eq!(both(s, "1111111111111"), some("h1", "p1"));
        assert_eq!(both(s, "2222222222222"), some("h1", "p2"));
        assert_eq!(both(s, "3333333333333"), some("h2", "p3"));
        assert_eq!(both(s, "4444444444444"), some("h1", "p2"));
        assert_eq!(both(s, "9999999999999"), (None, None));
        // Dropping h1's cards leaves the later row of the shared card.
        let p1b = Projection {
            persons: vec![person("p1", "h1", "山田 太郎", "ヤマダ タロウ")],
            ..Default::default()
        };
        s.commit(&Batch {
            projections: vec![(r1, p1b.into())],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(both(s, "2222222222222"), (None, None));
        assert_eq!(both(s, "4444444444444"), some("h2", "p3"));
    }

    pub fn locations_and_occupancy(s: &mut dyn Store) {
        let pr = key(Kind::Presence, "h1");
        let sh = key(Kind::Shelter, "s1");
        let loc = |p: &str, shelter: &str, st, conflict| LocationRow {
            person_id: p.into(),
            shelter_id: shelter.into(),
            status: st,
            since_ms: 1,
            conflict,
        };
        s.commit(&Batch {
            projections: vec![
                (
                    pr.clone(),
                    Projection {
                        locations: vec![
                            loc("p1", "s1", LocationStatus::In, false),
                            loc("p2", "s1", LocationStatus::In, true),
                            loc("p3", "s2", LocationStatus::Out, false),
                        ],
                        ..Default::default()
                    }
                    .into(),
                ),
                (
                    sh.clone(),
                    Projection {
                        shelters: vec![ShelterRow {
                            shelter_id: "s1".into(),
                            name: "第一小学校".into(),
                            capacity: 300,
                        }],
                        ..Default::default()
                    }
                    .into(),
                ),
            ],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            s.occupancy().unwrap(),
            BTreeMap::from([("s1".to_string(), 2)])
        );
        assert_eq!(
            s.location("p3").unwrap().unwrap().status,
            LocationStatus::Out
        );
        assert_eq!(s.conflicts().unwrap().len(), 1);
        assert_eq!(s.shelters().unwrap()[0].capacity, 300);
    }

    /// Evacuee lists join each person's first location with their first
    /// person row; do-not-disclose flags replace per document.
    pub fn evacuees_and_withheld(s: &mut dyn Store) {
        let loc = |p: &str, shelter: &str, st| LocationRow {
            person_id: p.into(),
            shelter_id: shelter.into(),
            status: st,
            since_ms: 7,
            conflict: false,
        };
        let proj = |p: Projection| Arc::new(p);
        s.commit(&Batch {
            projections: vec![
                (
                    key(Kind::Registry, "h1"),
                    proj(Projection {
                        persons: vec![
                            person("p1", "h1", "山田 太郎", "ヤマダ タロウ"),
                            person("p2", "h1", "山田 花子", "ヤマダ ハナコ"),
                            person("p3", "h1", "山田 次郎", "ヤマダ ジロウ"),
                        ],
                        ..Default::default()
                    }),
                ),
                (
                    key(Kind::Presence, "h1"),
                    proj(Projection {
                        locations: vec![
                            loc("p2", "s2", LocationStatus::Out),
                            loc("p1", "s1", LocationStatus::In),
                            // No person row: left out.
                            loc("p9", "s1", LocationStatus::In),
                        ],
                        ..Default::default()
                    }),
                ),
                (
                    key(Kind::Contacts, "p2"),
                    proj(Projection {
                        withheld: vec!["p2".into()],
                        ..Default::default()
                    }),
                ),
            ],
            ..Default::default()
        })
        .unwrap();
        let all = s.evacuees(None).unwrap();
        let ids: Vec<&str> = all.iter().map(|(p, _)| p.person_id.as_str()).collect();
        assert_eq!(ids, ["p1", "p2"]);
        assert_eq!(all[0].0.name, "山田 太郎");
        assert_eq!(all[1].1.status, LocationStatus::Out);
        let s1 = s.evacuees(Some("s1")).unwrap();
        assert_eq!(s1.len(), 1);
        assert_eq!(s1[0].1.shelter_id, "s1");
        assert!(s.evacuees(Some("s3")).unwrap().is_empty());
        assert_eq!(
            s.withheld().unwrap().into_iter().collect::<Vec<_>>(),
            ["p2"]
        );
        // A new projection of the contacts document replaces the flag.
        s.commit(&Batch {
            projections: vec![(key(Kind::Contacts, "p2"), proj(Projection::default()))],
            ..Default::default()
        })
        .unwrap();
        assert!(s.withheld().unwrap().is_empty());
    }

    pub fn ops_peer_heads_quarantine(s: &mut dyn Store) {
        let k = key(Kind::Presence, "h1");
        let peer = NodeId::new("peer-1").unwrap();
        s.commit(&Batch {
            ops: vec![("op-1".into(), "{\"ok\":1}".into())],
            peer_heads: vec![(peer.clone(), 1, k.clone(), vec![[4; 32]])],
            quarantine: vec![(k.clone(), "bad".into())],
            ..Default::default()
        })
        .unwrap();
        // The first recorded result of an operation wins.
        s.commit(&Batch {
            ops: vec![("op-1".into(), "{\"ok\":2}".into())],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.op_result("op-1").unwrap().as_deref(), Some("{\"ok\":1}"));
        assert_eq!(s.op_result("op-2").unwrap(), None);
        assert_eq!(s.peer_heads(&peer, 1, &k).unwrap(), Some(vec![[4; 32]]));
        assert_eq!(s.peer_heads(&peer, 2, &k).unwrap(), None);
        assert_eq!(s.quarantined().unwrap(), vec![(k, "bad".to_string())]);
    }

    /// Issue 12: a peer declares its incarnation itself, so its hints are
    /// kept for one incarnation at a time: the hints of a new incarnation
    /// replace the older ones (which no longer answer), they are not added
    /// beside them. How many rows that leaves is counted in node's
    /// `peer_hints_stay_one_per_document_whatever_incarnations_a_peer_declares`
    /// (both stores) and crdt's engine test
    /// `a_peer_declaring_a_new_incarnation_every_session_does_not_grow_our_hints`.
    pub fn peer_heads_keep_one_incarnation_per_peer(s: &mut dyn Store) {
        let (a, b) = (key(Kind::Presence, "h1"), key(Kind::Registry, "h2"));
        let peer = NodeId::new("peer-1").unwrap();
        let other = NodeId::new("peer-2").unwrap();
        s.commit(&Batch {
            peer_heads: vec![
                (peer.clone(), 1, a.clone(), vec![[1; 32]]),
                (peer.clone(), 1, b.clone(), vec![[2; 32]]),
                (other.clone(), 7, a.clone(), vec![[7; 32]]),
            ],
            ..Default::default()
        })
        .unwrap();
        // The peer restarts: incarnation 2 knows `a` only.
        s.commit(&Batch {
            peer_heads: vec![(peer.clone(), 2, a.clone(), vec![[3; 32]])],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.peer_heads(&peer, 2, &a).unwrap(), Some(vec![[3; 32]]));
        assert_eq!(
            s.peer_heads(&peer, 2, &b).unwrap(),
            None,
            "b was of incarnation 1"
        );
        assert_eq!(s.peer_heads(&peer, 1, &a).unwrap(), None);
        assert_eq!(s.peer_heads(&peer, 1, &b).unwrap(), None);
        // Another peer's hints are its own.
        assert_eq!(s.peer_heads(&other, 7, &a).unwrap(), Some(vec![[7; 32]]));
        // An old session of the earlier run writing late replaces again.
        s.commit(&Batch {
            peer_heads: vec![(peer.clone(), 1, b.clone(), vec![[4; 32]])],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.peer_heads(&peer, 1, &b).unwrap(), Some(vec![[4; 32]]));
        assert_eq!(s.peer_heads(&peer, 2, &a).unwrap(), None);
    }

    pub fn log_and_cursors(s: &mut dyn Store) {
        let k = key(Kind::Presence, "h1");
        let peer = NodeId::new("peer-1").unwrap();
        assert_eq!(s.log_end().unwrap(), None);
        assert!(s.log_since(0, 10).unwrap().is_empty());
        s.commit(&Batch {
            changes: vec![change(&k, 1), change(&k, 2)],
            ..Default::default()
        })
        .unwrap();
        // A known change is not logged again.
        s.commit(&Batch {
            changes: vec![change(&k, 1), change(&k, 3)],
            ..Default::default()
        })
        .unwrap();
        let all = s.log_since(0, 10).unwrap();
        assert_eq!(
            all.iter().map(|(_, c)| c.hash[0]).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(all[0].1, change(&k, 1));
        // Sequence numbers increase (gaps are allowed) and address the log.
        let seqs: Vec<u64> = all.iter().map(|(n, _)| *n).collect();
        assert!(
            seqs[0] >= 1 && seqs.windows(2).all(|w| w[0] < w[1]),
            "{seqs:?}"
        );
        let after_first = s.log_since(seqs[0], 1).unwrap();
        assert_eq!(
            after_first.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            vec![seqs[1]]
        );
        assert!(s.log_since(seqs[2], 10).unwrap().is_empty());
        assert_eq!(s.log_at(seqs[1]).unwrap(), Some([2; 32]));
        assert_eq!(s.log_at(0).unwrap(), None);
        assert_eq!(s.log_at(seqs[2] + 100).unwrap(), None);
        assert_eq!(
            s.log_end().unwrap(),
            Some(Cursor {
                seq: seqs[2],
                hash: [3; 32]
            })
        );
        assert_eq!(s.sync_cursor(&peer).unwrap(), None);
        s.commit(&Batch {
            cursors: vec![(
                peer.clone(),
                Cursor {
                    seq: 7,
                    hash: [7; 32],
                },
            )],
            ..Default::default()
        })
        .unwrap();
        s.commit(&Batch {
            cursors: vec![(
                peer.clone(),
                Cursor {
                    seq: 9,
                    hash: [9; 32],
                },
            )],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            s.sync_cursor(&peer).unwrap(),
            Some(Cursor {
                seq: 9,
                hash: [9; 32]
            })
        );
    }

    /// Runs every case, each on a fresh store from `fresh`.
    pub fn run_all(mut fresh: impl FnMut() -> Box<dyn Store>) {
        meta_round_trip(&mut *fresh());
        changes_docs_and_snapshots(&mut *fresh());
        projections_replace_per_document(&mut *fresh());
        cards_name_holder_and_household(&mut *fresh());
        locations_and_occupancy(&mut *fresh());
        evacuees_and_withheld(&mut *fresh());
        ops_peer_heads_quarantine(&mut *fresh());
        peer_heads_keep_one_incarnation_per_peer(&mut *fresh());
        log_and_cursors(&mut *fresh());
        districts_and_arrivals(&mut *fresh());
        known_persons_answers_like_person(&mut *fresh());
        seals_and_credentials(&mut *fresh());
        damaged_documents(&mut *fresh());
    }

    /// A damaged document: its dropped rows leave the change
    /// log (not loaded, streamed or found by hash; their sequence numbers
    /// are not reused), the damage is kept until a batch marks the
    /// document repaired, and that batch's changes of it replace stored
    /// rows of the same hash (even one stored under another document)
    /// without taking a new place in the log.
    pub fn damaged_documents(s: &mut dyn Store) {
        let k = key(Kind::Medical, "p1");
        let other = key(Kind::Medical, "p2");
        let rec = |k: &DocKey, i: u8, b: u8| ChangeRecord {
            key: k.clone(),
            hash: [i; 32],
            bytes: vec![b; 8],
            seal: None,
        };
        s.commit(&Batch {
            changes: vec![
                rec(&k, 1, 1),
                rec(&k, 2, 2),
                rec(&other, 3, 3),
                rec(&k, 4, 4),
            ],
            ..Default::default()
        })
        .unwrap();
        let d = Damaged {
            key: k.clone(),
            heads: vec![[4; 32]],
            at_risk: vec![[2; 32]],
        };
        s.commit(&Batch {
            damaged: vec![d.clone()],
            drop_changes: vec![[2; 32]],
            quarantine: vec![(k.clone(), "bad".into())],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.damaged().unwrap(), vec![d]);
        assert_eq!(s.doc_changes(&k).unwrap(), vec![vec![1; 8], vec![4; 8]]);
        let hashes = |v: Vec<ChangeRecord>| v.into_iter().map(|c| c.hash).collect::<Vec<_>>();
        assert_eq!(hashes(s.doc_records(&k).unwrap()), vec![[1; 32], [4; 32]]);
        let log: Vec<(u64, Hash32)> = s
            .log_since(0, 10)
            .unwrap()
            .into_iter()
            .map(|(n, c)| (n, c.hash))
            .collect();
        assert_eq!(log.len(), 3);
        assert!(log.iter().all(|(_, h)| *h != [2; 32]));
        let seq_of = |h: Hash32| log.iter().find(|(_, x)| *x == h).unwrap().0;
        assert!(seq_of([1; 32]) < seq_of([3; 32]) && seq_of([3; 32]) < seq_of([4; 32]));
        assert_eq!(s.log_at(seq_of([1; 32]) + 1).unwrap(), None);
        assert_eq!(s.log_end().unwrap().unwrap().hash, [4; 32]);
        // Rebuilt: change 2 comes back, change 3 (damage put it under the
        // other document) is named as this one's, change 4 with its right
        // bytes; change 5 is new.
        s.commit(&Batch {
            changes: vec![rec(&k, 2, 2), rec(&k, 3, 3), rec(&k, 4, 9), rec(&k, 5, 5)],
            repaired: vec![k.clone()],
            ..Default::default()
        })
        .unwrap();
        assert!(s.damaged().unwrap().is_empty());
        assert!(s.quarantined().unwrap().is_empty());
        assert_eq!(
            hashes(s.doc_records(&k).unwrap()),
            vec![[1; 32], [3; 32], [4; 32], [2; 32], [5; 32]]
        );
        assert_eq!(s.doc_changes(&k).unwrap()[2], vec![9; 8]);
        assert!(s.doc_changes(&other).unwrap().is_empty());
        assert_eq!(s.log_since(0, 10).unwrap().len(), 5);
        assert_eq!(s.log_end().unwrap().unwrap().hash, [5; 32]);
        // A repair may leave a report of lost changes in the quarantine.
        s.commit(&Batch {
            damaged: vec![Damaged {
                key: k.clone(),
                heads: vec![],
                at_risk: vec![],
            }],
            ..Default::default()
        })
        .unwrap();
        s.commit(&Batch {
            repaired: vec![k.clone()],
            quarantine: vec![(k.clone(), "lost 1".into())],
            ..Default::default()
        })
        .unwrap();
        assert!(s.damaged().unwrap().is_empty());
        assert_eq!(s.quarantined().unwrap(), vec![(k, "lost 1".to_string())]);
    }

    /// A change's seal is stored beside it and found by hash (the first one
    /// stored wins, like the change); an unsigned change has none; the log
    /// carries seals; every credential of an author is kept, in the order
    /// first stored, a repeat changing nothing.
    pub fn seals_and_credentials(s: &mut dyn Store) {
        let k = key(Kind::Person, "p1");
        let mut unsigned = change(&k, 3);
        unsigned.seal = None;
        let mut resigned = change(&k, 1);
        resigned.seal.as_mut().unwrap().sig = [0; 64];
        s.commit(&Batch {
            changes: vec![change(&k, 1), change(&k, 2), unsigned],
            credentials: vec![([1; 8], vec![1, 1]), ([2; 8], vec![2])],
            ..Default::default()
        })
        .unwrap();
        s.commit(&Batch {
            changes: vec![resigned],
            credentials: vec![([1; 8], vec![1, 2]), ([0; 8], vec![0])],
            ..Default::default()
        })
        .unwrap();
        s.commit(&Batch {
            credentials: vec![([1; 8], vec![1, 1]), ([1; 8], vec![1, 0])],
            ..Default::default()
        })
        .unwrap();
        let seals = s.seals(&[[2; 32], [1; 32], [3; 32], [4; 32]]).unwrap();
        assert_eq!(seals[0], change(&k, 2).seal);
        assert_eq!(seals[1], change(&k, 1).seal, "the first seal stored stays");
        assert_eq!(seals[2..], [None, None]);
        let log = s.log_since(0, 10).unwrap();
        assert_eq!(log.len(), 3);
        assert_eq!(log[0].1.seal, change(&k, 1).seal);
        assert_eq!(log[2].1.seal, None);
        assert_eq!(
            s.credentials().unwrap(),
            vec![
                ([0; 8], vec![0]),
                ([1; 8], vec![1, 1]),
                ([1; 8], vec![1, 2]),
                ([1; 8], vec![1, 0]),
                ([2; 8], vec![2])
            ]
        );
        // Signing an unsigned change later: found by `unsigned`, sealed
        // once, a second seal ignored.
        let unsigned = s.unsigned(0, 10).unwrap();
        assert_eq!(unsigned.len(), 1);
        assert_eq!(unsigned[0].1.hash, [3; 32]);
        assert!(s.unsigned(unsigned[0].0, 10).unwrap().is_empty());
        let late = change(&k, 3).seal.unwrap();
        let other = change(&k, 4).seal.unwrap();
        for seal in [late, other] {
            s.commit(&Batch {
                seals: vec![([3; 32], seal), ([1; 32], other)],
                ..Default::default()
            })
            .unwrap();
        }
        assert!(s.unsigned(0, 10).unwrap().is_empty());
        assert_eq!(
            s.seals(&[[3; 32], [1; 32]]).unwrap(),
            vec![Some(late), change(&k, 1).seal]
        );
    }

    /// `known_persons` (an import batch's person check in one read) names
    /// exactly the ids `person` finds: duplicates and unknown or empty ids
    /// in the question change nothing, and a person whose projection row
    /// went away is no longer known.
    pub fn known_persons_answers_like_person(s: &mut dyn Store) {
        assert!(s.known_persons(&[]).unwrap().is_empty());
        assert!(s.known_persons(&["p1"]).unwrap().is_empty(), "empty store");
        let r1 = key(Kind::Registry, "h1");
        let r2 = key(Kind::Registry, "h2");
        let both = Projection {
            persons: vec![
                person("p1", "h1", "山田 太郎", "ヤマダ タロウ"),
                person("p2", "h1", "山田 花子", "ヤマダ ハナコ"),
            ],
            ..Default::default()
        };
        let other = Projection {
            persons: vec![person("p3", "h2", "佐藤 一郎", "サトウ イチロウ")],
            ..Default::default()
        };
        s.commit(&Batch {
            projections: vec![(r1.clone(), both.into()), (r2, other.into())],
            ..Default::default()
        })
        .unwrap();
        let asked = ["p3", "p9", "p1", "p1", "", "P1", "p10"];
        let known = s.known_persons(&asked).unwrap();
        let expected: BTreeSet<String> = ["p1", "p3"].iter().map(|p| p.to_string()).collect();
        assert_eq!(known, expected);
        for p in asked {
            assert_eq!(known.contains(p), s.person(p).unwrap().is_some(), "{p}");
        }
        let one = Projection {
            persons: vec![person("p1", "h1", "山田 太郎", "ヤマダ タロウ")],
            ..Default::default()
        };
        s.commit(&Batch {
            projections: vec![(r1, one.into())],
            ..Default::default()
        })
        .unwrap();
        let known = s.known_persons(&["p1", "p2", "p3"]).unwrap();
        let expected: BTreeSet<String> = ["p1", "p3"].iter().map(|p| p.to_string()).collect();
        assert_eq!(known, expected);
    }

    /// The headquarters dashboard's aggregates.
    pub fn districts_and_arrivals(s: &mut dyn Store) {
        let mut field = person("f1", "x", "田中 一", "タナカ ハジメ");
        field.household_id = None;
        field.district = None;
        let mut other = person("p4", "h2", "佐藤 三", "サトウ サブロウ");
        other.district = Some("本町".into());
        let loc = |p: &str, st, since_ms| LocationRow {
            person_id: p.into(),
            shelter_id: "s1".into(),
            status: st,
            since_ms,
            conflict: false,
        };
        s.commit(&Batch {
            projections: vec![
                (
                    key(Kind::Registry, "h1"),
                    Projection {
                        persons: vec![
                            person("p1", "h1", "山田 太郎", "ヤマダ タロウ"),
                            person("p2", "h1", "山田 花子", "ヤマダ ハナコ"),
                            person("p3", "h1", "山田 次郎", "ヤマダ ジロウ"),
                        ],
                        ..Default::default()
                    }
                    .into(),
                ),
                (
                    key(Kind::Registry, "h2"),
                    Projection {
                        persons: vec![other],
                        ..Default::default()
                    }
                    .into(),
                ),
                (
                    key(Kind::Person, "f1"),
                    Projection {
                        persons: vec![field],
                        ..Default::default()
                    }
                    .into(),
                ),
                (
                    key(Kind::Presence, "h1"),
                    Projection {
                        locations: vec![
                            loc("p1", LocationStatus::In, 3_600_000 + 5),
                            loc("p2", LocationStatus::Out, 10),
                            loc("f1", LocationStatus::In, 20),
                        ],
                        ..Default::default()
                    }
                    .into(),
                ),
            ],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            s.district_counts().unwrap(),
            vec![
                DistrictCount {
                    district: "旭町".into(),
                    residents: 3,
                    accounted: 2
                },
                DistrictCount {
                    district: "本町".into(),
                    residents: 1,
                    accounted: 0
                },
            ]
        );
        let ids = |v: Vec<PersonRow>| v.into_iter().map(|p| p.person_id).collect::<Vec<_>>();
        assert_eq!(ids(s.unaccounted("旭町", "", 10).unwrap()), ["p3"]);
        assert_eq!(
            ids(s.unaccounted("旭町", "p3", 10).unwrap()),
            Vec::<String>::new()
        );
        assert_eq!(ids(s.unaccounted("本町", "", 10).unwrap()), ["p4"]);
        assert_eq!(
            ids(s.unaccounted("本町", "", 0).unwrap()),
            Vec::<String>::new()
        );
        assert_eq!(s.arrivals(3_600_000).unwrap(), vec![(0, 1), (3_600_000, 1)]);
        let roster: Vec<_> = s
            .roster("s1")
            .unwrap()
            .into_iter()
            .map(|l| l.person_id)
            .collect();
        assert_eq!(roster, ["f1", "p1"]);
        assert!(s.roster("s2").unwrap().is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_store_conforms() {
        super::conformance::run_all(|| Box::new(super::MemStore::new()));
    }

    #[test]
    fn stores_sharing_a_pool_hold_one_entry_per_change_under_their_own_key_and_seal() {
        let (k, other) = (
            DocKey::new(crate::ids::Kind::Presence, "h1").unwrap(),
            DocKey::new(crate::ids::Kind::Presence, "h2").unwrap(),
        );
        let change = |key: &DocKey, n: u8, signed: bool| ChangeRecord {
            key: key.clone(),
            hash: [n; 32],
            bytes: vec![n; 3],
            seal: signed.then_some(Seal {
                author: [n; 8],
                sig: [n; 64],
            }),
        };
        let log = |s: &mut MemStore, changes: Vec<ChangeRecord>| {
            s.commit(&Batch {
                changes,
                ..Default::default()
            })
            .unwrap();
        };
        let pool = StorePool::default();
        let pooled = || MemStore {
            pool: Some(pool.clone()),
            ..MemStore::default()
        };
        let (mut a, mut b, mut c, mut plain) = (pooled(), pooled(), pooled(), MemStore::new());
        // `a` (and a store without a pool) log change 2 unsigned; `b` logs
        // it signed after, and 1 and 3 as `a` does; `c` logs change 1's
        // hash under another document.
        let first = vec![
            change(&k, 1, true),
            change(&k, 2, false),
            change(&k, 3, false),
        ];
        log(&mut a, first.clone());
        log(&mut plain, first);
        log(
            &mut b,
            vec![
                change(&k, 1, true),
                change(&k, 2, true),
                change(&k, 3, false),
            ],
        );
        log(&mut c, vec![change(&other, 1, true)]);
        assert!(Arc::ptr_eq(&a.log[0].change, &b.log[0].change));
        assert!(Arc::ptr_eq(&a.log[2].change, &b.log[2].change));
        assert_eq!(c.log[0].change.key, other, "its own key");
        assert_eq!(a.log[0].change.key, k);
        assert_eq!(b.log[1].change.seal, change(&k, 2, true).seal);
        assert_eq!(a.unsigned(0, 10).unwrap(), plain.unsigned(0, 10).unwrap());
        assert_eq!(a.log_since(0, 10).unwrap(), plain.log_since(0, 10).unwrap());
        // Sealing a shared change seals this store's copy only.
        for s in [&mut a, &mut plain] {
            s.commit(&Batch {
                seals: vec![
                    ([2; 32], change(&k, 4, true).seal.unwrap()),
                    ([3; 32], change(&k, 5, true).seal.unwrap()),
                ],
                ..Default::default()
            })
            .unwrap();
        }
        assert_eq!(b.unsigned(0, 10).unwrap().len(), 1, "b's change 3");
        assert_eq!(a.log_since(0, 10).unwrap(), plain.log_since(0, 10).unwrap());
        assert_eq!(
            a.seals(&[[1; 32], [2; 32]]).unwrap(),
            plain.seals(&[[1; 32], [2; 32]]).unwrap()
        );
    }

    #[test]
    fn a_copy_of_shared_change_positions_answers_like_a_plain_map_and_keeps_the_base() {
        let h = |i: u8| [i; 32];
        let (mut plain, mut copy) = (ChangePositions::default(), ChangePositions::default());
        for i in 0..100 {
            plain.insert(h(i), i.into());
            copy.insert(h(i), i.into());
        }
        copy.share();
        let original = copy.clone();
        // Over the base: new entries, replaced entries, removed entries,
        // and a removed entry put back.
        for i in 90..120 {
            assert_eq!(
                plain.insert(h(i), 1000 + usize::from(i)),
                copy.insert(h(i), 1000 + usize::from(i))
            );
        }
        for i in (0..50).step_by(7).chain([95, 110, 250]) {
            assert_eq!(plain.remove(&h(i)), copy.remove(&h(i)), "remove {i}");
        }
        assert_eq!(plain.insert(h(14), 7), copy.insert(h(14), 7));
        for i in 0..=255 {
            assert_eq!(plain.get(&h(i)), copy.get(&h(i)), "get {i}");
        }
        assert_eq!(
            (plain.len(), plain.is_empty()),
            (copy.len(), copy.is_empty())
        );
        assert!(plain == copy && copy == plain);
        // The original is untouched, and the copy never copied the base.
        assert_eq!(original.len(), 100);
        assert!((0..100).all(|i| original.get(&h(i)) == Some(&usize::from(i))));
        assert!(Arc::ptr_eq(&original.base, &copy.base));
        // Sharing again folds the copy's own entries in, with the same answers.
        let before = copy.clone();
        copy.share();
        assert!(copy.own.is_empty() && copy == before);
        // Without the capacity of the entries it folded in: every copy of
        // a map allocates its capacity again.
        assert_eq!(copy.own.capacity(), 0);
    }
}
