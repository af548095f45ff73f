//! Municipal data in and out at scale, through the same code paths as
//! `kizuna import` and the export API.
//!
//! `cargo bench -p node --bench intake -- --residents 1000000 --evacuees 184000`
//! builds an hq registry of `--residents` persons on a real SQLite file,
//! then imports one family-contacts row, one medical profile and one
//! eligibility row per resident with `node::import::import_dataset` (parse
//! and validate the whole file, check every person, commit batches of
//! 5,000 through the engine thread), printing rows per second for each;
//! then shows all-or-nothing at that size (the same contacts file with one
//! bad last row: rejected, nothing written, and how long the refusal
//! took). Finally it checks `--evacuees` persons into 100 shelters and
//! times a PFIF 1.4 export of all of them (`node::outputs::render`, the
//! export API's path, audit entry included). Goals: ≥ 20,000 rows/s per
//! import, PFIF for 184,000 evacuees under 10 s.

/// The parts of `benches/support/` this benchmark uses (each benchmark
/// compiles only what it uses).
mod support {
    pub mod memory;
    pub mod registry;
}

use crdt::api::{Command, Input, Operator, Output};
use crdt::store::Store;
use node::import::{datasets, import_dataset, Encoding};
use node::store::{SqliteStore, DB_FILE_NAME};
use rand_chacha::rand_core::SeedableRng;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;
use support::{memory::*, registry::*};

fn write_csv(path: &Path, header: &[&str], n: usize, row: impl Fn(usize) -> String) {
    let mut s = header.join(",");
    s.push('\n');
    for i in 0..n {
        s.push_str(&row(i));
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

/// CPU seconds this process has used so far, all threads (user and
/// system, from /proc/self/stat, in Linux's fixed user-visible clock
/// ticks of 10 ms). On a shared
/// machine wall time says how busy the others were as much as how fast we
/// are; CPU time per row is the number to compare between versions.
fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14 and stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / 100.0
}

/// Wall and CPU seconds of one import.
fn timed<D: node::import::Dataset>(data: &Path, file: &Path) -> (f64, f64) {
    let (t, cpu) = (Instant::now(), cpu_s());
    let r = import_dataset::<D>(data, file, Encoding::Utf8, None);
    let s = (t.elapsed().as_secs_f64(), cpu_s() - cpu);
    if let Err(e) = r {
        panic!("{} import failed: {}", D::NAME, e.message);
    }
    s
}

fn main() {
    let residents = arg("--residents", 100_000) as usize;
    let evacuees = (arg("--evacuees", 18_400) as usize).min(residents);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hq");
    std::fs::create_dir_all(&data).unwrap();
    let t = Instant::now();
    drop(build_registry(&data.join(DB_FILE_NAME), residents));
    let registry_s = t.elapsed().as_secs_f64();

    let contacts = dir.path().join("contacts.csv");
    write_csv(
        &contacts,
        <datasets::ContactRows as node::import::Dataset>::COLUMNS,
        residents,
        |i| {
            format!(
                "{},c1,家族 {i},長女,family{i}@example.jp,ja,1,2026-04-01,{},1",
                person_of(i),
                u8::from(i % 50 == 0)
            )
        },
    );
    let medical = dir.path().join("medical.csv");
    write_csv(
        &medical,
        <datasets::MedicalRows as node::import::Dataset>::COLUMNS,
        residents,
        |i| {
            format!(
                "{},A+,同意,ペニシリン|そば,高血圧,アムロジピン 5mg,三条内科,家族 090-0000-{:04}",
                person_of(i),
                i % 10_000
            )
        },
    );
    let eligibility = dir.path().join("eligibility.csv");
    write_csv(
        &eligibility,
        <datasets::EligibilityRows as node::import::Dataset>::COLUMNS,
        residents,
        |i| {
            format!(
                "{},138057,三条市国民健康保険,三条,{},01,2026-04-01,2027-03-31,3割,2026-09-01",
                person_of(i),
                100_000 + i
            )
        },
    );
    let contacts_s = timed::<datasets::ContactRows>(&data, &contacts);
    let medical_s = timed::<datasets::MedicalRows>(&data, &medical);
    let eligibility_s = timed::<datasets::EligibilityRows>(&data, &eligibility);

    // All or nothing at full size: one bad row at the very end.
    let mut bad = std::fs::read_to_string(&contacts).unwrap();
    let _ = writeln!(bad, "{},c2,x,,not-an-address,ja,0,,0,0", person_of(0));
    let bad_file = dir.path().join("contacts-bad.csv");
    std::fs::write(&bad_file, bad).unwrap();
    let before = SqliteStore::open_readonly(&data.join(DB_FILE_NAME))
        .unwrap()
        .log_end()
        .unwrap();
    let t = Instant::now();
    let r = import_dataset::<datasets::ContactRows>(&data, &bad_file, Encoding::Utf8, None);
    let refusal_s = t.elapsed().as_secs_f64();
    assert!(r.is_err(), "the bad file must be refused");
    let after = SqliteStore::open_readonly(&data.join(DB_FILE_NAME))
        .unwrap()
        .log_end()
        .unwrap();
    assert_eq!(before, after, "nothing written");

    // Evacuees in 100 shelters, then PFIF.
    let store = SqliteStore::open(&data.join(DB_FILE_NAME)).unwrap();
    let mut hq = crdt::engine::Engine::open(
        store,
        crdt::engine::EngineConfig::for_tests(crdt::NodeId::new("hq-1").unwrap(), crdt::Role::Hq),
        now(),
    )
    .unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let t = Instant::now();
    for (b, chunk) in (0..evacuees)
        .collect::<Vec<_>>()
        .chunks(crdt::engine::MAX_PERSONS_PER_COMMAND)
        .enumerate()
    {
        let out = hq.handle(
            Input::Command {
                op_id: format!("ci-{b}"),
                operator: Operator("bench".into()),
                cmd: Command::CheckIn {
                    person_ids: chunk.iter().map(|&i| person_of(i)).collect(),
                    shelter_id: Some(format!("s{:03}", b % 100)),
                },
            },
            now(),
            &mut rng,
        );
        assert!(matches!(
            out.iter().find(|o| matches!(o, Output::Reply { .. })),
            Some(Output::Reply { result: Ok(_), .. })
        ));
    }
    let checkin_s = t.elapsed().as_secs_f64();
    let store = hq.into_store();
    let driver = node::driver::Driver::start(
        store,
        crdt::engine::EngineConfig::for_tests(crdt::NodeId::new("hq-1").unwrap(), crdt::Role::Hq),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t = Instant::now();
    let r = rt
        .block_on(node::outputs::render(
            &driver,
            "bench",
            node::outputs::Output::Pfif {
                domain: "kizuna.example.lg.jp".into(),
                author: "bench".into(),
            },
            now().wall_ms,
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let pfif_s = t.elapsed().as_secs_f64();
    driver.shutdown().unwrap();
    let withheld = (0..evacuees).filter(|i| i % 50 == 0).count();
    assert_eq!(r.records, evacuees - withheld);

    let rate = |s: f64| residents as f64 / s;
    let per_cpu = |s: f64| residents as f64 / s.max(0.01);
    println!("residents                  {residents}");
    println!("registry build             {registry_s:.1} s");
    for (name, (wall, cpu)) in [
        ("contacts", contacts_s),
        ("medical", medical_s),
        ("eligibility", eligibility_s),
    ] {
        println!(
            "{:<27}{:.0} rows/s ({wall:.1} s; {cpu:.1} CPU s = {:.0} rows per CPU s)",
            format!("{name} import"),
            rate(wall),
            per_cpu(cpu)
        );
    }
    println!("bad last row refused in    {refusal_s:.1} s, nothing written");
    println!("evacuees checked in        {evacuees} ({checkin_s:.1} s)");
    println!(
        "pfif export                {pfif_s:.2} s for {evacuees} evacuees ({} records, {} withheld, {} MiB)",
        r.records,
        withheld,
        r.bytes.len() >> 20
    );
    println!(
        "{}",
        serde_json::json!({
            "residents": residents, "evacuees": evacuees,
            "contacts_rows_per_sec": rate(contacts_s.0), "medical_rows_per_sec": rate(medical_s.0),
            "eligibility_rows_per_sec": rate(eligibility_s.0),
            "contacts_rows_per_cpu_sec": per_cpu(contacts_s.1),
            "medical_rows_per_cpu_sec": per_cpu(medical_s.1),
            "eligibility_rows_per_cpu_sec": per_cpu(eligibility_s.1), "refusal_s": refusal_s,
            "pfif_s": pfif_s, "pfif_records": r.records, "peak_rss_bytes": peak_rss(),
        })
    );
}
