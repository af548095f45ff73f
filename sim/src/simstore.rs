//! `SimStore`: `MemStore` with indexes, so that disaster-scale scenarios
//! (tens of thousands of documents per node) do not spend their time in
//! `MemStore`'s linear scans of projections (a card lookup per imported
//! member). Document loads use `MemStore`'s own per-document log index.
//!
//! Every answer is the one `MemStore` gives: writes go to the wrapped
//! `MemStore` unchanged (so its `fail_commits` switch still injects I/O
//! errors), and reads use the indexes only to pick which projections or log
//! records to look at, in the same order `MemStore` would find them. The
//! store conformance suite runs against it (`tests/sim.rs`).

use crdt::doc::Hash32;
use crdt::ids::{DocKey, NodeId};
use crdt::store::*;
use imbl::{OrdMap, OrdSet};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Clone, Default)]
pub struct SimStore {
    pub mem: MemStore,
    /// Which projections mention a person, a card, a household member, a
    /// location; and which hold shelters or locations at all.
    person_docs: OrdMap<String, Vec<DocKey>>,
    card_docs: OrdMap<String, Vec<DocKey>>,
    household_docs: OrdMap<String, Vec<DocKey>>,
    location_docs: OrdMap<String, Vec<DocKey>>,
    shelter_docs: OrdSet<DocKey>,
    locations_docs: OrdSet<DocKey>,
}

fn unindex(m: &mut OrdMap<String, Vec<DocKey>>, k: &str, key: &DocKey) {
    if let Some(s) = m.get_mut(k) {
        s.retain(|x| x != key);
        if s.is_empty() {
            m.remove(k);
        }
    }
}

impl SimStore {
    /// Moves a document's index entries from what `old` derived to what
    /// `new` derives, touching only names that appear or disappear (a new
    /// presence event usually changes none).
    fn reindex(&mut self, key: &DocKey, old: Option<&Projection>, new: &Projection) {
        fn names(p: Option<&Projection>) -> [Vec<&str>; 4] {
            let mut n: [Vec<&str>; 4] = Default::default();
            if let Some(p) = p {
                for r in &p.persons {
                    n[0].push(&r.person_id);
                    n[1].extend(r.household_id.as_deref());
                }
                n[2].extend(p.cards.iter().map(|c| c.0.as_str()));
                n[3].extend(p.locations.iter().map(|l| l.person_id.as_str()));
            }
            for v in &mut n {
                v.sort_unstable();
                v.dedup();
            }
            n
        }
        let (before, after) = (names(old), names(Some(new)));
        let maps = [
            &mut self.person_docs,
            &mut self.household_docs,
            &mut self.card_docs,
            &mut self.location_docs,
        ];
        for ((m, b), a) in maps.into_iter().zip(&before).zip(&after) {
            for k in b.iter().filter(|k| a.binary_search(k).is_err()) {
                unindex(m, k, key);
            }
            for k in a.iter().filter(|k| b.binary_search(k).is_err()) {
                // A few documents per name: a sorted vector, not a set.
                match m.get_mut(*k) {
                    Some(v) => {
                        if let Err(at) = v.binary_search(key) {
                            v.insert(at, key.clone());
                        }
                    }
                    None => {
                        m.insert(k.to_string(), vec![key.clone()]);
                    }
                }
            }
        }
        // A document is in a set exactly while its projection has such
        // rows; unchanged membership touches nothing.
        for (set, was, member) in [
            (
                &mut self.shelter_docs,
                old.is_some_and(|p| !p.shelters.is_empty()),
                !new.shelters.is_empty(),
            ),
            (
                &mut self.locations_docs,
                old.is_some_and(|p| !p.locations.is_empty()),
                !new.locations.is_empty(),
            ),
        ] {
            if member && !was {
                set.insert(key.clone());
            } else if was && !member {
                set.remove(key);
            }
        }
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
        // Each document's rows before the batch and after it (the batch's
        // last rows for it, as `MemStore` keeps them).
        let mut moved: BTreeMap<&DocKey, (Option<Arc<Projection>>, &Arc<Projection>)> =
            BTreeMap::new();
        for (k, p) in &batch.projections {
            moved
                .entry(k)
                .and_modify(|e| e.1 = p)
                .or_insert_with(|| (self.mem.projections.get(k).cloned(), p));
        }
        self.mem.commit(batch)?;
        for (k, (before, after)) in moved {
            if !before.as_ref().is_some_and(|b| Arc::ptr_eq(b, after)) {
                self.reindex(k, before.as_deref(), after);
            }
        }
        Ok(())
    }
    fn op_result(&self, op_id: &str) -> Result<Option<String>, StoreError> {
        self.mem.op_result(op_id)
    }
    fn peer_heads(&self, peer: &NodeId, key: &DocKey) -> Result<Option<Vec<Hash32>>, StoreError> {
        self.mem.peer_heads(peer, key)
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
        Ok(self
            .projections_of(self.person_docs.get(person_id).into_iter().flatten())
            .flat_map(|p| p.persons.iter())
            .find(|p| p.person_id == person_id)
            .cloned())
    }
    fn persons(&self, limit: usize, offset: usize) -> Result<Vec<PersonRow>, StoreError> {
        self.mem.persons(limit, offset)
    }
    fn search(&self, key: &str, limit: usize) -> Result<Vec<PersonRow>, StoreError> {
        self.mem.search(key, limit)
    }
    fn household_by_card(&self, card_user_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .projections_of(self.card_docs.get(card_user_id).into_iter().flatten())
            .flat_map(|p| p.cards.iter())
            .find(|c| c.0 == card_user_id)
            .map(|c| c.1.clone()))
    }
    fn person_by_card(&self, card_user_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .projections_of(self.card_docs.get(card_user_id).into_iter().flatten())
            .flat_map(|p| p.cards.iter())
            .find(|c| c.0 == card_user_id)
            .map(|c| c.2.clone()))
    }
    fn household_members(&self, household_id: &str) -> Result<Vec<PersonRow>, StoreError> {
        let mut v: Vec<_> = self
            .projections_of(self.household_docs.get(household_id).into_iter().flatten())
            .flat_map(|p| p.persons.iter())
            .filter(|p| p.household_id.as_deref() == Some(household_id))
            .cloned()
            .collect();
        v.sort_by(|a, b| a.person_id.cmp(&b.person_id));
        Ok(v)
    }
    fn location(&self, person_id: &str) -> Result<Option<LocationRow>, StoreError> {
        Ok(self
            .projections_of(self.location_docs.get(person_id).into_iter().flatten())
            .flat_map(|p| p.locations.iter())
            .find(|l| l.person_id == person_id)
            .cloned())
    }
    fn shelters(&self) -> Result<Vec<ShelterRow>, StoreError> {
        let mut v: Vec<_> = self
            .projections_of(&self.shelter_docs)
            .flat_map(|p| p.shelters.iter())
            .cloned()
            .collect();
        v.sort();
        Ok(v)
    }
    fn occupancy(&self) -> Result<BTreeMap<String, u32>, StoreError> {
        let mut m = BTreeMap::new();
        for l in self
            .projections_of(&self.locations_docs)
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
        let mut v: Vec<_> = self
            .projections_of(&self.locations_docs)
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
