//! Test support shared by every crate's tests and benches (feature
//! `testkit`, never in the node binary): synthetic households with stable
//! ids, names and card ids, so that tests across crates speak of the same
//! residents. Deterministic: the same index gives the same household.

use crate::model::{Household, Member};
use crate::text::CardUserId;

/// Household `h{i}` with `members` members `p{i}-{m}`, each with a card
/// (`{i*10+m}` as 13 digits). Ids and card ids stay distinct for m < 10.
pub fn household(i: usize, members: usize) -> Household {
    Household {
        household_id: format!("h{i}"),
        address: format!("新潟県三条市{i}番地"),
        members: (0..members)
            .map(|m| Member {
                person_id: format!("p{i}-{m}"),
                name: format!("山田 {i}-{m}"),
                kana: format!("ヤマダ {i} {m}"),
                birth_date: "1950-04-01".into(),
                card_user_id: Some(
                    CardUserId::parse(&format!("{:013}", i * 10 + m)).expect("13 digits"),
                ),
            })
            .collect(),
    }
}

/// `n` one-person households without cards, ids zero-padded to 7 digits
/// (`h0000042` / `p0000042`), all at `address`: bulk registries for
/// benchmarks, where card lookups are not the point.
pub fn bulk_household(i: usize, address: &str) -> Household {
    Household {
        household_id: format!("h{i:07}"),
        address: address.to_string(),
        members: vec![Member {
            person_id: format!("p{i:07}"),
            name: format!("住民 {i}"),
            kana: format!("ジュウミン {i}"),
            birth_date: "1960-01-01".into(),
            card_user_id: None,
        }],
    }
}

/// A registry CSV in the `kizuna registry import` format: `persons`
/// persons `p{i}`, two per household `h{i/2}`, without cards.
pub fn registry_csv(persons: usize) -> String {
    let mut s = "household_id,address,person_id,name,kana,birth_date,card_user_id\n".to_string();
    for i in 0..persons {
        s.push_str(&format!(
            "h{},三条市旭町{}-1,p{i},山田 {i},ヤマダ {i},1950-04-01,\n",
            i / 2,
            i / 2
        ));
    }
    s
}

/// A stand-in for the municipal CA in tests and the simulator: credentials
/// are `KZT1 | role | Ed25519 key | node id length | node id | CA signature`,
/// signed with a fixed CA key. Keys are derived from the node id, so every
/// run of a seed signs the same bytes. Never accepted by a node, whose
/// verifier reads X.509 certificates only.
pub mod testca {
    use crate::ids::{NodeId, Role};
    use crate::signing::{public_key, Author, Revocation, Signer, Trust, Verifier};
    use ring::signature::{Ed25519KeyPair, UnparsedPublicKey, ED25519};
    use std::collections::BTreeSet;
    use std::sync::{Arc, RwLock};

    const MAGIC: &[u8; 4] = b"KZT1";
    const CA_SEED: [u8; 32] = [0x4b; 32];

    /// The seed of a node's test signing key.
    pub fn seed(node: &NodeId) -> [u8; 32] {
        blake3::derive_key("kizuna test node key", node.as_str().as_bytes())
    }

    /// A credential binding `node`, `role` and the Ed25519 key of `seed`.
    pub fn credential(node: &NodeId, role: Role, seed: &[u8; 32]) -> Vec<u8> {
        let mut c = MAGIC.to_vec();
        c.push(role.code());
        c.extend_from_slice(&public_key(seed));
        c.push(node.as_str().len() as u8);
        c.extend_from_slice(node.as_str().as_bytes());
        let ca = Ed25519KeyPair::from_seed_unchecked(&CA_SEED).expect("seed");
        c.extend_from_slice(ca.sign(&c).as_ref());
        c
    }

    /// Verifies test credentials; revocations are set at run time.
    #[derive(Default)]
    pub struct TestVerifier {
        pub revoked: RwLock<BTreeSet<NodeId>>,
    }

    impl Verifier for TestVerifier {
        fn credential(&self, cred: &[u8]) -> Result<Author, String> {
            let bad = || "not a test credential".to_string();
            if cred.len() < 4 + 1 + 32 + 1 + 64 || &cred[..4] != MAGIC {
                return Err(bad());
            }
            let (body, sig) = cred.split_at(cred.len() - 64);
            let ca = public_key(&CA_SEED);
            UnparsedPublicKey::new(&ED25519, ca)
                .verify(body, sig)
                .map_err(|_| "credential not signed by the test CA".to_string())?;
            let role = Role::from_code(body[4]).ok_or_else(bad)?;
            let key: [u8; 32] = body[5..37].try_into().map_err(|_| bad())?;
            let len = body[37] as usize;
            let id = body.get(38..38 + len).ok_or_else(bad)?;
            if 38 + len != body.len() {
                return Err(bad());
            }
            let node =
                NodeId::new(String::from_utf8_lossy(id).into_owned()).map_err(|e| e.to_string())?;
            Ok(Author {
                serial: node.as_str().as_bytes().to_vec(),
                node,
                role,
                key,
            })
        }
        /// A revoked test node is revoked as compromised (the simulator's
        /// test credentials have one serial per node, and rotate nothing).
        fn revoked(&self, author: &Author) -> Option<Revocation> {
            self.revoked
                .read()
                .map_or(true, |r| r.contains(&author.node))
                .then_some(Revocation::Compromised)
        }
    }

    /// Trust for a test engine of `node` with `role`, sharing `verifier`.
    pub fn trust_with(node: &NodeId, role: Role, verifier: Arc<TestVerifier>) -> Trust {
        let s = seed(node);
        Trust {
            signer: Some(Arc::new(Signer::new(&s, credential(node, role, &s)))),
            verifier,
        }
    }

    /// [`trust_with`] and a verifier of its own.
    pub fn trust(node: &NodeId, role: Role) -> Trust {
        trust_with(node, role, Arc::default())
    }
}
