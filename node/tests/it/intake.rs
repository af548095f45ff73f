//! Municipal data in and out through the `kizuna` binary on real SQLite
//! files: every import in UTF-8 (with BOM) and CP932, every bad-row rule
//! reported by line with nothing written, an import killed mid-way and
//! resumed by re-running the same file, and roles that may not import
//! refused.

use crate::support::kizuna_bin;
use crdt::api::{Command, Operator};
use crdt::engine::EngineConfig;
use crdt::store::Store;
use crdt::{DocKey, Kind, NodeId, Role};
use node::driver::Driver;
use node::store::{SqliteStore, DB_FILE_NAME};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

fn kizuna(args: &[&str]) -> Output {
    std::process::Command::new(kizuna_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run kizuna")
}

/// An hq data directory holding persons p0..p{n}.
fn hq_with_registry(root: &Path, n: usize) -> PathBuf {
    let data = root.join("hq");
    let csv = root.join("registry.csv");
    std::fs::write(&csv, crdt::testkit::registry_csv(n)).unwrap();
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
        let driver =
            Driver::start(s, EngineConfig::for_tests(NodeId::new(id).unwrap(), role)).unwrap();
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
        (&shelter, "registry", &crdt::testkit::registry_csv(2)),
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

// ----- outputs ---------------------------------------------------------------

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// An hq directory with the four data sets and p0, p1, p2 checked in at
/// s-01 (p2 asked for do-not-disclose).
fn hq_with_everything(root: &Path) -> PathBuf {
    let data = hq_with_registry(root, 4);
    for (dataset, text) in [
        ("shelters", SHELTERS),
        ("contacts", CONTACTS),
        ("medical", MEDICAL),
        ("eligibility", ELIGIBILITY),
    ] {
        let f = root.join(format!("{dataset}.csv"));
        std::fs::write(&f, text).unwrap();
        assert!(import(&data, dataset, &f).status.success());
    }
    let (lock, driver) = node::export::open_own(&data).unwrap();
    driver
        .command_blocking(
            "ci".into(),
            Operator("desk".into()),
            Command::CheckIn {
                person_ids: vec!["p0".into(), "p1".into(), "p2".into()],
                shelter_id: Some("s-01".into()),
            },
        )
        .unwrap();
    driver.shutdown().unwrap();
    drop(lock);
    data
}

fn audit_entries(data: &Path) -> Vec<crdt::model::AuditEntry> {
    let doc = load(data, Kind::Audit, "hq-1").unwrap();
    let e = crdt::views::audit(&doc).unwrap();
    assert!(crdt::views::audit_chain_ok(&e));
    e
}

/// FHIR R4 rules checked offline: Bundle.type document with identifier
/// and timestamp (bdl-9, bdl-10), the Composition first (bdl-11), every
/// fullUrl a unique urn:uuid, every reference resolving inside the
/// Bundle, and each resource's required elements and code values.
fn check_fhir_document(b: &serde_json::Value) {
    let instant = |s: &str| {
        let b = s.as_bytes();
        s.len() >= 20 && b[4] == b'-' && b[10] == b'T' && (s.ends_with('Z') || s.contains('+'))
    };
    assert_eq!(b["resourceType"], "Bundle");
    assert_eq!(b["type"], "document");
    assert!(b["identifier"]["system"].is_string() && b["identifier"]["value"].is_string());
    assert!(instant(b["timestamp"].as_str().unwrap()));
    let entries = b["entry"].as_array().unwrap();
    assert_eq!(entries[0]["resource"]["resourceType"], "Composition");
    let mut urls = std::collections::BTreeMap::new();
    for e in entries {
        let url = e["fullUrl"].as_str().unwrap();
        let uuid = url.strip_prefix("urn:uuid:").expect("urn:uuid fullUrl");
        assert!(
            uuid.len() == 36
                && uuid
                    .chars()
                    .enumerate()
                    .all(|(i, c)| if [8, 13, 18, 23].contains(&i) {
                        c == '-'
                    } else {
                        c.is_ascii_hexdigit() && !c.is_ascii_uppercase()
                    }),
            "{uuid}"
        );
        assert!(urls
            .insert(
                url.to_string(),
                e["resource"]["resourceType"].as_str().unwrap().to_string()
            )
            .is_none());
    }
    fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    if k == "reference" {
                        out.push(x.as_str().unwrap().to_string());
                    } else {
                        refs(x, out);
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = vec![];
    refs(b, &mut all);
    for r in &all {
        assert!(urls.contains_key(r), "unresolved reference {r}");
    }
    let c = &entries[0]["resource"];
    assert!(["preliminary", "final", "amended", "entered-in-error"]
        .contains(&c["status"].as_str().unwrap()));
    assert!(c["type"]["coding"][0]["code"].is_string());
    assert!(instant(c["date"].as_str().unwrap()));
    assert!(!c["author"].as_array().unwrap().is_empty());
    assert!(c["title"].is_string());
    assert_eq!(urls[c["subject"]["reference"].as_str().unwrap()], "Patient");
    for s in c["section"].as_array().unwrap() {
        assert!(s["title"].is_string() && s["code"]["coding"][0]["system"] == "http://loinc.org");
        assert!(s["text"]["div"]
            .as_str()
            .unwrap()
            .starts_with("<div xmlns=\"http://www.w3.org/1999/xhtml\">"));
        assert!(
            s["entry"].is_array() != s["emptyReason"].is_object(),
            "cmp-2: entry or emptyReason"
        );
    }
    for e in entries {
        let r = &e["resource"];
        match r["resourceType"].as_str().unwrap() {
            "Patient" => {
                if let Some(d) = r["birthDate"].as_str() {
                    assert!(d.len() == 10 && d.as_bytes()[4] == b'-');
                }
            }
            "AllergyIntolerance" => {
                assert_eq!(urls[r["patient"]["reference"].as_str().unwrap()], "Patient");
                assert!(r["code"]["text"].is_string());
            }
            "Condition" => {
                assert_eq!(urls[r["subject"]["reference"].as_str().unwrap()], "Patient");
            }
            "MedicationStatement" => {
                assert!([
                    "active",
                    "completed",
                    "entered-in-error",
                    "intended",
                    "stopped",
                    "on-hold",
                    "unknown",
                    "not-taken"
                ]
                .contains(&r["status"].as_str().unwrap()));
                assert!(
                    r["medicationCodeableConcept"].is_object()
                        || r["medicationReference"].is_object()
                );
                assert_eq!(urls[r["subject"]["reference"].as_str().unwrap()], "Patient");
            }
            "Observation" => {
                assert!(r["status"].is_string() && r["code"].is_object());
            }
            "Composition" => {}
            other => panic!("unexpected resource {other}"),
        }
    }
}

#[test]
fn outputs_are_valid_audited_private_and_honour_do_not_disclose() {
    let tmp = tempfile::tempdir().unwrap();
    let data = hq_with_everything(tmp.path());
    let out = tmp.path().join("out");
    let d = data.to_str().unwrap();
    let run = |args: &[&str]| {
        let o = kizuna(args);
        assert!(o.status.success(), "{args:?}: {o:?}");
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let f = |n: &str| out.join(n).to_str().unwrap().to_string();
    run(&[
        "export",
        "roster",
        "--data-dir",
        d,
        "--out",
        &f("roster-cp932.csv"),
        "--encoding",
        "cp932",
    ]);
    run(&[
        "export",
        "roster",
        "--data-dir",
        d,
        "--out",
        &f("roster-utf8.csv"),
        "--shelter",
        "s-01",
    ]);
    let s = run(&["export", "pfif", "--data-dir", d, "--out", &f("pfif.xml")]);
    assert!(s.contains("exported 2 record(s)"), "{s}");
    run(&[
        "export",
        "handover",
        "--data-dir",
        d,
        "--out",
        &f("handover.json"),
        "--person",
        "p0",
        "--reason",
        "hospital_handover",
    ]);
    run(&["docs", "export", "--data-dir", d, "--out", &f("docs")]);

    // Files 0600, directories 0700, whatever the umask.
    assert_eq!(mode(&out), 0o700);
    for n in [
        "roster-cp932.csv",
        "roster-utf8.csv",
        "pfif.xml",
        "handover.json",
        "docs/index.json",
    ] {
        assert_eq!(mode(&out.join(n)), 0o600, "{n}");
    }
    assert_eq!(mode(&out.join("docs")), 0o700);

    // Roster: CP932 readable (strict decode), same rows as UTF-8 with BOM.
    let cp = std::fs::read(out.join("roster-cp932.csv")).unwrap();
    let text = encoding_rs::SHIFT_JIS
        .decode_without_bom_handling_and_without_replacement(&cp)
        .expect("valid CP932")
        .into_owned();
    let utf = std::fs::read(out.join("roster-utf8.csv")).unwrap();
    let utf = std::str::from_utf8(utf.strip_prefix(b"\xEF\xBB\xBF").expect("BOM")).unwrap();
    assert_eq!(text, utf);
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(
        rows[0][..5],
        ["番号", "避難所ID", "避難所名", "世帯番号", "氏名"]
    );
    assert_eq!(rows.len(), 4, "{text}");
    let p2 = rows.iter().find(|r| r[4] == "山田 2").unwrap();
    assert_eq!(
        (p2[2], p2[8], p2[9], p2[11]),
        ("三条小学校", "三条市旭町1-1", "在所", "非開示")
    );
    let p0 = rows.iter().find(|r| r[4] == "山田 0").unwrap();
    assert_eq!((p0[6], p0[11]), ("1950-04-01", "可"));

    // PFIF: valid against the schema, do-not-disclose left out.
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/schemas/pfif-1.4.xsd");
    let v = std::process::Command::new("xmllint")
        .args(["--noout", "--schema"])
        .arg(&schema)
        .arg(out.join("pfif.xml"))
        .output()
        .expect("xmllint (libxml2-utils, deploy/scripts/setup.sh)");
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let xml = std::fs::read_to_string(out.join("pfif.xml")).unwrap();
    assert_eq!(xml.matches("<pfif:person>").count(), 2);
    assert!(xml.contains("<pfif:full_name>山田 0</pfif:full_name>"));
    assert!(xml.contains("<pfif:status>believed_alive</pfif:status>"));
    assert!(!xml.contains("山田 2") && !xml.contains("person.p2"));
    // The schema is not a rubber stamp: a person without full_name fails.
    std::fs::write(
        out.join("bad.xml"),
        xml.replacen("<pfif:full_name>山田 0</pfif:full_name>", "", 1),
    )
    .unwrap();
    let v = std::process::Command::new("xmllint")
        .args(["--noout", "--schema"])
        .arg(&schema)
        .arg(out.join("bad.xml"))
        .output()
        .unwrap();
    assert!(!v.status.success());

    // FHIR handover.
    let b: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("handover.json")).unwrap()).unwrap();
    check_fhir_document(&b);
    let s = b.to_string();
    assert!(s.contains("ペニシリン") && s.contains("アムロジピン 5mg") && s.contains("\"A+\""));

    // Insurance numbers leave no export (eligibility documents left out).
    for n in [
        "roster-cp932.csv",
        "roster-utf8.csv",
        "pfif.xml",
        "handover.json",
    ] {
        let t = String::from_utf8_lossy(&std::fs::read(out.join(n)).unwrap()).to_string();
        assert!(!t.contains("12345") && !t.contains("23456"), "{n}");
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("docs/index.json")).unwrap()).unwrap();
    assert_eq!(index["left_out"]["eligibility"], 2);
    assert!(!out.join("docs/eligibility").exists());

    // Every export in the audit chain: who, what, how many.
    let e = audit_entries(&data);
    let exports: Vec<(&str, &str)> = e
        .iter()
        .filter(|x| x.action == "export")
        .map(|x| (x.record.as_str(), x.reason.as_str()))
        .collect();
    assert_eq!(exports.len(), 5, "{exports:?}");
    assert!(exports[0].0 == "export/roster_csv_cp932" && exports[0].1.contains("; 3 records"));
    assert!(exports[2].0 == "export/pfif" && exports[2].1.contains("; 2 records"));
    assert!(exports[3].0 == "export/fhir_handover" && exports[3].1.contains("p0; 1 records"));
    assert_eq!(exports[4].0, "export/docs");
    assert!(e
        .iter()
        .filter(|x| x.action == "export")
        .all(|x| x.operator.starts_with("cli:")));
    assert!(e
        .iter()
        .any(|x| x.action == "medical_read" && x.reason == "hospital_handover"));
}

#[test]
fn api_edits_checks_outbox_and_downloads() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let data = hq_with_everything(tmp.path());
    let token = node::auth::Operators::add(&data, "alice").unwrap();
    let (_lock, driver) = node::export::open_own(&data).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let state = node::api::ApiState::new(driver.clone(), data.clone());
    let task = rt.spawn(node::api::serve(listener, state, async {
        let _ = rx.await;
    }));
    let req = |method: &str, path: &str, body: Option<&str>| -> (u16, Vec<u8>, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let body = body.unwrap_or("");
        let r = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        s.write_all(r.as_bytes()).unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        let at = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&buf[..at]).to_string();
        let code = head.split(' ').nth(1).unwrap().parse().unwrap();
        (code, buf[at + 4..].to_vec(), head)
    };
    let json = |b: &[u8]| -> serde_json::Value { serde_json::from_slice(b).unwrap() };
    // Open a shelter during the disaster and change its capacity.
    let (c, b, _) = req(
        "PATCH",
        "/api/v1/shelters/s-02",
        Some(r#"{"open":true,"capacity":55}"#),
    );
    assert_eq!(c, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(
        (json(&b)["open"].clone(), json(&b)["capacity"].clone()),
        (true.into(), 55.into())
    );
    let (c, _, _) = req(
        "POST",
        "/api/v1/shelters",
        Some(r#"{"shelter_id":"s-03","name":"大島中学校","capacity":200,"kind":"designated"}"#),
    );
    assert_eq!(c, 201);
    let (c, _, _) = req("PATCH", "/api/v1/shelters/s-99", Some(r#"{"open":true}"#));
    assert_eq!(c, 404);
    // Contacts and eligibility, single records.
    let (c, b, _) = req(
        "PUT",
        "/api/v1/persons/p3/contacts",
        Some(
            r#"{"contacts":[{"contact_id":"c9","name":"家族","email":"f@example.jp","consent":true,"consent_date":"2026-04-01"}],"disclosure":{"do_not_disclose":false,"share_shelter":true}}"#,
        ),
    );
    assert_eq!(c, 201, "{}", String::from_utf8_lossy(&b));
    let (c, _, _) = req("PUT", "/api/v1/persons/p3/contacts", Some(&format!(r#"{{"contacts":[{}],"disclosure":{{"do_not_disclose":false,"share_shelter":true}}}}"#, (0..11).map(|i| format!(r#"{{"contact_id":"c{i}","name":"x","email":"x{i}@example.jp","consent":false}}"#)).collect::<Vec<_>>().join(","))));
    assert_eq!(c, 400, "more than 10 contacts");
    let (c, _, _) = req(
        "PUT",
        "/api/v1/persons/p3/eligibility",
        Some(
            r#"{"insurer_number":"138057","symbol":"三条","number":"99999","valid_from":"2026-04-01","copay_pct":30,"as_of":"2026-09-01"}"#,
        ),
    );
    assert_eq!(c, 201);
    // hq sees the status with the numbers masked; the check is audited.
    let (c, b, _) = req("GET", "/api/v1/persons/p3/eligibility", None);
    assert_eq!(c, 200);
    let v = json(&b);
    assert_eq!(
        (v["status"].clone(), v["masked"].clone()),
        ("valid".into(), true.into())
    );
    assert_eq!(v["record"]["number"], "*****");
    // Outbox: an arrival of a person with a consented contact.
    let (c, _, _) = req(
        "POST",
        "/api/v1/checkins",
        Some(r#"{"person_ids":["p3"],"shelter_id":"s-01"}"#),
    );
    assert_eq!(c, 201);
    let deadline = Instant::now() + Duration::from_secs(30);
    let rows = loop {
        let (c, b, _) = req("GET", "/api/v1/outbox", None);
        assert_eq!(c, 200);
        let rows = json(&b);
        if rows
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["person_id"] == "p3")
        {
            break rows;
        }
        assert!(Instant::now() < deadline, "no outbox row for p3");
        std::thread::sleep(Duration::from_millis(50));
    };
    let rows = rows.as_array().unwrap();
    assert!(!rows.is_empty());
    for r in rows {
        let keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["attempts", "last_error", "message_id", "person_id", "state"]
        );
        assert!(
            ["pending", "sent", "indeterminate", "failed"].contains(&r["state"].as_str().unwrap())
        );
        assert_ne!(r["person_id"], "p2", "do-not-disclose gets no mail");
    }
    // Downloads, audited, with the operator's name.
    let (c, b, head) = req("GET", "/api/v1/exports/roster.csv?encoding=cp932", None);
    assert_eq!(c, 200);
    assert!(head
        .to_ascii_lowercase()
        .contains("content-type: text/csv; charset=shift_jis"));
    assert!(encoding_rs::SHIFT_JIS
        .decode_without_bom_handling_and_without_replacement(&b)
        .is_some());
    let (c, b, _) = req("GET", "/api/v1/exports/pfif.xml", None);
    assert_eq!(c, 200);
    // p0, p1 and p3; p2 asked for do-not-disclose.
    let xml = String::from_utf8(b).unwrap();
    assert_eq!(xml.matches("<pfif:person>").count(), 3);
    assert!(!xml.contains("person.p2<"));
    let (c, b, _) = req(
        "GET",
        "/api/v1/persons/p0/handover?reason=hospital_handover",
        None,
    );
    assert_eq!(c, 200);
    check_fhir_document(&json(&b));
    let _ = stop.send(());
    rt.block_on(task).unwrap().unwrap();
    driver.shutdown().unwrap();
    drop(_lock);
    let e = audit_entries(&data);
    let by_alice: Vec<&str> = e
        .iter()
        .filter(|x| x.operator == "alice")
        .map(|x| x.action.as_str())
        .collect();
    assert_eq!(
        by_alice,
        [
            "eligibility_check",
            "export",
            "export",
            "medical_read",
            "export"
        ]
    );
}
