//! The engine's bounded cache of materialised documents.
//!
//! Documents leave in the order they were last inserted. Taking a document
//! out (to change it) is O(1): its place in the order is left behind and
//! skipped when reached, by a per-insert stamp, instead of searched for.

use crate::doc::Doc;
use crate::ids::DocKey;
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::sync::Arc;

pub(crate) struct DocCache {
    docs: FxHashMap<DocKey, (Arc<Doc>, u64)>,
    /// Insertions, oldest first, with their stamps; an entry whose stamp is
    /// no longer the document's is stale.
    order: VecDeque<(DocKey, u64)>,
    stamp: u64,
    cap: usize,
}

impl DocCache {
    pub(crate) fn new(cap: usize) -> DocCache {
        DocCache {
            docs: FxHashMap::default(),
            order: VecDeque::new(),
            stamp: 0,
            cap: cap.max(1),
        }
    }

    pub(crate) fn contains(&self, key: &DocKey) -> bool {
        self.docs.contains_key(key)
    }

    pub(crate) fn get(&self, key: &DocKey) -> Option<&Arc<Doc>> {
        self.docs.get(key).map(|(d, _)| d)
    }

    pub(crate) fn get_mut(&mut self, key: &DocKey) -> Option<&mut Arc<Doc>> {
        self.docs.get_mut(key).map(|(d, _)| d)
    }

    pub(crate) fn remove(&mut self, key: &DocKey) -> Option<Arc<Doc>> {
        self.docs.remove(key).map(|(d, _)| d)
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
        self.order.push_back((key.clone(), self.stamp));
        self.docs.insert(key, (doc, self.stamp));
        while self.docs.len() > self.cap {
            let Some((k, s)) = self.order.pop_front() else {
                break;
            };
            if self.docs.get(&k).is_some_and(|(_, cur)| *cur == s) {
                self.docs.remove(&k);
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
