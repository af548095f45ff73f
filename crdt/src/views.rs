//! Typed views of the documents that do not feed query tables: medical
//! profiles, eligibility, family contacts, audit chains and outbox states.
//!
//! Each view keeps concurrent values visible (`conflicts`) rather than
//! choosing one silently (D-2).

use crate::doc::{decode, Doc, DocError};
use crate::ids::Kind;
use crate::model::{
    AuditEntry, BloodType, Consent, Disclosure, Eligibility, FamilyContact, MailState,
    MedicalEntry, MedicalSection, Validate,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const BLOOD_TYPE: &str = "blood_type";
pub const CONSENT: &str = "consent";
pub const ELIGIBILITY: &str = "eligibility";
pub const DISCLOSURE: &str = "disclosure";
pub const CONTACT_PREFIX: &str = "contact:";
pub const AUDIT_PREFIX: &str = "e:";
pub const MAIL_PREFIX: &str = "mail:";

fn schema(doc: &Doc, field: &str, reason: impl Into<String>) -> DocError {
    DocError::Schema {
        key: doc.key.clone(),
        field: field.to_string(),
        reason: reason.into(),
    }
}

fn all_values<T: serde::de::DeserializeOwned>(
    doc: &Doc,
    field: &str,
    value: &str,
    conflicts: &[String],
) -> Result<(T, Vec<T>), DocError> {
    let v = decode(&doc.key, field, value)?;
    let c = conflicts
        .iter()
        .map(|c| decode(&doc.key, field, c))
        .collect::<Result<Vec<T>, _>>()?;
    Ok((v, c))
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EntryView {
    pub entry_id: String,
    pub text: String,
    /// Concurrent edits of this entry, kept for review.
    pub conflicts: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct MedicalView {
    pub blood_type: Option<BloodType>,
    pub blood_type_conflicts: Vec<BloodType>,
    pub consent: Option<Consent>,
    pub sections: BTreeMap<String, Vec<EntryView>>,
}

impl MedicalView {
    pub fn has_conflicts(&self) -> bool {
        !self.blood_type_conflicts.is_empty()
            || self
                .sections
                .values()
                .flatten()
                .any(|e| !e.conflicts.is_empty())
    }
}

pub fn medical(doc: &Doc) -> Result<MedicalView, DocError> {
    let mut v = MedicalView::default();
    for (name, f) in doc.fields() {
        if name == BLOOD_TYPE {
            let (b, c) = all_values::<BloodType>(doc, &name, &f.value, &f.conflicts)?;
            v.blood_type = Some(b);
            v.blood_type_conflicts = c;
        } else if name == CONSENT {
            let (c, _) = all_values::<Consent>(doc, &name, &f.value, &f.conflicts)?;
            v.consent = Some(c);
        } else if let Some((section, entry_id)) = name.split_once(':') {
            if !MedicalSection::ALL.iter().any(|s| s.as_str() == section) {
                return Err(schema(doc, &name, "unknown medical section"));
            }
            let (e, c) = all_values::<MedicalEntry>(doc, &name, &f.value, &f.conflicts)?;
            for x in std::iter::once(&e).chain(c.iter()) {
                x.validate()
                    .map_err(|err| schema(doc, &name, err.to_string()))?;
            }
            v.sections
                .entry(section.to_string())
                .or_default()
                .push(EntryView {
                    entry_id: entry_id.to_string(),
                    text: e.text,
                    conflicts: c.into_iter().map(|x| x.text).collect(),
                });
        } else {
            return Err(schema(doc, &name, "unexpected field in a medical document"));
        }
    }
    Ok(v)
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContactsView {
    pub contacts: Vec<FamilyContact>,
    pub disclosure: Disclosure,
}

pub fn contacts(doc: &Doc) -> Result<ContactsView, DocError> {
    let mut v = ContactsView::default();
    for (name, f) in doc.fields() {
        if name == DISCLOSURE {
            // Concurrent disclosure settings: the most protective wins.
            let (d, c) = all_values::<Disclosure>(doc, &name, &f.value, &f.conflicts)?;
            v.disclosure = Disclosure {
                do_not_disclose: d.do_not_disclose || c.iter().any(|x| x.do_not_disclose),
                share_shelter: d.share_shelter && c.iter().all(|x| x.share_shelter),
            };
        } else if name.starts_with(CONTACT_PREFIX) {
            // Concurrent consent edits: consent only if every value consents.
            let (mut fc, c) = all_values::<FamilyContact>(doc, &name, &f.value, &f.conflicts)?;
            fc.validate()
                .map_err(|e| schema(doc, &name, e.to_string()))?;
            fc.consent = fc.consent && c.iter().all(|x| x.consent);
            v.contacts.push(fc);
        } else {
            return Err(schema(
                doc,
                &name,
                "unexpected field in a contacts document",
            ));
        }
    }
    if v.contacts.len() > crate::model::MAX_CONTACTS_PER_PERSON {
        return Err(schema(doc, "contact", "more than 10 contacts"));
    }
    Ok(v)
}

pub fn eligibility(doc: &Doc) -> Result<Option<Eligibility>, DocError> {
    Ok(eligibility_all(doc)?.map(|(e, _)| e))
}

/// The eligibility record and any concurrent, different records (two
/// imports that crossed): a clinic must not be told "valid" from one of
/// two disagreeing records.
pub fn eligibility_all(doc: &Doc) -> Result<Option<(Eligibility, Vec<Eligibility>)>, DocError> {
    let Some(f) = doc.field(ELIGIBILITY) else {
        return Ok(None);
    };
    let (e, c) = all_values::<Eligibility>(doc, ELIGIBILITY, &f.value, &f.conflicts)?;
    for x in std::iter::once(&e).chain(&c) {
        x.validate()
            .map_err(|err| schema(doc, ELIGIBILITY, err.to_string()))?;
    }
    let c = c.into_iter().filter(|x| *x != e).collect();
    Ok(Some((e, c)))
}

pub fn audit(doc: &Doc) -> Result<Vec<AuditEntry>, DocError> {
    let mut out = Vec::new();
    for (name, f) in doc.fields() {
        if !name.starts_with(AUDIT_PREFIX) || !f.conflicts.is_empty() {
            return Err(schema(doc, &name, "audit entries are written once"));
        }
        out.push(decode::<AuditEntry>(&doc.key, &name, &f.value)?);
    }
    out.sort_by_key(|e| e.seq);
    Ok(out)
}

/// Checks an audit chain: sequence numbers consecutive from 0 and every
/// hash linking to the one before.
pub fn audit_chain_ok(entries: &[AuditEntry]) -> bool {
    audit_chain_check(entries, None).is_ok()
}

/// [`audit_chain_ok`] with the reason, and against an anchor when one is
/// known: `(entries, head hash)` as recorded apart from the chain (the
/// writing node's own meta, or a verifier's earlier copy). Without an
/// anchor a chain cut short at its end, or whose tail was rewritten with
/// recomputed hashes, is a valid shorter chain; the anchor catches both.
pub fn audit_chain_check(
    entries: &[AuditEntry],
    anchor: Option<(u64, &str)>,
) -> Result<(), String> {
    let mut prev = String::new();
    for (i, e) in entries.iter().enumerate() {
        if e.seq != i as u64 {
            return Err(format!("entry {i} has sequence number {}", e.seq));
        }
        if e.prev_hash != prev {
            return Err(format!("entry {i} does not link to entry {}", i as i64 - 1));
        }
        if e.hash != e.compute_hash() {
            return Err(format!("entry {i} does not match its hash"));
        }
        prev = e.hash.clone();
    }
    if let Some((count, head)) = anchor {
        if entries.len() as u64 != count || prev != head {
            return Err(format!(
                "the chain holds {} entries ending in {prev:?}; {count} ending in {head:?} were recorded",
                entries.len()
            ));
        }
    }
    Ok(())
}

/// Mail states per contact. Concurrent states (two HQ nodes) resolve to
/// the most advanced status, and their counters add up.
pub fn outbox(doc: &Doc) -> Result<BTreeMap<String, MailState>, DocError> {
    let mut out = BTreeMap::new();
    for (name, f) in doc.fields() {
        let Some(contact) = name.strip_prefix(MAIL_PREFIX) else {
            return Err(schema(doc, &name, "unexpected field in an outbox document"));
        };
        let (mut s, c) = all_values::<MailState>(doc, &name, &f.value, &f.conflicts)?;
        for other in c {
            if other.status > s.status {
                s.status = other.status;
                s.reason = other.reason.clone();
            }
            s.attempts = s.attempts.max(other.attempts);
            s.indeterminate = s.indeterminate.max(other.indeterminate);
        }
        out.insert(contact.to_string(), s);
    }
    Ok(out)
}

/// Schema check for the kinds without query rows.
pub fn validate(doc: &Doc) -> Result<(), DocError> {
    match doc.key.kind {
        Kind::Medical => medical(doc).map(|_| ()),
        Kind::Contacts => contacts(doc).map(|_| ()),
        Kind::Eligibility => eligibility(doc).map(|_| ()),
        Kind::Audit => audit(doc).map(|_| ()),
        Kind::Outbox => outbox(doc).map(|_| ()),
        _ => Ok(()),
    }
}
