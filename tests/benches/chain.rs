//! A 3-hop chain over QUIC on loopback, static peers only (no mDNS):
//! shelter-03 → shelter-02 → shelter-01 → hq-1, all in one private network
//! namespace (so nftables can count and cut its loopback traffic without
//! touching the host). Prints numbers, asserts nothing about time:
//!
//! - check-in → visible-at-HQ latency, p50/p99 over N sequential check-ins
//!   at shelter-03 (from just before the POST to the moment hq's
//!   `/api/v1/events` stream reports the presence document changed);
//! - bytes on the wire per check-in: UDP payload+headers counted by an
//!   nftables counter on `lo` (all three links, both directions, including
//!   QUIC acks and keep-alives during the run) divided by N;
//! - reconciliation after a partition between shelter-02 and shelter-01
//!   with M check-ins on each side: bytes on the cut link and on all links,
//!   time from heal to reconnect and from reconnect to convergence.
//!
//! `cargo build --release -p node --bin kizuna && cargo bench -p tests --bench chain -- [--checkins 200] [--per-side 1000]`
//! (root; the last line of output is one JSON object).

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tests::testbed::{self, wait_for, Layout, NodeSpec, Plan, State};

/// The chain on the testbed library (its loopback layout and a custom
/// static-peer chain, which the command line does not offer); `down` on
/// drop.
struct Testbed {
    st: State,
    persons: Vec<(String, String)>,
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if let Err(e) = testbed::down(&self.st.name, &self.st.dir, false) {
            eprintln!("testbed cleanup: {e:#}");
        }
    }
}

impl Testbed {
    fn new(nodes: Vec<NodeSpec>, households: usize) -> Result<Testbed> {
        let name = format!("tbbn{}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("kizuna-bench-{name}"));
        let _ = testbed::down(&name, &dir, false);
        let plan = Plan {
            nodes,
            households,
            seed: 1,
            mdns: false,
            layout: Layout::Loopback,
            start: false,
        };
        let st = testbed::up(&name, &dir, &testbed::find_kizuna()?, &plan)?;
        let persons = std::fs::read_to_string(&st.registry_csv)?
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f[0].to_string(), f[2].to_string())
            })
            .collect();
        Ok(Testbed { st, persons })
    }
    fn ns(&self, id: &str) -> String {
        self.st.node(id).expect("node").ns.clone()
    }
    fn start_all(&mut self) -> Result<()> {
        let ids = self.st.select("all")?;
        testbed::start(&mut self.st, &ids)
    }
    fn api(&self, id: &str, m: &str, p: &str, b: Option<&Value>) -> Result<(u16, Value)> {
        self.st.api(id, m, p, b)
    }
    fn person(&self, node: &str, person: &str) -> Result<Option<Value>> {
        match self.api(node, "GET", &format!("/api/v1/persons/{person}"), None)? {
            (200, v) => Ok(Some(v)),
            (404, _) => Ok(None),
            (c, v) => bail!("{node} person {person}: {c} {v}"),
        }
    }
    fn connected(&self, id: &str) -> Result<BTreeSet<String>> {
        let s = self.st.status_of(id)?;
        Ok(s["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["connected"] == json!(true))
            .filter_map(|p| p["node_id"].as_str().map(str::to_string))
            .collect())
    }
    fn checkin(&self, node: &str, persons: &[&str], op: &str) -> Result<(u16, Value)> {
        self.api(
            node,
            "POST",
            "/api/v1/checkins",
            Some(&json!({"person_ids": persons, "op_id": op})),
        )
    }
}

fn spec(id: &str, role: &str, peers: &[&str]) -> NodeSpec {
    NodeSpec {
        id: id.into(),
        role: role.into(),
        static_peers: peers.iter().map(|p| p.to_string()).collect(),
    }
}

const LONG: Duration = Duration::from_secs(600);

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn nft(ns: &str, script: &str) -> Result<String> {
    let mut c = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()?;
    use std::io::Write;
    c.stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())?;
    ensure!(c.wait()?.success(), "nft failed: {script}");
    Ok(String::new())
}

/// Byte counters by comment: (all UDP on lo, shelter-02 ↔ shelter-01).
fn counters(ns: &str) -> Result<(u64, u64)> {
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "nft", "list", "chain", "inet", "bench", "count",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut all = 0;
    let mut link = 0;
    for line in text.lines() {
        let Some(i) = line.find("bytes ") else {
            continue;
        };
        let bytes: u64 = line[i + 6..]
            .split_whitespace()
            .next()
            .and_then(|b| b.parse().ok())
            .unwrap_or(0);
        if line.contains("\"all\"") {
            all += bytes;
        } else if line.contains("\"link\"") {
            link += bytes;
        }
    }
    Ok((all, link))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn occupancy(tb: &Testbed, node: &str, shelter: &str) -> Result<u64> {
    let (c, v) = tb.api(node, "GET", "/api/v1/shelters", None)?;
    ensure!(c == 200, "{node} shelters: {c} {v}");
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .find(|s| s["shelter_id"] == json!(shelter))
        .and_then(|s| s["occupancy"].as_u64())
        .unwrap_or(0))
}

fn main() -> Result<()> {
    let n_lat = arg("--checkins", 200);
    let per_side = arg("--per-side", 1000);
    let specs = vec![
        spec("hq-1", "hq", &[]),
        spec("shelter-01", "shelter", &["hq-1"]),
        spec("shelter-02", "shelter", &["shelter-01"]),
        spec("shelter-03", "shelter", &["shelter-02"]),
    ];
    // Enough residents for the latency run and both partition sides.
    let households = (n_lat + 2 * per_side) / 2 + 50;
    let mut tb = Testbed::new(specs, households)?;
    ensure!(
        tb.persons.len() >= n_lat + 2 * per_side,
        "registry too small: {}",
        tb.persons.len()
    );
    let ns = tb.ns("hq-1");
    // Ports: hq 7700, shelter-01 7701, shelter-02 7702, shelter-03 7703.
    nft(
        &ns,
        r#"table inet bench {
    chain count {
        type filter hook input priority -5; policy accept;
        iifname "lo" udp sport 7702 udp dport 7701 counter comment "link"
        iifname "lo" udp sport 7701 udp dport 7702 counter comment "link"
        iifname "lo" meta l4proto udp counter comment "all"
    }
    chain cut {
        type filter hook input priority 0; policy accept;
    }
}"#,
    )?;
    let t_start = Instant::now();
    tb.start_all()?;
    let last = tb.persons.last().expect("registry").1.clone();
    wait_for("registry at shelter-03", LONG, || {
        Ok(tb
            .person("shelter-03", &last)?
            .ok_or_else(|| "404".to_string()))
    })?;
    let registry_s = t_start.elapsed().as_secs_f64();
    eprintln!(
        "chain up, {} persons replicated to shelter-03 in {registry_s:.1} s",
        tb.persons.len()
    );

    // --- latency and bytes per check-in -------------------------------
    let hq = tb.st.node("hq-1")?;
    let mut sse = Command::new("ip")
        .args(["netns", "exec", &hq.ns, "curl", "-sN", "-H"])
        .arg(format!("Authorization: Bearer {}", hq.token))
        .arg(format!("http://127.0.0.1:{}/api/v1/events", hq.http_port))
        .stdout(Stdio::piped())
        .spawn()
        .context("curl for /api/v1/events")?;
    let (tx, rx) = mpsc::channel::<(Instant, Value)>();
    let out = sse.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(d) = line.strip_prefix("data:") {
                if let Ok(v) = serde_json::from_str::<Value>(d.trim()) {
                    if tx.send((Instant::now(), v)).is_err() {
                        break;
                    }
                }
            }
        }
    });
    // Make sure the stream is live before timing: one warm-up check-in.
    let lat_persons: Vec<(String, String)> = tb.persons[..n_lat + 1].to_vec();
    let (b0, _) = counters(&ns)?;
    let mut lat_ms = Vec::new();
    let mut bytes_start = b0;
    for (k, (household, person)) in lat_persons.iter().enumerate() {
        if k == 1 {
            bytes_start = counters(&ns)?.0;
        }
        while rx.try_recv().is_ok() {}
        let t0 = Instant::now();
        let (c, v) = tb.checkin("shelter-03", &[person], &format!("lat-{k}"))?;
        ensure!(c == 201, "check-in: {c} {v}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok((t, ev)) = rx.recv_timeout(left) else {
                bail!("{person} never became visible at hq");
            };
            if ev["type"] == json!("document_changed")
                && ev["kind"] == json!("presence")
                && (ev["id"] == json!(household) || ev["id"] == json!(person))
            {
                if k > 0 {
                    lat_ms.push((t - t0).as_secs_f64() * 1000.0);
                }
                break;
            }
        }
    }
    let bytes_per_checkin = (counters(&ns)?.0 - bytes_start) as f64 / n_lat as f64;
    let _ = sse.kill();
    let _ = sse.wait();
    lat_ms.sort_by(|a, b| a.total_cmp(b));
    let (p50, p99) = (percentile(&lat_ms, 0.5), percentile(&lat_ms, 0.99));
    eprintln!(
        "latency check-in@shelter-03 → event@hq over {n_lat}: p50 {p50:.1} ms, p99 {p99:.1} ms, max {:.1} ms; {bytes_per_checkin:.0} bytes/check-in on the wire (3 links)",
        lat_ms.last().copied().unwrap_or(f64::NAN)
    );

    // --- partition, writes on both sides, heal --------------------------
    // Side A: shelter-03, shelter-02 (ports 7702-7703); side B: shelter-01,
    // hq (7700-7701). Every QUIC endpoint sends from its listen port.
    nft(
        &ns,
        r#"add rule inet bench cut iifname "lo" udp sport 7702-7703 udp dport 7700-7701 drop
add rule inet bench cut iifname "lo" udp sport 7700-7701 udp dport 7702-7703 drop"#,
    )?;
    let t_cut = Instant::now();
    wait_for("shelter-02 to see shelter-01 gone", LONG, || {
        let c = tb.connected("shelter-02")?;
        Ok(if c.contains("shelter-01") {
            Err(format!("{c:?}"))
        } else {
            Ok(())
        })
    })?;
    eprintln!(
        "partition detected after {:.1} s (QUIC idle timeout)",
        t_cut.elapsed().as_secs_f64()
    );
    let base = n_lat + 1;
    let side_a: Vec<String> = tb.persons[base..base + per_side]
        .iter()
        .map(|p| p.1.clone())
        .collect();
    let side_b: Vec<String> = tb.persons[base + per_side..base + 2 * per_side]
        .iter()
        .map(|p| p.1.clone())
        .collect();
    for (node, persons, tag) in [("shelter-03", &side_a, "a"), ("shelter-01", &side_b, "b")] {
        for (k, chunk) in persons.chunks(200).enumerate() {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let (c, v) = tb.checkin(node, &refs, &format!("part-{tag}-{k}"))?;
            ensure!(c == 201, "check-in at {node}: {c} {v}");
        }
    }
    let occ_a0 = occupancy(&tb, "hq-1", "shelter-03")?;
    ensure!(
        occ_a0 as usize == n_lat + 1,
        "hq saw side A during the partition: {occ_a0}"
    );
    let (all0, link0) = counters(&ns)?;
    nft(&ns, "flush chain inet bench cut")?;
    let t_heal = Instant::now();
    wait_for("shelter-02 to reconnect to shelter-01", LONG, || {
        let c = tb.connected("shelter-02")?;
        Ok(if c.contains("shelter-01") {
            Ok(())
        } else {
            Err(format!("{c:?}"))
        })
    })?;
    let reconnect_s = t_heal.elapsed().as_secs_f64();
    let want_a = (n_lat + 1 + per_side) as u64;
    let want_b = per_side as u64;
    wait_for("both sides at hq and shelter-03", LONG, || {
        let got = (
            occupancy(&tb, "hq-1", "shelter-03")?,
            occupancy(&tb, "shelter-03", "shelter-01")?,
        );
        Ok(if got == (want_a, want_b) {
            Ok(())
        } else {
            Err(format!("{got:?} want {:?}", (want_a, want_b)))
        })
    })?;
    let converge_s = t_heal.elapsed().as_secs_f64();
    let (all1, link1) = counters(&ns)?;
    eprintln!(
        "reconciliation of {per_side}+{per_side} check-ins: heal→reconnect {reconnect_s:.2} s, reconnect→converged {:.2} s; {} bytes on the cut link, {} bytes on all links",
        converge_s - reconnect_s,
        link1 - link0,
        all1 - all0
    );
    println!(
        "{}",
        json!({
            "bench": "chain",
            "hops": 3,
            "registry_persons": tb.persons.len(),
            "registry_replication_s": registry_s,
            "checkins": n_lat,
            "latency_ms_p50": p50,
            "latency_ms_p99": p99,
            "latency_ms_max": lat_ms.last(),
            "bytes_per_checkin_all_links": bytes_per_checkin,
            "partition_per_side": per_side,
            "reconcile_heal_to_reconnect_s": reconnect_s,
            "reconcile_reconnect_to_converged_s": converge_s - reconnect_s,
            "reconcile_bytes_cut_link": link1 - link0,
            "reconcile_bytes_all_links": all1 - all0,
        })
    );
    Ok(())
}
