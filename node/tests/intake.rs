//! Municipal data in and out through the `kizuna` binary on real SQLite
//! files: every import in UTF-8 (with BOM) and CP932, every bad-row rule
//! reported by line with nothing written, an import killed mid-way and
//! resumed by re-running the same file, and roles that may not import
//! refused.

mod support;
use crdt::api::{Command, Operator};
use crdt::engine::EngineConfig;
use crdt::store::Store;
use crdt::{DocKey, Kind, NodeId, Role};
use node::driver::Driver;
use node::store::{SqliteStore, DB_FILE_NAME};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};
use support::kizuna_bin;

fn kizuna(args: &[&str]) -> Output {
    std::process::Command::new(kizuna_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run kizuna")
}

fn registry(persons: usize) -> String {
    let mut s = "household_id,address,person_id,name,kana,birth_date,card_user_id\n".to_string();
    for i in 0..persons {
        s.push_str(&format!(
            "h{},三条市旭町{}-1,p{i},山田 {i},ヤマダ {i},1950-04-01,\n",
            i / 2,
            i / 2
        ));
    }
    s
}

/// An hq data directory holding persons p0..p{n}.
fn hq_with_registry(root: &Path, n: usize) -> PathBuf {
    let data = root.join("hq");
    let csv = root.join("registry.csv");
    std::fs::write(&csv, registry(n)).unwrap();
    let o = kizuna(&[
        "registry",
        "import",
        "--data-dir",
        data.to_str().unwrap(),
        csv.to_str().unwrap(),
        "--node-id",
        "hq-1",
    ]);
    assert!(o.status.success(), "{o:?}");
    data
}

fn import(data: &Path, dataset: &str, file: &Path) -> Output {
    kizuna(&[
        "import",
        dataset,
        "--data-dir",
        data.to_str().unwrap(),
        file.to_str().unwrap(),
    ])
}

fn write_utf8_bom(path: &Path, text: &str) {
    let mut b = b"\xEF\xBB\xBF".to_vec();
    b.extend_from_slice(text.as_bytes());
    std::fs::write(path, b).unwrap();
}

fn write_cp932(path: &Path, text: &str) {
    let (b, _, unmappable) = encoding_rs::SHIFT_JIS.encode(text);
    assert!(!unmappable, "test text must be CP932");
    std::fs::write(path, b.into_owned()).unwrap();
}

fn store(data: &Path) -> SqliteStore {
    SqliteStore::open_readonly(&data.join(DB_FILE_NAME)).unwrap()
}

fn doc_count(data: &Path) -> usize {
    store(data).doc_index().unwrap().len()
}

fn load(data: &Path, kind: Kind, id: &str) -> Option<crdt::doc::Doc> {
    let s = store(data);
    let key = DocKey::new(kind, id).unwrap();
    let sd = s.load_doc(&key).unwrap()?;
    Some(crdt::doc::Doc::load(key, sd.snapshot.as_deref(), &sd.changes).unwrap())
}

const SHELTERS: &str = "shelter_id,name,address,district,capacity,kind,status\n\
s-01,三条小学校,新潟県三条市旭町1-1,旭地区,300,指定避難所,開設\n\
s-02,ふれあいセンター,新潟県三条市本町2-2,本町地区,40,福祉避難所,閉鎖\n";

const CONTACTS: &str = "person_id,contact_id,contact_name,relation,email,language,consent,consent_date,do_not_disclose,share_shelter\n\
p0,c1,山田 花子,長女,hanako@example.jp,ja,同意,令和8年4月1日,0,1\n\
p0,c2,Jiro Yamada,長男,jiro@example.jp,en,1,2026-04-01,0,1\n\
p1,c3,佐藤 一郎,兄,ichiro@example.jp,ja,不同意,,0,0\n\
p2,,,,,,,,1,0\n";

const MEDICAL: &str = "person_id,blood_type,consent,allergies,conditions,medications,family_doctor,emergency_contacts\n\
p0,A型Rh+,同意,ペニシリン|そば,高血圧,アムロジピン 5mg,三条内科,山田 花子 090-0000-0000\n\
p1,O-,生命保護,,心房細動,,,\n";

const ELIGIBILITY: &str =
    "person_id,insurer_number,insurer_name,symbol,number,branch,valid_from,valid_to,copay,as_of\n\
p0,138057,三条市国民健康保険,三条,12345,01,2026-04-01,2027-03-31,3割,2026-09-01\n\
p1,138057,三条市国民健康保険,三条,23456,,令和8年4月1日,,2割,2026-09-01\n";

fn check_imported(data: &Path) {
    let shelters = store(data).shelters().unwrap();
    assert_eq!(shelters.len(), 2);
    assert_eq!(shelters[0].name, "三条小学校");
    let info = crdt::derive::shelter(&load(data, Kind::Shelter, "s-02").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(info.kind, crdt::model::ShelterKind::Welfare);
    assert!(!info.open);
    let c = crdt::views::contacts(&load(data, Kind::Contacts, "p0").unwrap()).unwrap();
    assert_eq!(c.contacts.len(), 2);
    assert_eq!(c.contacts[0].name, "山田 花子");
    assert_eq!(c.contacts[0].consent_date.as_deref(), Some("2026-04-01"));
    let m = crdt::views::medical(&load(data, Kind::Medical, "p0").unwrap()).unwrap();
    assert_eq!(m.blood_type, Some(crdt::model::BloodType::APos));
    assert_eq!(m.sections["allergy"].len(), 2);
    let e = crdt::views::eligibility(&load(data, Kind::Eligibility, "p1").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!((e.copay_pct, e.valid_to), (20, None));
    assert_eq!(
        store(data)
            .withheld()
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        ["p2"]
    );
}

#[test]
fn every_data_set_imports_in_utf8_with_bom_and_in_cp932() {
    for (enc, write) in [
        ("utf8", write_utf8_bom as fn(&Path, &str)),
        ("cp932", write_cp932),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let data = hq_with_registry(tmp.path(), 4);
        for (dataset, text) in [
            ("shelters", SHELTERS),
            ("contacts", CONTACTS),
            ("medical", MEDICAL),
            ("eligibility", ELIGIBILITY),
        ] {
            let f = tmp.path().join(format!("{dataset}.csv"));
            write(&f, text);
            let o = import(&data, dataset, &f);
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(o.status.success(), "{dataset} {enc}: {o:?}");
            assert!(out.starts_with("imported "), "{out}");
            let want = if enc == "utf8" { "Utf8" } else { "Cp932" };
            assert!(out.contains(want), "{out}");
            // The same file again: committed batches are replayed, and
            // nothing new is written.
            let before = store(&data).log_end().unwrap();
            assert!(import(&data, dataset, &f).status.success());
            assert_eq!(store(&data).log_end().unwrap(), before, "{dataset}");
        }
        check_imported(&data);
    }
}

/// One file per rule; each must fail with its line and reason, exit 2,
/// and leave the database exactly as it was.
#[test]
fn each_bad_row_rule_is_reported_by_line_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = hq_with_registry(tmp.path(), 4);
    let head = |d: &str| match d {
        "shelters" => SHELTERS.lines().next().unwrap(),
        "contacts" => CONTACTS.lines().next().unwrap(),
        "medical" => MEDICAL.lines().next().unwrap(),
        _ => ELIGIBILITY.lines().next().unwrap(),
    };
    let ok_contact = "p0,c1,山田 花子,長女,hanako@example.jp,ja,1,2026-04-01,0,1";
    let cases: &[(&str, &str, &str)] = &[
        ("shelters", "s-01,三条小学校,a,b,300,学校,開設", "kind:"),
        (
            "shelters",
            "s-01,三条小学校,a,b,many,指定避難所,開設",
            "capacity:",
        ),
        (
            "shelters",
            "s-01,三条小学校,a,b,300,指定避難所,半分",
            "status:",
        ),
        (
            "shelters",
            "s 01,三条小学校,a,b,300,指定避難所,開設",
            "shelter_id",
        ),
        ("shelters", "s-01,,a,b,300,指定避難所,開設", "name"),
        (
            "contacts",
            "p0,c1,a,,not-an-address,ja,1,2026-04-01,0,1",
            "email",
        ),
        (
            "contacts",
            "p0,c1,a,,a@example.jp,ja,1,,0,1",
            "consent_date: required",
        ),
        (
            "contacts",
            "p0,c1,a,,a@example.jp,ja,1,2099-01-01,0,1",
            "future",
        ),
        ("contacts", "p0,c1,a,,a@example.jp,fr,0,,0,1", "language"),
        (
            "contacts",
            "p0,c1,a,,a@example.jp,ja,maybe,,0,1",
            "consent:",
        ),
        (
            "contacts",
            "p9,c1,a,,a@example.jp,ja,0,,0,1",
            "unknown person_id p9",
        ),
        (
            "contacts",
            "p0,c1,a,,a@example.jp,ja,0,,0",
            "expected 10 columns",
        ),
        (
            "contacts",
            "p0,c1,\"a,,a@example.jp,ja,0,,0,1",
            "unterminated quote",
        ),
        (
            "contacts",
            "p0,c1,家族 123456789018,,a@example.jp,ja,0,,0,1",
            "individual-number",
        ),
        ("medical", "p0,C+,同意,,,,,", "blood_type"),
        ("medical", "p0,A+,,,,,,", "consent:"),
        ("medical", "p9,A+,同意,,,,,", "unknown person_id"),
        (
            "eligibility",
            "p0,1380,x,a,1,01,2026-04-01,,30,2026-09-01",
            "insurer_number",
        ),
        (
            "eligibility",
            "p0,138057,x,a,1,1,2026-04-01,,30,2026-09-01",
            "branch",
        ),
        (
            "eligibility",
            "p0,138057,x,a,1,01,2026-04-01,2026-01-01,30,2026-09-01",
            "valid_to",
        ),
        (
            "eligibility",
            "p0,138057,x,a,1,01,2026-04-01,,40,2026-09-01",
            "copay",
        ),
        (
            "eligibility",
            "p0,138057,x,a,1,01,平成31年5月1日,,30,2026-09-01",
            "valid_from",
        ),
    ];
    let before = store(&data).log_end().unwrap();
    for (dataset, row, reason) in cases {
        let f = tmp.path().join("bad.csv");
        // A good row first: one bad row must keep it out too.
        let good = match *dataset {
            "shelters" => "s-09,大島中学校,a,b,10,指定避難所,開設",
            "contacts" => ok_contact,
            "medical" => "p1,O+,同意,,,,,",
            _ => "p1,138057,x,a,1,01,2026-04-01,,30,2026-09-01",
        };
        std::fs::write(&f, format!("{}\n{good}\n{row}\n", head(dataset))).unwrap();
        let o = import(&data, dataset, &f);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{dataset} {row}: {err}");
        assert!(
            err.contains(&format!("{}:line 3: ", f.display())) && err.contains(reason),
            "{dataset} {row}: {err}"
        );
        assert!(err.contains("nothing was imported"), "{err}");
        assert!(!err.contains("123456789018"), "never echoed");
        assert_eq!(store(&data).log_end().unwrap(), before, "{dataset} {row}");
    }
    // More than ten contacts for one person.
    let rows: Vec<String> = (0..11)
        .map(|i| format!("p0,c{i},家族,,f{i}@example.jp,ja,0,,0,0"))
        .collect();
    let f = tmp.path().join("eleven.csv");
    std::fs::write(&f, format!("{}\n{}\n", head("contacts"), rows.join("\n"))).unwrap();
    let o = import(&data, "contacts", &f);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("line 12: p0 has more than 10 contacts"));
    // A wrong header.
    std::fs::write(&f, "person_id,email\np0,a@example.jp\n").unwrap();
    let o = import(&data, "contacts", &f);
    assert!(String::from_utf8_lossy(&o.stderr).contains("line 1: header must be exactly"));
    assert_eq!(store(&data).log_end().unwrap(), before);
}

/// The import process is killed after its first batch commits; the same
/// command again completes the import without rewriting committed
/// batches.
#[test]
fn an_import_killed_mid_way_is_completed_by_running_it_again() {
    let tmp = tempfile::tempdir().unwrap();
    let data = hq_with_registry(tmp.path(), 2);
    const N: usize = 60_000; // 12 batches of 5,000
    let mut csv = SHELTERS.lines().next().unwrap().to_string();
    csv.push('\n');
    for i in 0..N {
        csv.push_str(&format!(
            "s{i:06},避難所 {i},三条市{i},地区{},100,指定避難所,開設\n",
            i % 40
        ));
    }
    let f = tmp.path().join("shelters.csv");
    std::fs::write(&f, &csv).unwrap();
    let mut child = std::process::Command::new(kizuna_bin())
        .args(["import", "shelters", "--data-dir"])
        .arg(&data)
        .arg(&f)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Watch the committed op ids from beside the process (WAL readers do
    // not block the writer); kill as soon as one batch is durable.
    let committed = |db: &Path| -> usize {
        let Ok(c) =
            rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        else {
            return 0;
        };
        c.query_row(
            "SELECT count(*) FROM ops WHERE op_id LIKE 'import-shelters-%'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap_or(0) as usize
    };
    let db = data.join(DB_FILE_NAME);
    let deadline = Instant::now() + Duration::from_secs(120);
    while committed(&db) == 0 {
        assert!(Instant::now() < deadline, "no batch committed");
        assert!(child.try_wait().unwrap().is_none(), "import ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done = committed(&db);
    assert!(
        (1..12).contains(&done),
        "killed after {done} of 12 batches: the test needs an interrupted import"
    );
    let first = DocKey::new(Kind::Shelter, "s000000").unwrap();
    let heads = store(&data).doc_index().unwrap();
    let first_heads = heads.iter().find(|(k, _)| *k == first).unwrap().1.clone();
    assert!(store(&data).shelters().unwrap().len() < N);
    let o = import(&data, "shelters", &f);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(store(&data).shelters().unwrap().len(), N);
    assert_eq!(committed(&db), 12);
    // The committed first batch was replayed, not written again.
    let after = store(&data).doc_index().unwrap();
    assert_eq!(
        after.iter().find(|(k, _)| *k == first).unwrap().1,
        first_heads
    );
    assert_eq!(store(&data).doc_changes(&first).unwrap().len(), 1);
}

#[test]
fn roles_that_may_not_import_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let node_dir = |id: &str, role: Role| {
        let d = tmp.path().join(id);
        std::fs::create_dir_all(&d).unwrap();
        let s = SqliteStore::open(&d.join(DB_FILE_NAME)).unwrap();
        // The engine writes the data directory's identity, as `run` does.
        let driver = Driver::start(s, EngineConfig::new(NodeId::new(id).unwrap(), role)).unwrap();
        driver
            .command_blocking(
                "noop".into(),
                Operator("t".into()),
                Command::RecordExport {
                    what: "nothing".into(),
                    scope: String::new(),
                    count: 0,
                },
            )
            .unwrap();
        driver.shutdown().unwrap();
        d
    };
    let shelter = node_dir("shelter-01", Role::Shelter);
    let clinic = node_dir("clinic-1", Role::Clinic);
    let f = tmp.path().join("x.csv");
    for (data, dataset, text) in [
        (&shelter, "medical", MEDICAL),
        (&shelter, "contacts", CONTACTS),
        (&clinic, "contacts", CONTACTS),
        (&clinic, "eligibility", ELIGIBILITY),
        (&clinic, "shelters", SHELTERS),
        (&shelter, "registry", &registry(2)),
    ] {
        std::fs::write(&f, text).unwrap();
        let before = doc_count(data);
        let o = import(data, dataset, &f);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{dataset}: {err}");
        assert!(err.contains("import needs a data directory of a"), "{err}");
        assert_eq!(doc_count(data), before);
    }
    // Medical profiles may be imported at a clinic (persons unknown there
    // are reported as rows, nothing written).
    std::fs::write(&f, MEDICAL).unwrap();
    let o = import(&clinic, "medical", &f);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("line 2: unknown person_id p0"), "{err}");
}
