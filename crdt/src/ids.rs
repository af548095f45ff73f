//! Identifiers shared by every layer: node ids, roles, document kinds and keys.
//!
//! A node's role comes from its certificate (see the `certs` crate); the core
//! only ever sees the parsed [`Role`]. Documents are addressed by
//! [`DocKey`] = (kind, id), and that pair alone decides policy.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Maximum length of any identifier (node id, document id, event id).
pub const MAX_ID_LEN: usize = 64;

/// Error for identifiers that are empty, too long, contain characters
/// outside `[A-Za-z0-9._-]` or hold an Individual Number. `value` is a
/// prefix of the rejected id, or `<redacted>` when it holds an Individual
/// Number (never kept, shown or logged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {reason}")]
pub struct IdError {
    pub what: &'static str,
    pub value: String,
    pub reason: &'static str,
}

/// The reason [`check_id_str`] gives for an id holding an Individual
/// Number (see [`crate::text::contains_individual_number`]).
pub const INDIVIDUAL_NUMBER_REASON: &str = "rejected: individual-number-shaped input";

/// The rule for every identifier (node, document, person, household,
/// shelter, contact, event and operation ids), returning the reason it
/// fails. An Individual Number is looked for first, in any disguise, so
/// no other reason ever describes (or leads a caller to echo) one.
pub fn check_id_str(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    if crate::text::contains_individual_number(s) {
        return Err(INDIVIDUAL_NUMBER_REASON);
    }
    if s.len() > MAX_ID_LEN {
        return Err("longer than 64 bytes");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err("only A-Z, a-z, 0-9, '.', '-' and '_' are allowed");
    }
    if s.starts_with('.') {
        return Err("must not start with '.'");
    }
    Ok(())
}

fn check_id(what: &'static str, s: &str) -> Result<(), IdError> {
    check_id_str(s).map_err(|reason| IdError {
        what,
        value: if reason == INDIVIDUAL_NUMBER_REASON {
            "<redacted>".to_string()
        } else {
            s.chars().take(MAX_ID_LEN).collect()
        },
        reason,
    })
}

/// A node's identity as written in its certificate (e.g. `shelter-12`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl NodeId {
    pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        check_id("node id", &s)?;
        Ok(NodeId(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for NodeId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        NodeId::new(s)
    }
}
impl From<NodeId> for String {
    fn from(n: NodeId) -> String {
        n.0
    }
}
impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.0)
    }
}

/// The five roles a node certificate can carry.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Shelter,
    Clinic,
    Ambulance,
    Facility,
    Hq,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Shelter,
        Role::Clinic,
        Role::Ambulance,
        Role::Facility,
        Role::Hq,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Shelter => "shelter",
            Role::Clinic => "clinic",
            Role::Ambulance => "ambulance",
            Role::Facility => "facility",
            Role::Hq => "hq",
        }
    }
    pub fn code(self) -> u8 {
        match self {
            Role::Shelter => 1,
            Role::Clinic => 2,
            Role::Ambulance => 3,
            Role::Facility => 4,
            Role::Hq => 5,
        }
    }
    pub fn from_code(c: u8) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.code() == c)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown role {s:?} (expected one of shelter, clinic, ambulance, facility, hq)"
                )
            })
    }
}

/// The kinds of document. The order here is the sync priority order:
/// life-critical kinds first, bulk kinds last.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Presence,
    Medical,
    Shelter,
    Person,
    Contacts,
    Outbox,
    Audit,
    Eligibility,
    Registry,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Presence,
        Kind::Medical,
        Kind::Shelter,
        Kind::Person,
        Kind::Contacts,
        Kind::Outbox,
        Kind::Audit,
        Kind::Eligibility,
        Kind::Registry,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Presence => "presence",
            Kind::Medical => "medical",
            Kind::Shelter => "shelter",
            Kind::Person => "person",
            Kind::Contacts => "contacts",
            Kind::Outbox => "outbox",
            Kind::Audit => "audit",
            Kind::Eligibility => "eligibility",
            Kind::Registry => "registry",
        }
    }
    /// Lower sends first.
    pub fn priority(self) -> u8 {
        self as u8
    }
    pub fn code(self) -> u8 {
        self as u8
    }
    pub fn from_code(c: u8) -> Option<Kind> {
        Kind::ALL.get(c as usize).copied()
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Kind, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown document kind {s:?}"))
    }
}

/// A document's address: its kind and id. Ordered by kind first so range
/// reconciliation and priority scans walk kinds in priority order, then by
/// the id's bytes.
#[derive(Clone, Hash, Serialize, Deserialize)]
pub struct DocKey {
    pub kind: Kind,
    pub id: String,
}

/// `a.cmp(b)` for byte strings, inlined: ids are short (at most
/// [`MAX_ID_LEN`] bytes), and keys are compared in every index lookup, where
/// a library `memcmp` call per comparison costs more than the comparison.
#[inline]
fn cmp_bytes(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let n = a.len().min(b.len());
    let (mut x, mut y) = (&a[..n], &b[..n]);
    while x.len() >= 8 {
        let (p, q) = (x.split_at(8), y.split_at(8));
        let u = u64::from_be_bytes(p.0.try_into().expect("8 bytes"));
        let v = u64::from_be_bytes(q.0.try_into().expect("8 bytes"));
        if u != v {
            return u.cmp(&v);
        }
        (x, y) = (p.1, q.1);
    }
    for (u, v) in x.iter().zip(y) {
        if u != v {
            return u.cmp(v);
        }
    }
    a.len().cmp(&b.len())
}

impl PartialEq for DocKey {
    #[inline]
    fn eq(&self, o: &Self) -> bool {
        self.kind == o.kind
            && self.id.len() == o.id.len()
            && cmp_bytes(self.id.as_bytes(), o.id.as_bytes()).is_eq()
    }
}
impl Eq for DocKey {}
impl PartialOrd for DocKey {
    #[inline]
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for DocKey {
    #[inline]
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.kind
            .cmp(&o.kind)
            .then_with(|| cmp_bytes(self.id.as_bytes(), o.id.as_bytes()))
    }
}

impl DocKey {
    pub fn new(kind: Kind, id: impl Into<String>) -> Result<Self, IdError> {
        let id = id.into();
        check_id("document id", &id)?;
        Ok(DocKey { kind, id })
    }
    /// Stable byte encoding used for hashing and range bounds.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(1 + self.id.len());
        v.push(self.kind.code());
        v.extend_from_slice(self.id.as_bytes());
        v
    }
}

impl fmt::Display for DocKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.id)
    }
}
impl fmt::Debug for DocKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.id)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_guarded_without_echo() {
        let n = (0..10)
            .map(|d| format!("98765432109{d}"))
            .find(|s| crate::text::contains_individual_number(s))
            .unwrap();
        let e = DocKey::new(crate::Kind::Person, format!("p-{n}")).unwrap_err();
        assert!(!e.to_string().contains(&n), "{e}");
        let e = NodeId::new(format!("{}-{}", &n[..6], &n[6..])).unwrap_err();
        assert!(!e.to_string().contains(&n[6..]), "{e}");
        assert_eq!(
            check_id_str(&format!("{}.{}", &n[..6], &n[6..])),
            Err(INDIVIDUAL_NUMBER_REASON)
        );
    }

    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The inlined comparison is exactly the byte order, and keys order
        /// by (kind, id) as a derived `Ord` would.
        #[test]
        fn key_order_is_kind_then_id_bytes(
            a in proptest::collection::vec(any::<u8>(), 0..80),
            b in proptest::collection::vec(any::<u8>(), 0..80),
            shared in proptest::collection::vec(any::<u8>(), 0..20),
            ka in 0u8..9, kb in 0u8..9,
        ) {
            let a = [shared.clone(), a].concat();
            let b = [shared, b].concat();
            prop_assert_eq!(cmp_bytes(&a, &b), a.cmp(&b));
            prop_assert_eq!(cmp_bytes(&a, &a), std::cmp::Ordering::Equal);
            let id = |v: &[u8]| v.iter().map(|c| char::from(b'a' + c % 26)).collect::<String>();
            let x = DocKey { kind: Kind::from_code(ka).unwrap(), id: id(&a) };
            let y = DocKey { kind: Kind::from_code(kb).unwrap(), id: id(&b) };
            prop_assert_eq!(x.cmp(&y), (x.kind, &x.id).cmp(&(y.kind, &y.id)));
            prop_assert_eq!(x == y, (x.kind, &x.id) == (y.kind, &y.id));
        }
    }

    #[test]
    fn ids_reject_bad_input() {
        assert!(NodeId::new("shelter-1").is_ok());
        for bad in [
            "",
            "../etc/passwd",
            "a b",
            "'; DROP TABLE",
            "%",
            &"x".repeat(65),
            ".hidden",
        ] {
            assert!(NodeId::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn role_and_kind_codes_round_trip() {
        for r in Role::ALL {
            assert_eq!(Role::from_code(r.code()), Some(r));
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        for k in Kind::ALL {
            assert_eq!(Kind::from_code(k.code()), Some(k));
            assert_eq!(k.as_str().parse::<Kind>().unwrap(), k);
        }
        assert!("admin".parse::<Role>().is_err());
    }
}
