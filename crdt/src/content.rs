//! Content checks on received changes: what a change says, beyond who
//! signed it. Run at every hop on every new change, after its seal is
//! verified ([`crate::signing::Directory::check`]) and before it is applied;
//! a change that fails is handled exactly like an unverifiable one
//! (quarantined with its document's batch, counted in
//! `changes_unverified`, never applied or relayed, the sender cut off).
//!
//! - **Presence**: every event a change writes names its author's own
//!   shelter (`shelter_id`), unless the author is headquarters (a
//!   correction). A shelter node's shelter is its node id: the only
//!   identity the CA certifies besides the role (a certificate binds node
//!   id, role and key, not a shelter), and the same rule
//!   [`crate::policy::may_author`] applies to shelter documents. So a
//!   receiver needs nothing but the author's verified credential, which
//!   travels with the change; `node` refuses a configured `shelter_id`
//!   that differs from a shelter node's id, whose check-ins every peer
//!   would refuse.
//! - **Audit**: append-only. A change may only add entries: every
//!   operation a put of a value at the top level, under a field the
//!   document does not hold and the author did not see written before (no
//!   predecessor). Deletions, overwrites and nested objects are refused.
//!
//! Operations are read from the change itself ([`automerge::Change::decode`]),
//! so each is attributed to the author that signed it; decoding runs behind
//! [`crate::doc::guard`] because hostile bytes that parse may still panic it.

use crate::derive::EVENT_PREFIX;
use crate::doc::{guard, Doc};
use crate::ids::{DocKey, Kind, Role};
use crate::model::PresenceEvent;
use crate::signing::Author;
use automerge::legacy::{Key, ObjectId, OpType};
use automerge::{Change, ScalarValue};

/// Is `change`, by `author`, an acceptable write of `key` on top of `base`
/// (the document as held before the batch)? The reason when it is not.
pub fn check(
    key: &DocKey,
    author: &Author,
    change: &Change,
    base: &Doc,
) -> Result<(), &'static str> {
    match key.kind {
        Kind::Presence if author.role != Role::Hq => {}
        Kind::Audit => {}
        _ => return Ok(()),
    }
    let decoded =
        guard("decode", || change.decode()).map_err(|_| "a change that cannot be read")?;
    for op in &decoded.operations {
        let name = match (&op.obj, &op.key) {
            (ObjectId::Root, Key::Map(name)) => name.as_str(),
            _ if key.kind == Kind::Audit => return Err("an audit change outside its entries"),
            // Nested objects in a presence document are schema errors,
            // refused after apply.
            _ => continue,
        };
        match key.kind {
            Kind::Audit => match &op.action {
                OpType::Put(_) if op.pred.is_empty() && base.field(name).is_none() => {}
                OpType::Delete => return Err("an audit change deletes an entry"),
                OpType::Put(_) => return Err("an audit change rewrites an entry"),
                _ => return Err("an audit change that is not a new entry"),
            },
            _ => {
                let (Some(_), OpType::Put(ScalarValue::Str(v))) =
                    (name.strip_prefix(EVENT_PREFIX), &op.action)
                else {
                    continue;
                };
                // An event that does not decode is a schema error, refused
                // after apply with the reason.
                let Ok(ev) = serde_json::from_str::<PresenceEvent>(v) else {
                    continue;
                };
                if ev.shelter_id != author.node.as_str() {
                    return Err("a presence event at a shelter not its author's");
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actor::Actor;
    use crate::ids::NodeId;

    fn author(node: &str, role: Role) -> Author {
        Author {
            node: NodeId::new(node).unwrap(),
            role,
            key: [0; 32],
            serial: vec![],
        }
    }

    fn write(d: &mut Doc, who: &Author, writes: &[(&str, Option<&str>)]) -> Change {
        let w: Vec<(String, Option<String>)> = writes
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect();
        d.write(Actor::new(who.role, &who.node, 1), 1, "", &w)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn audit_changes_may_only_add_entries() {
        let key = DocKey::new(Kind::Audit, "clinic-1").unwrap();
        let me = author("clinic-1", Role::Clinic);
        let mut d = Doc::new(key.clone());
        let empty = d.clone();
        let first = write(
            &mut d,
            &me,
            &[("e:0", Some("\"a\"")), ("e:1", Some("\"b\""))],
        );
        assert_eq!(check(&key, &me, &first, &empty), Ok(()));
        let base = d.clone();
        let next = write(&mut d, &me, &[("e:2", Some("\"c\""))]);
        assert_eq!(check(&key, &me, &next, &base), Ok(()));
        let base = d.clone();
        let del = write(&mut d.clone(), &me, &[("e:1", None)]);
        assert!(check(&key, &me, &del, &base).is_err());
        let rewrite = write(&mut d.clone(), &me, &[("e:0", Some("\"z\""))]);
        assert!(check(&key, &me, &rewrite, &base).is_err());
        // A put without predecessor on a field the receiver holds: written
        // by a replica that never saw the entry (a concurrent rewrite).
        let mut blind = empty.clone();
        let blind = write(&mut blind, &me, &[("e:0", Some("\"y\""))]);
        assert!(check(&key, &me, &blind, &base).is_err());
    }

    #[test]
    fn presence_events_name_their_authors_shelter_unless_hq() {
        let key = DocKey::new(Kind::Presence, "h1").unwrap();
        let ev = |shelter: &str, node: &str| {
            crate::doc::encode(&PresenceEvent {
                event_id: "e-1".into(),
                op_id: "e-1".into(),
                person_id: "p1".into(),
                action: crate::model::PresenceAction::CheckIn,
                shelter_id: shelter.into(),
                to_shelter: None,
                hlc: crate::hlc::Hlc {
                    wall_ms: 1,
                    counter: 0,
                },
                node: NodeId::new(node).unwrap(),
                wall_ms: 1,
                prev: vec![],
            })
        };
        let base = Doc::new(key.clone());
        let a = author("shelter-a", Role::Shelter);
        let hq = author("hq-1", Role::Hq);
        let own = write(
            &mut base.clone(),
            &a,
            &[("ev:e-1", Some(&ev("shelter-a", "shelter-a")))],
        );
        assert_eq!(check(&key, &a, &own, &base), Ok(()));
        let other = write(
            &mut base.clone(),
            &a,
            &[("ev:e-1", Some(&ev("shelter-b", "shelter-a")))],
        );
        assert!(check(&key, &a, &other, &base).is_err());
        let correction = write(
            &mut base.clone(),
            &hq,
            &[("ev:e-1", Some(&ev("shelter-b", "hq-1")))],
        );
        assert_eq!(check(&key, &hq, &correction, &base), Ok(()));
    }
}
