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

use crate::derive;
use crate::doc::{parse_change, Doc, DocError, Hash32};
use crate::ids::DocKey;
use crate::model::PresenceEvent;
use crate::store::Projection;
use automerge::Change;
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// A document after some changes were applied, with what deriving its rows
/// gave (an error is a reason the changes are refused).
#[derive(Clone)]
pub struct Applied {
    pub doc: Arc<Doc>,
    pub projection: Result<Arc<Projection>, String>,
}

type DocId = (DocKey, Vec<Hash32>);
type StepId = (DocKey, Vec<Hash32>, Vec<Hash32>);

struct Table<K, V> {
    map: FxHashMap<K, V>,
    order: VecDeque<K>,
    cap: usize,
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> Table<K, V> {
    fn new(cap: usize) -> Self {
        Table {
            map: FxHashMap::default(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }
    fn get(&self, k: &K) -> Option<V> {
        self.map.get(k).cloned()
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

struct Tables {
    docs: Table<DocId, Arc<Doc>>,
    steps: Table<StepId, Applied>,
    /// Parsed changes by their bytes (only successful parses).
    parsed: Table<Arc<[u8]>, Change>,
    /// Presence events of a document, by (key, heads).
    events: Table<DocId, Arc<Vec<PresenceEvent>>>,
}

/// See the module docs. Cheap to clone (one shared table).
#[derive(Clone)]
pub struct DocShare {
    inner: Arc<Mutex<Tables>>,
}

fn sorted(h: &[Hash32]) -> Vec<Hash32> {
    let mut v = h.to_vec();
    v.sort_unstable();
    v
}

impl DocShare {
    /// Holds at most `docs` documents and `docs` apply results.
    pub fn new(docs: usize) -> DocShare {
        DocShare {
            inner: Arc::new(Mutex::new(Tables {
                docs: Table::new(docs),
                steps: Table::new(docs),
                parsed: Table::new(docs),
                events: Table::new(docs),
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
        self.tables().docs.get(&(key.clone(), sorted(heads)))
    }

    /// Offers a materialised document (its own heads are the key).
    pub fn put_doc(&self, doc: Arc<Doc>) {
        let id = (doc.key.clone(), sorted(&doc.heads()));
        self.tables().docs.put(id, doc);
    }

    /// What applying the changes `added` to `key` at `heads` gave.
    pub fn applied(&self, key: &DocKey, heads: &[Hash32], added: &[Hash32]) -> Option<Applied> {
        self.tables()
            .steps
            .get(&(key.clone(), sorted(heads), sorted(added)))
    }

    /// Records what applying `added` to `key` at `heads` gave; the result
    /// is also offered as a document.
    pub fn put_applied(&self, heads: &[Hash32], added: &[Hash32], result: Applied) {
        let key = result.doc.key.clone();
        let after = (key.clone(), sorted(&result.doc.heads()));
        let mut t = self.tables();
        t.docs.put(after, result.doc.clone());
        t.steps.put((key, sorted(heads), sorted(added)), result);
    }

    /// `parse_change(bytes)`, parsing each distinct change once.
    pub fn parse(&self, bytes: &[u8]) -> Result<Change, DocError> {
        if let Some(c) = self.tables().parsed.map.get(bytes) {
            return Ok(c.clone());
        }
        let c = parse_change(bytes)?;
        self.tables().parsed.put(Arc::from(bytes), c.clone());
        Ok(c)
    }

    /// `derive::presence_events(doc)`, derived once per document version.
    pub fn presence_events(&self, doc: &Doc) -> Result<Arc<Vec<PresenceEvent>>, DocError> {
        let id = (doc.key.clone(), sorted(&doc.heads()));
        if let Some(e) = self.tables().events.get(&id) {
            return Ok(e);
        }
        let e = Arc::new(derive::presence_events(doc)?);
        self.tables().events.put(id, e.clone());
        Ok(e)
    }
}
