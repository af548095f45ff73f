//! Range-based set reconciliation as pure functions over a document index:
//! which documents two nodes hold differently, found in a few round trips
//! without listing every document.
//!
//! The set reconciled is the documents *both* roles may receive
//! ([`shared`]), each an item (key, heads) whose fingerprint is
//! [`crate::doc::item_fp`]. One side opens with [`describe`] over the
//! whole key space; each turn then answers every range of the other's turn
//! with [`answer`]:
//!
//! - a **fingerprint** (sum of item fingerprints and a count) that matches
//!   ends the range; a differing one is described again as its item list
//!   when it holds at most [`ITEMS_THRESHOLD`] items, else split
//!   [`SPLIT`]-way into sub-ranges with their own fingerprints;
//! - **digests** (items with short digests of their heads, stage 0) name
//!   the items that differ: those the other side lacks are sent, those whose
//!   digests differ are listed with full heads (stage 1);
//! - **items** with full heads: a side that knows all of the other's heads
//!   sends exactly what the other lacks; otherwise it shows its own heads
//!   (stage 1, then 2), and only for truly concurrent histories (stage 2
//!   and 3) sends a superset.
//!
//! An empty turn ends the exchange. Documents only the peer may hold (a
//! node's own audit chain for headquarters) are offered one by one
//! ([`own_offers`]). Nothing here reads storage or keeps state: whether a
//! side "knows" heads missing from its index entry (a document's history
//! holds more than its heads) is asked of the caller, and the turn state
//! lives in the session (`crate::sessions`).
//!
//! Invariant (property-tested below): after an exchange, every document
//! either side may send the other and holds differently is queued to be
//! sent by a side that has changes the other lacks; equal documents are
//! never queued.

use crate::doc::Hash32;
use crate::ids::{DocKey, NodeId, Role};
use crate::index::IndexEntry;
use crate::policy;
use crate::wire::{Item, Range, RangeBody};
use imbl::OrdMap;
use std::collections::BTreeMap;

/// Ranges with at most this many items are listed item by item.
pub(crate) const ITEMS_THRESHOLD: usize = 32;
/// A larger differing range is split into this many parts.
pub(crate) const SPLIT: usize = 16;

/// The two ends of a session, as policy sees them.
#[derive(Clone, Copy)]
pub(crate) struct Sides<'a> {
    pub(crate) me: Role,
    pub(crate) my_node: &'a NodeId,
    pub(crate) peer: Role,
    pub(crate) peer_node: &'a NodeId,
}

impl Sides<'_> {
    /// Documents both ends may receive take part in reconciliation.
    pub(crate) fn shared(&self, key: &DocKey) -> bool {
        shared(self.me, self.peer, key)
    }

    /// May this document be exchanged with the peer at all?
    fn exchangeable(&self, key: &DocKey) -> bool {
        policy::may_hold(self.me, self.my_node, key)
            && policy::may_send(self.peer, self.peer_node, key)
    }
}

/// Documents both roles may receive take part in reconciliation.
pub(crate) fn shared(me: Role, peer: Role, key: &DocKey) -> bool {
    policy::may_receive(me, key) && policy::may_receive(peer, key)
}

pub(crate) fn short_digest(heads: &[Hash32]) -> [u8; 8] {
    let d = crate::doc::heads_digest(heads);
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

type Index = OrdMap<DocKey, IndexEntry>;

/// The shared items in `[lo, hi)` (an absent bound is open).
pub(crate) fn range_items<'i>(
    index: &'i Index,
    sides: &Sides,
    lo: &Option<DocKey>,
    hi: &Option<DocKey>,
) -> Vec<(&'i DocKey, &'i IndexEntry)> {
    use std::ops::Bound::*;
    if let (Some(l), Some(h)) = (lo, hi) {
        if l >= h {
            return vec![];
        }
    }
    let lo_b = lo.as_ref().map_or(Unbounded, Included);
    let hi_b = hi.as_ref().map_or(Unbounded, Excluded);
    index
        .range::<_, DocKey>((lo_b, hi_b))
        .filter(|(k, _)| sides.shared(k))
        .collect()
}

pub(crate) fn fingerprint(items: &[(&DocKey, &IndexEntry)]) -> RangeBody {
    let sum = items
        .iter()
        .fold(0u128, |a, (_, e)| a.wrapping_add(e.at.fp));
    RangeBody::Fingerprint {
        fp: sum.to_le_bytes(),
        count: items.len() as u32,
    }
}

/// Our side of a range: its item list when small, else a fingerprint.
pub(crate) fn describe(
    index: &Index,
    sides: &Sides,
    lo: Option<DocKey>,
    hi: Option<DocKey>,
) -> Range {
    let items = range_items(index, sides, &lo, &hi);
    let body = if items.len() <= ITEMS_THRESHOLD {
        RangeBody::Digests {
            items: items
                .iter()
                .map(|(k, e)| ((*k).clone(), short_digest(&e.at.heads)))
                .collect(),
        }
    } else {
        fingerprint(&items)
    };
    Range { lo, hi, body }
}

/// Documents only the peer may receive from us (our own audit chain for
/// headquarters), offered item by item.
pub(crate) fn own_offers(index: &Index, sides: &Sides) -> Vec<Range> {
    index
        .iter()
        .filter(|(k, _)| !sides.shared(k) && policy::may_send(sides.peer, sides.peer_node, k))
        .map(|(k, e)| Range {
            lo: Some(k.clone()),
            hi: Some(k.clone()),
            body: RangeBody::Items {
                items: vec![Item {
                    key: k.clone(),
                    heads: e.at.heads.clone(),
                }],
                stage: 1,
            },
        })
        .collect()
}

/// Our answer to (part of) the peer's turn.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Answer {
    /// Ranges for our next turn.
    pub(crate) reply: Vec<Range>,
    /// Documents to send changes of, with the heads the peer reported
    /// (empty when it lacks the document).
    pub(crate) to_send: Vec<(DocKey, Vec<Hash32>)>,
    /// Heads the peer told us it holds (hints for later sends).
    pub(crate) learned: Vec<(DocKey, Vec<Hash32>)>,
    /// Index entries visited to answer (the work a turn costs us).
    pub(crate) scanned: u64,
}

/// Answers the peer's ranges against our index. `knows(key, heads)` says
/// whether our copy of `key` holds every change named by `heads`; it is
/// asked only when our index entry's heads do not already include them.
pub(crate) fn answer(
    index: &Index,
    sides: &Sides,
    ranges: Vec<Range>,
    mut knows: impl FnMut(&DocKey, &[Hash32]) -> bool,
) -> Answer {
    let mut a = Answer::default();
    for r in ranges {
        match r.body {
            RangeBody::Fingerprint { fp, count } => {
                let items = range_items(index, sides, &r.lo, &r.hi);
                a.scanned += items.len() as u64;
                if fingerprint(&items) == (RangeBody::Fingerprint { fp, count }) {
                    continue;
                }
                if items.len() <= ITEMS_THRESHOLD {
                    a.reply.push(describe(index, sides, r.lo, r.hi));
                    a.scanned += items.len() as u64;
                    continue;
                }
                // Sub-ranges start at every `chunk`th item; each one's
                // items are that slice of `items` (sorted, filtered alike),
                // so no sub-range is scanned again.
                let chunk = items.len().div_ceil(SPLIT);
                let parts: Vec<&[(&DocKey, &IndexEntry)]> = items.chunks(chunk).collect();
                for (i, part) in parts.iter().enumerate() {
                    let lo = if i == 0 {
                        r.lo.clone()
                    } else {
                        Some(part[0].0.clone())
                    };
                    let hi = match parts.get(i + 1) {
                        Some(next) => Some(next[0].0.clone()),
                        None => r.hi.clone(),
                    };
                    a.reply.push(Range {
                        lo,
                        hi,
                        body: fingerprint(part),
                    });
                }
            }
            RangeBody::Digests { items } => {
                let theirs: BTreeMap<DocKey, [u8; 8]> = items
                    .into_iter()
                    .filter(|(k, _)| sides.exchangeable(k))
                    .collect();
                let mut want = Vec::new();
                let mine = range_items(index, sides, &r.lo, &r.hi);
                a.scanned += mine.len() as u64;
                for (k, e) in mine {
                    match theirs.get(k) {
                        None => a.to_send.push((k.clone(), vec![])),
                        Some(d) if *d == short_digest(&e.at.heads) => {}
                        Some(_) => want.push(Item {
                            key: k.clone(),
                            heads: e.at.heads.clone(),
                        }),
                    }
                }
                for k in theirs.keys() {
                    if !index.contains_key(k) {
                        want.push(Item {
                            key: k.clone(),
                            heads: vec![],
                        });
                    }
                }
                if !want.is_empty() {
                    a.reply.push(Range {
                        lo: r.lo,
                        hi: r.hi,
                        body: RangeBody::Items {
                            items: want,
                            stage: 1,
                        },
                    });
                }
            }
            RangeBody::Items { items, stage } => {
                let mut want = Vec::new();
                let items: Vec<Item> = items
                    .into_iter()
                    .filter(|i| sides.exchangeable(&i.key))
                    .collect();
                for i in items {
                    let (k, h) = (i.key, i.heads);
                    let mine = index.get(&k).map(|e| e.at.heads.clone());
                    if mine.as_ref() == Some(&h) {
                        continue;
                    }
                    // Hints only about documents we hold: a peer cannot
                    // make us store heads of documents it invented.
                    if !h.is_empty() && mine.is_some() {
                        a.learned.push((k.clone(), h.clone()));
                    }
                    let knows_all = mine.is_some()
                        && (mine
                            .as_ref()
                            .is_some_and(|m| h.iter().all(|x| m.contains(x)))
                            || knows(&k, &h));
                    if knows_all {
                        // We hold all they have: send exactly what they lack.
                        a.to_send.push((k, h));
                        continue;
                    }
                    match stage {
                        // They may simply be ahead: show our heads first.
                        1 => want.push(Item {
                            key: k,
                            heads: mine.unwrap_or_default(),
                        }),
                        // Neither knows the other's heads: concurrent
                        // histories. Send a superset, and at stage 2 ask
                        // for theirs.
                        _ => {
                            if mine.is_some() {
                                a.to_send.push((k.clone(), h));
                            }
                            if stage == 2 {
                                want.push(Item {
                                    key: k,
                                    heads: mine.unwrap_or_default(),
                                });
                            }
                        }
                    }
                }
                if !want.is_empty() && stage < 3 {
                    a.reply.push(Range {
                        lo: r.lo,
                        hi: r.hi,
                        body: RangeBody::Items {
                            items: want,
                            stage: stage + 1,
                        },
                    });
                }
            }
        }
    }
    a
}

#[cfg(test)]
mod tests {
    //! Reconciliation on its own, against a plain model: each side holds
    //! documents as sets of change ids; heads name the whole set, and a
    //! side "knows" heads when they are a subset of its set.

    use super::*;
    use crate::ids::Kind;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    type Model = BTreeMap<DocKey, BTreeSet<u8>>;

    fn heads(set: &BTreeSet<u8>) -> Vec<Hash32> {
        set.iter().map(|c| [*c; 32]).collect()
    }

    fn index(m: &Model) -> Index {
        m.iter()
            .map(|(k, set)| {
                let h = heads(set);
                let e = IndexEntry {
                    at: std::sync::Arc::new(crate::doc::At::new(k, h)),
                    tail: 0,
                    whole: true,
                };
                (k.clone(), e)
            })
            .collect()
    }

    /// How side B's copy of a document relates to side A's.
    #[derive(Clone, Copy, Debug)]
    enum Rel {
        Same,
        OnlyA,
        OnlyB,
        BAhead,
        AAhead,
        Concurrent,
    }

    fn rel() -> impl Strategy<Value = Rel> {
        prop_oneof![
            12 => Just(Rel::Same),
            1 => Just(Rel::OnlyA),
            1 => Just(Rel::OnlyB),
            1 => Just(Rel::BAhead),
            1 => Just(Rel::AAhead),
            1 => Just(Rel::Concurrent),
        ]
    }

    /// Two replicas of up to 300 documents, mostly equal (so fingerprints
    /// of large ranges match and splitting is exercised); a few medical
    /// documents, which a shelter may not receive.
    fn models() -> impl Strategy<Value = (Model, Model)> {
        prop::collection::vec((rel(), 1u8..=63, any::<bool>(), 0u8..10), 0..300).prop_map(|docs| {
            let (mut a, mut b) = (Model::new(), Model::new());
            for (i, (rel, base, medical, _)) in docs.into_iter().enumerate() {
                let kind = if medical && i % 7 == 0 {
                    Kind::Medical
                } else {
                    Kind::Registry
                };
                let key = DocKey::new(kind, format!("d{i:04}")).unwrap();
                let base: BTreeSet<u8> = (0..6).filter(|b| base & (1 << b) != 0).collect();
                let plus = |x: u8| base.iter().copied().chain([x]).collect::<BTreeSet<u8>>();
                let (sa, sb) = match rel {
                    Rel::Same => (Some(base.clone()), Some(base)),
                    Rel::OnlyA => (Some(base), None),
                    Rel::OnlyB => (None, Some(base)),
                    Rel::BAhead => (Some(base.clone()), Some(plus(10))),
                    Rel::AAhead => (Some(plus(10)), Some(base)),
                    Rel::Concurrent => (Some(plus(10)), Some(plus(11))),
                };
                if let Some(s) = sa {
                    a.insert(key.clone(), s);
                }
                if let Some(s) = sb {
                    b.insert(key, s);
                }
            }
            (a, b)
        })
    }

    /// Runs a whole exchange, A (headquarters) opening; returns what each
    /// side queued to send and the number of turns.
    fn exchange(a: &Model, b: &Model) -> (Vec<DocKey>, Vec<DocKey>, usize) {
        let (ia, ib) = (index(a), index(b));
        let (na, nb) = (
            NodeId::new("hq-1").unwrap(),
            NodeId::new("shelter-1").unwrap(),
        );
        let sa = Sides {
            me: Role::Hq,
            my_node: &na,
            peer: Role::Shelter,
            peer_node: &nb,
        };
        let sb = Sides {
            me: Role::Shelter,
            my_node: &nb,
            peer: Role::Hq,
            peer_node: &na,
        };
        fn knows(m: &Model) -> impl FnMut(&DocKey, &[Hash32]) -> bool + '_ {
            move |k, h| {
                m.get(k)
                    .is_some_and(|s| h.iter().all(|x| s.contains(&x[0])))
            }
        }
        let (mut sent_a, mut sent_b) = (Vec::new(), Vec::new());
        let mut turn = vec![describe(&ia, &sa, None, None)];
        let mut turns = 1;
        loop {
            // Odd turns are answered by B, even ones by A.
            let ans = if turns % 2 == 1 {
                let ans = answer(&ib, &sb, turn, knows(b));
                sent_b.extend(ans.to_send.iter().map(|(k, _)| k.clone()));
                ans
            } else {
                let ans = answer(&ia, &sa, turn, knows(a));
                sent_a.extend(ans.to_send.iter().map(|(k, _)| k.clone()));
                ans
            };
            if ans.reply.is_empty() {
                return (sent_a, sent_b, turns);
            }
            turn = ans.reply;
            turns += 1;
            assert!(turns < 40, "the exchange does not end");
        }
    }

    /// `x` holds a change of `key` that `y` lacks.
    fn has_news(x: &Model, y: &Model, key: &DocKey) -> bool {
        match (x.get(key), y.get(key)) {
            (Some(sx), Some(sy)) => !sx.is_subset(sy),
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

        #[test]
        fn exchange_finds_exactly_the_documents_that_differ((a, b) in models()) {
            let (sent_a, sent_b, turns) = exchange(&a, &b);
            // Bounded: a fingerprint split, digests, then at most three
            // stages of full heads, back and forth.
            prop_assert!(turns <= 12, "{turns} turns");
            let keys: BTreeSet<&DocKey> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let shared = shared(Role::Hq, Role::Shelter, k);
                let (in_a, in_b) = (sent_a.contains(k), sent_b.contains(k));
                if !shared {
                    // Never offered, whatever either side holds.
                    prop_assert!(!in_a && !in_b, "{k} is not for a shelter");
                    continue;
                }
                // Complete: a side with news queues the document.
                prop_assert_eq!(in_a, has_news(&a, &b, k), "A and {}", k);
                prop_assert_eq!(in_b, has_news(&b, &a, k), "B and {}", k);
            }
            // Each document is queued at most once per side.
            let once = |v: &Vec<DocKey>| v.iter().collect::<BTreeSet<_>>().len() == v.len();
            prop_assert!(once(&sent_a) && once(&sent_b));
        }
    }

    #[test]
    fn equal_replicas_agree_in_one_turn() {
        let a: Model = (0..500)
            .map(|i| {
                (
                    DocKey::new(Kind::Registry, format!("d{i:04}")).unwrap(),
                    BTreeSet::from([1, 2]),
                )
            })
            .collect();
        let (sent_a, sent_b, turns) = exchange(&a, &a.clone());
        assert_eq!((sent_a.len(), sent_b.len(), turns), (0, 0, 1));
    }
}
