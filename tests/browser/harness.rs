//! What the browser test and the screens benchmark share: a mesh of real
//! `kizuna run` processes on loopback (certificates, configs, a registry
//! imported at headquarters, card readers on vpcd slots), the synthetic
//! card (`kizuna-card-emu`), plain HTTP requests, and one headless
//! Chromium driven through WebDriver (Debian's `chromium-driver`). What
//! only the test uses is in `tools.rs`, which the benchmark does not
//! compile.
//!
//! The binaries are found next to the test executable (build them first:
//! `cargo build --release -p node --bins`), or at `$KIZUNA_BIN` and
//! `$KIZUNA_CARD_EMU`. Every wait polls a condition under a deadline that
//! only guards against hangs; nothing sleeps to synchronise.

use anyhow::{anyhow, bail, Context, Result};
use fantoccini::{Client, ClientBuilder};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Guard against hangs, not a timing assertion.
pub const DEADLINE: Duration = Duration::from_secs(60);

fn target_dir_bin(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} missing: build it first with `cargo build --release -p node --bins` (same profile as the tests) or set {env}",
        bin.display()
    );
    bin
}

pub fn kizuna_bin() -> PathBuf {
    target_dir_bin("kizuna", "KIZUNA_BIN")
}
pub fn emu_bin() -> PathBuf {
    target_dir_bin("kizuna-card-emu", "KIZUNA_CARD_EMU")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `kizuna ARGS` with `stdin` on standard input; its standard output.
pub fn kizuna(args: &[&str], stdin: &str) -> Result<String> {
    use std::io::Write;
    let mut c = Command::new(kizuna_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    c.stdin.take().unwrap().write_all(stdin.as_bytes())?;
    let out = c.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kizuna {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// Polls `f` until it yields a value or `DEADLINE` passes.
pub fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> Result<T> {
    wait_for_long(what, DEADLINE, f)
}

/// [`wait_for`] with its own deadline (benchmarks at scale).
pub fn wait_for_long<T>(
    what: &str,
    deadline: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

// ----- HTTP ------------------------------------------------------------------

/// One HTTP/1.0 exchange on loopback: (status, headers, body).
pub fn http_raw(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    let host = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.to_string())
        .unwrap_or(format!("127.0.0.1:{port}"));
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("host"))
    {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad response: {head}"))?;
    Ok((status, head.to_string(), body.to_string()))
}

/// A JSON API call with a bearer token: (status, body).
pub fn api(
    port: u16,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let auth = format!("Bearer {token}");
    let mut h = vec![("Authorization", auth.as_str())];
    let b = body.map(|b| b.to_string()).unwrap_or_default();
    if !b.is_empty() {
        h.push(("Content-Type", "application/json"));
    }
    let (s, _, body) = http_raw(port, method, path, &h, &b)?;
    Ok((s, serde_json::from_str(&body).unwrap_or(Value::Null)))
}

// ----- the mesh --------------------------------------------------------------

pub struct NodeSpec {
    pub id: &'static str,
    pub role: crdt::Role,
    /// vpcd slot of the node's card reader, if it has one.
    pub card_slot: Option<u16>,
}

pub struct NodeProc {
    pub id: &'static str,
    pub http: u16,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub token: String,
    /// The running `kizuna run`, once started.
    pub child: Option<Child>,
}

impl NodeProc {
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("kizuna.log")
    }

    pub fn start(&mut self) -> Result<()> {
        self.start_within(DEADLINE)
    }

    /// [`NodeProc::start`], waiting up to `deadline` for the node to
    /// answer (a store of a million residents opens in more than a minute
    /// on a busy machine).
    pub fn start_within(&mut self, deadline: Duration) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())?;
        let child = Command::new(kizuna_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info,node=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let (port, token) = (self.http, self.token.clone());
        let mut child = child;
        let mut exited = None;
        let answered = wait_for_long(&format!("{} to answer", self.id), deadline, || {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                return Some(false);
            }
            match api(port, &token, "GET", "/api/v1/status", None) {
                Ok((200, _)) => Some(true),
                _ => None,
            }
        });
        self.child = Some(child);
        if answered? {
            return Ok(());
        }
        // A node that stopped will not answer: say why at once.
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        bail!(
            "{} stopped ({}) before answering: {}",
            self.id,
            exited.map(|s| s.to_string()).unwrap_or_default(),
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )
    }

    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
        api(self.http, &self.token, method, path, body)
    }

    /// A one-time sign-in URL for `operator`.
    pub fn link(&self, operator: &str) -> Result<String> {
        let d = self.data();
        let path = kizuna(
            &[
                "operator",
                "link",
                "--data-dir",
                d.to_str().unwrap(),
                "--name",
                operator,
            ],
            "",
        )?;
        Ok(format!("{}{path}", self.base()))
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeProc>,
}

impl Mesh {
    pub fn node(&mut self, id: &str) -> &mut NodeProc {
        self.nodes.iter_mut().find(|n| n.id == id).expect("node")
    }

    /// Certificates, configs and operators for `specs` (the first is hq,
    /// every other node has it as static peer), the registry `csv`
    /// imported at hq with `shelters`. Nothing is started.
    pub fn create(specs: &[NodeSpec], csv: &str, shelters: &[(&str, &str)]) -> Result<Mesh> {
        let mut mesh = Mesh {
            dir: tempfile::Builder::new().prefix("kizuna-ui-").tempdir()?,
            nodes: Vec::new(),
        };
        let dir = mesh.dir.path().to_path_buf();
        let ca = dir.join("ca");
        certs::ca::init_ca(&ca, "Test CA").map_err(|e| anyhow!("{e}"))?;
        let hq_quic = free_port();
        for (i, s) in specs.iter().enumerate() {
            let nd = dir.join(s.id);
            let node_id = crdt::NodeId::new(s.id).unwrap();
            std::fs::create_dir_all(&nd)?;
            // The ambulance encrypts its data at rest (its default): a
            // storage key beside its config, its node key sealed with it.
            let storage_key = match s.role {
                crdt::Role::Ambulance => Some(
                    certs::storagekey::generate_key_file(&nd.join("storage.key"))
                        .map_err(|e| anyhow!("{e}"))?,
                ),
                _ => None,
            };
            certs::ca::issue_sealed_at(
                &ca,
                s.role,
                &node_id,
                &nd.join("certs"),
                30,
                time::OffsetDateTime::now_utc(),
                storage_key.as_ref(),
            )
            .map_err(|e| anyhow!("{e}"))?;
            let quic = if i == 0 { hq_quic } else { free_port() };
            let http = free_port();
            let mut cfg = format!(
                "data_dir = \"data\"\n[certs]\ndir = \"certs\"\n[net]\nlisten = \"127.0.0.1:{quic}\"\nmdns = false\n"
            );
            if i > 0 {
                cfg.push_str(&format!(
                    "[[net.static_peers]]\nnode_id = \"{}\"\naddr = \"127.0.0.1:{hq_quic}\"\n",
                    specs[0].id
                ));
            }
            cfg.push_str(&format!("[http]\nbind = \"127.0.0.1:{http}\"\n"));
            if let Some(slot) = s.card_slot {
                cfg.push_str(&format!("[card]\nreader = \"Virtual PCD 00 {slot:02}\"\n"));
            }
            if storage_key.is_some() {
                cfg.push_str("[storage]\nkey_file = \"storage.key\"\n");
            }
            let config = nd.join("kizuna.toml");
            std::fs::create_dir_all(&nd)?;
            std::fs::write(&config, cfg)?;
            if i == 0 {
                let csv_path = dir.join("registry.csv");
                std::fs::write(&csv_path, csv)?;
                let d = nd.join("data");
                kizuna(
                    &[
                        "registry",
                        "import",
                        "--data-dir",
                        d.to_str().unwrap(),
                        "--node-id",
                        s.id,
                        csv_path.to_str().unwrap(),
                    ],
                    "",
                )?;
                node::demo::put_shelters(&d, s.id, shelters)
                    .map_err(|e| anyhow!("{}", e.message))?;
            }
            let d = nd.join("data");
            let token = kizuna(
                &[
                    "operator",
                    "add",
                    "--data-dir",
                    d.to_str().unwrap(),
                    "--name",
                    "desk",
                ],
                "",
            )?;
            mesh.nodes.push(NodeProc {
                id: s.id,
                http,
                dir: nd,
                config,
                token,
                child: None,
            });
        }
        Ok(mesh)
    }
}

// ----- the card --------------------------------------------------------------

pub fn card_stack_start() -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/scripts/card-stack.sh");
    let out = Command::new(script).arg("start").output()?;
    if !out.status.success() {
        bail!(
            "card-stack.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn reader_empty(slot: u16) -> bool {
    use std::ffi::CString;
    let Ok(ctx) = pcsc::Context::establish(pcsc::Scope::User) else {
        return false;
    };
    let mut states = [pcsc::ReaderState::new(
        CString::new(format!("Virtual PCD 00 {slot:02}")).unwrap(),
        pcsc::State::UNAWARE,
    )];
    ctx.get_status_change(Duration::from_millis(200), &mut states)
        .is_ok()
        && states[0].event_state().contains(pcsc::State::EMPTY)
}

/// A card on a vpcd slot while this lives; dropping it removes the card
/// and waits until pcscd sees the reader empty.
pub struct Card {
    child: Child,
    slot: u16,
}

impl Card {
    pub fn tap(slot: u16, user_id: &str) -> Result<Card> {
        wait_for("an empty reader", || reader_empty(slot).then_some(()))?;
        let child = Command::new(emu_bin())
            .args(["--port", &(35963 + slot).to_string(), "--user-id", user_id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting kizuna-card-emu")?;
        Ok(Card { child, slot })
    }
}

impl Drop for Card {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = wait_for("the card removed", || reader_empty(self.slot).then_some(()));
    }
}

// ----- the browser -----------------------------------------------------------

pub struct Browser {
    pub c: Client,
    pub driver: Driver,
    _profile: tempfile::TempDir,
}

/// chromedriver, listening on `port`.
pub struct Driver {
    child: Child,
    pub port: u16,
}

impl Browser {
    /// chromedriver on a free port and one headless Chromium session.
    pub async fn start() -> Result<Browser> {
        let driver_bin = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .ok_or_else(|| {
                anyhow!(
                    "chromedriver missing: run deploy/scripts/setup.sh (installs chromium-driver)"
                )
            })?;
        let port = free_port();
        let driver = Driver {
            child: Command::new(driver_bin)
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
            port,
        };
        wait_for("chromedriver", || {
            std::net::TcpStream::connect(("127.0.0.1", driver.port)).ok()
        })?;
        let profile = tempfile::tempdir()?;
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-renderer-backgrounding", "--disable-background-timer-throttling",
                    "--disable-backgrounding-occluded-windows",
                    "--window-size=1280,860", "--lang=ja-JP",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
            .context("WebDriver session")?;
        Ok(Browser {
            c,
            driver,
            _profile: profile,
        })
    }

    /// Runs `script` (a function body) and returns its value.
    pub async fn js(&self, script: &str) -> Result<Value> {
        Ok(self.c.execute(script, vec![]).await?)
    }

    /// Polls `script` until it returns something truthy.
    pub async fn wait_js(&self, what: &str, script: &str) -> Result<Value> {
        let start = Instant::now();
        loop {
            if let Ok(v) = self.js(script).await {
                let truthy = !matches!(v, Value::Null | Value::Bool(false))
                    && v != json!(0)
                    && v != json!("");
                if truthy {
                    return Ok(v);
                }
            }
            if start.elapsed() > DEADLINE {
                let url = self
                    .c
                    .current_url()
                    .await
                    .map(|u| u.to_string())
                    .unwrap_or_default();
                bail!("timed out waiting for {what} (at {url})");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn close(self) {
        let Browser { c, driver, .. } = self;
        let _ = c.close().await;
        drop(driver);
    }
}

impl Drop for Driver {
    /// Also when a test or benchmark fails before `close`: a chromedriver
    /// left behind would keep whatever it inherited, such as the
    /// descriptor of `flock /work/coord/card.lock`, and hold that lock.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
