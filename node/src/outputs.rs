//! What leaves the mesh for other systems: the evacuee roster as CSV (as
//! Japanese municipal evacuee lists lay it out), PFIF 1.4 XML for person
//! finder services, and the ambulance handover as an HL7 FHIR R4
//! International-Patient-Summary-style document Bundle.
//!
//! Renderers are pure functions of engine query results; [`Output`] runs
//! one end to end for the CLI and the API alike: query the engine, render,
//! and record the export in the node's audit chain (who, what, how many)
//! before the bytes are handed out. Files are written by [`write_private`]:
//! mode 0600 in directories of mode 0700, whatever the umask.
//!
//! Privacy decisions: residents with the do-not-disclose flag are left out
//! of PFIF entirely and marked `非開示` on the roster (staff need to know
//! who is there, and must not confirm them to callers); PFIF carries name,
//! kana and "arrived safely" only, not the shelter, birth date or address,
//! since a person-finder service is public.

use crate::driver::{DriverError, DriverHandle};
use crdt::api::{Command, CommandError, Evacuee, Operator, Query, QueryReply, Reply};
use crdt::model::ShelterInfo;
use crdt::store::{LocationStatus, PersonRow};
use crdt::views::MedicalView;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Writes `bytes` to `path` readable by the owner only (0600), creating
/// missing parent directories with mode 0700. An existing file is
/// truncated and its mode reset.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)?;
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Creates a directory (and parents) with mode 0700.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

/// `2026-12-05T14:50:24Z` (UTC, as PFIF and FHIR instants want it).
pub fn utc_iso(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (y, m, d) = crdt::jst::civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

// ----- roster CSV -----------------------------------------------------------

/// Roster file encodings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RosterEncoding {
    /// UTF-8 with a byte order mark (Excel opens it as UTF-8).
    Utf8Bom,
    /// CP932 (Shift_JIS); characters outside it become 〓.
    Cp932,
}

/// The roster's columns, as municipal evacuee lists (避難者名簿) name them.
pub const ROSTER_COLUMNS: [&str; 13] = [
    "番号",
    "避難所ID",
    "避難所名",
    "世帯番号",
    "氏名",
    "フリガナ",
    "生年月日",
    "年齢",
    "住所",
    "状態",
    "入退所日時",
    "安否情報の提供",
    "要確認",
];

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The roster of everyone currently in a shelter (`status` in), ordered
/// by shelter, then kana. CRLF line ends.
pub fn roster_csv(
    evacuees: &[Evacuee],
    shelters: &[ShelterInfo],
    now_wall_ms: u64,
    encoding: RosterEncoding,
) -> (Vec<u8>, usize) {
    let names: BTreeMap<&str, &str> = shelters
        .iter()
        .map(|s| (s.shelter_id.as_str(), s.name.as_str()))
        .collect();
    let mut rows: Vec<&Evacuee> = evacuees
        .iter()
        .filter(|e| e.location.status == LocationStatus::In)
        .collect();
    rows.sort_by(|a, b| {
        (&a.location.shelter_id, &a.person.kana, &a.person.person_id).cmp(&(
            &b.location.shelter_id,
            &b.person.kana,
            &b.person.person_id,
        ))
    });
    let mut text = ROSTER_COLUMNS.join(",");
    text.push_str("\r\n");
    for (i, e) in rows.iter().enumerate() {
        let p = &e.person;
        let birth = p.birth_date.clone().unwrap_or_default();
        let age = p
            .birth_date
            .as_deref()
            .and_then(|b| crdt::jst::age_on(b, now_wall_ms))
            .map(|a| a.to_string())
            .unwrap_or_default();
        let fields = [
            (i + 1).to_string(),
            e.location.shelter_id.clone(),
            names
                .get(e.location.shelter_id.as_str())
                .copied()
                .unwrap_or("")
                .to_string(),
            p.household_id.clone().unwrap_or_default(),
            p.name.clone(),
            p.kana.clone(),
            birth,
            age,
            e.address.clone().unwrap_or_default(),
            "在所".to_string(),
            crdt::jst::format_en(e.location.since_ms).replace(" JST", ""),
            if e.withheld { "非開示" } else { "可" }.to_string(),
            if e.location.conflict {
                "競合あり"
            } else {
                ""
            }
            .to_string(),
        ];
        text.push_str(
            &fields
                .iter()
                .map(|f| csv_field(f))
                .collect::<Vec<_>>()
                .join(","),
        );
        text.push_str("\r\n");
    }
    let bytes = match encoding {
        RosterEncoding::Utf8Bom => {
            let mut b = b"\xEF\xBB\xBF".to_vec();
            b.extend_from_slice(text.as_bytes());
            b
        }
        RosterEncoding::Cp932 => to_cp932(&text),
    };
    (bytes, rows.len())
}

/// CP932 bytes; a character CP932 cannot hold becomes 〓 (the geta mark
/// Japanese systems print for it), never a numeric reference.
pub fn to_cp932(text: &str) -> Vec<u8> {
    let (b, _, unmappable) = encoding_rs::SHIFT_JIS.encode(text);
    if !unmappable {
        return b.into_owned();
    }
    let mut out = Vec::with_capacity(text.len());
    let mut buf = [0u8; 4];
    for c in text.chars() {
        let (b, _, bad) = encoding_rs::SHIFT_JIS.encode(c.encode_utf8(&mut buf));
        if bad {
            out.extend_from_slice(&encoding_rs::SHIFT_JIS.encode("〓").0);
        } else {
            out.extend_from_slice(&b);
        }
    }
    out
}

// ----- PFIF 1.4 -------------------------------------------------------------

pub const PFIF_NS: &str = "http://zesty.ca/pfif/1.4";

fn xml_text(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            // Characters XML 1.0 cannot carry at all (names are validated
            // text, so this is belt and braces).
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            c => o.push(c),
        }
    }
    o
}

/// A PFIF 1.4 document: one person record per evacuee with a note
/// recording the arrival; do-not-disclose residents are left out.
/// `domain` names this repository in record ids (`domain/person.ID`).
/// Returns the XML and the number of person records.
pub fn pfif_xml(
    evacuees: &[Evacuee],
    domain: &str,
    author: &str,
    now_wall_ms: u64,
) -> (String, usize) {
    use std::fmt::Write;
    let now = utc_iso(now_wall_ms);
    let mut o = String::with_capacity(evacuees.len() * 900 + 200);
    o.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(o, "<pfif:pfif xmlns:pfif=\"{PFIF_NS}\">");
    let (domain, author) = (xml_text(domain), xml_text(author));
    let mut n = 0;
    for e in evacuees.iter().filter(|e| !e.withheld) {
        n += 1;
        let p = &e.person;
        let id = format!("{domain}/person.{}", p.person_id);
        let since = utc_iso(e.location.since_ms);
        let name = xml_text(&p.name);
        let _ = write!(
            o,
            "  <pfif:person>\n    <pfif:person_record_id>{id}</pfif:person_record_id>\n    <pfif:entry_date>{now}</pfif:entry_date>\n    <pfif:author_name>{author}</pfif:author_name>\n    <pfif:source_name>{domain}</pfif:source_name>\n    <pfif:source_date>{since}</pfif:source_date>\n    <pfif:full_name>{name}</pfif:full_name>\n    <pfif:alternate_names>{kana}</pfif:alternate_names>\n",
            kana = xml_text(&p.kana),
        );
        let _ = write!(
            o,
            "    <pfif:note>\n      <pfif:note_record_id>{domain}/note.{pid}.{ms}</pfif:note_record_id>\n      <pfif:person_record_id>{id}</pfif:person_record_id>\n      <pfif:entry_date>{now}</pfif:entry_date>\n      <pfif:author_name>{author}</pfif:author_name>\n      <pfif:source_date>{since}</pfif:source_date>\n      <pfif:author_made_contact>true</pfif:author_made_contact>\n      <pfif:status>believed_alive</pfif:status>\n      <pfif:text>{name} さんは避難所に到着しました（{ja}）。 {name} arrived safely at a shelter ({since}).</pfif:text>\n    </pfif:note>\n  </pfif:person>\n",
            pid = p.person_id,
            ms = e.location.since_ms,
            ja = crdt::jst::format_ja(e.location.since_ms),
        );
    }
    o.push_str("</pfif:pfif>\n");
    (o, n)
}

// ----- FHIR R4 handover ------------------------------------------------------

/// A stable UUID-shaped id (version 4 layout) from a seed, so the same
/// handover renders the same ids.
fn uuid_from(seed: &str) -> String {
    let h = blake3::hash(seed.as_bytes());
    let b = h.as_bytes();
    let hex =
        |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!(
        "{}-{}-4{}-{:x}{}-{}",
        hex(0..4),
        hex(4..6),
        &hex(6..8)[1..],
        8 | (b[8] & 3),
        &hex(8..10)[1..],
        hex(10..16)
    )
}

/// The handover summary as a FHIR R4 `Bundle` of type `document`: a
/// `Composition` (IPS-style sections: allergies 48765-2, problems
/// 11450-4, medications 10160-0, results 30954-2 for the ABO/Rh group),
/// the `Patient` (name, kana, birth date, emergency contacts, family
/// doctor), and one `AllergyIntolerance`, `Condition` or
/// `MedicationStatement` per entry. Entries are free text as recorded
/// (`code.text`); no coding is invented.
pub fn fhir_handover(
    person: &PersonRow,
    medical: &MedicalView,
    author_node: &str,
    now_wall_ms: u64,
) -> Value {
    let seed = format!("{}|{}|{now_wall_ms}", person.person_id, author_node);
    let urn = |what: &str| format!("urn:uuid:{}", uuid_from(&format!("{seed}|{what}")));
    let patient_ref = urn("patient");
    let now = utc_iso(now_wall_ms);
    let section = |name: &str| medical.sections.get(name).cloned().unwrap_or_default();
    let mut patient = json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:kizuna:person-id", "value": person.person_id}],
        "name": [
            {"use": "official", "text": person.name},
            {"use": "usual", "text": person.kana, "extension": [{
                "url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation",
                "valueCode": "SYL"}]}
        ],
    });
    if let Some(b) = &person.birth_date {
        patient["birthDate"] = json!(b);
    }
    let contacts: Vec<Value> = section("emergency_contact")
        .iter()
        .map(|c| json!({
            "relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0131", "code": "C", "display": "Emergency Contact"}]}],
            "name": {"text": c.text}
        }))
        .collect();
    if !contacts.is_empty() {
        patient["contact"] = json!(contacts);
    }
    let doctors: Vec<Value> = section("family_doctor")
        .iter()
        .map(|d| json!({"display": d.text}))
        .collect();
    if !doctors.is_empty() {
        patient["generalPractitioner"] = json!(doctors);
    }
    let mut entries = vec![];
    let mut refs: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for a in section("allergy") {
        let full = urn(&format!("allergy|{}", a.entry_id));
        refs.entry("allergy")
            .or_default()
            .push(json!({"reference": full}));
        entries.push(json!({"fullUrl": full, "resource": {
            "resourceType": "AllergyIntolerance",
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]},
            "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "code": "unconfirmed"}]},
            "code": {"text": a.text},
            "patient": {"reference": patient_ref}
        }}));
    }
    for c in section("condition") {
        let full = urn(&format!("condition|{}", c.entry_id));
        refs.entry("condition")
            .or_default()
            .push(json!({"reference": full}));
        entries.push(json!({"fullUrl": full, "resource": {
            "resourceType": "Condition",
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
            "code": {"text": c.text},
            "subject": {"reference": patient_ref}
        }}));
    }
    for m in section("medication") {
        let full = urn(&format!("medication|{}", m.entry_id));
        refs.entry("medication")
            .or_default()
            .push(json!({"reference": full}));
        entries.push(json!({"fullUrl": full, "resource": {
            "resourceType": "MedicationStatement",
            "status": "active",
            "medicationCodeableConcept": {"text": m.text},
            "subject": {"reference": patient_ref}
        }}));
    }
    if let Some(b) = medical.blood_type {
        let full = urn("blood-type");
        refs.entry("result")
            .or_default()
            .push(json!({"reference": full}));
        let text = serde_json::to_value(b)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        entries.push(json!({"fullUrl": full, "resource": {
            "resourceType": "Observation",
            "status": if medical.blood_type_conflicts.is_empty() { "final" } else { "preliminary" },
            "code": {"coding": [{"system": "http://loinc.org", "code": "882-1", "display": "ABO and Rh group [Type] in Blood"}], "text": "血液型 / blood type"},
            "subject": {"reference": patient_ref},
            "valueString": text
        }}));
    }
    let empty = |title: &str| json!({"status": "generated", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{}</div>", xml_text(title))});
    let mut sections = vec![];
    for (key, title, loinc, display) in [
        (
            "allergy",
            "アレルギー / Allergies and intolerances",
            "48765-2",
            "Allergies and adverse reactions Document",
        ),
        (
            "condition",
            "既往歴・疾患 / Problem list",
            "11450-4",
            "Problem list - Reported",
        ),
        (
            "medication",
            "服薬 / Medication summary",
            "10160-0",
            "History of Medication use Narrative",
        ),
        (
            "result",
            "血液型 / Results",
            "30954-2",
            "Relevant diagnostic tests/laboratory data Narrative",
        ),
    ] {
        let mut s = json!({
            "title": title,
            "code": {"coding": [{"system": "http://loinc.org", "code": loinc, "display": display}]},
        });
        match refs.remove(key) {
            Some(r) => {
                s["text"] = empty(title);
                s["entry"] = json!(r);
            }
            None => {
                s["text"] = empty(&format!("{title}: 記録なし / none recorded"));
                s["emptyReason"] = json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/list-empty-reason", "code": "unavailable"}]});
            }
        }
        sections.push(s);
    }
    let composition = json!({
        "resourceType": "Composition",
        "status": "final",
        "type": {"coding": [{"system": "http://loinc.org", "code": "60591-5", "display": "Patient summary Document"}]},
        "subject": {"reference": patient_ref},
        "date": now,
        "author": [{"display": format!("Kizuna node {author_node}")}],
        "title": "救急引き継ぎサマリー / Ambulance handover summary",
        "confidentiality": "R",
        "section": sections,
    });
    let mut all = vec![
        json!({"fullUrl": urn("composition"), "resource": composition}),
        json!({"fullUrl": patient_ref, "resource": patient}),
    ];
    all.extend(entries);
    json!({
        "resourceType": "Bundle",
        "identifier": {"system": "urn:ietf:rfc:3986", "value": urn("bundle")},
        "type": "document",
        "timestamp": now,
        "entry": all,
    })
}

// ----- running an output ------------------------------------------------------

/// Which output, for whom.
#[derive(Clone, Debug)]
pub enum Output {
    Roster {
        shelter_id: Option<String>,
        encoding: RosterEncoding,
    },
    Pfif {
        domain: String,
        author: String,
    },
    Handover {
        person_id: String,
        reason: String,
    },
}

/// An output failed; nothing was handed out.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{0}")]
    Engine(#[from] CommandError),
    #[error("{0}")]
    Driver(#[from] DriverError),
    #[error("{0}")]
    Refused(String),
}

/// A rendered output, already audited.
pub struct Rendered {
    pub bytes: Vec<u8>,
    pub records: usize,
    pub content_type: &'static str,
    pub file_name: String,
    pub audit_seq: u64,
}

/// Queries, renders and audits one output on `driver`'s node for
/// `operator`. Roster and PFIF are headquarters outputs; the handover
/// is read (with its own audited medical read) on ambulance, clinic and
/// hq nodes.
pub async fn render(
    driver: &DriverHandle,
    operator: &str,
    output: Output,
    now_wall_ms: u64,
) -> Result<Rendered, OutputError> {
    let role = driver.info().role;
    let node = driver.info().node_id.to_string();
    let (bytes, records, content_type, file_name, what, scope) = match &output {
        Output::Roster { .. } | Output::Pfif { .. } if role != crdt::Role::Hq => {
            return Err(OutputError::Refused(format!(
                "rosters and PFIF are exported at headquarters, not on a {role} node / 本部ノードでのみ出力できます"
            )));
        }
        Output::Roster {
            shelter_id,
            encoding,
        } => {
            let ev = evacuees(driver, shelter_id.clone(), true).await?;
            let shelters = match driver.query(Query::ShelterInfos).await? {
                QueryReply::ShelterInfos(s) => s,
                _ => Vec::new(),
            };
            let (bytes, n) = roster_csv(&ev, &shelters, now_wall_ms, *encoding);
            let scope = shelter_id.clone().unwrap_or_else(|| "all shelters".into());
            let suffix = match encoding {
                RosterEncoding::Utf8Bom => "utf8",
                RosterEncoding::Cp932 => "cp932",
            };
            (
                bytes,
                n,
                match encoding {
                    RosterEncoding::Utf8Bom => "text/csv; charset=utf-8",
                    RosterEncoding::Cp932 => "text/csv; charset=Shift_JIS",
                },
                format!(
                    "roster-{}-{suffix}.csv",
                    shelter_id.as_deref().unwrap_or("all")
                ),
                format!("roster_csv_{suffix}"),
                scope,
            )
        }
        Output::Pfif { domain, author } => {
            let ev = evacuees(driver, None, false).await?;
            let (xml, n) = pfif_xml(&ev, domain, author, now_wall_ms);
            (
                xml.into_bytes(),
                n,
                "application/xml",
                "pfif-1.4.xml".to_string(),
                "pfif".to_string(),
                format!(
                    "all shelters, do-not-disclose excluded ({} withheld)",
                    ev.iter().filter(|e| e.withheld).count()
                ),
            )
        }
        Output::Handover { person_id, reason } => {
            if !matches!(
                role,
                crdt::Role::Ambulance | crdt::Role::Clinic | crdt::Role::Hq
            ) {
                return Err(OutputError::Refused(format!(
                    "handovers are made on ambulance, clinic or hq nodes, not on a {role} node"
                )));
            }
            let person = match driver
                .query(Query::Person {
                    person_id: person_id.clone(),
                })
                .await?
            {
                QueryReply::Person(Some(d)) => d.person,
                _ => {
                    return Err(CommandError::NotFound {
                        what: "person",
                        id: person_id.clone(),
                    }
                    .into())
                }
            };
            let view = match driver
                .command(
                    crate::api::new_op_id(),
                    Operator(operator.to_string()),
                    Command::ReadMedical {
                        person_id: person_id.clone(),
                        // A code from the closed list (`hospital_handover`
                        // for a handover); the audit entry records it.
                        reason: reason.to_string(),
                        break_glass: false,
                    },
                )
                .await?
            {
                Reply::Medical { view, .. } => view,
                _ => return Err(OutputError::Refused("unexpected engine reply".into())),
            };
            let bundle = fhir_handover(&person, &view, &node, now_wall_ms);
            (
                serde_json::to_vec_pretty(&bundle).expect("json"),
                1,
                "application/fhir+json",
                format!("handover-{person_id}.json"),
                "fhir_handover".to_string(),
                person_id.clone(),
            )
        }
    };
    let audit_seq = match driver
        .command(
            crate::api::new_op_id(),
            Operator(operator.to_string()),
            Command::RecordExport {
                what,
                scope,
                count: records as u64,
            },
        )
        .await?
    {
        Reply::Audited { audit_seq } => audit_seq,
        _ => return Err(OutputError::Refused("unexpected engine reply".into())),
    };
    Ok(Rendered {
        bytes,
        records,
        content_type,
        file_name,
        audit_seq,
    })
}

async fn evacuees(
    driver: &DriverHandle,
    shelter_id: Option<String>,
    with_address: bool,
) -> Result<Vec<Evacuee>, OutputError> {
    match driver
        .query(Query::Evacuees {
            shelter_id,
            with_address,
        })
        .await?
    {
        QueryReply::Evacuees(v) => Ok(v),
        _ => Err(OutputError::Refused("unexpected engine reply".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_and_uuid_shapes() {
        assert_eq!(utc_iso(1_796_482_224_840), "2026-12-05T14:50:24Z");
        let u = uuid_from("x");
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"), "{u}");
        assert_eq!(u, uuid_from("x"));
    }

    #[test]
    fn cp932_replaces_what_it_cannot_hold() {
        let b = to_cp932("髙橋 𠮷野家");
        let back = encoding_rs::SHIFT_JIS.decode(&b).0;
        assert_eq!(back, "髙橋 〓野家");
    }

    #[test]
    fn csv_quoting() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("a\"b"), "\"a\"\"b\"");
        assert_eq!(csv_field("山田"), "山田");
    }
}
