//! Family safety mail at headquarters: what is due, to whom, and what
//! happened to each send.
//!
//! The state of every (arrival, contact) pair lives in the person's outbox
//! document ([`crate::views::outbox`]), so both headquarters nodes see it;
//! [`Mail`] keeps an in-memory copy that follows the documents (refreshed
//! after every commit that touched an outbox, never before). The engine
//! drives it and commits what it stages:
//!
//! 1. An arrival (a check-in seen in a presence document) is noted; the
//!    primary plans its mail at once, a backup after `takeover_ms`, so the
//!    primary's plan usually reaches it first (D-7). Planning writes one
//!    `Pending` state per consented contact, unless the person asked not to
//!    be disclosed ([`Mail::plan`]).
//! 2. Due states ([`Mail::due`]), ours or others' whose lease ran out, are
//!    claimed (`Sending`, with a lease) and committed *before* the driver is
//!    asked to send ([`Mail::attempt`]); consent is checked again at send
//!    time (G-7).
//! 3. The driver reports the SMTP outcome ([`Mail::outcome`]): sent,
//!    permanent failure, transient (retried with backoff) or indeterminate
//!    (the connection broke after the message: retried with the same
//!    Message-ID and counted as a duplicate risk). A send in flight when
//!    the node stopped is indeterminate after restart (G-5).
//!
//! The Message-ID is a pure function of the pair ([`message_id`]), the
//! same on every headquarters node and every retry.

use crate::api::{CommandError, MailOutcome, MailRequest, Now};
use crate::doc::encode;
use crate::ids::{DocKey, Kind};
use crate::model::{MailState, MailStatus, MAX_CONTACTS_PER_PERSON};
use crate::replica::{Replica, Txn};
use crate::store::Store;
use crate::views;
use std::collections::{BTreeMap, BTreeSet};

/// Message-ID for an (arrival, contact) pair: the same on every HQ node
/// and every retry.
pub fn message_id(person: &str, contact: &str) -> String {
    let h = blake3::hash(format!("kizuna-safety|{person}|{contact}").as_bytes());
    format!("<{}@safety.kizuna.invalid>", &h.to_hex()[..32])
}

/// A mail state that still needs a send or a decision.
fn is_open(s: &MailState) -> bool {
    matches!(
        s.status,
        MailStatus::Pending | MailStatus::Indeterminate | MailStatus::Sending
    )
}

/// Headquarters' mail settings (from `EngineConfig`).
#[derive(Clone, Debug)]
pub(crate) struct MailConfig {
    pub(crate) primary: bool,
    pub(crate) lease_ms: u64,
    pub(crate) takeover_ms: u64,
    /// Mail text per language (see [`crate::mailtext`]).
    pub(crate) templates: crate::mailtext::MailTemplates,
}

/// (person, contact)
pub(crate) type Pair = (String, String);

/// What to do for one due mail.
pub(crate) enum Attempt {
    /// Consent was withdrawn: commit the cancellation, send nothing.
    Cancel(Txn),
    /// Commit the claim, then (only if that commit succeeds) send.
    Send(Txn, MailRequest),
    /// The claim could not be written: nothing to commit.
    Skip,
}

pub(crate) struct Mail {
    cfg: MailConfig,
    /// Mail state per (person, contact), as the outbox documents say.
    states: BTreeMap<Pair, MailState>,
    /// Keys of `states` still to send or resolve (see [`is_open`]).
    open: BTreeSet<Pair>,
    /// When each arrival was first seen here (a backup waits on it).
    arrivals_seen: BTreeMap<String, u64>,
    /// Presence documents still to scan for arrivals after a restart
    /// (arrivals seen before a crash are not lost).
    arrival_scan: Vec<DocKey>,
    /// Sends whose outcome is unknown (a duplicate may reach the family).
    pub(crate) duplicate_risk: u64,
}

impl Mail {
    pub(crate) fn new(cfg: MailConfig) -> Mail {
        Mail {
            cfg,
            states: BTreeMap::new(),
            open: BTreeSet::new(),
            arrivals_seen: BTreeMap::new(),
            arrival_scan: Vec::new(),
            duplicate_risk: 0,
        }
    }

    pub(crate) fn states(&self) -> &BTreeMap<Pair, MailState> {
        &self.states
    }

    /// After a restart: reads every outbox, queues every presence document
    /// for an arrival scan, and stages sends that were in flight when the
    /// node stopped as indeterminate (G-5).
    pub(crate) fn recover<S: Store>(&mut self, r: &mut Replica<S>, now: Now) -> Txn {
        self.arrival_scan = r
            .index
            .map
            .keys()
            .filter(|k| k.kind == Kind::Presence)
            .cloned()
            .collect();
        let keys: Vec<DocKey> = r
            .index
            .map
            .keys()
            .filter(|k| k.kind == Kind::Outbox)
            .cloned()
            .collect();
        for k in &keys {
            self.refresh(r, k);
        }
        let mut txn = Txn::default();
        let mine: Vec<(Pair, MailState)> = self
            .states
            .iter()
            .filter(|(_, s)| s.status == MailStatus::Sending && s.claimed_by == r.meta.node_id)
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        for ((person, contact), mut s) in mine {
            s.status = MailStatus::Indeterminate;
            s.indeterminate += 1;
            s.next_attempt_ms = now.wall_ms;
            self.duplicate_risk += 1;
            let _ = put(r, &mut txn, &person, &contact, &s, now);
        }
        txn
    }

    /// The next presence documents to scan for arrivals (at most 500 per
    /// tick, so a restart with many documents does not stall the node).
    pub(crate) fn next_scan(&mut self) -> Vec<DocKey> {
        let n = self.arrival_scan.len().saturating_sub(500);
        self.arrival_scan.split_off(n)
    }

    /// A person checked in (seen in a presence document).
    pub(crate) fn arrived(&mut self, person: &str, now: Now) {
        if !self.arrivals_seen.contains_key(person) {
            self.arrivals_seen.insert(person.to_string(), now.wall_ms);
        }
    }

    /// Reads an outbox document's states into memory (after its commit).
    pub(crate) fn refresh<S: Store>(&mut self, r: &mut Replica<S>, key: &DocKey) {
        let Ok(Some(doc)) = r.load(key) else {
            return;
        };
        let Ok(states) = views::outbox(doc) else {
            return;
        };
        let person = key.id.clone();
        for (contact, s) in states {
            let k = (person.clone(), contact);
            if is_open(&s) {
                self.open.insert(k.clone());
            } else {
                self.open.remove(&k);
            }
            self.states.insert(k, s);
        }
    }

    /// New arrivals get one pending state per consented contact. Arrivals
    /// that already have mail (planned here or by the other headquarters)
    /// need nothing more and are forgotten, so the list stays short.
    pub(crate) fn plan<S: Store>(&mut self, r: &mut Replica<S>, now: Now) -> Txn {
        let planned: Vec<String> = self
            .arrivals_seen
            .keys()
            .filter(|p| {
                self.states
                    .range(((*p).clone(), String::new())..)
                    .next()
                    .is_some_and(|((mp, _), _)| mp == *p)
            })
            .cloned()
            .collect();
        for p in &planned {
            self.arrivals_seen.remove(p);
        }
        let ready: Vec<String> = self
            .arrivals_seen
            .iter()
            .filter(|(_, seen)| self.cfg.primary || now.wall_ms >= *seen + self.cfg.takeover_ms)
            .map(|(p, _)| p.clone())
            .take(500)
            .collect();
        let mut txn = Txn::default();
        for person in ready {
            let key = match DocKey::new(Kind::Contacts, &person) {
                Ok(k) => k,
                Err(_) => continue,
            };
            let contacts = match r.load(&key) {
                Ok(Some(d)) => views::contacts(d).unwrap_or_default(),
                _ => Default::default(),
            };
            self.arrivals_seen.remove(&person);
            if contacts.disclosure.do_not_disclose {
                continue;
            }
            for c in contacts
                .contacts
                .iter()
                .filter(|c| c.consent)
                .take(MAX_CONTACTS_PER_PERSON)
            {
                let s = MailState {
                    message_id: message_id(&person, &c.contact_id),
                    status: MailStatus::Pending,
                    attempts: 0,
                    claimed_by: r.meta.node_id.clone(),
                    lease_until_ms: now.wall_ms + self.cfg.lease_ms,
                    next_attempt_ms: now.wall_ms,
                    reason: String::new(),
                    indeterminate: 0,
                };
                let _ = put(r, &mut txn, &person, &c.contact_id, &s, now);
            }
        }
        txn
    }

    /// Sends due now (at most 50): ours, or others' whose lease expired
    /// (takeover).
    pub(crate) fn due<S: Store>(&self, r: &Replica<S>, now: Now) -> Vec<(Pair, MailState)> {
        let me = &r.meta.node_id;
        self.open
            .iter()
            .filter_map(|k| self.states.get_key_value(k))
            .filter(|(_, s)| s.next_attempt_ms <= now.wall_ms)
            .filter(|(_, s)| {
                if &s.claimed_by == me {
                    s.status != MailStatus::Sending
                } else {
                    s.lease_until_ms < now.wall_ms
                }
            })
            .map(|(k, s)| (k.clone(), s.clone()))
            .take(50)
            .collect()
    }

    /// Claims one due mail for sending (or cancels it).
    pub(crate) fn attempt<S: Store>(
        &mut self,
        r: &mut Replica<S>,
        (person, contact): Pair,
        mut s: MailState,
        now: Now,
    ) -> Attempt {
        let mut txn = Txn::default();
        let Some(req) = request(r, &self.cfg.templates, &person, &contact) else {
            s.status = MailStatus::Cancelled;
            s.reason = "consent withdrawn or do-not-disclose".into();
            let _ = put(r, &mut txn, &person, &contact, &s, now);
            return Attempt::Cancel(txn);
        };
        if s.claimed_by != r.meta.node_id && s.status == MailStatus::Sending {
            // Another HQ was sending and went quiet: outcome unknown.
            s.indeterminate += 1;
            self.duplicate_risk += 1;
        }
        s.status = MailStatus::Sending;
        #[cfg(feature = "mutants")]
        if crate::mutants::active(crate::mutants::Mutant::MailSentEarly) {
            s.status = MailStatus::Sent;
        }
        s.claimed_by = r.meta.node_id.clone();
        s.lease_until_ms = now.wall_ms + self.cfg.lease_ms;
        s.attempts += 1;
        match put(r, &mut txn, &person, &contact, &s, now) {
            Ok(()) => Attempt::Send(txn, req),
            Err(_) => Attempt::Skip,
        }
    }

    /// The driver's SMTP outcome for a mail; stages the new state (which
    /// must reach the other headquarters node, or it would take the send
    /// over when the lease runs out). `None` for an unknown Message-ID.
    pub(crate) fn outcome<S: Store>(
        &mut self,
        r: &mut Replica<S>,
        message_id: &str,
        outcome: MailOutcome,
        now: Now,
    ) -> Option<Txn> {
        let ((person, contact), mut s) = self
            .states
            .iter()
            .find(|(_, s)| s.message_id == message_id)
            .map(|(k, s)| (k.clone(), s.clone()))?;
        match outcome {
            MailOutcome::Sent => s.status = MailStatus::Sent,
            MailOutcome::Permanent(why) => {
                s.status = MailStatus::FailedPermanent;
                s.reason = why.chars().take(200).collect();
            }
            MailOutcome::Transient(why) => {
                s.status = MailStatus::Pending;
                s.reason = why.chars().take(200).collect();
                s.next_attempt_ms = now.wall_ms + (30_000u64 << s.attempts.min(7)).min(3_600_000);
            }
            MailOutcome::Indeterminate(why) => {
                s.status = MailStatus::Indeterminate;
                s.indeterminate += 1;
                self.duplicate_risk += 1;
                s.reason = why.chars().take(200).collect();
                s.next_attempt_ms = now.wall_ms + 30_000;
            }
        }
        let mut txn = Txn::default();
        put(r, &mut txn, &person, &contact, &s, now)
            .ok()
            .map(|()| txn)
    }
}

/// Stages a mail state in the person's outbox document. `Mail` follows the
/// document once the write is committed (the engine refreshes it), never
/// before.
fn put<S: Store>(
    r: &mut Replica<S>,
    txn: &mut Txn,
    person: &str,
    contact: &str,
    s: &MailState,
    now: Now,
) -> Result<(), CommandError> {
    let key =
        DocKey::new(Kind::Outbox, person).map_err(|e| CommandError::Rejected(e.to_string()))?;
    r.write(
        txn,
        &key,
        vec![(format!("{}{contact}", views::MAIL_PREFIX), Some(encode(s)))],
        now,
    )
}

/// Builds the mail, re-checking consent at send time (G-7).
fn request<S: Store>(
    r: &mut Replica<S>,
    templates: &crate::mailtext::MailTemplates,
    person: &str,
    contact_id: &str,
) -> Option<MailRequest> {
    let key = DocKey::new(Kind::Contacts, person).ok()?;
    let view = views::contacts(r.load(&key).ok()??).ok()?;
    if view.disclosure.do_not_disclose {
        return None;
    }
    let c = view
        .contacts
        .iter()
        .find(|c| c.contact_id == contact_id && c.consent)?;
    let p = r.store.person(person).ok()??;
    let loc = r.store.location(person).ok()?;
    let shelter = if view.disclosure.share_shelter {
        loc.as_ref()
            .and_then(|l| {
                r.store
                    .shelters()
                    .ok()?
                    .into_iter()
                    .find(|s| s.shelter_id == l.shelter_id)
            })
            .map(|s| s.name)
    } else {
        None
    };
    let when = loc.map(|l| l.since_ms).unwrap_or(0);
    let (subject, body) = templates
        .for_language(&c.language)
        .render(&crate::mailtext::MailFacts {
            name: &p.name,
            contact: &c.name,
            arrived_ms: when,
            shelter: shelter.as_deref(),
        });
    Some(MailRequest {
        message_id: message_id(person, contact_id),
        to: c.email.clone(),
        subject,
        body,
        person_id: person.to_string(),
        contact_id: contact_id.to_string(),
    })
}
