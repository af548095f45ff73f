//! The simulated world: nodes running the real `crdt::engine::Engine` on
//! `SimStore`, links with delay, bandwidth, loss, duplication and
//! reordering, an SMTP server, and a fault schedule drawn from one seed.
//!
//! Time is simulated milliseconds in a discrete event queue (ordered by
//! time, then insertion order), so one seed replays exactly. Each purpose
//! (workload, faults, network, SMTP, each node's engine) draws from its own
//! ChaCha8 sub-stream derived from the seed, so adding a draw in one place
//! does not shift every other choice.

use crate::check::{self, MailLedger, Replica, Violation};
use crate::scenario::Scenario;
use crate::simstore::SimStore;
use crdt::api::*;
use crdt::engine::{DocIndex, Engine, EngineConfig};
use crdt::model::*;
use crdt::share::DocShare;
use crdt::store::{Batch, DocState, Store, StoreError, StorePool};
use crdt::text::CardUserId;
use crdt::wire::{self, Frame};
use crdt::{DocKey, Kind, NodeId, Role};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Simulated time 0 on the wall clock (2026-09-21).
pub const T0_WALL_MS: u64 = 1_790_000_000_000;

pub fn sub_rng(seed: u64, purpose: &str) -> ChaCha8Rng {
    let h = blake3::hash(format!("kizuna-sim|{seed}|{purpose}").as_bytes());
    ChaCha8Rng::from_seed(*h.as_bytes())
}

fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}
fn range(rng: &mut ChaCha8Rng, lo: u64, hi: u64) -> u64 {
    if hi <= lo {
        lo
    } else {
        lo + rng.next_u64() % (hi - lo)
    }
}
fn chance(rng: &mut ChaCha8Rng, p: f64) -> bool {
    unit(rng) < p
}

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
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Lan,
    Mobile,
    Satellite,
}

impl Profile {
    pub fn parse(s: &str) -> Profile {
        match s {
            "satellite" => Profile::Satellite,
            "mobile" => Profile::Mobile,
            _ => Profile::Lan,
        }
    }
    /// (rtt range ms, bytes per ms)
    fn params(self) -> ((u64, u64), f64) {
        match self {
            Profile::Lan => ((1, 5), 100_000.0),
            Profile::Mobile => ((40, 150), 1_000.0),
            // 64 kbit/s = 8 bytes per ms.
            Profile::Satellite => ((300, 700), 8.0),
        }
    }
}

struct Link {
    a: usize,
    b: usize,
    profile: Profile,
    rtt_ms: u64,
    up: bool,
    gen: u32,
    busy_until: [u64; 2],
    last_arrival: [u64; 2],
    clog_until: u64,
    clog_factor: u64,
    /// A reconnect is scheduled.
    connecting: bool,
    /// A frame of this connection was lost: like a broken QUIC stream,
    /// nothing after it is delivered until the connection is replaced.
    broken: bool,
}

fn sid(link: usize, gen: u32, side: u8) -> SessionId {
    ((link as u64) << 24) | (((gen & 0x7f_ffff) as u64) << 1) | side as u64
}
fn sid_parts(s: SessionId) -> (usize, u32, u8) {
    (
        (s >> 24) as usize,
        ((s >> 1) & 0x7f_ffff) as u32,
        (s & 1) as u8,
    )
}

struct Node {
    id: NodeId,
    role: Role,
    cfg: EngineConfig,
    engine: Option<Engine<SimStore>>,
    parked: Option<SimStore>,
    skew_ms: i64,
    /// Simulated time the node is switched on: no link comes up before.
    join_at_ms: u64,
    epoch: u32,
    rng: ChaCha8Rng,
    crash_after_ack: bool,
    crash_after_mail: bool,
    /// A copy of the store, with the epoch it was taken in and what was
    /// acknowledged by then (D-5: restore from backup).
    backup: Option<(SimStore, u32, BTreeMap<String, DocKey>, Vec<u64>)>,
    /// Acknowledged presence events: event id -> presence document.
    acked: BTreeMap<String, DocKey>,
    /// Audit sequence numbers of successful medical reads.
    reads: Vec<u64>,
}

#[derive(Clone, Debug)]
enum Fault {
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
}

enum Ev {
    Deliver {
        link: usize,
        gen: u32,
        dir: u8,
        bytes: Vec<u8>,
        /// The same frame decoded, when it carries changes.
        changes: Option<Box<Frame>>,
    },
    TickAll,
    Cmd {
        node: usize,
        op_id: String,
        cmd: Command,
        resubmit: bool,
    },
    MailResp {
        hq: usize,
        epoch: u32,
        req: MailRequest,
        outcome: MailOutcome,
        accepted: bool,
    },
    Fault(Fault),
    /// One-way cut: the session times out.
    Timeout(usize),
    /// Every 30 s (5 s once healed): bring up links that may be up.
    LinkMaint,
    /// Once: the same, after a disconnect, restart, heal or join.
    Reconnect,
    Check,
    Heal,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub seed: u64,
    pub scenario: String,
    pub nodes: usize,
    pub simulated_hours: f64,
    pub faults: Option<FaultMix>,
    pub faults_injected: BTreeMap<String, u64>,
    pub invariant_violations: Vec<Violation>,
    pub converged: bool,
    pub convergence_rounds: Option<u64>,
    pub convergence_ms: Option<u64>,
    pub acked_writes: u64,
    pub acked_writes_lost: u64,
    pub duplicate_mails: u64,
    pub mails_accepted: u64,
    pub commands: u64,
    pub commands_failed: u64,
    pub frames: u64,
    pub bytes: u64,
    /// Changes received by nodes: new to the receiver, and already held
    /// (the same change from several peers, or a stray copy).
    pub changes_new: u64,
    pub changes_already_held: u64,
    pub trace_hash: String,
    pub wall_ms: u64,
    pub peak_rss_bytes: u64,
    pub finished: bool,
    /// Why a run stopped before the end of the scenario.
    pub stopped: Option<String>,
    /// (simulated ms, true arrivals acknowledged, arrivals known at HQ)
    #[serde(skip)]
    pub arrivals_curve: Vec<(u64, u64, u64)>,
}

pub struct World {
    pub sc: Scenario,
    pub seed: u64,
    pub now: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    nodes: Vec<Node>,
    links: Vec<Link>,
    /// Blocked directed node pairs (partitions).
    blocked: BTreeSet<(usize, usize)>,
    net_rng: ChaCha8Rng,
    fault_rng: ChaCha8Rng,
    smtp_rng: ChaCha8Rng,
    mix: FaultMix,
    healed: bool,
    smtp_down_until: u64,
    hasher: blake3::Hasher,
    pub summary: Summary,
    violations: Vec<Violation>,
    /// Names already reported, with counts (details are kept for the first few).
    violation_counts: BTreeMap<&'static str, u64>,
    ledger: MailLedger,
    mail_inflight: BTreeMap<usize, BTreeMap<String, (String, String)>>,
    last_sender: BTreeMap<(String, String), usize>,
    /// Truth: (person, contact) pairs that may be mailed.
    consented: BTreeSet<(String, String)>,
    contact_pairs: BTreeMap<String, Vec<String>>,
    /// person -> household (presence document id)
    household_of: BTreeMap<String, String>,
    first_replies: BTreeMap<String, Reply>,
    true_arrivals: BTreeSet<String>,
    converged_at: Option<u64>,
    pub progress: Option<indicatif::ProgressBar>,
    /// Stop (reporting how far the run got) when resident memory passes
    /// this many bytes, instead of being killed by the kernel.
    pub max_rss: Option<u64>,
    hq: Vec<usize>,
    checks_done: u64,
    share: Option<DocShare>,
    /// With `share`: one copy of each change's bytes for every store.
    pool: Option<StorePool>,
    /// `groups_of`, computed once per class of document.
    holder_groups: BTreeMap<(Kind, Option<String>), Vec<Vec<usize>>>,
}

fn role_prefix(r: Role) -> &'static str {
    match r {
        Role::Hq => "hq",
        Role::Shelter => "shelter",
        Role::Clinic => "clinic",
        Role::Ambulance => "amb",
        Role::Facility => "facility",
    }
}

const SURNAMES: [&str; 8] = [
    "山田", "佐藤", "鈴木", "高橋", "田中", "伊藤", "渡辺", "中村",
];
const SURNAMES_KANA: [&str; 8] = [
    "ヤマダ",
    "サトウ",
    "スズキ",
    "タカハシ",
    "タナカ",
    "イトウ",
    "ワタナベ",
    "ナカムラ",
];
const GIVEN: [&str; 6] = ["太郎", "花子", "一郎", "恵子", "健", "結衣"];
const GIVEN_KANA: [&str; 6] = ["タロウ", "ハナコ", "イチロウ", "ケイコ", "ケン", "ユイ"];

impl World {
    pub fn new(sc: Scenario, seed: u64) -> World {
        let mix = FaultMix::draw(&sc, seed);
        World::with_mix(sc, seed, mix)
    }

    pub fn with_mix(sc: Scenario, seed: u64, mix: FaultMix) -> World {
        let mut w = World {
            seed,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            nodes: vec![],
            links: vec![],
            blocked: BTreeSet::new(),
            net_rng: sub_rng(seed, "net"),
            fault_rng: sub_rng(seed, "faults"),
            smtp_rng: sub_rng(seed, "smtp"),
            mix: mix.clone(),
            healed: false,
            smtp_down_until: 0,
            hasher: blake3::Hasher::new(),
            summary: Summary {
                seed,
                scenario: sc.name.clone(),
                faults: Some(mix),
                ..Default::default()
            },
            violations: vec![],
            violation_counts: BTreeMap::new(),
            ledger: MailLedger::default(),
            mail_inflight: BTreeMap::new(),
            last_sender: BTreeMap::new(),
            consented: BTreeSet::new(),
            contact_pairs: BTreeMap::new(),
            household_of: BTreeMap::new(),
            first_replies: BTreeMap::new(),
            true_arrivals: BTreeSet::new(),
            converged_at: None,
            progress: None,
            max_rss: None,
            hq: vec![],
            checks_done: 0,
            share: sc.share_docs.map(DocShare::new),
            pool: sc.share_docs.map(|_| StorePool::default()),
            holder_groups: BTreeMap::new(),
            sc,
        };
        w.build_nodes();
        w.build_links();
        w.build_workload();
        w.build_faults();
        w.push(0, Ev::LinkMaint);
        w.push(1, Ev::TickAll);
        w.push(w.sc.check_every_ms, Ev::Check);
        let heal = w.sc.chaos_end_ms();
        w.push(heal, Ev::Heal);
        w
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at.max(self.now), self.seq), ev);
    }

    fn violate(&mut self, v: Violation) {
        let c = self.violation_counts.entry(v.name).or_default();
        *c += 1;
        if *c <= 5 {
            self.violations.push(v);
        }
    }

    // ----- construction -----------------------------------------------------

    fn build_nodes(&mut self) {
        let n = &self.sc.nodes;
        let mut spec: Vec<(Role, bool)> = vec![];
        spec.extend((0..n.hq).map(|_| (Role::Hq, true)));
        spec.extend((0..n.backup_hq).map(|_| (Role::Hq, false)));
        spec.extend((0..n.shelters).map(|_| (Role::Shelter, true)));
        spec.extend((0..n.clinics).map(|_| (Role::Clinic, true)));
        spec.extend((0..n.ambulances).map(|_| (Role::Ambulance, true)));
        spec.extend((0..n.facilities).map(|_| (Role::Facility, true)));
        let mut counters: BTreeMap<&str, usize> = BTreeMap::new();
        let mut skew_rng = sub_rng(self.seed, "skew");
        for (i, (role, primary)) in spec.into_iter().enumerate() {
            let c = counters.entry(role_prefix(role)).or_default();
            *c += 1;
            let id = NodeId::new(format!("{}-{}", role_prefix(role), c)).expect("valid id");
            let mut cfg = EngineConfig::new(id.clone(), role);
            cfg.mail_primary = primary;
            if let Some(c) = self.sc.cache_docs {
                cfg.cache_docs = c;
            }
            let skew_ms = if self.mix.skew && role != Role::Hq && chance(&mut skew_rng, 0.5) {
                let mag = if chance(&mut skew_rng, 0.2) {
                    range(&mut skew_rng, 0, 3 * 86_400_000)
                } else {
                    range(&mut skew_rng, 0, 10 * 60_000)
                } as i64;
                if chance(&mut skew_rng, 0.5) {
                    mag
                } else {
                    -mag
                }
            } else {
                0
            };
            if role == Role::Hq {
                self.hq.push(i);
            }
            let mut node = Node {
                id,
                role,
                cfg,
                engine: None,
                parked: Some(self.new_store()),
                skew_ms,
                join_at_ms: 0,
                epoch: 0,
                rng: sub_rng(self.seed, &format!("node-{i}")),
                crash_after_ack: false,
                crash_after_mail: false,
                backup: None,
                acked: BTreeMap::new(),
                reads: vec![],
            };
            let now = Self::node_now(&node, 0);
            let store = node.parked.take().expect("fresh");
            node.engine = Some(
                self.open(store, &node.cfg, now, None)
                    .expect("fresh store opens"),
            );
            self.nodes.push(node);
        }
        self.summary.nodes = self.nodes.len();
    }

    fn new_store(&self) -> SimStore {
        let mut s = SimStore::default();
        s.mem.pool = self.pool.clone();
        s
    }

    /// Opens a node's engine on its store, sharing documents with the
    /// other nodes when the scenario says so.
    fn open(
        &self,
        store: SimStore,
        cfg: &EngineConfig,
        now: Now,
        index: Option<DocIndex>,
    ) -> Result<Engine<SimStore>, crdt::engine::EngineError> {
        let mut e = Engine::open_indexed(store, cfg.clone(), now, index)?;
        if let Some(s) = &self.share {
            e.set_share(s.clone());
        }
        Ok(e)
    }

    fn idx(&self, role: Role) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].role == role)
            .collect()
    }

    fn add_link(&mut self, a: usize, b: usize, profile: Profile) {
        if a == b
            || self
                .links
                .iter()
                .any(|l| (l.a, l.b) == (a, b) || (l.a, l.b) == (b, a))
        {
            return;
        }
        let ((lo, hi), _) = profile.params();
        let rtt_ms = range(&mut self.net_rng, lo, hi + 1);
        self.links.push(Link {
            a,
            b,
            profile,
            rtt_ms,
            up: false,
            gen: 0,
            busy_until: [0; 2],
            last_arrival: [0; 2],
            clog_until: 0,
            clog_factor: 1,
            connecting: false,
            broken: false,
        });
    }

    fn build_links(&mut self) {
        let mut r = sub_rng(self.seed, "topology");
        let t = self.sc.topology.clone();
        let hq_link = Profile::parse(&t.hq_link);
        let shelters = self.idx(Role::Shelter);
        let hqs = self.hq.clone();
        let primary = hqs[0];
        for &h in &hqs[1..] {
            self.add_link(primary, h, Profile::Lan);
        }
        let gw = t.hq_gateways.min(shelters.len());
        let pick = |r: &mut ChaCha8Rng| {
            let u = unit(r);
            if u < t.satellite_fraction {
                Profile::Satellite
            } else if u < t.satellite_fraction + t.mobile_fraction {
                Profile::Mobile
            } else {
                Profile::Lan
            }
        };
        for (k, &s) in shelters.iter().enumerate() {
            if k < gw {
                for &h in &hqs {
                    self.add_link(h, s, hq_link);
                }
            } else {
                // A tree of shelters: HQ only through the gateways.
                let parent = shelters[range(&mut r, 0, k as u64) as usize];
                let p = pick(&mut r);
                self.add_link(s, parent, p);
            }
        }
        let extra = (self.sc.topology.extra_links * shelters.len() as f64) as usize;
        for _ in 0..extra {
            if shelters.len() < 2 {
                break;
            }
            let a = shelters[range(&mut r, 0, shelters.len() as u64) as usize];
            let b = shelters[range(&mut r, 0, shelters.len() as u64) as usize];
            let p = pick(&mut r);
            self.add_link(a, b, p);
        }
        let clinics = self.idx(Role::Clinic);
        for &c in &clinics {
            self.add_link(primary, c, Profile::Mobile);
            let s = shelters[range(&mut r, 0, shelters.len() as u64) as usize];
            self.add_link(c, s, Profile::Lan);
        }
        for &a in &self.idx(Role::Ambulance) {
            // Ambulances reach medical data over mobile to HQ and at clinics.
            self.add_link(primary, a, Profile::Mobile);
            if !clinics.is_empty() {
                let c = clinics[range(&mut r, 0, clinics.len() as u64) as usize];
                self.add_link(a, c, Profile::Lan);
            }
        }
        for &f in &self.idx(Role::Facility) {
            let s = shelters[range(&mut r, 0, shelters.len() as u64) as usize];
            self.add_link(f, s, Profile::Lan);
        }
    }

    fn build_workload(&mut self) {
        let mut r = sub_rng(self.seed, "workload");
        let sc = self.sc.clone();
        let primary = self.hq[0];
        // Registry.
        let mut households: Vec<Household> = Vec::with_capacity(sc.registry.households);
        let mut card = 1_000_000_000_000u64;
        for h in 0..sc.registry.households {
            let members = range(&mut r, 1, sc.registry.max_members as u64 + 1) as usize;
            let sn = range(&mut r, 0, SURNAMES.len() as u64) as usize;
            let hid = format!("h{h}");
            let members = (0..members)
                .map(|m| {
                    let g = range(&mut r, 0, GIVEN.len() as u64) as usize;
                    card += 1 + range(&mut r, 0, 7);
                    let pid = format!("p{h}-{m}");
                    self.household_of.insert(pid.clone(), hid.clone());
                    Member {
                        person_id: pid,
                        name: format!("{} {}", SURNAMES[sn], GIVEN[g]),
                        kana: format!("{} {}", SURNAMES_KANA[sn], GIVEN_KANA[g]),
                        birth_date: format!(
                            "{}-{:02}-{:02}",
                            range(&mut r, 1930, 2024),
                            range(&mut r, 1, 13),
                            range(&mut r, 1, 29)
                        ),
                        card_user_id: chance(&mut r, 0.7)
                            .then(|| CardUserId::parse(&card.to_string()).expect("13 digits")),
                    }
                })
                .collect();
            households.push(Household {
                household_id: hid,
                address: format!("石川県輪島市河井町{}番地", range(&mut r, 1, 3000)),
                members,
            });
        }
        let mut t = 10;
        let provisioned = sc.registry.provisioned;
        // Provisioned: run HQ's imports now, before anything else happens;
        // otherwise as events during warmup.
        let at_hq = |w: &mut World, t: &mut u64, step: u64, op_id: String, cmd: Command| {
            if provisioned {
                w.command(primary, op_id, cmd, false);
            } else {
                w.push(
                    *t,
                    Ev::Cmd {
                        node: primary,
                        op_id,
                        cmd,
                        resubmit: false,
                    },
                );
                *t += step;
            }
        };
        for (b, chunk) in households.chunks(sc.registry.import_batch).enumerate() {
            let cmd = Command::ImportHouseholds {
                households: chunk.to_vec(),
            };
            at_hq(self, &mut t, 10, format!("import-{b}"), cmd);
        }
        let shelters = self.idx(Role::Shelter);
        for &s in &shelters {
            let id = self.nodes[s].id.as_str().to_string();
            let cap = range(&mut r, 50, 1000) as u32;
            let cmd = Command::PutShelter {
                shelter: ShelterInfo {
                    shelter_id: id.clone(),
                    name: format!("避難所 {id}"),
                    capacity: cap,
                    location: String::new(),
                    needs: String::new(),
                    ..Default::default()
                },
            };
            at_hq(self, &mut t, 1, format!("shelter-{id}"), cmd);
        }
        if provisioned {
            self.provision(primary);
        }
        let persons: Vec<String> = households
            .iter()
            .flat_map(|h| h.members.iter().map(|m| m.person_id.clone()))
            .collect();
        // Family contacts.
        let mut cn = 0;
        for p in &persons {
            if !chance(&mut r, sc.contacts.fraction) {
                continue;
            }
            let dnd = chance(&mut r, 0.05);
            let n = range(&mut r, 1, 3);
            let mut contacts = vec![];
            for _ in 0..n {
                cn += 1;
                let consent = chance(&mut r, sc.contacts.consent_fraction);
                let cid = format!("c{cn}");
                if consent && !dnd {
                    self.consented.insert((p.clone(), cid.clone()));
                }
                self.contact_pairs
                    .entry(p.clone())
                    .or_default()
                    .push(cid.clone());
                contacts.push(FamilyContact {
                    contact_id: cid,
                    name: "家族 連絡先".into(),
                    email: format!("family{cn}@example.jp"),
                    consent,
                    ..Default::default()
                });
            }
            self.push(
                t,
                Ev::Cmd {
                    node: primary,
                    op_id: format!("contacts-{p}"),
                    cmd: Command::PutContacts {
                        person_id: p.clone(),
                        contacts,
                        disclosure: Disclosure {
                            do_not_disclose: dnd,
                            share_shelter: chance(&mut r, 0.8),
                        },
                    },
                    resubmit: false,
                },
            );
            t += 1;
        }
        // Medical profiles.
        let mut profiled = vec![];
        for k in 0..sc.medical.profiles.min(persons.len()) {
            let p = persons[range(&mut r, 0, persons.len() as u64) as usize].clone();
            profiled.push(p.clone());
            self.push(
                t,
                Ev::Cmd {
                    node: primary,
                    op_id: format!("medical-{k}"),
                    cmd: Command::PutMedical {
                        person_id: p,
                        update: MedicalUpdate {
                            blood_type: Some(BloodType::AbNeg),
                            consent: Some(ConsentBasis::Consented),
                            add: vec![(MedicalSection::Allergy, "ペニシリン".into())],
                            ..Default::default()
                        },
                    },
                    resubmit: false,
                },
            );
            t += 1;
        }
        // Arrivals: shelters open over time; each desk takes 110-140 an hour.
        let start = sc.warmup_ms();
        let end = sc.chaos_end_ms();
        let spread = (sc.arrivals.open_spread_hours * 3_600_000.0) as u64;
        let mut order: Vec<usize> = (0..households.len()).collect();
        for i in (1..order.len()).rev() {
            let j = range(&mut r, 0, i as u64 + 1) as usize;
            order.swap(i, j);
        }
        let desks = sc.arrivals.desks_per_shelter.max(1);
        let mut desk_next: BTreeMap<(usize, usize), u64> = BTreeMap::new();
        let mut desk_gap: BTreeMap<(usize, usize), u64> = BTreeMap::new();
        let opens: Vec<u64> = shelters
            .iter()
            .map(|_| start + range(&mut r, 0, spread.max(1)))
            .collect();
        if let Some(lead) = sc.nodes.join_before_open_hours {
            let lead_ms = (lead * 3_600_000.0) as u64;
            for (k, &s) in shelters.iter().enumerate() {
                let at = opens[k].saturating_sub(lead_ms);
                self.nodes[s].join_at_ms = at;
                self.push(at, Ev::Reconnect);
            }
        }
        let mut arrived = 0usize;
        for (n, &h) in order.iter().enumerate() {
            if arrived >= sc.arrivals.evacuees {
                break;
            }
            let k = range(&mut r, 0, shelters.len() as u64) as usize;
            let d = n % desks;
            let gap = *desk_gap.entry((k, d)).or_insert_with(|| {
                let rate = range(
                    &mut r,
                    sc.arrivals.per_desk_hour[0] as u64,
                    sc.arrivals.per_desk_hour[1] as u64 + 1,
                );
                3_600_000 / rate
            });
            let next = desk_next.entry((k, d)).or_insert(opens[k]);
            let at = *next;
            *next += gap;
            if at >= end {
                continue;
            }
            let hh = &households[h];
            arrived += hh.members.len();
            let ids: Vec<String> = hh.members.iter().map(|m| m.person_id.clone()).collect();
            let node = shelters[k];
            let op = format!("ci-{}", hh.household_id);
            let cmd = Command::CheckIn {
                person_ids: ids.clone(),
                shelter_id: None,
            };
            self.push(
                at,
                Ev::Cmd {
                    node,
                    op_id: op.clone(),
                    cmd: cmd.clone(),
                    resubmit: false,
                },
            );
            if chance(&mut r, sc.arrivals.double_submit_fraction) {
                self.push(
                    at + range(&mut r, 100, 10_000),
                    Ev::Cmd {
                        node,
                        op_id: op,
                        cmd: cmd.clone(),
                        resubmit: true,
                    },
                );
            }
            if shelters.len() > 1 && chance(&mut r, sc.arrivals.double_checkin_fraction) {
                let k2 =
                    (k + 1 + range(&mut r, 0, shelters.len() as u64 - 1) as usize) % shelters.len();
                self.push(
                    at,
                    Ev::Cmd {
                        node: shelters[k2],
                        op_id: format!("ci2-{}", hh.household_id),
                        cmd,
                        resubmit: false,
                    },
                );
            }
            if chance(&mut r, sc.arrivals.checkout_fraction) {
                let out = at + range(&mut r, 60_000, (end - at).max(60_001));
                if out < end {
                    self.push(
                        out,
                        Ev::Cmd {
                            node,
                            op_id: format!("co-{}", hh.household_id),
                            cmd: Command::CheckOut {
                                person_ids: ids,
                                shelter_id: None,
                            },
                            resubmit: false,
                        },
                    );
                }
            }
        }
        // Medical reads by ambulances during the chaos phase.
        let ambulances = self.idx(Role::Ambulance);
        if !ambulances.is_empty() && !profiled.is_empty() {
            for k in 0..sc.medical.reads {
                let a = ambulances[range(&mut r, 0, ambulances.len() as u64) as usize];
                let p = profiled[range(&mut r, 0, profiled.len() as u64) as usize].clone();
                self.push(
                    range(&mut r, start, end),
                    Ev::Cmd {
                        node: a,
                        op_id: format!("read-{k}"),
                        cmd: Command::ReadMedical {
                            person_id: p,
                            reason: "搬送中".into(),
                            break_glass: chance(&mut r, 0.1),
                        },
                        resubmit: false,
                    },
                );
            }
        }
    }

    /// Peacetime provisioning: every other node starts from a store holding
    /// exactly the registry and shelter documents of `from` (changes, heads
    /// and query rows, committed through the `Store` interface), then opens
    /// its engine on it as a freshly installed node would. The copies share
    /// memory until a node writes.
    fn provision(&mut self, from: usize) {
        let src = &self.nodes[from]
            .engine
            .as_ref()
            .expect("hq is up")
            .store()
            .mem;
        let everyone = |k: &DocKey| matches!(k.kind, Kind::Registry | Kind::Shelter);
        let batch = Batch {
            changes: src
                .log
                .iter()
                .filter(|c| everyone(&c.key))
                .map(|c| c.record())
                .collect(),
            docs: src
                .docs
                .iter()
                .filter(|(k, _)| everyone(k))
                .map(|(k, (heads, _, _))| DocState {
                    key: k.clone(),
                    heads: heads.clone(),
                    // Loading replays the document's changes.
                    snapshot: None,
                })
                .collect(),
            projections: src
                .projections
                .iter()
                .filter(|(k, _)| everyone(k))
                .map(|(k, p)| (k.clone(), p.clone()))
                .collect(),
            ..Default::default()
        };
        let mut template = self.new_store();
        template
            .commit(&batch)
            .expect("memory stores accept every batch");
        let mut index = None;
        for i in (0..self.nodes.len()).filter(|&i| i != from) {
            let now = Self::node_now(&self.nodes[i], self.now);
            let cfg = self.nodes[i].cfg.clone();
            let e = self
                .open(template.clone(), &cfg, now, index.clone())
                .expect("fresh store opens");
            // Every copy holds the same documents: one index, shared.
            index.get_or_insert_with(|| e.doc_index());
            self.nodes[i].engine = Some(e);
        }
    }

    fn build_faults(&mut self) {
        let start = self.sc.warmup_ms();
        let end = self.sc.chaos_end_ms();
        let m = self.mix.clone();
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
                    _ => {
                        let hq = self.hq[range(r, 0, self.hq.len() as u64) as usize];
                        evs.push((at, Fault::CrashDuringMail(hq)));
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

    fn node_now(n: &Node, t: u64) -> Now {
        let wall = (T0_WALL_MS as i64 + t as i64 + n.skew_ms).max(0) as u64;
        Now {
            wall_ms: wall,
            mono_ms: t,
            wall_trusted: n.skew_ms.abs() < 60_000,
        }
    }

    fn hash_input(&mut self, i: usize, input: &Input) {
        self.hasher.update(&self.now.to_le_bytes());
        self.hasher.update(&(i as u64).to_le_bytes());
        match input {
            Input::Frame { session, bytes } => {
                self.hasher.update(&session.to_le_bytes());
                self.hasher.update(bytes);
            }
            Input::Command { op_id, .. } => {
                self.hasher.update(b"cmd");
                self.hasher.update(op_id.as_bytes());
            }
            other => {
                self.hasher.update(format!("{other:?}").as_bytes());
            }
        }
    }

    /// Hands one input to node `i` and carries out its outputs.
    fn input(&mut self, i: usize, input: Input) -> Vec<Output> {
        if self.nodes[i].engine.is_none() {
            return vec![];
        }
        self.hash_input(i, &input);
        let now = Self::node_now(&self.nodes[i], self.now);
        let node = &mut self.nodes[i];
        let engine = node.engine.as_mut().expect("checked");
        let outs = engine.handle(input, now, &mut node.rng);
        for o in &outs {
            match o {
                Output::Send { session, bytes } => {
                    self.hasher.update(&session.to_le_bytes());
                    self.hasher.update(bytes);
                }
                Output::Reply { op_id, result } => {
                    self.hasher.update(op_id.as_bytes());
                    self.hasher.update(format!("{result:?}").as_bytes());
                }
                Output::SendMail(m) => {
                    self.hasher.update(m.message_id.as_bytes());
                }
                Output::Close { session, .. } => {
                    self.hasher.update(&session.to_le_bytes());
                }
                _ => {}
            }
        }
        let mut rest = vec![];
        for o in outs {
            match o {
                Output::Send { session, bytes } => self.send(i, session, bytes),
                Output::Close { session, .. } => {
                    let (l, gen, _) = sid_parts(session);
                    if l < self.links.len() && self.links[l].gen == gen {
                        self.disconnect(l);
                    }
                }
                Output::SendMail(req) => self.send_mail(i, req),
                other => rest.push(other),
            }
        }
        rest
    }

    // ----- network ----------------------------------------------------------

    fn allowed(&self, l: usize) -> bool {
        let k = &self.links[l];
        let (a, b) = (&self.nodes[k.a], &self.nodes[k.b]);
        a.engine.is_some()
            && b.engine.is_some()
            && self.now >= a.join_at_ms.max(b.join_at_ms)
            && !self.blocked.contains(&(k.a, k.b))
            && !self.blocked.contains(&(k.b, k.a))
    }

    fn connect(&mut self, l: usize) {
        let k = &mut self.links[l];
        k.connecting = false;
        if k.up {
            return;
        }
        if !self.allowed(l) {
            return;
        }
        let k = &mut self.links[l];
        k.up = true;
        k.broken = false;
        k.gen += 1;
        let (a, b, gen) = (k.a, k.b, k.gen);
        k.last_arrival = [self.now; 2];
        k.busy_until = [self.now; 2];
        let (na, ra) = (self.nodes[a].id.clone(), self.nodes[a].role);
        let (nb, rb) = (self.nodes[b].id.clone(), self.nodes[b].role);
        self.input(
            a,
            Input::Connected {
                session: sid(l, gen, 0),
                node: nb,
                role: rb,
                initiator: true,
            },
        );
        self.input(
            b,
            Input::Connected {
                session: sid(l, gen, 1),
                node: na,
                role: ra,
                initiator: false,
            },
        );
    }

    fn disconnect(&mut self, l: usize) {
        if !self.links[l].up {
            return;
        }
        self.links[l].up = false;
        let (a, b, gen) = (self.links[l].a, self.links[l].b, self.links[l].gen);
        self.input(
            a,
            Input::Disconnected {
                session: sid(l, gen, 0),
            },
        );
        self.input(
            b,
            Input::Disconnected {
                session: sid(l, gen, 1),
            },
        );
        self.links[l].connecting = true;
        let back = self.now + range(&mut self.net_rng, 1_000, 10_000);
        self.push(back, Ev::Reconnect);
    }

    fn send(&mut self, from: usize, session: SessionId, bytes: Vec<u8>) {
        let (l, gen, side) = sid_parts(session);
        if l >= self.links.len() || self.links[l].gen != gen || !self.links[l].up {
            return;
        }
        let to = if side == 0 {
            self.links[l].b
        } else {
            self.links[l].a
        };
        debug_assert_eq!(
            from,
            if side == 0 {
                self.links[l].a
            } else {
                self.links[l].b
            }
        );
        self.summary.frames += 1;
        self.summary.bytes += bytes.len() as u64;
        // Checks on every frame: policy and Individual Numbers.
        let frame = wire::decode(&bytes).ok();
        if let Some(f) = &frame {
            let to_id = self.nodes[to].id.clone();
            for v in check::role_leak(&to_id, self.nodes[to].role, f, self.now) {
                self.violate(v);
            }
        }
        if check::individual_numbers(&bytes) > 0 {
            let v = check::v(
                check::INDIVIDUAL_NUMBER_LEAK,
                self.now,
                format!(
                    "frame from {} carries an Individual Number",
                    self.nodes[from].id
                ),
            );
            self.violate(v);
        }
        let is_changes = matches!(frame, Some(Frame::Changes { .. }));
        let dir = side as usize;
        let (_, bw) = self.links[l].profile.params();
        let chaos = !self.healed;
        let k = &mut self.links[l];
        let tx = (bytes.len() as f64 / bw).ceil() as u64;
        let start = self.now.max(k.busy_until[dir]);
        k.busy_until[dir] = start + tx;
        let mut delay = k.rtt_ms / 2;
        if chaos && k.clog_until > self.now {
            delay *= k.clog_factor;
        }
        let mut arrive = k.busy_until[dir] + delay;
        let rtt = k.rtt_ms;
        let r = &mut self.net_rng;
        if chaos && self.mix.loss > 0.0 {
            // Lost packets are retransmitted by the transport; now and
            // then a connection breaks instead.
            while chance(r, self.mix.loss) {
                arrive += rtt.max(20) * 2;
                *self
                    .summary
                    .faults_injected
                    .entry("loss".into())
                    .or_default() += 1;
            }
            if chance(r, self.mix.loss * 0.02) {
                *self
                    .summary
                    .faults_injected
                    .entry("connection_drop".into())
                    .or_default() += 1;
                self.links[l].broken = true;
                self.push(arrive, Ev::Timeout(l));
                return;
            }
        }
        // A session is an ordered, reliable stream (QUIC): its own frames
        // always arrive in order. Reordering and duplication (C-7, C-8) are
        // modelled as stray copies of a frame's changes arriving at another
        // time, as if over a second path; the copies claim no log position.
        let k = &mut self.links[l];
        arrive = arrive.max(k.last_arrival[dir]);
        k.last_arrival[dir] = arrive;
        let stray_copy = || match frame.clone() {
            Some(Frame::Changes { docs, .. }) if !docs.is_empty() => {
                let f = Frame::Changes { docs, upto: None };
                wire::encode(&f).ok().map(|b| (b, f))
            }
            _ => None,
        };
        let mut copies = Vec::new();
        if chaos && is_changes && self.mix.reorder > 0.0 && chance(r, self.mix.reorder) {
            if let Some(copy) = stray_copy() {
                // Early (changes before their dependencies) or late.
                let early = range(r, 0, 2);
                let at = if early == 0 {
                    self.now + range(r, 0, rtt / 2 + 1)
                } else {
                    arrive + range(r, 0, 2 * rtt + 50)
                };
                copies.push(("reorder", at, copy));
            }
        }
        if chaos && is_changes && self.mix.duplication > 0.0 && chance(r, self.mix.duplication) {
            if let Some(copy) = stray_copy() {
                copies.push(("duplicate", arrive + range(r, 0, rtt + 20), copy));
            }
        }
        for (what, at, (copy, f)) in copies {
            *self.summary.faults_injected.entry(what.into()).or_default() += 1;
            self.push(
                at,
                Ev::Deliver {
                    link: l,
                    gen,
                    dir: side,
                    bytes: copy,
                    changes: Some(Box::new(f)),
                },
            );
        }
        // The receiver's checks need the changes again: keep them decoded.
        let changes = frame
            .filter(|f| matches!(f, Frame::Changes { .. }))
            .map(Box::new);
        self.push(
            arrive,
            Ev::Deliver {
                link: l,
                gen,
                dir: side,
                bytes,
                changes,
            },
        );
    }

    fn deliver(
        &mut self,
        l: usize,
        gen: u32,
        dir: u8,
        bytes: Vec<u8>,
        changes: Option<Box<Frame>>,
    ) {
        let k = &self.links[l];
        if !k.up || k.gen != gen || k.broken {
            return;
        }
        let (from, to) = if dir == 0 { (k.a, k.b) } else { (k.b, k.a) };
        if self.blocked.contains(&(from, to)) {
            // A blocked direction breaks the stream: a later frame never
            // overtakes a lost one.
            self.links[l].broken = true;
            return;
        }
        let session = sid(l, gen, 1 - dir);
        let open = self.nodes[to]
            .engine
            .as_ref()
            .is_some_and(|e| e.has_session(session));
        let changes_frame = changes.filter(|_| open);
        let rest = self.input(to, Input::Frame { session, bytes });
        if let Some(f) = changes_frame {
            self.check_received(from, to, session, &f, &rest);
        }
        self.after_outputs(to, rest, None);
    }

    /// `check::received_changes` for a `Changes` frame an open session
    /// took without objecting: unless the receiver flagged the peer or closed
    /// the session (a failed commit), every change it may hold is stored,
    /// including changes that arrived before their dependencies (C-8: queued,
    /// never dropped), and a cursor it carried was stored with them.
    fn check_received(
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
        if rest
            .iter()
            .any(|o| matches!(o, Output::Event(UiEvent::PeerViolation { .. })))
        {
            return;
        }
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
            |k, h| !crdt::policy::may_hold(role, id, k) || mem.hashes.contains(h),
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

    fn send_mail(&mut self, hq: usize, req: MailRequest) {
        let pair = (req.person_id.clone(), req.contact_id.clone());
        let consented = self.consented.contains(&pair);
        if let Some(prev) = self.last_sender.insert(pair.clone(), hq) {
            if prev != hq {
                // Another HQ took the claim over: the first outcome may be unknown.
                self.ledger.on_unknown(&pair.0, &pair.1);
            }
        }
        for v in self.ledger.on_send(&req, consented, self.now) {
            self.violate(v);
        }
        let r = &mut self.smtp_rng;
        let chaos = !self.healed;
        let delay = range(r, 50, 3_000);
        let (outcome, accepted) = if chaos && self.now < self.smtp_down_until {
            (MailOutcome::Transient("connection refused".into()), false)
        } else if chaos && chance(r, self.mix.smtp_indeterminate) {
            (
                MailOutcome::Indeterminate("connection lost after DATA".into()),
                chance(r, 0.5),
            )
        } else if chaos && chance(r, self.mix.smtp_transient) {
            (MailOutcome::Transient("451 try again later".into()), false)
        } else if chaos && chance(r, self.mix.smtp_permanent) {
            (MailOutcome::Permanent("550 no such user".into()), false)
        } else {
            (MailOutcome::Sent, true)
        };
        self.mail_inflight
            .entry(hq)
            .or_default()
            .insert(req.message_id.clone(), pair);
        let epoch = self.nodes[hq].epoch;
        if self.nodes[hq].crash_after_mail {
            self.nodes[hq].crash_after_mail = false;
            // The HQ dies while the server works on the message.
            let down = range(&mut self.fault_rng, 1_000, 300_000);
            self.push(self.now + delay / 2, Ev::Fault(Fault::Crash(hq, down)));
        }
        self.push(
            self.now + delay,
            Ev::MailResp {
                hq,
                epoch,
                req,
                outcome,
                accepted,
            },
        );
    }

    fn mail_resp(
        &mut self,
        hq: usize,
        epoch: u32,
        req: MailRequest,
        outcome: MailOutcome,
        accepted: bool,
    ) {
        if let Some(m) = self.mail_inflight.get_mut(&hq) {
            m.remove(&req.message_id);
        }
        let (p, c) = (req.person_id.clone(), req.contact_id.clone());
        if matches!(outcome, MailOutcome::Indeterminate(_)) {
            self.ledger.on_unknown(&p, &c);
        }
        if matches!(outcome, MailOutcome::Permanent(_)) {
            self.ledger.on_permanent(&p, &c);
        }
        if accepted {
            self.summary.mails_accepted += 1;
            for v in self.ledger.on_accept(&p, &c, self.now) {
                self.violate(v);
            }
        }
        if self.nodes[hq].epoch != epoch || self.nodes[hq].engine.is_none() {
            return;
        }
        let rest = self.input(
            hq,
            Input::MailOutcome {
                message_id: req.message_id,
                outcome,
            },
        );
        self.after_outputs(hq, rest, None);
    }

    // ----- commands ---------------------------------------------------------

    fn command(&mut self, i: usize, op_id: String, cmd: Command, resubmit: bool) {
        if self.nodes[i].engine.is_none() {
            return;
        }
        self.summary.commands += 1;
        let track = match &cmd {
            Command::CheckIn { person_ids, .. } | Command::CheckOut { person_ids, .. } => {
                person_ids
                    .first()
                    .and_then(|p| self.household_of.get(p))
                    .and_then(|h| DocKey::new(Kind::Presence, h.clone()).ok())
            }
            _ => None,
        };
        let is_checkin = matches!(cmd, Command::CheckIn { .. });
        let persons: Vec<String> = match &cmd {
            Command::CheckIn { person_ids, .. } => person_ids.clone(),
            _ => vec![],
        };
        let rest = self.input(
            i,
            Input::Command {
                op_id: op_id.clone(),
                operator: Operator("sim-operator".into()),
                cmd,
            },
        );
        let mut wrote = false;
        for o in &rest {
            if let Output::Reply { result, .. } = o {
                match result {
                    Ok(reply) => {
                        wrote = true;
                        if resubmit {
                            if let Some(first) = self.first_replies.get(&op_id) {
                                if let Some(v) = check::replay_reply(&op_id, first, reply, self.now)
                                {
                                    self.violate(v);
                                }
                            }
                        } else {
                            self.first_replies.insert(op_id.clone(), reply.clone());
                        }
                        match reply {
                            Reply::Presence { event_ids, .. } => {
                                if let Some(k) = &track {
                                    for e in event_ids {
                                        self.nodes[i].acked.insert(e.clone(), k.clone());
                                        self.summary.acked_writes += 1;
                                    }
                                }
                                if is_checkin {
                                    self.true_arrivals.extend(persons.iter().cloned());
                                }
                            }
                            Reply::Medical { audit_seq, .. } => {
                                self.nodes[i].reads.push(*audit_seq);
                                self.summary.acked_writes += 1;
                            }
                            _ => {}
                        }
                    }
                    Err(_) => self.summary.commands_failed += 1,
                }
            }
        }
        self.after_outputs(i, rest, Some(wrote));
    }

    fn after_outputs(&mut self, i: usize, _rest: Vec<Output>, acked: Option<bool>) {
        if acked == Some(true) && self.nodes[i].crash_after_ack && !self.healed {
            self.nodes[i].crash_after_ack = false;
            let down = range(&mut self.fault_rng, 1_000, 120_000);
            self.crash(i, down);
        }
    }

    // ----- faults -----------------------------------------------------------

    fn count(&mut self, what: &str) {
        *self.summary.faults_injected.entry(what.into()).or_default() += 1;
    }

    fn crash(&mut self, i: usize, down_ms: u64) {
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

    fn restart(&mut self, i: usize) {
        let Some(store) = self.nodes[i].parked.take() else {
            return;
        };
        let now = Self::node_now(&self.nodes[i], self.now);
        match self.open(store, &self.nodes[i].cfg, now, None) {
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

    fn check_node_durability(&mut self, i: usize) {
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

    fn fault(&mut self, f: Fault) {
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

    /// Docs both nodes may hold, grouped by which nodes are linked.
    /// Groups of holders of `key` connected by links between holders
    /// (links never change; only their up/down state does). They depend on
    /// the key only through its kind and, for audit documents, whose.
    fn groups_of(&mut self, key: &DocKey) -> &[Vec<usize>] {
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
    fn replicas_agree(&mut self) -> bool {
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
    fn rows_agree(&mut self) -> bool {
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
    fn convergence_violations(&mut self) -> Vec<Violation> {
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

    /// Presence documents at every node: no double counting, conflicts shown.
    fn presence_checks(&mut self) {
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

    fn hq_known_arrivals(&self) -> u64 {
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

    fn periodic_check(&mut self) {
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

    fn reconnect(&mut self) {
        for l in 0..self.links.len() {
            if !self.links[l].up && self.allowed(l) {
                self.connect(l);
            }
        }
    }

    fn heal(&mut self) {
        self.healed = true;
        self.blocked.clear();
        self.smtp_down_until = 0;
        for k in &mut self.links {
            k.clog_until = 0;
        }
        for i in 0..self.nodes.len() {
            self.nodes[i].crash_after_ack = false;
            self.nodes[i].crash_after_mail = false;
            if self.nodes[i].engine.is_none() {
                self.restart(i);
            }
        }
        self.push(self.now, Ev::Reconnect);
    }

    /// Documents each node holds (`None` while it is down).
    pub fn doc_counts(&self) -> Vec<Option<usize>> {
        self.nodes
            .iter()
            .map(|n| n.engine.as_ref().map(|e| e.doc_count()))
            .collect()
    }

    /// Runs until the end of the scenario, until `deadline` (wall clock) or
    /// until the process's resident memory passes `max_rss` bytes; the
    /// summary says which (`stopped`) and how far it got.
    pub fn run(&mut self, deadline: Option<std::time::Instant>) -> Summary {
        let started = std::time::Instant::now();
        let mut end = self.sc.total_ms();
        let hard_end = end + 600 * self.sc.tick_ms;
        let mut steps = 0u64;
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
                } => self.deliver(link, gen, dir, bytes, changes),
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
                Ev::Timeout(l) => {
                    self.count("session_timeout");
                    self.disconnect(l);
                }
                Ev::Reconnect => self.reconnect(),
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

    fn add_stats(&mut self, st: &crdt::engine::Stats) {
        self.summary.changes_new += st.changes_applied;
        self.summary.changes_already_held += st.changes_known;
    }

    fn finish(&mut self, finished: bool, started: std::time::Instant) -> Summary {
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
            self.summary.converged = conv.is_empty();
            for v in conv.into_iter().take(5) {
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
}

/// VmHWM from /proc/self/status, in bytes (0 where unavailable).
/// The holders of `key` (nodes whose role may hold it), grouped into
/// components over the links between holders.
fn holder_groups(nodes: &[Node], links: &[Link], key: &DocKey) -> Vec<Vec<usize>> {
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

/// A `/proc` status line in bytes (0 when unavailable).
fn proc_kib(file: &str, field: &str) -> u64 {
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

fn rss() -> u64 {
    proc_kib("/proc/self/status", "VmRSS:")
}

/// Physical memory of this machine in bytes (0 when unknown).
pub fn memory_total() -> u64 {
    proc_kib("/proc/meminfo", "MemTotal:")
}
