//! Invariant checkers, kept apart from the workloads that exercise them
//! (TigerBeetle's state checker, sled's model comparison). Each takes plain
//! data the simulator collected and returns violations by name, so unit
//! tests can feed them hand-made bad states.

use crdt::api::{MailRequest, Reply};
use crdt::model::{AuditEntry, PresenceAction, PresenceEvent};
use crdt::store::{LocationRow, LocationStatus, Projection};
use crdt::wire::Frame;
use crdt::{DocKey, NodeId, Role};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

pub const ACKED_WRITE_LOST: &str = "acked_write_lost";
pub const CONVERGED: &str = "converged";
pub const APPLIED_TWICE: &str = "applied_twice";
pub const CONFLICT_DROPPED: &str = "conflict_dropped";
pub const ROLE_LEAK: &str = "role_leak";
pub const AUDIT_MISSING: &str = "audit_missing";
pub const MAIL_NOT_CONSENTED: &str = "mail_not_consented";
pub const MAIL_DUPLICATE: &str = "mail_duplicate";
pub const MAIL_MISSING: &str = "mail_missing";
pub const MAIL_MESSAGE_ID: &str = "mail_message_id_changed";
pub const INDIVIDUAL_NUMBER_LEAK: &str = "individual_number_leak";
pub const RECEIVED_CHANGE_LOST: &str = "received_change_lost";
pub const REBUILT_DIFFERS: &str = "rebuilt_differs";
pub const PEER_VIOLATION: &str = "honest_peer_violation";
pub const UNVERIFIED_APPLIED: &str = "unverifiable_change_applied";
pub const HOSTILE_NOT_REFUSED: &str = "hostile_change_not_refused";

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub name: &'static str,
    pub at_ms: u64,
    pub detail: String,
}

pub fn v(name: &'static str, at_ms: u64, detail: impl Into<String>) -> Violation {
    Violation {
        name,
        at_ms,
        detail: detail.into(),
    }
}

/// Every acknowledged presence event must still be in the node's store.
pub fn acked_writes(
    node: &str,
    acked: &BTreeSet<String>,
    present: &BTreeSet<String>,
    at_ms: u64,
) -> Vec<Violation> {
    acked
        .difference(present)
        .map(|e| {
            v(
                ACKED_WRITE_LOST,
                at_ms,
                format!("{node}: acknowledged presence event {e} is gone"),
            )
        })
        .collect()
}

/// No operation may be counted twice: distinct events of one document
/// never share an op id, and replaying an op id returns the first reply.
pub fn applied_twice(doc: &str, events: &[PresenceEvent], at_ms: u64) -> Vec<Violation> {
    let mut ops: BTreeMap<(&str, &str), &str> = BTreeMap::new();
    let mut out = Vec::new();
    for e in events {
        if let Some(first) = ops.insert((&e.op_id, &e.person_id), &e.event_id) {
            if first != e.event_id {
                out.push(v(
                    APPLIED_TWICE,
                    at_ms,
                    format!(
                        "{doc}: op {} applied as {first} and {}",
                        e.op_id, e.event_id
                    ),
                ));
            }
        }
    }
    out
}

pub fn replay_reply(op_id: &str, first: &Reply, again: &Reply, at_ms: u64) -> Option<Violation> {
    (first != again).then(|| {
        v(
            APPLIED_TWICE,
            at_ms,
            format!("op {op_id} replayed with a different reply: {first:?} then {again:?}"),
        )
    })
}

/// Recomputes, independently of `crdt::derive`, which persons have
/// concurrent disagreeing latest events, and demands the location rows
/// say `conflict: true` for each of them.
pub fn conflicts(
    doc: &str,
    events: &[PresenceEvent],
    rows: &BTreeMap<String, LocationRow>,
    at_ms: u64,
) -> Vec<Violation> {
    let mut by_person: BTreeMap<&str, Vec<&PresenceEvent>> = BTreeMap::new();
    for e in events {
        by_person.entry(&e.person_id).or_default().push(e);
    }
    let mut out = Vec::new();
    for (person, evs) in by_person {
        let referenced: BTreeSet<&str> = evs
            .iter()
            .flat_map(|e| e.prev.iter().map(String::as_str))
            .collect();
        let places: BTreeSet<(bool, &str)> = evs
            .iter()
            .filter(|e| !referenced.contains(e.event_id.as_str()))
            .map(|e| (e.action == PresenceAction::CheckIn, e.shelter_id.as_str()))
            .collect();
        if places.len() > 1 {
            match rows.get(person) {
                Some(r) if r.conflict => {}
                r => out.push(v(
                    CONFLICT_DROPPED,
                    at_ms,
                    format!(
                        "{doc}: person {person} has {} disagreeing concurrent events but the location view shows {:?}",
                        places.len(),
                        r.map(|r| (r.status, r.shelter_id.as_str(), r.conflict))
                    ),
                )),
            }
        }
    }
    out
}

/// A receiver that took a `Changes` frame without objecting (no peer
/// violation, session still open) must have stored every change of it,
/// including changes that arrived before their dependencies (C-8: queued,
/// never dropped): the sender resumes after the frame's cursor and never
/// offers them again, and a stray copy may have been the only one.
/// `stored` answers whether a change hash is in the receiver's store;
/// `parse` is `crdt::doc::parse_change` (or a memo of it).
pub fn received_changes(
    to: &str,
    frame: &Frame,
    stored: impl Fn(&DocKey, &[u8; 32]) -> bool,
    parse: impl Fn(&[u8]) -> Result<std::sync::Arc<automerge::Change>, crdt::doc::DocError>,
    at_ms: u64,
) -> Vec<Violation> {
    let Frame::Changes { docs, .. } = frame else {
        return vec![];
    };
    let mut out = vec![];
    for d in docs {
        for b in &d.changes {
            let Ok(c) = parse(b) else {
                continue;
            };
            let h = c.hash().0;
            if !stored(&d.key, &h) {
                out.push(v(
                    RECEIVED_CHANGE_LOST,
                    at_ms,
                    format!(
                        "{to}: {} change {} received without objection but not stored",
                        d.key,
                        h[..4]
                            .iter()
                            .map(|x| format!("{x:02x}"))
                            .collect::<String>()
                    ),
                ));
            }
        }
    }
    out
}

/// The credentials the checker trusts, by author (node) hash: every
/// simulated node's test credential, and the identities revoked for the
/// whole run. Built from the world's node list, not from any engine's
/// directory, so a node that admitted a bad credential cannot vouch for it.
#[derive(Clone, Debug, Default)]
pub struct KnownAuthors {
    pub by_hash: BTreeMap<[u8; 8], (NodeId, Role, [u8; 32])>,
    pub revoked: BTreeSet<NodeId>,
}

impl KnownAuthors {
    pub fn add(&mut self, node: &NodeId, role: Role) {
        let key = crdt::signing::public_key(&crdt::testkit::testca::seed(node));
        self.by_hash.insert(
            crdt::actor::node_hash(node.as_str()),
            (node.clone(), role, key),
        );
    }
}

/// Why a change stored at an honest node could not have been verified
/// (`None` when it is a valid write): it must carry a seal naming its
/// actor's author, whose credential is known, gives the actor's role, lets
/// that role write the document, is not revoked, and whose key made the
/// signature over the change hash.
pub fn unverifiable(
    known: &KnownAuthors,
    key: &DocKey,
    hash: &[u8; 32],
    bytes: &[u8],
    seal: Option<&crdt::signing::Seal>,
) -> Option<String> {
    let Some(seal) = seal else {
        return Some("stored without a seal".into());
    };
    let Ok(c) = crdt::doc::parse_change(bytes) else {
        return Some("does not parse".into());
    };
    if c.hash().0 != *hash {
        return Some("stored under another hash".into());
    }
    let Some(actor) = crdt::actor::Actor::from_bytes(&c.actor_id().to_bytes()) else {
        return Some("not a Kizuna actor".into());
    };
    if seal.author != actor.node_hash {
        return Some("its seal names another author".into());
    }
    let Some((node, role, pk)) = known.by_hash.get(&actor.node_hash) else {
        return Some("by an author with no credential".into());
    };
    if *role != actor.role {
        return Some(format!("claims role {} but {node} is {role}", actor.role));
    }
    if !crdt::policy::may_author(*role, key, |id| id == node.as_str()) {
        return Some(format!("{node} ({role}) may not write it"));
    }
    if known.revoked.contains(node) {
        return Some(format!("by {node}, which is revoked"));
    }
    if !crdt::signing::verify(pk, hash, &seal.sig) {
        return Some(format!("its signature is not {node}'s"));
    }
    None
}

/// No document kind may reach a node whose role may not hold it.
/// Announcements (`IHave`) and requests (`Graft`) name documents too.
pub fn role_leak(to: &NodeId, role: Role, frame: &Frame, at_ms: u64) -> Vec<Violation> {
    let keys: Vec<&DocKey> = match frame {
        Frame::Changes { docs, .. } => docs.iter().map(|d| &d.key).collect(),
        Frame::IHave { docs, .. } => docs.iter().map(|d| &d.key).collect(),
        Frame::Graft { docs } => docs.iter().map(|d| &d.key).collect(),
        _ => return vec![],
    };
    keys.into_iter()
        .filter(|k| !crdt::policy::may_hold(role, to, k))
        .map(|k| v(ROLE_LEAK, at_ms, format!("{k} sent to {to} ({role})")))
        .collect()
}

/// Runs of exactly twelve ASCII digits, bounded by non-alphanumeric bytes
/// (so hex hashes and 13-digit card ids do not count), that pass the
/// Individual Number check digit.
pub fn individual_numbers(bytes: &[u8]) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            let before_ok = start == 0 || !bytes[start - 1].is_ascii_alphanumeric();
            let after_ok = i == bytes.len() || !bytes[i].is_ascii_alphanumeric();
            if i - start == 12 && before_ok && after_ok {
                let s = std::str::from_utf8(&bytes[start..i]).expect("ascii digits");
                if crdt::text::is_individual_number(s) {
                    n += 1;
                }
            }
        } else {
            i += 1;
        }
    }
    n
}

/// Individual Numbers in text as people write them: ASCII or full-width
/// digits, optionally grouped by single spaces or hyphens, twelve digits
/// in all, passing the check digit, and bounded like
/// [`individual_numbers`] (not inside a longer run of letters or digits,
/// so hex hashes and 13-digit ids do not count).
pub fn text_individual_numbers(text: &str) -> usize {
    let chars: Vec<char> = text
        .chars()
        .map(|c| match c {
            '０'..='９' => char::from(b'0' + (c as u32 - '０' as u32) as u8),
            '－' | 'ー' | '‐' | '−' => '-',
            '　' => ' ',
            c => c,
        })
        .collect();
    let mut n = 0;
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        let mut digits = String::new();
        loop {
            while i < chars.len() && chars[i].is_ascii_digit() {
                digits.push(chars[i]);
                i += 1;
            }
            let sep = i + 1 < chars.len()
                && matches!(chars[i], ' ' | '-')
                && chars[i + 1].is_ascii_digit();
            if !sep {
                break;
            }
            i += 1;
        }
        let before_ok = start == 0 || !chars[start - 1].is_alphanumeric();
        let after_ok = i == chars.len() || !chars[i].is_alphanumeric();
        if before_ok && after_ok && digits.len() == 12 && crdt::text::is_individual_number(&digits)
        {
            n += 1;
        }
    }
    n
}

/// Individual Numbers in the text of a stored document, decoded (so
/// compressed columns and full-width or hyphenated forms are seen too):
/// every field name, value and conflicting value.
pub fn doc_individual_numbers(doc: &crdt::doc::Doc) -> usize {
    doc.fields()
        .into_iter()
        .map(|(name, f)| {
            std::iter::once(&name)
                .chain(std::iter::once(&f.value))
                .chain(f.conflicts.iter())
                .filter(|t| text_individual_numbers(t) > 0)
                .count()
        })
        .sum()
}

/// A document rebuilt from nothing but a node's stored changes must have
/// the heads the engine reports for it and derive exactly the query rows
/// the node stored; otherwise the node's own bookkeeping (index,
/// incremental fingerprints, projection writes) has drifted from its data.
pub fn rebuilt(
    node: &str,
    key: &DocKey,
    rebuilt_heads: &[[u8; 32]],
    engine_heads: Option<&[[u8; 32]]>,
    rebuilt_rows: Option<&Projection>,
    stored_rows: Option<&Projection>,
    at_ms: u64,
) -> Option<Violation> {
    let mut a = rebuilt_heads.to_vec();
    a.sort_unstable();
    let mut b = engine_heads.map(<[_]>::to_vec).unwrap_or_default();
    b.sort_unstable();
    if a != b {
        return Some(v(
            REBUILT_DIFFERS,
            at_ms,
            format!(
                "{node}: {key} rebuilt from stored changes has other heads than the engine reports"
            ),
        ));
    }
    let empty = Projection::default();
    if rebuilt_rows.unwrap_or(&empty) != stored_rows.unwrap_or(&empty) {
        return Some(v(
            REBUILT_DIFFERS,
            at_ms,
            format!(
                "{node}: {key} rebuilt from stored changes derives other rows than the node stored"
            ),
        ));
    }
    None
}

/// Every successful medical read has exactly one audit entry at the
/// reading node.
pub fn audit(node: &str, reads: &[u64], entries: &[AuditEntry], at_ms: u64) -> Vec<Violation> {
    let mut count: BTreeMap<u64, usize> = BTreeMap::new();
    for e in entries.iter().filter(|e| e.action == "medical_read") {
        *count.entry(e.seq).or_default() += 1;
    }
    reads
        .iter()
        .filter(|s| count.get(s).copied() != Some(1))
        .map(|s| {
            v(
                AUDIT_MISSING,
                at_ms,
                format!(
                    "{node}: medical read with audit seq {s} has {} audit entries",
                    count.get(s).copied().unwrap_or(0)
                ),
            )
        })
        .collect()
}

/// One replica of one document: who holds it, its heads and what it derives.
pub struct Replica<'a> {
    pub node: &'a str,
    pub heads: Option<&'a [[u8; 32]]>,
    pub projection: Option<&'a Projection>,
}

/// All replicas of a document within one connected group must agree.
pub fn converged(key: &DocKey, replicas: &[Replica<'_>], at_ms: u64) -> Option<Violation> {
    let first = replicas.first()?;
    for r in &replicas[1..] {
        if r.heads != first.heads {
            return Some(v(
                CONVERGED,
                at_ms,
                format!("{key}: heads differ between {} and {}", first.node, r.node),
            ));
        }
        if r.projection != first.projection {
            return Some(v(
                CONVERGED,
                at_ms,
                format!(
                    "{key}: derived state differs between {} and {}",
                    first.node, r.node
                ),
            ));
        }
    }
    None
}

/// What the family-mail ledger knows about one (person, contact).
#[derive(Clone, Debug, Default)]
pub struct MailPair {
    pub message_ids: BTreeSet<String>,
    /// Messages the SMTP server accepted.
    pub accepted: u32,
    /// Attempts whose outcome the sender could not know (indeterminate,
    /// sender crashed in flight, or another HQ took the claim over).
    pub unknown_outcomes: u32,
    pub permanent_failure: bool,
    pub in_flight: u32,
}

/// The SMTP side of the simulation: every mail the server saw.
#[derive(Clone, Debug, Default)]
pub struct MailLedger {
    pub pairs: BTreeMap<(String, String), MailPair>,
    pub duplicates: u64,
}

impl MailLedger {
    /// A SendMail output: consent is checked against the simulator's truth.
    pub fn on_send(&mut self, req: &MailRequest, consented: bool, at_ms: u64) -> Vec<Violation> {
        let mut out = Vec::new();
        if !consented {
            out.push(v(
                MAIL_NOT_CONSENTED,
                at_ms,
                format!(
                    "mail {} for person {} to contact {} without consent",
                    req.message_id, req.person_id, req.contact_id
                ),
            ));
        }
        if crdt::text::contains_individual_number(&req.body)
            || crdt::text::contains_individual_number(&req.subject)
        {
            out.push(v(
                INDIVIDUAL_NUMBER_LEAK,
                at_ms,
                format!("mail {} carries an Individual Number", req.message_id),
            ));
        }
        let p = self
            .pairs
            .entry((req.person_id.clone(), req.contact_id.clone()))
            .or_default();
        p.message_ids.insert(req.message_id.clone());
        if p.message_ids.len() > 1 {
            out.push(v(
                MAIL_MESSAGE_ID,
                at_ms,
                format!(
                    "person {} contact {}: resend with a new message id",
                    req.person_id, req.contact_id
                ),
            ));
        }
        p.in_flight += 1;
        out
    }

    /// The server accepted a message (whether or not the sender heard).
    pub fn on_accept(&mut self, person: &str, contact: &str, at_ms: u64) -> Vec<Violation> {
        let p = self
            .pairs
            .entry((person.to_string(), contact.to_string()))
            .or_default();
        p.accepted += 1;
        if p.accepted > 1 {
            self.duplicates += 1;
            if p.unknown_outcomes == 0 {
                return vec![v(
                    MAIL_DUPLICATE,
                    at_ms,
                    format!("person {person} contact {contact}: mailed twice with no unknown outcome before"),
                )];
            }
        }
        vec![]
    }

    pub fn on_unknown(&mut self, person: &str, contact: &str) {
        self.pairs
            .entry((person.to_string(), contact.to_string()))
            .or_default()
            .unknown_outcomes += 1;
    }

    pub fn on_permanent(&mut self, person: &str, contact: &str) {
        self.pairs
            .entry((person.to_string(), contact.to_string()))
            .or_default()
            .permanent_failure = true;
    }

    /// At the end: every consented contact of every arrival headquarters
    /// knows about was mailed (or failed permanently).
    pub fn missing(&self, expected: &BTreeSet<(String, String)>, at_ms: u64) -> Vec<Violation> {
        expected
            .iter()
            .filter(|k| {
                self.pairs
                    .get(*k)
                    .is_none_or(|p| p.accepted == 0 && !p.permanent_failure)
            })
            .map(|(p, c)| {
                v(
                    MAIL_MISSING,
                    at_ms,
                    format!("person {p} arrived but consented contact {c} was never mailed"),
                )
            })
            .collect()
    }
}

pub fn location_in(r: &LocationRow) -> bool {
    r.status == LocationStatus::In
}
