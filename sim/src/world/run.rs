//! The run loop: pops events in (time, insertion) order until the scenario
//! ends or a memory or time budget stops it, then runs the final checks
//! and builds the summary; also the process memory readings it reports.

use super::*;

impl World {
    /// Runs until the end of the scenario, until `deadline` (wall clock) or
    /// until the process's resident memory passes `max_rss` bytes; the
    /// summary says which (`stopped`) and how far it got.
    pub fn run(&mut self, deadline: Option<std::time::Instant>) -> Summary {
        let started = std::time::Instant::now();
        let mut end = self.sc.total_ms();
        let hard_end = end + 600 * self.sc.tick_ms;
        let mut steps = 0u64;
        let mut next_census = self.census_every_ms.unwrap_or(u64::MAX);
        while let Some((&(t, _), _)) = self.queue.first_key_value() {
            if t > end {
                // Liveness: keep going, a round at a time, until converged
                // (bounded); retries may still be moving at the nominal end.
                if end < hard_end && !self.replicas_agree() {
                    end += self.sc.tick_ms;
                    continue;
                }
                break;
            }
            if t >= next_census {
                next_census = t.saturating_add(self.census_every_ms.unwrap_or(u64::MAX));
                let line = self.census();
                match &self.progress {
                    Some(p) => p.suspend(|| eprintln!("{line}")),
                    None => eprintln!("{line}"),
                }
            }
            let ((t, _), ev) = self.queue.pop_first().expect("present");
            self.now = t;
            steps += 1;
            if steps % 64 == 0 && deadline.is_some_and(|d| std::time::Instant::now() > d) {
                self.summary.stopped = Some("wall-clock budget reached".into());
                break;
            }
            if steps % 4096 == 0 {
                if let Some(limit) = self.max_rss.filter(|&l| rss() > l) {
                    self.summary.stopped = Some(format!(
                        "resident memory passed the {:.1} GiB limit",
                        limit as f64 / (1u64 << 30) as f64
                    ));
                    break;
                }
            }
            match ev {
                Ev::Deliver {
                    link,
                    gen,
                    dir,
                    bytes,
                    changes,
                    hostile,
                    stray,
                } => self.deliver(link, gen, dir, bytes, changes, hostile, stray),
                Ev::TickAll => {
                    for i in 0..self.nodes.len() {
                        let rest = self.input(i, Input::Tick);
                        self.after_outputs(i, rest, None);
                    }
                    if self.healed && self.converged_at.is_none() && self.replicas_agree() {
                        self.converged_at = Some(self.now);
                    }
                    self.push(t + self.sc.tick_ms, Ev::TickAll);
                }
                Ev::Cmd {
                    node,
                    op_id,
                    cmd,
                    resubmit,
                } => self.command(node, op_id, cmd, resubmit),
                Ev::MailResp {
                    hq,
                    epoch,
                    req,
                    outcome,
                    accepted,
                } => self.mail_resp(hq, epoch, req, outcome, accepted),
                Ev::Fault(f) => self.fault(f),
                Ev::Sent {
                    node,
                    session,
                    bytes,
                } => self.sent(node, session, bytes),
                Ev::Timeout(l) => {
                    self.count("session_timeout");
                    self.disconnect(l);
                }
                Ev::Reconnect => {
                    self.reconnects_due.remove(&t);
                    self.reconnect()
                }
                Ev::LinkMaint => {
                    self.reconnect();
                    if !self.healed {
                        self.push(t + 30_000, Ev::LinkMaint);
                    } else {
                        self.push(t + 5_000, Ev::LinkMaint);
                    }
                }
                Ev::Check => {
                    self.periodic_check();
                    self.push(t + self.sc.check_every_ms, Ev::Check);
                }
                Ev::Heal => self.heal(),
            }
        }
        let finished =
            self.now >= end || self.queue.first_key_value().is_none_or(|(k, _)| k.0 > end);
        self.finish(finished, started)
    }

    pub(super) fn add_stats(&mut self, st: &crdt::engine::Stats) {
        self.summary.changes_new += st.changes_applied;
        self.summary.changes_already_held += st.changes_known;
        self.summary.announced += st.announced;
        self.summary.grafts += st.grafts;
        self.summary.prunes += st.prunes;
        self.summary.received_per_new = (self.summary.changes_new
            + self.summary.changes_already_held) as f64
            / self.summary.changes_new.max(1) as f64;
        self.summary.received_per_new_protocol = (self.summary.changes_new
            + self
                .summary
                .changes_already_held
                .saturating_sub(self.summary.stray_changes))
            as f64
            / self.summary.changes_new.max(1) as f64;
    }

    pub(super) fn finish(&mut self, finished: bool, started: std::time::Instant) -> Summary {
        let stats: Vec<crdt::engine::Stats> = self
            .nodes
            .iter()
            .filter_map(|n| n.engine.as_ref().map(|e| e.stats().clone()))
            .collect();
        for st in &stats {
            self.add_stats(st);
        }
        if finished {
            for i in 0..self.nodes.len() {
                if self.nodes[i].engine.is_some() {
                    self.check_node_durability(i);
                }
            }
            self.presence_checks();
            // The per-document check is for finding what differs; when
            // every group agrees on heads and rows it has nothing to find.
            let conv = if self.replicas_agree() && self.rows_agree() {
                vec![]
            } else {
                self.convergence_violations()
            };
            // Each node's own rebuild and the store scans do not depend on
            // the replicas agreeing: they run either way (a failed
            // convergence must not hide a stored Individual Number).
            let rebuilt = self.rebuild_and_scan();
            self.verify_stored_changes();
            self.summary.converged = conv.is_empty() && rebuilt.is_empty();
            for v in conv.into_iter().take(5).chain(rebuilt.into_iter().take(5)) {
                self.violate(v);
            }
            if self.summary.converged && self.converged_at.is_none() {
                self.converged_at = Some(self.now);
            }
            // Mail: every consented contact of every arrival HQ knows.
            let mut expected = BTreeSet::new();
            let hq = self.hq[0];
            if let Some(e) = self.nodes[hq].engine.as_mut() {
                let keys: Vec<DocKey> = e
                    .heads()
                    .filter(|(k, _)| k.kind == Kind::Presence)
                    .map(|(k, _)| k.clone())
                    .collect();
                let mut arrived = BTreeSet::new();
                for k in keys {
                    if let Ok(Some(d)) = e.doc(&k) {
                        for ev in crdt::derive::presence_events(d).unwrap_or_default() {
                            if ev.action == PresenceAction::CheckIn {
                                arrived.insert(ev.person_id);
                            }
                        }
                    }
                }
                for p in arrived {
                    for c in self.contact_pairs.get(&p).into_iter().flatten() {
                        if self.consented.contains(&(p.clone(), c.clone())) {
                            expected.insert((p.clone(), c.clone()));
                        }
                    }
                }
            }
            for v in self.ledger.missing(&expected, self.now) {
                self.violate(v);
            }
        }
        let chaos_end = self.sc.chaos_end_ms();
        self.summary.convergence_ms = self.converged_at.map(|t| t.saturating_sub(chaos_end));
        self.summary.convergence_rounds = self
            .summary
            .convergence_ms
            .map(|ms| ms.div_ceil(self.sc.tick_ms));
        self.summary.duplicate_mails = self.ledger.duplicates;
        self.summary.finished = finished;
        self.summary.simulated_hours = self.now as f64 / 3_600_000.0;
        self.summary.invariant_violations = self.violations.clone();
        for (name, c) in &self.violation_counts {
            if *c > 5 {
                self.summary.invariant_violations.push(check::v(
                    name,
                    self.now,
                    format!("... and {} more {name} violations", c - 5),
                ));
            }
        }
        let mut h = self.hasher.clone();
        h.update(&self.now.to_le_bytes());
        self.summary.trace_hash = h.finalize().to_hex().to_string();
        self.summary.wall_ms = started.elapsed().as_millis() as u64;
        self.summary.peak_rss_bytes = peak_rss();
        self.summary.clone()
    }

    /// Documents each node holds (`None` while it is down).
    pub fn doc_counts(&self) -> Vec<Option<usize>> {
        self.nodes
            .iter()
            .map(|n| n.engine.as_ref().map(|e| e.doc_count()))
            .collect()
    }
}

/// A `/proc` status line in bytes (0 when unavailable).
pub(super) fn proc_kib(file: &str, field: &str) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

pub fn peak_rss() -> u64 {
    proc_kib("/proc/self/status", "VmHWM:")
}

pub(super) fn rss() -> u64 {
    proc_kib("/proc/self/status", "VmRSS:")
}

/// Physical memory of this machine in bytes (0 when unknown).
pub fn memory_total() -> u64 {
    proc_kib("/proc/meminfo", "MemTotal:")
}
