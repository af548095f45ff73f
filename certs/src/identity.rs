//! Who a certificate says its holder is: [`NodeIdentity`] parsed from a leaf.
//!
//! Model: a Kizuna node certificate carries exactly three facts that the rest
//! of the system relies on: the node id (subject CN, repeated as the only DNS
//! SAN `<node-id>.kizuna`), the role (one non-critical extension with OID
//! [`ROLE_OID_STR`] whose value is a DER UTF8String such as `"clinic"`), and the
//! serial number (what a CRL revokes). [`parse_leaf`] extracts them and fails
//! closed on anything unusual: a missing, unknown, duplicated or malformed
//! role, a missing or invalid node id, a CA certificate, the wrong extended key
//! usage, malformed DER, or an input larger than [`MAX_CERT_DER_LEN`]. The
//! parser runs inside a panic boundary, so hostile bytes from a peer can never
//! take the node down (E-3, I-34).
//!
//! `parse_leaf` does **not** check signatures or validity dates; that is the
//! job of the verifiers in [`crate::tls`] (chain) and of [`crate::clock`]
//! (own certificate vs. device clock). Use it on certificates that have been
//! verified, or on your own certificate at startup.

use crdt::{NodeId, Role};
use std::panic::{catch_unwind, AssertUnwindSafe};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Private OID of the Kizuna role extension, as arcs.
///
/// It lives under IANA Private Enterprise Number 32473, which RFC 5612 reserves
/// for documentation and examples, so it cannot collide with any real
/// enterprise's extension. Before production, Kizuna should register its own
/// PEN (free at IANA) and move the role to `1.3.6.1.4.1.<PEN>.1.1`; until then
/// this constant is the only place that changes.
pub const ROLE_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 32473, 5149, 1];
/// Private OID of the extension binding the node's Ed25519 change-signing
/// key (see `crdt::signing`): a DER OCTET STRING of the 32-byte public key.
pub const SIGNING_KEY_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 32473, 5149, 2];
/// [`ROLE_OID`] in dotted form, for messages and documentation.
pub const ROLE_OID_STR: &str = "1.3.6.1.4.1.32473.5149.1";
/// DNS suffix of node SANs: node `shelter-12` is `shelter-12.kizuna`.
pub const NODE_DNS_SUFFIX: &str = ".kizuna";
/// Largest certificate DER we parse. Our ECDSA leaves are about 600 bytes.
pub const MAX_CERT_DER_LEN: usize = 16 * 1024;
/// Longest role string we quote back in an error message.
const MAX_QUOTED_ROLE: usize = 32;

/// The identity a verified node certificate asserts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    pub node_id: NodeId,
    pub role: Role,
    /// Serial number as its unsigned big-endian magnitude, without leading
    /// zero bytes (so it compares equal to the same serial read from a CRL).
    pub serial: Vec<u8>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// The Ed25519 key the node signs its changes with; `None` in a
    /// certificate issued before changes were signed (such a node must be
    /// issued a new certificate to write).
    pub signing_key: Option<[u8; 32]>,
}

impl NodeIdentity {
    /// The serial as lowercase hex, for logs and the CA state file.
    pub fn serial_hex(&self) -> String {
        hex(&self.serial)
    }
}

/// Why a certificate is not an acceptable Kizuna node certificate.
///
/// Every role problem renders as "certificate has no valid Kizuna role
/// (found …)" so the startup error of I-5 reads the same for all of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// The input exceeds [`MAX_CERT_DER_LEN`]; it was not parsed at all.
    #[error("certificate is {len} bytes, larger than the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    /// The bytes are not a DER X.509 certificate (random, truncated, trailing
    /// garbage, or an extension we must read is itself malformed).
    #[error("certificate is not valid DER: {0}")]
    MalformedDer(String),
    /// The X.509 parser panicked on this input; the input is rejected.
    #[error("certificate parser failed unexpectedly on this input; rejected")]
    ParserPanic,
    /// basicConstraints says CA:true: a CA certificate presented as a node.
    #[error("a CA certificate (basicConstraints CA:true) cannot be used as a node certificate")]
    CaAsLeaf,
    /// The extended key usage extension is absent or lacks serverAuth or
    /// clientAuth; every node is both a TLS server and client.
    #[error(
        "certificate extended key usage must include serverAuth and clientAuth (missing {missing})"
    )]
    WrongEku { missing: &'static str },
    /// No extension with [`ROLE_OID`].
    #[error("certificate has no valid Kizuna role (found no role extension {ROLE_OID_STR})")]
    RoleMissing,
    /// The role extension holds a well-formed string that is not a role.
    #[error("certificate has no valid Kizuna role (found unknown role {0:?})")]
    UnknownRole(String),
    /// More than one role extension (even if they agree).
    #[error("certificate has no valid Kizuna role (found {} role extensions: {})", found.len(), found.join(", "))]
    SeveralRoles { found: Vec<String> },
    /// The role extension value is not a DER UTF8String.
    #[error("certificate has no valid Kizuna role (found a malformed role value: {0})")]
    RoleMalformed(&'static str),
    /// The subject has no common name (or several).
    #[error("certificate subject has no single common name carrying the node id")]
    NodeIdMissing,
    /// The subject CN is not a valid node id.
    #[error("certificate node id is invalid: {0}")]
    NodeIdInvalid(String),
    /// The SAN list is not exactly `<node-id>.kizuna`.
    #[error("certificate SAN must be exactly the DNS name {expected:?} (found {found:?})")]
    NodeIdSanMismatch {
        expected: String,
        found: Vec<String>,
    },
}

impl CertError {
    /// True for the role variants (missing, unknown, several, malformed).
    pub fn is_role_error(&self) -> bool {
        matches!(
            self,
            CertError::RoleMissing
                | CertError::UnknownRole(_)
                | CertError::SeveralRoles { .. }
                | CertError::RoleMalformed(_)
        )
    }
}

/// Parse a leaf certificate into the identity it asserts, failing closed.
///
/// Never panics: the parser runs behind `catch_unwind` and the input size is
/// bounded before parsing.
pub fn parse_leaf(der: &[u8]) -> Result<NodeIdentity, CertError> {
    if der.len() > MAX_CERT_DER_LEN {
        return Err(CertError::TooLarge {
            len: der.len(),
            max: MAX_CERT_DER_LEN,
        });
    }
    match catch_unwind(AssertUnwindSafe(|| parse_leaf_inner(der))) {
        Ok(result) => result,
        Err(_) => Err(CertError::ParserPanic),
    }
}

fn parse_leaf_inner(der: &[u8]) -> Result<NodeIdentity, CertError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| CertError::MalformedDer(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertError::MalformedDer(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        )));
    }
    let malformed = |e: x509_parser::error::X509Error| CertError::MalformedDer(e.to_string());

    // A CA certificate is never a node, whatever else it carries.
    if let Some(bc) = cert.basic_constraints().map_err(malformed)? {
        if bc.value.ca {
            return Err(CertError::CaAsLeaf);
        }
    }

    match cert.extended_key_usage().map_err(malformed)? {
        None => {
            return Err(CertError::WrongEku {
                missing: "serverAuth and clientAuth",
            })
        }
        Some(eku) => match (eku.value.server_auth, eku.value.client_auth) {
            (true, true) => {}
            (false, true) => {
                return Err(CertError::WrongEku {
                    missing: "serverAuth",
                })
            }
            (true, false) => {
                return Err(CertError::WrongEku {
                    missing: "clientAuth",
                })
            }
            (false, false) => {
                return Err(CertError::WrongEku {
                    missing: "serverAuth and clientAuth",
                })
            }
        },
    }

    let role = role_of(&cert)?;

    let mut cns = cert.subject().iter_common_name();
    let cn = match (cns.next(), cns.next()) {
        (Some(cn), None) => cn.as_str().map_err(|_| CertError::NodeIdMissing)?,
        _ => return Err(CertError::NodeIdMissing),
    };
    let node_id = NodeId::new(cn).map_err(|e| CertError::NodeIdInvalid(e.to_string()))?;

    let expected_san = format!("{node_id}{NODE_DNS_SUFFIX}");
    let found: Vec<String> = match cert.subject_alternative_name().map_err(malformed)? {
        None => Vec::new(),
        Some(san) => san
            .value
            .general_names
            .iter()
            .map(|name| match name {
                GeneralName::DNSName(s) => (*s).to_string(),
                other => format!("{other:?}"),
            })
            .collect(),
    };
    if found.len() != 1 || found[0] != expected_san {
        return Err(CertError::NodeIdSanMismatch {
            expected: expected_san,
            found,
        });
    }

    let validity = cert.validity();
    Ok(NodeIdentity {
        node_id,
        role,
        serial: normalize_serial(cert.tbs_certificate.raw_serial()),
        not_before: validity.not_before.to_datetime(),
        not_after: validity.not_after.to_datetime(),
        signing_key: signing_key_of(&cert)?,
    })
}

/// The signing-key extension's key, if present exactly once and well formed.
fn signing_key_of(cert: &X509Certificate<'_>) -> Result<Option<[u8; 32]>, CertError> {
    match extension_values(cert, SIGNING_KEY_OID).as_slice() {
        [] => Ok(None),
        [v] if v.len() == 34 && v[0] == 0x04 && v[1] == 32 => {
            let mut k = [0u8; 32];
            k.copy_from_slice(&v[2..]);
            Ok(Some(k))
        }
        _ => Err(CertError::MalformedDer(
            "the change-signing key extension is malformed or repeated".into(),
        )),
    }
}

/// The values of every extension of `cert` with this OID (a well-formed
/// certificate has at most one).
fn extension_values<'c>(cert: &'c X509Certificate<'_>, oid: &[u64]) -> Vec<&'c [u8]> {
    cert.extensions()
        .iter()
        .filter(|ext| {
            ext.oid
                .iter()
                .is_some_and(|arcs| arcs.eq(oid.iter().copied()))
        })
        .map(|ext| ext.value)
        .collect()
}

/// DER encoding of a signing key as the extension value: an OCTET STRING.
pub fn encode_signing_key(key: &[u8; 32]) -> Vec<u8> {
    let mut v = vec![0x04, 32];
    v.extend_from_slice(key);
    v
}

/// Find the single role extension and decode it.
fn role_of(cert: &X509Certificate<'_>) -> Result<Role, CertError> {
    match extension_values(cert, ROLE_OID).as_slice() {
        [] => Err(CertError::RoleMissing),
        [one] => {
            let s = decode_utf8_string(one)?;
            s.parse::<Role>()
                .map_err(|_| CertError::UnknownRole(quote_limited(s)))
        }
        several => Err(CertError::SeveralRoles {
            found: several
                .iter()
                .map(|v| match decode_utf8_string(v) {
                    Ok(s) => format!("{:?}", quote_limited(s)),
                    Err(_) => "<malformed>".to_string(),
                })
                .collect(),
        }),
    }
}

fn quote_limited(s: &str) -> String {
    s.chars().take(MAX_QUOTED_ROLE).collect()
}

/// Decode a DER UTF8String (tag 0x0C, definite length, nothing after it).
fn decode_utf8_string(v: &[u8]) -> Result<&str, CertError> {
    let (&tag, rest) = v
        .split_first()
        .ok_or(CertError::RoleMalformed("empty value"))?;
    if tag != 0x0C {
        return Err(CertError::RoleMalformed("not a UTF8String"));
    }
    let (&len0, rest) = rest
        .split_first()
        .ok_or(CertError::RoleMalformed("truncated length"))?;
    let (len, body) = match len0 {
        n if n < 0x80 => (usize::from(n), rest),
        0x81 => {
            let (&n, body) = rest
                .split_first()
                .ok_or(CertError::RoleMalformed("truncated length"))?;
            if n < 0x80 {
                return Err(CertError::RoleMalformed("non-minimal length"));
            }
            (usize::from(n), body)
        }
        _ => return Err(CertError::RoleMalformed("length too long")),
    };
    if body.len() != len {
        return Err(CertError::RoleMalformed("length does not match the value"));
    }
    std::str::from_utf8(body).map_err(|_| CertError::RoleMalformed("not UTF-8"))
}

/// DER encoding of a role as the extension value: a UTF8String.
pub fn encode_role(role: Role) -> Vec<u8> {
    let s = role.as_str().as_bytes();
    debug_assert!(s.len() < 0x80);
    let mut out = Vec::with_capacity(2 + s.len());
    out.push(0x0C);
    out.push(s.len() as u8);
    out.extend_from_slice(s);
    out
}

/// Strip leading zero bytes of a DER INTEGER's content (keeping one for 0).
pub fn normalize_serial(raw: &[u8]) -> Vec<u8> {
    let first = raw
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    raw[first..].to_vec()
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Inverse of [`hex`]; `None` on odd length or a non-hex digit.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_roundtrip() {
        for role in Role::ALL {
            assert_eq!(
                decode_utf8_string(&encode_role(role)).unwrap(),
                role.as_str()
            );
        }
    }

    #[test]
    fn malformed_role_values() {
        assert_eq!(
            decode_utf8_string(&[]),
            Err(CertError::RoleMalformed("empty value"))
        );
        assert_eq!(
            decode_utf8_string(&[0x13, 1, b'a']),
            Err(CertError::RoleMalformed("not a UTF8String"))
        );
        assert_eq!(
            decode_utf8_string(&[0x0C, 5, b'a']),
            Err(CertError::RoleMalformed("length does not match the value"))
        );
        assert_eq!(
            decode_utf8_string(&[0x0C, 1, 0xff]),
            Err(CertError::RoleMalformed("not UTF-8"))
        );
        assert_eq!(
            decode_utf8_string(&[0x0C, 0x82, 0, 1, b'a']),
            Err(CertError::RoleMalformed("length too long"))
        );
    }

    #[test]
    fn serial_normalisation() {
        assert_eq!(normalize_serial(&[0, 0x80, 1]), vec![0x80, 1]);
        assert_eq!(normalize_serial(&[0]), vec![0]);
        assert_eq!(normalize_serial(&[0, 0]), vec![0]);
        assert_eq!(unhex(&hex(&[0xde, 0xad])), Some(vec![0xde, 0xad]));
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn oversized_and_garbage_inputs() {
        assert!(matches!(
            parse_leaf(&vec![0x30; MAX_CERT_DER_LEN + 1]),
            Err(CertError::TooLarge { .. })
        ));
        assert!(matches!(
            parse_leaf(b"hello"),
            Err(CertError::MalformedDer(_))
        ));
        assert!(matches!(parse_leaf(&[]), Err(CertError::MalformedDer(_))));
    }
}
