//! Faults: the per-seed fault mix (swarm testing), the fault schedule
//! drawn from the `faults` random stream, and what each fault does to the
//! world (crash and restart with unsynced writes lost, crash right after an
//! acknowledgement or during a mail, partitions, clogs, I/O errors, clock
//! jumps, SMTP outages, backup and restore of a node).

use super::*;

/// The fault mix of one seed (swarm testing: each fault on or off, with
/// its own intensity).
#[derive(Clone, Debug, Serialize)]
pub struct FaultMix {
    pub loss: f64,
    pub duplication: f64,
    pub reorder: f64,
    pub clog: bool,
    pub partitions: bool,
    pub crashes: bool,
    pub crash_after_ack: bool,
    pub io_errors: bool,
    pub skew: bool,
    pub smtp_transient: f64,
    pub smtp_permanent: f64,
    pub smtp_indeterminate: f64,
    pub smtp_down: bool,
    pub crash_during_mail: bool,
    pub restore_backup: bool,
    pub hq_failover: bool,
    pub events_per_hour: f64,
    /// A compromised shelter sends forged and hostile changes (`hostile`).
    pub hostile: bool,
}

impl FaultMix {
    pub fn draw(s: &Scenario, seed: u64) -> FaultMix {
        let mut r = sub_rng(seed, "faults-mix");
        let l = &s.faults;
        let on = |r: &mut ChaCha8Rng, allowed: bool| allowed && chance(r, 0.5);
        let loss = if on(&mut r, l.loss > 0.0) {
            unit(&mut r) * l.loss
        } else {
            0.0
        };
        let duplication = if on(&mut r, l.duplication > 0.0) {
            unit(&mut r) * l.duplication
        } else {
            0.0
        };
        let reorder = if on(&mut r, l.reorder) {
            0.1 + unit(&mut r) * 0.5
        } else {
            0.0
        };
        let smtp = on(&mut r, l.smtp);
        FaultMix {
            loss,
            duplication,
            reorder,
            clog: on(&mut r, l.clog),
            partitions: on(&mut r, l.partitions),
            crashes: on(&mut r, l.crashes),
            crash_after_ack: on(&mut r, l.crashes),
            io_errors: on(&mut r, l.io_errors),
            skew: on(&mut r, l.skew),
            smtp_transient: if smtp { unit(&mut r) * 0.3 } else { 0.0 },
            smtp_permanent: if smtp { unit(&mut r) * 0.05 } else { 0.0 },
            smtp_indeterminate: if smtp { unit(&mut r) * 0.2 } else { 0.0 },
            smtp_down: smtp && chance(&mut r, 0.5),
            crash_during_mail: on(&mut r, l.crashes && l.smtp),
            restore_backup: on(&mut r, l.restore_backup),
            hq_failover: on(&mut r, l.hq_failover),
            events_per_hour: l.events_per_hour * (0.25 + unit(&mut r) * 0.75),
            // Drawn last, so the draws above stay those of earlier versions.
            hostile: on(&mut r, l.hostile),
        }
    }
}

#[derive(Clone, Debug)]
pub(super) enum Fault {
    Crash(usize, u64),
    Restart(usize),
    CrashAfterAck(usize),
    CrashDuringMail(usize),
    Partition(u8),
    HealPartition,
    Clog(usize, u64, u64),
    IoError(usize, u32),
    ClockJump(usize, i64),
    SmtpDown(u64),

    TakeBackup(usize),
    Restore(usize),
    /// Shelter node `.0` sends a hostile change of kind `.1`.
    Hostile(usize, u8),
}

impl World {
    pub(super) fn build_faults(&mut self) {
        let start = self.sc.warmup_ms();
        let end = self.sc.chaos_end_ms();
        let m = self.mix.clone();
        let shelters = self.idx(Role::Shelter);
        let r = &mut self.fault_rng;
        let n = self.nodes.len() as u64;
        let count = (m.events_per_hour * self.sc.chaos_hours) as usize;
        let mut kinds: Vec<u8> = vec![];
        if m.crashes {
            kinds.push(0);
        }
        if m.crash_after_ack {
            kinds.push(1);
        }
        if m.partitions {
            kinds.extend([2, 2]);
        }
        if m.clog {
            kinds.push(3);
        }
        if m.io_errors {
            kinds.push(4);
        }
        if m.skew {
            kinds.push(5);
        }
        if m.smtp_down {
            kinds.push(6);
        }
        if m.restore_backup {
            kinds.push(7);
        }
        if m.crash_during_mail {
            kinds.extend([8, 8]);
        }
        if m.hostile {
            kinds.push(9);
        }

        let mut evs = vec![];
        if !kinds.is_empty() {
            for _ in 0..count {
                let at = range(r, start, end);
                let k = kinds[range(r, 0, kinds.len() as u64) as usize];
                let node = range(r, 0, n) as usize;
                match k {
                    0 => evs.push((at, Fault::Crash(node, range(r, 1_000, 600_000)))),
                    1 => evs.push((at, Fault::CrashAfterAck(node))),
                    2 => {
                        evs.push((at, Fault::Partition(range(r, 0, 4) as u8)));
                        evs.push((at + range(r, 10_000, 1_800_000), Fault::HealPartition));
                    }
                    3 => {
                        let l = range(r, 0, self.links.len() as u64) as usize;
                        evs.push((
                            at,
                            Fault::Clog(l, range(r, 10, 100), range(r, 10_000, 600_000)),
                        ));
                    }
                    4 => evs.push((at, Fault::IoError(node, range(r, 1, 4) as u32))),
                    5 => {
                        let skew = if chance(r, 0.3) {
                            // A tablet reset to 1970.
                            -((T0_WALL_MS + at) as i64) + range(r, 0, 3_600_000) as i64
                        } else {
                            range(r, 0, 2 * 86_400_000) as i64 - 86_400_000
                        };
                        evs.push((at, Fault::ClockJump(node, skew)));
                    }
                    6 => evs.push((at, Fault::SmtpDown(range(r, 60_000, 1_800_000)))),
                    7 => {
                        evs.push((at, Fault::TakeBackup(node)));
                        evs.push((at + range(r, 60_000, 1_800_000), Fault::Restore(node)));
                    }
                    8 => {
                        let hq = self.hq[range(r, 0, self.hq.len() as u64) as usize];
                        evs.push((at, Fault::CrashDuringMail(hq)));
                    }
                    _ => {
                        let s = shelters[range(r, 0, shelters.len() as u64) as usize];
                        let kind = range(r, 0, KINDS.len() as u64) as u8;
                        evs.push((at, Fault::Hostile(s, kind)));
                    }
                }
            }
        }
        if m.hq_failover && self.hq.len() > 1 {
            let at = range(r, start, start + (end - start) / 2);
            let down = range(r, 15 * 60_000, 60 * 60_000);
            evs.push((at, Fault::Crash(self.hq[0], down)));
        }
        for (at, f) in evs {
            self.push(at, Ev::Fault(f));
        }
    }

    // ----- time and engines -------------------------------------------------

    pub(super) fn crash(&mut self, i: usize, down_ms: u64) {
        let Some(engine) = self.nodes[i].engine.take() else {
            return;
        };
        self.add_stats(&engine.stats());
        self.count("crash");
        self.hasher
            .update(format!("crash {i} {}", self.now).as_bytes());
        let mut store = engine.into_store();
        // Pending I/O errors belong to the process that died.
        store.mem.fail_commits = None;
        self.nodes[i].parked = Some(store);
        self.nodes[i].epoch += 1;
        if let Some(m) = self.mail_inflight.remove(&i) {
            for (_, (p, c)) in m {
                self.ledger.on_unknown(&p, &c);
            }
        }
        for l in 0..self.links.len() {
            let k = &self.links[l];
            if k.up && (k.a == i || k.b == i) {
                self.disconnect(l);
            }
        }
        self.push(self.now + down_ms, Ev::Fault(Fault::Restart(i)));
    }

    pub(super) fn restart(&mut self, i: usize) {
        let Some(store) = self.nodes[i].parked.take() else {
            return;
        };
        let now = Self::node_now(&self.nodes[i], self.now);
        // The node's real open path; its index, built from its store, shares
        // memory with the provisioned one wherever they agree.
        let index = match &self.provisioned {
            Some(p) => IndexFrom::Over(p.clone()),
            None => IndexFrom::Store,
        };
        match self.open(store, &self.nodes[i].cfg, now, index) {
            Ok(e) => self.nodes[i].engine = Some(e),
            Err(e) => {
                // The store is consumed by a failed open; the node is lost.
                let v = check::v(
                    "restart_failed",
                    self.now,
                    format!("{}: {e}", self.nodes[i].id),
                );
                self.violate(v);
                return;
            }
        }
        self.hasher
            .update(format!("restart {i} {}", self.now).as_bytes());
        self.check_node_durability(i);
        self.push(self.now + 1, Ev::Reconnect);
    }

    pub(super) fn check_node_durability(&mut self, i: usize) {
        let acked = self.nodes[i].acked.clone();
        let mut by_doc: BTreeMap<DocKey, BTreeSet<String>> = BTreeMap::new();
        for (e, k) in acked {
            by_doc.entry(k).or_default().insert(e);
        }
        let name = self.nodes[i].id.as_str().to_string();
        let mut out = vec![];
        let engine = self.nodes[i].engine.as_mut().expect("running");
        for (k, want) in by_doc {
            let present: BTreeSet<String> = match engine.doc(&k) {
                Ok(Some(d)) => crdt::derive::presence_events(d)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|e| e.event_id)
                    .collect(),
                _ => BTreeSet::new(),
            };
            let lost = check::acked_writes(&name, &want, &present, self.now);
            self.summary.acked_writes_lost += lost.len() as u64;
            out.extend(lost);
        }
        if !self.nodes[i].reads.is_empty() {
            let reads = self.nodes[i].reads.clone();
            let key = DocKey::new(Kind::Audit, name.clone()).expect("node ids are doc ids");
            let engine = self.nodes[i].engine.as_mut().expect("running");
            let entries = match engine.doc(&key) {
                Ok(Some(d)) => crdt::views::audit(d).unwrap_or_default(),
                _ => vec![],
            };
            out.extend(check::audit(&name, &reads, &entries, self.now));
        }
        for v in out {
            self.violate(v);
        }
    }

    pub(super) fn fault(&mut self, f: Fault) {
        if self.healed {
            if let Fault::Restart(i) = f {
                self.restart(i);
            }
            return;
        }
        match f {
            Fault::Crash(i, down) => self.crash(i, down),
            Fault::Restart(i) => self.restart(i),
            Fault::CrashAfterAck(i) => {
                self.count("crash_after_ack_armed");
                self.nodes[i].crash_after_ack = true;
            }
            Fault::CrashDuringMail(i) => {
                self.count("crash_during_mail_armed");
                self.nodes[i].crash_after_mail = true;
            }
            Fault::Partition(shape) => {
                self.count(["isolate", "split", "ring", "one_way"][shape as usize % 4]);
                self.blocked.clear();
                let n = self.nodes.len();
                let r = &mut self.fault_rng;
                match shape {
                    0 => {
                        let x = range(r, 0, n as u64) as usize;
                        for j in 0..n {
                            self.blocked.insert((x, j));
                            self.blocked.insert((j, x));
                        }
                    }
                    1 => {
                        let side: Vec<bool> = (0..n).map(|_| chance(r, 0.5)).collect();
                        for a in 0..n {
                            for b in 0..n {
                                if side[a] != side[b] {
                                    self.blocked.insert((a, b));
                                }
                            }
                        }
                    }
                    2 => {
                        // Majorities ring: each node sees only its ring
                        // neighbours' half; not transitive.
                        let mut pos: Vec<usize> = (0..n).collect();
                        for i in (1..n).rev() {
                            let j = range(r, 0, i as u64 + 1) as usize;
                            pos.swap(i, j);
                        }
                        for a in 0..n {
                            for b in 0..n {
                                let d = (pos[a] + n - pos[b]) % n;
                                let d = d.min(n - d);
                                if d > n / 4 + 1 {
                                    self.blocked.insert((a, b));
                                }
                            }
                        }
                    }
                    _ => {
                        let l = range(r, 0, self.links.len() as u64) as usize;
                        let (a, b) = (self.links[l].a, self.links[l].b);
                        self.blocked.insert((a, b));
                        self.push(self.now + 10_000, Ev::Timeout(l));
                        return;
                    }
                }
                for l in 0..self.links.len() {
                    let k = &self.links[l];
                    if k.up
                        && (self.blocked.contains(&(k.a, k.b))
                            || self.blocked.contains(&(k.b, k.a)))
                    {
                        self.disconnect(l);
                    }
                }
            }
            Fault::HealPartition => {
                self.blocked.clear();
                self.push(self.now, Ev::Reconnect);
            }
            Fault::Clog(l, factor, dur) => {
                if l < self.links.len() {
                    self.count("clog");
                    self.links[l].clog_factor = factor;
                    self.links[l].clog_until = self.now + dur;
                }
            }
            Fault::IoError(i, n) => {
                if self.nodes[i].engine.is_some() {
                    self.count("io_error");
                    let e = self.nodes[i].engine.as_mut().expect("running");
                    e.store_mut().mem.fail_commits =
                        Some((n, StoreError::Io("simulated EIO".into())));
                }
            }
            Fault::ClockJump(i, skew) => {
                if self.nodes[i].role != Role::Hq {
                    self.count("clock_jump");
                    self.nodes[i].skew_ms = skew;
                }
            }
            Fault::SmtpDown(d) => {
                self.count("smtp_down");
                self.smtp_down_until = self.now + d;
            }

            Fault::Hostile(i, kind) => {
                if self.nodes[i].engine.is_some() {
                    self.hostile(i, kind);
                }
            }
            Fault::TakeBackup(i) => {
                if self.nodes[i].role == Role::Shelter {
                    if let Some(e) = &self.nodes[i].engine {
                        let mut s = e.store().clone();
                        s.mem.fail_commits = None;
                        self.nodes[i].backup = Some((
                            s,
                            self.nodes[i].epoch,
                            self.nodes[i].acked.clone(),
                            self.nodes[i].reads.clone(),
                        ));
                        self.count("backup_taken");
                    }
                }
            }
            Fault::Restore(i) => {
                let Some((s, epoch, acked, reads)) = self.nodes[i].backup.take() else {
                    return;
                };
                if epoch != self.nodes[i].epoch || self.nodes[i].engine.is_none() {
                    return;
                }
                self.count("restore_from_backup");
                self.crash(i, 0);
                self.nodes[i].parked = Some(s);
                self.nodes[i].acked = acked;
                self.nodes[i].reads = reads;
            }
        }
    }

    // ----- checks -----------------------------------------------------------
}
