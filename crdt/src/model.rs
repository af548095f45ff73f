//! The domain model: what each document kind holds, as typed values with
//! validating constructors.
//!
//! Documents store each field as a JSON string under a field name (see
//! [`crate::doc`]); these types are what those strings decode to. Every
//! constructor and [`Validate::validate`] enforce the limits from the
//! product brief: bounded lengths, no control characters, card user IDs of
//! 13 digits, no Individual Number anywhere, controlled medical vocabulary.
//! Types holding personal data print redacted `Debug` output.

use crate::hlc::Hlc;
use crate::ids::{check_id_str, NodeId, INDIVIDUAL_NUMBER_REASON};
use crate::text::{check_email, check_text, CardUserId, TextError};
use serde::{Deserialize, Serialize};
use std::fmt;

pub const MAX_NAME_CHARS: usize = 100;
pub const MAX_ADDRESS_CHARS: usize = 200;
pub const MAX_NOTE_CHARS: usize = 1000;
pub const MAX_MEMBERS: usize = 30;
pub const MAX_CONTACTS_PER_PERSON: usize = 10;

/// Anything decoded from a document or an import is validated before use.
pub trait Validate {
    fn validate(&self) -> Result<(), TextError>;
}

fn id(field: &'static str, s: &str) -> Result<(), TextError> {
    check_id_str(s).map_err(|reason| match reason {
        INDIVIDUAL_NUMBER_REASON => TextError::IndividualNumber { field },
        _ => TextError::Invalid {
            field,
            reason: reason.to_string(),
        },
    })
}

/// A calendar date `YYYY-MM-DD` (Gregorian). Era dates are converted at
/// import; this type only accepts dates that exist.
pub fn check_date(field: &'static str, s: &str) -> Result<(u32, u32, u32), TextError> {
    let bad = |reason: &str| TextError::Invalid {
        field,
        reason: reason.to_string(),
    };
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(bad("date must be YYYY-MM-DD"));
    }
    let num = |r: std::ops::Range<usize>| {
        s[r].parse::<u32>()
            .map_err(|_| bad("date must be YYYY-MM-DD"))
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(1850..=2200).contains(&y) || !(1..=12).contains(&m) {
        return Err(bad("no such month or year"));
    }
    if d == 0 || d > days_in_month(y, m) {
        return Err(bad("no such day in that month"));
    }
    Ok((y, m, d))
}

pub fn days_in_month(y: u32, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 for a valid date (civil-from-days inverse).
pub fn days_from_civil(y: u32, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y as i64 - 1 } else { y as i64 };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// A birth date: a valid date, not in the future, age at most 130.
pub fn check_birth_date(field: &'static str, s: &str, now_wall_ms: u64) -> Result<(), TextError> {
    let (y, m, d) = check_date(field, s)?;
    let days = days_from_civil(y, m, d);
    let today = (now_wall_ms / 86_400_000) as i64;
    if days > today {
        return Err(TextError::Invalid {
            field,
            reason: "birth date is in the future".into(),
        });
    }
    if today - days > 131 * 366 {
        return Err(TextError::Invalid {
            field,
            reason: "age over 130".into(),
        });
    }
    Ok(())
}

/// A household member as the municipality's registry knows them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub person_id: String,
    pub name: String,
    pub kana: String,
    pub birth_date: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_user_id: Option<CardUserId>,
}

impl Validate for Member {
    fn validate(&self) -> Result<(), TextError> {
        id("person_id", &self.person_id)?;
        check_text("name", &self.name, MAX_NAME_CHARS, true)?;
        check_text("kana", &self.kana, MAX_NAME_CHARS, true)?;
        check_date("birth_date", &self.birth_date)?;
        Ok(())
    }
}

impl fmt::Debug for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Member({}, name: <redacted>)", self.person_id)
    }
}

/// One registry document: a household and its members.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Household {
    pub household_id: String,
    pub address: String,
    pub members: Vec<Member>,
}

impl Validate for Household {
    fn validate(&self) -> Result<(), TextError> {
        id("household_id", &self.household_id)?;
        check_text("address", &self.address, MAX_ADDRESS_CHARS, false)?;
        if self.members.is_empty() || self.members.len() > MAX_MEMBERS {
            return Err(TextError::Invalid {
                field: "members",
                reason: format!("a household has 1 to {MAX_MEMBERS} members"),
            });
        }
        for m in &self.members {
            m.validate()?;
        }
        Ok(())
    }
}

impl fmt::Debug for Household {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Household({}, {} members)",
            self.household_id,
            self.members.len()
        )
    }
}

/// A person registered in the field, without a registry entry.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldPerson {
    pub person_id: String,
    pub name: String,
    pub kana: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub birth_date: Option<String>,
    pub registered_by: NodeId,
    #[serde(default)]
    pub note: String,
}

impl Validate for FieldPerson {
    fn validate(&self) -> Result<(), TextError> {
        id("person_id", &self.person_id)?;
        check_text("name", &self.name, MAX_NAME_CHARS, true)?;
        check_text("kana", &self.kana, MAX_NAME_CHARS, true)?;
        if let Some(b) = &self.birth_date {
            check_date("birth_date", b)?;
        }
        check_text("note", &self.note, MAX_NOTE_CHARS, false)
    }
}

impl fmt::Debug for FieldPerson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FieldPerson({}, name: <redacted>)", self.person_id)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceAction {
    CheckIn,
    CheckOut,
    /// Leaves `shelter_id` for `to_shelter`.
    Transfer,
}

/// A presence fact. Current location is derived from the set of these;
/// `prev` names the person's latest events the writer knew about, so two
/// events that do not know each other are concurrent (a conflict when
/// they disagree).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceEvent {
    pub event_id: String,
    pub op_id: String,
    pub person_id: String,
    pub action: PresenceAction,
    pub shelter_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_shelter: Option<String>,
    pub hlc: Hlc,
    pub node: NodeId,
    pub wall_ms: u64,
    #[serde(default)]
    pub prev: Vec<String>,
}

impl Validate for PresenceEvent {
    fn validate(&self) -> Result<(), TextError> {
        id("event_id", &self.event_id)?;
        id("op_id", &self.op_id)?;
        id("person_id", &self.person_id)?;
        id("shelter_id", &self.shelter_id)?;
        if let Some(t) = &self.to_shelter {
            id("to_shelter", t)?;
        }
        if (self.action == PresenceAction::Transfer) != self.to_shelter.is_some() {
            return Err(TextError::Invalid {
                field: "to_shelter",
                reason: "required for a transfer and only then".into(),
            });
        }
        for p in &self.prev {
            id("prev", p)?;
        }
        Ok(())
    }
}

/// ABO and Rh, or explicitly unknown. Anything else is rejected (I-33).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum BloodType {
    #[serde(rename = "A+")]
    APos,
    #[serde(rename = "A-")]
    ANeg,
    #[serde(rename = "B+")]
    BPos,
    #[serde(rename = "B-")]
    BNeg,
    #[serde(rename = "O+")]
    OPos,
    #[serde(rename = "O-")]
    ONeg,
    #[serde(rename = "AB+")]
    AbPos,
    #[serde(rename = "AB-")]
    AbNeg,
    #[serde(rename = "unknown")]
    Unknown,
}

impl BloodType {
    pub fn parse(s: &str) -> Result<BloodType, TextError> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
            TextError::Invalid {
                field: "blood_type",
                reason: "must be one of A+, A-, B+, B-, O+, O-, AB+, AB-, unknown".into(),
            }
        })
    }
}

/// The legal basis for holding a medical profile.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentBasis {
    Consented,
    /// The life-saving exception, recorded as such.
    LifeSaving,
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consent {
    pub basis: ConsentBasis,
    pub recorded_by: NodeId,
    pub wall_ms: u64,
}

/// One entry in a medical list (an allergy, condition, medication,
/// emergency contact or family doctor). Entries have ids so concurrent
/// additions both survive; a concurrent edit of one entry is a conflict.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MedicalEntry {
    pub text: String,
}

impl Validate for MedicalEntry {
    fn validate(&self) -> Result<(), TextError> {
        check_text("text", &self.text, MAX_NAME_CHARS * 2, true)
    }
}

impl fmt::Debug for MedicalEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MedicalEntry(<redacted>)")
    }
}

/// The sections of a medical profile, each a list of entries.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MedicalSection {
    Allergy,
    Condition,
    Medication,
    FamilyDoctor,
    EmergencyContact,
}

impl MedicalSection {
    pub const ALL: [MedicalSection; 5] = [
        MedicalSection::Allergy,
        MedicalSection::Condition,
        MedicalSection::Medication,
        MedicalSection::FamilyDoctor,
        MedicalSection::EmergencyContact,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            MedicalSection::Allergy => "allergy",
            MedicalSection::Condition => "condition",
            MedicalSection::Medication => "medication",
            MedicalSection::FamilyDoctor => "family_doctor",
            MedicalSection::EmergencyContact => "emergency_contact",
        }
    }
}

/// Insurance eligibility as cached for clinics (the municipality's
/// National Health Insurance records, imported at headquarters). The
/// document is received by clinic and hq nodes only ([`crate::policy`]);
/// the insured person's symbol, number and branch are shown unmasked only
/// on clinic nodes ([`Eligibility::masked`] everywhere else, exports
/// included). Never a person key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Eligibility {
    /// 保険者番号: 6 digits (National Health Insurance) or 8 digits.
    pub insurer_number: String,
    /// The insurer's name (optional).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub insurer: String,
    /// 記号 (may be empty).
    #[serde(default)]
    pub symbol: String,
    /// 番号.
    pub number: String,
    /// 枝番: empty or 2 digits.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub branch: String,
    pub valid_from: String,
    /// `None`: no end date on record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_to: Option<String>,
    /// Co-payment in percent (窓口負担割合: 10, 20 or 30; 0 for public
    /// assistance with no co-payment).
    pub copay_pct: u8,
    /// The date the municipality's record was taken (a cache is only as
    /// good as its age).
    pub as_of: String,
}

pub const COPAY_PCTS: [u8; 4] = [0, 10, 20, 30];

/// The answer a clinic gets offline.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EligibilityStatus {
    /// Today (Japan date) lies within `valid_from..=valid_to`.
    Valid,
    /// `valid_to` has passed.
    Expired,
    /// No record, not yet valid, or concurrent records that disagree.
    Unknown,
}

impl Eligibility {
    /// The copy shown outside clinic nodes: symbol, number and branch
    /// replaced by `*` of the same length (the insurer is public).
    pub fn masked(&self) -> Eligibility {
        let star = |s: &str| "*".repeat(s.chars().count());
        Eligibility {
            symbol: star(&self.symbol),
            number: star(&self.number),
            branch: star(&self.branch),
            ..self.clone()
        }
    }

    /// Status on a Japan calendar date `YYYY-MM-DD` (string order is date
    /// order for validated dates).
    pub fn status_on(&self, today: &str) -> EligibilityStatus {
        if today < self.valid_from.as_str() {
            return EligibilityStatus::Unknown;
        }
        match &self.valid_to {
            Some(to) if today > to.as_str() => EligibilityStatus::Expired,
            _ => EligibilityStatus::Valid,
        }
    }
}

impl Validate for Eligibility {
    fn validate(&self) -> Result<(), TextError> {
        let bad = |field, reason: &str| TextError::Invalid {
            field,
            reason: reason.to_string(),
        };
        let n = &self.insurer_number;
        if !(n.len() == 6 || n.len() == 8) || !n.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("insurer_number", "must be 6 or 8 digits"));
        }
        check_text("insurer", &self.insurer, MAX_NAME_CHARS, false)?;
        check_text("symbol", &self.symbol, 20, false)?;
        check_text("number", &self.number, 20, true)?;
        if !self
            .number
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(bad("number", "ASCII letters, digits and '-' only"));
        }
        if !(self.branch.is_empty()
            || (self.branch.len() == 2 && self.branch.bytes().all(|b| b.is_ascii_digit())))
        {
            return Err(bad("branch", "empty or 2 digits"));
        }
        check_date("valid_from", &self.valid_from)?;
        if let Some(to) = &self.valid_to {
            check_date("valid_to", to)?;
            if to < &self.valid_from {
                return Err(bad("valid_to", "before valid_from"));
            }
        }
        if !COPAY_PCTS.contains(&self.copay_pct) {
            return Err(bad("copay_pct", "must be 0, 10, 20 or 30"));
        }
        check_date("as_of", &self.as_of)?;
        Ok(())
    }
}

impl fmt::Debug for Eligibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Eligibility(insurer {}, number: <redacted>, {}..{:?})",
            self.insurer_number, self.valid_from, self.valid_to
        )
    }
}

/// A family contact registered in advance by the resident.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FamilyContact {
    pub contact_id: String,
    pub name: String,
    pub email: String,
    pub consent: bool,
    /// How the contact is related to the resident (free text, e.g. 長男).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub relation: String,
    /// Mail language (`ja`, `en`, ...; empty = `ja`): picks the template.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub language: String,
    /// The date consent was given (`YYYY-MM-DD`), when recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_date: Option<String>,
}

/// Mail languages a contact may ask for (each has a template).
pub const MAIL_LANGUAGES: [&str; 2] = ["ja", "en"];

impl Validate for FamilyContact {
    fn validate(&self) -> Result<(), TextError> {
        id("contact_id", &self.contact_id)?;
        check_text("contact_name", &self.name, MAX_NAME_CHARS, true)?;
        check_email("email", &self.email)?;
        check_text("relation", &self.relation, 20, false)?;
        if !(self.language.is_empty() || MAIL_LANGUAGES.contains(&self.language.as_str())) {
            return Err(TextError::Invalid {
                field: "language",
                reason: format!("one of {}", MAIL_LANGUAGES.join(", ")),
            });
        }
        if let Some(d) = &self.consent_date {
            check_date("consent_date", d)?;
        }
        Ok(())
    }
}

impl fmt::Debug for FamilyContact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "FamilyContact({}, consent: {})",
            self.contact_id, self.consent
        )
    }
}

/// The resident's disclosure preferences for safety mail.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disclosure {
    /// Never send safety mail, whatever the contacts say.
    pub do_not_disclose: bool,
    /// Name the shelter in the mail.
    pub share_shelter: bool,
}

/// A shelter as headquarters and the shelter itself describe it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShelterInfo {
    pub shelter_id: String,
    pub name: String,
    pub capacity: u32,
    #[serde(default)]
    pub location: String,
    #[serde(default)]
    pub needs: String,
    /// Street address (所在地).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// District or school zone the municipality groups shelters by (地区).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub district: String,
    #[serde(default, skip_serializing_if = "ShelterKind::is_default")]
    pub kind: ShelterKind,
    /// Open for evacuees. Shelters are registered in advance and opened
    /// during the disaster. Absent (older documents) means open.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub open: bool,
}

impl Default for ShelterInfo {
    /// An open designated shelter with empty fields (fill in id and name).
    fn default() -> Self {
        ShelterInfo {
            shelter_id: String::new(),
            name: String::new(),
            capacity: 0,
            location: String::new(),
            needs: String::new(),
            address: String::new(),
            district: String::new(),
            kind: ShelterKind::Designated,
            open: true,
        }
    }
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// The kinds of shelter the Disaster Countermeasures Basic Act names.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShelterKind {
    /// 指定避難所.
    #[default]
    Designated,
    /// 福祉避難所: for people who need special care.
    Welfare,
    /// その他 (hotels, temporary sites).
    Other,
}

impl ShelterKind {
    fn is_default(&self) -> bool {
        *self == ShelterKind::Designated
    }
    pub fn label_ja(self) -> &'static str {
        match self {
            ShelterKind::Designated => "指定避難所",
            ShelterKind::Welfare => "福祉避難所",
            ShelterKind::Other => "その他",
        }
    }
    /// From the Japanese label or the English code.
    pub fn parse(s: &str) -> Option<ShelterKind> {
        match s.trim() {
            "指定避難所" | "designated" => Some(ShelterKind::Designated),
            "福祉避難所" | "welfare" => Some(ShelterKind::Welfare),
            "その他" | "other" => Some(ShelterKind::Other),
            _ => None,
        }
    }
}

/// The most evacuees one shelter may be registered for (the largest
/// Japanese shelters held a few thousand).
pub const MAX_SHELTER_CAPACITY: u32 = 100_000;

impl Validate for ShelterInfo {
    fn validate(&self) -> Result<(), TextError> {
        id("shelter_id", &self.shelter_id)?;
        check_text("name", &self.name, MAX_NAME_CHARS, true)?;
        check_text("location", &self.location, MAX_ADDRESS_CHARS, false)?;
        check_text("needs", &self.needs, MAX_NOTE_CHARS, false)?;
        check_text("address", &self.address, MAX_ADDRESS_CHARS, false)?;
        check_text("district", &self.district, MAX_NAME_CHARS, false)?;
        if self.capacity > MAX_SHELTER_CAPACITY {
            return Err(TextError::Invalid {
                field: "capacity",
                reason: format!("at most {MAX_SHELTER_CAPACITY}"),
            });
        }
        Ok(())
    }
}

/// One audit entry; each node's entries form a hash chain.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    pub seq: u64,
    pub operator: String,
    pub node: NodeId,
    pub action: String,
    /// The record read or attempted, e.g. `medical/p-123`.
    pub record: String,
    pub wall_ms: u64,
    pub hlc: Hlc,
    /// False while the node has no trustworthy time source (B-4).
    pub clock_trusted: bool,
    pub reason: String,
    pub break_glass: bool,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditEntry {
    /// The chain hash over every field but `hash` itself.
    pub fn compute_hash(&self) -> String {
        let mut h = blake3::Hasher::new();
        let body = serde_json::json!([
            self.seq,
            self.operator,
            self.node,
            self.action,
            self.record,
            self.wall_ms,
            self.hlc,
            self.clock_trusted,
            self.reason,
            self.break_glass,
            self.prev_hash
        ]);
        h.update(body.to_string().as_bytes());
        h.finalize().to_hex()[..32].to_string()
    }
}

/// The family-mail state of one (arrival, contact) pair, as recorded in
/// the outbox document. See [`crate::outbox`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailState {
    pub message_id: String,
    pub status: MailStatus,
    pub attempts: u32,
    /// HQ node that holds the claim for sending.
    pub claimed_by: NodeId,
    /// Wall time until which the claim holds; another HQ takes over after.
    pub lease_until_ms: u64,
    pub next_attempt_ms: u64,
    #[serde(default)]
    pub reason: String,
    /// Sends whose outcome was unknown (possible duplicates).
    pub indeterminate: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MailStatus {
    Pending,
    Sending,
    Indeterminate,
    FailedPermanent,
    Sent,
    /// Consent was withdrawn (or do-not-disclose set) before sending.
    Cancelled,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert!(check_date("d", "2024-02-29").is_ok());
        assert!(check_date("d", "2023-02-29").is_err());
        assert!(check_date("d", "2024-02-30").is_err());
        assert!(check_date("d", "2024-13-01").is_err());
        assert!(check_date("d", "24-01-01").is_err());
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11017);
        let now = days_from_civil(2026, 11, 21) as u64 * 86_400_000;
        assert!(check_birth_date("b", "1950-01-01", now).is_ok());
        assert!(check_birth_date("b", "2030-01-01", now).is_err());
        assert!(check_birth_date("b", "1880-01-01", now).is_err());
    }

    #[test]
    fn blood_types_are_a_closed_set() {
        assert_eq!(BloodType::parse("AB-").unwrap(), BloodType::AbNeg);
        assert!(BloodType::parse("O Rh+").is_err());
        assert!(BloodType::parse("ab-").is_err());
    }

    #[test]
    fn debug_redacts_names() {
        let m = Member {
            person_id: "p1".into(),
            name: "山田太郎".into(),
            kana: "ヤマダタロウ".into(),
            birth_date: "1950-01-01".into(),
            card_user_id: None,
        };
        assert!(!format!("{m:?}").contains("山田"));
    }
}
