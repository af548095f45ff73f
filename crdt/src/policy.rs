//! Authorization: which role may write, receive (and so relay) and read
//! which document, decided by the document key alone.
//!
//! Authentication happens at the edge (mutual TLS in `node`); everything
//! here is pure so the simulator exercises every decision. Sessions call
//! [`may_send`] before a document or change leaves the node, and check
//! [`may_hold`] and [`may_author`] on every change that arrives, at every
//! hop; commands call [`may_write`] and [`may_read`].
//!
//! Decision on sealed relay (architecture brief, "Relays"): medical
//! documents never travel through roles that may not receive them, not even
//! encrypted. A node stores and forwards exactly the kinds it may receive.
//! Medical data therefore reaches headquarters from an ambulance only over
//! a path of ambulance, clinic or hq nodes; the brief's example path
//! ambulance → shelter → hq carries presence, registry and person documents.

use crate::ids::{DocKey, Kind, NodeId, Role};

/// What an operator on a node of this role may see through the API.
/// Reading a medical document is additionally audited by the engine.
pub fn may_read(role: Role, kind: Kind) -> bool {
    match kind {
        // Audit and outbox are read by headquarters; every node may read
        // its own audit through the same check in `may_hold`.
        Kind::Audit | Kind::Outbox | Kind::Contacts => role == Role::Hq,
        _ => kind_received_by(kind, role),
    }
}

/// May a node with this role and id author a change to this document?
pub fn may_write(role: Role, node: &NodeId, key: &DocKey) -> bool {
    may_author(role, key, |id| id == node.as_str())
}

/// The rule behind [`may_write`], with the question "is the document id
/// this author's own node id?" left to the caller. Remote changes carry only
/// a hash of the author's node id in their actor (see [`crate::actor`]).
pub fn may_author(role: Role, key: &DocKey, is_own_id: impl Fn(&str) -> bool) -> bool {
    match key.kind {
        Kind::Registry | Kind::Eligibility | Kind::Contacts | Kind::Outbox => role == Role::Hq,
        Kind::Person => matches!(role, Role::Shelter | Role::Clinic | Role::Hq),
        Kind::Presence => matches!(role, Role::Shelter | Role::Hq),
        // Ambulance crews update profiles on the road (Ichikawa); see D-2.
        Kind::Medical => matches!(role, Role::Clinic | Role::Hq | Role::Ambulance),
        Kind::Shelter => role == Role::Hq || (role == Role::Shelter && is_own_id(&key.id)),
        Kind::Audit => is_own_id(&key.id),
    }
}

fn kind_received_by(kind: Kind, role: Role) -> bool {
    use Role::*;
    match kind {
        Kind::Registry | Kind::Person | Kind::Shelter => true,
        Kind::Presence => matches!(role, Shelter | Facility | Hq),
        Kind::Medical => matches!(role, Ambulance | Clinic | Hq),
        Kind::Eligibility => matches!(role, Clinic | Hq),
        Kind::Contacts | Kind::Outbox | Kind::Audit => role == Hq,
    }
}

/// May this document be sent to (and stored and relayed by) a node of this
/// role? This is checked on every document and change before sending.
pub fn may_receive(role: Role, key: &DocKey) -> bool {
    kind_received_by(key.kind, role)
}

/// May a node hold this document at all: received from peers, or written
/// by itself (its own audit chain).
pub fn may_hold(role: Role, node: &NodeId, key: &DocKey) -> bool {
    may_receive(role, key) || (key.kind == Kind::Audit && key.id == node.as_str())
}

/// May this document be sent to a peer of this role and id? The one check
/// every outgoing document and change passes (gossip, catch-up streams,
/// reconciliation offers); the same rule as [`may_hold`] for the peer.
pub fn may_send(role: Role, node: &NodeId, key: &DocKey) -> bool {
    #[cfg(feature = "mutants")]
    if crate::mutants::active(crate::mutants::Mutant::MedicalToShelter)
        && key.kind == Kind::Medical
        && role == Role::Shelter
    {
        return true;
    }
    may_hold(role, node, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole table, written out by hand: role x kind -> (read, write, relay).
    /// `write` is for a document that is not per-node (ids differ from the node).
    #[test]
    fn exhaustive_role_kind_table() {
        use Kind::*;
        // (kind, [shelter, clinic, ambulance, facility, hq]) as "rwx" strings,
        // r = read through the API, w = write, x = receive and relay.
        let table: [(Kind, [&str; 5]); 9] = [
            (Registry, ["r-x", "r-x", "r-x", "r-x", "rwx"]),
            (Person, ["rwx", "rwx", "r-x", "r-x", "rwx"]),
            (Presence, ["rwx", "---", "---", "r-x", "rwx"]),
            (Medical, ["---", "rwx", "rwx", "---", "rwx"]),
            (Eligibility, ["---", "r-x", "---", "---", "rwx"]),
            (Contacts, ["---", "---", "---", "---", "rwx"]),
            (Shelter, ["r-x", "r-x", "r-x", "r-x", "rwx"]),
            (Audit, ["---", "---", "---", "---", "r-x"]),
            (Outbox, ["---", "---", "---", "---", "rwx"]),
        ];
        let node = NodeId::new("some-node").unwrap();
        let mut checked = 0;
        for (kind, row) in table {
            let key = DocKey::new(kind, "other-doc").unwrap();
            for (role, expect) in Role::ALL.into_iter().zip(row) {
                let got = format!(
                    "{}{}{}",
                    if may_read(role, kind) { 'r' } else { '-' },
                    if may_write(role, &node, &key) {
                        'w'
                    } else {
                        '-'
                    },
                    if may_receive(role, &key) { 'x' } else { '-' },
                );
                assert_eq!(got, expect, "role {role} kind {kind}");
                checked += 1;
            }
        }
        assert_eq!(checked, Role::ALL.len() * Kind::ALL.len());
    }

    #[test]
    fn per_node_documents() {
        let me = NodeId::new("shelter-7").unwrap();
        let mine = DocKey::new(Kind::Shelter, "shelter-7").unwrap();
        let other = DocKey::new(Kind::Shelter, "shelter-8").unwrap();
        assert!(may_write(Role::Shelter, &me, &mine));
        assert!(!may_write(Role::Shelter, &me, &other));
        let audit_mine = DocKey::new(Kind::Audit, "shelter-7").unwrap();
        let audit_other = DocKey::new(Kind::Audit, "shelter-8").unwrap();
        for role in Role::ALL {
            assert!(may_write(role, &me, &audit_mine));
            assert!(!may_write(role, &me, &audit_other));
            assert!(may_hold(role, &me, &audit_mine));
            assert_eq!(may_hold(role, &me, &audit_other), role == Role::Hq);
        }
    }
}
