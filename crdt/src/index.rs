//! The index of every document a replica holds: its heads, a fingerprint
//! of (key, heads) and bookkeeping for snapshots and sharing, in key order.
//!
//! The index stays in memory while documents come and go from the cache;
//! it is what reconciliation ([`crate::reconcile`]) reads and what the
//! replica ([`crate::replica`]) updates after every commit. Per document
//! kind it keeps the XOR of the fingerprints of its documents, so "do two
//! nodes hold the same documents of this kind at the same heads?" is one
//! comparison.
//!
//! Invariant: `kind_fp[k]` is the XOR of `fp` over the entries of kind `k`,
//! and every entry's `fp` is [`crate::doc::item_fp`] of its key and heads.

use crate::doc::{At, Hash32};
use crate::ids::{DocKey, Kind};
use crate::store::upsert;
use imbl::OrdMap;
use std::sync::Arc;

/// An engine's index of the documents in its store (heads, fingerprints),
/// to open engines on copies of that store without building it again (see
/// `Engine::open_indexed`). Cheap to clone: copies share memory until they
/// change.
#[derive(Clone)]
pub struct DocIndex(pub(crate) OrdMap<DocKey, IndexEntry>);

#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct IndexEntry {
    /// The document's heads and fingerprint: the same for every node that
    /// holds it at these heads, and shared by their entries when the
    /// engines of one process share (see `DocShare::at`).
    pub(crate) at: Arc<At>,
    /// Changes logged since the last snapshot.
    pub(crate) tail: u32,
    /// Known to hold no changes waiting for dependencies, so the document
    /// is exactly what its heads name (only then is it looked up in a
    /// share). False until this engine has seen it loaded or changed.
    pub(crate) whole: bool,
}

/// Where an opening engine's index comes from (see [`crate::engine::Engine::open_indexed`]).
#[derive(Clone)]
pub enum IndexFrom {
    /// Built from the store (what a node does).
    Store,
    /// Built from the store as with `Store`, and equal to that, but sharing
    /// memory with this index wherever they agree: the simulator restarts
    /// a crashed node over the index of the store it was provisioned from.
    Over(DocIndex),
    /// Taken as is: the index of an engine on an identical store.
    Identical(DocIndex),
}

/// The index with its per-kind fingerprints.
#[derive(Clone, Default)]
pub(crate) struct Index {
    pub(crate) map: OrdMap<DocKey, IndexEntry>,
    /// Per kind, the XOR of the index fingerprints of its documents.
    kind_fp: [u128; Kind::ALL.len()],
    /// Per kind, how many documents the index holds (a document leaves it
    /// only when it is set aside as damaged, see [`Index::remove`]).
    kind_count: [usize; Kind::ALL.len()],
}

impl Index {
    /// From stored (key, heads) pairs; nothing is known whole yet.
    pub(crate) fn build(docs: Vec<(DocKey, Vec<Hash32>)>) -> Index {
        Index::from_map(
            docs.into_iter()
                .map(|(key, heads)| {
                    let at = Arc::new(At::new(&key, heads));
                    (
                        key,
                        IndexEntry {
                            at,
                            tail: 0,
                            whole: false,
                        },
                    )
                })
                .collect(),
        )
    }

    /// [`Index::build`], sharing memory with `base` wherever an entry is
    /// the one `build` makes from the same (key, heads): only entries that
    /// differ, and the tree nodes above them, are new. The simulator
    /// restarts crashed nodes whose stores were copied from one provisioned
    /// store; built afresh, each restarted node's index was its own copy of
    /// every registry entry (about 5 MB each in `noto-2024`).
    pub(crate) fn build_over(base: &DocIndex, docs: Vec<(DocKey, Vec<Hash32>)>) -> Index {
        let mut map = base.0.clone();
        // Entries of `base` the store does not hold leave first.
        let mut keys: Vec<&DocKey> = docs.iter().map(|(k, _)| k).collect();
        keys.sort_unstable();
        let gone: Vec<DocKey> = base
            .0
            .keys()
            .filter(|k| keys.binary_search(k).is_err())
            .cloned()
            .collect();
        drop(keys);
        for k in &gone {
            map.remove(k);
        }
        for (key, heads) in docs {
            // What `build` makes: fresh bookkeeping, not known whole.
            let same = map
                .get(&key)
                .is_some_and(|e| e.at.heads == heads && e.tail == 0 && !e.whole);
            if !same {
                let at = Arc::new(At::new(&key, heads));
                map.insert(
                    key,
                    IndexEntry {
                        at,
                        tail: 0,
                        whole: false,
                    },
                );
            }
        }
        Index::from_map(map)
    }

    pub(crate) fn from_map(map: OrdMap<DocKey, IndexEntry>) -> Index {
        let mut kind_fp = [0u128; Kind::ALL.len()];
        let mut kind_count = [0usize; Kind::ALL.len()];
        for (k, e) in map.iter() {
            kind_fp[k.kind.code() as usize] ^= e.at.fp;
            kind_count[k.kind.code() as usize] += 1;
        }
        Index {
            map,
            kind_fp,
            kind_count,
        }
    }

    pub(crate) fn get(&self, key: &DocKey) -> Option<&IndexEntry> {
        self.map.get(key)
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn kind_fingerprint(&self, kind: Kind) -> u128 {
        self.kind_fp[kind.code() as usize]
    }

    /// How many documents of `kind` the index holds.
    pub(crate) fn kind_count(&self, kind: Kind) -> usize {
        self.kind_count[kind.code() as usize]
    }

    /// Records that the document is (or is not) known whole.
    pub(crate) fn set_whole(&mut self, key: &DocKey, whole: bool) {
        if let Some(e) = self.map.get_mut(key) {
            e.whole = whole;
        }
    }

    /// Takes a damaged document out: reconciliation then sees this node
    /// lacking it, and a peer that holds it sends it whole.
    pub(crate) fn remove(&mut self, key: &DocKey) {
        if let Some(e) = self.map.remove(key) {
            self.kind_fp[key.kind.code() as usize] ^= e.at.fp;
            self.kind_count[key.kind.code() as usize] -= 1;
        }
    }

    /// A committed change of `key`: its new heads (`at`, of this key),
    /// whether it is whole and whether the commit stored a snapshot (which
    /// resets the tail).
    pub(crate) fn update(&mut self, key: &DocKey, at: Arc<At>, whole: bool, snapshot: bool) {
        let kind_fp = &mut self.kind_fp[key.kind.code() as usize];
        let kind_count = &mut self.kind_count[key.kind.code() as usize];
        upsert(&mut self.map, key, IndexEntry::default, |e| {
            // A new entry has no heads yet; every stored one has some.
            if e.at.heads.is_empty() {
                *kind_count += 1;
            }
            *kind_fp ^= e.at.fp ^ at.fp;
            e.at = at;
            e.whole = whole;
            e.tail = if snapshot { 0 } else { e.tail + 1 };
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: Kind, id: &str) -> DocKey {
        DocKey::new(kind, id).expect("valid id")
    }

    fn at(kind: Kind, id: &str, heads: Vec<Hash32>) -> Arc<At> {
        Arc::new(At::new(&key(kind, id), heads))
    }

    fn same(a: &Index, b: &Index) -> bool {
        a.map == b.map && a.kind_fp == b.kind_fp && a.kind_count == b.kind_count
    }

    #[test]
    fn an_index_built_over_a_base_equals_a_fresh_one_and_shares_what_agrees() {
        let registry: Vec<(DocKey, Vec<Hash32>)> = (0..500u32)
            .map(|i| {
                (
                    key(Kind::Registry, &format!("h{i:04}")),
                    vec![[i as u8; 32]],
                )
            })
            .collect();
        let base = Index::build(registry.clone());
        let base = DocIndex(base.map);
        // The same store: the very same tree.
        let over = Index::build_over(&base, registry.clone());
        assert!(same(&over, &Index::build(registry.clone())));
        assert!(over.map.ptr_eq(&base.0), "nothing differs, nothing copied");
        // A base that knows more than the store says: entries known whole,
        // with a tail, at other heads, and one the store no longer holds.
        let mut wider = Index::from_map(base.0.clone());
        wider.set_whole(&key(Kind::Registry, "h0003"), true);
        wider.update(
            &key(Kind::Registry, "h0004"),
            at(Kind::Registry, "h0004", vec![[4; 32]]),
            false,
            false,
        );
        wider.update(
            &key(Kind::Registry, "h0005"),
            at(Kind::Registry, "h0005", vec![[9; 32]]),
            false,
            true,
        );
        wider.update(
            &key(Kind::Presence, "h0001"),
            at(Kind::Presence, "h0001", vec![[7; 32]]),
            true,
            true,
        );
        let wider = DocIndex(wider.map);
        // The store: the registry (one document at new heads), one
        // document gone and presence documents of its own.
        let mut docs = registry.clone();
        docs.remove(17);
        docs[40].1 = vec![[1; 32], [2; 32]];
        docs.push((key(Kind::Presence, "h0002"), vec![[3; 32]]));
        docs.push((key(Kind::Audit, "n1"), vec![[5; 32]]));
        docs.reverse();
        for b in [&base, &wider] {
            let over = Index::build_over(b, docs.clone());
            let fresh = Index::build(docs.clone());
            assert!(same(&over, &fresh));
            assert_eq!(over.len(), registry.len() + 1);
        }
    }
}
