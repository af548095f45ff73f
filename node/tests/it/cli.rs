//! The `kizuna` binary and the JSON API from outside: registry import
//! (UTF-8, CP932, all-or-nothing), docs export, and the API over real HTTP
//! against a SQLite store in a temp dir.

use crate::support::kizuna_bin;
use crdt::api::{Command, Operator, Reply};
use crdt::engine::EngineConfig;
use crdt::model::{Household, Member};
use crdt::store::{LocationStatus, Store};
use crdt::{NodeId, Role};
use node::api::ApiState;
use node::auth::Operators;
use node::driver::Driver;
use node::store::{SqliteStore, DB_FILE_NAME};
use std::io::{Read, Write};
use std::path::Path;
use std::process::Output;

const HEADER: &str = "household_id,address,person_id,name,kana,birth_date,card_user_id";

fn kizuna(args: &[&str]) -> Output {
    std::process::Command::new(kizuna_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run kizuna")
}

fn good_csv() -> String {
    format!(
        "{HEADER}\n\
         h1,新潟県三条市旭町1-1,p1,山田 太郎,ヤマダ タロウ,昭和25年4月1日,1234567890123\n\
         h1,新潟県三条市旭町1-1,p2,山田 花子,ヤマダ ハナコ,1952-05-06,\n\
         h2,\"三条市本町2-2, 201\",p3,佐藤 一郎,サトウ イチロウ,平成元年1月8日,\n"
    )
}

fn import(dir: &Path, file: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "registry",
        "import",
        "--data-dir",
        dir.to_str().unwrap(),
        file.to_str().unwrap(),
        "--node-id",
        "hq-1",
    ];
    args.extend_from_slice(extra);
    kizuna(&args)
}

fn persons(dir: &Path) -> Vec<String> {
    let s = SqliteStore::open_readonly(&dir.join(DB_FILE_NAME)).unwrap();
    s.persons(1000, 0)
        .unwrap()
        .into_iter()
        .map(|p| p.person_id)
        .collect()
}

#[test]
fn registry_import_utf8_and_cp932() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let f = t.path().join("reg.csv");
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend_from_slice(good_csv().as_bytes());
    std::fs::write(&f, &bytes).unwrap();
    let o = import(&data, &f, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(persons(&data), ["p1", "p2", "p3"]);

    let data2 = t.path().join("data2");
    let sj = t.path().join("sj.csv");
    let text = good_csv()
        .replace("p1", "q1")
        .replace("p2", "q2")
        .replace("p3", "q3");
    let (enc, _, bad) = encoding_rs::SHIFT_JIS.encode(&text);
    assert!(!bad);
    std::fs::write(&sj, &enc).unwrap();
    let o = import(&data2, &sj, &["--encoding", "cp932"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = SqliteStore::open_readonly(&data2.join(DB_FILE_NAME)).unwrap();
    assert_eq!(s.person("q1").unwrap().unwrap().name, "山田 太郎");
    // The same bytes read as UTF-8 are refused with the line.
    let o = import(&data2, &sj, &["--encoding", "utf8"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("line 2: invalid UTF-8"));
}

#[test]
fn bad_row_imports_nothing() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let f = t.path().join("reg.csv");
    std::fs::write(&f, good_csv()).unwrap();
    assert!(import(&data, &f, &[]).status.success());
    let digest = || {
        SqliteStore::open_readonly(&data.join(DB_FILE_NAME))
            .unwrap()
            .content_digest()
            .unwrap()
    };
    let before = digest();
    // Line 4 hides an Individual-Number-shaped value; line 5 is good.
    let bad = format!(
        "{HEADER}\n\
         h9,a,p9,新 一,シン イチ,1960-01-01,\n\
         h9,a,p10,新 二,シン ニ,1961-01-01,\n\
         h9,a,p11,新 1234-5678-9018,シン サン,1962-01-01,\n\
         h10,b,p12,新 四,シン ヨン,1963-01-01,\n"
    );
    std::fs::write(&f, bad).unwrap();
    let o = import(&data, &f, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("line 4: rejected: individual-number-shaped input"),
        "{err}"
    );
    assert!(!err.contains("5678"), "digits echoed: {err}");
    assert!(err.contains("nothing was imported"), "{err}");
    assert_eq!(digest(), before);
    assert_eq!(persons(&data), ["p1", "p2", "p3"]);
}

#[test]
fn docs_export_loads_in_automerge() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let f = t.path().join("reg.csv");
    std::fs::write(&f, good_csv()).unwrap();
    assert!(import(&data, &f, &[]).status.success());
    let out = t.path().join("export");
    let o = kizuna(&[
        "docs",
        "export",
        "--data-dir",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("index.json")).unwrap()).unwrap();
    let docs = index["documents"].as_array().unwrap();
    assert!(docs.len() >= 2, "{index}");
    for d in docs {
        let bytes = std::fs::read(out.join(d["file"].as_str().unwrap())).unwrap();
        let am = automerge::Automerge::load(&bytes).expect("standard automerge bytes");
        assert_eq!(am.get_heads().len(), d["heads"].as_array().unwrap().len());
    }
    assert!(out.join("household/h1.automerge").exists() || docs.iter().any(|d| d["id"] == "h1"));
}

// ----- HTTP -----------------------------------------------------------------

struct Resp {
    status: u16,
    body: String,
}

impl Resp {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // The server may answer (413) and close before reading everything.
    let _ = s.write_all(body);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Resp { status, body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

struct Server {
    addr: std::net::SocketAddr,
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    driver: node::driver::DriverHandle,
    token: String,
}

impl Server {
    fn start(dir: &Path, id: &str, role: Role, households: Vec<Household>) -> Server {
        let store = SqliteStore::open(&dir.join(DB_FILE_NAME)).unwrap();
        let driver = Driver::start(
            store,
            EngineConfig::for_tests(NodeId::new(id).unwrap(), role),
        )
        .unwrap();
        if !households.is_empty() {
            let r = driver
                .command_blocking(
                    "seed".into(),
                    Operator("test".into()),
                    Command::ImportHouseholds { households },
                )
                .unwrap();
            assert!(matches!(r, Reply::Imported { .. }));
        }
        let token = Operators::add(dir, "alice").unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel();
        let state = ApiState::new(driver.clone(), dir.to_path_buf());
        let task = rt.spawn(node::api::serve(listener, state, async {
            let _ = rx.await;
        }));
        Server {
            addr,
            rt,
            stop: Some(stop),
            task: Some(task),
            driver,
            token,
        }
    }
    fn req(&self, method: &str, path: &str, body: Option<&str>) -> Resp {
        let auth = format!("Bearer {}", self.token);
        let mut h = vec![("Authorization", auth.as_str())];
        if body.is_some() {
            h.push(("Content-Type", "application/json"));
        }
        http(self.addr, method, path, &h, body.unwrap_or("").as_bytes())
    }
    fn stop(mut self) -> SqliteStore {
        let _ = self.stop.take().unwrap().send(());
        self.rt
            .block_on(self.task.take().unwrap())
            .unwrap()
            .unwrap();
        self.driver.shutdown().unwrap().unwrap()
    }
}

fn household() -> Household {
    let m = |id: &str, name: &str, kana: &str| Member {
        person_id: id.into(),
        name: name.into(),
        kana: kana.into(),
        birth_date: "1950-04-01".into(),
        card_user_id: None,
    };
    Household {
        household_id: "h1".into(),
        address: "三条市".into(),
        members: vec![
            m("p1", "山田 太郎", "ヤマダ タロウ"),
            m("p2", "山田 花子", "ヤマダ ハナコ"),
        ],
    }
}

#[test]
fn api_over_http() {
    let t = tempfile::tempdir().unwrap();
    let srv = Server::start(t.path(), "hq-1", Role::Hq, vec![household()]);

    // Auth.
    let r = http(srv.addr, "GET", "/api/v1/status", &[], b"");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "unauthorized");
    let r = http(
        srv.addr,
        "GET",
        "/api/v1/status",
        &[("Authorization", "Bearer nope")],
        b"",
    );
    assert_eq!(r.status, 401);

    let r = srv.req("GET", "/api/v1/status", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let s = r.json();
    assert_eq!(s["node_id"], "hq-1");
    assert_eq!(s["role"], "hq");
    assert!(
        s["peers"].is_array() && s["documents"].as_u64().unwrap() >= 1 && s["incarnation"].is_u64()
    );

    let r = srv.req("GET", "/api/v1/persons?limit=10&offset=0", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json().as_array().unwrap().len(), 2);
    assert_eq!(r.json()[0]["household_id"], "h1");
    let r = srv.req("GET", "/api/v1/search?q=%E3%83%A4%E3%83%9E%E3%83%80", None); // ヤマダ
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json().as_array().unwrap().len(), 2);

    // Check-in: 201 after commit, idempotent by op id.
    let body = r#"{"person_ids":["p1"],"shelter_id":"s-01","op_id":"op-1"}"#;
    let r = srv.req("POST", "/api/v1/checkins", Some(body));
    assert_eq!(r.status, 201, "{}", r.body);
    let ev = r.json()["event_ids"].clone();
    assert_eq!(ev.as_array().unwrap().len(), 1);
    let r = srv.req("POST", "/api/v1/checkins", Some(body));
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["event_ids"], ev);
    let r = srv.req("GET", "/api/v1/persons/p1", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["location"]["shelter_id"], "s-01");
    assert_eq!(r.json()["location"]["status"], "in");
    assert_eq!(srv.req("GET", "/api/v1/persons/nobody", None).status, 404);
    assert_eq!(
        srv.req("GET", "/api/v1/households/by-card/1234567890123", None)
            .status,
        404
    );
    assert_eq!(
        srv.req("GET", "/api/v1/households/by-card/abc", None)
            .status,
        400
    );

    // Bad input.
    let r = srv.req("POST", "/api/v1/checkins", Some("{\"person_ids\":["));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_json");
    let r = srv.req(
        "POST",
        "/api/v1/checkins",
        Some(r#"{"person_ids":["p1"],"admin":true}"#),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("admin"));
    let auth = format!("Bearer {}", srv.token);
    let r = http(
        srv.addr,
        "POST",
        "/api/v1/checkins",
        &[("Authorization", &auth), ("Content-Type", "text/plain")],
        b"{}",
    );
    assert_eq!(r.status, 415);
    assert_eq!(r.json()["error"]["code"], "unsupported_media_type");
    let big = format!("{{\"person_ids\":[\"{}\"]}}", "x".repeat(2 << 20));
    let r = http(
        srv.addr,
        "POST",
        "/api/v1/checkins",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        big.as_bytes(),
    );
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "payload_too_large");
    let r = srv.req(
        "POST",
        "/api/v1/checkins",
        Some(r#"{"person_ids":["ghost"],"shelter_id":"s-01"}"#),
    );
    assert!(
        r.status == 404 || r.status == 400 || r.status == 409,
        "{} {}",
        r.status,
        r.body
    );
    assert!(r.json()["error"]["code"].is_string());

    // Durable after shutdown.
    drop(srv.stop());
    let store = SqliteStore::open(&t.path().join(DB_FILE_NAME)).unwrap();
    let loc = store.location("p1").unwrap().expect("check-in persisted");
    assert_eq!(loc.status, LocationStatus::In);
    assert_eq!(loc.shelter_id, "s-01");
}

#[test]
fn medical_forbidden_on_shelter_node() {
    let t = tempfile::tempdir().unwrap();
    let srv = Server::start(t.path(), "s-01", Role::Shelter, vec![]);
    let r = srv.req(
        "GET",
        "/api/v1/persons/p1/medical?reason=triage&break_glass=false",
        None,
    );
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "forbidden");
    let r = srv.req("GET", "/api/v1/persons/p1/medical", None);
    assert_eq!(r.status, 400, "reason is required: {}", r.body);
    drop(srv.stop());
}

#[test]
fn events_stream_and_idempotency_key() {
    let t = tempfile::tempdir().unwrap();
    let srv = Server::start(t.path(), "hq-1", Role::Hq, vec![household()]);
    let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        srv.token
    )
    .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains("\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(seen.contains("text/event-stream"), "{seen}");
    let auth = format!("Bearer {}", srv.token);
    let h = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
        ("Idempotency-Key", "tap-42"),
    ];
    let body = br#"{"person_ids":["p2"],"shelter_id":"s-01"}"#;
    let a = http(srv.addr, "POST", "/api/v1/checkins", &h, body);
    let b = http(srv.addr, "POST", "/api/v1/checkins", &h, body);
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(a.json(), b.json());
    while !seen.contains("document_changed") {
        let n = s.read(&mut buf).expect("an event within 10 s");
        assert!(n > 0);
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.contains("data: {"), "{seen}");
    drop(s);
    drop(srv.stop());
}

#[test]
fn run_refuses_bad_config_and_missing_certs() {
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("k.toml");
    std::fs::write(
        &cfg,
        "data_dir = \"d\"\n[http]\nbind = \"127.0.0.1:70000\"\n",
    )
    .unwrap();
    let o = kizuna(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("http.bind = 70000") && err.contains("1..=65535"),
        "{err}"
    );

    std::fs::write(&cfg, "data_dir = \"d\"\n[certs]\ndir = \"nowhere\"\n").unwrap();
    let o = kizuna(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("nowhere"), "{err}");
    assert!(
        !t.path().join("d").exists(),
        "nothing created before the config and certs check out"
    );
}

fn repo_path(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn out_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every example config in `deploy/` is valid for its role and draws no
/// warning (the role is the file's name; templates have no certificate).
#[test]
fn config_check_accepts_every_example_config() {
    let mut seen = 0;
    for e in std::fs::read_dir(repo_path("deploy/config")).unwrap() {
        let path = e.unwrap().path();
        if path.extension().and_then(|x| x.to_str()) != Some("toml") {
            continue;
        }
        let role = path.file_stem().unwrap().to_str().unwrap().to_string();
        let o = kizuna(&[
            "config",
            "check",
            path.to_str().unwrap(),
            "--role",
            &role,
            "--skip-files",
        ]);
        let text = out_text(&o);
        assert_eq!(o.status.code(), Some(0), "{}: {text}", path.display());
        assert!(text.contains("config ok"), "{text}");
        assert!(!text.contains("warning"), "{}: {text}", path.display());
        seen += 1;
    }
    assert_eq!(seen, 5, "one example per role");
    let o = kizuna(&[
        "config",
        "check",
        repo_path("deploy/kizuna.example.toml").to_str().unwrap(),
        "--role",
        "hq",
        "--skip-files",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", out_text(&o));
}

/// The catalogue in `node/tests/data/bad-configs`: each file's first line
/// says `# expect: TEXT`; the check must exit 2 with TEXT in its message.
#[test]
fn config_check_refuses_the_bad_config_catalogue() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bad-configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let first = String::from_utf8_lossy(&bytes)
            .lines()
            .next()
            .unwrap()
            .to_string();
        let expect = first
            .strip_prefix("# expect: ")
            .unwrap_or_else(|| panic!("{}: no `# expect:` line", path.display()));
        let o = kizuna(&["config", "check", path.to_str().unwrap(), "--skip-files"]);
        let text = out_text(&o);
        assert_eq!(o.status.code(), Some(2), "{}: {text}", path.display());
        assert!(
            text.contains(expect),
            "{}: expected {expect:?} in {text}",
            path.display()
        );
        assert!(text.contains("config has errors"), "{text}");
        n += 1;
    }
    assert!(n >= 18, "catalogue has {n} entries");
}

/// Without --skip-files the check reads what the config names: the
/// certificate (node id and role), the metrics token and an existing
/// database, and refuses a mismatch of any of them.
#[test]
fn config_check_reads_the_files_a_config_names() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    let ca = root.join("ca");
    let ok = |o: &Output| assert_eq!(o.status.code(), Some(0), "{}", out_text(o));
    ok(&kizuna(&[
        "certs",
        "init-ca",
        "--dir",
        ca.to_str().unwrap(),
        "--name",
        "Test CA",
    ]));
    ok(&kizuna(&[
        "certs",
        "issue",
        "--ca-dir",
        ca.to_str().unwrap(),
        "--role",
        "shelter",
        "--node-id",
        "shelter-07",
        "--out",
        root.join("certs").to_str().unwrap(),
    ]));
    let cfg = root.join("kizuna.toml");
    let write = |extra: &str| {
        std::fs::write(
            &cfg,
            format!("data_dir = \"data\"\n[certs]\ndir = \"certs\"\n{extra}"),
        )
        .unwrap()
    };
    let check = |extra: &[&str]| {
        let mut args = vec!["config", "check", cfg.to_str().unwrap()];
        args.extend_from_slice(extra);
        kizuna(&args)
    };
    write("");
    let o = check(&[]);
    ok(&o);
    let text = out_text(&o);
    assert!(text.contains("shelter-07 (shelter)"), "{text}");
    assert!(text.contains("created at the first start"), "{text}");
    let o = check(&["--role", "hq"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        out_text(&o).contains("certificate is for a shelter node, not hq"),
        "{}",
        out_text(&o)
    );
    // Settings the role ignores are warnings, not errors.
    write("[smtp]\nhost = \"127.0.0.1\"\nfrom = \"k@example.jp\"\n");
    let o = check(&[]);
    ok(&o);
    assert!(out_text(&o).contains("[smtp] is ignored on a shelter node"));
    // The metrics token must be readable and not a placeholder.
    write("[metrics]\nbind = \"0.0.0.0:7781\"\ntoken_file = \"metrics.token\"\n");
    let o = check(&[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(out_text(&o).contains("metrics.token"), "{}", out_text(&o));
    std::fs::write(root.join("metrics.token"), "short\n").unwrap();
    assert_eq!(check(&[]).status.code(), Some(2));
    std::fs::write(root.join("metrics.token"), "0123456789abcdef0123\n").unwrap();
    ok(&check(&[]));
    // A data directory that belongs to another node.
    write("");
    let csv = root.join("r.csv");
    std::fs::write(&csv, good_csv()).unwrap();
    ok(&import(&root.join("data"), &csv, &[]));
    let o = check(&[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        out_text(&o).contains(
            "belongs to hq node hq-1, but the certificate is for shelter node shelter-07"
        ),
        "{}",
        out_text(&o)
    );
    // Missing certificates.
    std::fs::remove_file(root.join("certs/node.key.pem")).unwrap();
    let o = check(&[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(out_text(&o).contains("node.key.pem"), "{}", out_text(&o));
}

/// The systemd unit parses, and `systemd-analyze security` rates its
/// hardening "OK" (exposure at most 2.0 of 10).
#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let t = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(repo_path("deploy/systemd/kizuna.service")).unwrap();
    for key in [
        "Restart=on-failure",
        "User=kizuna",
        "StateDirectory=kizuna",
        "PrivateTmp=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
    ] {
        assert!(unit.contains(key), "unit lacks {key:?}");
    }
    // verify needs the binaries it names to exist: point them at ours.
    let path = t.path().join("kizuna.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/kizuna", kizuna_bin().to_str().unwrap()),
    )
    .unwrap();
    let o = std::process::Command::new("systemd-analyze")
        .args(["verify"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (package systemd, installed by deploy/scripts/setup.sh)");
    assert!(o.status.success(), "verify: {}", out_text(&o));
    let o = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=20"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(o.status.success(), "security: {}", out_text(&o));
}

/// `deploy/scripts/provision-node.sh` issues a certificate and assembles a
/// checked kit for the device; a bad role or an existing directory is
/// refused and leaves nothing.
#[test]
fn provision_node_script_builds_a_checked_kit() {
    let t = tempfile::tempdir().unwrap();
    let ca = t.path().join("ca");
    let o = kizuna(&[
        "certs",
        "init-ca",
        "--dir",
        ca.to_str().unwrap(),
        "--name",
        "T",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", out_text(&o));
    let script = repo_path("deploy/scripts/provision-node.sh");
    let run = |role: &str, node: &str, out: &Path| {
        std::process::Command::new("bash")
            .arg(&script)
            .args([ca.to_str().unwrap(), role, node, out.to_str().unwrap()])
            .env("KIZUNA", kizuna_bin())
            .output()
            .unwrap()
    };
    for (role, node) in [("shelter", "shelter-12"), ("hq", "hq-2")] {
        let kit = t.path().join(node);
        let o = run(role, node, &kit);
        assert_eq!(o.status.code(), Some(0), "{}", out_text(&o));
        assert!(
            out_text(&o).contains(&format!("{node} ({role})")),
            "{}",
            out_text(&o)
        );
        for f in [
            "certs/node.crt.pem",
            "certs/node.key.pem",
            "certs/ca.crt.pem",
            "kizuna.toml",
        ] {
            assert!(kit.join(f).exists(), "{f}");
        }
        // The kit's config is the role's example, unchanged.
        assert_eq!(
            std::fs::read_to_string(kit.join("kizuna.toml")).unwrap(),
            std::fs::read_to_string(repo_path(&format!("deploy/config/{role}.toml"))).unwrap()
        );
        // Again into the same directory: refused.
        assert_eq!(run(role, node, &kit).status.code(), Some(2));
    }
    let bad = t.path().join("bad");
    assert_eq!(run("doctor", "x-1", &bad).status.code(), Some(2));
    assert!(!bad.exists());
}

/// docs/bad-inputs.md's API table, executed: every row's body is sent over
/// real HTTP to an hq node on a real SQLite store and must get the row's
/// status and error code, echo no digit of the Individual Number the
/// table uses, and leave the state digest as it was.
#[test]
fn bad_input_catalogue_changes_nothing() {
    let doc = std::fs::read_to_string(repo_path("docs/bad-inputs.md")).unwrap();
    let rows: Vec<Vec<String>> = doc
        .lines()
        .filter(|l| l.starts_with("| API-"))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect();
    assert!(rows.len() >= 30, "{} API rows", rows.len());
    let t = tempfile::tempdir().unwrap();
    let srv = Server::start(t.path(), "hq-1", Role::Hq, vec![household()]);
    let r = srv.req(
        "POST",
        "/api/v1/checkins",
        Some(r#"{"person_ids":["p1"],"shelter_id":"s-01"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = srv.req(
        "POST",
        "/api/v1/persons/p1/medical",
        Some(r#"{"blood_type":"A+","consent":"consented","add":[["allergy","ペニシリン"]]}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let db = t.path().join(DB_FILE_NAME);
    let digest = || {
        SqliteStore::open_readonly(&db)
            .unwrap()
            .content_digest()
            .unwrap()
    };
    let before = digest();
    let mut failures = Vec::new();
    for row in &rows {
        let [id, what, request, body, status, code] = &row[..] else {
            panic!("malformed row {row:?}");
        };
        let (method, path) = request.split_once(' ').unwrap();
        let body = body.trim_matches('`');
        let r = srv.req(method, path, Some(body));
        let got_code = serde_json::from_str::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_default();
        if r.status.to_string() != *status || got_code != *code {
            failures.push(format!(
                "{id} ({what}): expected {status} {code}, got {} {}",
                r.status, r.body
            ));
        }
        let digits: String = r.body.chars().filter(char::is_ascii_digit).collect();
        if digits.contains("2818") || r.body.contains("２８１８") {
            failures.push(format!("{id}: echoes the number: {}", r.body));
        }
        if digest() != before {
            failures.push(format!("{id} ({what}): the state changed"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    drop(srv.stop());
    eprintln!("{} catalogue rows refused, state unchanged", rows.len());
}
