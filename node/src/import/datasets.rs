//! The municipal data sets besides the registry, each a [`Dataset`] of
//! the one import machinery in [`super`]: shelters, family contacts,
//! pre-registered medical profiles and insurance eligibility. Column
//! rules are in `docs/cli.md`; every value is validated here with the
//! same model checks the engine applies, so a file that passes imports.

use super::{parse_date, Dataset, RowError};
use crate::import::ascii_number;
use crdt::api::{Command, ContactSet, ImportRecords, MedicalProfile};
use crdt::model::{
    BloodType, ConsentBasis, Disclosure, Eligibility, FamilyContact, MedicalSection, ShelterInfo,
    ShelterKind, Validate, MAX_CONTACTS_PER_PERSON,
};
use crdt::Role;
use std::collections::HashMap;

/// Records per engine command (one durable commit each).
pub const BATCH_RECORDS: usize = 5_000;

fn check_id(field: &str, s: &str) -> Result<(), String> {
    crdt::ids::check_id_str(s).map_err(|r| format!("{field}: {r}"))
}

/// Yes/no columns: `1`/`0`, `true`/`false`, `yes`/`no`, `はい`/`いいえ`,
/// `有`/`無`, `同意`/`不同意`; empty is no.
pub fn parse_bool(field: &str, s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "y" | "はい" | "有" | "あり" | "同意" | "○" => Ok(true),
        "" | "0" | "false" | "no" | "n" | "いいえ" | "無" | "なし" | "不同意" | "×" => {
            Ok(false)
        }
        _ => Err(format!(
            "{field}: expected 1/0, true/false, yes/no, はい/いいえ, 有/無 or 同意/不同意"
        )),
    }
}

fn optional_date(field: &'static str, s: &str) -> Result<Option<String>, String> {
    match s.trim() {
        "" => Ok(None),
        d => parse_date(field, d).map(Some),
    }
}

fn not_future(field: &str, date: &str, now_wall_ms: u64) -> Result<(), String> {
    if date > crdt::jst::date(now_wall_ms).as_str() {
        return Err(format!("{field}: {date} is in the future"));
    }
    Ok(())
}

// ----- shelters -------------------------------------------------------------

/// `shelter_id,name,address,district,capacity,kind,status`.
#[derive(Default)]
pub struct ShelterRows {
    items: Vec<(usize, ShelterInfo)>,
    ids: HashMap<String, usize>,
}

impl Dataset for ShelterRows {
    const NAME: &'static str = "shelters";
    const COLUMNS: &'static [&'static str] = &[
        "shelter_id",
        "name",
        "address",
        "district",
        "capacity",
        "kind",
        "status",
    ];
    const BATCH: usize = BATCH_RECORDS;
    type Item = ShelterInfo;

    fn row(&mut self, ln: usize, f: &[String], _now: u64) -> Result<(), String> {
        let capacity = ascii_number(f[4].trim())
            .ok_or_else(|| "capacity: expected a whole number".to_string())?;
        let kind = ShelterKind::parse(&f[5]).ok_or_else(|| {
            "kind: expected 指定避難所, 福祉避難所 or その他 (designated, welfare, other)"
                .to_string()
        })?;
        let open = match f[6].trim() {
            "開設" | "open" => true,
            "閉鎖" | "未開設" | "closed" => false,
            _ => return Err("status: expected 開設/閉鎖 (open, closed)".into()),
        };
        let s = ShelterInfo {
            shelter_id: f[0].trim().to_string(),
            name: f[1].clone(),
            address: f[2].clone(),
            district: f[3].clone(),
            capacity: u32::try_from(capacity).map_err(|_| "capacity: too large".to_string())?,
            kind,
            open,
            ..Default::default()
        };
        s.validate().map_err(|e| e.to_string())?;
        if let Some(first) = self.ids.insert(s.shelter_id.clone(), ln) {
            return Err(format!(
                "duplicate shelter_id {} (first on line {first})",
                s.shelter_id
            ));
        }
        self.items.push((ln, s));
        Ok(())
    }

    fn finish(self) -> Result<Vec<(usize, ShelterInfo)>, Vec<RowError>> {
        Ok(self.items)
    }

    fn person(_: &ShelterInfo) -> Option<&str> {
        None
    }

    fn command(items: Vec<ShelterInfo>) -> Command {
        Command::Import {
            records: ImportRecords::Shelters(items),
        }
    }
}

// ----- family contacts ------------------------------------------------------

/// `person_id,contact_id,contact_name,relation,email,language,consent,
/// consent_date,do_not_disclose,share_shelter`: one row per contact; a row
/// with empty contact columns records only the person's choices.
#[derive(Default)]
pub struct ContactRows {
    items: Vec<(usize, ContactSet)>,
    by_person: HashMap<String, usize>,
}

impl Dataset for ContactRows {
    const NAME: &'static str = "contacts";
    const COLUMNS: &'static [&'static str] = &[
        "person_id",
        "contact_id",
        "contact_name",
        "relation",
        "email",
        "language",
        "consent",
        "consent_date",
        "do_not_disclose",
        "share_shelter",
    ];
    const BATCH: usize = BATCH_RECORDS;
    type Item = ContactSet;

    fn row(&mut self, ln: usize, f: &[String], now: u64) -> Result<(), String> {
        let person_id = f[0].trim().to_string();
        check_id("person_id", &person_id)?;
        let disclosure = Disclosure {
            do_not_disclose: parse_bool("do_not_disclose", &f[8])?,
            share_shelter: parse_bool("share_shelter", &f[9])?,
        };
        let empty_contact = f[1..8].iter().all(|x| x.trim().is_empty());
        let contact = if empty_contact {
            None
        } else {
            let consent = parse_bool("consent", &f[6])?;
            let consent_date = optional_date("consent_date", &f[7])?;
            match (&consent_date, consent) {
                (None, true) => return Err("consent_date: required when consent is given".into()),
                (Some(d), _) => not_future("consent_date", d, now)?,
                _ => {}
            }
            let c = FamilyContact {
                contact_id: f[1].trim().to_string(),
                name: f[2].clone(),
                relation: f[3].clone(),
                email: f[4].trim().to_string(),
                language: f[5].trim().to_ascii_lowercase(),
                consent,
                consent_date,
            };
            c.validate().map_err(|e| e.to_string())?;
            Some(c)
        };
        match self.by_person.get(&person_id) {
            Some(&i) => {
                let (first, set) = &mut self.items[i];
                if set.disclosure != disclosure {
                    return Err(format!(
                        "do_not_disclose/share_shelter of {person_id} differ from line {first}"
                    ));
                }
                if let Some(c) = contact {
                    if set.contacts.iter().any(|x| x.contact_id == c.contact_id) {
                        return Err(format!(
                            "duplicate contact_id {} for {person_id}",
                            c.contact_id
                        ));
                    }
                    if set.contacts.len() >= MAX_CONTACTS_PER_PERSON {
                        return Err(format!(
                            "{person_id} has more than {MAX_CONTACTS_PER_PERSON} contacts"
                        ));
                    }
                    set.contacts.push(c);
                }
            }
            None => {
                self.by_person.insert(person_id.clone(), self.items.len());
                self.items.push((
                    ln,
                    ContactSet {
                        person_id,
                        contacts: contact.into_iter().collect(),
                        disclosure,
                    },
                ));
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<Vec<(usize, ContactSet)>, Vec<RowError>> {
        Ok(self.items)
    }

    fn person(c: &ContactSet) -> Option<&str> {
        Some(&c.person_id)
    }

    fn rows(c: &ContactSet) -> usize {
        c.contacts.len().max(1)
    }

    fn command(items: Vec<ContactSet>) -> Command {
        Command::Import {
            records: ImportRecords::Contacts(items),
        }
    }
}

// ----- medical profiles -----------------------------------------------------

/// Blood types as Japanese forms write them too: `A+`, `A Rh+`, `A型Rh+`,
/// `A型 RH(-)`, `不明`.
pub fn parse_blood_type(s: &str) -> Result<Option<BloodType>, String> {
    let t: String = s
        .trim()
        .chars()
        .filter(|c| !c.is_whitespace() && !matches!(c, '型' | '(' | ')' | '（' | '）'))
        .map(|c| match c {
            '＋' => '+',
            '－' | '−' | 'ー' => '-',
            c => c.to_ascii_uppercase(),
        })
        .collect::<String>()
        .replace("RH", "");
    match t.as_str() {
        "" => Ok(None),
        "不明" | "UNKNOWN" => Ok(Some(BloodType::Unknown)),
        t => BloodType::parse(t).map(Some).map_err(|_| {
            "blood_type: expected A+, A-, B+, B-, O+, O-, AB+, AB- (or A型Rh+ …) or 不明".into()
        }),
    }
}

pub fn parse_consent(s: &str) -> Result<ConsentBasis, String> {
    match s.trim() {
        "consented" | "同意" | "本人同意" => Ok(ConsentBasis::Consented),
        "life_saving" | "生命保護" | "生命・身体の保護" => Ok(ConsentBasis::LifeSaving),
        _ => Err("consent: expected 同意 (consented) or 生命保護 (life_saving); a profile without a recorded basis may not be held".into()),
    }
}

/// Separator of list columns (allergies, conditions, ...).
pub const LIST_SEPARATOR: char = '|';

/// `person_id,blood_type,consent,allergies,conditions,medications,
/// family_doctor,emergency_contacts`; list columns separated by `|`.
#[derive(Default)]
pub struct MedicalRows {
    items: Vec<(usize, MedicalProfile)>,
    ids: HashMap<String, usize>,
}

impl Dataset for MedicalRows {
    const NAME: &'static str = "medical";
    const ROLES: &'static [Role] = &[Role::Hq, Role::Clinic];
    const COLUMNS: &'static [&'static str] = &[
        "person_id",
        "blood_type",
        "consent",
        "allergies",
        "conditions",
        "medications",
        "family_doctor",
        "emergency_contacts",
    ];
    const BATCH: usize = BATCH_RECORDS;
    type Item = MedicalProfile;

    fn row(&mut self, ln: usize, f: &[String], _now: u64) -> Result<(), String> {
        let person_id = f[0].trim().to_string();
        check_id("person_id", &person_id)?;
        let blood_type = parse_blood_type(&f[1])?;
        let consent = parse_consent(&f[2])?;
        let mut entries = Vec::new();
        for (col, section) in [
            (3, MedicalSection::Allergy),
            (4, MedicalSection::Condition),
            (5, MedicalSection::Medication),
            (6, MedicalSection::FamilyDoctor),
            (7, MedicalSection::EmergencyContact),
        ] {
            for text in f[col]
                .split(LIST_SEPARATOR)
                .map(str::trim)
                .filter(|t| !t.is_empty())
            {
                let e = crdt::model::MedicalEntry { text: text.into() };
                e.validate()
                    .map_err(|e| format!("{}: {e}", Self::COLUMNS[col]))?;
                entries.push((section, text.to_string()));
            }
        }
        if entries.len() > 100 {
            return Err("more than 100 entries in one profile".into());
        }
        if let Some(first) = self.ids.insert(person_id.clone(), ln) {
            return Err(format!(
                "duplicate person_id {person_id} (first on line {first})"
            ));
        }
        self.items.push((
            ln,
            MedicalProfile {
                person_id,
                blood_type,
                consent,
                entries,
            },
        ));
        Ok(())
    }

    fn finish(self) -> Result<Vec<(usize, MedicalProfile)>, Vec<RowError>> {
        Ok(self.items)
    }

    fn person(m: &MedicalProfile) -> Option<&str> {
        Some(&m.person_id)
    }

    fn command(items: Vec<MedicalProfile>) -> Command {
        Command::Import {
            records: ImportRecords::Medical(items),
        }
    }
}

// ----- insurance eligibility ------------------------------------------------

/// `30`, `30%`, `3割`, `３割` → 30.
pub fn parse_copay(s: &str) -> Result<u8, String> {
    let t = s.trim().trim_end_matches(['%', '％']);
    let v = match t.strip_suffix('割') {
        Some(w) => ascii_number(w).map(|n| n * 10),
        None => ascii_number(t),
    };
    v.and_then(|v| u8::try_from(v).ok())
        .filter(|v| crdt::model::COPAY_PCTS.contains(v))
        .ok_or_else(|| "copay: expected 0, 10, 20 or 30 (or 1割, 2割, 3割)".into())
}

/// `person_id,insurer_number,insurer_name,symbol,number,branch,valid_from,
/// valid_to,copay,as_of`.
#[derive(Default)]
pub struct EligibilityRows {
    items: Vec<(usize, (String, Eligibility))>,
    ids: HashMap<String, usize>,
}

impl Dataset for EligibilityRows {
    const NAME: &'static str = "eligibility";
    const COLUMNS: &'static [&'static str] = &[
        "person_id",
        "insurer_number",
        "insurer_name",
        "symbol",
        "number",
        "branch",
        "valid_from",
        "valid_to",
        "copay",
        "as_of",
    ];
    const BATCH: usize = BATCH_RECORDS;
    type Item = (String, Eligibility);

    fn row(&mut self, ln: usize, f: &[String], now: u64) -> Result<(), String> {
        let person_id = f[0].trim().to_string();
        check_id("person_id", &person_id)?;
        let as_of = parse_date("as_of", &f[9])?;
        not_future("as_of", &as_of, now)?;
        let e = Eligibility {
            insurer_number: f[1].trim().to_string(),
            insurer: f[2].clone(),
            symbol: f[3].trim().to_string(),
            number: f[4].trim().to_string(),
            branch: f[5].trim().to_string(),
            valid_from: parse_date("valid_from", &f[6])?,
            valid_to: optional_date("valid_to", &f[7])?,
            copay_pct: parse_copay(&f[8])?,
            as_of,
        };
        e.validate().map_err(|e| e.to_string())?;
        if let Some(first) = self.ids.insert(person_id.clone(), ln) {
            return Err(format!(
                "duplicate person_id {person_id} (first on line {first})"
            ));
        }
        self.items.push((ln, (person_id, e)));
        Ok(())
    }

    fn finish(self) -> Result<Vec<(usize, (String, Eligibility))>, Vec<RowError>> {
        Ok(self.items)
    }

    fn person(r: &(String, Eligibility)) -> Option<&str> {
        Some(&r.0)
    }

    fn command(items: Vec<(String, Eligibility)>) -> Command {
        Command::Import {
            records: ImportRecords::Eligibility(items),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::parse;

    const NOW: u64 = 1_790_000_000_000; // 2026-09-21 in Japan

    fn file<D: Dataset>(rows: &[&str]) -> Vec<String> {
        std::iter::once(D::COLUMNS.join(","))
            .chain(rows.iter().map(|s| s.to_string()))
            .collect()
    }

    fn lines_of(e: &[RowError]) -> Vec<usize> {
        e.iter().map(|e| e.line).collect()
    }

    #[test]
    fn shelters() {
        let ok = parse::<ShelterRows>(
            &file::<ShelterRows>(&[
                "s-01,三条小学校,三条市旭町1-1,旭地区,３００,指定避難所,開設",
                "s-02,ふれあいセンター,三条市本町2-2,本町地区,40,welfare,closed",
            ]),
            NOW,
        )
        .unwrap();
        assert_eq!(ok[0].1.capacity, 300);
        assert_eq!(ok[1].1.kind, ShelterKind::Welfare);
        assert!(!ok[1].1.open);
        let e = parse::<ShelterRows>(
            &file::<ShelterRows>(&[
                "s-01,a,b,c,10,指定避難所,開設",
                "s-01,a,b,c,10,指定避難所,開設",
                "s-03,a,b,c,many,指定避難所,開設",
                "s-04,a,b,c,10,学校,開設",
                "s-05,a,b,c,10,指定避難所,半開",
                "s 06,a,b,c,10,指定避難所,開設",
                "s-07,,b,c,10,指定避難所,開設",
            ]),
            NOW,
        )
        .unwrap_err();
        assert_eq!(lines_of(&e), [3, 4, 5, 6, 7, 8]);
        assert!(e[0].reason.contains("duplicate shelter_id"));
    }

    #[test]
    fn contacts() {
        let ok = parse::<ContactRows>(
            &file::<ContactRows>(&[
                "p1,c1,山田 花子,長女,hanako@example.jp,ja,同意,2026-04-01,0,1",
                "p1,c2,Jiro Yamada,son,jiro@example.jp,en,1,令和8年4月1日,0,1",
                "p2,c3,佐藤 一郎,兄,ichiro@example.jp,,不同意,,0,0",
                "p3,,,,,,,,1,0",
            ]),
            NOW,
        )
        .unwrap();
        assert_eq!(ok.len(), 3);
        assert_eq!(ok[0].1.contacts.len(), 2);
        assert_eq!(
            ok[0].1.contacts[1].consent_date.as_deref(),
            Some("2026-04-01")
        );
        assert!(!ok[1].1.contacts[0].consent);
        assert!(ok[2].1.disclosure.do_not_disclose && ok[2].1.contacts.is_empty());
        let mut rows: Vec<String> = (0..11)
            .map(|i| format!("p9,c{i},家族,,f{i}@example.jp,ja,1,2026-01-01,0,0"))
            .collect();
        rows.extend([
            "p1,c1,a,,not-an-address,ja,1,2026-01-01,0,0".to_string(),
            "p1,c2,a,,a@example.jp,ja,1,,0,0".to_string(),
            "p1,c3,a,,a@example.jp,fr,0,,0,0".to_string(),
            "p1,c4,a,,a@example.jp,ja,maybe,,0,0".to_string(),
            "p1,c5,a,,a@example.jp,ja,1,2099-01-01,0,0".to_string(),
            "p2,c1,a,,a@example.jp,ja,0,,0,0".to_string(),
            "p2,c2,a,,b@example.jp,ja,0,,1,0".to_string(),
            "p2,c1,a,,c@example.jp,ja,0,,0,0".to_string(),
        ]);
        let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
        let e = parse::<ContactRows>(&file::<ContactRows>(&rows), NOW).unwrap_err();
        assert_eq!(lines_of(&e), [12, 13, 14, 15, 16, 17, 19, 20]);
        assert!(e[0].reason.contains("more than 10 contacts"), "{e:?}");
        assert!(e[2].reason.contains("consent_date: required"), "{e:?}");
        assert!(e[6].reason.contains("differ from line"), "{e:?}");
        assert!(e[7].reason.contains("duplicate contact_id"), "{e:?}");
    }

    #[test]
    fn medical() {
        let ok = parse::<MedicalRows>(
            &file::<MedicalRows>(&[
                "p1,A型Rh+,同意,ペニシリン|そば,高血圧,アムロジピン 5mg,三条内科 025-000-0000,山田 花子 090-0000-0000",
                "p2,ab-,life_saving,,,,,",
                "p3,不明,同意,,,,,",
                "p4,,同意,,,,,",
            ]),
            NOW,
        )
        .unwrap();
        assert_eq!(ok[0].1.blood_type, Some(BloodType::APos));
        assert_eq!(ok[0].1.entries.len(), 6);
        assert_eq!(ok[1].1.blood_type, Some(BloodType::AbNeg));
        assert_eq!(ok[1].1.consent, ConsentBasis::LifeSaving);
        assert_eq!(ok[2].1.blood_type, Some(BloodType::Unknown));
        assert_eq!(ok[3].1.blood_type, None);
        let e = parse::<MedicalRows>(
            &file::<MedicalRows>(&[
                "p1,C+,同意,,,,,",
                "p2,A+,,,,,,",
                "p3,A+,同意,\u{7},,,,",
                "p4,A+,同意,,,,,",
                "p4,A+,同意,,,,,",
            ]),
            NOW,
        )
        .unwrap_err();
        assert_eq!(lines_of(&e), [2, 3, 4, 6]);
    }

    #[test]
    fn eligibility() {
        let ok = parse::<EligibilityRows>(
            &file::<EligibilityRows>(&[
                "p1,138057,三条市国民健康保険,三条,12345,01,2026-04-01,2027-03-31,3割,2026-09-01",
                "p2,06139999,協会けんぽ,,A-1,,令和8年4月1日,,10%,2026-09-01",
            ]),
            NOW,
        )
        .unwrap();
        assert_eq!(ok[0].1 .1.copay_pct, 30);
        assert_eq!(ok[1].1 .1.valid_from, "2026-04-01");
        assert_eq!(ok[1].1 .1.valid_to, None);
        let e = parse::<EligibilityRows>(
            &file::<EligibilityRows>(&[
                "p1,13805,x,a,1,01,2026-04-01,,30,2026-09-01",
                "p2,138057,x,a,1,1,2026-04-01,,30,2026-09-01",
                "p3,138057,x,a,1,01,2026-04-01,2026-03-01,30,2026-09-01",
                "p4,138057,x,a,1,01,2026-04-01,,40,2026-09-01",
                "p5,138057,x,a,1,01,2026-04-01,,30,2099-01-01",
                "p6,138057,x,a,番号,01,2026-04-01,,30,2026-09-01",
            ]),
            NOW,
        )
        .unwrap_err();
        assert_eq!(lines_of(&e), [2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn individual_numbers_are_rejected_and_never_echoed() {
        // 123456789018 passes the check digit; written with separators too.
        for n in ["123456789018", "1234-5678-9018", "１２３４５６７８９０１８"] {
            let row = format!("p1,c1,家族 {n},,a@example.jp,ja,0,,0,0");
            let e = parse::<ContactRows>(&file::<ContactRows>(&[&row]), NOW).unwrap_err();
            assert_eq!(e.len(), 1);
            assert!(e[0].reason.contains("individual-number"));
            assert!(!e[0].reason.contains("9018"));
        }
    }

    #[test]
    fn headers_are_exact() {
        let mut f = file::<MedicalRows>(&["p1,A+,同意,,,,,"]);
        f[0] = f[0].replace("allergies", "allergy");
        let e = parse::<MedicalRows>(&f, NOW).unwrap_err();
        assert_eq!(e[0].line, 1);
        assert!(e[0].reason.contains("header must be exactly"));
    }
}
