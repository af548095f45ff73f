//! Materialised documents shared by engines in one process.
//!
//! A document's content is a pure function of its key and its heads: the
//! heads name every change it holds, by hash. So when many engines hold
//! replicas of the same documents in one process (the simulator runs
//! hundreds of nodes), one of them can load or apply, and the others reuse
//! the result instead of parsing and applying the same Automerge changes
//! again. A node runs one engine and has no share; an engine with a share
//! runs exactly the same checks, decisions and writes, and only skips
//! recomputing what another engine already computed from the same inputs.
//!
//! Entries are keyed by what determines them: a document by (key, heads);
//! the result of applying changes by (key, heads before, hashes applied),
//! which also keeps the rows derived from the result; a parsed change by
//! its bytes. The tables are bounded and forget their oldest entries first.
//!
//! Compiled only with the `share` feature, which only the simulator
//! enables (and in this crate's unit tests): a node's build has no share.

use crate::derive::{self, Applied};
use crate::doc::{parse_change, At, Doc, DocError, Hash32};
use crate::ids::DocKey;
use crate::model::PresenceEvent;
use automerge::Change;
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// What an entry is the answer for: a document, its heads and (for an
/// apply result) the changes applied, as sets.
struct Id {
    key: DocKey,
    heads: Vec<Hash32>,
    added: Vec<Hash32>,
}

fn sorted(h: &[Hash32]) -> Vec<Hash32> {
    let mut v = h.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

/// `h` holds exactly the hashes of `sorted` (sorted and without repeats):
/// equal lengths and inclusion both ways also rule out repeats in `h`.
fn same_set(sorted: &[Hash32], h: &[Hash32]) -> bool {
    sorted.len() == h.len()
        && h.iter().all(|x| sorted.binary_search(x).is_ok())
        && sorted.iter().all(|x| h.contains(x))
}

impl Id {
    fn new(key: &DocKey, heads: &[Hash32], added: &[Hash32]) -> Id {
        Id {
            key: key.clone(),
            heads: sorted(heads),
            added: sorted(added),
        }
    }
    fn is(&self, key: &DocKey, heads: &[Hash32], added: &[Hash32]) -> bool {
        self.key == *key && same_set(&self.heads, heads) && same_set(&self.added, added)
    }
}

/// A table's lookup key: a hash of the id that needs no allocation and no
/// sorting (hash sets are combined order-independently). Entries keep their
/// full id, so a colliding digest is a miss, never a wrong answer.
fn digest(key: &DocKey, heads: &[Hash32], added: &[Hash32]) -> u64 {
    use std::hash::{Hash, Hasher};
    let set = |hs: &[Hash32], salt: u64| {
        hs.iter().fold(0u64, |acc, h| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&h[..8]);
            acc.wrapping_add(u64::from_le_bytes(w) ^ salt)
        })
    };
    let mut f = rustc_hash::FxHasher::default();
    key.hash(&mut f);
    set(heads, 0).hash(&mut f);
    set(added, 0x9e37_79b9_7f4a_7c15).hash(&mut f);
    (heads.len() as u64 | (added.len() as u64) << 32).hash(&mut f);
    f.finish()
}

/// A bounded map that forgets its oldest insertions first.
struct Fifo<K, V> {
    map: FxHashMap<K, V>,
    order: VecDeque<K>,
    cap: usize,
}

impl<K: std::hash::Hash + Eq + Clone, V> Fifo<K, V> {
    fn new(cap: usize) -> Self {
        Fifo {
            map: FxHashMap::default(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }
    fn get<Q>(&self, k: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.map.get(k)
    }
    fn put(&mut self, k: K, v: V) {
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back(k);
        }
        while self.map.len() > self.cap {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.map.remove(&old);
        }
    }
}

/// Entries by the digest of their id, each keeping its full id.
struct Table<V>(Fifo<u64, (Id, V)>);

impl<V: Clone> Table<V> {
    fn new(cap: usize) -> Self {
        Table(Fifo::new(cap))
    }
    fn get(&self, key: &DocKey, heads: &[Hash32], added: &[Hash32]) -> Option<V> {
        match self.0.get(&digest(key, heads, added)) {
            Some((id, v)) if id.is(key, heads, added) => Some(v.clone()),
            _ => None,
        }
    }
    fn put(&mut self, key: &DocKey, heads: &[Hash32], added: &[Hash32], v: V) {
        let id = Id::new(key, heads, added);
        self.0.put(digest(key, heads, added), (id, v));
    }
}

struct Tables {
    docs: Table<Arc<Doc>>,
    steps: Table<Applied>,
    /// Parsed changes by their bytes (only successful parses).
    parsed: Fifo<Arc<[u8]>, Arc<Change>>,
    /// Presence events of a document, by (key, heads).
    events: Table<Arc<Vec<PresenceEvent>>>,
    /// Index entries' heads and fingerprints, by (key, heads).
    ats: Table<Arc<At>>,
}

/// Index entries' `At`s the table keeps per document it keeps: each is
/// small (heads and a fingerprint), and worth keeping until every holder
/// has the document at those heads.
const AT_PER_DOC: usize = 8;

/// See the module docs. Cheap to clone (one shared table).
#[derive(Clone)]
pub struct DocShare {
    inner: Arc<Mutex<Tables>>,
}

impl DocShare {
    /// Holds at most `docs` documents and `docs` apply results.
    pub fn new(docs: usize) -> DocShare {
        DocShare {
            inner: Arc::new(Mutex::new(Tables {
                docs: Table::new(docs),
                steps: Table::new(docs),
                parsed: Fifo::new(docs),
                events: Table::new(docs),
                ats: Table::new(docs.saturating_mul(AT_PER_DOC)),
            })),
        }
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        // A panic elsewhere cannot leave a table half-updated: every update
        // is a single insert or remove.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The document `key` at exactly `heads`, if an engine materialised it.
    pub fn doc(&self, key: &DocKey, heads: &[Hash32]) -> Option<Arc<Doc>> {
        self.tables().docs.get(key, heads, &[])
    }

    /// Offers a materialised document (its own heads are the key).
    pub fn put_doc(&self, doc: Arc<Doc>) {
        let heads = doc.heads();
        self.tables().docs.put(&doc.key.clone(), &heads, &[], doc);
    }

    /// What applying the changes `added` to `key` at `heads` gave.
    pub fn applied(&self, key: &DocKey, heads: &[Hash32], added: &[Hash32]) -> Option<Applied> {
        self.tables().steps.get(key, heads, added)
    }

    /// Records what applying `added` to `key` at `heads` gave; the result
    /// is also offered as a document.
    pub fn put_applied(&self, heads: &[Hash32], added: &[Hash32], result: Applied) {
        let key = result.doc.key.clone();
        let after = result.doc.heads();
        let mut t = self.tables();
        t.docs.put(&key, &after, &[], result.doc.clone());
        t.steps.put(&key, heads, added, result);
    }

    /// The heads and fingerprint of `key` at `heads` for an index entry,
    /// one `Arc` for every engine that indexes the document at exactly
    /// these heads in this order (hundreds of holders' entries otherwise
    /// each held a copy).
    pub(crate) fn at(&self, key: &DocKey, heads: Vec<Hash32>) -> Arc<At> {
        let mut t = self.tables();
        if let Some(a) = t.ats.get(key, &heads, &[]) {
            if a.heads == heads {
                return a;
            }
        }
        let a = Arc::new(At::new(key, heads));
        t.ats.put(key, &a.heads, &[], a.clone());
        a
    }

    /// `parse_change(bytes)`, parsing each distinct change once.
    pub fn parse(&self, bytes: &[u8]) -> Result<Arc<Change>, DocError> {
        if let Some(c) = self.tables().parsed.get(bytes) {
            return Ok(c.clone());
        }
        let c = Arc::new(parse_change(bytes)?);
        self.tables().parsed.put(Arc::from(bytes), c.clone());
        Ok(c)
    }

    /// `derive::presence_events(doc)`, derived once per document version.
    pub fn presence_events(&self, doc: &Doc) -> Result<Arc<Vec<PresenceEvent>>, DocError> {
        let heads = doc.heads();
        if let Some(e) = self.tables().events.get(&doc.key, &heads, &[]) {
            return Ok(e);
        }
        let e = Arc::new(derive::presence_events(doc)?);
        self.tables().events.put(&doc.key, &heads, &[], e.clone());
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Kind;

    #[test]
    fn entries_are_found_by_their_id_as_sets_and_only_by_it() {
        let k = DocKey::new(Kind::Presence, "h1").unwrap();
        let other = DocKey::new(Kind::Presence, "h2").unwrap();
        let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let mut t: Table<u32> = Table::new(8);
        t.put(&k, &[a, b], &[c], 7);
        assert_eq!(t.get(&k, &[b, a], &[c]), Some(7), "heads are a set");
        assert_eq!(t.get(&k, &[a, b], &[]), None);
        assert_eq!(t.get(&k, &[a], &[c]), None);
        assert_eq!(t.get(&k, &[a, c], &[b]), None, "heads and added differ");
        assert_eq!(t.get(&other, &[a, b], &[c]), None);
    }

    #[test]
    fn a_repeated_hash_is_not_another_hash() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert!(same_set(&sorted(&[a, b]), &[b, a]));
        assert!(!same_set(&sorted(&[a, b]), &[a, a]));
        assert!(!same_set(&sorted(&[a]), &[a, a]));
    }

    #[test]
    fn holders_of_a_document_at_the_same_heads_share_one_at() {
        let k = DocKey::new(Kind::Presence, "h1").unwrap();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let s = DocShare::new(4);
        let first = s.at(&k, vec![a, b]);
        assert_eq!(*first, At::new(&k, vec![a, b]));
        assert!(Arc::ptr_eq(&first, &s.at(&k, vec![a, b])));
        // Another order is another entry's exact heads: not this one.
        let swapped = s.at(&k, vec![b, a]);
        assert_eq!(swapped.heads, vec![b, a]);
        let other = DocKey::new(Kind::Presence, "h2").unwrap();
        assert_eq!(*s.at(&other, vec![a, b]), At::new(&other, vec![a, b]));
    }

    #[test]
    fn tables_forget_their_oldest_entries() {
        let k = DocKey::new(Kind::Presence, "h1").unwrap();
        let mut t: Table<u32> = Table::new(2);
        for i in 0..5u8 {
            t.put(&k, &[[i; 32]], &[], i as u32);
        }
        assert_eq!(t.0.map.len(), 2);
        assert_eq!(t.get(&k, &[[4; 32]], &[]), Some(4));
        assert_eq!(t.get(&k, &[[0; 32]], &[]), None);
    }
}
