//! Queries: read-only answers from the node's replica, its sessions and
//! its mail state. Nothing here writes; a query's reply says what this
//! node holds now (query rows come from the store's projections, updated
//! in the same transaction as the documents they derive from).
//!
//! `HouseholdByCard` is what a card tap shows: the household of the card's
//! holder with the members' locations, and the holder, from one `cards`
//! row. `Person` lists the concurrent presence events behind a conflict.
//!
//! The screens' queries: `Roster` (a shelter's residents, with persons in
//! conflict listed at every shelter a concurrent event names),
//! `Districts` and `Unaccounted` (registry residents per address district
//! not yet seen at any shelter), `Arrivals` (check-ins per time bucket)
//! and `Audit` (every audit chain held here, for headquarters' review of
//! break-glass use).

use crate::api::*;
use crate::derive;
use crate::ids::{DocKey, Kind};
use crate::mail::Mail;
use crate::model::{MailState, MailStatus, PresenceAction};
use crate::policy;
use crate::replica::Replica;
use crate::sessions::Sessions;
use crate::store::{Store, StoreError};
use crate::text::{check_text, search_key, TextError};
use crate::views;
use std::collections::BTreeMap;

/// Answers the queries the store's projection rows alone answer (with
/// the shelters' last-seen times): `Shelters`, `Conflicts`, `Districts`,
/// `Arrivals`. Any other query is given back (`Err`). The engine answers
/// them with this function, and so may a node's read-only connections to
/// its store, so headquarters' dashboard is not queued behind the
/// engine's sync work: the rows are those of the last commit either way.
pub fn from_projections<S: Store + ?Sized>(
    store: &S,
    shelter_seen: &BTreeMap<String, u64>,
    q: Query,
) -> Result<Result<QueryReply, CommandError>, Query> {
    let answer = match q {
        Query::Shelters => store.occupancy().and_then(|occ| {
            Ok(QueryReply::Shelters(
                store
                    .shelters()?
                    .into_iter()
                    .map(|s| ShelterView {
                        occupancy: occ.get(&s.shelter_id).copied().unwrap_or(0),
                        last_sync: shelter_seen.get(&s.shelter_id).copied(),
                        shelter: s,
                    })
                    .collect(),
            ))
        }),
        Query::Conflicts => store.conflicts().map(QueryReply::Conflicts),
        Query::Districts => store.district_counts().map(QueryReply::Districts),
        // At least a minute: a bucket per millisecond is no chart.
        Query::Arrivals { bucket_ms } => store
            .arrivals(bucket_ms.max(60_000))
            .map(QueryReply::Arrivals),
        other => return Err(other),
    };
    Ok(answer.map_err(CommandError::from))
}

/// Whether [`from_projections`] answers `q`: lets a caller choose where to
/// run `q` before it holds a store.
pub fn answers_from_projections(q: &Query) -> bool {
    matches!(
        q,
        Query::Shelters | Query::Conflicts | Query::Districts | Query::Arrivals { .. }
    )
}

/// Queries over a borrowed replica and the parts beside it.
pub(crate) struct Queries<'a, S: Store> {
    pub(crate) r: &'a mut Replica<S>,
    pub(crate) sessions: &'a Sessions,
    pub(crate) mail: &'a Mail,
    /// Wall ms of the last presence change seen per shelter.
    pub(crate) shelter_seen: &'a BTreeMap<String, u64>,
    /// The shelter this node serves (shelter role): a roster's default.
    pub(crate) shelter_id: &'a Option<String>,
}

impl<S: Store> Queries<'_, S> {
    /// Answers one query; nothing is written.
    pub(crate) fn run(&mut self, q: Query) -> Result<QueryReply, CommandError> {
        Ok(match q {
            Query::Status => {
                let open: Vec<&MailState> = self
                    .mail
                    .states()
                    .values()
                    .filter(|m| {
                        !matches!(
                            m.status,
                            MailStatus::Sent | MailStatus::FailedPermanent | MailStatus::Cancelled
                        )
                    })
                    .collect();
                QueryReply::Status(Status {
                    node_id: self.r.meta.node_id.clone(),
                    role: self.r.meta.role,
                    incarnation: self.r.meta.incarnation,
                    peers: self.sessions.peer_status(),
                    documents: self.r.index.len(),
                    quarantined: self.r.store.quarantined()?.len(),
                    violations: self.sessions.stats.violations,
                    mail_queue: open.len(),
                    mail_oldest_ms: open.iter().map(|m| m.next_attempt_ms).min(),
                    duplicate_mail_risk: self.mail.duplicate_risk,
                    documents_by_kind: Kind::ALL
                        .iter()
                        .map(|k| (*k, self.r.index.kind_count(*k)))
                        .filter(|(_, n)| *n > 0)
                        .collect(),
                    outbox: self
                        .mail
                        .states()
                        .values()
                        .fold(BTreeMap::new(), |mut m, s| {
                            *m.entry(s.status).or_insert(0) += 1;
                            m
                        }),
                    audit_entries: self.r.meta.audit_seq,
                })
            }
            Query::Persons { limit, offset } => {
                QueryReply::Persons(self.r.store.persons(limit.min(1000), offset)?)
            }
            Query::Search { q, limit } => {
                check_text("q", &q, 100, true)?;
                QueryReply::Persons(self.r.store.search(&search_key(&q), limit.min(200))?)
            }
            Query::HouseholdByCard { card_user_id } => {
                let card = crate::text::CardUserId::parse(&card_user_id)?;
                match self.r.store.household_by_card(card.as_str())? {
                    None => QueryReply::Household(None),
                    Some(h) => {
                        let members = self
                            .r
                            .store
                            .household_members(&h)?
                            .into_iter()
                            .map(|p| -> Result<_, StoreError> {
                                let l = self.r.store.location(&p.person_id)?;
                                Ok((p, l))
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        // The holder comes from the same cards row as the
                        // household, so it is one of the members.
                        let holder = self.r.store.person_by_card(card.as_str())?;
                        QueryReply::Household(Some(HouseholdView {
                            household_id: h,
                            members,
                            holder,
                        }))
                    }
                }
            }
            Query::PresenceHistory { person_id } => {
                crate::ids::check_id_str(&person_id).map_err(|r| TextError::Invalid {
                    field: "person_id",
                    reason: r.into(),
                })?;
                if self.r.store.person(&person_id)?.is_none() {
                    QueryReply::PresenceHistory(None)
                } else {
                    let key = self.r.presence_key(&person_id)?;
                    let mut evs = match self.r.load(&key)? {
                        Some(doc) => derive::presence_events(doc)?,
                        None => Vec::new(),
                    };
                    evs.retain(|e| e.person_id == person_id);
                    evs.sort_by(|a, b| (a.hlc, &a.event_id).cmp(&(b.hlc, &b.event_id)));
                    QueryReply::PresenceHistory(Some(evs))
                }
            }
            Query::Person { person_id } => {
                crate::ids::check_id_str(&person_id).map_err(|r| TextError::Invalid {
                    field: "person_id",
                    reason: r.into(),
                })?;
                match self.r.store.person(&person_id)? {
                    None => QueryReply::Person(None),
                    Some(person) => {
                        let location = self.r.store.location(&person_id)?;
                        let mut conflicts = Vec::new();
                        if location.as_ref().is_some_and(|l| l.conflict) {
                            let key = self.r.presence_key(&person_id)?;
                            if let Some(doc) = self.r.load(&key)? {
                                if let Ok(evs) = derive::presence_events(doc) {
                                    if let Some(pp) = derive::locations(&evs).remove(&person_id) {
                                        conflicts = pp.heads;
                                    }
                                }
                            }
                        }
                        QueryReply::Person(Some(PersonDetail {
                            person,
                            location,
                            conflicts,
                        }))
                    }
                }
            }
            Query::Evacuees {
                shelter_id,
                with_address,
            } => {
                if let Some(s) = &shelter_id {
                    crate::ids::check_id_str(s).map_err(|r| TextError::Invalid {
                        field: "shelter_id",
                        reason: r.into(),
                    })?;
                }
                let withheld = self.r.store.withheld()?;
                let rows = self.r.store.evacuees(shelter_id.as_deref())?;
                let mut addresses: BTreeMap<String, Option<String>> = BTreeMap::new();
                let mut out = Vec::with_capacity(rows.len());
                for (person, location) in rows {
                    let address = match (&person.household_id, with_address) {
                        (Some(h), true) => {
                            if !addresses.contains_key(h) {
                                let a = match DocKey::new(Kind::Registry, h) {
                                    Ok(k) => match self.r.load(&k)? {
                                        Some(doc) => derive::household(doc)
                                            .ok()
                                            .flatten()
                                            .map(|hh| hh.address),
                                        None => None,
                                    },
                                    Err(_) => None,
                                };
                                addresses.insert(h.clone(), a);
                            }
                            addresses[h].clone()
                        }
                        _ => None,
                    };
                    out.push(Evacuee {
                        withheld: withheld.contains(&person.person_id),
                        person,
                        location,
                        address,
                    });
                }
                QueryReply::Evacuees(out)
            }
            Query::ShelterInfos => {
                let keys: Vec<DocKey> = self
                    .r
                    .index
                    .map
                    .keys()
                    .filter(|k| k.kind == Kind::Shelter)
                    .cloned()
                    .collect();
                let mut out = Vec::new();
                for k in keys {
                    if let Some(doc) = self.r.load(&k)? {
                        if let Ok(Some(s)) = derive::shelter(doc) {
                            out.push(s);
                        }
                    }
                }
                QueryReply::ShelterInfos(out)
            }
            Query::Roster { shelter_id } => {
                let shelter =
                    shelter_id
                        .or_else(|| self.shelter_id.clone())
                        .ok_or(TextError::Invalid {
                            field: "shelter_id",
                            reason: "required on a node that is not a shelter".into(),
                        })?;
                crate::ids::check_id_str(&shelter).map_err(|r| TextError::Invalid {
                    field: "shelter_id",
                    reason: r.into(),
                })?;
                let mut locs = self.r.store.roster(&shelter)?;
                // A person in conflict whose winning event names another
                // shelter is still on this roster when one of the
                // concurrent events names this one (flagged, D-1).
                for l in self.r.store.conflicts()? {
                    if l.shelter_id == shelter || locs.iter().any(|x| x.person_id == l.person_id) {
                        continue;
                    }
                    let key = self.r.presence_key(&l.person_id)?;
                    let mut here = false;
                    if let Some(doc) = self.r.load(&key)? {
                        if let Ok(evs) = derive::presence_events(doc) {
                            if let Some(pp) = derive::locations(&evs).remove(&l.person_id) {
                                here = pp.heads.iter().any(|e| {
                                    let at = e.to_shelter.as_ref().unwrap_or(&e.shelter_id);
                                    *at == shelter && e.action != PresenceAction::CheckOut
                                });
                            }
                        }
                    }
                    if here {
                        locs.push(l);
                    }
                }
                locs.sort_by(|a, b| a.person_id.cmp(&b.person_id));
                let mut rows = Vec::new();
                for l in locs {
                    if let Some(p) = self.r.store.person(&l.person_id)? {
                        rows.push((p, l));
                    }
                }
                QueryReply::Roster(rows)
            }
            Query::Unaccounted {
                district,
                after,
                limit,
            } => {
                check_text("district", &district, 200, true)?;
                check_text("after", &after, 200, false)?;
                QueryReply::Persons(
                    self.r
                        .store
                        .unaccounted(&district, &after, limit.min(1000))?,
                )
            }
            Query::Audit {
                break_glass_only,
                limit,
            } => {
                if !policy::may_read(self.r.meta.role, Kind::Audit) {
                    return Err(CommandError::Forbidden {
                        role: self.r.meta.role,
                        action: "read audit logs".into(),
                    });
                }
                let keys: Vec<DocKey> = self
                    .r
                    .index
                    .map
                    .keys()
                    .filter(|k| k.kind == Kind::Audit)
                    .cloned()
                    .collect();
                let mut out = Vec::new();
                for k in &keys {
                    if let Some(doc) = self.r.load(k)? {
                        if let Ok(entries) = views::audit(doc) {
                            out.extend(
                                entries
                                    .into_iter()
                                    .filter(|e| !break_glass_only || e.break_glass),
                            );
                        }
                    }
                }
                out.sort_by(|a, b| b.wall_ms.cmp(&a.wall_ms).then(a.node.cmp(&b.node)));
                out.truncate(limit.min(1000));
                QueryReply::Audit(out)
            }
            Query::Outbox => QueryReply::Outbox(
                self.mail
                    .states()
                    .iter()
                    .map(|((p, c), s)| OutboxRow {
                        person_id: p.clone(),
                        contact_id: c.clone(),
                        state: s.clone(),
                    })
                    .collect(),
            ),
            // Shelters, conflicts, districts, arrivals.
            q => {
                return from_projections(&self.r.store, self.shelter_seen, q).unwrap_or_else(|_| {
                    Err(CommandError::Rejected("no answer for this query".into()))
                })
            }
        })
    }
}
