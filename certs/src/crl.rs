//! Certificate revocation lists: parse them defensively, keep the newest.
//!
//! Model: the municipal CA signs cumulative CRLs with a strictly increasing
//! CRL number ([`crate::ca::revoke`]). Nodes pass CRL bytes around by gossip,
//! so every CRL is untrusted input until [`RevocationList::parse`] has bounded
//! its size ([`MAX_CRL_DER_LEN`]), parsed it inside a panic boundary, checked
//! that its issuer is the municipal CA, verified the CA's signature over it
//! and read its CRL number (E-3, I-34).
//!
//! [`RevocationState`] is the node's single shared view (`Arc` it into the TLS
//! verifiers and the gossip code). [`RevocationState::offer`] applies a CRL only
//! if its number is higher than the one held, so a stale or rolled-back CRL
//! from a peer never undoes a revocation (E-2); the outcome says which serials
//! became revoked so the node can close live sessions with those peers (E-1).
//! The TLS verifiers consult [`RevocationState::is_revoked`] at every
//! handshake, so a new CRL applies without rebuilding any config.
//!
//! Each entry's reason code is kept for change authors (not for TLS, where
//! any listed serial is refused): a serial revoked as *superseded* (the old
//! certificate of a rotated node) still vouches for the changes it signed,
//! any other reason, or none, refuses them
//! ([`RevocationState::author_revocation`], `crdt::signing::Revocation`).
//!
//! Policy for an overdue CRL (now past its `nextUpdate`): it stays in force.
//! During a disaster the CA may be unreachable for weeks; failing open would
//! un-revoke stolen tablets and failing closed would cut the mesh. The node
//! shows [`CrlFreshness::Overdue`] in its UI and status API instead. A CA-signed
//! CRL with a higher number is authoritative even if it lists fewer serials
//! (the CA may have removed an entry); `thisUpdate` is not compared with the
//! local clock, because that clock may be wrong (B-2).

use crate::identity::normalize_serial;
use rustls_pki_types::CertificateDer;
use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, RwLock};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;
use x509_parser::x509::ReasonCode;

/// Largest CRL we accept; about 1,500 revoked serials.
pub const MAX_CRL_DER_LEN: usize = 64 * 1024;

/// Why CRL bytes were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrlError {
    /// More than [`MAX_CRL_DER_LEN`] bytes; not parsed.
    #[error("CRL is {len} bytes, larger than the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    /// Not a DER X.509 CRL (random, truncated or trailing bytes).
    #[error("CRL is not valid DER: {0}")]
    Malformed(String),
    /// The parser panicked on this input; rejected.
    #[error("CRL parser failed unexpectedly on this input; rejected")]
    ParserPanic,
    /// The CRL names an issuer other than the municipal CA.
    #[error("CRL was issued by another CA, not by this municipality's CA")]
    WrongIssuer,
    /// The signature does not verify with the municipal CA key.
    #[error("CRL signature does not verify with the municipal CA key: {0}")]
    BadSignature(String),
    /// No CRL number extension (required: it orders CRLs).
    #[error("CRL has no CRL number")]
    MissingNumber,
    /// The CRL number does not fit 64 bits (our CA never produces that).
    #[error("CRL number is larger than 64 bits")]
    NumberTooLarge,
    /// A critical extension we do not implement (e.g. delta CRL indicator).
    #[error("CRL has an unsupported critical extension {0}")]
    UnsupportedCriticalExtension(String),
    /// The configured CA certificate itself does not parse.
    #[error("municipal CA certificate is not valid: {0}")]
    BadCaCertificate(String),
}

/// A parsed, CA-verified CRL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevocationList {
    number: u64,
    der: Vec<u8>,
    revoked: BTreeSet<Vec<u8>>,
    /// Those of `revoked` whose entry gives the reason "superseded".
    superseded: BTreeSet<Vec<u8>>,
    this_update: OffsetDateTime,
    next_update: Option<OffsetDateTime>,
}

/// OID 2.5.29.20 (cRLNumber), the one CRL extension we understand.
const CRL_NUMBER_OID: &[u64] = &[2, 5, 29, 20];

impl RevocationList {
    /// Parse and verify `der` against the municipal CA certificate `ca_der`.
    /// Never panics.
    pub fn parse(der: &[u8], ca_der: &[u8]) -> Result<RevocationList, CrlError> {
        if der.len() > MAX_CRL_DER_LEN {
            return Err(CrlError::TooLarge {
                len: der.len(),
                max: MAX_CRL_DER_LEN,
            });
        }
        catch_unwind(AssertUnwindSafe(|| Self::parse_inner(der, ca_der)))
            .unwrap_or(Err(CrlError::ParserPanic))
    }

    fn parse_inner(der: &[u8], ca_der: &[u8]) -> Result<RevocationList, CrlError> {
        let (_, ca) = X509Certificate::from_der(ca_der)
            .map_err(|e| CrlError::BadCaCertificate(e.to_string()))?;
        let (rest, crl) = CertificateRevocationList::from_der(der)
            .map_err(|e| CrlError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CrlError::Malformed(format!(
                "{} trailing bytes after the CRL",
                rest.len()
            )));
        }
        if crl.issuer().as_raw() != ca.subject().as_raw() {
            return Err(CrlError::WrongIssuer);
        }
        crl.verify_signature(ca.public_key())
            .map_err(|e| CrlError::BadSignature(e.to_string()))?;

        for ext in crl.extensions() {
            let is_number = ext
                .oid
                .iter()
                .is_some_and(|arcs| arcs.eq(CRL_NUMBER_OID.iter().copied()));
            if ext.critical && !is_number {
                return Err(CrlError::UnsupportedCriticalExtension(
                    ext.oid.to_id_string(),
                ));
            }
        }
        let number_bytes = crl
            .crl_number()
            .ok_or(CrlError::MissingNumber)?
            .to_bytes_be();
        let number_bytes = normalize_serial(&number_bytes);
        if number_bytes.len() > 8 {
            return Err(CrlError::NumberTooLarge);
        }
        let number = number_bytes
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));

        let revoked = crl
            .iter_revoked_certificates()
            .map(|r| normalize_serial(r.raw_serial()))
            .collect();
        let superseded = crl
            .iter_revoked_certificates()
            .filter(|r| matches!(r.reason_code(), Some((_, ReasonCode::Superseded))))
            .map(|r| normalize_serial(r.raw_serial()))
            .collect();
        Ok(RevocationList {
            number,
            der: der.to_vec(),
            revoked,
            superseded,
            this_update: crl.last_update().to_datetime(),
            next_update: crl.next_update().map(|t| t.to_datetime()),
        })
    }

    /// The CRL number.
    pub fn number(&self) -> u64 {
        self.number
    }
    /// The exact bytes this list was parsed from (for gossip).
    pub fn der(&self) -> &[u8] {
        &self.der
    }
    /// Revoked serial magnitudes (see [`crate::identity::NodeIdentity::serial`]).
    pub fn revoked_serials(&self) -> &BTreeSet<Vec<u8>> {
        &self.revoked
    }
    pub fn this_update(&self) -> OffsetDateTime {
        self.this_update
    }
    pub fn next_update(&self) -> Option<OffsetDateTime> {
        self.next_update
    }
    /// True if `serial` (magnitude, leading zeros allowed) is listed.
    pub fn contains(&self, serial: &[u8]) -> bool {
        self.revoked.contains(&normalize_serial(serial))
    }
    /// Whether and why `serial` is revoked, for the changes it signed:
    /// superseded only when its entry says so, compromised for any other
    /// reason or none.
    pub fn revocation(&self, serial: &[u8]) -> Option<crdt::signing::Revocation> {
        let serial = normalize_serial(serial);
        if !self.revoked.contains(&serial) {
            None
        } else if self.superseded.contains(&serial) {
            Some(crdt::signing::Revocation::Superseded)
        } else {
            Some(crdt::signing::Revocation::Compromised)
        }
    }
}

/// Result of [`RevocationState::offer`]. Both are expected outcomes of gossip,
/// not errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OfferOutcome {
    /// The CRL is newer than the one held and now in force. `newly_revoked`
    /// lists serials that were not revoked before: close sessions with them.
    Applied {
        number: u64,
        newly_revoked: Vec<Vec<u8>>,
    },
    /// The CRL is valid but not newer than the one held (`offered <= held`);
    /// the held one stays. Peers offering it are behind: send them ours.
    Stale { held: u64, offered: u64 },
}

/// How current the held CRL is, for the UI and status API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CrlFreshness {
    /// No CRL received yet: nothing is revoked as far as this node knows.
    NoneHeld,
    /// Held CRL is within its `nextUpdate`.
    Current {
        number: u64,
        next_update: Option<OffsetDateTime>,
    },
    /// Past `nextUpdate`: still enforced; the operator should publish a new one.
    Overdue {
        number: u64,
        next_update: OffsetDateTime,
    },
}

/// The node's shared revocation view. Cheap to query, safe to share.
#[derive(Debug)]
pub struct RevocationState {
    ca: CertificateDer<'static>,
    held: RwLock<Option<Arc<RevocationList>>>,
}

impl RevocationState {
    /// Empty state trusting CRLs signed by the CA certificate `ca`.
    pub fn new(ca: CertificateDer<'static>) -> RevocationState {
        RevocationState {
            ca,
            held: RwLock::new(None),
        }
    }

    /// The municipal CA certificate CRLs are checked against.
    pub fn ca_cert(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    fn held(&self) -> Option<Arc<RevocationList>> {
        // A poisoned lock only means another thread panicked mid-read; the
        // value itself is always a complete `Option<Arc<_>>`.
        self.held.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Offer CRL bytes (from a peer, the operator or disk). Applied only if
    /// CA-signed and numbered higher than the held CRL.
    pub fn offer(&self, der: &[u8]) -> Result<OfferOutcome, CrlError> {
        let list = RevocationList::parse(der, &self.ca)?;
        let mut held = self.held.write().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = held.as_ref() {
            if list.number <= h.number {
                return Ok(OfferOutcome::Stale {
                    held: h.number,
                    offered: list.number,
                });
            }
        }
        let newly_revoked: Vec<Vec<u8>> = match held.as_ref() {
            Some(h) => list.revoked.difference(&h.revoked).cloned().collect(),
            None => list.revoked.iter().cloned().collect(),
        };
        let number = list.number;
        *held = Some(Arc::new(list));
        Ok(OfferOutcome::Applied {
            number,
            newly_revoked,
        })
    }

    /// True if the held CRL lists `serial` (magnitude; leading zeros allowed),
    /// for any reason: such a certificate opens no session.
    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        self.held().is_some_and(|h| h.contains(serial))
    }

    /// Whether and why the held CRL revokes `serial`, for the changes that
    /// certificate signed ([`RevocationList::revocation`]).
    pub fn author_revocation(&self, serial: &[u8]) -> Option<crdt::signing::Revocation> {
        self.held().and_then(|h| h.revocation(serial))
    }

    /// Bytes of the held CRL, to gossip onward.
    pub fn current_der(&self) -> Option<Vec<u8>> {
        self.held().map(|h| h.der.clone())
    }

    /// Number of the held CRL.
    pub fn current_number(&self) -> Option<u64> {
        self.held().map(|h| h.number)
    }

    /// The held CRL, if any.
    pub fn current(&self) -> Option<Arc<RevocationList>> {
        self.held()
    }

    /// Whether the held CRL is past its `nextUpdate` at wall time `now`.
    pub fn freshness(&self, now: OffsetDateTime) -> CrlFreshness {
        match self.held() {
            None => CrlFreshness::NoneHeld,
            Some(h) => match h.next_update {
                Some(next) if now > next => CrlFreshness::Overdue {
                    number: h.number,
                    next_update: next,
                },
                next_update => CrlFreshness::Current {
                    number: h.number,
                    next_update,
                },
            },
        }
    }
}
