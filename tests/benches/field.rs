//! Field deployment numbers (issue 13), on `deploy/testbed`. Prints
//! numbers, asserts nothing about time:
//!
//! 1. **First sync.** `deploy/testbed up` with 6 nodes (hq, 2 shelters, a
//!    clinic, 2 ambulances) and a registry of `--residents` (default
//!    100,000): seconds until `up` returns (CA, certificates, registry
//!    import at hq, nodes started) and until every node holds the whole
//!    registry (`documents_by_kind.registry` equal to hq's).
//! 2. **Online backup and restore** of an hq node holding `--hq-residents`
//!    (default 1,000,000) while it serves check-ins: `kizuna backup create`
//!    beside the running node, with a client checking people in at hq
//!    throughout (acknowledged check-ins and the slowest one during the
//!    backup are printed), then `kizuna backup restore` into a new data
//!    directory.
//!
//! `cargo build --release -p node --bin kizuna && cargo bench -p tests --bench field -- [--residents N] [--hq-residents N]`
//! (root; the last line of output is one JSON object). Goal: each of the
//! three times under 60 s.

use anyhow::{ensure, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tests::testbed::{run_ok, wait_for, State};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A testbed brought up through the command; `down` on drop.
struct Bed {
    name: String,
    dir: PathBuf,
}

impl Bed {
    fn cmd(&self, args: &[&str]) -> Result<String> {
        run_ok(
            Command::new(env!("CARGO_BIN_EXE_kizuna-testbed"))
                .args(["--name", &self.name, "--dir"])
                .arg(&self.dir)
                .args(args),
        )
    }
    fn new(tag: &str) -> Bed {
        let name = format!("tbfb{tag}{}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("kizuna-bench-{name}"));
        let b = Bed { name, dir };
        let _ = b.cmd(&["down"]);
        b
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Err(e) = self.cmd(&["down"]) {
            eprintln!("testbed cleanup: {e:#}");
        }
    }
}

fn registry(st: &State, id: &str) -> Option<u64> {
    st.status_of(id).ok()?["documents_by_kind"]["registry"].as_u64()
}

fn first_sync(residents: usize) -> Result<serde_json::Value> {
    let bed = Bed::new("s");
    let t0 = Instant::now();
    bed.cmd(&[
        "up",
        "--shelters",
        "2",
        "--clinics",
        "1",
        "--ambulances",
        "2",
        "--residents",
        &residents.to_string(),
    ])?;
    let up_s = t0.elapsed().as_secs_f64();
    let st = State::load(&bed.dir)?;
    // hq may be slow to answer right after the import: wait for its count
    // (the households `up` imported) instead of giving up on one call.
    let want = st.households as u64;
    wait_for("the registry at hq-1", Duration::from_secs(600), || {
        let got = registry(&st, "hq-1");
        Ok(if got == Some(want) {
            Ok(())
        } else {
            Err(format!("{got:?} of {want}"))
        })
    })?;
    let mut per_node = serde_json::Map::new();
    for n in &st.nodes {
        wait_for(
            &format!("the registry at {}", n.id),
            Duration::from_secs(1800),
            || {
                let got = registry(&st, &n.id);
                Ok(if got == Some(want) {
                    Ok(())
                } else {
                    Err(format!("{got:?} of {want}"))
                })
            },
        )?;
        per_node.insert(n.id.clone(), json!(t0.elapsed().as_secs_f64()));
    }
    let all_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "first sync: {} nodes, {} households / {} persons: `up` returned after {up_s:.1} s, every node held the registry after {all_s:.1} s",
        st.nodes.len(),
        st.households,
        st.persons
    );
    Ok(json!({
        "nodes": st.nodes.len(), "households": st.households, "persons": st.persons,
        "up_s": up_s, "all_nodes_hold_registry_s": all_s, "per_node_s": per_node,
    }))
}

fn backup_restore(residents: usize) -> Result<serde_json::Value> {
    let bed = Bed::new("b");
    let t0 = Instant::now();
    // hq alone runs; shelter-01 exists only so that hq knows the shelter
    // the check-ins are recorded at.
    bed.cmd(&[
        "up",
        "--shelters",
        "1",
        "--clinics",
        "0",
        "--ambulances",
        "0",
        "--residents",
        &residents.to_string(),
        "--no-start",
    ])?;
    bed.cmd(&["start", "hq-1"])?;
    let provision_s = t0.elapsed().as_secs_f64();
    let st = State::load(&bed.dir)?;
    let persons: Vec<String> = std::fs::read_to_string(&st.registry_csv)?
        .lines()
        .skip(1)
        .take(20_000)
        .map(|l| l.split(',').nth(2).unwrap_or("").to_string())
        .collect();
    let out = bed.dir.join("backup");
    let data = st.node("hq-1")?.data_dir();
    let done = AtomicBool::new(false);
    let (backup_s, acked, slowest_ms, backup_out) = std::thread::scope(|sc| -> Result<_> {
        let client = sc.spawn(|| -> Result<(usize, f64)> {
            let (mut n, mut slowest) = (0usize, 0f64);
            for (k, p) in persons.iter().enumerate() {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                let t = Instant::now();
                let (c, v) = st.api(
                    "hq-1",
                    "POST",
                    "/api/v1/checkins",
                    Some(&json!({"person_ids": [p], "op_id": format!("bk-{k}"), "shelter_id": "shelter-01"})),
                )?;
                ensure!(c == 201, "check-in at hq during the backup: {c} {v}");
                slowest = slowest.max(t.elapsed().as_secs_f64() * 1000.0);
                n += 1;
            }
            Ok((n, slowest))
        });
        // Let the stream run before the backup starts.
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let r = run_ok(
            Command::new(tests::testbed::find_kizuna()?)
                .args(["backup", "create", "--data-dir"])
                .arg(&data)
                .arg("--out")
                .arg(&out),
        );
        let backup_s = t.elapsed().as_secs_f64();
        done.store(true, Ordering::SeqCst);
        let (n, slowest) = client.join().expect("client")?;
        Ok((backup_s, n, slowest, r?))
    })?;
    eprintln!("{}", backup_out.trim());
    let restore_dir = bed.dir.join("restored");
    let t = Instant::now();
    let r = run_ok(
        Command::new(tests::testbed::find_kizuna()?)
            .args(["backup", "restore", "--from"])
            .arg(&out)
            .arg("--data-dir")
            .arg(&restore_dir),
    )?;
    let restore_s = t.elapsed().as_secs_f64();
    eprintln!("{}", r.trim());
    let db_bytes = std::fs::metadata(out.join("kizuna.db"))?.len();
    eprintln!(
        "hq with {} persons ({} households, db {:.0} MiB): provisioned in {provision_s:.1} s; online backup {backup_s:.1} s while {acked} check-ins were acknowledged (slowest {slowest_ms:.0} ms); restore {restore_s:.1} s",
        st.persons,
        st.households,
        db_bytes as f64 / (1 << 20) as f64
    );
    let _: &Path = &restore_dir;
    Ok(json!({
        "households": st.households, "persons": st.persons, "db_bytes": db_bytes,
        "provision_s": provision_s, "backup_s": backup_s, "restore_s": restore_s,
        "checkins_during_backup": acked, "slowest_checkin_ms": slowest_ms,
    }))
}

fn main() -> Result<()> {
    let residents = arg("--residents", 100_000);
    let hq_residents = arg("--hq-residents", 1_000_000);
    let sync = first_sync(residents)?;
    let backup = backup_restore(hq_residents)?;
    println!(
        "{}",
        json!({"bench": "field", "first_sync": sync, "backup_restore": backup})
    );
    Ok(())
}
