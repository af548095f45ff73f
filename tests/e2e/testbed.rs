//! A real mesh of `kizuna run` processes in network namespaces.
//!
//! [`Testbed::new`] brings up namespaces with `deploy/testbed/netns.sh`
//! (each testbed has its own bridge namespace, so two testbeds never share
//! a link), creates a CA and one certificate per node with `kizuna certs`,
//! writes each node's config, imports a synthetic registry at hq (the
//! demo's generator) and registers the shelters there, and adds one API
//! operator per node. Dropping the testbed — also while unwinding from a
//! failed assertion — kills every node and removes the namespaces.
//!
//! HTTP: every node binds its API to 127.0.0.1 *inside its namespace*, as
//! the example config does, and the tests call it with
//! `ip netns exec NS curl …`. The alternative (binding the API to the
//! namespace address and routing to the bridge from the root namespace)
//! would put API traffic on the faulted link: nftables loss and cuts would
//! then hit the test's own observations. Faults are on the veth only, so
//! the API stays reachable whatever the mesh suffers.
//!
//! The binary: `CARGO_BIN_EXE_kizuna` exists only for tests of the package
//! that owns the binary (`node`), so this package finds `kizuna` next to
//! its own test executable (`target/<profile>/deps/..`), or at `$KIZUNA_BIN`.
//! Build it first: `cargo build --release -p node --bin kizuna`.
#![allow(dead_code)]

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Tests share the machine (CPU, the `ip netns` list): one testbed at a time
/// per process. nextest runs each test in its own process; its `e2e` test
/// group (max-threads = 1) serialises those.
static SERIAL: Mutex<()> = Mutex::new(());

pub const HQ: &str = "hq";
pub const SHELTER: &str = "shelter";
pub const CLINIC: &str = "clinic";
pub const AMBULANCE: &str = "ambulance";

pub fn kizuna_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KIZUNA_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("kizuna");
    assert!(
        bin.exists(),
        "{} missing: build it first with `cargo build --release -p node --bin kizuna` (same profile as the tests) or set KIZUNA_BIN",
        bin.display()
    );
    bin
}

pub fn netns_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/testbed/netns.sh")
}

/// Runs `netns.sh ARGS`; fails with its stderr.
pub fn netns(args: &[&str]) -> Result<()> {
    let out = Command::new("bash")
        .arg(netns_script())
        .args(args)
        .output()
        .context("running netns.sh")?;
    if !out.status.success() {
        bail!(
            "netns.sh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Where the nodes live.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Layout {
    /// One namespace per node (`PREFIX-i`, 10.77.0.i), QUIC on port 7700.
    Mesh,
    /// Every node in one namespace `PREFIX-1`, QUIC on 127.0.0.1:7700+i.
    Loopback,
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub id: &'static str,
    pub role: &'static str,
    /// Node ids dialled as static peers.
    pub static_peers: Vec<&'static str>,
}

pub fn spec(id: &'static str, role: &'static str) -> Spec {
    Spec {
        id,
        role,
        static_peers: Vec::new(),
    }
}

pub struct Node {
    pub id: String,
    pub role: String,
    pub ns: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub quic: String,
    pub http_port: u16,
    pub token: String,
    child: Option<Child>,
}

impl Node {
    pub fn db(&self) -> PathBuf {
        self.dir.join("data").join("kizuna.db")
    }
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

pub struct Testbed {
    pub prefix: String,
    pub layout: Layout,
    pub nodes: Vec<Node>,
    /// (household id, person id) of the registry, in file order.
    pub persons: Vec<(String, String)>,
    pub dir: tempfile::TempDir,
    exports: usize,
    passed: bool,
    _serial: MutexGuard<'static, ()>,
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            if let Some(mut c) = self.nodes[i].child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if let Err(e) = netns(&["down", &self.prefix]) {
            eprintln!("testbed cleanup: {e:#}");
        }
        if !self.passed || std::env::var_os("KIZUNA_E2E_KEEP").is_some() {
            // Keep logs and databases of a failed run for inspection.
            for n in &self.nodes {
                eprintln!("--- {} log tail ---\n{}", n.id, self.log_tail(&n.id));
            }
            let path = std::mem::replace(&mut self.dir, tempfile::TempDir::new().expect("tmp"));
            eprintln!("testbed kept at {}", path.keep().display());
        }
    }
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Testbed {
    /// `tag`: a few letters naming the test (namespaces are
    /// `kz<tag><pid>-i`). `households`: registry size at hq.
    pub fn new(
        tag: &str,
        layout: Layout,
        specs: &[Spec],
        households: usize,
        mdns: bool,
    ) -> Result<Testbed> {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let prefix = format!("kz{tag}{}", std::process::id() % 100_000);
        let _ = netns(&["down", &prefix]);
        let mut tb = Testbed {
            prefix,
            layout,
            nodes: Vec::new(),
            persons: Vec::new(),
            dir: tempfile::Builder::new().prefix("kizuna-e2e-").tempdir()?,
            exports: 0,
            passed: false,
            _serial: serial,
        };
        let n = match layout {
            Layout::Mesh => specs.len(),
            Layout::Loopback => 1,
        };
        netns(&["up", &n.to_string(), &tb.prefix])?;
        tb.setup(specs, households, mdns)?;
        Ok(tb)
    }

    fn setup(&mut self, specs: &[Spec], households: usize, mdns: bool) -> Result<()> {
        let bin = kizuna_bin();
        let root = self.dir.path().to_path_buf();
        let ca = root.join("ca");
        run_ok(
            Command::new(&bin)
                .args(["certs", "init-ca", "--name", "Kizuna E2E CA", "--dir"])
                .arg(&ca),
        )?;
        let addr = |i: usize| match self.layout {
            Layout::Mesh => (
                format!("{}-{}", self.prefix, i + 1),
                format!("10.77.0.{}:7700", i + 1),
                7780u16,
            ),
            Layout::Loopback => (
                format!("{}-1", self.prefix),
                format!("127.0.0.1:{}", 7700 + i),
                7800 + i as u16,
            ),
        };
        for (i, s) in specs.iter().enumerate() {
            let nd = root.join(s.id);
            std::fs::create_dir_all(&nd)?;
            run_ok(
                Command::new(&bin)
                    .args(["certs", "issue", "--days", "30", "--role", s.role])
                    .args(["--node-id", s.id, "--ca-dir"])
                    .arg(&ca)
                    .arg("--out")
                    .arg(nd.join("certs")),
            )?;
            let (ns, quic, http) = addr(i);
            let mut cfg = format!(
                "data_dir = \"data\"\n\n[certs]\ndir = \"certs\"\n\n[net]\nlisten = \"{quic}\"\nmdns = {mdns}\n"
            );
            for p in &s.static_peers {
                let j = specs
                    .iter()
                    .position(|x| x.id == *p)
                    .ok_or_else(|| anyhow!("unknown static peer {p}"))?;
                cfg.push_str(&format!(
                    "\n[[net.static_peers]]\nnode_id = \"{p}\"\naddr = \"{}\"\n",
                    addr(j).1
                ));
            }
            cfg.push_str(&format!("\n[http]\nbind = \"127.0.0.1:{http}\"\n"));
            let config = nd.join("kizuna.toml");
            std::fs::write(&config, cfg)?;
            let token = run_ok(
                Command::new(&bin)
                    .args(["operator", "add", "--name", "e2e", "--data-dir"])
                    .arg(nd.join("data")),
            )?
            .trim()
            .to_string();
            self.nodes.push(Node {
                id: s.id.to_string(),
                role: s.role.to_string(),
                ns,
                dir: nd,
                config,
                quic,
                http_port: http,
                token,
                child: None,
            });
        }
        // Registry and shelters at hq, before it first runs.
        let hq = specs
            .iter()
            .position(|s| s.role == HQ)
            .ok_or_else(|| anyhow!("a testbed needs an hq node"))?;
        let csv = node::demo::synthetic_registry(households, 1);
        for line in csv.lines().skip(1) {
            let f: Vec<&str> = line.split(',').collect();
            self.persons.push((f[0].to_string(), f[2].to_string()));
        }
        let csv_path = root.join("registry.csv");
        std::fs::write(&csv_path, csv)?;
        let hq_data = self.nodes[hq].data_dir();
        run_ok(
            Command::new(&bin)
                .args(["registry", "import", "--encoding", "utf8", "--node-id"])
                .arg(&self.nodes[hq].id)
                .arg("--data-dir")
                .arg(&hq_data)
                .arg(&csv_path),
        )?;
        let shelters: Vec<(&str, &str)> = specs
            .iter()
            .filter(|s| s.role == SHELTER)
            .map(|s| (s.id, s.id))
            .collect();
        if !shelters.is_empty() {
            node::demo::put_shelters(&hq_data, &self.nodes[hq].id, &shelters)
                .map_err(|e| anyhow!("put_shelters: {}", e.message))?;
        }
        Ok(())
    }

    /// Ends a passing test: the testbed directory is removed on drop
    /// (otherwise it is kept, and every node's log tail printed).
    pub fn passed(mut self) -> Result<()> {
        self.passed = true;
        Ok(())
    }

    pub fn idx(&self, id: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    pub fn ns(&self, id: &str) -> String {
        self.nodes[self.idx(id)].ns.clone()
    }

    /// Starts `kizuna run` in the node's namespace (log: `<node>/kizuna.log`).
    pub fn spawn(&mut self, id: &str) -> Result<()> {
        let i = self.idx(id);
        let n = &mut self.nodes[i];
        assert!(n.child.is_none(), "{id} already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.dir.join("kizuna.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &n.ns])
            .arg(kizuna_bin())
            .arg("run")
            .arg("--config")
            .arg(&n.config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        n.child = Some(child);
        Ok(())
    }

    /// Starts the nodes, then waits until each answers `/api/v1/status`.
    pub fn start(&mut self, ids: &[&str]) -> Result<()> {
        for id in ids {
            self.spawn(id)?;
        }
        for id in ids {
            self.wait_ready(id)?;
        }
        Ok(())
    }

    pub fn start_all(&mut self) -> Result<()> {
        let ids: Vec<String> = self.nodes.iter().map(|n| n.id.clone()).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        self.start(&ids)
    }

    pub fn wait_ready(&mut self, id: &str) -> Result<()> {
        let i = self.idx(id);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.nodes[i].child.as_mut().expect("spawned").try_wait()? {
                self.nodes[i].child = None;
                bail!("{id} exited during start-up ({st}): {}", self.log_tail(id));
            }
            if let Ok((200, _)) = self.api(id, "GET", "/api/v1/status", None) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{id} did not answer /api/v1/status: {}", self.log_tail(id));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_tail(&self, id: &str) -> String {
        let s = std::fs::read_to_string(self.nodes[self.idx(id)].dir.join("kizuna.log"))
            .unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM, then wait (SIGKILL after a grace period).
    pub fn stop(&mut self, id: &str) -> Result<()> {
        let i = self.idx(id);
        let Some(mut c) = self.nodes[i].child.take() else {
            return Ok(());
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = c.try_wait()? {
                if !st.success() {
                    bail!("{id} exited with {st} on SIGTERM: {}", self.log_tail(id));
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("{id} did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL (`ip netns exec` execs kizuna, so the child is the node).
    pub fn kill9(&mut self, id: &str) -> Result<()> {
        let i = self.idx(id);
        if let Some(mut c) = self.nodes[i].child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// One HTTP request to a node's API from inside its namespace.
    /// Returns (status, JSON body); status 0 if the connection failed.
    pub fn api(
        &self,
        id: &str,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
        let n = &self.nodes[self.idx(id)];
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns", "exec", &n.ns, "curl", "-sS", "-m", "20", "-X", method,
        ])
        .arg("-H")
        .arg(format!("Authorization: Bearer {}", n.token))
        .args(["-w", "\n%{http_code}"]);
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data-binary"])
                .arg(b.to_string());
        }
        cmd.arg(format!("http://127.0.0.1:{}{path}", n.http_port));
        let out = cmd.output().context("spawning curl")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_ref()));
        let code: u16 = code.trim().parse().unwrap_or(0);
        let v = serde_json::from_str(body).unwrap_or(Value::Null);
        Ok((code, v))
    }

    pub fn status(&self, id: &str) -> Result<Value> {
        match self.api(id, "GET", "/api/v1/status", None)? {
            (200, v) => Ok(v),
            (c, v) => bail!("{id} status: {c} {v}"),
        }
    }

    /// Node ids of the peers `/api/v1/status` shows connected.
    pub fn connected(&self, id: &str) -> Result<BTreeSet<String>> {
        let s = self.status(id)?;
        Ok(s["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["connected"] == json!(true))
            .filter_map(|p| p["node_id"].as_str().map(str::to_string))
            .collect())
    }

    /// `GET /api/v1/persons/{id}`: `None` on 404.
    pub fn person(&self, node: &str, person: &str) -> Result<Option<Value>> {
        match self.api(node, "GET", &format!("/api/v1/persons/{person}"), None)? {
            (200, v) => Ok(Some(v)),
            (404, _) => Ok(None),
            (c, v) => bail!("{node} person {person}: {c} {v}"),
        }
    }

    /// Check-in at a shelter node (its own shelter). Returns the status
    /// and body; `op` is the idempotency key.
    pub fn checkin(&self, node: &str, persons: &[&str], op: &str) -> Result<(u16, Value)> {
        self.api(
            node,
            "POST",
            "/api/v1/checkins",
            Some(&json!({"person_ids": persons, "op_id": op})),
        )
    }

    /// `kizuna docs export` of a stopped node's database (the export is
    /// audited, so it needs the data directory to itself). Returns the
    /// export directory.
    pub fn export(&mut self, id: &str) -> Result<PathBuf> {
        self.exports += 1;
        let out = self
            .dir
            .path()
            .join(format!("export-{id}-{}", self.exports));
        let n = &self.nodes[self.idx(id)];
        run_ok(
            Command::new(kizuna_bin())
                .args(["docs", "export", "--data-dir"])
                .arg(n.data_dir())
                .arg("--out")
                .arg(&out),
        )?;
        Ok(out)
    }

    /// Document ids per kind in a node's export.
    pub fn kinds(&mut self, id: &str) -> Result<BTreeMap<String, BTreeSet<String>>> {
        let out = self.export(id)?;
        let index: Value = serde_json::from_slice(&std::fs::read(out.join("index.json"))?)?;
        let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for d in index["documents"].as_array().into_iter().flatten() {
            m.entry(d["kind"].as_str().unwrap_or("").to_string())
                .or_default()
                .insert(d["id"].as_str().unwrap_or("").to_string());
        }
        Ok(m)
    }

    /// The presence event ids a running node holds for `persons`, from
    /// each person's history (`GET /api/v1/persons/{id}/history`).
    pub fn event_ids(&self, node: &str, persons: &[String]) -> Result<BTreeSet<String>> {
        let mut ids = BTreeSet::new();
        for p in persons {
            let path = format!("/api/v1/persons/{p}/history");
            match self.api(node, "GET", &path, None)? {
                (200, v) => ids.extend(
                    v["events"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|e| e["event_id"].as_str().map(str::to_string)),
                ),
                (c, v) => bail!("{node} history of {p}: {c} {v}"),
            }
        }
        Ok(ids)
    }
}

/// Polls `f` until it returns `Some`, or fails after `limit` (a hang guard,
/// not a timing assertion) with the last observation.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Result<std::result::Result<T, String>>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        let last = match f() {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(state)) => state,
            Err(e) => format!("error: {e:#}"),
        };
        if Instant::now() > deadline {
            bail!("gave up waiting for {what} after {limit:?}; last: {last}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
