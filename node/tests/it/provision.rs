//! Provisioning and operation of real `kizuna run` processes over real QUIC
//! (issue 13):
//!
//! - a new node pulling the resident registry from a peer reports how much
//!   of it it holds, in its log ("registry sync: households held") and in
//!   `/api/v1/status` (`documents_by_kind.registry`), and both end at the
//!   peer's count;
//! - the Prometheus endpoint bound off loopback (`0.0.0.0`) refuses a
//!   scrape without the bearer token or with a wrong one, from a
//!   non-loopback address of this machine and from loopback, and serves the
//!   counters with it; without a token file such a node does not start;
//! - rotating a shelter's certificate on a running mesh the way
//!   docs/operations.md 3.4 says (`kizuna certs issue` into a new
//!   directory, `install` over `certs/`, restart, `kizuna certs revoke
//!   --serial OLD`, the list handed to hq): the shelter syncs on with the
//!   new certificate, check-ins from before are kept, and hq refuses a node
//!   presenting the old one;
//! - retiring a node as 3.8 says (stop, revoke, hand the list over, `shred`
//!   the key, `rm -rf` the data): its data is gone, it cannot start, hq
//!   refuses a copy of its certificate and key, and the rest syncs on.
//!
//! Every wait is a poll with a deadline that only guards against hangs.

use crate::support::free_port;
use crate::support::proc::{hq_from_csv, http, ok, poll, run_kizuna, Node};
use serde_json::Value;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(300);

fn issue(ca: &Path, role: crdt::Role, id: &str, dir: &Path) {
    certs::ca::issue(
        ca,
        role,
        &crdt::NodeId::new(id).unwrap(),
        &dir.join("certs"),
        30,
    )
    .unwrap();
}

/// hq-1 with a synthetic registry of `households` imported, and an operator.
fn hq_with_registry(root: &Path, ca: &Path, households: usize) -> Node {
    let dir = root.join("hq");
    issue(ca, crdt::Role::Hq, "hq-1", &dir);
    let csv = root.join("registry.csv");
    std::fs::write(&csv, node::demo::synthetic_registry(households, 13)).unwrap();
    hq_from_csv(&dir, &csv)
}

fn status(n: &Node) -> Value {
    let r = n.api("GET", "/api/v1/status", "");
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

fn registry_held(n: &Node) -> u64 {
    status(n)["documents_by_kind"]["registry"]
        .as_u64()
        .unwrap_or(0)
}

/// The log without terminal colours (the node's `tracing` output may
/// carry ANSI escapes around field names).
fn plain_log(n: &Node) -> String {
    let raw = std::fs::read_to_string(n.log()).unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `households=N` of every log line containing `message`, in order.
fn logged_households(log: &str, message: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains(message))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("households="))
                .and_then(|v| v.parse().ok())
        })
        .collect()
}

#[test]
fn a_new_node_reports_first_sync_progress_of_the_registry_in_its_log_and_status() {
    const HOUSEHOLDS: usize = 10_000;
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let ca = root.join("ca");
    certs::ca::init_ca(&ca, "Provisioning Test CA").unwrap();
    let mut hq = hq_with_registry(root, &ca, HOUSEHOLDS);
    hq.start();
    let want = registry_held(&hq);
    assert_eq!(want, HOUSEHOLDS as u64, "hq holds the imported registry");

    // A brand-new shelter node whose only peer is hq.
    let sh_dir = root.join("sh");
    issue(&ca, crdt::Role::Shelter, "sh-1", &sh_dir);
    let mut sh = Node::new(&sh_dir, Some(hq.quic), "");
    sh.add_operator();
    sh.start();

    // While it pulls, /api/v1/status counts the households it holds; the
    // values seen only grow and end at hq's count.
    let mut seen: Vec<u64> = Vec::new();
    poll(LONG, "the shelter to hold the whole registry", || {
        let held = registry_held(&sh);
        if seen.last() != Some(&held) {
            seen.push(held);
        }
        (held == want).then_some(())
    });
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "status counts only grow: {seen:?}"
    );
    println!("/api/v1/status documents_by_kind.registry seen during the pull: {seen:?}");

    // The log: the registry held at start (nothing, before the mesh
    // started), then progress lines that end at the same count.
    let start = logged_households(&plain_log(&sh), "registry held at start");
    assert_eq!(start, vec![0], "{}", plain_log(&sh));
    let progress = poll(
        Duration::from_secs(60),
        "the log to report the whole registry",
        || {
            let p = logged_households(&plain_log(&sh), "registry sync: households held");
            (p.last() == Some(&want)).then_some(p)
        },
    );
    assert!(
        progress.windows(2).all(|w| w[0] < w[1]) && progress.iter().all(|h| *h <= want),
        "log progress only grows up to hq's count: {progress:?}"
    );
    println!("log progress lines (households held): {progress:?}");
    // The same count, once more, from the status the log was read from.
    assert_eq!(registry_held(&sh), want);
    // hq's own log names what it held at start.
    assert_eq!(
        logged_households(&plain_log(&hq), "registry held at start"),
        vec![want]
    );
    sh.stop();
    hq.stop();
}

/// A non-loopback IPv4 address of this machine, if it has one (the
/// address the kernel would send from; a UDP connect sends nothing).
fn non_loopback_addr() -> Option<IpAddr> {
    ["192.0.2.1:9", "10.255.255.254:9", "198.51.100.1:9"]
        .iter()
        .find_map(|target| {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
            s.connect(target).ok()?;
            let ip = s.local_addr().ok()?.ip();
            (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
        })
}

/// The value of the first sample of `name` whose labels contain every
/// `labels` entry (`key="value"`).
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().find_map(|l| {
        let (head, value) = l.rsplit_once(' ')?;
        let (n, rest) = head.split_once('{').unwrap_or((head, ""));
        (n == name && labels.iter().all(|want| rest.contains(want)))
            .then(|| value.parse().ok())
            .flatten()
    })
}

#[test]
fn metrics_off_loopback_need_the_bearer_token() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let ca = root.join("ca");
    certs::ca::init_ca(&ca, "Metrics Test CA").unwrap();
    let mut hq = hq_with_registry(root, &ca, 200);
    hq.start();

    let sh_dir = root.join("sh");
    issue(&ca, crdt::Role::Shelter, "sh-1", &sh_dir);
    let port = free_port();
    // Off loopback without a token file: the node refuses to start.
    let open = Node::new(
        &sh_dir,
        Some(hq.quic),
        &format!("[metrics]\nbind = \"0.0.0.0:{port}\"\n"),
    );
    let (code, msg) = open.refused();
    assert_ne!(code, 0, "{msg}");
    assert!(msg.contains("metrics.token_file"), "{msg}");

    // With the token file it starts.
    let token = "kizuna-metrics-test-token-0123456789";
    std::fs::write(sh_dir.join("metrics.token"), format!("{token}\n")).unwrap();
    let mut sh = Node::new(
        &sh_dir,
        Some(hq.quic),
        &format!("[metrics]\nbind = \"0.0.0.0:{port}\"\ntoken_file = \"metrics.token\"\n"),
    );
    sh.add_operator();
    sh.start();
    poll(LONG, "the shelter to hold the registry", || {
        (registry_held(&sh) == 200).then_some(())
    });

    let mut from: Vec<SocketAddr> = vec![SocketAddr::new([127, 0, 0, 1].into(), port)];
    match non_loopback_addr() {
        Some(ip) => from.insert(0, SocketAddr::new(ip, port)),
        None => {
            println!("no non-loopback address on this machine: scraping 0.0.0.0 via loopback only")
        }
    }
    let bearer = format!("Bearer {token}");
    for addr in &from {
        let scrape = |headers: &[(&str, &str)]| {
            poll(Duration::from_secs(60), "the metrics endpoint", || {
                http(*addr, "GET", "/metrics", headers, "")
            })
        };
        let none = scrape(&[]);
        assert!(
            none.status == 401 || none.status == 403,
            "{addr}: a scrape without the token got {}: {}",
            none.status,
            none.body
        );
        assert!(!none.body.contains("kizuna_"), "{addr}: {}", none.body);
        let wrong = scrape(&[("Authorization", "Bearer kizuna-metrics-wrong-token-000000")]);
        assert!(
            wrong.status == 401 || wrong.status == 403,
            "{addr}: a scrape with a wrong token got {}",
            wrong.status
        );
        let good = scrape(&[("Authorization", &bearer)]);
        assert_eq!(good.status, 200, "{addr}: {}", good.body);
        let m = &good.body;
        assert_eq!(
            sample(m, "kizuna_documents", &["kind=\"registry\""]),
            Some(200.0),
            "{addr}: {m}"
        );
        let received = sample(
            m,
            "kizuna_sync_changes_total",
            &["direction=\"received\"", "kind=\"registry\""],
        );
        assert!(
            received.is_some_and(|v| v > 0.0),
            "{addr}: {received:?}\n{m}"
        );
        assert!(
            sample(m, "kizuna_wire_bytes_total", &["direction=\"received\""])
                .is_some_and(|v| v > 0.0),
            "{addr}: {m}"
        );
        assert!(m.contains("kizuna_commit_seconds_bucket"), "{addr}: {m}");
        println!(
            "{addr}: no token {}, wrong token {}, token 200",
            none.status, wrong.status
        );
    }
    sh.stop();
    hq.stop();
}

// ----- certificate rotation and retirement (docs/operations.md 3.4, 3.8) --

/// Deadline of the waits below: only a guard against hangs (a restarted
/// node redials within seconds).
const MESH: Duration = Duration::from_secs(60);

/// `kizuna certs …` (the operator's CLI), its stdout.
fn certs_cli(args: &[&str]) -> String {
    let mut all = vec!["certs"];
    all.extend_from_slice(args);
    ok(run_kizuna(&all, &[]))
}

/// `kizuna certs issue` into `out`; the serial it printed.
fn issue_cli(ca: &Path, role: &str, id: &str, out: &Path) -> String {
    let printed = certs_cli(&[
        "issue",
        "--ca-dir",
        ca.to_str().unwrap(),
        "--role",
        role,
        "--node-id",
        id,
        "--out",
        out.to_str().unwrap(),
    ]);
    printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("serial:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| panic!("no serial printed: {printed}"))
}

/// Hands the CA's current `crl.der` to a running node the way the guide
/// says (3.5: copy it over `<data_dir>/crl.der`) and waits until the node
/// has it in force.
fn hand_crl_to(ca: &Path, n: &Node, number: u64) {
    // `cp` over the live file: a read of a half-written copy is refused and
    // the next check, seeing the file changed again, reads the whole list.
    std::fs::copy(ca.join("crl.der"), n.data().join("crl.der")).unwrap();
    poll(MESH, "the node to put the CA's list in force", || {
        (status(n)["revocation"]["crl_number"].as_u64() == Some(number)).then_some(())
    })
}

fn connected(n: &Node, peer: &str) -> bool {
    status(n)["peers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["node_id"] == peer && p["connected"] == true)
}

/// A check-in at `n` answered 201 (committed there).
fn check_in(n: &Node, person: &str, shelter: &str, op_id: &str) {
    let body =
        format!(r#"{{"person_ids":["{person}"],"shelter_id":"{shelter}","op_id":"{op_id}"}}"#);
    let r = n.api("POST", "/api/v1/checkins", &body);
    assert_eq!(r.status, 201, "{}", r.body);
}

/// The shelter `n` has `person` checked in at, if any.
fn located_at(n: &Node, person: &str) -> Option<String> {
    let r = n.api("GET", &format!("/api/v1/persons/{person}"), "");
    if r.status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&r.body).ok()?;
    (v["location"]["status"] == "in")
        .then(|| v["location"]["shelter_id"].as_str().map(String::from))
        .flatten()
}

fn wait_located(n: &Node, person: &str, shelter: &str, what: &str) {
    poll(MESH, what, || {
        (located_at(n, person).as_deref() == Some(shelter)).then_some(())
    });
}

/// hq's log lines refusing an incoming peer because its certificate
/// `serial` is revoked.
fn refusals(hq: &Node, serial: &str) -> Vec<String> {
    plain_log(hq)
        .lines()
        .filter(|l| {
            l.contains("incoming peer rejected") && l.contains("Revoked") && l.contains(serial)
        })
        .map(String::from)
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn rotating_a_shelter_certificate_on_a_running_mesh_keeps_it_syncing_and_refuses_the_old_one() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let ca = root.join("ca");
    certs_cli(&[
        "init-ca",
        "--dir",
        ca.to_str().unwrap(),
        "--name",
        "Rotation Test CA",
    ]);
    let mut hq = hq_with_registry(root, &ca, 30);
    hq.start();
    let sh_dir = root.join("sh");
    let old_serial = issue_cli(&ca, "shelter", "sh-1", &sh_dir.join("certs"));
    let mut sh = Node::new(&sh_dir, Some(hq.quic), "");
    sh.add_operator();
    sh.start();
    poll(MESH, "the shelter to hold the registry", || {
        (registry_held(&sh) == 30).then_some(())
    });

    // Before the rotation: a check-in acknowledged at the shelter reaches hq.
    check_in(&sh, "p000001", "sh-1", "rotate-before");
    wait_located(
        &hq,
        "p000001",
        "sh-1",
        "the check-in before the rotation at hq",
    );

    // 3.4: issue into a new directory, install over the node's certs/,
    // restart. The old files are kept aside as a thief's copy would be.
    let stolen = root.join("old-certs");
    copy_dir(&sh_dir.join("certs"), &stolen);
    let new_dir = root.join("usb").join("sh-1-new");
    let new_serial = issue_cli(&ca, "shelter", "sh-1", &new_dir);
    assert_ne!(new_serial, old_serial);
    // The guide's two `install` lines (without -o/-g: the test runs as the
    // node's user): certificates 0644, the key 0600.
    for (mode, files) in [
        ("0644", &["node.crt.pem", "ca.crt.pem"][..]),
        ("0600", &["node.key.pem"][..]),
    ] {
        let st = std::process::Command::new("install")
            .args(["-m", mode])
            .args(files.iter().map(|f| new_dir.join(f)))
            .arg(sh_dir.join("certs"))
            .status()
            .unwrap();
        assert!(st.success());
    }
    sh.stop();
    sh.start();
    // The day-before check names the certificate the node now holds.
    let checked = ok(run_kizuna(
        &["config", "check", sh.config().to_str().unwrap()],
        &[],
    ));
    assert!(
        checked.contains(&format!("certificate serial {new_serial}")),
        "{checked}"
    );

    // Revoke only the old certificate, as superseded (its key was not
    // lost), and hand the list to hq (3.4, 3.5).
    let revoked = certs_cli(&[
        "revoke",
        "--ca-dir",
        ca.to_str().unwrap(),
        "--node-id",
        "sh-1",
        "--serial",
        &old_serial,
        "--reason",
        "superseded",
    ]);
    assert!(
        revoked.contains(&format!("serials {old_serial} (superseded"))
            && !revoked.contains(&new_serial),
        "{revoked}"
    );
    assert!(revoked.contains("CRL number 1 "), "{revoked}");
    hand_crl_to(&ca, &hq, 1);

    // With the old serial refused at hq, a check-in made after the
    // rotation still reaches hq: the shelter syncs with the new certificate.
    check_in(&sh, "p000002", "sh-1", "rotate-after");
    wait_located(
        &hq,
        "p000002",
        "sh-1",
        "the check-in after the rotation at hq",
    );
    assert!(connected(&hq, "sh-1") && connected(&sh, "hq-1"));
    // Nothing acknowledged before the rotation is lost, on either side.
    assert_eq!(located_at(&hq, "p000001").as_deref(), Some("sh-1"));
    assert_eq!(located_at(&sh, "p000001").as_deref(), Some("sh-1"));

    // A node presenting the old certificate is refused by hq.
    let before = refusals(&hq, &old_serial).len();
    let imp_dir = root.join("impostor");
    copy_dir(&stolen, &imp_dir.join("certs"));
    let mut imp = Node::new(&imp_dir, Some(hq.quic), "");
    imp.add_operator();
    imp.start();
    let refused = poll(MESH, "hq to refuse the old certificate", || {
        refusals(&hq, &old_serial).get(before).cloned()
    });
    assert!(!connected(&imp, "hq-1"));
    println!("rotated sh-1 from serial {old_serial} to {new_serial}; hq: {refused}");
    imp.stop();
    // The rotated shelter is still in the mesh.
    check_in(&sh, "p000003", "sh-1", "rotate-last");
    wait_located(&hq, "p000003", "sh-1", "a last check-in at hq");
    sh.stop();
    hq.stop();
}

#[test]
fn a_retired_node_is_refused_by_the_mesh_and_its_data_is_gone_while_the_rest_syncs() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let ca = root.join("ca");
    certs_cli(&[
        "init-ca",
        "--dir",
        ca.to_str().unwrap(),
        "--name",
        "Retire Test CA",
    ]);
    let mut hq = hq_with_registry(root, &ca, 30);
    hq.start();
    let mut shelters = Vec::new();
    let mut serials = Vec::new();
    for id in ["sh-1", "sh-2"] {
        let dir = root.join(id);
        serials.push(issue_cli(&ca, "shelter", id, &dir.join("certs")));
        let mut n = Node::new(&dir, Some(hq.quic), "");
        n.add_operator();
        n.start();
        shelters.push(n);
    }
    let mut retired = shelters.pop().unwrap();
    let keep = shelters.pop().unwrap();
    for n in [&keep, &retired] {
        poll(MESH, "the shelters to hold the registry", || {
            (registry_held(n) == 30).then_some(())
        });
    }

    // 3.8 step 1: its last check-ins reached hq.
    check_in(&retired, "p000004", "sh-2", "retire-last");
    wait_located(
        &hq,
        "p000004",
        "sh-2",
        "the retiring node's last check-in at hq",
    );
    // A thief's copy of its disk, taken before the wipe.
    let stolen = root.join("stolen-certs");
    copy_dir(&retired.dir.join("certs"), &stolen);

    // Step 2: stop it. Step 3: revoke every certificate of the node and
    // hand the list to a node of the mesh.
    retired.stop();
    let revoked = certs_cli(&[
        "revoke",
        "--ca-dir",
        ca.to_str().unwrap(),
        "--node-id",
        "sh-2",
    ]);
    assert!(revoked.contains("revoked node sh-2"), "{revoked}");
    assert!(revoked.contains("CRL number 1 "), "{revoked}");
    hand_crl_to(&ca, &hq, 1);
    // Step 4: wipe data and key, with the guide's commands.
    let key = retired.dir.join("certs").join("node.key.pem");
    let shred = std::process::Command::new("shred")
        .arg("-u")
        .arg(&key)
        .status()
        .unwrap();
    assert!(shred.success());
    let rm = std::process::Command::new("rm")
        .arg("-rf")
        .arg(retired.data())
        .status()
        .unwrap();
    assert!(rm.success());

    // Its data directory is gone and the node cannot start again.
    assert!(!retired.data().exists() && !key.exists());
    let (code, msg) = retired.refused();
    assert_ne!(code, 0, "{msg}");
    assert!(msg.contains("node.key.pem"), "{msg}");

    // The mesh refuses the retired node's certificate (a stolen disk).
    let thief_dir = root.join("thief");
    copy_dir(&stolen, &thief_dir.join("certs"));
    let mut thief = Node::new(&thief_dir, Some(hq.quic), "");
    thief.add_operator();
    let before = refusals(&hq, &serials[1]).len();
    thief.start();
    let refused = poll(MESH, "hq to refuse the retired node's certificate", || {
        refusals(&hq, &serials[1]).get(before).cloned()
    });
    println!("retired sh-2 (serial {}); hq: {refused}", serials[1]);
    assert!(!connected(&thief, "hq-1"));
    thief.stop();

    // The rest keeps syncing, and the retired node's last check-in stays.
    check_in(&keep, "p000005", "sh-1", "after-retire");
    wait_located(
        &hq,
        "p000005",
        "sh-1",
        "a check-in after the retirement at hq",
    );
    assert!(connected(&hq, "sh-1"));
    assert_eq!(located_at(&hq, "p000004").as_deref(), Some("sh-2"));
    assert_eq!(located_at(&keep, "p000004").as_deref(), Some("sh-2"));
    drop(retired);
    let mut keep = keep;
    keep.stop();
    hq.stop();
}
