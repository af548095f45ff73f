//! Issue 13, field deployment, on the testbed operators use: the testbed's
//! own life cycle (and that it leaves nothing behind, even after a failed
//! `up`), revocation spreading by gossip, metrics on every node moving with
//! real traffic, and online backup + restore with a new incarnation.

use crate::testbed::{
    checkin_ok, dir_for, kizuna_bin, name_for, sample, testbed_cmd, wait_connected, wait_for,
    wait_location, wait_person, wait_registry, Testbed, SYNC,
};
use anyhow::{ensure, Context, Result};
use serde_json::json;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// What the machine looks like from outside any testbed: root-namespace
/// links, root-namespace nftables tables, namespaces, and processes whose
/// command line mentions `needle`.
#[derive(Debug, PartialEq, Eq)]
struct Footprint {
    links: BTreeSet<String>,
    tables: String,
    namespaces: BTreeSet<String>,
    processes: Vec<String>,
}

fn footprint(name: &str, needle: &str) -> Result<Footprint> {
    let links = tests::testbed::run_ok(Command::new("ip").args(["-o", "link", "show"]))?
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_string()))
        .collect();
    let tables = tests::testbed::run_ok(Command::new("nft").args(["list", "tables"]))?;
    let namespaces = tests::testbed::own_namespaces(name)?.into_iter().collect();
    let mut processes = Vec::new();
    for e in std::fs::read_dir("/proc")? {
        let e = e?;
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || !tests::testbed::alive(pid) {
            continue;
        }
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(needle) {
                processes.push(format!("{pid}: {c}"));
            }
        }
    }
    Ok(Footprint {
        links,
        tables,
        namespaces,
        processes,
    })
}

/// The issue's mesh: hq, 2 shelters, 1 clinic, 2 ambulances.
#[test]
fn testbed_up_status_partition_heal_kill_restart_down_leaves_nothing() -> Result<()> {
    let name = name_for("lc");
    let dir = dir_for(&name);
    let before = footprint(&name, &dir.to_string_lossy())?;
    ensure!(
        before.namespaces.is_empty() && before.processes.is_empty(),
        "{before:?}"
    );
    let mut tb = Testbed::up(
        "lc",
        &[
            "--shelters",
            "2",
            "--clinics",
            "1",
            "--ambulances",
            "2",
            "--households",
            "40",
        ],
    )?;
    ensure!(tb.name == name);
    let ids: Vec<String> = tb.st.nodes.iter().map(|n| n.id.clone()).collect();
    ensure!(
        ids == [
            "hq-1",
            "shelter-01",
            "shelter-02",
            "clinic-1",
            "ambulance-1",
            "ambulance-2"
        ],
        "{ids:?}"
    );
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    let running = footprint(&name, &dir.to_string_lossy())?;
    ensure!(running.namespaces.len() == 7, "{:?}", running.namespaces);
    ensure!(running.processes.len() == 6, "{:?}", running.processes);
    // Nothing of the testbed appears in the root namespace.
    ensure!(running.links == before.links && running.tables == before.tables);
    for n in &all {
        wait_connected(
            &tb,
            n,
            &["hq-1"]
                .iter()
                .copied()
                .filter(|h| h != n)
                .collect::<Vec<_>>(),
        )?;
    }
    wait_registry(&tb, &all)?;
    // status: every node up, with peers, documents, the registry, a last
    // sync time and its URL.
    let st: serde_json::Value = serde_json::from_str(&tb.cmd(&["status", "--json"])?)?;
    for row in st["nodes"].as_array().context("nodes")? {
        ensure!(
            row["running"] == json!(true) && row["api"] == json!("up"),
            "{row}"
        );
        ensure!(
            row["peers"].as_array().is_some_and(|p| !p.is_empty()),
            "{row}"
        );
        ensure!(
            row["registry"] == json!(40) && row["documents"].as_u64() > Some(40),
            "{row}"
        );
        ensure!(row["last_sync_ms"].is_u64(), "{row}");
        ensure!(
            row["url"]
                .as_str()
                .is_some_and(|u| u.starts_with("http://127.0.0.1:")),
            "{row}"
        );
        ensure!(
            row["token"].as_str().is_some_and(|t| !t.is_empty()),
            "{row}"
        );
        // The sign-in link opens a session once, and only once.
        let url = row["url"].as_str().unwrap_or_default();
        let link = row["signin_url"].as_str().context("signin_url")?;
        ensure!(
            link.strip_prefix(url)
                .and_then(|p| p.strip_prefix("/ui/link/"))
                .is_some_and(|t| !t.is_empty() && !t.contains('/')),
            "{row}"
        );
        let id = row["node_id"].as_str().context("node_id")?;
        let (code, head) = tb.st.get_plain(id, link)?;
        ensure!(
            code == 303 && head.to_ascii_lowercase().contains("set-cookie:"),
            "{id}: the sign-in link answered {code}: {head}"
        );
        let (again, _) = tb.st.get_plain(id, link)?;
        ensure!(again == 401, "{id}: the link worked twice ({again})");
    }
    let table = tb.cmd(&["status"])?;
    ensure!(
        table.contains("shelter-02") && table.contains("REGISTRY"),
        "{table}"
    );
    // partition: shelter-01 apart from everyone else, a check-in there,
    // then heal: it reaches hq.
    tb.cmd(&[
        "partition",
        "shelter-01",
        "hq-1,shelter-02,clinic-1,ambulance-1,ambulance-2",
    ])?;
    wait_for("shelter-01 cut off", 2 * SYNC, || {
        let c = tb.connected("shelter-01")?;
        Ok(if c.is_empty() {
            Ok(())
        } else {
            Err(format!("{c:?}"))
        })
    })?;
    let p = tb.persons[0].1.clone();
    checkin_ok(&tb, "shelter-01", &[&p], "lc-1")?;
    let at_hq = tb.person("hq-1", &p)?.context("registry at hq")?;
    ensure!(
        at_hq["location"].is_null(),
        "hq saw through the partition: {at_hq}"
    );
    tb.cmd(&["heal"])?;
    wait_location(&tb, "hq-1", &p, "shelter-01")?;
    // kill -9 and restart: the node comes back with a new incarnation.
    let inc = tb.status("ambulance-1")?["incarnation"]
        .as_u64()
        .context("incarnation")?;
    tb.cmd(&["kill", "ambulance-1"])?;
    let row =
        &serde_json::from_str::<serde_json::Value>(&tb.cmd(&["status", "--json"])?)?["nodes"][4];
    ensure!(
        row["node_id"] == json!("ambulance-1") && row["running"] == json!(false),
        "{row}"
    );
    tb.cmd(&["restart", "ambulance-1"])?;
    ensure!(tb.status("ambulance-1")?["incarnation"].as_u64() == Some(inc + 1));
    wait_connected(&tb, "ambulance-1", &["hq-1"])?;
    // down: nothing left.
    tb.cmd(&["loss", "5"])?; // a loss table too, to see it go
    tb.passed()?; // drop runs `down`
    let after = footprint(&name, &dir.to_string_lossy())?;
    ensure!(
        after == before,
        "left behind: {after:?} (before: {before:?})"
    );
    ensure!(!dir.exists(), "{} left behind", dir.display());
    Ok(())
}

/// An `up` that fails half way (here: every `kizuna run` exits at once)
/// removes everything it made.
#[test]
fn failed_up_removes_everything_it_made() -> Result<()> {
    let name = name_for("fu");
    let dir = dir_for(&name);
    let _ = std::fs::remove_dir_all(&dir);
    let before = footprint(&name, &dir.to_string_lossy())?;
    // A kizuna that provisions normally but whose `run` dies.
    let shim_dir = tempfile::tempdir()?;
    let shim = shim_dir.path().join("kizuna");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\nif [ \"$1\" = run ]; then echo 'simulated start failure' >&2; exit 3; fi\nexec {} \"$@\"\n",
            kizuna_bin().display()
        ),
    )?;
    Command::new("chmod").arg("+x").arg(&shim).status()?;
    let e = testbed_cmd(
        &name,
        &dir,
        &[
            "up",
            "--shelters",
            "1",
            "--clinics",
            "0",
            "--ambulances",
            "0",
            "--households",
            "5",
        ],
        &[("KIZUNA_BIN".into(), shim.display().to_string())],
    )
    .expect_err("up must fail");
    let msg = format!("{e:#}");
    ensure!(msg.contains("everything it made was removed"), "{msg}");
    ensure!(msg.contains("simulated start failure"), "{msg}");
    let after = footprint(&name, &dir.to_string_lossy())?;
    ensure!(after == before, "left behind: {after:?}");
    ensure!(!dir.exists(), "{} left behind", dir.display());
    // And `down` of a testbed that is not there is harmless.
    testbed_cmd(&name, &dir, &["down"], &[])?;
    Ok(())
}

/// Revoke a lost tablet with the CA, hand the CRL to one node (hq) by
/// copying it into its data directory, and watch it spread to every node;
/// the tablet's sessions end and it cannot rejoin.
#[test]
fn a_revoked_tablet_is_cut_off_everywhere_by_gossip() -> Result<()> {
    let mut tb = Testbed::up(
        "rv",
        &[
            "--shelters",
            "1",
            "--clinics",
            "0",
            "--ambulances",
            "2",
            "--households",
            "10",
        ],
    )?;
    let all = ["hq-1", "shelter-01", "ambulance-1", "ambulance-2"];
    for n in all {
        wait_connected(
            &tb,
            n,
            if n == "hq-1" {
                &["shelter-01"]
            } else {
                &["hq-1"]
            },
        )?;
    }
    let ca = tb.dir.join("ca");
    tests::testbed::run_ok(
        Command::new(kizuna_bin())
            .args(["certs", "revoke", "--node-id", "ambulance-2", "--ca-dir"])
            .arg(&ca),
    )?;
    std::fs::copy(ca.join("crl.der"), tb.data_dir("hq-1").join("crl.der"))?;
    for n in ["hq-1", "shelter-01", "ambulance-1"] {
        wait_for(&format!("CRL 1 at {n}"), SYNC, || {
            let m = tb.metrics(n)?;
            Ok(match sample(&m, "kizuna_crl_number") {
                Some(v) if v >= 1.0 => Ok(()),
                other => Err(format!("{other:?}")),
            })
        })?;
        wait_for(&format!("{n} without ambulance-2"), SYNC, || {
            let c = tb.connected(n)?;
            Ok(if c.contains("ambulance-2") {
                Err(format!("{c:?}"))
            } else {
                Ok(())
            })
        })?;
    }
    let _ = tb.cmd(&["status"])?; // renders the CRL column
    tb.passed()
}

/// Every node's metrics endpoint answers, and its counters move with real
/// traffic: check-ins, a medical write and an audited read.
#[test]
fn metrics_on_every_node_move_with_real_traffic() -> Result<()> {
    let tb = Testbed::up(
        "mt",
        &[
            "--shelters",
            "2",
            "--clinics",
            "1",
            "--ambulances",
            "1",
            "--households",
            "30",
        ],
    )?;
    let all = [
        "hq-1",
        "shelter-01",
        "shelter-02",
        "clinic-1",
        "ambulance-1",
    ];
    wait_registry(&tb, &all)?;
    let before: Vec<String> = all.iter().map(|n| tb.metrics(n)).collect::<Result<_>>()?;
    for (n, m) in all.iter().zip(&before) {
        ensure!(
            m.contains(&format!("kizuna_node{{node_id=\"{n}\"")),
            "{n}: {m}"
        );
        ensure!(
            sample(m, "kizuna_documents{kind=\"registry\"}") == Some(30.0),
            "{n}: {m}"
        );
        ensure!(
            sample(m, "kizuna_sqlite_bytes{file=\"db\"}").is_some_and(|b| b > 0.0),
            "{n}"
        );
        ensure!(
            sample(m, "kizuna_peers{state=\"connected\"}").is_some_and(|p| p >= 1.0),
            "{n}"
        );
        ensure!(
            sample(
                m,
                "kizuna_sync_changes_total{direction=\"received\",kind=\"registry\"}"
            )
            .is_some_and(|c| c > 0.0)
                || *n == "hq-1",
            "{n}: {m}"
        );
        ensure!(m.contains("kizuna_peer_last_sync_age_seconds{"), "{n}");
        ensure!(m.ends_with("# EOF\n"), "{n}: not OpenMetrics");
    }
    // Traffic: check-ins at both shelters, a medical profile written at hq
    // and read (audited) at the ambulance and the clinic.
    let p: Vec<String> = tb.persons.iter().take(4).map(|p| p.1.clone()).collect();
    checkin_ok(&tb, "shelter-01", &[&p[0], &p[1]], "mt-1")?;
    checkin_ok(&tb, "shelter-02", &[&p[2]], "mt-2")?;
    let (c, v) = tb.api(
        "hq-1",
        "POST",
        &format!("/api/v1/persons/{}/medical", p[3]),
        Some(&json!({"blood_type": "O+", "consent": "consented", "add": [["allergy", "ソバ"]]})),
    )?;
    ensure!(c == 201, "medical at hq: {c} {v}");
    wait_location(&tb, "hq-1", &p[2], "shelter-02")?;
    wait_location(&tb, "hq-1", &p[0], "shelter-01")?;
    for n in ["ambulance-1", "clinic-1"] {
        wait_person(&tb, n, &p[3])?;
        let path = format!(
            "/api/v1/persons/{}/medical?reason=emergency_transport",
            p[3]
        );
        wait_for(&format!("medical at {n}"), SYNC, || {
            let (c, v) = tb.api(n, "GET", &path, None)?;
            Ok(if c == 200 {
                Ok(())
            } else {
                Err(format!("{c} {v}"))
            })
        })?;
    }
    let after: Vec<String> = all.iter().map(|n| tb.metrics(n)).collect::<Result<_>>()?;
    let grew = |i: usize, series: &str| -> Result<()> {
        let (a, b) = (
            sample(&before[i], series).unwrap_or(0.0),
            sample(&after[i], series).unwrap_or(0.0),
        );
        ensure!(b > a, "{}: {series} did not grow ({a} -> {b})", all[i]);
        Ok(())
    };
    grew(
        1,
        "kizuna_sync_changes_total{direction=\"sent\",kind=\"presence\"}",
    )?;
    grew(
        2,
        "kizuna_sync_changes_total{direction=\"sent\",kind=\"presence\"}",
    )?;
    grew(
        0,
        "kizuna_sync_changes_total{direction=\"received\",kind=\"presence\"}",
    )?;
    grew(
        0,
        "kizuna_sync_change_bytes_total{direction=\"received\",kind=\"presence\"}",
    )?;
    grew(
        0,
        "kizuna_sync_changes_total{direction=\"sent\",kind=\"medical\"}",
    )?;
    grew(
        4,
        "kizuna_sync_changes_total{direction=\"received\",kind=\"medical\"}",
    )?;
    grew(4, "kizuna_audit_entries_total")?;
    grew(3, "kizuna_audit_entries_total")?;
    for i in 0..all.len() {
        grew(i, "kizuna_wire_bytes_total{direction=\"received\"}")?;
        grew(
            i,
            "kizuna_frames_total{direction=\"sent\",frame=\"changes\"}",
        )?;
    }
    grew(1, "kizuna_commit_seconds_count")?;
    // Every series the sample Grafana dashboard plots exists (card events
    // appear only on nodes with a reader).
    let dash = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/kizuna.json"),
    )?;
    let dash: serde_json::Value = serde_json::from_str(&dash)?;
    let mut names = BTreeSet::new();
    for p in dash["panels"].as_array().context("panels")? {
        for t in p["targets"].as_array().context("targets")? {
            let e = t["expr"].as_str().context("expr")?;
            for (i, _) in e.match_indices("kizuna_") {
                let n: String = e[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                names.insert(n);
            }
        }
    }
    ensure!(names.len() >= 12, "{names:?}");
    for n in names
        .iter()
        .filter(|n| !n.starts_with("kizuna_card_events"))
    {
        ensure!(
            after
                .iter()
                .any(|m| m.lines().any(|l| l.starts_with(n.as_str()))),
            "dashboard plots {n}, which no node exports"
        );
    }
    grew(0, "kizuna_documents{kind=\"medical\"}")?;
    ensure!(
        sample(&after[1], "kizuna_documents{kind=\"medical\"}") == Some(0.0),
        "shelters hold no medical"
    );
    tb.passed()
}

/// Online backup while the shelter keeps checking people in; then the node
/// restarts and writes more; then its disk is lost and it is restored from
/// the backup. Everything acknowledged before the backup started is in the
/// restored node before it talks to anyone; it starts with an incarnation
/// no earlier life used, so no actor id is reused (checked on the
/// Automerge changes every replica holds); and what it acknowledged after
/// the backup comes back from hq.
#[test]
fn backup_while_serving_then_restore_takes_a_new_incarnation() -> Result<()> {
    let mut tb = Testbed::up(
        "br",
        &[
            "--shelters",
            "1",
            "--clinics",
            "0",
            "--ambulances",
            "0",
            "--households",
            "80",
        ],
    )?;
    wait_registry(&tb, &["shelter-01"])?;
    let persons: Vec<String> = tb.persons.iter().map(|p| p.1.clone()).collect();
    ensure!(
        persons.len() >= 150,
        "registry too small: {}",
        persons.len()
    );
    let backup = tb.dir.join("backup-1");
    let inc0 = tb.status("shelter-01")?["incarnation"]
        .as_u64()
        .context("incarnation")?;
    // Check-ins stream from one thread; the backup runs from another once
    // 20 are acknowledged. `before` = acknowledged before the backup began.
    let (before, during) =
        std::thread::scope(|sc| -> Result<(BTreeSet<String>, BTreeSet<String>)> {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let data = tb.data_dir("shelter-01");
            let b = backup.clone();
            let backer = sc.spawn(move || -> Result<String> {
                rx.recv()?;
                tests::testbed::run_ok(
                    Command::new(kizuna_bin())
                        .args(["backup", "create", "--data-dir"])
                        .arg(&data)
                        .arg("--out")
                        .arg(&b),
                )
            });
            let mut acked = Vec::new();
            let mut before = None;
            for (k, p) in persons.iter().take(100).enumerate() {
                acked.extend(checkin_ok(&tb, "shelter-01", &[p], &format!("b-{k}"))?);
                if k == 20 {
                    before = Some(acked.iter().cloned().collect::<BTreeSet<_>>());
                    tx.send(())?;
                }
            }
            let out = backer.join().expect("backup thread")?;
            eprintln!("{out}");
            let before = before.expect("sent");
            let during = acked.into_iter().filter(|e| !before.contains(e)).collect();
            Ok((before, during))
        })?;
    ensure!(backup.join("manifest.json").exists(), "no backup written");
    // A restart after the backup: this life's incarnation is inc0 + 1, and
    // what it writes reaches hq.
    tb.restart("shelter-01")?;
    let inc1 = tb.status("shelter-01")?["incarnation"]
        .as_u64()
        .context("incarnation")?;
    ensure!(inc1 == inc0 + 1, "{inc0} -> {inc1}");
    let late: Vec<String> = persons[100..110].to_vec();
    let mut after_restart = BTreeSet::new();
    for (k, p) in late.iter().enumerate() {
        after_restart.extend(checkin_ok(&tb, "shelter-01", &[p], &format!("c-{k}"))?);
    }
    wait_location(&tb, "hq-1", late.last().context("late")?, "shelter-01")?;
    let old_actors = shelter_actor_incarnations(&mut tb, "hq-1")?;
    ensure!(
        old_actors.contains(&(inc1 as u32)),
        "hq holds {old_actors:?}"
    );
    // The disk dies: the node is killed and its data directory is gone.
    tb.cmd(&["kill", "shelter-01"])?;
    let data = tb.data_dir("shelter-01");
    std::fs::rename(&data, tb.dir.join("lost-disk"))?;
    let out = tests::testbed::run_ok(
        Command::new(kizuna_bin())
            .args(["backup", "restore", "--from"])
            .arg(&backup)
            .arg("--data-dir")
            .arg(&data),
    )?;
    eprintln!("{out}");
    // Before it talks to anyone: everything acknowledged before the
    // backup is there.
    let restored = tb.stored_event_ids("shelter-01")?;
    let lost: Vec<&String> = before.difference(&restored).collect();
    ensure!(
        lost.is_empty(),
        "acknowledged before the backup but lost: {lost:?}"
    );
    // Restoring into a directory that holds a database is refused.
    let again = Command::new(kizuna_bin())
        .args(["backup", "restore", "--from"])
        .arg(&backup)
        .arg("--data-dir")
        .arg(&data)
        .output()?;
    ensure!(again.status.code() == Some(2), "second restore: {again:?}");
    tb.start("shelter-01")?;
    let inc2 = tb.status("shelter-01")?["incarnation"]
        .as_u64()
        .context("incarnation")? as u32;
    ensure!(
        !old_actors.contains(&inc2) && inc2 as u64 > inc1,
        "restored node took incarnation {inc2}; earlier lives used {old_actors:?}"
    );
    // It writes under the new incarnation, and everything converges: what
    // it acknowledged after the backup comes back from hq.
    let p = persons[120].clone();
    let fresh = checkin_ok(&tb, "shelter-01", &[&p], "d-1")?;
    wait_location(&tb, "hq-1", &p, "shelter-01")?;
    let want: BTreeSet<String> = before
        .iter()
        .chain(&during)
        .chain(&after_restart)
        .chain(&fresh)
        .cloned()
        .collect();
    wait_for(
        "the restored shelter to hold every acknowledged check-in",
        SYNC,
        || {
            let have = tb.stored_event_ids("shelter-01")?;
            let missing = want.difference(&have).count();
            Ok(if missing == 0 {
                Ok(())
            } else {
                Err(format!("{missing} missing"))
            })
        },
    )?;
    // No replica holds two lives under one actor id: Automerge loads every
    // document (a reused actor with diverging sequence numbers would not),
    // and the restored life's actor appears next to the older ones.
    for n in ["hq-1", "shelter-01"] {
        let actors = shelter_actor_incarnations(&mut tb, n)?;
        ensure!(
            actors.contains(&inc2) && actors.contains(&(inc1 as u32)),
            "{n}: {actors:?}"
        );
    }
    tb.passed()
}

/// The incarnations of shelter-01's actor ids in the changes of every
/// presence document `node` holds (read with plain Automerge from its
/// live database; loading fails on conflicting changes under one actor).
fn shelter_actor_incarnations(tb: &mut Testbed, node: &str) -> Result<BTreeSet<u32>> {
    let me = crdt::actor::Actor::new(
        crdt::Role::Shelter,
        &crdt::NodeId::new("shelter-01").expect("id"),
        0,
    );
    let mut incs = BTreeSet::new();
    for bytes in tb.live_docs(node, crdt::Kind::Presence)? {
        let doc = automerge::Automerge::load(&bytes)?;
        for c in doc.get_changes(&[]) {
            if let Some(a) = crdt::actor::Actor::from_bytes(c.actor_id().to_bytes()) {
                if a.role == me.role && a.node_hash == me.node_hash {
                    incs.insert(a.incarnation);
                }
            }
        }
    }
    Ok(incs)
}
