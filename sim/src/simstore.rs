//! `SimStore`: `MemStore` with indexes, so that disaster-scale scenarios
//! (tens of thousands of documents per node) do not spend their time in
//! `MemStore`'s linear scans of projections (a card lookup per imported
//! member). Document loads use `MemStore`'s own per-document log index.
//!
//! Every answer is the one `MemStore` gives: writes go to the wrapped
//! `MemStore` unchanged (so its `fail_commits` switch still injects I/O
//! errors), and reads use the indexes only to pick which projections or log
//! records to look at, in the same order `MemStore` would find them. The
//! query indexes are shared by all the stores of a simulated world (see
//! [`QueryNames`]): they list, for every name, a superset of the documents
//! each store holds that mention it. The store conformance suite runs
//! against it (`tests/sim.rs`).

use crdt::doc::Hash32;
use crdt::ids::{DocKey, NodeId};
use crdt::store::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Clone, Default)]
pub struct SimStore {
    pub mem: MemStore,
    /// Which documents' projections mention a name, over every store that
    /// shares this (see [`Names`]).
    names: QueryNames,
}

/// The query tables of [`SimStore`]s, shared by every store made with it
/// (cheap to clone: one shared table).
#[derive(Clone, Default)]
pub struct QueryNames(Arc<Mutex<Names>>);

/// Which projections mention a person, a card, a household member, a
/// location, and which hold shelters or locations at all: for every store
/// that shares this table (the simulator gives one to all the stores of a
/// world), a superset of each store's own documents. Queries read a
/// store's own projections of the listed documents and keep only the rows
/// that match, exactly as `MemStore`'s scans do, so a listed document that
/// this store lacks, or whose projection here no longer mentions the name,
/// changes no answer.
///
/// Hundreds of nodes hold the same presence documents; kept per store
/// (as it was), these rows were about 260 MB of `noto-2024` at 36
/// simulated hours, a copy per holder. Entries are only added: a name a
/// projection drops stays listed, and costs one lookup.
#[derive(Default)]
struct Names {
    person: BTreeMap<String, Vec<DocKey>>,
    household: BTreeMap<String, Vec<DocKey>>,
    card: BTreeMap<String, Vec<DocKey>>,
    location: BTreeMap<String, Vec<DocKey>>,
    shelters: BTreeSet<DocKey>,
    locations: BTreeSet<DocKey>,
}

impl Names {
    /// Lists `key` under every name `p` mentions.
    fn add(&mut self, key: &DocKey, p: &Projection) {
        fn list(m: &mut BTreeMap<String, Vec<DocKey>>, name: &str, key: &DocKey) {
            // A few documents per name: a sorted vector, not a set.
            match m.get_mut(name) {
                Some(v) => {
                    if let Err(at) = v.binary_search(key) {
                        v.insert(at, key.clone());
                    }
                }
                None => {
                    m.insert(name.to_string(), vec![key.clone()]);
                }
            }
        }
        for r in &p.persons {
            list(&mut self.person, &r.person_id, key);
            if let Some(h) = &r.household_id {
                list(&mut self.household, h, key);
            }
        }
        for c in &p.cards {
            list(&mut self.card, &c.0, key);
        }
        for l in &p.locations {
            list(&mut self.location, &l.person_id, key);
        }
        if !p.shelters.is_empty() && !self.shelters.contains(key) {
            self.shelters.insert(key.clone());
        }
        if !p.locations.is_empty() && !self.locations.contains(key) {
            self.locations.insert(key.clone());
        }
    }
}

impl SimStore {
    /// An empty store whose query tables are `names`, shared with every
    /// other store made with them.
    pub fn with_names(names: &QueryNames) -> SimStore {
        SimStore {
            mem: MemStore::default(),
            names: names.clone(),
        }
    }

    fn names(&self) -> MutexGuard<'_, Names> {
        // Every update is a single insert: a panic elsewhere leaves no
        // half-updated table.
        self.names.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn projections_of<'a>(
        &'a self,
        keys: impl IntoIterator<Item = &'a DocKey> + 'a,
    ) -> impl Iterator<Item = &'a Projection> + 'a {
        keys.into_iter()
            .filter_map(|k| self.mem.projections.get(k).map(|p| &**p))
    }
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
    fn doc_records(&self, key: &DocKey) -> Result<Vec<crdt::store::ChangeRecord>, StoreError> {
        self.mem.doc_records(key)
    }
    fn damaged(&self) -> Result<Vec<crdt::store::Damaged>, StoreError> {
        self.mem.damaged()
    }
    fn seals(&self, hashes: &[Hash32]) -> Result<Vec<Option<crdt::signing::Seal>>, StoreError> {
        self.mem.seals(hashes)
    }
    fn credentials(&self) -> Result<Vec<(crdt::signing::AuthorHash, Vec<u8>)>, StoreError> {
        self.mem.credentials()
    }
    fn unsigned(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, crdt::store::ChangeRecord)>, StoreError> {
        self.mem.unsigned(after, limit)
    }
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        self.mem.commit(batch)?;
        // Only additions: a name a document's rows drop stays listed.
        if !batch.projections.is_empty() {
            let mut names = self.names();
            for (k, p) in &batch.projections {
                names.add(k, p);
            }
        }
        Ok(())
    }
    fn op_result(&self, op_id: &str) -> Result<Option<String>, StoreError> {
        self.mem.op_result(op_id)
    }
    fn peer_heads(
        &self,
        peer: &NodeId,
        incarnation: u32,
        key: &DocKey,
    ) -> Result<Option<Vec<Hash32>>, StoreError> {
        self.mem.peer_heads(peer, incarnation, key)
    }
    fn quarantined(&self) -> Result<Vec<(DocKey, String)>, StoreError> {
        self.mem.quarantined()
    }
    fn log_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, ChangeRecord)>, StoreError> {
        self.mem.log_since(after, limit)
    }
    fn log_at(&self, seq: u64) -> Result<Option<Hash32>, StoreError> {
        self.mem.log_at(seq)
    }
    fn log_end(&self) -> Result<Option<Cursor>, StoreError> {
        self.mem.log_end()
    }
    fn sync_cursor(&self, peer: &NodeId) -> Result<Option<Cursor>, StoreError> {
        self.mem.sync_cursor(peer)
    }
    fn person(&self, person_id: &str) -> Result<Option<PersonRow>, StoreError> {
        let names = self.names();
        let found = self
            .projections_of(names.person.get(person_id).into_iter().flatten())
            .flat_map(|p| p.persons.iter())
            .find(|p| p.person_id == person_id)
            .cloned();
        Ok(found)
    }
    fn persons(&self, limit: usize, offset: usize) -> Result<Vec<PersonRow>, StoreError> {
        self.mem.persons(limit, offset)
    }
    fn search(&self, key: &str, limit: usize) -> Result<Vec<PersonRow>, StoreError> {
        self.mem.search(key, limit)
    }
    fn household_by_card(&self, card_user_id: &str) -> Result<Option<String>, StoreError> {
        let names = self.names();
        let found = self
            .projections_of(names.card.get(card_user_id).into_iter().flatten())
            .flat_map(|p| p.cards.iter())
            .find(|c| c.0 == card_user_id)
            .map(|c| c.1.clone());
        Ok(found)
    }
    fn person_by_card(&self, card_user_id: &str) -> Result<Option<String>, StoreError> {
        let names = self.names();
        let found = self
            .projections_of(names.card.get(card_user_id).into_iter().flatten())
            .flat_map(|p| p.cards.iter())
            .find(|c| c.0 == card_user_id)
            .map(|c| c.2.clone());
        Ok(found)
    }
    fn household_members(&self, household_id: &str) -> Result<Vec<PersonRow>, StoreError> {
        let names = self.names();
        let mut v: Vec<_> = self
            .projections_of(names.household.get(household_id).into_iter().flatten())
            .flat_map(|p| p.persons.iter())
            .filter(|p| p.household_id.as_deref() == Some(household_id))
            .cloned()
            .collect();
        v.sort_by(|a, b| a.person_id.cmp(&b.person_id));
        Ok(v)
    }
    fn location(&self, person_id: &str) -> Result<Option<LocationRow>, StoreError> {
        let names = self.names();
        let found = self
            .projections_of(names.location.get(person_id).into_iter().flatten())
            .flat_map(|p| p.locations.iter())
            .find(|l| l.person_id == person_id)
            .cloned();
        Ok(found)
    }
    fn shelters(&self) -> Result<Vec<ShelterRow>, StoreError> {
        let names = self.names();
        let mut v: Vec<_> = self
            .projections_of(&names.shelters)
            .flat_map(|p| p.shelters.iter())
            .cloned()
            .collect();
        v.sort();
        Ok(v)
    }
    fn occupancy(&self) -> Result<BTreeMap<String, u32>, StoreError> {
        let names = self.names();
        let mut m = BTreeMap::new();
        for l in self
            .projections_of(&names.locations)
            .flat_map(|p| p.locations.iter())
            .filter(|l| l.status == LocationStatus::In)
        {
            *m.entry(l.shelter_id.clone()).or_insert(0) += 1;
        }
        Ok(m)
    }
    fn evacuees(
        &self,
        shelter_id: Option<&str>,
    ) -> Result<Vec<(PersonRow, LocationRow)>, StoreError> {
        self.mem.evacuees(shelter_id)
    }
    fn withheld(&self) -> Result<std::collections::BTreeSet<String>, StoreError> {
        self.mem.withheld()
    }
    fn conflicts(&self) -> Result<Vec<LocationRow>, StoreError> {
        let names = self.names();
        let mut v: Vec<_> = self
            .projections_of(&names.locations)
            .flat_map(|p| p.locations.iter())
            .filter(|l| l.conflict)
            .cloned()
            .collect();
        v.sort();
        Ok(v)
    }
    // The dashboard's aggregates are not used by the simulator's
    // workloads: `MemStore`'s scans answer them.
    fn district_counts(&self) -> Result<Vec<DistrictCount>, StoreError> {
        self.mem.district_counts()
    }
    fn unaccounted(
        &self,
        district: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<PersonRow>, StoreError> {
        self.mem.unaccounted(district, after, limit)
    }
    fn arrivals(&self, bucket_ms: u64) -> Result<Vec<(u64, u32)>, StoreError> {
        self.mem.arrivals(bucket_ms)
    }
    fn roster(&self, shelter_id: &str) -> Result<Vec<LocationRow>, StoreError> {
        self.mem.roster(shelter_id)
    }
}
