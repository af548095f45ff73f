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
//! A node hash may have several credentials: a rotated certificate (new
//! serial, new key) does not replace the old one, because the changes the
//! node signed before the rotation still carry signatures by the old key.
//! The directory keeps every credential of a node hash, at most
//! [`MAX_CREDENTIALS_PER_AUTHOR`] (and [`MAX_CREDENTIALS`] in all); one
//! past either bound is refused, never swapped for one that changes may
//! depend on. A change is checked against the credential whose key
//! verifies its signature (a seal does not name the key: the signature
//! does), and every credential of an author travels to a peer before that
//! author's changes do.
//!
//! A change is accepted only when: its actor parses; the directory holds a
//! credential for the actor's node hash whose node id hashes to it and
//! whose key verifies the signature; that credential's role is the actor's
//! role and may write the document; and that credential is not revoked as
//! compromised. Anything else is unverifiable: quarantined, counted, never
//! applied or relayed.
//!
//! Revocation is per credential (a certificate serial) and says why
//! ([`Revocation`]): a credential revoked as *superseded* (rotated: the
//! key was not lost) opens no session any more, but the changes it signed
//! stay valid, being the honest node's past work; one revoked as
//! *compromised* (a lost tablet, or a revocation that gives no reason)
//! signed nothing that is accepted or relayed any more. Revoking one
//! serial of a node never touches changes signed with its other
//! credentials.
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
use rustc_hash::FxHashMap;
use std::sync::Arc;

/// Length of a change signature.
pub const SIG_LEN: usize = 64;
/// Largest credential accepted (a node certificate is about 700 bytes).
pub const MAX_CRED_BYTES: usize = 16 * 1024;
/// Most credentials a directory keeps, counting every credential of every
/// author (every node of the largest scenario several times over, with
/// rotations); past it new credentials are refused.
pub const MAX_CREDENTIALS: usize = 65_536;
/// Most credentials a directory keeps for one author (node hash): its
/// current certificate and the rotated ones its older changes were signed
/// with; past it the author's new credentials are refused (with an error
/// naming the node: the CA should not rotate one node this often).
pub const MAX_CREDENTIALS_PER_AUTHOR: usize = 8;

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

/// Why a credential is revoked (the CRL entry's reason code in a node).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revocation {
    /// Replaced by a newer credential of the same node (a rotation): it
    /// opens no session any more, but the changes it signed stay valid.
    Superseded,
    /// Its key may be in other hands (or the revocation gave no reason):
    /// changes it signed are refused as [`Unverified::Revoked`].
    Compromised,
}

/// Checks credentials; supplied by the driver (X.509 against the CA and
/// the live revocation list in a node, the test CA in the simulator).
pub trait Verifier: Send + Sync {
    /// The author a credential names, if it chains to the trusted CA and is
    /// valid; the reason otherwise.
    fn credential(&self, cred: &[u8]) -> Result<Author, String>;
    /// Is this credential (its serial) revoked now, and why?
    fn revoked(&self, author: &Author) -> Option<Revocation>;
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
    fn revoked(&self, _: &Author) -> Option<Revocation> {
        Some(Revocation::Compromised)
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

/// Verified credentials by author hash: every credential each author has
/// had, oldest first (the newest is the one a change most likely names).
#[derive(Clone, Debug, Default)]
pub struct Directory {
    by_hash: FxHashMap<AuthorHash, Vec<Entry>>,
    /// Credentials held, over all authors.
    count: usize,
}

/// Where a credential goes among an author's held ones.
enum Slot {
    /// Already held, as it is.
    Held,
    /// Held with another `Author` (our own credential, kept without a
    /// serial), or another credential binding the same key (reissued with
    /// new dates): replaced in place, as the same signer.
    Replace(usize),
    /// A new key of this author (a rotation), or a new author.
    New,
}

fn slot(held: &[Entry], author: &Author, cred: &[u8]) -> Slot {
    if let Some(i) = held.iter().position(|e| *e.cred == *cred) {
        if held[i].author == *author {
            return Slot::Held;
        }
        return Slot::Replace(i);
    }
    match held.iter().position(|e| e.author.key == author.key) {
        Some(i) => Slot::Replace(i),
        None => Slot::New,
    }
}

impl Directory {
    /// Verifies `cred` and keeps it. Returns the author hash when the
    /// credential is new here (so the caller persists it), `None` when it
    /// was already known.
    pub fn admit(&mut self, cred: &[u8], v: &dyn Verifier) -> Result<Option<AuthorHash>, String> {
        let Some((h, author)) = self.verify(cred, v)? else {
            return Ok(None);
        };
        self.insert(h, author, cred.into());
        Ok(Some(h))
    }

    /// Verifies `cred` without keeping it: the author it names when it is
    /// new here (unknown, a rotated certificate, or one reissued for the
    /// same key), `None` when this directory already holds it. A
    /// credential received from a peer is kept ([`Directory::insert`])
    /// only once its commit is durable, so a failed commit leaves it
    /// unknown and the next copy is stored.
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
        let held = self.by_hash.get(&h).map_or(&[][..], Vec::as_slice);
        match slot(held, &author, cred) {
            Slot::Held => return Ok(None),
            Slot::Replace(_) => {}
            Slot::New if held.len() >= MAX_CREDENTIALS_PER_AUTHOR => {
                return Err(format!(
                    "node {} has more than {MAX_CREDENTIALS_PER_AUTHOR} credentials",
                    author.node
                ));
            }
            Slot::New if self.count >= MAX_CREDENTIALS => {
                return Err(format!("more than {MAX_CREDENTIALS} credentials"));
            }
            Slot::New => {}
        }
        Ok(Some((h, author)))
    }

    /// Keeps a credential [`Directory::verify`] accepted (after its commit).
    /// Within the bounds only: one that no longer fits (others of the
    /// same frame came first) is dropped, and its next copy refused.
    pub fn insert(&mut self, h: AuthorHash, author: Author, cred: Arc<[u8]>) {
        let held = self.by_hash.get(&h).map_or(0, Vec::len);
        if held == 0 && self.count >= MAX_CREDENTIALS {
            return;
        }
        let es = self.by_hash.entry(h).or_default();
        match slot(es, &author, &cred) {
            Slot::Held => {}
            Slot::Replace(i) => es[i] = Entry { author, cred },
            Slot::New
                if es.len() >= MAX_CREDENTIALS_PER_AUTHOR || self.count >= MAX_CREDENTIALS => {}
            Slot::New => {
                es.push(Entry { author, cred });
                self.count += 1;
            }
        }
        debug_assert!(!es.is_empty() && es.len() <= MAX_CREDENTIALS_PER_AUTHOR + 1);
    }

    /// Keeps this node's own credential without asking the verifier, as
    /// its newest (one already held stays as verified, with its serial).
    /// Always kept, even past the bounds: the node signs with it.
    pub fn own(&mut self, author: Author, cred: Arc<[u8]>) -> AuthorHash {
        let h = node_hash(author.node.as_str());
        let es = self.by_hash.entry(h).or_default();
        let e = match slot(es, &author, &cred) {
            Slot::Held => es.remove(es.iter().position(|e| *e.cred == *cred).expect("held")),
            Slot::Replace(i) if *es[i].cred == *cred => es.remove(i),
            Slot::Replace(i) => {
                es.remove(i);
                Entry { author, cred }
            }
            Slot::New => {
                self.count += 1;
                Entry { author, cred }
            }
        };
        es.push(e);
        h
    }

    /// Every credential held for author `h`, oldest first.
    pub fn credentials(&self, h: &AuthorHash) -> &[Entry] {
        self.by_hash.get(h).map_or(&[][..], Vec::as_slice)
    }

    /// Credentials held, over all authors.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Verifies in one batch the signatures of those of `changes` (actor
    /// id, change hash, signature) whose authors this directory holds,
    /// each with its author's newest credential of the actor's role.
    /// Returns them as proven when all verify; when some do not and some
    /// authors have several credentials (a change signed before a
    /// rotation), once more without those authors' changes; nothing
    /// otherwise. [`Directory::check`] verifies alone what is not proven
    /// and finds the bad one. An author with one credential (the common
    /// case) costs what it always did.
    pub fn prove<'a>(&self, changes: impl IntoIterator<Item = (&'a [u8], Hash32, Sig)>) -> Proven {
        let mut rotated = false;
        let items: Vec<([u8; 32], Hash32, Sig, bool)> = changes
            .into_iter()
            .filter_map(|(actor, hash, sig)| {
                let actor = Actor::from_bytes(actor)?;
                let es = self.by_hash.get(&actor.node_hash)?;
                let e = es.iter().rev().find(|e| e.author.role == actor.role)?;
                let several = es.len() > 1;
                rotated |= several;
                Some((e.author.key, hash, sig, several))
            })
            .collect();
        let batch = |keep: &dyn Fn(bool) -> bool| -> Option<Proven> {
            let items: Vec<([u8; 32], Hash32, Sig)> = items
                .iter()
                .filter(|i| keep(i.3))
                .map(|&(k, h, s, _)| (k, h, s))
                .collect();
            (items.len() >= 2 && verify_all(&items))
                .then(|| Proven(items.into_iter().map(|(k, h, s)| ((h, s), k)).collect()))
        };
        batch(&|_| true)
            .or_else(|| rotated.then(|| batch(&|several| !several)).flatten())
            .unwrap_or_default()
    }

    /// Is the change with this actor, hash and signature a valid write of
    /// `key` by a known author, with a credential not revoked as
    /// compromised? Returns the seal to store and the author of the
    /// credential that signed it. The signature is verified here unless
    /// `proven` holds it.
    pub fn check(
        &self,
        v: &dyn Verifier,
        actor: &[u8],
        key: &DocKey,
        hash: &Hash32,
        sig: &Sig,
        proven: &Proven,
    ) -> Result<(Seal, &Author), Unverified> {
        let checked = self.check_unmutated(v, actor, key, hash, sig, proven);
        #[cfg(feature = "mutants")]
        if crate::mutants::active(crate::mutants::Mutant::AcceptForged) {
            // Planted bug: a forgery (bad signature, borrowed role, a
            // document its author may not write) passes as its actor.
            if let (Err(Unverified::Forged(_)), Some(a)) = (&checked, Actor::from_bytes(actor)) {
                if let Some(e) = self.credentials(&a.node_hash).last() {
                    let seal = Seal {
                        author: a.node_hash,
                        sig: *sig,
                    };
                    return Ok((seal, &e.author));
                }
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
    ) -> Result<(Seal, &Author), Unverified> {
        let actor = Actor::from_bytes(actor).ok_or(Unverified::Forged("foreign actor id"))?;
        let held = self
            .by_hash
            .get(&actor.node_hash)
            .ok_or(Unverified::UnknownAuthor)?;
        // A proven signature was verified with the key it is proven with.
        let signs =
            |e: &Entry| proven.by(hash, sig, &e.author.key) || verify(&e.author.key, hash, sig);
        // One credential (the common case): checked in the order it always
        // was, the signature last. Several: the one whose key signed it.
        let (e, signed) = match held.as_slice() {
            [e] => (e, false),
            several => (
                several
                    .iter()
                    .rev()
                    .find(|e| signs(e))
                    .ok_or(Unverified::Forged("bad signature"))?,
                true,
            ),
        };
        if e.author.role != actor.role {
            return Err(Unverified::Forged(
                "the change claims a role its author's credential does not give",
            ));
        }
        if !policy::may_author(e.author.role, key, |id| id == e.author.node.as_str()) {
            return Err(Unverified::Forged("its author's role may not write this"));
        }
        if !signed && !signs(e) {
            return Err(Unverified::Forged("bad signature"));
        }
        match v.revoked(&e.author) {
            Some(Revocation::Compromised) => Err(Unverified::Revoked(e.author.node.clone())),
            Some(Revocation::Superseded) | None => Ok((
                Seal {
                    author: actor.node_hash,
                    sig: *sig,
                },
                &e.author,
            )),
        }
    }

    /// May a held change (its seal and hash) be relayed: is its author
    /// known here, and the credential that signed it not revoked as
    /// compromised? No signature is verified unless the author has
    /// several credentials and only some of them are compromised.
    pub fn relayable(&self, v: &dyn Verifier, seal: &Seal, hash: &Hash32) -> bool {
        let compromised = |e: &Entry| matches!(v.revoked(&e.author), Some(Revocation::Compromised));
        match self.credentials(&seal.author) {
            [] => false,
            [e] => !compromised(e),
            several => {
                let bad = several.iter().filter(|e| compromised(e)).count();
                if bad == 0 || bad == several.len() {
                    return bad == 0;
                }
                several
                    .iter()
                    .find(|e| verify(&e.author.key, hash, &seal.sig))
                    .is_some_and(|e| !compromised(e))
            }
        }
    }
}

/// Signatures verified in one batch by [`Directory::prove`]: change hash
/// and signature, with the key they were verified with.
#[derive(Default)]
pub struct Proven(FxHashMap<(Hash32, Sig), [u8; 32]>);

impl Proven {
    fn by(&self, hash: &Hash32, sig: &Sig, key: &[u8; 32]) -> bool {
        self.0.get(&(*hash, *sig)) == Some(key)
    }
}

/// Why a received change was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unverified {
    /// No credential for its author reached this node with it.
    UnknownAuthor,
    /// Signed with a credential revoked as compromised: quarantined for
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

    /// Credentials for these tests: `role code | key | node id`, taken as
    /// given (the CA is not the point); the serial is the key's first 8
    /// bytes, so each rotation has its own. Revocations by serial.
    #[derive(Default)]
    struct Certs(std::sync::Mutex<std::collections::BTreeMap<Vec<u8>, Revocation>>);

    impl Verifier for Certs {
        fn credential(&self, cred: &[u8]) -> Result<Author, String> {
            let role = Role::from_code(cred[0]).ok_or("role")?;
            let key: [u8; 32] = cred[1..33].try_into().map_err(|_| "key")?;
            let node = NodeId::new(String::from_utf8_lossy(&cred[33..]).into_owned())
                .map_err(|e| e.to_string())?;
            Ok(Author {
                node,
                role,
                key,
                serial: key[..8].to_vec(),
            })
        }
        fn revoked(&self, author: &Author) -> Option<Revocation> {
            self.0.lock().unwrap().get(&author.serial).copied()
        }
    }

    impl Certs {
        fn revoke(&self, signer: &Signer, why: Revocation) {
            let serial = signer.public_key()[..8].to_vec();
            self.0.lock().unwrap().insert(serial, why);
        }
    }

    /// A signer of shelter-1 with key seed `seed`, and its credential.
    fn shelter(seed: u8) -> (Signer, Vec<u8>) {
        let s = Signer::new(&[seed; 32], vec![]);
        let mut cred = vec![Role::Shelter.code()];
        cred.extend_from_slice(&s.public_key());
        cred.extend_from_slice(b"shelter-1");
        (s, cred)
    }

    /// A write of shelter-1 to a document it may write, signed by `s`:
    /// (actor, key, hash, signature).
    fn signed_change(s: &Signer, n: u8) -> ([u8; 13], DocKey, Hash32, Sig) {
        let node = NodeId::new("shelter-1").unwrap();
        let actor = Actor::new(Role::Shelter, &node, 1).to_bytes();
        let key = DocKey::new(crate::ids::Kind::Person, "p1").unwrap();
        let hash = [n; 32];
        (actor, key, hash, s.sign(&hash))
    }

    fn check(
        d: &Directory,
        v: &Certs,
        (actor, key, hash, sig): &([u8; 13], DocKey, Hash32, Sig),
        proven: &Proven,
    ) -> Result<Vec<u8>, Unverified> {
        d.check(v, actor, key, hash, sig, proven)
            .map(|(_, author)| author.serial.clone())
    }

    /// A rotated node's changes signed before the rotation verify with its
    /// old credential, those after with its new one, alone and in a batch,
    /// whatever order the credentials arrived in. Shown failing with the
    /// directory keeping one credential per node hash, the newest
    /// replacing the old (as it did before): the old change is then checked
    /// against the new key, "bad signature".
    #[test]
    fn a_change_signed_before_a_rotation_verifies_after_the_new_credential() {
        let v = Certs::default();
        let (old, old_cred) = shelter(1);
        let (new, new_cred) = shelter(2);
        let before = signed_change(&old, 1);
        let after = signed_change(&new, 2);
        for creds in [[&old_cred, &new_cred], [&new_cred, &old_cred]] {
            let mut d = Directory::default();
            for c in creds {
                assert!(d.admit(c, &v).unwrap().is_some());
                assert_eq!(d.admit(c, &v).unwrap(), None, "held already");
            }
            assert_eq!(d.len(), 2);
            let none = Proven::default();
            assert_eq!(
                check(&d, &v, &before, &none),
                Ok(old.public_key()[..8].to_vec())
            );
            assert_eq!(
                check(&d, &v, &after, &none),
                Ok(new.public_key()[..8].to_vec())
            );
            // A frame mixing both keys: the batch with the newest key fails,
            // the change signed with it alone is still checked.
            let proven = d.prove([
                (&before.0[..], before.2, before.3),
                (&after.0[..], after.2, after.3),
            ]);
            assert!(check(&d, &v, &before, &proven).is_ok());
            assert!(check(&d, &v, &after, &proven).is_ok());
        }
        // A batch with only the newest key proves every change in it.
        let mut d = Directory::default();
        d.admit(&old_cred, &v).unwrap();
        d.admit(&new_cred, &v).unwrap();
        let again = signed_change(&new, 3);
        let proven = d.prove([
            (&after.0[..], after.2, after.3),
            (&again.0[..], again.2, again.3),
        ]);
        assert!(proven.by(&after.2, &after.3, &new.public_key()));
        assert!(proven.by(&again.2, &again.3, &new.public_key()));
    }

    /// A change whose signature no credential of its author verifies is a
    /// forgery, however many credentials the author has; so is one signed
    /// by a held key but with a hash it did not sign. Shown failing with
    /// the several-credentials case taking the newest credential
    /// unverified (`.find(|e| signs(e))` replaced by `.last()`: the forgery
    /// passed), and with one credential per node hash (the honest change
    /// signed with the old key was refused).
    #[test]
    fn a_change_signed_with_a_key_no_credential_binds_is_forged() {
        let v = Certs::default();
        let (old, old_cred) = shelter(1);
        let (_, new_cred) = shelter(2);
        let (stranger, _) = shelter(3);
        let mut d = Directory::default();
        d.admit(&old_cred, &v).unwrap();
        let forged = signed_change(&stranger, 1);
        let none = Proven::default();
        assert_eq!(
            check(&d, &v, &forged, &none),
            Err(Unverified::Forged("bad signature"))
        );
        d.admit(&new_cred, &v).unwrap();
        assert_eq!(
            check(&d, &v, &forged, &none),
            Err(Unverified::Forged("bad signature"))
        );
        let mut wrong_hash = signed_change(&old, 1);
        wrong_hash.2 = [9; 32];
        assert_eq!(
            check(&d, &v, &wrong_hash, &none),
            Err(Unverified::Forged("bad signature"))
        );
        // Nor does a batch with a forgery in it prove anything.
        let good = signed_change(&old, 2);
        let proven = d.prove([
            (&forged.0[..], forged.2, forged.3),
            (&good.0[..], good.2, good.3),
        ]);
        assert!(!proven.by(&forged.2, &forged.3, &old.public_key()));
        assert!(check(&d, &v, &forged, &proven).is_err());
        assert!(check(&d, &v, &good, &proven).is_ok());
    }

    /// Revocation is per credential, and its reason decides: revoking the
    /// old serial as compromised refuses only the changes that serial
    /// signed (and stops relaying them), never those of the node's new
    /// credential; revoked as superseded, the old changes stay valid.
    /// Shown failing with Superseded treated as Compromised, with the
    /// newest credential taken instead of the one that signed (the old
    /// change passed after its serial was compromised), and with one
    /// credential per node hash ("bad signature" for the old change).
    #[test]
    fn revoking_one_serial_refuses_only_what_that_credential_signed() {
        let v = Certs::default();
        let (old, old_cred) = shelter(1);
        let (new, new_cred) = shelter(2);
        let mut d = Directory::default();
        d.admit(&old_cred, &v).unwrap();
        d.admit(&new_cred, &v).unwrap();
        let before = signed_change(&old, 1);
        let after = signed_change(&new, 2);
        let seal = |c: &([u8; 13], DocKey, Hash32, Sig)| Seal {
            author: Actor::from_bytes(&c.0).unwrap().node_hash,
            sig: c.3,
        };
        let none = Proven::default();
        v.revoke(&old, Revocation::Superseded);
        assert!(
            check(&d, &v, &before, &none).is_ok(),
            "superseded: still valid"
        );
        assert!(check(&d, &v, &after, &none).is_ok());
        assert!(d.relayable(&v, &seal(&before), &before.2));
        v.revoke(&old, Revocation::Compromised);
        let node = NodeId::new("shelter-1").unwrap();
        assert_eq!(
            check(&d, &v, &before, &none),
            Err(Unverified::Revoked(node.clone()))
        );
        assert!(check(&d, &v, &after, &none).is_ok());
        assert!(!d.relayable(&v, &seal(&before), &before.2));
        assert!(d.relayable(&v, &seal(&after), &after.2));
        // And the other way round: the new serial compromised, the old
        // one's changes stand.
        let v = Certs::default();
        v.revoke(&new, Revocation::Compromised);
        assert!(check(&d, &v, &before, &none).is_ok());
        assert_eq!(check(&d, &v, &after, &none), Err(Unverified::Revoked(node)));
        assert!(d.relayable(&v, &seal(&before), &before.2));
        assert!(!d.relayable(&v, &seal(&after), &after.2));
    }

    /// The bounds: at most [`MAX_CREDENTIALS_PER_AUTHOR`] credentials of
    /// one author, refused past it with an error that names the node,
    /// nothing held evicted; a credential reissued for a held key
    /// replaces it in place. Shown failing with one credential per node
    /// hash.
    #[test]
    fn an_author_keeps_a_bounded_number_of_credentials() {
        let v = Certs::default();
        let mut d = Directory::default();
        let n = MAX_CREDENTIALS_PER_AUTHOR as u8;
        for seed in 1..=n {
            assert!(d.admit(&shelter(seed).1, &v).unwrap().is_some());
        }
        let err = d.admit(&shelter(n + 1).1, &v).unwrap_err();
        assert!(
            err.contains("shelter-1") && err.contains("more than 8"),
            "{err}"
        );
        assert_eq!(d.len(), MAX_CREDENTIALS_PER_AUTHOR);
        let first = signed_change(&shelter(1).0, 1);
        assert!(check(&d, &v, &first, &Proven::default()).is_ok());
        // A credential held already is not new; one reissued for a held
        // key (here with another role) replaces that one in place.
        assert_eq!(d.admit(&shelter(1).1, &v).unwrap(), None);
        let mut reissued = shelter(1).1;
        reissued[0] = Role::Hq.code();
        assert!(d.admit(&reissued, &v).unwrap().is_some());
        let h = node_hash("shelter-1");
        assert_eq!(d.credentials(&h).len(), MAX_CREDENTIALS_PER_AUTHOR);
        assert_eq!(d.credentials(&h)[0].author.role, Role::Hq);
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
