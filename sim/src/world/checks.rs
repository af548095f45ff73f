//! The checks the world runs while it goes: every delivered change is
//! stored or refused with a reason, replicas of each document agree within
//! each group of connected holders, derived rows agree, presence and
//! arrival invariants, at the cadence `periodic_check` states. The
//! invariants themselves are in `crate::check`.

use super::*;

/// The holders of `key` (nodes whose role may hold it), grouped into
/// components over the links between holders.
pub(super) fn holder_groups(nodes: &[Node], links: &[Link], key: &DocKey) -> Vec<Vec<usize>> {
    let holders: Vec<usize> = (0..nodes.len())
        .filter(|&i| crdt::policy::may_hold(nodes[i].role, &nodes[i].id, key))
        .collect();
    let mut comp: BTreeMap<usize, usize> = holders.iter().map(|&i| (i, i)).collect();
    fn find(c: &mut BTreeMap<usize, usize>, x: usize) -> usize {
        let p = c[&x];
        if p == x {
            x
        } else {
            let r = find(c, p);
            c.insert(x, r);
            r
        }
    }
    for k in links {
        if comp.contains_key(&k.a) && comp.contains_key(&k.b) {
            let (ra, rb) = (find(&mut comp, k.a), find(&mut comp, k.b));
            comp.insert(ra, rb);
        }
    }
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &i in &holders {
        let r = find(&mut comp, i);
        groups.entry(r).or_default().push(i);
    }
    groups.into_values().collect()
}

impl World {
    /// `check::received_changes` for a `Changes` frame an open session
    /// took without objecting: unless the receiver flagged the peer or closed
    /// the session (a failed commit), every change it may hold is stored,
    /// including changes that arrived before their dependencies (C-8: queued,
    /// never dropped), and a cursor it carried was stored with them.
    pub(super) fn check_received(
        &mut self,
        from: usize,
        to: usize,
        session: SessionId,
        f: &Frame,
        rest: &[Output],
    ) {
        let Frame::Changes { upto, .. } = f else {
            return;
        };
        // A peer violation the receiver raised is reported on its own
        // (`honest_peer_violation`); the frame is still checked.
        let _ = rest;
        // A failed commit closes the session (and stores nothing).
        let Some(e) = self.nodes[to]
            .engine
            .as_ref()
            .filter(|e| e.has_session(session))
        else {
            return;
        };
        let mem = &e.store().mem;
        if upto.is_some_and(|c| mem.cursors.get(&self.nodes[from].id) != Some(&c)) {
            return;
        }
        let (role, id) = (self.nodes[to].role, &self.nodes[to].id);
        let share = self.share.as_ref();
        let vs = check::received_changes(
            id.as_str(),
            f,
            |k, h| !crdt::policy::may_hold(role, id, k) || mem.hashes.contains_key(h),
            |b| match share {
                Some(s) => s.parse(b),
                None => crdt::doc::parse_change(b).map(std::sync::Arc::new),
            },
            self.now,
        );
        for v in vs {
            self.violate(v);
        }
    }

    // ----- mail -------------------------------------------------------------

    /// Docs both nodes may hold, grouped by which nodes are linked.
    /// Groups of holders of `key` connected by links between holders
    /// (links never change; only their up/down state does). They depend on
    /// the key only through its kind and, for audit documents, whose.
    pub(super) fn groups_of(&mut self, key: &DocKey) -> &[Vec<usize>] {
        let class = (key.kind, (key.kind == Kind::Audit).then(|| key.id.clone()));
        let (nodes, links) = (&self.nodes, &self.links);
        self.holder_groups
            .entry(class)
            .or_insert_with(|| holder_groups(nodes, links, key))
    }

    /// Every holder is up and every group of connected holders agrees: per
    /// kind, the same fingerprint of documents and heads; per node, its own
    /// audit document has the same heads wherever it is held. Cheap; implies
    /// converged heads. A down holder, or any disagreement, answers false.
    pub(super) fn replicas_agree(&mut self) -> bool {
        for kind in Kind::ALL.into_iter().filter(|k| *k != Kind::Audit) {
            let Ok(probe) = DocKey::new(kind, "any") else {
                return false;
            };
            let groups = self.groups_of(&probe).to_vec();
            for g in groups {
                let mut fps = g.iter().map(|&i| {
                    self.nodes[i]
                        .engine
                        .as_ref()
                        .map(|e| e.kind_fingerprint(kind))
                });
                let first = fps.next().flatten();
                if first.is_none() || fps.any(|f| f != first) {
                    return false;
                }
            }
        }
        for owner in 0..self.nodes.len() {
            let Ok(key) = DocKey::new(Kind::Audit, self.nodes[owner].id.as_str()) else {
                return false;
            };
            for g in self.groups_of(&key).to_vec() {
                // Outer None: the holder is down; inner None: it has no
                // audit entries of that node yet.
                let heads: Vec<Option<Option<&[[u8; 32]]>>> = g
                    .iter()
                    .map(|&i| self.nodes[i].engine.as_ref().map(|e| e.doc_heads(&key)))
                    .collect();
                if heads.iter().any(Option::is_none) || heads.windows(2).any(|w| w[0] != w[1]) {
                    return false;
                }
            }
        }
        true
    }

    /// Within every group of connected holders, each kind's query rows are
    /// the same, document by document (after `replicas_agree`: the same
    /// documents at the same heads). Rows shared between stores compare by
    /// address first.
    pub(super) fn rows_agree(&mut self) -> bool {
        use std::ops::Bound;
        for (n, kind) in Kind::ALL.into_iter().enumerate() {
            // Range bounds only: the empty id sorts before every valid id.
            let lo = DocKey {
                kind,
                id: String::new(),
            };
            let hi = match Kind::ALL.get(n + 1) {
                Some(&next) => Bound::Excluded(DocKey {
                    kind: next,
                    id: String::new(),
                }),
                None => Bound::Unbounded,
            };
            let probes: Vec<DocKey> = if kind == Kind::Audit {
                self.nodes
                    .iter()
                    .filter_map(|n| DocKey::new(kind, n.id.as_str()).ok())
                    .collect()
            } else {
                DocKey::new(kind, "any").into_iter().collect()
            };
            for probe in probes {
                for g in self.groups_of(&probe).to_vec() {
                    let Some(maps) = g
                        .iter()
                        .map(|&i| Some(&self.nodes[i].engine.as_ref()?.store().mem.projections))
                        .collect::<Option<Vec<_>>>()
                    else {
                        return false;
                    };
                    let first = maps[0];
                    for m in &maps[1..] {
                        let same = if kind == Kind::Audit {
                            match (first.get(&probe), m.get(&probe)) {
                                (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
                                (a, b) => a.is_none() && b.is_none(),
                            }
                        } else {
                            let range = || (Bound::Included(lo.clone()), hi.clone());
                            let (mut a, mut b) = (first.range(range()), m.range(range()));
                            loop {
                                match (a.next(), b.next()) {
                                    (None, None) => break true,
                                    (Some((ka, pa)), Some((kb, pb)))
                                        if ka == kb && (Arc::ptr_eq(pa, pb) || pa == pb) => {}
                                    _ => break false,
                                }
                            }
                        };
                        if !same {
                            return false;
                        }
                    }
                }
            }
        }
        true
    }

    /// Replicas that disagree within a connected group of holders, heads
    /// and derived rows, document by document (the final check; during the
    /// run `replicas_agree` answers whether they agree).
    pub(super) fn convergence_violations(&mut self) -> Vec<Violation> {
        let mut keys: BTreeSet<DocKey> = BTreeSet::new();
        for e in self.nodes.iter().filter_map(|n| n.engine.as_ref()) {
            for (k, _) in e.heads() {
                if !keys.contains(k) {
                    keys.insert(k.clone());
                }
            }
        }
        let mut out = vec![];
        for key in keys {
            let groups = self.groups_of(&key).to_vec();
            for g in groups.iter() {
                let held = |i: usize| {
                    self.nodes[i]
                        .engine
                        .as_ref()
                        .and_then(|e| e.doc_heads(&key))
                };
                if g.len() < 2 || !g.iter().any(|&i| held(i).is_some()) {
                    continue;
                }
                let reps: Vec<Replica<'_>> = g
                    .iter()
                    .map(|&i| Replica {
                        node: self.nodes[i].id.as_str(),
                        heads: held(i),
                        projection: self.nodes[i]
                            .engine
                            .as_ref()
                            .and_then(|e| e.store().mem.projections.get(&key))
                            .map(|p| &**p),
                    })
                    .collect();
                if let Some(v) = check::converged(&key, &reps, self.now) {
                    out.push(v);
                }
            }
        }
        out
    }

    /// The end-of-run store checks, on every running node, from what its
    /// store holds rather than what its engine reports:
    ///
    /// - each document rebuilt from nothing but its stored changes has the
    ///   heads the engine reports and derives the rows the node stored
    ///   (`rebuilt_differs`); with the engines' heads compared across each
    ///   connected group (`converged`), every replica rebuilt from its
    ///   own store agrees;
    /// - no Individual Number in any stored document (decoded, every
    ///   field), stored change or snapshot (raw bytes), op result or
    ///   quarantine note (`individual_number_leak`).
    ///
    /// Every document while the run holds at most 400,000 replicas in
    /// all; above that (disaster-scale scenarios) every n-th, so the check
    /// stays within minutes; `docs_rebuilt` says how many.
    /// Returns the rebuild violations (they count against `converged`);
    /// leaks are reported directly. Runs whether or not the replicas agree.
    pub(super) fn rebuild_and_scan(&mut self) -> Vec<Violation> {
        let total: usize = self
            .nodes
            .iter()
            .filter_map(|n| n.engine.as_ref().map(|e| e.doc_count()))
            .sum();
        let stride = total.div_ceil(400_000).max(1);
        let now = self.now;
        let mut rebuilt = vec![];
        let mut leaks = vec![];
        for i in 0..self.nodes.len() {
            let name = self.nodes[i].id.to_string();
            let Some(e) = self.nodes[i].engine.as_ref() else {
                continue;
            };
            let keys: Vec<(DocKey, Vec<[u8; 32]>)> = e
                .heads()
                .enumerate()
                .filter(|(n, _)| n % stride == 0)
                .map(|(_, (k, h))| (k.clone(), h.to_vec()))
                .collect();
            let store = e.store();
            for (key, heads) in &keys {
                let doc = store
                    .doc_changes(key)
                    .map_err(|e| e.to_string())
                    .and_then(|c| {
                        crdt::doc::Doc::load(key.clone(), None, &c).map_err(|e| e.to_string())
                    });
                let doc = match doc {
                    Ok(d) => d,
                    Err(err) => {
                        rebuilt.push(check::v(
                            check::REBUILT_DIFFERS,
                            now,
                            format!(
                                "{name}: {key} cannot be rebuilt from its stored changes: {err}"
                            ),
                        ));
                        continue;
                    }
                };
                self.summary.docs_rebuilt += 1;
                self.summary.docs_scanned += 1;
                let rows = crdt::derive::projection(&doc).ok();
                let stored = store.mem.projections.get(key).map(|p| &**p);
                rebuilt.extend(check::rebuilt(
                    &name,
                    key,
                    &doc.heads(),
                    Some(heads),
                    rows.as_ref(),
                    stored,
                    now,
                ));
                if check::doc_individual_numbers(&doc) > 0 {
                    leaks.push(check::v(
                        check::INDIVIDUAL_NUMBER_LEAK,
                        now,
                        format!("{name}: stored {key} carries an Individual Number"),
                    ));
                }
            }
            let mem = &store.mem;
            let raw = mem
                .log
                .iter()
                .step_by(stride)
                .map(|c| &c.change.bytes[..])
                .chain(mem.docs.values().filter_map(|(_, s, _)| s.as_deref()))
                .chain(mem.ops.values().map(|v| v.as_bytes()))
                .chain(mem.quarantine.values().map(|v| v.as_bytes()))
                .filter(|b| check::individual_numbers(b) > 0)
                .count();
            if raw > 0 {
                leaks.push(check::v(
                    check::INDIVIDUAL_NUMBER_LEAK,
                    now,
                    format!("{name}: {raw} stored records carry an Individual Number"),
                ));
            }
        }
        for v in leaks {
            self.violate(v);
        }
        rebuilt
    }

    /// Presence documents at every node: no double counting, conflicts shown.
    pub(super) fn presence_checks(&mut self) {
        let mut out = vec![];
        for i in 0..self.nodes.len() {
            let node_name = self.nodes[i].id.to_string();
            let Some(e) = self.nodes[i].engine.as_mut() else {
                continue;
            };
            let keys: Vec<DocKey> = e
                .heads()
                .filter(|(k, _)| k.kind == Kind::Presence)
                .map(|(k, _)| k.clone())
                .collect();
            for k in keys {
                let Ok(Some(d)) = e.doc(&k) else { continue };
                // Derived once per document version when documents are shared.
                let evs = match &self.share {
                    Some(s) => s.presence_events(d),
                    None => crdt::derive::presence_events(d).map(Arc::new),
                };
                let Ok(evs) = evs else {
                    continue;
                };
                let rows: BTreeMap<String, crdt::store::LocationRow> = e
                    .store()
                    .mem
                    .projections
                    .get(&k)
                    .map(|p| {
                        p.locations
                            .iter()
                            .map(|l| (l.person_id.clone(), l.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                let name = format!("{k}@{node_name}");
                out.extend(check::applied_twice(&name, &evs, self.now));
                out.extend(check::conflicts(&name, &evs, &rows, self.now));
            }
        }
        for v in out {
            self.violate(v);
        }
    }

    pub(super) fn hq_known_arrivals(&self) -> u64 {
        let Some(e) = self.nodes[self.hq[0]].engine.as_ref() else {
            return self.summary.arrivals_curve.last().map_or(0, |x| x.2);
        };
        e.store()
            .mem
            .projections
            .iter()
            .filter(|(k, _)| k.kind == Kind::Presence)
            .map(|(_, p)| p.locations.len() as u64)
            .sum()
    }

    pub(super) fn periodic_check(&mut self) {
        // Presence invariants on every node, as often as is affordable.
        self.checks_done += 1;
        // Large registries: only at the end (every node loads every presence
        // document, which dominates a disaster-scale run).
        if self.nodes.len() <= 64
            && self.sc.registry.households <= 5_000
            && self.checks_done % 30 == 0
        {
            self.presence_checks();
        }
        let known = self.hq_known_arrivals();
        self.summary
            .arrivals_curve
            .push((self.now, self.true_arrivals.len() as u64, known));
        if let Some(p) = &self.progress {
            p.set_position(self.now / 1000);
        }
    }
}
