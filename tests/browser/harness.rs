//! What the browser tests and the screens benchmark share: a mesh of real
//! `kizuna run` processes on loopback (certificates, configs, a registry
//! imported at headquarters, card readers on vpcd slots), the synthetic
//! card (`kizuna-card-emu`), plain HTTP requests, and one headless
//! Chromium driven through WebDriver (Debian's `chromium-driver`).
//!
//! The binaries are found next to the test executable (build them first:
//! `cargo build --release -p node --bins`), or at `$KIZUNA_BIN` and
//! `$KIZUNA_CARD_EMU`. Every wait polls a condition under a deadline that
//! only guards against hangs; nothing sleeps to synchronise.
#![allow(dead_code)]

use anyhow::{anyhow, bail, Context, Result};
use fantoccini::elements::Element;
use fantoccini::error::CmdError;
use fantoccini::{Client, ClientBuilder, Locator};
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
    pub role: crdt::Role,
    pub http: u16,
    pub quic: u16,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub token: String,
    child: Option<Child>,
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

    /// SIGTERM and wait (the node shuts down cleanly).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
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

    /// Adds an operator (bearer token returned), optionally with a password.
    pub fn add_operator(&self, name: &str, password: Option<&str>) -> Result<String> {
        let d = self.data();
        let d = d.to_str().unwrap();
        let token = kizuna(&["operator", "add", "--data-dir", d, "--name", name], "")?;
        if let Some(pw) = password {
            kizuna(
                &["operator", "password", "--data-dir", d, "--name", name],
                &format!("{pw}\n"),
            )?;
        }
        Ok(token)
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
        let dir = tempfile::Builder::new().prefix("kizuna-ui-").tempdir()?;
        let ca = dir.path().join("ca");
        certs::ca::init_ca(&ca, "Test CA").map_err(|e| anyhow!("{e}"))?;
        let hq_quic = free_port();
        let mut nodes = Vec::new();
        for (i, s) in specs.iter().enumerate() {
            let nd = dir.path().join(s.id);
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
                let csv_path = dir.path().join("registry.csv");
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
            nodes.push(NodeProc {
                id: s.id,
                role: s.role,
                http,
                quic,
                dir: nd,
                config,
                token,
                child: None,
            });
        }
        Ok(Mesh { dir, nodes })
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

/// Waits until pcscd reports a card on vpcd slot `slot` and returns that
/// moment (Unix ms): where the virtual stack hands over to the node.
pub fn card_present_at(slot: u16) -> Result<u128> {
    use std::ffi::CString;
    let ctx = pcsc::Context::establish(pcsc::Scope::User)?;
    let name = CString::new(format!("Virtual PCD 00 {slot:02}"))?;
    let mut states = [pcsc::ReaderState::new(name, pcsc::State::UNAWARE)];
    let start = Instant::now();
    loop {
        match ctx.get_status_change(Duration::from_millis(500), &mut states) {
            Ok(()) | Err(pcsc::Error::Timeout) => {}
            Err(e) => bail!("pcsc: {e}"),
        }
        if states[0].event_state().contains(pcsc::State::PRESENT) {
            return Ok(std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis());
        }
        states[0].sync_current_state();
        if start.elapsed() > DEADLINE {
            bail!("timed out waiting for the card on slot {slot}");
        }
    }
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

/// The WebDriver code point of a special key.
pub fn key(k: fantoccini::key::Key) -> char {
    k.chars().next().expect("a key code point")
}

pub struct Browser {
    pub c: Client,
    driver: Child,
    driver_port: u16,
    _profile: tempfile::TempDir,
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
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        wait_for("chromedriver", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
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
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .context("WebDriver session")?;
        Ok(Browser {
            c,
            driver,
            driver_port: port,
            _profile: profile,
        })
    }

    /// A Chrome DevTools Protocol command through chromedriver's
    /// `goog/cdp/execute` endpoint (for what WebDriver has no command for,
    /// such as emulating print media); its result.
    pub async fn cdp(&self, cmd: &str, params: Value) -> Result<Value> {
        let sid = self.c.session_id().await?.context("no WebDriver session")?;
        let body = json!({"cmd": cmd, "params": params}).to_string();
        let (port, path) = (self.driver_port, format!("/session/{sid}/goog/cdp/execute"));
        let (status, text) = tokio::task::block_in_place(|| {
            http_bytes(
                port,
                "POST",
                &path,
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            )
        })?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status != 200 {
            bail!("CDP {cmd}: {status} {text}");
        }
        Ok(v["value"].clone())
    }

    /// Presses and releases each key of `keys` in turn on the focused
    /// element, as a keyboard would (WebDriver key actions; special keys
    /// as `fantoccini::key::Key` code points).
    pub async fn keys(&self, keys: &[char]) -> Result<()> {
        use fantoccini::actions::{InputSource, KeyAction, KeyActions};
        let mut a = KeyActions::new("keyboard".into());
        for &k in keys {
            a = a
                .then(KeyAction::Down { value: k })
                .then(KeyAction::Up { value: k });
        }
        self.c.perform_actions(a).await?;
        Ok(())
    }

    /// Shift+Tab.
    pub async fn shift_tab(&self) -> Result<()> {
        use fantoccini::actions::{InputSource, KeyAction, KeyActions};
        let (shift, tab) = (
            key(fantoccini::key::Key::Shift),
            key(fantoccini::key::Key::Tab),
        );
        let a = KeyActions::new("keyboard".into())
            .then(KeyAction::Down { value: shift })
            .then(KeyAction::Down { value: tab })
            .then(KeyAction::Up { value: tab })
            .then(KeyAction::Up { value: shift });
        self.c.perform_actions(a).await?;
        Ok(())
    }

    /// The focused element: its id, whether it matches `css`, and whether
    /// its focus is visible without relying on colour (an outline at
    /// least 2px wide, or a box shadow).
    pub async fn focused(&self, css: &str) -> Result<Value> {
        Ok(self
            .c
            .execute(
                "const e = document.activeElement; \
                 if (!e || e === document.body) return {id: null, matches: false, visible: false, what: 'body'}; \
                 const s = getComputedStyle(e); \
                 const outline = s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) >= 2; \
                 const shadow = s.boxShadow && s.boxShadow !== 'none'; \
                 return {id: e.id || null, matches: e.matches(arguments[0]), visible: outline || !!shadow, \
                         what: e.outerHTML.slice(0, 100)};",
                vec![json!(css)],
            )
            .await?)
    }

    /// Presses Tab (Shift+Tab when `back`) until the focus is on `css`,
    /// at most `max` times; every element the focus passes shows it.
    pub async fn tab_to(&self, css: &str, back: bool, max: usize) -> Result<()> {
        for _ in 0..max {
            if back {
                self.shift_tab().await?;
            } else {
                self.keys(&[key(fantoccini::key::Key::Tab)]).await?;
            }
            let f = self.focused(css).await?;
            if f["what"] != json!("body") && f["visible"] != json!(true) {
                bail!("focus not visible on {}", f["what"]);
            }
            if f["matches"] == json!(true) {
                return Ok(());
            }
        }
        bail!("{css} not reached with {max} presses of (Shift+)Tab")
    }

    /// The current page printed (WebDriver Print, A4) into
    /// `target/screenshots/NAME.pdf` beside the screenshots; its bytes.
    pub async fn print_pdf(&self, name: &str) -> Result<Vec<u8>> {
        let cfg = fantoccini::wd::PrintConfiguration::builder()
            .build()
            .map_err(|e| anyhow!("{e}"))?;
        let pdf = self.c.print(cfg).await?;
        anyhow::ensure!(pdf.starts_with(b"%PDF-"), "{name}: not a PDF");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("{name}.pdf")), &pdf)?;
        Ok(pdf)
    }

    /// Runs `script` with the page rendered as for print (CSS print
    /// media), then renders it for the screen again; the script's value.
    pub async fn as_printed(&self, script: &str) -> Result<Value> {
        self.cdp("Emulation.setEmulatedMedia", json!({"media": "print"}))
            .await?;
        let v = self.js(script).await;
        self.cdp("Emulation.setEmulatedMedia", json!({"media": ""}))
            .await?;
        v
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

    /// Finds `css` and runs `act` on it. The screens re-render parts of
    /// the page as data arrives, so an element found a moment ago may be
    /// replaced before the action reaches it (a stale element reference);
    /// then the element is found again, as a user's next tap would. Any
    /// other error, or staleness past the deadline, is returned.
    async fn on_element<T, F, Fut>(&self, css: &str, act: F) -> Result<T>
    where
        F: Fn(Element) -> Fut,
        Fut: std::future::Future<Output = Result<T, CmdError>>,
    {
        let start = Instant::now();
        loop {
            let r = match self.c.find(Locator::Css(css)).await {
                Ok(e) => act(e).await,
                Err(e) => Err(e),
            };
            match r {
                Err(e) if e.is_stale_element_reference() && start.elapsed() < DEADLINE => {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                r => return r.with_context(|| format!("element {css}")),
            }
        }
    }

    pub async fn text(&self, css: &str) -> Result<String> {
        self.on_element(css, |e| async move { e.text().await })
            .await
    }

    pub async fn fill(&self, css: &str, value: &str) -> Result<()> {
        self.on_element(css, |e| async move { e.clear().await })
            .await?;
        // Values go in through the DOM so every character (bidi marks,
        // variation selectors) arrives exactly; then the page's own events.
        self.c
            .execute(
                "const e = document.querySelector(arguments[0]); e.value = arguments[1]; \
                 e.dispatchEvent(new Event('input', {bubbles: true}));",
                vec![json!(css), json!(value)],
            )
            .await?;
        Ok(())
    }

    /// Clicks a button that posts a form and waits until the next page is
    /// there and `script` is truthy on it.
    pub async fn submit(&self, css: &str, what: &str, script: &str) -> Result<serde_json::Value> {
        self.js("window.__oldPage = true;").await?;
        self.click(css).await?;
        let guarded = format!("if (window.__oldPage) return null; {script}");
        self.wait_js(what, &guarded).await
    }

    pub async fn click(&self, css: &str) -> Result<()> {
        self.on_element(css, |e| async move { e.click().await })
            .await
    }

    /// No dialog is open and no payload ran or became an element.
    pub async fn assert_no_injection(&self, what: &str) -> Result<()> {
        if let Ok(t) = self.c.get_alert_text().await {
            bail!("{what}: a dialog opened: {t}");
        }
        let v = self
            .js("return {xss: window.__xss || 0, els: document.querySelectorAll('[data-xss]').length};")
            .await?;
        if v["xss"] != json!(0) || v["els"] != json!(0) {
            bail!("{what}: a payload ran or became markup: {v}");
        }
        Ok(())
    }

    /// A screenshot of the top of the page.
    pub async fn screenshot(&self, name: &str) -> Result<()> {
        self.js("window.scrollTo(0, 0);").await?;
        self.shot(name).await
    }

    /// A screenshot with the element `css` scrolled to the top.
    pub async fn screenshot_at(&self, name: &str, css: &str) -> Result<()> {
        self.c
            .execute(
                "const e = document.querySelector(arguments[0]); if (e) e.scrollIntoView({block: 'start'});",
                vec![json!(css)],
            )
            .await?;
        self.shot(name).await
    }

    async fn shot(&self, name: &str) -> Result<()> {
        let png = self.c.screenshot().await?;
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("{name}.png")), &png)?;
        if std::env::var_os("KIZUNA_UPDATE_DOCS").is_some() {
            let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/screenshots");
            std::fs::create_dir_all(&docs)?;
            std::fs::write(docs.join(format!("{name}.png")), &png)?;
        }
        Ok(())
    }

    pub async fn close(self) {
        let Browser { c, mut driver, .. } = self;
        let _ = c.close().await;
        let _ = driver.kill();
        let _ = driver.wait();
    }
}

// ----- a mail relay ----------------------------------------------------------

/// A plaintext SMTP relay on loopback for headquarters' family mail. What
/// it does with a message depends on its recipient's local part:
/// `…+fail` is refused for good (550 at RCPT), `…+later` is refused for now
/// (451 at RCPT), `…+cut` loses the connection after the message was sent
/// but before it was acknowledged, anything else is accepted.
pub struct FakeSmtp {
    pub port: u16,
}

impl FakeSmtp {
    pub fn start() -> Result<FakeSmtp> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = smtp_session(s);
                });
            }
        });
        Ok(FakeSmtp { port })
    }

    /// The `[smtp]` section of headquarters' config for this relay.
    pub fn config(&self) -> String {
        format!(
            "[smtp]\nhost = \"127.0.0.1\"\nport = {}\nfrom = \"kizuna@example.org\"\ntls = \"none\"\ntimeout_secs = 10\ndata_timeout_secs = 10\n",
            self.port
        )
    }
}

fn smtp_session(s: std::net::TcpStream) -> std::io::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    w.write_all(b"220 relay.test ESMTP\r\n")?;
    let mut rcpt = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_ascii_uppercase();
        if cmd.starts_with("EHLO") || cmd.starts_with("HELO") {
            w.write_all(b"250-relay.test\r\n250 8BITMIME\r\n")?;
        } else if cmd.starts_with("MAIL FROM") || cmd.starts_with("RSET") || cmd.starts_with("NOOP")
        {
            w.write_all(b"250 2.0.0 ok\r\n")?;
        } else if cmd.starts_with("RCPT TO") {
            rcpt = cmd.clone();
            if cmd.contains("+FAIL@") {
                w.write_all(b"550 5.1.1 mailbox unavailable\r\n")?;
            } else if cmd.contains("+LATER@") {
                w.write_all(b"451 4.3.0 try again later\r\n")?;
            } else {
                w.write_all(b"250 2.1.5 ok\r\n")?;
            }
        } else if cmd == "DATA" {
            w.write_all(b"354 go ahead\r\n")?;
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                if line == ".\r\n" || line == ".\n" {
                    break;
                }
            }
            if rcpt.contains("+CUT@") {
                // The message went through; its acknowledgement never comes.
                return Ok(());
            }
            w.write_all(b"250 2.0.0 queued\r\n")?;
        } else if cmd.starts_with("QUIT") {
            w.write_all(b"221 2.0.0 bye\r\n")?;
            return Ok(());
        } else {
            w.write_all(b"502 5.5.2 not implemented\r\n")?;
        }
    }
}

/// An HTTP/1.1 request with a binary body on loopback, the connection
/// closed after the answer (chromedriver does not answer HTTP/1.0):
/// (status, body).
pub fn http_bytes(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut all = req.into_bytes();
    all.extend_from_slice(body);
    s.set_read_timeout(Some(DEADLINE))?;
    s.write_all(&all)?;
    // Read the head, then exactly Content-Length bytes: a server may keep
    // the connection open whatever the request said.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed before the response head");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad response: {head}"))?;
    let len = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    let mut body = buf[head_end + 4..].to_vec();
    match len {
        Some(len) => {
            while body.len() < len {
                let n = s.read(&mut chunk)?;
                if n == 0 {
                    bail!("connection closed inside the body");
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        None => {
            s.read_to_end(&mut body)?;
        }
    }
    Ok((status, String::from_utf8_lossy(&body).to_string()))
}

/// Pages in a PDF as Chromium writes it (one `/Type /Page` object each).
pub fn pdf_pages(pdf: &[u8]) -> usize {
    let pat = b"/Type /Page";
    pdf.windows(pat.len() + 1)
        .filter(|w| &w[..pat.len()] == pat && w[pat.len()] != b's')
        .count()
}
