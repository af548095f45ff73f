//! Documents: one Automerge document per (kind, id), holding a flat map
//! from field names to JSON-encoded values.
//!
//! Keeping values as JSON strings under field names keeps each document
//! small and its schema checkable: a field either decodes into its typed
//! value or the change that wrote it is rejected. Facts (presence events,
//! audit entries) are fields with unique names, so merges only add; state
//! (a blood type, a shelter's capacity) is a field whose concurrent writes
//! Automerge keeps side by side, which [`Doc::fields`] surfaces as a
//! conflict instead of silently picking one.
//!
//! Automerge panics on some hostile inputs (fuzzing its apply path with
//! mutated changes finds `unwrap` and assertion failures within seconds,
//! see `crdt/tests/core/fixtures/`). Every call here that applies, loads,
//! saves or writes runs behind [`guard`], so such a panic becomes
//! [`DocError::Panicked`]; the document it happened in is then in an
//! unknown state and the caller must drop it (it is never put back).

use crate::actor::Actor;
use crate::ids::DocKey;
use automerge::{
    transaction::CommitOptions, transaction::Transactable, Automerge, Change, ChangeHash, ReadDoc,
    ScalarValue, ScalarValueRef, Value, ValueRef, ROOT,
};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::BTreeMap;

pub type Hash32 = [u8; 32];

/// Largest single document we accept from a peer or the store.
pub const MAX_DOC_BYTES: usize = 4 << 20;
/// Largest field value.
pub const MAX_FIELD_BYTES: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum DocError {
    #[error("document {key} failed to load: {reason}")]
    Load { key: DocKey, reason: String },
    #[error("change bytes are malformed: {0}")]
    BadChange(String),
    #[error("document {key} field {field}: {reason}")]
    Schema {
        key: DocKey,
        field: String,
        reason: String,
    },
    #[error("automerge: {0}")]
    Automerge(String),
    /// Automerge panicked; the document it ran on must be dropped.
    #[error("automerge panicked in {what}: {reason}")]
    Panicked { what: &'static str, reason: String },
}

/// Runs `f`, turning a panic into [`DocError::Panicked`]. The closure may
/// leave what it borrowed half-changed, which is why callers drop it.
pub fn guard<T>(what: &'static str, f: impl FnOnce() -> T) -> Result<T, DocError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let reason = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        DocError::Panicked {
            what,
            reason: reason.chars().take(200).collect(),
        }
    })
}

/// A field's current value, with any concurrent values kept beside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub value: String,
    /// Concurrent values written without knowledge of each other. Empty
    /// when there is no conflict.
    pub conflicts: Vec<String>,
}

/// Cloning copies the whole Automerge document (and keeps its actor: every
/// write names its actor explicitly).
#[derive(Clone)]
pub struct Doc {
    pub key: DocKey,
    pub am: Automerge,
}

pub fn hash32(h: &ChangeHash) -> Hash32 {
    h.0
}

pub fn heads_digest(heads: &[Hash32]) -> [u8; 16] {
    let mut sorted = heads.to_vec();
    sorted.sort_unstable();
    let mut h = blake3::Hasher::new();
    for x in &sorted {
        h.update(x);
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

impl Doc {
    pub fn new(key: DocKey) -> Doc {
        // The random actor of `Automerge::new` is replaced before any write.
        Doc {
            key,
            am: Automerge::new(),
        }
    }

    pub fn load(
        key: DocKey,
        snapshot: Option<&[u8]>,
        changes: &[Vec<u8>],
    ) -> Result<Doc, DocError> {
        let k = key.clone();
        guard("load", move || Self::load_unguarded(k, snapshot, changes))?
    }

    fn load_unguarded(
        key: DocKey,
        snapshot: Option<&[u8]>,
        changes: &[Vec<u8>],
    ) -> Result<Doc, DocError> {
        let load_err = |reason: String| DocError::Load {
            key: key.clone(),
            reason,
        };
        let mut am = match snapshot {
            Some(b) if b.len() > MAX_DOC_BYTES => {
                return Err(load_err("snapshot too large".into()))
            }
            Some(b) => Automerge::load(b).map_err(|e| load_err(e.to_string()))?,
            None => Automerge::new(),
        };
        let parsed = changes
            .iter()
            .map(|c| parse_change(c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| load_err(e.to_string()))?;
        am.apply_changes(parsed)
            .map_err(|e| load_err(e.to_string()))?;
        Ok(Doc { key, am })
    }

    pub fn heads(&self) -> Vec<Hash32> {
        self.am.get_heads().iter().map(hash32).collect()
    }

    /// Every field with its value and conflicts, in name order.
    pub fn fields(&self) -> BTreeMap<String, Field> {
        let mut out = BTreeMap::new();
        // One pass over the map; only conflicted fields need every value.
        for item in self.am.map_range(ROOT, ..) {
            let f = if item.conflict {
                self.field(&item.key)
            } else {
                match item.value {
                    ValueRef::Scalar(ScalarValueRef::Str(v)) => Some(Field {
                        value: v.into_owned(),
                        conflicts: vec![],
                    }),
                    _ => None,
                }
            };
            if let Some(f) = f {
                out.insert(item.key.into_owned(), f);
            }
        }
        out
    }

    pub fn field(&self, name: &str) -> Option<Field> {
        let all = self.am.get_all(ROOT, name).ok()?;
        let mut values: Vec<String> = all
            .iter()
            .filter_map(|(v, _)| match v {
                Value::Scalar(s) => match s.as_ref() {
                    ScalarValue::Str(s) => Some(s.to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        if values.is_empty() {
            return None;
        }
        // Automerge lists the winning value last; keep that as the value.
        let value = values.pop()?;
        Some(Field {
            value,
            conflicts: values,
        })
    }

    /// Typed value of a field; a malformed value is a schema error naming
    /// the document and field.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, DocError> {
        match self.field(name) {
            None => Ok(None),
            Some(f) => decode(&self.key, name, &f.value).map(Some),
        }
    }

    /// Applies `writes` (field name, Some(json) to put or None to delete)
    /// as one change authored by `actor` at `time_s`. Returns the change
    /// bytes, or None when nothing changed.
    pub fn write(
        &mut self,
        actor: Actor,
        time_s: i64,
        message: &str,
        writes: &[(String, Option<String>)],
    ) -> Result<Option<Change>, DocError> {
        guard("write", || {
            self.write_unguarded(actor, time_s, message, writes)
        })?
    }

    fn write_unguarded(
        &mut self,
        actor: Actor,
        time_s: i64,
        message: &str,
        writes: &[(String, Option<String>)],
    ) -> Result<Option<Change>, DocError> {
        self.am.set_actor(actor.automerge());
        // A document's first change has no dependencies, so two documents
        // given the same first values by the same actor in the same second
        // would get the same change, byte for byte, and the same hash: the
        // store keeps one change per hash, and the other document would be
        // left without its change (two residents with the same medical
        // profile in one import). Naming the document in the first
        // change's message makes it its own; every later change depends on
        // it.
        let named;
        let message = if message.is_empty() && self.am.get_heads().is_empty() {
            named = self.key.to_string();
            named.as_str()
        } else {
            message
        };
        if let Some(root) = self.first_write_as_root(writes)? {
            let mut tx = self.am.transaction();
            tx.init_root_from_hydrate(&root)
                .map_err(|e| DocError::Automerge(e.to_string()))?;
            let (hash, _) = tx.commit_with(
                CommitOptions::default()
                    .with_time(time_s)
                    .with_message(message.to_string()),
            );
            return Ok(hash.and_then(|h| self.am.get_change_by_hash(&h)));
        }
        let mut tx = self.am.transaction();
        for (name, value) in writes {
            match value {
                Some(v) => {
                    if v.len() > MAX_FIELD_BYTES {
                        return Err(DocError::Schema {
                            key: self.key.clone(),
                            field: name.clone(),
                            reason: "value too large".into(),
                        });
                    }
                    tx.put(ROOT, name.as_str(), v.as_str())
                        .map_err(|e| DocError::Automerge(e.to_string()))?;
                }
                None => {
                    tx.delete(ROOT, name.as_str())
                        .map_err(|e| DocError::Automerge(e.to_string()))?;
                }
            }
        }
        let (hash, _) = tx.commit_with(
            CommitOptions::default()
                .with_time(time_s)
                .with_message(message.to_string()),
        );
        Ok(hash.and_then(|h| self.am.get_change_by_hash(&h)))
    }

    /// The first write of a new document (no change of its own, none
    /// waiting) when it only puts distinct fields: as one map for
    /// Automerge's batch insertion, which adds all of a document's ops in
    /// one splice of its op columns instead of one splice per field (a
    /// fresh document's puts have no predecessors either way, so the
    /// resulting document and its conflicts are the same). `None` when
    /// the write must go field by field.
    fn first_write_as_root(
        &self,
        writes: &[(String, Option<String>)],
    ) -> Result<Option<automerge::hydrate::Map>, DocError> {
        if writes.is_empty() || !self.am.get_heads().is_empty() || self.has_waiting() {
            return Ok(None);
        }
        let mut root = std::collections::HashMap::with_capacity(writes.len());
        for (name, value) in writes {
            let Some(v) = value else { return Ok(None) };
            if v.len() > MAX_FIELD_BYTES {
                return Err(DocError::Schema {
                    key: self.key.clone(),
                    field: name.clone(),
                    reason: "value too large".into(),
                });
            }
            let v = automerge::hydrate::Value::Scalar(ScalarValue::Str(v.as_str().into()));
            if root.insert(name.clone(), v).is_some() {
                return Ok(None);
            }
        }
        Ok(Some(root.into()))
    }

    /// Applies changes. On `Err(Panicked)` the document is in an unknown
    /// state: drop it.
    pub fn apply(&mut self, changes: Vec<Change>) -> Result<(), DocError> {
        guard("apply", || self.am.apply_changes(changes))?
            .map_err(|e| DocError::Automerge(e.to_string()))
    }

    /// Changes the holder of `their_heads` lacks, in [`canonical_order`].
    /// Unknown heads are ignored, so the answer may include changes they
    /// already have, never fewer than they need.
    pub fn changes_since(&self, their_heads: &[Hash32]) -> Vec<Change> {
        let known: Vec<ChangeHash> = their_heads
            .iter()
            .map(|h| ChangeHash(*h))
            .filter(|h| self.knows(&h.0))
            .collect();
        canonical_order(self.am.get_changes(&known))
    }

    /// Whether the change `hash` is applied (not merely queued for its
    /// dependencies).
    pub fn knows(&self, hash: &Hash32) -> bool {
        let h = ChangeHash(*hash);
        // With no change queued (nearly always), "no missing dependencies
        // from h" means exactly "h is applied", and that is a lookup in the
        // change graph; `get_change_by_hash` rebuilds the whole change.
        if self.am.get_missing_deps(&[]).is_empty() {
            self.am.get_missing_deps(&[h]).is_empty()
        } else {
            self.am.get_change_by_hash(&h).is_some()
        }
    }

    /// Whether changes wait here for dependencies that have not arrived.
    /// Such a document is more than its heads say: two replicas with equal
    /// heads may hold different waiting changes.
    pub fn has_waiting(&self) -> bool {
        !self.am.get_missing_deps(&[]).is_empty()
    }

    pub fn save(&self) -> Result<Vec<u8>, DocError> {
        guard("save", || self.am.save())
    }
}

/// Changes with every dependency before its dependents and otherwise in
/// hash order. Automerge lists a document's changes in the order they were
/// applied, which differs between replicas with equal heads; in this order,
/// what a node sends depends only on the two sides' heads.
pub fn canonical_order(changes: Vec<Change>) -> Vec<Change> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    if changes.len() < 2 {
        return changes;
    }
    let at: std::collections::HashMap<Hash32, usize> = changes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.hash().0, i))
        .collect();
    let mut waiting = vec![0usize; changes.len()];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); changes.len()];
    for (i, c) in changes.iter().enumerate() {
        for d in c.deps() {
            if let Some(&j) = at.get(&d.0) {
                waiting[i] += 1;
                dependents[j].push(i);
            }
        }
    }
    let mut ready: BinaryHeap<Reverse<(Hash32, usize)>> = changes
        .iter()
        .enumerate()
        .filter(|(i, _)| waiting[*i] == 0)
        .map(|(i, c)| Reverse((c.hash().0, i)))
        .collect();
    let mut slots: Vec<Option<Change>> = changes.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(slots.len());
    while let Some(Reverse((_, i))) = ready.pop() {
        out.extend(slots[i].take());
        for &j in &dependents[i] {
            waiting[j] -= 1;
            if waiting[j] == 0 {
                ready.push(Reverse((
                    slots[j].as_ref().expect("emitted once").hash().0,
                    j,
                )));
            }
        }
    }
    // Unreachable for a change graph; never lose a change if it were not one.
    out.extend(slots.into_iter().flatten());
    out
}

pub fn parse_change(bytes: &[u8]) -> Result<Change, DocError> {
    if bytes.len() > MAX_DOC_BYTES {
        return Err(DocError::BadChange("change too large".into()));
    }
    // Automerge's parser has had panics on hostile input; keep them inside.
    let owned = bytes.to_vec();
    match std::panic::catch_unwind(move || Change::from_bytes(owned)) {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(DocError::BadChange(e.to_string())),
        Err(_) => Err(DocError::BadChange("parser panicked".into())),
    }
}

pub fn encode<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("domain types serialize")
}

pub fn decode<T: DeserializeOwned>(key: &DocKey, field: &str, s: &str) -> Result<T, DocError> {
    serde_json::from_str(s).map_err(|e| DocError::Schema {
        key: key.clone(),
        field: field.to_string(),
        reason: e.to_string(),
    })
}

/// A document's heads and their fingerprint ([`item_fp`]).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct At {
    pub(crate) heads: Vec<Hash32>,
    pub(crate) fp: u128,
}

impl At {
    pub(crate) fn new(key: &DocKey, heads: Vec<Hash32>) -> At {
        let fp = item_fp(key, &heads);
        At { heads, fp }
    }
}

/// The fingerprint of one document at some heads.
pub(crate) fn item_fp(key: &DocKey, heads: &[Hash32]) -> u128 {
    let mut h = blake3::Hasher::new();
    h.update(&key.to_bytes());
    h.update(&heads_digest(heads));
    u128::from_le_bytes(h.finalize().as_bytes()[..16].try_into().expect("16 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{Kind, NodeId, Role};

    fn actor(n: &str, inc: u32) -> Actor {
        Actor::new(Role::Hq, &NodeId::new(n).unwrap(), inc)
    }

    #[test]
    fn changes_are_listed_in_one_order_however_the_document_was_built() {
        let key = DocKey::new(Kind::Presence, "h1").unwrap();
        let mut base = Doc::new(key.clone());
        let w = |d: &mut Doc, a: Actor, f: &str| {
            d.write(a, 1, "", &[(f.to_string(), Some("v".into()))])
                .unwrap()
                .unwrap()
        };
        w(&mut base, actor("shelter-1", 1), "x");
        let concurrent: Vec<Change> = [("shelter-2", "y"), ("hq-1", "z"), ("shelter-1", "w")]
            .into_iter()
            .map(|(n, f)| w(&mut base.clone(), actor(n, 1), f))
            .collect();
        let mut after = concurrent[2].clone();
        let mut later = base.clone();
        later.apply(vec![after.clone()]).unwrap();
        after = w(&mut later, actor("shelter-1", 1), "v");
        let all: Vec<Change> = concurrent.iter().cloned().chain([after]).collect();
        let mut forward = base.clone();
        forward.apply(all.clone()).unwrap();
        let mut backward = base.clone();
        for c in all.iter().rev() {
            backward.apply(vec![c.clone()]).unwrap();
        }
        let loaded = Doc::load(key, Some(&backward.save().unwrap()), &[]).unwrap();
        let order = |d: &Doc| -> Vec<Hash32> {
            d.changes_since(&base.heads())
                .iter()
                .map(|c| c.hash().0)
                .collect()
        };
        assert_eq!(order(&forward).len(), 4);
        assert_eq!(order(&forward), order(&backward));
        assert_eq!(order(&forward), order(&loaded));
        // Dependencies first.
        let o = order(&forward);
        let dep = concurrent[2].hash().0;
        let pos = |h: &Hash32| o.iter().position(|x| x == h).unwrap();
        assert!(pos(&dep) < pos(&all[3].hash().0));
    }

    #[test]
    fn concurrent_writes_are_kept_as_conflicts() {
        let key = DocKey::new(Kind::Medical, "p1").unwrap();
        let mut a = Doc::new(key.clone());
        a.write(
            actor("a", 1),
            0,
            "init",
            &[("blood_type".into(), Some("\"A+\"".into()))],
        )
        .unwrap();
        let mut b = Doc::load(key.clone(), Some(&a.save().unwrap()), &[]).unwrap();
        a.write(
            actor("a", 1),
            1,
            "",
            &[("blood_type".into(), Some("\"B+\"".into()))],
        )
        .unwrap();
        b.write(
            actor("b", 1),
            1,
            "",
            &[("blood_type".into(), Some("\"O+\"".into()))],
        )
        .unwrap();
        let from_b = b.changes_since(&a.heads());
        a.apply(from_b).unwrap();
        let f = a.field("blood_type").unwrap();
        assert_eq!(f.conflicts.len(), 1);
        let mut all = vec![f.value.clone(), f.conflicts[0].clone()];
        all.sort();
        assert_eq!(all, vec!["\"B+\"", "\"O+\""]);
    }

    /// A new document's first write goes in as one batch (see
    /// `first_write_as_root`); what it holds, how a later write replaces
    /// it and how it conflicts with another node's first write must be
    /// exactly what field-by-field puts give.
    #[test]
    fn a_first_write_in_one_batch_is_the_same_document_as_field_by_field() {
        let key = DocKey::new(Kind::Medical, "p1").unwrap();
        let w = |name: &str, v: &str| (name.to_string(), Some(v.to_string()));
        let first = [w("b", "\"2\""), w("a", "\"1\""), w("c", "\"3\"")];
        let mut batch = Doc::new(key.clone());
        assert!(batch.first_write_as_root(&first).unwrap().is_some());
        let c1 = batch.write(actor("a", 1), 0, "", &first).unwrap().unwrap();
        // The same fields as three puts: a repeated name keeps the
        // field-by-field path (the second put replaces the first).
        let mut puts = Doc::new(key.clone());
        let with_repeat = [
            w("b", "\"x\""),
            w("b", "\"2\""),
            w("a", "\"1\""),
            w("c", "\"3\""),
        ];
        assert!(puts.first_write_as_root(&with_repeat).unwrap().is_none());
        puts.write(actor("a", 1), 0, "", &with_repeat)
            .unwrap()
            .unwrap();
        let values = |d: &Doc| {
            d.fields()
                .into_iter()
                .map(|(k, f)| (k, f.value, f.conflicts))
                .collect::<Vec<_>>()
        };
        assert_eq!(values(&batch), values(&puts));
        // Loads from its change alone, as a peer receives it.
        let mut peer = Doc::new(key.clone());
        peer.apply(vec![c1.clone()]).unwrap();
        assert_eq!(values(&peer), values(&batch));
        // A later write of a field replaces it (its op names the batch's
        // op as predecessor): no conflict, and it is not a first write.
        assert!(batch.first_write_as_root(&first[..1]).unwrap().is_none());
        batch
            .write(actor("a", 1), 1, "", &[w("b", "\"4\"")])
            .unwrap()
            .unwrap();
        let b = batch.field("b").unwrap();
        assert_eq!((b.value.as_str(), b.conflicts.len()), ("\"4\"", 0));
        // Two nodes creating the same document concurrently: both values
        // are kept, as with puts.
        let mut other = Doc::new(key);
        let c2 = other
            .write(actor("b", 1), 0, "", &[w("a", "\"9\"")])
            .unwrap()
            .unwrap();
        peer.apply(vec![c2]).unwrap();
        let a = peer.field("a").unwrap();
        let mut both = vec![a.value, a.conflicts[0].clone()];
        both.sort();
        assert_eq!(both, ["\"1\"", "\"9\""]);
        // A delete among the writes keeps the field-by-field path too.
        let fresh = Doc::new(DocKey::new(Kind::Medical, "p2").unwrap());
        let del = [w("a", "\"1\""), ("b".to_string(), None)];
        assert!(fresh.first_write_as_root(&del).unwrap().is_none());
    }

    #[test]
    fn garbage_change_bytes_are_an_error() {
        for bytes in [
            vec![],
            vec![0u8; 10],
            vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3],
            (0..255u8).collect(),
        ] {
            assert!(parse_change(&bytes).is_err());
        }
        assert!(Doc::load(
            DocKey::new(Kind::Person, "x").unwrap(),
            Some(b"not automerge"),
            &[]
        )
        .is_err());
    }
}
