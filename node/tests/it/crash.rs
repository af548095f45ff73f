//! Crash harness with real processes (faults A-1, A-3, A-5): the `kizuna`
//! binary is killed with SIGKILL (`Child::kill`) at chosen moments and the
//! data directory is checked after each kill.
//!
//! No sleep is used as synchronisation: every wait polls an observable
//! condition (rows in the database, acknowledgements received, the HTTP
//! port answering) under a bounded deadline.

use crate::support::{free_port, free_udp_port, kizuna_bin};
use crdt::api::{Command, Operator, Reply};
use crdt::engine::EngineConfig;
use crdt::model::{Household, Member, ShelterInfo};
use crdt::store::{LocationStatus, Store};
use crdt::{Kind, NodeId, Role};
use node::auth::Operators;
use node::driver::Driver;
use node::store::{SqliteStore, DB_FILE_NAME};
use rusqlite::{Connection, OpenFlags};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HEADER: &str = "household_id,address,person_id,name,kana,birth_date,card_user_id";
/// Every generated household has exactly this many members.
const PER_HOUSEHOLD: usize = 3;

/// Polls `f` until it returns `Some`, at most `limit`; panics with `what`.
fn poll<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A read-only look at the database while the writer runs (or after).
fn ro(dir: &Path) -> Option<Connection> {
    Connection::open_with_flags(
        dir.join(DB_FILE_NAME),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .ok()
}

fn count(c: &Connection, sql: &str) -> Option<i64> {
    c.query_row(sql, [], |r| r.get(0)).ok()
}

// ----- registry import --------------------------------------------------

/// `households` households of exactly [`PER_HOUSEHOLD`] persons: household
/// `h` is `h{h:06}`, its members `p{3h+m:07}`; the first member has a card.
fn registry_csv(households: usize) -> String {
    let mut s = String::with_capacity(households * PER_HOUSEHOLD * 100);
    s.push_str(HEADER);
    s.push('\n');
    for h in 0..households {
        for m in 0..PER_HOUSEHOLD {
            let card = if m == 0 {
                format!("{:013}", 1_000_000_000_000u64 + h as u64)
            } else {
                String::new()
            };
            s.push_str(&format!(
                "h{h:06},新潟県三条市旭町,p{:07},山田 太郎,ヤマダ タロウ,1970-01-01,{card}\n",
                h * PER_HOUSEHOLD + m
            ));
        }
    }
    s
}

fn spawn_import(data: &Path, csv: &Path) -> Child {
    std::process::Command::new(kizuna_bin())
        .args(["registry", "import", "--data-dir"])
        .arg(data)
        .arg(csv)
        .args(["--node-id", "hq-1"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kizuna registry import")
}

/// After a kill: the store opens as the node would open it, passes
/// `integrity_check`, and holds whole batches only. Batch `b` is households
/// `b * BATCH_HOUSEHOLDS .. (b + 1) * BATCH_HOUSEHOLDS`, i.e. exactly
/// `BATCH_HOUSEHOLDS * PER_HOUSEHOLD` persons; every batch present has all
/// of them, its op id is recorded, and the batches present are a prefix
/// 0..k (the import runs them in order). Returns k.
fn check_whole_batches(data: &Path, households: usize) -> usize {
    let per_batch = node::import::BATCH_HOUSEHOLDS;
    let batches = households.div_ceil(per_batch);
    {
        let s = SqliteStore::open(&data.join(DB_FILE_NAME)).expect("reopen after kill");
        assert_eq!(s.integrity_check().unwrap(), "ok");
    }
    let c = ro(data).unwrap();
    let mut per: BTreeMap<i64, i64> = BTreeMap::new();
    let mut st = c
        .prepare(
            "SELECT CAST(substr(household_id, 2) AS INTEGER) / ?1, count(*), count(DISTINCT person_id) \
             FROM persons GROUP BY 1",
        )
        .unwrap();
    let rows = st
        .query_map([per_batch as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .unwrap();
    for row in rows {
        let (b, n, distinct) = row.unwrap();
        assert_eq!(n, distinct, "batch {b}: a person twice");
        per.insert(b, n);
    }
    let k = per.len();
    for (i, (b, n)) in per.iter().enumerate() {
        assert_eq!(*b, i as i64, "batches present are not a prefix: {per:?}");
        let want = (per_batch.min(households - i * per_batch) * PER_HOUSEHOLD) as i64;
        assert_eq!(*n, want, "batch {b} is partly present: {per:?}");
    }
    assert!(k <= batches);
    let ops = count(&c, "SELECT count(*) FROM ops WHERE op_id LIKE 'import-%'").unwrap();
    assert_eq!(ops, k as i64, "recorded import batches vs batches present");
    let persons = count(&c, "SELECT count(*) FROM persons").unwrap() as usize;
    let docs = count(
        &c,
        &format!(
            "SELECT count(*) FROM docs WHERE kind = {}",
            Kind::Registry.code()
        ),
    )
    .unwrap() as usize;
    assert_eq!(
        docs * PER_HOUSEHOLD,
        persons,
        "a registry doc without its rows"
    );
    k
}

/// Kills `registry import` of 30,000 households (6 batches of 5,000) at
/// three moments: before any batch landed (as soon as the DB exists),
/// after the first batch, after the third. After each kill the store is
/// intact and holds whole batches; re-running the same file finishes the
/// job and yields the registry exactly once.
#[test]
fn import_killed_at_batch_boundaries_resumes_exactly_once() {
    let households = 30_000;
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let csv = t.path().join("registry.csv");
    std::fs::write(&csv, registry_csv(households)).unwrap();
    let per_batch_persons = (node::import::BATCH_HOUSEHOLDS * PER_HOUSEHOLD) as i64;
    let limit = Duration::from_secs(600);

    // (kill once at least this many persons are visible, what it means)
    let points = [
        (0, "the database exists"),
        (per_batch_persons, "batch 1 landed"),
        (3 * per_batch_persons, "batch 3 landed"),
    ];
    let mut landed = Vec::new();
    for (want, what) in points {
        let mut child = spawn_import(&data, &csv);
        let seen = poll(limit, what, || {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("import exited ({st}) before the kill point {what}");
            }
            let c = ro(&data)?;
            let n = count(&c, "SELECT count(*) FROM persons")?;
            (n >= want).then_some(n)
        });
        child.kill().unwrap(); // SIGKILL
        let st = child.wait().unwrap();
        assert!(!st.success(), "killed, not finished: {st}");
        let k = check_whole_batches(&data, households);
        assert!(
            k as i64 * per_batch_persons >= seen,
            "{k} batches after seeing {seen}"
        );
        eprintln!("kill after {what}: saw {seen} persons, {k} whole batches on disk");
        landed.push(k);
    }
    assert!(landed.windows(2).all(|w| w[0] <= w[1]), "{landed:?}");

    let out = std::process::Command::new(kizuna_bin())
        .args(["registry", "import", "--data-dir"])
        .arg(&data)
        .arg(&csv)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "imported {households} households, {} persons",
            households * PER_HOUSEHOLD
        )),
        "{stdout}"
    );
    assert_eq!(check_whole_batches(&data, households), 6);
    let c = ro(&data).unwrap();
    assert_eq!(
        count(&c, "SELECT count(DISTINCT person_id) FROM persons"),
        Some((households * PER_HOUSEHOLD) as i64)
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM persons"),
        Some((households * PER_HOUSEHOLD) as i64)
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM cards"),
        Some(households as i64)
    );
}

// ----- kizuna run under concurrent check-ins ----------------------------

struct Resp {
    status: u16,
    body: String,
}

/// One HTTP/1.1 request; `None` if the connection failed or broke before
/// a complete response (the node died).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<Resp> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let lower = head.to_ascii_lowercase();
    if let Some(len) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        if body.len() < len {
            return None;
        }
    }
    Some(Resp {
        status,
        body: body.to_string(),
    })
}

struct Node {
    dir: PathBuf,
    config: PathBuf,
    addr: SocketAddr,
    token: String,
}

impl Node {
    /// An hq node with certificates, a registry of `households` x 3
    /// persons, shelters s-01 and s-02 and an operator.
    fn setup(dir: &Path, households: usize) -> Node {
        let ca = dir.join("ca");
        certs::ca::init_ca(&ca, "Crash Test CA").unwrap();
        let id = NodeId::new("hq-1").unwrap();
        certs::ca::issue(&ca, Role::Hq, &id, &dir.join("certs"), 30).unwrap();
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let store = SqliteStore::open(&data.join(DB_FILE_NAME)).unwrap();
        let d = Driver::start(store, EngineConfig::for_tests(id, Role::Hq)).unwrap();
        let hh: Vec<Household> = (0..households)
            .map(|h| Household {
                household_id: format!("h{h:06}"),
                address: "三条市".into(),
                members: (0..PER_HOUSEHOLD)
                    .map(|m| Member {
                        person_id: format!("p{:07}", h * PER_HOUSEHOLD + m),
                        name: "山田 太郎".into(),
                        kana: "ヤマダ タロウ".into(),
                        birth_date: "1970-01-01".into(),
                        card_user_id: None,
                    })
                    .collect(),
            })
            .collect();
        let r = d
            .command_blocking(
                "seed".into(),
                Operator("test".into()),
                Command::ImportHouseholds { households: hh },
            )
            .unwrap();
        assert!(matches!(r, Reply::Imported { .. }), "{r:?}");
        for s in ["s-01", "s-02"] {
            d.command_blocking(
                format!("shelter-{s}"),
                Operator("test".into()),
                Command::PutShelter {
                    shelter: ShelterInfo {
                        shelter_id: s.into(),
                        name: "体育館".into(),
                        capacity: 100_000,
                        location: String::new(),
                        needs: String::new(),
                        ..Default::default()
                    },
                },
            )
            .unwrap();
        }
        d.shutdown().unwrap();
        let token = Operators::add(&data, "alice").unwrap();
        let http_port = free_port();
        let config = dir.join("kizuna.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"data\"\n\n[certs]\ndir = \"certs\"\n\n[net]\nlisten = \"127.0.0.1:{}\"\nmdns = false\n\n[http]\nbind = \"127.0.0.1:{http_port}\"\n",
                free_udp_port()
            ),
        )
        .unwrap();
        Node {
            dir: dir.to_path_buf(),
            config,
            addr: format!("127.0.0.1:{http_port}").parse().unwrap(),
            token,
        }
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// Starts `kizuna run` and waits until the API answers; returns the
    /// child and the incarnation it reports.
    fn start(&self) -> (Child, u64) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("kizuna.log"))
            .unwrap();
        let mut child = std::process::Command::new(kizuna_bin())
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn kizuna run");
        let auth = self.auth();
        let inc = poll(Duration::from_secs(60), "the API of kizuna run", || {
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "kizuna run exited ({st}): {}",
                    std::fs::read_to_string(self.dir.join("kizuna.log")).unwrap_or_default()
                );
            }
            let r = http(
                self.addr,
                "GET",
                "/api/v1/status",
                &[("Authorization", &auth)],
                b"",
            )?;
            (r.status == 200).then_some(())?;
            let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
            v["incarnation"].as_u64()
        });
        (child, inc)
    }

    fn checkin(&self, i: usize) -> Option<Resp> {
        let auth = self.auth();
        let key = op_key(i);
        let body = format!(
            r#"{{"person_ids":["{}"],"shelter_id":"{}"}}"#,
            person(i),
            shelter(i)
        );
        http(
            self.addr,
            "POST",
            "/api/v1/checkins",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
                ("Idempotency-Key", &key),
            ],
            body.as_bytes(),
        )
    }
}

/// Check-in number `i` is of person i (households of 3 share a presence
/// document, so concurrent check-ins touch the same documents), to shelter
/// s-01 or s-02, with op id `ck-i`.
fn person(i: usize) -> String {
    format!("p{i:07}")
}
fn shelter(i: usize) -> &'static str {
    if i % 2 == 0 {
        "s-01"
    } else {
        "s-02"
    }
}
fn op_key(i: usize) -> String {
    format!("ck-{i}")
}

#[derive(Default)]
struct Log {
    /// Check-ins answered 201, with the body.
    acked: Vec<(usize, String)>,
    /// Check-ins sent (or about to be) with no complete answer.
    lost: Vec<usize>,
}

/// Fires check-ins from `threads` clients until the node dies; each takes
/// the next number from `next`.
fn fire(
    node: &Arc<Node>,
    next: &Arc<AtomicUsize>,
    log: &Arc<Mutex<Log>>,
    threads: usize,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..threads)
        .map(|_| {
            let (node, next, log) = (node.clone(), next.clone(), log.clone());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                match node.checkin(i) {
                    Some(r) if r.status == 201 => log.lock().unwrap().acked.push((i, r.body)),
                    Some(r) => panic!("check-in {i}: {} {}", r.status, r.body),
                    None => {
                        log.lock().unwrap().lost.push(i);
                        return;
                    }
                }
            })
        })
        .collect()
}

/// A-1 and A-3 on a real process: `kizuna run` (hq) is SIGKILLed while 8
/// clients fire concurrent check-ins, at three moments (after 1, 40 and
/// 300 acknowledgements). After each kill the node restarts on the same
/// data dir with no operator action and a bumped incarnation; every
/// acknowledged check-in is there (location in the right shelter); a retry
/// with the same Idempotency-Key, acknowledged or not, is recorded once.
#[test]
fn run_killed_under_concurrent_checkins_keeps_every_ack() {
    let t = tempfile::tempdir().unwrap();
    let node = Arc::new(Node::setup(t.path(), 2_000));
    let data = t.path().join("data");
    let next = Arc::new(AtomicUsize::new(0));
    let (mut child, mut inc) = node.start();
    // Every check-in acknowledged so far (by any incarnation), by number.
    let mut all_acked: BTreeMap<usize, String> = BTreeMap::new();
    for n in [1usize, 40, 300] {
        let log = Arc::new(Mutex::new(Log::default()));
        let clients = fire(&node, &next, &log, 8);
        poll(Duration::from_secs(120), "acknowledgements", || {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("kizuna run died on its own: {st}");
            }
            (log.lock().unwrap().acked.len() >= n).then_some(())
        });
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for c in clients {
            c.join().unwrap();
        }
        let log = std::mem::take(&mut *log.lock().unwrap());
        eprintln!(
            "kill after {n} acks: {} acknowledged, {} without answer",
            log.acked.len(),
            log.lost.len()
        );
        assert!(log.acked.len() >= n);

        // Restart on the same data dir, no operator action in between.
        let (c, new_inc) = node.start();
        child = c;
        assert_eq!(new_inc, inc + 1, "incarnation bumps at restart");
        inc = new_inc;

        // The store is intact and every acknowledged check-in is on disk
        // (read beside the running node).
        {
            let s = SqliteStore::open_readonly(&data.join(DB_FILE_NAME)).unwrap();
            assert_eq!(s.integrity_check().unwrap(), "ok");
            for (i, body) in &log.acked {
                let v: serde_json::Value = serde_json::from_str(body).unwrap();
                assert_eq!(
                    v["event_ids"].as_array().map(|a| a.len()),
                    Some(1),
                    "{body}"
                );
                let l = s
                    .location(&person(*i))
                    .unwrap()
                    .unwrap_or_else(|| panic!("acknowledged check-in {i} lost"));
                assert_eq!(
                    (l.status, l.shelter_id.as_str()),
                    (LocationStatus::In, shelter(*i))
                );
                assert!(s.op_result(&op_key(*i)).unwrap().is_some());
            }
        }

        // The restarted node shows them too.
        let auth = node.auth();
        for (i, _) in &log.acked {
            let r = http(
                node.addr,
                "GET",
                &format!("/api/v1/persons/{}", person(*i)),
                &[("Authorization", &auth)],
                b"",
            )
            .unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
            assert!(r.body.contains(shelter(*i)), "{}", r.body);
        }
        // A-3: the UI retries with the same op id. Acknowledged ones get
        // the recorded answer back unchanged; unanswered ones are done now
        // (or were done before the crash) and answer the same every time.
        for (i, body) in &log.acked {
            let r = node.checkin(*i).unwrap();
            assert_eq!(r.status, 201, "{}", r.body);
            let (a, b): (serde_json::Value, serde_json::Value) = (
                serde_json::from_str(body).unwrap(),
                serde_json::from_str(&r.body).unwrap(),
            );
            assert_eq!(a, b, "retry of acknowledged check-in {i}");
            all_acked.insert(*i, body.clone());
        }
        for i in &log.lost {
            let first = node.checkin(*i).unwrap();
            assert_eq!(first.status, 201, "{}", first.body);
            let again = node.checkin(*i).unwrap();
            assert_eq!(first.body, again.body, "retry of unanswered check-in {i}");
            let v: serde_json::Value = serde_json::from_str(&first.body).unwrap();
            assert_eq!(
                v["event_ids"].as_array().map(|a| a.len()),
                Some(1),
                "{}",
                first.body
            );
            all_acked.insert(*i, first.body);
        }
    }
    // Recorded once: exactly one presence change per check-in ever
    // acknowledged, no more (a duplicate write would add a change).
    child.kill().unwrap();
    child.wait().unwrap();
    let c = ro(&data).unwrap();
    let changes = count(
        &c,
        &format!(
            "SELECT count(*) FROM changes WHERE kind = {}",
            Kind::Presence.code()
        ),
    )
    .unwrap();
    assert_eq!(changes as usize, all_acked.len());
    let s = SqliteStore::open(&data.join(DB_FILE_NAME)).unwrap();
    assert_eq!(s.integrity_check().unwrap(), "ok");
    let in_count: u32 = s.occupancy().unwrap().values().sum();
    assert_eq!(in_count as usize, all_acked.len());
}

/// B-2: a node whose clock reads earlier than its own certificate's issue
/// time keeps working but says "device clock looks wrong" in its status.
#[test]
fn a_clock_before_the_own_certificate_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::setup(dir.path(), 2);
    // Reissue the node certificate as if issued two days from now.
    let certs_dir = dir.path().join("certs");
    std::fs::remove_dir_all(&certs_dir).unwrap();
    let later = time::OffsetDateTime::now_utc() + time::Duration::days(2);
    certs::ca::issue_at(
        &dir.path().join("ca"),
        Role::Hq,
        &NodeId::new("hq-1").unwrap(),
        &certs_dir,
        30,
        later,
    )
    .unwrap();
    let (mut child, _) = node.start();
    let auth = node.auth();
    let r = http(
        node.addr,
        "GET",
        "/api/v1/status",
        &[("Authorization", &auth)],
        b"",
    )
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["clock"]["trusted"], false, "{v}");
    assert!(
        v["clock"]["problem"]
            .as_str()
            .unwrap_or_default()
            .contains("clock"),
        "{v}"
    );
}
