//! The engine's bounded cache of materialised documents.
//!
//! Documents leave in the order they were last inserted. Taking a document
//! out (to change it) is O(1): its place in the order is left behind and
//! skipped when reached, by a per-insert stamp, instead of searched for.
//!
//! A document with changes that are not durable yet is pinned: pushed out
//! of the order, it is held aside until unpinned (its commit or its
//! forgetting), never dropped. The store and the index still name its
//! older state, so dropping it would let a later command of the same group
//! commit change that older state: a second change with the same actor and
//! sequence number, which no replica could load. Held documents are
//! bounded by what one group commit touches.

use crate::doc::Doc;
use crate::ids::DocKey;
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::VecDeque;
use std::sync::Arc;

/// How many entries each part of a [`DocCache`] holds (part of
/// [`crate::engine::Footprint`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheSizes {
    /// Documents in the cache.
    pub docs: usize,
    /// Pinned documents the order pushed out, held aside.
    pub held: usize,
    /// Documents with changes not durable yet.
    pub pinned: usize,
    /// Entries of the insertion order, stale ones included.
    pub order: usize,
}

pub(crate) struct DocCache {
    docs: FxHashMap<DocKey, (Arc<Doc>, u64)>,
    /// Insertions, oldest first, with their stamps; an entry whose stamp is
    /// no longer the document's is stale.
    order: VecDeque<(DocKey, u64)>,
    stamp: u64,
    cap: usize,
    /// Documents with changes not durable yet.
    pinned: FxHashSet<DocKey>,
    /// Pinned documents the order pushed out, until they are unpinned.
    held: FxHashMap<DocKey, Arc<Doc>>,
}

impl DocCache {
    pub(crate) fn new(cap: usize) -> DocCache {
        DocCache {
            docs: FxHashMap::default(),
            order: VecDeque::new(),
            stamp: 0,
            cap: cap.max(1),
            pinned: FxHashSet::default(),
            held: FxHashMap::default(),
        }
    }

    pub(crate) fn contains(&self, key: &DocKey) -> bool {
        self.docs.contains_key(key) || self.held.contains_key(key)
    }

    pub(crate) fn get(&self, key: &DocKey) -> Option<&Arc<Doc>> {
        match self.docs.get(key) {
            Some((d, _)) => Some(d),
            None => self.held.get(key),
        }
    }

    pub(crate) fn get_mut(&mut self, key: &DocKey) -> Option<&mut Arc<Doc>> {
        match self.docs.get_mut(key) {
            Some((d, _)) => Some(d),
            None => self.held.get_mut(key),
        }
    }

    pub(crate) fn remove(&mut self, key: &DocKey) -> Option<Arc<Doc>> {
        match self.docs.remove(key) {
            Some((d, _)) => Some(d),
            None => self.held.remove(key),
        }
    }

    /// Keeps `key` (now or when next inserted) until [`DocCache::unpin`]:
    /// it has changes that are not durable yet.
    pub(crate) fn pin(&mut self, key: &DocKey) {
        if !self.pinned.contains(key) {
            self.pinned.insert(key.clone());
        }
    }

    /// `key`'s changes are durable (or forgotten): it may leave again. A
    /// held copy is dropped; the store has it from now on.
    pub(crate) fn unpin(&mut self, key: &DocKey) {
        if self.pinned.remove(key) {
            self.held.remove(key);
        }
    }

    /// What the cache holds now.
    pub(crate) fn sizes(&self) -> CacheSizes {
        CacheSizes {
            docs: self.docs.len(),
            held: self.held.len(),
            pinned: self.pinned.len(),
            order: self.order.len(),
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.docs.len()
    }

    /// Inserts (or replaces) a document, then drops the oldest beyond the
    /// capacity.
    pub(crate) fn insert(&mut self, doc: Arc<Doc>) {
        self.stamp += 1;
        let key = doc.key.clone();
        if !self.held.is_empty() {
            self.held.remove(&key);
        }
        self.order.push_back((key.clone(), self.stamp));
        self.docs.insert(key, (doc, self.stamp));
        while self.docs.len() > self.cap {
            let Some((k, s)) = self.order.pop_front() else {
                break;
            };
            if self.docs.get(&k).is_some_and(|(_, cur)| *cur == s) {
                if let Some((d, _)) = self.docs.remove(&k) {
                    if self.pinned.contains(&k) {
                        self.held.insert(k, d);
                    }
                }
            }
        }
        // Stale entries are bounded too.
        if self.order.len() > 4 * self.cap + 16 {
            let docs = &self.docs;
            self.order
                .retain(|(k, s)| docs.get(k).is_some_and(|(_, cur)| cur == s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Kind;

    fn doc(id: &str) -> Arc<Doc> {
        Arc::new(Doc::new(DocKey::new(Kind::Presence, id).unwrap()))
    }

    #[test]
    fn holds_at_most_cap_and_drops_the_oldest_insert() {
        let mut c = DocCache::new(3);
        for id in ["a", "b", "c"] {
            c.insert(doc(id));
        }
        // Re-inserting `a` makes it the newest.
        let a = c.remove(&doc("a").key).unwrap();
        c.insert(a);
        c.insert(doc("d"));
        assert_eq!(c.len(), 3);
        assert!(!c.contains(&doc("b").key));
        for id in ["a", "c", "d"] {
            assert!(c.contains(&doc(id).key), "{id}");
        }
    }

    #[test]
    fn a_pinned_document_is_held_until_unpinned() {
        let mut c = DocCache::new(2);
        let a = doc("a");
        c.pin(&a.key);
        c.insert(a.clone());
        for id in ["b", "c", "d"] {
            c.insert(doc(id));
        }
        assert!(c.contains(&a.key), "pushed out while pinned");
        assert!(Arc::ptr_eq(c.get(&a.key).unwrap(), &a));
        assert!(!c.contains(&doc("b").key));
        c.unpin(&a.key);
        assert!(!c.contains(&a.key), "held after its commit");
        // Unpinned, it leaves like any other.
        c.insert(a.clone());
        for id in ["e", "f"] {
            c.insert(doc(id));
        }
        assert!(!c.contains(&a.key));
    }

    #[test]
    fn taking_documents_out_leaves_the_order_bounded() {
        let mut c = DocCache::new(2);
        for i in 0..1000 {
            let d = doc(&format!("d{}", i % 5));
            c.insert(d.clone());
            c.remove(&d.key);
            c.insert(d);
            assert!(c.len() <= 2);
            assert!(c.order.len() <= 4 * 2 + 16 + 1);
        }
    }
}
