//! `MemStore` with a fault switch the simulator keeps a handle to.
//!
//! The engine owns its store and offers only `store()`, so
//! `MemStore::fail_commits` cannot be armed on a running node. This thin
//! wrapper delegates everything to `MemStore` and fails the next N commits
//! when the shared counter says so (A-class I/O errors).

use crdt::doc::Hash32;
use crdt::ids::{DocKey, NodeId};
use crdt::store::*;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

#[derive(Clone, Default)]
pub struct SimStore {
    pub mem: MemStore,
    pub fail_next: Rc<Cell<u32>>,
    /// Peers restored from a backup: what they were last known to hold
    /// is no longer true (simulator workaround, see the report).
    pub restored_peers: Rc<RefCell<BTreeSet<String>>>,
}

impl Store for SimStore {
    fn load_meta(&self) -> Result<Option<Meta>, StoreError> {
        self.mem.load_meta()
    }
    fn doc_index(&self) -> Result<Vec<(DocKey, Vec<Hash32>)>, StoreError> {
        self.mem.doc_index()
    }
    fn load_doc(&self, key: &DocKey) -> Result<Option<StoredDoc>, StoreError> {
        self.mem.load_doc(key)
    }
    fn doc_changes(&self, key: &DocKey) -> Result<Vec<Vec<u8>>, StoreError> {
        self.mem.doc_changes(key)
    }
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        let n = self.fail_next.get();
        if n > 0 {
            self.fail_next.set(n - 1);
            return Err(StoreError::Io("simulated EIO".into()));
        }
        self.mem.commit(batch)
    }
    fn op_result(&self, op_id: &str) -> Result<Option<String>, StoreError> {
        self.mem.op_result(op_id)
    }
    fn peer_heads(&self, peer: &NodeId, key: &DocKey) -> Result<Option<Vec<Hash32>>, StoreError> {
        if self.restored_peers.borrow().contains(peer.as_str()) {
            return Ok(None);
        }
        self.mem.peer_heads(peer, key)
    }
    fn quarantined(&self) -> Result<Vec<(DocKey, String)>, StoreError> {
        self.mem.quarantined()
    }
    fn log_since(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, crdt::store::ChangeRecord)>, StoreError> {
        self.mem.log_since(after, limit)
    }
    fn log_at(&self, seq: u64) -> Result<Option<crdt::doc::Hash32>, StoreError> {
        self.mem.log_at(seq)
    }
    fn log_end(&self) -> Result<Option<crdt::store::Cursor>, StoreError> {
        self.mem.log_end()
    }
    fn sync_cursor(&self, peer: &crdt::NodeId) -> Result<Option<crdt::store::Cursor>, StoreError> {
        self.mem.sync_cursor(peer)
    }
    fn person(&self, person_id: &str) -> Result<Option<PersonRow>, StoreError> {
        self.mem.person(person_id)
    }
    fn persons(&self, limit: usize, offset: usize) -> Result<Vec<PersonRow>, StoreError> {
        self.mem.persons(limit, offset)
    }
    fn search(&self, key: &str, limit: usize) -> Result<Vec<PersonRow>, StoreError> {
        self.mem.search(key, limit)
    }
    fn household_by_card(&self, card_user_id: &str) -> Result<Option<String>, StoreError> {
        self.mem.household_by_card(card_user_id)
    }
    fn household_members(&self, household_id: &str) -> Result<Vec<PersonRow>, StoreError> {
        self.mem.household_members(household_id)
    }
    fn location(&self, person_id: &str) -> Result<Option<LocationRow>, StoreError> {
        self.mem.location(person_id)
    }
    fn shelters(&self) -> Result<Vec<ShelterRow>, StoreError> {
        self.mem.shelters()
    }
    fn occupancy(&self) -> Result<BTreeMap<String, u32>, StoreError> {
        self.mem.occupancy()
    }
    fn conflicts(&self) -> Result<Vec<LocationRow>, StoreError> {
        self.mem.conflicts()
    }
}
