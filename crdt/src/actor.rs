//! Automerge actor ids bound to a node: role, a hash of the node id, and
//! the node's incarnation (bumped and persisted at every start, so a
//! restored or cloned store never reuses an actor).
//!
//! The receiving side reads the author's role and node hash back from
//! every change and checks them against policy (E-5, E-13).

use crate::ids::{NodeId, Role};

pub const ACTOR_LEN: usize = 13;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Actor {
    pub role: Role,
    pub node_hash: [u8; 8],
    pub incarnation: u32,
}

pub fn node_hash(node: &str) -> [u8; 8] {
    let h = blake3::hash(node.as_bytes());
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.as_bytes()[..8]);
    out
}

impl Actor {
    pub fn new(role: Role, node: &NodeId, incarnation: u32) -> Self {
        Actor {
            role,
            node_hash: node_hash(node.as_str()),
            incarnation,
        }
    }
    pub fn to_bytes(self) -> [u8; ACTOR_LEN] {
        let mut b = [0u8; ACTOR_LEN];
        b[0] = self.role.code();
        b[1..9].copy_from_slice(&self.node_hash);
        b[9..].copy_from_slice(&self.incarnation.to_be_bytes());
        b
    }
    pub fn from_bytes(b: &[u8]) -> Option<Actor> {
        if b.len() != ACTOR_LEN {
            return None;
        }
        let role = Role::from_code(b[0])?;
        let mut node_hash = [0u8; 8];
        node_hash.copy_from_slice(&b[1..9]);
        let incarnation = u32::from_be_bytes(b[9..13].try_into().ok()?);
        Some(Actor {
            role,
            node_hash,
            incarnation,
        })
    }
    pub fn is_node(&self, node: &str) -> bool {
        self.node_hash == node_hash(node)
    }
    pub fn automerge(self) -> automerge::ActorId {
        automerge::ActorId::from(self.to_bytes().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn round_trip() {
        let a = Actor::new(Role::Clinic, &NodeId::new("clinic-1").unwrap(), 7);
        assert_eq!(Actor::from_bytes(&a.to_bytes()), Some(a));
        assert!(a.is_node("clinic-1"));
        assert!(!a.is_node("clinic-2"));
        assert_eq!(Actor::from_bytes(&[0u8; 13]), None);
        assert_eq!(Actor::from_bytes(&[1u8; 5]), None);
    }
}
