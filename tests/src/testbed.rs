//! The namespace testbed: an N-node Kizuna mesh on one Linux machine, run
//! from the built `kizuna` binary. `deploy/testbed` (the `kizuna-testbed`
//! binary) is its command line; the end-to-end tests drive that same
//! command, and the chain benchmark uses this library directly.
//!
//! Model. A testbed has a name and a directory. Everything it makes is
//! named after it, so two testbeds never touch each other's parts:
//!
//! - network namespaces `NAME-1..N` (one per node) and `NAME-br`, which
//!   holds the bridge. Each node's `eth0` is one end of a veth pair whose
//!   other end (`v<i>`) is a bridge port; both ends are created directly
//!   inside their namespaces, so nothing ever appears in the root
//!   namespace, and the nodes' 10.77.0.0/24 addresses exist only behind
//!   that private bridge;
//! - nftables tables `inet kizuna_tb` (partitions) and `inet
//!   kizuna_tb_loss` inside the node namespaces only;
//! - in `DIR`: a CA, one certificate, config, data directory and log per
//!   node, the synthetic registry, and `testbed.json` (the state every
//!   later command reads);
//! - one `kizuna run` process per running node, inside its namespace.
//!
//! [`down`] removes all of it: it kills every process found inside the
//! testbed's namespaces (not only the ones it remembers starting), deletes
//! the namespaces (their veths and nftables tables go with them) and the
//! directory. It works from the state file or, when that is missing or
//! damaged, from the namespace names alone. A failed [`up`] runs the same
//! cleanup before it returns its error.
//!
//! Faults: a partition adds the other side's addresses to a drop set on
//! each node's `eth0` (QUIC and mDNS both stop); loss drops a percentage of
//! incoming UDP at random; isolation takes the node's bridge port down.
//! Every node's HTTP API and metrics listen on 127.0.0.1 *inside* its
//! namespace, so faults never hit the operator's (or a test's) own view:
//! reach them with `ip netns exec NAME-i curl http://127.0.0.1:7780/...`
//! (`deploy/testbed api` does this with the node's token).

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A node's storage key file (ambulance nodes), beside its config.
pub const STORAGE_KEY_FILE: &str = "storage.key";

pub const STATE_FILE: &str = "testbed.json";
pub const SUBNET: &str = "10.77.0";
pub const QUIC_PORT: u16 = 7700;
pub const HTTP_PORT: u16 = 7780;
pub const METRICS_PORT: u16 = 7781;
/// How long a starting node may take to answer `/api/v1/status`.
pub const READY_WITHIN: Duration = Duration::from_secs(90);

/// Where the nodes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// One namespace per node (`NAME-i`, 10.77.0.i), QUIC on port 7700.
    Mesh,
    /// Every node in the one namespace `NAME-1`, QUIC on 127.0.0.1:7700+i
    /// (HTTP 7800+i, metrics 7900+i); partitions and loss are not offered.
    Loopback,
}

/// One node to make.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub id: String,
    pub role: String,
    /// Node ids dialled as static peers.
    pub static_peers: Vec<String>,
}

/// What `up` makes.
#[derive(Clone, Debug)]
pub struct Plan {
    pub nodes: Vec<NodeSpec>,
    pub households: usize,
    pub seed: u64,
    pub mdns: bool,
    pub layout: Layout,
    /// Start the nodes (false: only provision them; `start` later).
    pub start: bool,
}

impl Plan {
    /// The usual mesh: `hq` headquarters nodes (`hq-1`..), shelters
    /// `shelter-01`.., clinics `clinic-1`.., ambulances `ambulance-1`..,
    /// facilities `facility-1`..; with `hub`, every other node has the
    /// first hq as a static peer (as in the field: mDNS on the LAN, the
    /// static peer over the satellite link).
    pub fn roles(
        hq: usize,
        shelters: usize,
        clinics: usize,
        ambulances: usize,
        facilities: usize,
        hub: bool,
    ) -> Vec<NodeSpec> {
        let mut v = Vec::new();
        let mut add = |id: String, role: &str| {
            let static_peers = if hub && role != "hq" && hq > 0 {
                vec!["hq-1".to_string()]
            } else {
                vec![]
            };
            v.push(NodeSpec {
                id,
                role: role.into(),
                static_peers,
            })
        };
        for i in 1..=hq {
            add(format!("hq-{i}"), "hq");
        }
        for i in 1..=shelters {
            add(format!("shelter-{i:02}"), "shelter");
        }
        for i in 1..=clinics {
            add(format!("clinic-{i}"), "clinic");
        }
        for i in 1..=ambulances {
            add(format!("ambulance-{i}"), "ambulance");
        }
        for i in 1..=facilities {
            add(format!("facility-{i}"), "facility");
        }
        v
    }
}

/// One node as `testbed.json` records it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeState {
    pub id: String,
    pub role: String,
    pub ns: String,
    /// The node's IP address on the mesh (127.0.0.1 in the loopback layout).
    pub addr: String,
    pub quic: String,
    pub http_port: u16,
    pub metrics_port: u16,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// Bearer token of the `testbed` operator.
    pub token: String,
    /// One-time sign-in link for the browser, when this build offers them.
    pub signin: Option<String>,
    pub static_peers: Vec<String>,
    /// The `kizuna run` process, while the testbed believes it runs.
    pub pid: Option<u32>,
}

impl NodeState {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("kizuna.log")
    }
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }
}

/// Faults in force.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Faults {
    /// (from, to): packets from `from` are dropped at `to`.
    pub blocked: BTreeSet<(String, String)>,
    pub isolated: BTreeSet<String>,
    pub loss: BTreeMap<String, u8>,
}

/// `testbed.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub name: String,
    pub layout: Layout,
    pub dir: PathBuf,
    pub kizuna: PathBuf,
    pub households: usize,
    pub persons: usize,
    pub registry_csv: PathBuf,
    pub nodes: Vec<NodeState>,
    pub faults: Faults,
}

// ----- commands ---------------------------------------------------------------

/// A command that must succeed; its stderr is the error.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run_ok(Command::new("ip").args(args))
}

fn nft(ns: &str, script: &str) -> Result<()> {
    use std::io::Write;
    let mut c = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning nft")?;
    c.stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    let out = c.wait_with_output()?;
    ensure!(
        out.status.success(),
        "nft in {ns} failed: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Names of the network namespaces that exist now.
pub fn namespaces() -> Result<BTreeSet<String>> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// The testbed's namespaces that exist now, by name pattern alone.
pub fn own_namespaces(name: &str) -> Result<Vec<String>> {
    Ok(namespaces()?
        .into_iter()
        .filter(|n| {
            n.strip_prefix(name)
                .and_then(|r| r.strip_prefix('-'))
                .is_some_and(|r| {
                    r == "br" || (!r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
                })
        })
        .collect())
}

/// A testbed name: `[a-z0-9]`, then `[a-z0-9-]`, at most 24 bytes (it
/// prefixes namespace names and is never a path).
pub fn check_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 24
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-'),
        "testbed name {name:?}: use a-z, 0-9 and '-', at most 24 characters"
    );
    Ok(())
}

/// Where a named testbed keeps its files unless `--dir` says otherwise.
pub fn default_dir(name: &str) -> PathBuf {
    PathBuf::from("/var/tmp/kizuna-testbed").join(name)
}

/// The `kizuna` binary: `$KIZUNA_BIN`, else next to this executable (or
/// its parent directory, for test executables in `deps/`).
pub fn find_kizuna() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KIZUNA_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("executable directory")?.to_path_buf();
    for _ in 0..2 {
        let bin = dir.join("kizuna");
        if bin.exists() {
            return Ok(bin);
        }
        dir.pop();
    }
    bail!("kizuna binary not found next to {}: build it with `cargo build --release -p node --bin kizuna`, or set KIZUNA_BIN", exe.display())
}

// ----- state ----------------------------------------------------------------

impl State {
    pub fn load(dir: &Path) -> Result<State> {
        let p = dir.join(STATE_FILE);
        let bytes = std::fs::read(&p)
            .with_context(|| format!("no testbed at {} (run `up` first)", dir.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("{} is damaged", p.display()))
    }

    pub fn save(&self) -> Result<()> {
        let p = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &p)?;
        Ok(())
    }

    pub fn idx(&self, id: &str) -> Result<usize> {
        self.nodes.iter().position(|n| n.id == id).ok_or_else(|| {
            anyhow!(
                "no node {id} in testbed {} (nodes: {})",
                self.name,
                self.nodes
                    .iter()
                    .map(|n| n.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    pub fn node(&self, id: &str) -> Result<&NodeState> {
        Ok(&self.nodes[self.idx(id)?])
    }

    /// Node ids named by `spec`: comma-separated node ids, roles
    /// (`shelter`) or `all`, in testbed order.
    pub fn select(&self, spec: &str) -> Result<Vec<String>> {
        let mut want = BTreeSet::new();
        for part in spec.split(',').map(str::trim) {
            let hits: Vec<&NodeState> = self
                .nodes
                .iter()
                .filter(|n| part == "all" || n.role == part || n.id == part)
                .collect();
            if hits.is_empty() {
                self.node(part)?; // the error names the nodes there are
            }
            want.extend(hits.iter().map(|n| n.id.clone()));
        }
        Ok(self
            .nodes
            .iter()
            .filter(|n| want.contains(&n.id))
            .map(|n| n.id.clone())
            .collect())
    }

    /// One HTTP request to a node's API from inside its namespace, with the
    /// testbed operator's token. Returns (status, JSON body); status 0 when
    /// nothing answered.
    pub fn api(
        &self,
        id: &str,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
        let n = self.node(id)?;
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
        let out = cmd.stdin(Stdio::null()).output().context("spawning curl")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_ref()));
        let code: u16 = code.trim().parse().unwrap_or(0);
        Ok((code, serde_json::from_str(body).unwrap_or(Value::Null)))
    }

    /// A GET of `url` from inside the node's namespace, without a token:
    /// (status, response headers). Status 0 when nothing answered.
    pub fn get_plain(&self, id: &str, url: &str) -> Result<(u16, String)> {
        let n = self.node(id)?;
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &n.ns,
                "curl",
                "-sS",
                "-m",
                "20",
                "-o",
                "/dev/null",
                "-D",
                "-",
            ])
            .args(["-w", "%{http_code}"])
            .arg(url)
            .stdin(Stdio::null())
            .output()
            .context("spawning curl")?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let code = text.get(text.len().saturating_sub(3)..).unwrap_or("");
        Ok((code.parse().unwrap_or(0), text))
    }

    /// The node's Prometheus text, scraped from inside its namespace.
    pub fn scrape(&self, id: &str) -> Result<String> {
        let n = self.node(id)?;
        run_ok(Command::new("ip").args([
            "netns",
            "exec",
            &n.ns,
            "curl",
            "-sSf",
            "-m",
            "20",
            &format!("http://127.0.0.1:{}/metrics", n.metrics_port),
        ]))
    }

    /// `/api/v1/status` of a node, or an error.
    pub fn status_of(&self, id: &str) -> Result<Value> {
        match self.api(id, "GET", "/api/v1/status", None)? {
            (200, v) => Ok(v),
            (c, v) => bail!("{id} status: {c} {v}"),
        }
    }

    pub fn log_tail(&self, id: &str, lines: usize) -> String {
        let Ok(n) = self.node(id) else {
            return String::new();
        };
        let s = std::fs::read_to_string(n.log()).unwrap_or_default();
        let v: Vec<&str> = s.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }
}

// ----- processes --------------------------------------------------------------

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

/// Whether `pid` is the `kizuna run` of this config (pids are reused).
fn is_node(pid: u32, config: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let c = String::from_utf8_lossy(&c);
            c.contains("run") && c.contains(&*config.to_string_lossy())
        })
        .unwrap_or(false)
        && alive(pid)
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Waits until none of `pids` is alive (SIGKILL after `grace`).
fn reap(pids: &[u32], grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() {
            return true;
        }
        if Instant::now() > deadline {
            for p in &left {
                signal(*p, "-KILL");
            }
            let hard = Instant::now() + Duration::from_secs(10);
            while pids.iter().any(|p| alive(*p)) && Instant::now() < hard {
                std::thread::sleep(Duration::from_millis(20));
            }
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Processes inside a namespace.
fn ns_pids(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

// ----- up ---------------------------------------------------------------------

/// Brings a testbed up: namespaces, CA, certificates, configs, registry,
/// operators, and (with `plan.start`) the running nodes. On any failure
/// everything made so far is removed before the error is returned.
pub fn up(name: &str, dir: &Path, kizuna: &Path, plan: &Plan) -> Result<State> {
    check_name(name)?;
    ensure!(!plan.nodes.is_empty(), "a testbed needs at least one node");
    ensure!(plan.nodes.len() <= 250, "at most 250 nodes");
    ensure!(
        plan.nodes.iter().any(|n| n.role == "hq"),
        "a testbed needs an hq node (it holds the registry)"
    );
    let existing = own_namespaces(name)?;
    ensure!(
        existing.is_empty() && !dir.join(STATE_FILE).exists(),
        "testbed {name} already exists ({}): run `down` first",
        if existing.is_empty() {
            dir.display().to_string()
        } else {
            existing.join(", ")
        }
    );
    ensure!(
        !dir.exists() || std::fs::read_dir(dir)?.next().is_none(),
        "{} is not empty: choose another --dir",
        dir.display()
    );
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let mut st = State {
        name: name.to_string(),
        layout: plan.layout,
        dir: dir.clone(),
        kizuna: kizuna.to_path_buf(),
        households: plan.households,
        persons: 0,
        registry_csv: dir.join("registry.csv"),
        nodes: Vec::new(),
        faults: Faults::default(),
    };
    match build(&mut st, plan) {
        Ok(()) => Ok(st),
        Err(e) => {
            let tails: Vec<String> = st
                .nodes
                .iter()
                .filter(|n| n.log().exists())
                .map(|n| format!("--- {} ---\n{}", n.id, st.log_tail(&n.id, 10)))
                .collect();
            let cleanup = down_named(name, Some(&st), true);
            let mut e = e.context(format!(
                "testbed {name}: up failed; everything it made was removed"
            ));
            if let Err(c) = cleanup {
                e = e.context(format!("cleanup after the failure also failed: {c:#}"));
            }
            if !tails.is_empty() {
                e = e.context(tails.join("\n"));
            }
            Err(e)
        }
    }
}

fn build(st: &mut State, plan: &Plan) -> Result<()> {
    let n = plan.nodes.len();
    let name = st.name.clone();
    // Network first (cheap to undo, and proves root and iproute2 work).
    match plan.layout {
        Layout::Mesh => {
            let br = format!("{name}-br");
            ip(&["netns", "add", &br])?;
            ip(&["-n", &br, "link", "set", "lo", "up"])?;
            ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
            // mDNS (224.0.0.251) must reach every port: no IGMP snooping.
            ip(&[
                "-n",
                &br,
                "link",
                "set",
                "br0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ])?;
            ip(&["-n", &br, "link", "set", "br0", "up"])?;
            for i in 1..=n {
                let ns = format!("{name}-{i}");
                ip(&["netns", "add", &ns])?;
                node_net(&br, &ns, i)?;
            }
        }
        Layout::Loopback => {
            let ns = format!("{name}-1");
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
    }
    for i in 1..=n {
        let ns = match plan.layout {
            Layout::Mesh => format!("{name}-{i}"),
            Layout::Loopback => format!("{name}-1"),
        };
        if plan.layout == Layout::Mesh || i == 1 {
            ensure_tables(&ns)?;
        }
    }
    // PKI.
    let ca = st.dir.join("ca");
    run_ok(
        Command::new(&st.kizuna)
            .args([
                "certs",
                "init-ca",
                "--name",
                &format!("Kizuna testbed {name}"),
                "--dir",
            ])
            .arg(&ca),
    )?;
    let addr_of = |i: usize| match plan.layout {
        Layout::Mesh => (
            format!("{name}-{}", i + 1),
            format!("{SUBNET}.{}", i + 1),
            QUIC_PORT,
            HTTP_PORT,
            METRICS_PORT,
        ),
        Layout::Loopback => (
            format!("{name}-1"),
            "127.0.0.1".to_string(),
            QUIC_PORT + i as u16,
            7800 + i as u16,
            7900 + i as u16,
        ),
    };
    for (i, s) in plan.nodes.iter().enumerate() {
        let nd = st.dir.join(&s.id);
        std::fs::create_dir_all(&nd)?;
        // Ambulance nodes encrypt their data at rest (their default): a
        // storage key, and the node key sealed with it at issue.
        let mut issue = Command::new(&st.kizuna);
        issue
            .args(["certs", "issue", "--days", "30", "--role", &s.role])
            .args(["--node-id", &s.id, "--ca-dir"])
            .arg(&ca)
            .arg("--out")
            .arg(nd.join("certs"));
        if s.role == "ambulance" {
            run_ok(
                Command::new(&st.kizuna)
                    .args(["certs", "keygen", "--out"])
                    .arg(nd.join(STORAGE_KEY_FILE)),
            )?;
            issue
                .arg("--storage-key-file")
                .arg(nd.join(STORAGE_KEY_FILE));
        }
        run_ok(&mut issue)?;
        let (ns, addr, quic, http, metrics) = addr_of(i);
        let mut cfg = format!(
            "# Written by deploy/testbed for node {} ({}).\ndata_dir = \"data\"\n\n[certs]\ndir = \"certs\"\n\n[net]\nlisten = \"{addr}:{quic}\"\nmdns = {}\n",
            s.id, s.role, plan.mdns
        );
        for p in &s.static_peers {
            let j = plan
                .nodes
                .iter()
                .position(|x| &x.id == p)
                .ok_or_else(|| anyhow!("{}: unknown static peer {p}", s.id))?;
            let (_, a, q, _, _) = addr_of(j);
            cfg.push_str(&format!(
                "\n[[net.static_peers]]\nnode_id = \"{p}\"\naddr = \"{a}:{q}\"\n"
            ));
        }
        cfg.push_str(&format!(
            "\n[http]\nbind = \"127.0.0.1:{http}\"\n\n[metrics]\nbind = \"127.0.0.1:{metrics}\"\n"
        ));
        if s.role == "ambulance" {
            cfg.push_str(&format!("\n[storage]\nkey_file = \"{STORAGE_KEY_FILE}\"\n"));
        }
        let config = nd.join("kizuna.toml");
        std::fs::write(&config, cfg)?;
        run_ok(
            Command::new(&st.kizuna)
                .args(["config", "check", "--role", &s.role])
                .arg(&config),
        )?;
        let token = run_ok(
            Command::new(&st.kizuna)
                .args(["operator", "add", "--name", "testbed", "--data-dir"])
                .arg(nd.join("data")),
        )?
        .trim()
        .to_string();
        st.nodes.push(NodeState {
            id: s.id.clone(),
            role: s.role.clone(),
            ns,
            addr: addr.clone(),
            quic: format!("{addr}:{quic}"),
            http_port: http,
            metrics_port: metrics,
            dir: nd,
            config,
            token,
            signin: None,
            static_peers: s.static_peers.clone(),
            pid: None,
        });
        st.save()?;
    }
    // The registry and the shelters, at the first hq before it first runs.
    let hq = plan
        .nodes
        .iter()
        .position(|s| s.role == "hq")
        .expect("checked");
    std::fs::write(
        &st.registry_csv,
        node::demo::synthetic_registry(plan.households, plan.seed),
    )?;
    let hq_data = st.nodes[hq].data_dir();
    let out = run_ok(
        Command::new(&st.kizuna)
            .args(["registry", "import", "--encoding", "utf8", "--node-id"])
            .arg(&st.nodes[hq].id)
            .arg("--data-dir")
            .arg(&hq_data)
            .arg(&st.registry_csv),
    )?;
    st.persons = out
        .split_whitespace()
        .skip_while(|w| *w != "households,")
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap_or(0);
    let shelters: Vec<(&str, &str)> = plan
        .nodes
        .iter()
        .filter(|s| s.role == "shelter" || s.role == "facility")
        .map(|s| (s.id.as_str(), s.id.as_str()))
        .collect();
    if !shelters.is_empty() {
        node::demo::put_shelters(&hq_data, &st.nodes[hq].id, &shelters)
            .map_err(|e| anyhow!("registering shelters at hq: {}", e.message))?;
    }
    st.save()?;
    if plan.start {
        let ids: Vec<String> = st.nodes.iter().map(|n| n.id.clone()).collect();
        start(st, &ids)?;
    }
    Ok(())
}

/// Gives namespace `ns` (node `i`) its end of a veth into the bridge.
fn node_net(br: &str, ns: &str, i: usize) -> Result<()> {
    let port = format!("v{i}");
    ip(&[
        "link", "add", &port, "netns", br, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    ip(&["-n", br, "link", "set", &port, "master", "br0"])?;
    ip(&["-n", br, "link", "set", &port, "up"])?;
    run_ok(
        Command::new("ip")
            .args(["netns", "exec", ns, "sysctl", "-qw"])
            .args([
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ]),
    )?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{SUBNET}.{i}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", ns, "link", "set", "eth0", "multicast", "on"])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    ip(&["-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0"])?;
    Ok(())
}

/// The partition table of a namespace: a drop set for whole addresses
/// (mesh) and one for port pairs (loopback layout).
fn ensure_tables(ns: &str) -> Result<()> {
    nft(
        ns,
        "table inet kizuna_tb {
    set blocked { type ipv4_addr; }
    set blocked_ports { type inet_service . inet_service; }
    chain input {
        type filter hook input priority 0; policy accept;
        iifname \"eth0\" ip saddr @blocked drop
        iifname \"lo\" udp sport . udp dport @blocked_ports drop
    }
}
",
    )
}

// ----- start, stop, kill ----------------------------------------------------

/// Starts the named nodes that are not running, then waits until each
/// answers `/api/v1/status`.
pub fn start(st: &mut State, ids: &[String]) -> Result<()> {
    for id in ids {
        let i = st.idx(id)?;
        let n = &st.nodes[i];
        if n.pid.is_some_and(|p| is_node(p, &n.config)) {
            continue;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.log())?;
        use std::os::unix::process::CommandExt;
        let child = Command::new("ip")
            .args(["netns", "exec", &n.ns])
            .arg(&st.kizuna)
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
            // Its own process group: a Ctrl-C at the testbed's terminal
            // does not reach the nodes; `down` ends them.
            .process_group(0)
            .spawn()
            .context("spawning kizuna run")?;
        // `ip netns exec` execs kizuna: the child's pid is the node's.
        st.nodes[i].pid = Some(child.id());
        // Not waited for (dropping a Child neither kills nor reaps it): the
        // node outlives this command.
        drop(child);
    }
    st.save()?;
    for id in ids {
        wait_ready(st, id)?;
    }
    for id in ids {
        ensure_signin(st, id);
    }
    st.save()
}

fn wait_ready(st: &State, id: &str) -> Result<()> {
    let n = st.node(id)?;
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        let pid = n.pid.expect("started");
        if !alive(pid) {
            bail!("{id} exited during start-up:\n{}", st.log_tail(id, 20));
        }
        if let Ok((200, _)) = st.api(id, "GET", "/api/v1/status", None) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{id} did not answer /api/v1/status within {READY_WITHIN:?}:\n{}",
                st.log_tail(id, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A one-time sign-in link, when this `kizuna` offers `operator link`.
fn ensure_signin(st: &mut State, id: &str) {
    let Ok(i) = st.idx(id) else { return };
    if st.nodes[i].signin.is_some() {
        return;
    }
    let out = Command::new(&st.kizuna)
        .args(["operator", "link", "--name", "testbed", "--base-url"])
        .arg(st.nodes[i].url())
        .arg("--data-dir")
        .arg(st.nodes[i].data_dir())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    if let Ok(o) = out {
        // `operator link --base-url URL` prints the whole link.
        let t = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if o.status.success() && t.starts_with("http") && !t.contains(char::is_whitespace) {
            st.nodes[i].signin = Some(t);
        }
    }
}

/// SIGTERM and wait (SIGKILL after 30 s). Errors if the node exited badly.
pub fn stop(st: &mut State, id: &str) -> Result<()> {
    let i = st.idx(id)?;
    let Some(pid) = st.nodes[i].pid.take() else {
        return Ok(());
    };
    st.save()?;
    if is_node(pid, &st.nodes[i].config) {
        signal(pid, "-TERM");
        ensure!(
            reap(&[pid], Duration::from_secs(30)),
            "{id} did not stop within 30 s of SIGTERM (killed)"
        );
    }
    Ok(())
}

/// SIGKILL: a crash, with no chance to flush or say goodbye.
pub fn kill(st: &mut State, id: &str) -> Result<()> {
    let i = st.idx(id)?;
    let Some(pid) = st.nodes[i].pid.take() else {
        bail!("{id} is not running");
    };
    st.save()?;
    if is_node(pid, &st.nodes[i].config) {
        signal(pid, "-KILL");
        reap(&[pid], Duration::from_secs(10));
    }
    Ok(())
}

/// Starts a node again (stopping it first if it runs).
pub fn restart(st: &mut State, id: &str) -> Result<()> {
    stop(st, id)?;
    start(st, &[id.to_string()])
}

// ----- faults -----------------------------------------------------------------

fn set_elements(st: &State, from: &str, to: &str, add: bool) -> Result<()> {
    let (f, t) = (st.node(from)?, st.node(to)?);
    let verb = if add { "add" } else { "delete" };
    let script = match st.layout {
        Layout::Mesh => format!("{verb} element inet kizuna_tb blocked {{ {} }}\n", f.addr),
        Layout::Loopback => {
            let port = |n: &NodeState| n.quic.rsplit(':').next().unwrap_or("0").to_string();
            format!(
                "{verb} element inet kizuna_tb blocked_ports {{ {} . {} }}\n",
                port(f),
                port(t)
            )
        }
    };
    nft(&t.ns, &script)
}

/// Cuts every pair across `a` × `b` (nodes of `a` named in `b` too are
/// left out of `b`, so `partition shelter-01 all` cuts shelter-01 off);
/// `oneway`: only packets from `a` to `b` are dropped.
pub fn partition(st: &mut State, a: &[String], b: &[String], oneway: bool) -> Result<()> {
    let b: Vec<&String> = b.iter().filter(|y| !a.contains(y)).collect();
    ensure!(
        !a.is_empty() && !b.is_empty(),
        "a partition needs a node on each side"
    );
    for x in a {
        for y in b.iter().copied() {
            let mut dirs = vec![(x.clone(), y.clone())];
            if !oneway {
                dirs.push((y.clone(), x.clone()));
            }
            for (f, t) in dirs {
                if st.faults.blocked.insert((f.clone(), t.clone())) {
                    set_elements(st, &f, &t, true)?;
                }
            }
        }
    }
    st.save()
}

/// Ends partitions (all, or those between `a` and `b`) and isolations.
pub fn heal(st: &mut State, between: Option<(&[String], &[String])>) -> Result<()> {
    let pairs: Vec<(String, String)> = st.faults.blocked.iter().cloned().collect();
    for (f, t) in pairs {
        let hit = match between {
            None => true,
            Some((a, b)) => {
                (a.contains(&f) && b.contains(&t)) || (b.contains(&f) && a.contains(&t))
            }
        };
        if hit {
            set_elements(st, &f, &t, false)?;
            st.faults.blocked.remove(&(f, t));
        }
    }
    if between.is_none() {
        let iso: Vec<String> = st.faults.isolated.iter().cloned().collect();
        for id in iso {
            isolate(st, &id, false)?;
        }
    }
    st.save()
}

/// Takes a node's bridge port down (`on`) or up: a cable pulled.
pub fn isolate(st: &mut State, id: &str, on: bool) -> Result<()> {
    ensure!(st.layout == Layout::Mesh, "isolation needs the mesh layout");
    let i = st.idx(id)?;
    ip(&[
        "-n",
        &format!("{}-br", st.name),
        "link",
        "set",
        &format!("v{}", i + 1),
        if on { "down" } else { "up" },
    ])?;
    if on {
        st.faults.isolated.insert(id.to_string());
    } else {
        st.faults.isolated.remove(id);
    }
    st.save()
}

/// Drops `pct` % of the UDP arriving at each node in `ids` (0 removes it).
pub fn loss(st: &mut State, ids: &[String], pct: u8) -> Result<()> {
    ensure!(pct <= 100, "PERCENT must be 0..=100");
    ensure!(st.layout == Layout::Mesh, "loss needs the mesh layout");
    for id in ids {
        let ns = st.node(id)?.ns.clone();
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "nft",
                "delete",
                "table",
                "inet",
                "kizuna_tb_loss",
            ])
            .stderr(Stdio::null())
            .status();
        if pct > 0 {
            nft(
                &ns,
                &format!(
                    "table inet kizuna_tb_loss {{
    chain input {{
        type filter hook input priority -10; policy accept;
        iifname \"eth0\" meta l4proto udp numgen random mod 100 < {pct} drop
    }}
}}
"
                ),
            )?;
            st.faults.loss.insert(id.clone(), pct);
        } else {
            st.faults.loss.remove(id);
        }
    }
    st.save()
}

// ----- status -----------------------------------------------------------------

/// One node's row of `status`.
pub fn node_status(st: &State, n: &NodeState) -> Value {
    let running = n.pid.is_some_and(|p| is_node(p, &n.config));
    let mut v = serde_json::json!({
        "node_id": n.id, "role": n.role, "namespace": n.ns, "quic": n.quic,
        "running": running, "pid": n.pid,
        "url": n.url(), "token": n.token, "signin_url": n.signin,
        "log": n.log(),
    });
    if !running {
        return v;
    }
    if let Ok(s) = st.status_of(&n.id) {
        let peers = s["peers"].as_array().cloned().unwrap_or_default();
        let connected: Vec<String> = peers
            .iter()
            .filter(|p| p["connected"] == serde_json::json!(true))
            .filter_map(|p| p["node_id"].as_str().map(str::to_string))
            .collect();
        let last = peers.iter().filter_map(|p| p["last_sync"].as_u64()).max();
        v["api"] = serde_json::json!("up");
        v["peers"] = serde_json::json!(connected);
        v["documents"] = s["documents"].clone();
        v["registry"] = s["documents_by_kind"]["registry"].clone();
        v["last_sync_ms"] = serde_json::json!(last);
        v["incarnation"] = s["incarnation"].clone();
    } else {
        v["api"] = serde_json::json!("down");
    }
    if let Ok(text) = st.scrape(&n.id) {
        if let Some(crl) = metric_value(&text, "kizuna_crl_number") {
            v["crl_number"] = serde_json::json!(crl as u64);
        }
    }
    v
}

/// The value of an unlabelled metric (or the sum over its label sets).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for l in text.lines() {
        if l.starts_with('#') {
            continue;
        }
        let (key, val) = l.rsplit_once(' ')?;
        let base = key.split('{').next().unwrap_or(key);
        if base == name {
            *found.get_or_insert(0.0) += val.parse::<f64>().ok()?;
        }
    }
    found
}

/// The value of one labelled sample, `name{labels}` written exactly as the
/// exposition writes it, e.g. `kizuna_documents{kind="registry"}`.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

pub fn status(st: &State) -> Vec<Value> {
    st.nodes.iter().map(|n| node_status(st, n)).collect()
}

/// The `status` table for people.
pub fn render_status(st: &State, rows: &[Value]) -> String {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut s = format!(
        "testbed {} ({:?}, {} nodes, registry {} households / {} persons) in {}\n",
        st.name,
        st.layout,
        st.nodes.len(),
        st.households,
        st.persons,
        st.dir.display()
    );
    s.push_str(&format!(
        "{:<13} {:<9} {:<12} {:<5} {:>5} {:>8} {:>9} {:>10} {:>4}\n",
        "NODE", "ROLE", "NAMESPACE", "UP", "PEERS", "DOCS", "REGISTRY", "LAST SYNC", "CRL"
    ));
    for r in rows {
        let up = match (r["running"].as_bool(), r["api"].as_str()) {
            (Some(true), Some("up")) => "up",
            (Some(true), _) => "api?",
            _ => "down",
        };
        let last = r["last_sync_ms"]
            .as_u64()
            .map(|t| format!("{}s ago", now_ms.saturating_sub(t) / 1000))
            .unwrap_or_else(|| "-".into());
        let num = |k: &str| {
            r[k].as_u64()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into())
        };
        s.push_str(&format!(
            "{:<13} {:<9} {:<12} {:<5} {:>5} {:>8} {:>9} {:>10} {:>4}\n",
            r["node_id"].as_str().unwrap_or(""),
            r["role"].as_str().unwrap_or(""),
            r["namespace"].as_str().unwrap_or(""),
            up,
            r["peers"]
                .as_array()
                .map(|p| p.len().to_string())
                .unwrap_or_else(|| "-".into()),
            num("documents"),
            num("registry"),
            last,
            num("crl_number"),
        ));
    }
    s.push_str("\nURL and sign-in (inside each node's namespace: `ip netns exec NAMESPACE ...`, or `deploy/testbed api NODE GET /api/v1/status`):\n");
    for r in rows {
        s.push_str(&format!(
            "  {:<13} {}  token {}{}\n",
            r["node_id"].as_str().unwrap_or(""),
            r["url"].as_str().unwrap_or(""),
            r["token"].as_str().unwrap_or(""),
            r["signin_url"]
                .as_str()
                .map(|l| format!("  sign-in (one-time) {l}"))
                .unwrap_or_default()
        ));
    }
    let f = &st.faults;
    if !f.blocked.is_empty() || !f.isolated.is_empty() || !f.loss.is_empty() {
        s.push_str("\nfaults:\n");
        for (a, b) in &f.blocked {
            s.push_str(&format!("  {a} -> {b} dropped\n"));
        }
        for i in &f.isolated {
            s.push_str(&format!("  {i} isolated (link down)\n"));
        }
        for (i, p) in &f.loss {
            s.push_str(&format!("  {i} loses {p}% of incoming UDP\n"));
        }
    }
    s
}

// ----- down -------------------------------------------------------------------

/// Removes the testbed in `dir` (see the module docs).
pub fn down(name: &str, dir: &Path, keep_files: bool) -> Result<()> {
    check_name(name)?;
    let st = State::load(dir).ok();
    if let Some(s) = &st {
        ensure!(
            s.name == name,
            "{} holds testbed {}, not {name}",
            dir.display(),
            s.name
        );
    }
    down_named(name, st.as_ref(), !keep_files)?;
    if !keep_files && dir.join(STATE_FILE).exists() {
        std::fs::remove_dir_all(dir)?;
    }
    Ok(())
}

fn down_named(name: &str, st: Option<&State>, remove_dir: bool) -> Result<()> {
    // Every process in our namespaces (what we started and anything else
    // someone ran there), then every process we remember starting.
    let nss = own_namespaces(name)?;
    let mut pids: Vec<u32> = nss.iter().flat_map(|ns| ns_pids(ns)).collect();
    if let Some(s) = st {
        pids.extend(
            s.nodes
                .iter()
                .filter_map(|n| n.pid.filter(|p| is_node(*p, &n.config))),
        );
    }
    pids.sort_unstable();
    pids.dedup();
    for p in &pids {
        signal(*p, "-KILL");
    }
    let gone = reap(&pids, Duration::from_secs(10));
    let mut errors = Vec::new();
    if !gone {
        errors.push(format!("processes still alive: {pids:?}"));
    }
    for ns in &nss {
        if let Err(e) = ip(&["netns", "del", ns]) {
            errors.push(format!("{e:#}"));
        }
    }
    let left = own_namespaces(name)?;
    if !left.is_empty() {
        errors.push(format!("namespaces left: {left:?}"));
    }
    if remove_dir {
        if let Some(s) = st {
            if s.dir.exists() {
                if let Err(e) = std::fs::remove_dir_all(&s.dir) {
                    errors.push(format!("removing {}: {e}", s.dir.display()));
                }
            }
        }
    }
    ensure!(errors.is_empty(), "down: {}", errors.join("; "));
    Ok(())
}

/// Waits for `f` to return `Ok(Ok(v))`, polling every 200 ms, up to
/// `limit` (a hang guard, not a timing assertion); the error carries the
/// last observation.
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
