//! Signed changes: every change carries its author's Ed25519 signature over
//! its hash, and every hop verifies it before applying or relaying (E-5).
//!
//! Why over the change hash: an Automerge change hash commits to the
//! change's bytes and its dependencies, and stays the same however frames
//! are split, documents compacted or changes re-encoded, so a signature made
//! once by the author travels unchanged through any number of relays.
//!
//! Who may sign as whom comes from a *credential*: in a node, the author's
//! X.509 certificate issued by the municipal CA, which binds the node id,
//! the role and the Ed25519 key (see `certs`); in the simulator, a compact
//! test credential (`crate::testkit::TestCa`). This crate never parses
//! credentials itself: a [`Verifier`] supplied from outside checks the chain
//! and revocation and says which [`Author`] a credential names. Verified
//! credentials are kept in a [`Directory`] by node hash (the part of the
//! Automerge actor id that names the author, see [`crate::actor`]) and are
//! relayed with the changes, so a node verifies authors it never met.
//!
//! A change is accepted only when: its actor parses; the directory holds a
//! credential for the actor's node hash whose node id hashes to it; the
//! credential's role is the actor's role and may write the document; the
//! credential is not revoked; and the signature verifies. Anything else is
//! unverifiable: quarantined, counted, never applied or relayed.
//!
//! Signatures are verified under the ZIP-215 rules (the cofactored
//! equation, `ed25519-zebra`), under which a signature verifies alone
//! exactly when it verifies in any batch. So a frame's signatures can be
//! checked in one batch ([`Directory::prove`], several times cheaper per
//! signature), and every node still accepts or refuses each signature the
//! same way whatever frames it arrived in.

use crate::actor::{node_hash, Actor};
use crate::doc::Hash32;
use crate::ids::{DocKey, NodeId, Role};
use crate::policy;
use rand_core::SeedableRng;
use ring::signature::{Ed25519KeyPair, KeyPair};
use rustc_hash::{FxHashMap, FxHashSet};
use std::sync::Arc;

/// Length of a change signature.
pub const SIG_LEN: usize = 64;
/// Largest credential accepted (a node certificate is about 700 bytes).
pub const MAX_CRED_BYTES: usize = 16 * 1024;
/// Most credentials a directory keeps (every node of the largest scenario
/// several times over); past it new credentials are refused.
pub const MAX_AUTHORS: usize = 65_536;

pub type Sig = [u8; SIG_LEN];
/// The node-hash part of an actor id: who authored a change.
pub type AuthorHash = [u8; 8];

/// A stored change's signature and the author it names, kept beside the
/// change (the author is read back from the actor when the change arrives;
/// stored so that relaying never re-parses the change to find it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seal {
    pub author: AuthorHash,
    pub sig: Sig,
}

impl Seal {
    pub const BYTES: usize = 8 + SIG_LEN;
    pub fn to_bytes(&self) -> [u8; Self::BYTES] {
        let mut b = [0u8; Self::BYTES];
        b[..8].copy_from_slice(&self.author);
        b[8..].copy_from_slice(&self.sig);
        b
    }
    pub fn from_bytes(b: &[u8]) -> Option<Seal> {
        if b.len() != Self::BYTES {
            return None;
        }
        Some(Seal {
            author: b[..8].try_into().ok()?,
            sig: b[8..].try_into().ok()?,
        })
    }
}

/// Whom a verified credential names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Author {
    pub node: NodeId,
    pub role: Role,
    /// The Ed25519 public key the credential binds.
    pub key: [u8; 32],
    /// The credential's own id (a certificate serial): what revocation
    /// names.
    pub serial: Vec<u8>,
}

/// Checks credentials; supplied by the driver (X.509 against the CA and
/// the live revocation list in a node, the test CA in the simulator).
pub trait Verifier: Send + Sync {
    /// The author a credential names, if it chains to the trusted CA and is
    /// valid; the reason otherwise.
    fn credential(&self, cred: &[u8]) -> Result<Author, String>;
    /// Is this author's credential revoked now?
    fn revoked(&self, author: &Author) -> bool;
}

/// The message an author signs for a change: domain-separated so a
/// signature cannot be replayed as anything else made with the same key.
fn message(hash: &Hash32) -> [u8; 48] {
    let mut m = [0u8; 48];
    m[..16].copy_from_slice(b"kizuna-change-v1");
    m[16..].copy_from_slice(hash);
    m
}

/// Does `sig` by `key` sign change `hash`?
pub fn verify(key: &[u8; 32], hash: &Hash32, sig: &Sig) -> bool {
    ed25519_zebra::VerificationKey::try_from(*key)
        .and_then(|k| k.verify(&ed25519_zebra::Signature::from(*sig), &message(hash)))
        .is_ok()
}

/// Does every `sig` by its `key` sign its change `hash`? One batch check:
/// true exactly when [`verify`] holds for each (up to a 2^-128 chance of a
/// wrong true); when false, at least one fails. The batch's random
/// coefficients are drawn from a hash of its contents, so the answer is the
/// same on every node and every run.
pub fn verify_all(items: &[([u8; 32], Hash32, Sig)]) -> bool {
    let mut seed = blake3::Hasher::new_derive_key("kizuna 2026 batch verification v1");
    let mut batch = ed25519_zebra::batch::Verifier::new();
    for (key, hash, sig) in items {
        seed.update(key).update(hash).update(sig);
        batch.queue((
            ed25519_zebra::VerificationKeyBytes::from(*key),
            ed25519_zebra::Signature::from(*sig),
            &message(hash),
        ));
    }
    let rng = rand_chacha::ChaCha20Rng::from_seed(*seed.finalize().as_bytes());
    batch.verify(rng).is_ok()
}

/// The Ed25519 seed a node derives from its certificate's private key (the
/// PKCS#8 bytes), so the signing key needs no file of its own and is
/// protected exactly as the node key is (sealed at rest on ambulances).
pub fn seed_from_node_key(pkcs8: &[u8]) -> [u8; 32] {
    blake3::derive_key("kizuna 2026 change signing key v1", pkcs8)
}

/// The Ed25519 public key of a seed (what the CA writes into the node's
/// certificate).
pub fn public_key(seed: &[u8; 32]) -> [u8; 32] {
    let kp = Ed25519KeyPair::from_seed_unchecked(seed).expect("any 32 bytes are a seed");
    let mut out = [0u8; 32];
    out.copy_from_slice(kp.public_key().as_ref());
    out
}

/// This node's signing key and its own credential.
pub struct Signer {
    key: Ed25519KeyPair,
    cred: Arc<[u8]>,
}

impl Signer {
    pub fn new(seed: &[u8; 32], cred: Vec<u8>) -> Signer {
        Signer {
            key: Ed25519KeyPair::from_seed_unchecked(seed).expect("any 32 bytes are a seed"),
            cred: cred.into(),
        }
    }
    pub fn sign(&self, hash: &Hash32) -> Sig {
        let mut out = [0u8; SIG_LEN];
        out.copy_from_slice(self.key.sign(&message(hash)).as_ref());
        out
    }
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.key.public_key().as_ref());
        out
    }
    pub fn credential(&self) -> &Arc<[u8]> {
        &self.cred
    }
}

/// What an engine needs to sign its own changes and verify everyone's.
///
/// Without a signer (a command run on a data directory while its node is
/// stopped, which has no access to the node's key) new changes are stored
/// unsigned; the node signs its own unsigned changes when it next starts
/// with its key, and until then they are not relayed.
#[derive(Clone)]
pub struct Trust {
    pub signer: Option<Arc<Signer>>,
    pub verifier: Arc<dyn Verifier>,
}

impl Trust {
    /// For commands on a stopped node's data directory: no signer, and no
    /// credential verifies (such a command exchanges nothing with peers).
    pub fn offline() -> Trust {
        Trust {
            signer: None,
            verifier: Arc::new(NoVerifier),
        }
    }
}

struct NoVerifier;

impl Verifier for NoVerifier {
    fn credential(&self, _: &[u8]) -> Result<Author, String> {
        Err("credentials are not checked offline".into())
    }
    fn revoked(&self, _: &Author) -> bool {
        true
    }
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust").finish_non_exhaustive()
    }
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub author: Author,
    pub cred: Arc<[u8]>,
}

/// Verified credentials by author hash.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    by_hash: FxHashMap<AuthorHash, Entry>,
}

impl Directory {
    /// Verifies `cred` and keeps it. Returns the author hash when the
    /// credential is new here (so the caller persists it), `None` when it
    /// was already known.
    pub fn admit(&mut self, cred: &[u8], v: &dyn Verifier) -> Result<Option<AuthorHash>, String> {
        let Some((h, author)) = self.verify(cred, v)? else {
            return Ok(None);
        };
        self.by_hash.insert(
            h,
            Entry {
                author,
                cred: cred.into(),
            },
        );
        Ok(Some(h))
    }

    /// Verifies `cred` without keeping it: the author it names when it is
    /// new here (unknown, or a reissued certificate), `None` when this
    /// directory already holds it. A credential received from a peer is
    /// kept ([`Directory::insert`]) only once its commit is durable, so a
    /// failed commit leaves it unknown and the next copy is stored.
    pub fn verify(
        &self,
        cred: &[u8],
        v: &dyn Verifier,
    ) -> Result<Option<(AuthorHash, Author)>, String> {
        if cred.len() > MAX_CRED_BYTES {
            return Err(format!(
                "credential of {} bytes exceeds {MAX_CRED_BYTES}",
                cred.len()
            ));
        }
        let author = v.credential(cred)?;
        let h = node_hash(author.node.as_str());
        if let Some(e) = self.by_hash.get(&h) {
            if e.author == author {
                return Ok(None);
            }
            // A reissued certificate for the same node (new key or role):
            // the newer credential replaces the old one only when it
            // verifies, which it just did.
        } else if self.by_hash.len() >= MAX_AUTHORS {
            return Err(format!("more than {MAX_AUTHORS} authors"));
        }
        Ok(Some((h, author)))
    }

    /// Keeps a credential [`Directory::verify`] accepted (after its commit).
    pub fn insert(&mut self, h: AuthorHash, author: Author, cred: Arc<[u8]>) {
        if self.by_hash.len() < MAX_AUTHORS || self.by_hash.contains_key(&h) {
            self.by_hash.insert(h, Entry { author, cred });
        }
    }

    /// Keeps this node's own credential without asking the verifier.
    pub fn own(&mut self, author: Author, cred: Arc<[u8]>) -> AuthorHash {
        let h = node_hash(author.node.as_str());
        self.by_hash.insert(h, Entry { author, cred });
        h
    }

    pub fn get(&self, h: &AuthorHash) -> Option<&Entry> {
        self.by_hash.get(h)
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// Verifies in one batch the signatures of those of `changes` (actor
    /// id, change hash, signature) whose authors this directory holds.
    /// Returns them as proven when all verify, nothing otherwise: then
    /// [`Directory::check`] verifies each alone and finds the bad one.
    pub fn prove<'a>(&self, changes: impl IntoIterator<Item = (&'a [u8], Hash32, Sig)>) -> Proven {
        let items: Vec<([u8; 32], Hash32, Sig)> = changes
            .into_iter()
            .filter_map(|(actor, hash, sig)| {
                let e = self.by_hash.get(&Actor::from_bytes(actor)?.node_hash)?;
                Some((e.author.key, hash, sig))
            })
            .collect();
        if items.len() < 2 || !verify_all(&items) {
            return Proven::default();
        }
        Proven(items.into_iter().map(|(_, h, s)| (h, s)).collect())
    }

    /// Is the change with this actor, hash and signature a valid write of
    /// `key` by a known, unrevoked author? Returns the seal to store. The
    /// signature is verified here unless `proven` holds it.
    pub fn check(
        &self,
        v: &dyn Verifier,
        actor: &[u8],
        key: &DocKey,
        hash: &Hash32,
        sig: &Sig,
        proven: &Proven,
    ) -> Result<Seal, Unverified> {
        let checked = self.check_unmutated(v, actor, key, hash, sig, proven);
        #[cfg(feature = "mutants")]
        if crate::mutants::active(crate::mutants::Mutant::AcceptForged) {
            // Planted bug: a forgery (bad signature, borrowed role, a
            // document its author may not write) passes as its actor.
            if let (Err(Unverified::Forged(_)), Some(a)) = (&checked, Actor::from_bytes(actor)) {
                return Ok(Seal {
                    author: a.node_hash,
                    sig: *sig,
                });
            }
        }
        checked
    }

    fn check_unmutated(
        &self,
        v: &dyn Verifier,
        actor: &[u8],
        key: &DocKey,
        hash: &Hash32,
        sig: &Sig,
        proven: &Proven,
    ) -> Result<Seal, Unverified> {
        let actor = Actor::from_bytes(actor).ok_or(Unverified::Forged("foreign actor id"))?;
        let e = self
            .by_hash
            .get(&actor.node_hash)
            .ok_or(Unverified::UnknownAuthor)?;
        if e.author.role != actor.role {
            return Err(Unverified::Forged(
                "the change claims a role its author's credential does not give",
            ));
        }
        if !policy::may_author(e.author.role, key, |id| id == e.author.node.as_str()) {
            return Err(Unverified::Forged("its author's role may not write this"));
        }
        // A proven signature was verified with this same author's key: the
        // key is looked up from the same actor's node hash.
        if !proven.0.contains(&(*hash, *sig)) && !verify(&e.author.key, hash, sig) {
            return Err(Unverified::Forged("bad signature"));
        }
        if v.revoked(&e.author) {
            return Err(Unverified::Revoked(e.author.node.clone()));
        }
        Ok(Seal {
            author: actor.node_hash,
            sig: *sig,
        })
    }
}

/// Signatures verified in one batch by [`Directory::prove`]: pairs of
/// change hash and signature.
#[derive(Default)]
pub struct Proven(FxHashSet<(Hash32, Sig)>);

/// Why a received change was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unverified {
    /// No credential for its author reached this node with it.
    UnknownAuthor,
    /// Signed by an author whose credential is revoked: quarantined for
    /// review, not held against the relay (it may not know yet).
    Revoked(NodeId),
    /// A forgery or a broken peer.
    Forged(&'static str),
}

impl std::fmt::Display for Unverified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unverified::UnknownAuthor => write!(f, "author has no verified credential"),
            Unverified::Revoked(n) => write!(f, "author {n} is revoked"),
            Unverified::Forged(why) => write!(f, "{why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_for_their_hash_and_key() {
        let s = Signer::new(&[7; 32], vec![]);
        let h = [1u8; 32];
        let sig = s.sign(&h);
        assert!(verify(&s.public_key(), &h, &sig));
        assert!(!verify(&s.public_key(), &[2u8; 32], &sig));
        assert!(!verify(&public_key(&[8; 32]), &h, &sig));
        let mut bad = sig;
        bad[0] ^= 1;
        assert!(!verify(&s.public_key(), &h, &bad));
        assert_eq!(public_key(&[7; 32]), s.public_key());
    }

    #[test]
    fn a_batch_verifies_exactly_when_each_signature_does() {
        let signers: Vec<Signer> = (0..3u8).map(|i| Signer::new(&[i; 32], vec![])).collect();
        let items: Vec<([u8; 32], Hash32, Sig)> = (0..40u8)
            .map(|i| {
                let s = &signers[usize::from(i % 3)];
                let h = [i; 32];
                (s.public_key(), h, s.sign(&h))
            })
            .collect();
        assert!(verify_all(&items));
        // One flaw anywhere (a flipped bit, another's key, another hash)
        // fails the batch.
        for at in [0, 17, 39] {
            let mut flipped = items.clone();
            flipped[at].2[5] ^= 0x10;
            assert!(!verify_all(&flipped), "flipped signature at {at}");
            let mut other_key = items.clone();
            other_key[at].0 = signers[(at + 1) % 3].public_key();
            assert!(!verify_all(&other_key), "wrong key at {at}");
            let mut other_hash = items.clone();
            other_hash[at].1[0] ^= 1;
            assert!(!verify_all(&other_hash), "wrong hash at {at}");
        }
    }

    #[test]
    fn seal_round_trips() {
        let s = Seal {
            author: [3; 8],
            sig: [9; 64],
        };
        assert_eq!(Seal::from_bytes(&s.to_bytes()), Some(s));
        assert_eq!(Seal::from_bytes(&[0; 10]), None);
    }
}
