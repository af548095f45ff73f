//! Storage faults against the real store and engine: the
//! node's [`SqliteStore`] driven by its [`Driver`] opens its database
//! through `faultvfs`, an SQLite VFS over the unix VFS that can cut the
//! power (discard every write not made durable by a sync), fail the n-th
//! I/O call, or report a full disk.
//!
//! The power-cut harness runs a seeded check-in and medical-update
//! workload; at a seeded random I/O call of each boot the power goes, the
//! files are reset to what a power loss could leave, and the store is
//! reopened and checked: `integrity_check` ok, every acknowledged write
//! present, every unacknowledged one wholly present or wholly absent (its
//! op id recorded exactly when its effect is there). The same harness
//! with `synchronous=OFF` must lose acknowledged writes: that proves it can
//! fail.
//!
//! Corruption is in [`corruption`]: damaged copies of a
//! real store, targeted and by random bit flips.
//!
//! Replay and soak: `KIZUNA_POWERCUT_SEED` fixes the seed (a failure
//! prints it), `KIZUNA_POWERCUT_POINTS` sets the number of cuts (100 in
//! CI; the release soak runs 1,000, see the README's reliability section).

mod corruption;
use crdt::api::{Command, CommandError, MedicalUpdate, Operator, Reply};
use crdt::engine::EngineConfig;
use crdt::model::{BloodType, Household, MedicalSection, Member, ShelterInfo};
use crdt::store::{LocationStatus, Store, StoreError};
use crdt::{DocKey, Kind, NodeId, Role};
use faultvfs::FaultVfs;
use node::driver::{Driver, DriverHandle};
use node::store::{OpenOptions, SqliteStore, DB_FILE_NAME};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    rng.next_u64() % n.max(1)
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn operator() -> Operator {
    Operator("faults".into())
}

const SHELTERS: [&str; 2] = ["s-01", "s-02"];
const PER_HOUSEHOLD: usize = 3;

fn person(i: usize) -> String {
    format!("p{i:07}")
}

/// Seeds an hq store (through `opts`) with `persons` registry persons and
/// two shelters, then closes it cleanly.
fn seed(db: &Path, opts: &OpenOptions, persons: usize) {
    let store = SqliteStore::open_with(db, opts).unwrap();
    let d = Driver::start(store, config()).unwrap();
    let households: Vec<Household> = (0..persons.div_ceil(PER_HOUSEHOLD))
        .map(|h| Household {
            household_id: format!("h{h:06}"),
            address: "三条市".into(),
            members: (0..PER_HOUSEHOLD)
                .map(|m| Member {
                    person_id: person(h * PER_HOUSEHOLD + m),
                    name: "山田 太郎".into(),
                    kana: "ヤマダ タロウ".into(),
                    birth_date: "1970-01-01".into(),
                    card_user_id: None,
                })
                .collect(),
        })
        .collect();
    for (i, chunk) in households.chunks(2_000).enumerate() {
        let r = d
            .command_blocking(
                format!("seed-{i}"),
                operator(),
                Command::ImportHouseholds {
                    households: chunk.to_vec(),
                },
            )
            .unwrap();
        assert!(matches!(r, Reply::Imported { .. }), "{r:?}");
    }
    for s in SHELTERS {
        d.command_blocking(
            format!("shelter-{s}"),
            operator(),
            Command::PutShelter {
                shelter: ShelterInfo {
                    shelter_id: s.into(),
                    name: "体育館".into(),
                    capacity: 100_000,
                    ..Default::default()
                },
            },
        )
        .unwrap();
    }
    drop(d.shutdown().unwrap());
}

fn config() -> EngineConfig {
    EngineConfig::for_tests(NodeId::new("hq-1").unwrap(), Role::Hq)
}

/// What one command was meant to do.
#[derive(Clone, Debug)]
enum Effect {
    CheckIn { person: String, shelter: String },
    Medical { person: String, text: String },
}

impl Effect {
    /// Whether the effect is in the store (wholly: the location row with
    /// the right shelter, or the entry text in the loaded document).
    fn present(&self, s: &SqliteStore) -> Result<bool, StoreError> {
        match self {
            Effect::CheckIn { person, shelter } => Ok(s
                .location(person)?
                .is_some_and(|l| l.status == LocationStatus::In && l.shelter_id == *shelter)),
            Effect::Medical { person, text } => Ok(medical_texts(s, person)?.contains(text)),
        }
    }
}

/// Every entry text of `person`'s medical document as stored, rebuilt
/// from the stored snapshot and changes (not from any engine cache).
fn medical_texts(s: &SqliteStore, person: &str) -> Result<BTreeSet<String>, StoreError> {
    let key = DocKey::new(Kind::Medical, person).unwrap();
    let Some(stored) = s.load_doc(&key)? else {
        return Ok(BTreeSet::new());
    };
    let doc = crdt::doc::Doc::load(key, stored.snapshot.as_deref(), &stored.changes)
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let view = crdt::views::medical(&doc).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(view
        .sections
        .values()
        .flatten()
        .map(|e| e.text.clone())
        .collect())
}

/// The seeded workload and what it has been told.
struct Workload {
    rng: ChaCha8Rng,
    persons: usize,
    next_person: usize,
    next_op: usize,
    /// Acknowledged: op id → effect.
    acked: BTreeMap<String, Effect>,
    /// Sent, answered with an error (the power went): op id → effect.
    unacked: BTreeMap<String, Effect>,
}

impl Workload {
    /// The next command: a check-in of a person never checked in before
    /// (so "present" is unambiguous) or a medical entry for a random
    /// person, half and half.
    fn next(&mut self) -> (String, Command, Effect) {
        self.next_op += 1;
        let n = self.next_op;
        if below(&mut self.rng, 2) == 0 && self.next_person < self.persons {
            let p = person(self.next_person);
            self.next_person += 1;
            let s = SHELTERS[below(&mut self.rng, 2) as usize].to_string();
            (
                format!("ck-{n}"),
                Command::CheckIn {
                    person_ids: vec![p.clone()],
                    shelter_id: Some(s.clone()),
                },
                Effect::CheckIn {
                    person: p,
                    shelter: s,
                },
            )
        } else {
            let p = person(below(&mut self.rng, self.persons as u64) as usize);
            let text = format!("allergy note {n}");
            (
                format!("md-{n}"),
                Command::PutMedical {
                    person_id: p.clone(),
                    update: MedicalUpdate {
                        blood_type: Some(BloodType::APos),
                        add: vec![(MedicalSection::Allergy, text.clone())],
                        ..Default::default()
                    },
                },
                Effect::Medical { person: p, text },
            )
        }
    }
}

/// What a harness run saw.
#[derive(Debug, Default)]
struct Outcome {
    cuts: u64,
    boots: u64,
    acked: usize,
    unacked: usize,
    unsynced_writes_discarded: usize,
    io_calls: u64,
    /// Problems found after a cut, in order (empty = the store kept its
    /// promises).
    problems: Vec<String>,
}

/// Checks the store after a cut or a clean stop; returns the problems.
fn verify(db: &Path, opts: &OpenOptions, w: &Workload) -> Vec<String> {
    let s = match SqliteStore::open_with(db, opts) {
        Ok(s) => s,
        Err(e) => return vec![format!("reopen failed: {e}")],
    };
    let mut problems = Vec::new();
    match s.integrity_check() {
        Ok(r) if r == "ok" => {}
        r => problems.push(format!("integrity_check: {r:?}")),
    }
    match s.quarantined() {
        Ok(q) if q.is_empty() => {}
        q => problems.push(format!("quarantined: {q:?}")),
    }
    for (op, e) in &w.acked {
        let recorded = s.op_result(op).map(|r| r.is_some());
        let present = e.present(&s);
        if !matches!((&recorded, &present), (Ok(true), Ok(true))) {
            problems.push(format!(
                "acknowledged {op} lost: op recorded {recorded:?}, effect present {present:?}"
            ));
        }
    }
    for (op, e) in &w.unacked {
        let recorded = s.op_result(op).map(|r| r.is_some());
        let present = e.present(&s);
        match (&recorded, &present) {
            (Ok(a), Ok(b)) if a == b => {}
            _ => problems.push(format!(
                "unacknowledged {op} is partial: op recorded {recorded:?}, effect present {present:?}"
            )),
        }
    }
    problems
}

/// Runs boots until `points` power cuts have happened. Each boot opens the
/// store and the engine, arms a cut at a random I/O call within `window`
/// calls and sends commands until one fails (the cut) or 40 succeed (a
/// clean stop, no cut). After every boot the store is verified.
fn power_cut_harness(seed: u64, points: u64, no_fsync: bool) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join(DB_FILE_NAME);
    let vfs = FaultVfs::register(&format!("powercut-{seed}-{no_fsync}"));
    let opts = OpenOptions {
        vfs: Some(vfs.name().to_string()),
        no_fsync_for_fault_tests: no_fsync,
        ..OpenOptions::default()
    };
    // One check-in per person per run; medical updates pick anyone.
    let persons = (points as usize * 12).max(300);
    seed_store(&db, &opts, persons, &vfs);
    let mut w = Workload {
        rng: ChaCha8Rng::seed_from_u64(seed),
        persons,
        next_person: 0,
        next_op: 0,
        acked: BTreeMap::new(),
        unacked: BTreeMap::new(),
    };
    let mut out = Outcome::default();
    // I/O calls of one boot: the open (quick_check reads the file), the
    // engine's start, then about 10 per command. Cuts fall anywhere in it.
    let window = 600;
    while out.cuts < points {
        out.boots += 1;
        let at = 1 + below(&mut w.rng, window);
        vfs.arm_cut(at);
        if let Some(d) = boot(&db, &opts, &vfs) {
            for _ in 0..40 {
                let (op, cmd, effect) = w.next();
                match d.command_blocking(op.clone(), operator(), cmd) {
                    Ok(reply) => {
                        check_reply(&effect, &reply);
                        w.acked.insert(op, effect);
                    }
                    Err(e) if vfs.is_dead() && matches!(e, CommandError::Storage(_)) => {
                        w.unacked.insert(op, effect);
                        break;
                    }
                    Err(e) => {
                        // Only a store that lost data (the negative
                        // control) may refuse a valid command.
                        out.problems
                            .push(format!("seed {seed}: {op} failed without a cut: {e}"));
                        break;
                    }
                }
            }
            drop(d.shutdown());
        }
        if vfs.is_dead() {
            out.cuts += 1;
            let rng = &mut w.rng;
            // Half the cuts lose every unsynced write; the others keep a
            // random prefix of each file's unsynced writes.
            let lose_all = below(rng, 2) == 0;
            out.unsynced_writes_discarded += vfs
                .power_cut(&mut |_, n| {
                    if lose_all {
                        0
                    } else {
                        below(rng, n as u64 + 1) as usize
                    }
                })
                .unwrap();
        } else {
            vfs.disarm();
        }
        let p = verify(&db, &opts, &w);
        if !p.is_empty() {
            out.problems.push(format!(
                "after cut {} (boot {}, cut at I/O call {at}): {}",
                out.cuts,
                out.boots,
                p.join("; ")
            ));
        }
        if !out.problems.is_empty() {
            break;
        }
    }
    out.acked = w.acked.len();
    out.unacked = w.unacked.len();
    out.io_calls = vfs.stats().io_calls;
    out
}

/// Seeds through the VFS (unarmed), so the seed's files are tracked too.
fn seed_store(db: &Path, opts: &OpenOptions, persons: usize, vfs: &FaultVfs) {
    seed(db, opts, persons);
    // Nothing armed: a "cut" here only makes the seeded state the durable
    // baseline, exactly as the files are.
    assert!(!vfs.is_dead());
    vfs.power_cut(&mut |_, n| n).unwrap();
}

/// Opens store and engine; `None` if the power went during the open (the
/// error must then be a storage error caused by the cut).
fn boot(db: &Path, opts: &OpenOptions, vfs: &FaultVfs) -> Option<DriverHandle> {
    let store = match SqliteStore::open_with(db, opts) {
        Ok(s) => s,
        Err(e) => {
            assert!(vfs.is_dead(), "open failed without a cut: {e}");
            return None;
        }
    };
    match Driver::start(store, config()) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(vfs.is_dead(), "engine open failed without a cut: {e}");
            None
        }
    }
}

fn check_reply(effect: &Effect, reply: &Reply) {
    match (effect, reply) {
        (Effect::CheckIn { .. }, Reply::Presence { event_ids, .. }) => {
            assert_eq!(event_ids.len(), 1, "{reply:?}")
        }
        (Effect::Medical { .. }, Reply::Done) => {}
        _ => panic!("unexpected reply {reply:?} for {effect:?}"),
    }
}

/// power cuts at 100 random moments (seeded) of a check-in and
/// medical-update workload lose no acknowledged write and leave no
/// partial one; `integrity_check` stays ok.
#[test]
fn power_cuts_lose_no_acknowledged_write() {
    let seed = env_u64("KIZUNA_POWERCUT_SEED", 0x6b697a75);
    let points = env_u64("KIZUNA_POWERCUT_POINTS", 100);
    let out = power_cut_harness(seed, points, false);
    eprintln!(
        "power cuts: {} cuts over {} boots, {} acknowledged writes checked after every cut, \
         {} unacknowledged, {} unsynced writes discarded, {} I/O calls (seed {seed:#x}, \
         replay with KIZUNA_POWERCUT_SEED={seed})",
        out.cuts, out.boots, out.acked, out.unacked, out.unsynced_writes_discarded, out.io_calls
    );
    assert!(
        out.problems.is_empty(),
        "seed {seed}: {}",
        out.problems.join("\n")
    );
    assert_eq!(out.cuts, points);
    // The cuts must have hit commits, not only idle moments: some
    // commands were cut mid-flight and many were acknowledged. About half
    // the cuts land in a command; the rest land in a boot (open, engine
    // start) or in the engine's own I/O, whose timing varies from run to
    // run, so the bound sits well below half (48 of 100 were seen).
    assert!(out.unacked as u64 >= points / 4, "{out:?}");
    assert!(out.acked as u64 >= points * 2, "{out:?}");
}

/// The negative control: the same harness on a store without fsync
/// (`synchronous=OFF`) must find acknowledged writes lost. If this test
/// fails, the harness cannot tell a durable store from one that is not.
#[test]
fn power_cuts_without_fsync_lose_acknowledged_writes() {
    let seed = env_u64("KIZUNA_POWERCUT_SEED", 0x6b697a75);
    let out = power_cut_harness(seed, 100, true);
    eprintln!("without fsync: {:?}", out.problems.first());
    assert!(
        out.problems
            .iter()
            .any(|p| p.contains("acknowledged") && p.contains("lost")
                || p.contains("reopen failed")
                || p.contains("integrity_check")),
        "seed {seed}: no acknowledged write lost without fsync: {out:?}"
    );
}

/// A-2 needs `synchronous=FULL` (NORMAL may roll back acknowledged
/// commits in WAL mode): the store the node opens runs with FULL, in WAL.
#[test]
fn the_store_runs_with_synchronous_full() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join(DB_FILE_NAME);
    assert!(!OpenOptions::default().no_fsync_for_fault_tests);
    let s = SqliteStore::open(&db).unwrap();
    assert_eq!(
        s.synchronous().unwrap(),
        2,
        "PRAGMA synchronous must be FULL"
    );
    drop(s);
    // And again on an existing file (the path every restart takes).
    let s = SqliteStore::open(&db).unwrap();
    assert_eq!(
        s.synchronous().unwrap(),
        2,
        "PRAGMA synchronous must be FULL"
    );
    let c = rusqlite::Connection::open(&db).unwrap();
    let mode: String = c
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

// ----- I/O faults on every write path (A-7) ---------------------------------

/// The write paths a fault must not corrupt.
#[derive(Clone, Copy, Debug)]
enum WritePath {
    CheckIn,
    MedicalUpdate,
    /// `ReadMedical` appends an audit entry before showing anything.
    AuditAppend,
    ImportBatch,
    /// The headquarters tick claims due family mail (status `sending`)
    /// before the mail request leaves the engine.
    OutboxClaim,
}

/// An engine over the real store, opened through the fault VFS, with a
/// clock and randomness the test controls.
struct Rig {
    dir: tempfile::TempDir,
    vfs: FaultVfs,
    opts: OpenOptions,
    wall_ms: u64,
    rng: ChaCha8Rng,
}

type Eng = crdt::engine::Engine<SqliteStore>;

impl Rig {
    fn new(name: &str, persons: usize) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let vfs = FaultVfs::register(name);
        let opts = OpenOptions {
            vfs: Some(vfs.name().to_string()),
            ..OpenOptions::default()
        };
        seed(&dir.path().join(DB_FILE_NAME), &opts, persons);
        Rig {
            dir,
            vfs,
            opts,
            wall_ms: 1_780_000_000_000,
            rng: ChaCha8Rng::seed_from_u64(7),
        }
    }

    fn db(&self) -> std::path::PathBuf {
        self.dir.path().join(DB_FILE_NAME)
    }

    fn now(&mut self) -> crdt::api::Now {
        self.wall_ms += 1_000;
        crdt::api::Now {
            wall_ms: self.wall_ms,
            mono_ms: self.wall_ms - 1_780_000_000_000,
            wall_trusted: true,
        }
    }

    fn open(&mut self) -> Eng {
        let now = self.now();
        let store = SqliteStore::open_with(&self.db(), &self.opts).unwrap();
        crdt::engine::Engine::open(store, config(), now).unwrap()
    }

    fn run(&mut self, e: &mut Eng, input: crdt::api::Input) -> Vec<crdt::api::Output> {
        let now = self.now();
        e.handle_batch(vec![input], now, &mut self.rng)
    }

    fn command(&mut self, e: &mut Eng, op: &str, cmd: Command) -> Result<Reply, CommandError> {
        let out = self.run(
            e,
            crdt::api::Input::Command {
                op_id: op.into(),
                operator: operator(),
                cmd,
            },
        );
        out.into_iter()
            .find_map(|o| match o {
                crdt::api::Output::Reply { op_id, result } if op_id == op => Some(result),
                _ => None,
            })
            .expect("a reply")
    }
}

fn load_view<T>(
    s: &SqliteStore,
    key: DocKey,
    f: impl Fn(&crdt::doc::Doc) -> Result<T, crdt::doc::DocError>,
) -> Option<T> {
    let stored = s.load_doc(&key).unwrap()?;
    let doc = crdt::doc::Doc::load(key, stored.snapshot.as_deref(), &stored.changes).unwrap();
    Some(f(&doc).unwrap())
}

/// The stored mail state of (person, contact), from the outbox document.
fn stored_mail(s: &SqliteStore, person: &str) -> Option<crdt::model::MailState> {
    load_view(s, DocKey::new(Kind::Outbox, person).unwrap(), |d| {
        crdt::views::outbox(d)
    })
    .and_then(|m| m.get("c1").cloned())
}

/// Ticks (unarmed) until no mail is due, answering every mail request
/// with "sent".
fn settle_mail(rig: &mut Rig, e: &mut Eng) {
    for _ in 0..10 {
        let out = rig.run(e, crdt::api::Input::Tick);
        let ids: Vec<String> = out
            .into_iter()
            .filter_map(|o| match o {
                crdt::api::Output::SendMail(m) => Some(m.message_id),
                _ => None,
            })
            .collect();
        if ids.is_empty() {
            return;
        }
        for message_id in ids {
            rig.run(
                e,
                crdt::api::Input::MailOutcome {
                    message_id,
                    outcome: crdt::api::MailOutcome::Sent,
                },
            );
        }
    }
    panic!("family mail still due after ten ticks");
}

/// What one iteration's act did: acknowledged (with a check of its
/// durable effect) or not.
enum Acted {
    Acked,
    Refused(String),
}

/// Prepares (unarmed) and then runs one write on `path` with op id `op`
/// for fresh subject number `k`; returns what the caller was told and a
/// check of the durable effect that must hold exactly when it was acked.
fn act(
    rig: &mut Rig,
    e: &mut Eng,
    path: WritePath,
    k: usize,
    op: &str,
    fault: (u64, bool),
) -> (Acted, Box<dyn Fn(&SqliteStore) -> bool>, [u8; 32]) {
    assert!(
        k < 1_500,
        "subjects 0..1500 are fresh, 1500.. are for retries"
    );
    let p = person(k);
    let mut digest = [0u8; 32];
    // Takes the content digest, then arms the fault: the last thing
    // before the write under test.
    let mut arm = |rig: &Rig, e: &Eng| {
        digest = e.store().content_digest().unwrap();
        rig.vfs.arm_fault(fault.0, fault.1);
    };
    let told = |r: Result<Reply, CommandError>| match r {
        Ok(_) => Acted::Acked,
        Err(CommandError::Storage(e)) => Acted::Refused(e.to_string()),
        Err(other) => panic!("{path:?} {op}: not a storage error: {other}"),
    };
    let op_recorded = {
        let op = op.to_string();
        move |s: &SqliteStore| s.op_result(&op).unwrap().is_some()
    };
    let (acted, effect): (Acted, Box<dyn Fn(&SqliteStore) -> bool>) = match path {
        WritePath::CheckIn => {
            arm(rig, e);
            let r = rig.command(
                e,
                op,
                Command::CheckIn {
                    person_ids: vec![p.clone()],
                    shelter_id: Some("s-01".into()),
                },
            );
            (
                told(r),
                Box::new(move |s: &SqliteStore| {
                    op_recorded(s)
                        && s.location(&p)
                            .unwrap()
                            .is_some_and(|l| l.status == LocationStatus::In)
                }),
            )
        }
        WritePath::MedicalUpdate => {
            let text = format!("fault note {k}");
            arm(rig, e);
            let r = rig.command(
                e,
                op,
                Command::PutMedical {
                    person_id: p.clone(),
                    update: MedicalUpdate {
                        blood_type: Some(BloodType::BNeg),
                        add: vec![(MedicalSection::Condition, text.clone())],
                        ..Default::default()
                    },
                },
            );
            (
                told(r),
                Box::new(move |s: &SqliteStore| {
                    op_recorded(s) && medical_texts(s, &p).unwrap().contains(&text)
                }),
            )
        }
        WritePath::AuditAppend => {
            rig.command(
                e,
                &format!("{op}-prep"),
                Command::PutMedical {
                    person_id: p.clone(),
                    update: MedicalUpdate {
                        // Consented, so the read is shown (and audited)
                        // without a break-glass grant.
                        consent: Some(crdt::model::ConsentBasis::Consented),
                        add: vec![(MedicalSection::Allergy, format!("audit note {k}"))],
                        ..Default::default()
                    },
                },
            )
            .unwrap();
            arm(rig, e);
            let r = rig.command(
                e,
                op,
                Command::ReadMedical {
                    person_id: p.clone(),
                    reason: "emergency_treatment".into(),
                    break_glass: false,
                },
            );
            let seq = match &r {
                Ok(Reply::Medical { audit_seq, .. }) => Some(*audit_seq),
                _ => None,
            };
            let acted = told(r);
            (
                acted,
                Box::new(move |s: &SqliteStore| {
                    let entries = load_view(
                        s,
                        DocKey::new(Kind::Audit, "hq-1").unwrap(),
                        crdt::views::audit,
                    )
                    .unwrap_or_default();
                    assert!(crdt::views::audit_chain_ok(&entries), "audit chain broken");
                    let read = entries.iter().any(|en| {
                        en.action == "medical_read"
                            && en.record == format!("medical/{p}")
                            && seq.is_none_or(|q| q == en.seq)
                    });
                    // Reads are not recorded as ops (each read is
                    // audited anew): the audit entry is the effect.
                    let _ = &op_recorded;
                    read
                }),
            )
        }
        WritePath::ImportBatch => {
            let texts: Vec<(String, String)> = (0..3)
                .map(|j| (person((k * 3 + j) % 3_000), format!("import note {k}.{j}")))
                .collect();
            let records = crdt::api::ImportRecords::Medical(
                texts
                    .iter()
                    .map(|(p, t)| crdt::api::MedicalProfile {
                        person_id: p.clone(),
                        blood_type: Some(BloodType::OPos),
                        consent: crdt::model::ConsentBasis::Consented,
                        entries: vec![(MedicalSection::Medication, t.clone())],
                    })
                    .collect(),
            );
            arm(rig, e);
            let r = rig.command(e, op, Command::Import { records });
            (
                told(r),
                Box::new(move |s: &SqliteStore| {
                    op_recorded(s)
                        && texts
                            .iter()
                            .all(|(p, t)| medical_texts(s, p).unwrap().contains(t))
                }),
            )
        }
        WritePath::OutboxClaim => {
            // Settle earlier iterations first (unarmed): mail they planned
            // or claimed is sent now and answered, so the armed tick below
            // has exactly this person's mail to claim and the I/O it does
            // stays the same from one iteration to the next.
            settle_mail(rig, e);
            rig.command(
                e,
                &format!("{op}-contacts"),
                Command::PutContacts {
                    person_id: p.clone(),
                    contacts: vec![crdt::model::FamilyContact {
                        contact_id: "c1".into(),
                        name: "家族".into(),
                        email: "family@example.org".into(),
                        consent: true,
                        relation: String::new(),
                        language: String::new(),
                        consent_date: None,
                    }],
                    disclosure: crdt::model::Disclosure {
                        do_not_disclose: false,
                        share_shelter: true,
                    },
                },
            )
            .unwrap();
            rig.command(
                e,
                &format!("{op}-arrive"),
                Command::CheckIn {
                    person_ids: vec![p.clone()],
                    shelter_id: Some("s-02".into()),
                },
            )
            .unwrap();
            arm(rig, e);
            let out = rig.run(e, crdt::api::Input::Tick);
            let sent = out.iter().any(|o| {
                matches!(o, crdt::api::Output::SendMail(m) if m.person_id == p && m.contact_id == "c1")
            });
            let acted = if sent {
                Acted::Acked
            } else {
                Acted::Refused("no mail request".into())
            };
            (
                acted,
                Box::new(move |s: &SqliteStore| {
                    // Claimed: one attempt recorded, in flight; a
                    // restart turns our own claim into "outcome unknown"
                    // (it may have reached the server), still claimed.
                    stored_mail(s, &p).is_some_and(|m| {
                        m.attempts >= 1
                            && matches!(
                                m.status,
                                crdt::model::MailStatus::Sending
                                    | crdt::model::MailStatus::Indeterminate
                            )
                    })
                }),
            )
        }
    };
    (acted, effect, digest)
}

/// Fails I/O call n = 1, 2, … of one write on `path` (once, or from n on
/// for good) until a run completes with no fault left to inject. Every
/// run ends acknowledged with its effect durable (also after a restart),
/// or refused with a storage error and the store's content digest
/// unchanged; then, with the fault gone, the same engine writes again.
/// Returns (iterations, faults injected).
fn io_fault_loop(path: WritePath, persistent: bool) -> (usize, u64) {
    let mut rig = Rig::new(&format!("iofault-{path:?}-{persistent}"), 3_000);
    let mut e = rig.open();
    let mut k = 0;
    let mut faults = 0;
    for n in 1..=5_000u64 {
        k += 1;
        let op = format!("{path:?}-{n}");
        let before_faults = rig.vfs.stats().faults_injected;
        let (acted, effect, digest) = act(&mut rig, &mut e, path, k, &op, (n, persistent));
        rig.vfs.disarm();
        let injected = rig.vfs.stats().faults_injected - before_faults;
        faults += injected;
        let present = effect(e.store());
        match &acted {
            Acted::Acked => assert!(present, "{path:?} n={n}: acknowledged but not stored"),
            Acted::Refused(why) => {
                assert!(
                    injected > 0,
                    "{path:?} n={n}: refused without a fault: {why}"
                );
                assert!(!present, "{path:?} n={n}: refused ({why}) but stored");
                // Bad luck changes nothing. (The outbox tick may durably
                // plan a mail before its claim fails: that is progress,
                // not a partial write, so only the claim is checked.)
                if !matches!(path, WritePath::OutboxClaim) {
                    assert_eq!(
                        e.store().content_digest().unwrap(),
                        digest,
                        "{path:?} n={n}: refused ({why}) but the store changed"
                    );
                }
                // With the fault gone the same engine writes again.
                let again = format!("{op}-again");
                rig.command(
                    &mut e,
                    &again,
                    Command::CheckIn {
                        person_ids: vec![person(1_500 + k)],
                        shelter_id: Some("s-02".into()),
                    },
                )
                .unwrap_or_else(|err| panic!("{path:?} n={n}: no write after the fault: {err}"));
            }
        }
        // A restart sees the same.
        drop(e);
        e = rig.open();
        assert_eq!(
            effect(e.store()),
            present,
            "{path:?} n={n}: a restart changed the outcome"
        );
        assert_eq!(e.store().integrity_check().unwrap(), "ok");
        if injected == 0 {
            assert!(matches!(acted, Acted::Acked), "{path:?} n={n}");
            return (n as usize, faults);
        }
    }
    panic!("{path:?}: still faulting after 5,000 I/O calls");
}

fn io_faults(path: WritePath) {
    for persistent in [false, true] {
        let (runs, faults) = io_fault_loop(path, persistent);
        // The loop must have hit the write: faults injected, and the
        // write needed more than one I/O call to succeed.
        assert!(
            runs > 1 && faults > 0,
            "{path:?}: no fault ever hit the write"
        );
        eprintln!(
            "I/O faults on {path:?} ({}): {runs} runs, {faults} faults injected",
            if persistent { "from n on" } else { "once" }
        );
    }
}

#[test]
fn io_faults_on_check_in() {
    io_faults(WritePath::CheckIn);
}

#[test]
fn io_faults_on_medical_update() {
    io_faults(WritePath::MedicalUpdate);
}

#[test]
fn io_faults_on_audit_append() {
    io_faults(WritePath::AuditAppend);
}

#[test]
fn io_faults_on_import_batch() {
    io_faults(WritePath::ImportBatch);
}

#[test]
fn io_faults_on_outbox_claim() {
    io_faults(WritePath::OutboxClaim);
}

// ----- disk full at the engine (A-6) ----------------------------------------

/// A-6 at the node: with the disk full, a check-in is refused with the
/// storage-full error (and changes nothing), queries still answer, and a
/// peer that connects still receives everything the node holds; once
/// space is freed the same engine, without a restart, writes again and
/// the peer receives the new write too.
#[test]
fn disk_full_refuses_writes_but_reads_and_sync_go_on() {
    use crdt::api::{Input, Output, Query, QueryReply};
    let mut rig = Rig::new("diskfull-engine", 30);
    let mut e = rig.open();
    rig.command(
        &mut e,
        "before",
        Command::CheckIn {
            person_ids: vec![person(0)],
            shelter_id: Some("s-01".into()),
        },
    )
    .unwrap();
    rig.vfs.set_full(true);
    let faults_before = rig.vfs.stats().faults_injected;
    let digest = e.store().content_digest().unwrap();
    // A write: refused, with the error the API shows as 507 storage_full.
    let err = rig
        .command(
            &mut e,
            "while-full",
            Command::CheckIn {
                person_ids: vec![person(1)],
                shelter_id: Some("s-01".into()),
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, CommandError::Storage(StoreError::Full)),
        "{err:?}"
    );
    assert_eq!(err.code(), "storage_full");
    assert_eq!(err.to_string(), "storage full: the write was not saved");
    assert!(
        rig.vfs.stats().faults_injected > faults_before,
        "the disk never said full"
    );
    assert_eq!(e.store().content_digest().unwrap(), digest);
    assert_eq!(e.store().op_result("while-full").unwrap(), None);
    // A second try while still full: refused again, nothing changed.
    assert!(rig
        .command(
            &mut e,
            "while-full",
            Command::CheckIn {
                person_ids: vec![person(1)],
                shelter_id: Some("s-01".into()),
            },
        )
        .is_err());
    assert_eq!(e.store().content_digest().unwrap(), digest);
    // Reads answer.
    let out = rig.run(
        &mut e,
        Input::Query {
            query: Query::Person {
                person_id: person(0),
            },
        },
    );
    let answered = out
        .iter()
        .any(|o| matches!(o, Output::QueryReply(Ok(QueryReply::Person(_)))));
    assert!(answered, "no answer to a read while full: {out:?}");
    // Sync out: a shelter connects and receives the presence documents.
    let now = rig.now();
    let mut shelter = crdt::engine::Engine::open(
        crdt::store::MemStore::new(),
        EngineConfig::for_tests(NodeId::new("s-01").unwrap(), Role::Shelter),
        now,
    )
    .unwrap();
    let (sent, received) = sync(&mut rig, &mut e, &mut shelter, 1);
    assert!(sent > 0 && received > 0, "{sent} {received}");
    assert!(
        shelter
            .store()
            .location(&person(0))
            .unwrap()
            .is_some_and(|l| l.status == LocationStatus::In),
        "the peer did not receive the check-in made before the disk filled"
    );
    assert_eq!(e.store().content_digest().unwrap(), digest);

    // Space freed: the same engine writes again, and the write syncs.
    rig.vfs.set_full(false);
    rig.command(
        &mut e,
        "after",
        Command::CheckIn {
            person_ids: vec![person(2)],
            shelter_id: Some("s-01".into()),
        },
    )
    .unwrap_or_else(|err| panic!("no write after space was freed: {err}"));
    let _ = sync(&mut rig, &mut e, &mut shelter, 3);
    assert!(
        shelter
            .store()
            .location(&person(2))
            .unwrap()
            .is_some_and(|l| l.status == LocationStatus::In),
        "the write after the disk was freed did not sync"
    );
    drop(e);
    let e = rig.open();
    assert_eq!(e.store().integrity_check().unwrap(), "ok");
    assert!(e.store().op_result("after").unwrap().is_some());
}

/// Connects `e` (hq, session `sid` there) and `peer` (session `sid + 1`),
/// carries every frame until quiet, disconnects. Returns frames sent by
/// `e` and by `peer`.
fn sync(
    rig: &mut Rig,
    e: &mut Eng,
    peer: &mut crdt::engine::Engine<crdt::store::MemStore>,
    sid: u64,
) -> (usize, usize) {
    use crdt::api::{Input, Output};
    let mut prng = ChaCha8Rng::seed_from_u64(sid);
    let peer_id = peer.config().node_id.clone();
    let peer_role = peer.config().role;
    let mut queue: std::collections::VecDeque<(bool, Vec<u8>)> = Default::default();
    let push =
        |to_peer: bool, out: Vec<Output>, q: &mut std::collections::VecDeque<(bool, Vec<u8>)>| {
            for o in out {
                if let Output::Send { bytes, .. } = o {
                    q.push_back((to_peer, bytes));
                }
            }
        };
    let out = rig.run(
        e,
        Input::Connected {
            session: sid,
            node: peer_id,
            role: peer_role,
            initiator: true,
        },
    );
    push(true, out, &mut queue);
    let now = rig.now();
    let out = peer.handle(
        Input::Connected {
            session: sid + 1,
            node: NodeId::new("hq-1").unwrap(),
            role: Role::Hq,
            initiator: false,
        },
        now,
        &mut prng,
    );
    push(false, out, &mut queue);
    let (mut by_e, mut by_peer) = (0, 0);
    let mut steps = 0;
    while let Some((to_peer, bytes)) = queue.pop_front() {
        steps += 1;
        assert!(steps < 100_000, "sync does not settle");
        if to_peer {
            by_e += 1;
            let now = rig.now();
            let out = peer.handle(
                Input::Frame {
                    session: sid + 1,
                    bytes,
                },
                now,
                &mut prng,
            );
            push(false, out, &mut queue);
        } else {
            by_peer += 1;
            let out = rig.run(
                e,
                Input::Frame {
                    session: sid,
                    bytes,
                },
            );
            push(true, out, &mut queue);
        }
        if queue.is_empty() {
            // Ticks drain send queues (catch-up streams go in pieces).
            let out = rig.run(e, Input::Tick);
            push(true, out, &mut queue);
            let now = rig.now();
            let out = peer.handle(Input::Tick, now, &mut prng);
            push(false, out, &mut queue);
        }
    }
    let _ = rig.run(e, Input::Disconnected { session: sid });
    let now = rig.now();
    let _ = peer.handle(Input::Disconnected { session: sid + 1 }, now, &mut prng);
    (by_e, by_peer)
}
