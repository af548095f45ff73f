//! Current state derived from documents: query rows (persons, card
//! index, locations, shelters) and the presence view with its conflicts.
//!
//! Derivation reads only the document, so it is the same on every replica
//! holding the same heads, and the projection tables can always be rebuilt
//! from scratch. A document whose fields fail to decode is a schema error;
//! the engine rejects the change that caused it or quarantines the stored
//! document.

use crate::doc::{decode, Doc, DocError};
use crate::ids::Kind;
use crate::model::{FieldPerson, Household, PresenceAction, PresenceEvent, ShelterInfo, Validate};
use crate::store::{LocationRow, LocationStatus, PersonRow, Projection, ShelterRow};
use crate::text::search_key;
use std::collections::{BTreeMap, BTreeSet};

pub const HOUSEHOLD_FIELD: &str = "household";
pub const PERSON_FIELD: &str = "person";
pub const SHELTER_FIELD: &str = "info";
pub const EVENT_PREFIX: &str = "ev:";

fn schema(doc: &Doc, field: &str, reason: String) -> DocError {
    DocError::Schema {
        key: doc.key.clone(),
        field: field.to_string(),
        reason,
    }
}

/// Decodes and validates a field and every concurrent value of it.
fn typed<T: serde::de::DeserializeOwned + Validate>(
    doc: &Doc,
    field: &str,
) -> Result<Option<T>, DocError> {
    let Some(f) = doc.field(field) else {
        return Ok(None);
    };
    for v in &f.conflicts {
        let t: T = decode(&doc.key, field, v)?;
        t.validate()
            .map_err(|e| schema(doc, field, e.to_string()))?;
    }
    let t: T = decode(&doc.key, field, &f.value)?;
    t.validate()
        .map_err(|e| schema(doc, field, e.to_string()))?;
    Ok(Some(t))
}

pub fn household(doc: &Doc) -> Result<Option<Household>, DocError> {
    typed(doc, HOUSEHOLD_FIELD)
}

/// The shelter record of a shelter document (the winning value when two
/// were written concurrently).
pub fn shelter(doc: &Doc) -> Result<Option<ShelterInfo>, DocError> {
    typed(doc, SHELTER_FIELD)
}

pub fn field_person(doc: &Doc) -> Result<Option<FieldPerson>, DocError> {
    typed(doc, PERSON_FIELD)
}

pub fn presence_events(doc: &Doc) -> Result<Vec<PresenceEvent>, DocError> {
    let mut out = Vec::new();
    for (name, f) in doc.fields() {
        let Some(id) = name.strip_prefix(EVENT_PREFIX) else {
            return Err(schema(
                doc,
                &name,
                "unexpected field in a presence document".into(),
            ));
        };
        if !f.conflicts.is_empty() {
            return Err(schema(doc, &name, "an event was written twice".into()));
        }
        let ev: PresenceEvent = decode(&doc.key, &name, &f.value)?;
        ev.validate()
            .map_err(|e| schema(doc, &name, e.to_string()))?;
        if ev.event_id != id {
            return Err(schema(
                doc,
                &name,
                "event id does not match its field".into(),
            ));
        }
        out.push(ev);
    }
    Ok(out)
}

/// The derived location of one person, with the events that disagree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersonPresence {
    pub location: LocationRow,
    /// The latest events that do not know each other; more than one that
    /// disagree is a conflict (D-1).
    pub heads: Vec<PresenceEvent>,
}

/// Location per person from a set of presence events. The winner among
/// concurrent heads is the greatest (hlc, event id); the others are kept
/// and reported.
pub fn locations(events: &[PresenceEvent]) -> BTreeMap<String, PersonPresence> {
    let mut by_person: BTreeMap<&str, Vec<&PresenceEvent>> = BTreeMap::new();
    for e in events {
        by_person.entry(e.person_id.as_str()).or_default().push(e);
    }
    let mut out = BTreeMap::new();
    for (person, evs) in by_person {
        let ids: BTreeSet<&str> = evs.iter().map(|e| e.event_id.as_str()).collect();
        let referenced: BTreeSet<&str> = evs
            .iter()
            .flat_map(|e| e.prev.iter().map(String::as_str))
            .collect();
        let mut heads: Vec<&PresenceEvent> = evs
            .iter()
            .copied()
            .filter(|e| !referenced.contains(e.event_id.as_str()))
            .collect();
        heads.sort_by(|a, b| (a.hlc, &a.event_id).cmp(&(b.hlc, &b.event_id)));
        #[cfg(feature = "mutants")]
        if crate::mutants::active(crate::mutants::Mutant::WallClockLww) {
            // Planted bug: last writer by wall clock wins, conflicts vanish.
            let mut all = evs.clone();
            all.sort_by_key(|e| e.wall_ms);
            heads = vec![*all.last().unwrap()];
        }
        let Some(winner) = heads.last() else { continue };
        let place = |e: &PresenceEvent| match e.action {
            PresenceAction::CheckIn => (LocationStatus::In, e.shelter_id.clone()),
            PresenceAction::CheckOut | PresenceAction::Transfer => {
                (LocationStatus::Out, e.shelter_id.clone())
            }
        };
        let (mut status, shelter_id) = place(winner);
        let conflict = heads.iter().any(|h| place(h) != place(winner));
        if heads
            .iter()
            .any(|h| h.prev.iter().any(|p| !ids.contains(p.as_str())))
        {
            status = LocationStatus::Pending;
        }
        out.insert(
            person.to_string(),
            PersonPresence {
                location: LocationRow {
                    person_id: person.to_string(),
                    shelter_id,
                    status,
                    since_ms: winner.wall_ms,
                    conflict,
                },
                heads: heads.into_iter().cloned().collect(),
            },
        );
    }
    out
}

/// The address district of a registry address, for headquarters' "who in
/// this area is not accounted for": the address without its prefecture and
/// municipality, up to the first digit (the block number). Provisional: it
/// stands in until the registry carries a district of its own (issue 11).
///
/// `新潟県三条市旭町3-12` → `旭町`; an address that is only a municipality
/// gives the municipality; an empty address gives `None`.
pub fn district_of(address: &str) -> Option<String> {
    let a = address.trim();
    // Prefecture: the four special names, else up to 県 in the first 4 chars.
    let mut rest = ["東京都", "北海道", "京都府", "大阪府"]
        .iter()
        .find_map(|p| a.strip_prefix(p))
        .or_else(|| {
            a.char_indices()
                .take(4)
                .find(|(_, c)| *c == '県')
                .map(|(i, c)| &a[i + c.len_utf8()..])
        })
        .unwrap_or(a);
    // Municipality: a city (and its ward), else a county and its town or
    // village, else a special ward, town or village.
    let cut_after = |s: &str, set: &[char]| -> Option<usize> {
        s.char_indices()
            .find(|(_, c)| set.contains(c))
            .map(|(i, c)| i + c.len_utf8())
    };
    let municipality = if let Some(i) = cut_after(rest, &['市']) {
        let after = &rest[i..];
        // A designated city's ward: 札幌市中央区…
        match cut_after(after, &['区']) {
            Some(j) if j <= 4 * 3 => i + j,
            _ => i,
        }
    } else if let Some(i) = cut_after(rest, &['郡']) {
        i + cut_after(&rest[i..], &['町', '村']).unwrap_or(0)
    } else {
        cut_after(rest, &['区', '町', '村']).unwrap_or(0)
    };
    let whole = rest;
    rest = &rest[municipality..];
    let end = rest
        .char_indices()
        .find(|(_, c)| c.is_ascii_digit() || ('０'..='９').contains(c) || *c == '-' || *c == '－')
        .map(|(i, _)| i)
        .unwrap_or(rest.len());
    let d = rest[..end].trim();
    if !d.is_empty() {
        Some(d.to_string())
    } else {
        let m = whole[..municipality].trim();
        (!m.is_empty()).then(|| m.to_string())
    }
}

fn person_row(
    person_id: &str,
    household_id: Option<&str>,
    name: &str,
    kana: &str,
    birth: Option<&str>,
    district: Option<String>,
) -> PersonRow {
    PersonRow {
        district,
        person_id: person_id.to_string(),
        household_id: household_id.map(str::to_string),
        name: name.to_string(),
        kana: kana.to_string(),
        search_key: format!("{}|{}", search_key(kana), search_key(name)),
        birth_date: birth.map(str::to_string),
    }
}

/// Every query row a document derives, after validating its schema.
pub fn projection(doc: &Doc) -> Result<Projection, DocError> {
    let mut p = Projection::default();
    match doc.key.kind {
        Kind::Registry => {
            if let Some(h) = household(doc)? {
                if h.household_id != doc.key.id {
                    return Err(schema(
                        doc,
                        HOUSEHOLD_FIELD,
                        "household id does not match the document".into(),
                    ));
                }
                for m in &h.members {
                    p.persons.push(person_row(
                        &m.person_id,
                        Some(&h.household_id),
                        &m.name,
                        &m.kana,
                        Some(&m.birth_date),
                        district_of(&h.address),
                    ));
                    if let Some(c) = &m.card_user_id {
                        p.cards.push((
                            c.as_str().to_string(),
                            h.household_id.clone(),
                            m.person_id.clone(),
                        ));
                    }
                }
            }
        }
        Kind::Person => {
            if let Some(fp) = field_person(doc)? {
                if fp.person_id != doc.key.id {
                    return Err(schema(
                        doc,
                        PERSON_FIELD,
                        "person id does not match the document".into(),
                    ));
                }
                p.persons.push(person_row(
                    &fp.person_id,
                    None,
                    &fp.name,
                    &fp.kana,
                    fp.birth_date.as_deref(),
                    None,
                ));
            }
        }
        Kind::Presence => {
            let evs = presence_events(doc)?;
            p.locations = locations(&evs)
                .into_values()
                .map(|pp| pp.location)
                .collect();
        }
        Kind::Shelter => {
            if let Some(s) = typed::<ShelterInfo>(doc, SHELTER_FIELD)? {
                p.shelters.push(ShelterRow {
                    shelter_id: s.shelter_id,
                    name: s.name,
                    capacity: s.capacity,
                });
            }
        }
        Kind::Contacts => {
            // Decoding the view validates the document.
            if crate::views::contacts(doc)?.disclosure.do_not_disclose {
                p.withheld.push(doc.key.id.clone());
            }
        }
        Kind::Medical | Kind::Eligibility | Kind::Audit | Kind::Outbox => {
            crate::views::validate(doc)?;
        }
    }
    Ok(p)
}

/// A document after some changes were applied, with what deriving its rows
/// gave (an error is a reason the changes are refused).
#[derive(Clone)]
pub struct Applied {
    pub doc: std::sync::Arc<Doc>,
    pub projection: Result<std::sync::Arc<Projection>, String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;
    use crate::ids::NodeId;

    fn ev(
        id: &str,
        action: PresenceAction,
        shelter: &str,
        wall: u64,
        prev: &[&str],
    ) -> PresenceEvent {
        PresenceEvent {
            event_id: id.into(),
            op_id: format!("op-{id}"),
            person_id: "p1".into(),
            action,
            shelter_id: shelter.into(),
            to_shelter: None,
            hlc: Hlc {
                wall_ms: wall,
                counter: 0,
            },
            node: NodeId::new("n").unwrap(),
            wall_ms: wall,
            prev: prev.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn concurrent_check_ins_are_a_conflict_and_a_later_event_resolves_it() {
        let a = ev("a", PresenceAction::CheckIn, "s1", 10, &[]);
        let b = ev("b", PresenceAction::CheckIn, "s2", 5, &[]);
        let l = locations(&[a.clone(), b.clone()]);
        let p = &l["p1"];
        assert!(p.location.conflict);
        assert_eq!(p.heads.len(), 2);
        assert_eq!(p.location.shelter_id, "s1");
        let c = ev("c", PresenceAction::CheckOut, "s1", 20, &["a", "b"]);
        let l = locations(&[a, b, c]);
        assert!(!l["p1"].location.conflict);
        assert_eq!(l["p1"].location.status, LocationStatus::Out);
    }

    #[test]
    fn districts_from_addresses() {
        let d = |a: &str| district_of(a);
        assert_eq!(d("新潟県三条市旭町3-12").as_deref(), Some("旭町"));
        assert_eq!(d("新潟県三条市東裏館２－５").as_deref(), Some("東裏館"));
        assert_eq!(
            d("北海道札幌市中央区北一条西2").as_deref(),
            Some("北一条西")
        );
        assert_eq!(d("東京都千代田区永田町1-7-1").as_deref(), Some("永田町"));
        assert_eq!(
            d("石川県鳳珠郡能登町字宇出津1").as_deref(),
            Some("字宇出津")
        );
        assert_eq!(d("新潟県三条市").as_deref(), Some("三条市"));
        assert_eq!(d("旭町1").as_deref(), Some("旭町"));
        assert_eq!(d(""), None);
    }

    #[test]
    fn an_event_whose_predecessor_is_missing_is_pending() {
        let c = ev("c", PresenceAction::CheckOut, "s1", 20, &["a"]);
        assert_eq!(
            locations(&[c])["p1"].location.status,
            LocationStatus::Pending
        );
    }
}
