//! Revocation at runtime, on real `kizuna run` processes over real QUIC:
//!
//! - `kizuna crl load` against a running hq node (through its API) closes
//!   the session of the newly revoked shelter node, and the shelter cannot
//!   come back; the list is saved (`crl.der`, the replaced one kept as
//!   `crl.prev.der`, both 0600);
//! - a damaged list, loaded at runtime, changes nothing and the refusal
//!   names the list kept in force;
//! - a damaged stored list falls back to the previous one and the log says
//!   so; with both damaged the node refuses to start (fail closed), and
//!   `kizuna crl load` on the stopped node repairs it.

use crate::support::proc::{ok, poll, run_kizuna, Node};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

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

fn revoke(ca: &Path, id: &str, out: &Path) -> Vec<u8> {
    let r = certs::ca::revoke(ca, &crdt::NodeId::new(id).unwrap()).unwrap();
    let der = std::fs::read(&r.crl_path).unwrap();
    std::fs::write(out, &der).unwrap();
    der
}

fn status(n: &Node) -> Value {
    let r = n.api("GET", "/api/v1/status", "");
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

fn connected(n: &Node, peer: &str) -> bool {
    status(n)["peers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["node_id"] == peer && p["connected"] == true)
}

fn crl_number(n: &Node) -> Value {
    status(n)["revocation"]["crl_number"].clone()
}

/// `kizuna crl load --config … FILE`, with the node's token in a file.
fn crl_load(n: &Node, file: &Path) -> std::process::Output {
    let token = n.dir.join("token");
    std::fs::write(&token, &n.token).unwrap();
    run_kizuna(
        &[
            "crl",
            "load",
            "--config",
            n.config().to_str().unwrap(),
            "--token-file",
            token.to_str().unwrap(),
            file.to_str().unwrap(),
        ],
        &[],
    )
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_list_loaded_at_runtime_closes_the_revoked_peer_and_damage_fails_closed() {
    let root = tempfile::tempdir().unwrap();
    let ca = root.path().join("ca");
    certs::ca::init_ca(&ca, "Revocation Test CA").unwrap();
    let hq_dir = root.path().join("hq");
    let sh_dir = root.path().join("sh");
    issue(&ca, crdt::Role::Hq, "hq-1", &hq_dir);
    issue(&ca, crdt::Role::Shelter, "sh-1", &sh_dir);
    // A node revoked first, so the list in force has a number to keep.
    issue(&ca, crdt::Role::Shelter, "sh-9", &root.path().join("sh-9"));

    let mut hq = Node::new(&hq_dir, None, "");
    hq.add_operator();
    hq.start();
    let mut sh = Node::new(&sh_dir, Some(hq.quic), "");
    sh.add_operator();
    sh.start();
    let long = Duration::from_secs(120);
    poll(long, "hq and sh-1 connected", || {
        (connected(&hq, "sh-1") && connected(&sh, "hq-1")).then_some(())
    });
    assert_eq!(crl_number(&hq), Value::Null);

    // List 1 (sh-9 revoked) through the CLI into the running node.
    let one_file = root.path().join("crl-1.der");
    let one = revoke(&ca, "sh-9", &one_file);
    let out = text(&ok_output(crl_load(&hq, &one_file)));
    assert!(out.contains("revocation list 1 in force"), "{out}");
    assert_eq!(crl_number(&hq), 1);
    assert!(connected(&hq, "sh-1"), "sh-1 is not revoked by list 1");

    // A damaged list 2: refused, list 1 kept and named, nothing saved.
    let two_file = root.path().join("crl-2.der");
    let two = revoke(&ca, "sh-1", &two_file);
    let damaged = root.path().join("crl-2-damaged.der");
    std::fs::write(&damaged, &two[..two.len() - 40]).unwrap();
    let o = crl_load(&hq, &damaged);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let msg = text(&o);
    assert!(
        msg.contains("CRL number 1") && msg.contains("番号 1") && msg.contains("rejected"),
        "{msg}"
    );
    assert_eq!(crl_number(&hq), 1);
    assert_eq!(std::fs::read(hq.data().join("crl.der")).unwrap(), one);
    assert!(connected(&hq, "sh-1"));

    // The real list 2: sh-1's session closes, and it stays out.
    let loaded = Instant::now();
    let out = text(&ok_output(crl_load(&hq, &two_file)));
    assert!(
        out.contains("revocation list 2 in force") && out.contains("1 newly revoked"),
        "{out}"
    );
    poll(long, "hq to close sh-1's session", || {
        (!connected(&hq, "sh-1")).then_some(())
    });
    println!(
        "revoked peer's session closed {:.3} s after kizuna crl load returned",
        loaded.elapsed().as_secs_f64()
    );
    poll(long, "sh-1 to see the session end", || {
        (!connected(&sh, "hq-1")).then_some(())
    });
    let hq_log = std::fs::read_to_string(hq.log()).unwrap();
    assert!(hq_log.contains("peer certificate revoked"), "hq log");
    assert_eq!(std::fs::read(hq.data().join("crl.der")).unwrap(), two);
    assert_eq!(std::fs::read(hq.data().join("crl.prev.der")).unwrap(), one);
    assert_eq!(mode(&hq.data().join("crl.der")), 0o600);
    assert_eq!(mode(&hq.data().join("crl.prev.der")), 0o600);
    // Loading the same list again is stale, not an error.
    let out = text(&ok_output(crl_load(&hq, &two_file)));
    assert!(out.contains("not newer"), "{out}");
    sh.stop();
    hq.stop();

    // Restart with crl.der damaged: list 1 (the previous) is in force and
    // the log says so.
    std::fs::write(hq.data().join("crl.der"), &two[..100]).unwrap();
    hq.start();
    assert_eq!(crl_number(&hq), 1);
    let hq_log = std::fs::read_to_string(hq.log()).unwrap();
    assert!(
        hq_log.contains("stored revocation list damaged; the previous list is in force"),
        "hq log"
    );
    hq.stop();

    // Both damaged: the node refuses to start (fail closed) and says why.
    std::fs::write(hq.data().join("crl.prev.der"), b"not a list").unwrap();
    let (code, msg) = hq.refused();
    assert_ne!(code, 0, "{msg}");
    assert!(
        msg.contains("fail closed") && msg.contains("壊れて"),
        "{msg}"
    );
    // Repaired on the stopped node with the CA's current list.
    let out = text(&ok_output(crl_load(&hq, &two_file)));
    assert!(out.contains("revocation list 2 saved"), "{out}");
    hq.start();
    assert_eq!(crl_number(&hq), 2);
    hq.stop();
}

fn ok_output(o: std::process::Output) -> std::process::Output {
    let _ = ok(o.clone());
    o
}
