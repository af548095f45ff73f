//! The municipal certificate authority: create it, issue node certificates,
//! revoke them.
//!
//! Model: a CA is a directory kept on the operator's offline machine:
//!
//! | file | content |
//! |---|---|
//! | `ca.crt.pem` | self-signed CA certificate (ECDSA P-256, pathLen 0, valid [`CA_VALIDITY_DAYS`]) |
//! | `ca.key.pem` | CA private key, PKCS#8, mode 0600 |
//! | `ca.state.json` | every certificate issued (node id, role, serial, validity, revocation time) and the last CRL number |
//! | `crl.der` | the newest signed CRL, written by [`revoke`] |
//!
//! [`init_ca`] creates the directory and refuses to overwrite an existing CA.
//! [`issue`] writes `node.crt.pem`, `node.key.pem` (0600) and a copy of
//! `ca.crt.pem` into an output directory that the node loads with
//! [`crate::creds::NodeCredentials::load_dir`]. [`revoke`] marks every
//! certificate of a node id as revoked and signs a new cumulative CRL whose
//! number is strictly greater than any before; nodes gossip it and apply it
//! with [`crate::crl::RevocationState::offer`].
//!
//! Node certificates: subject CN = node id, the only SAN is the DNS name
//! `<node-id>.kizuna`, the role is a non-critical extension
//! ([`crate::identity::ROLE_OID_STR`], DER UTF8String), basicConstraints
//! CA:false, EKU serverAuth + clientAuth, a random 128-bit serial, and a
//! `notBefore` one hour ([`BACKDATE`]) before issuance so that a node whose
//! clock lags the CA's by a few minutes still accepts its brand-new peers.
//!
//! The state file is written *before* the certificate files, so a certificate
//! can never exist that the CA could not revoke. Each `*_at` function takes
//! the wall-clock time as an argument; the plain versions use the system clock.

use crate::fsutil::{write_atomic, write_new};
use crate::identity::{
    encode_role, hex, normalize_serial, unhex, NodeIdentity, NODE_DNS_SUFFIX, ROLE_OID,
};
use crdt::{NodeId, Role};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CustomExtension,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevocationReason, RevokedCertParams, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

pub const CA_CERT_FILE: &str = "ca.crt.pem";
pub const CA_KEY_FILE: &str = "ca.key.pem";
pub const CA_STATE_FILE: &str = "ca.state.json";
pub const CRL_FILE: &str = "crl.der";
pub const NODE_CERT_FILE: &str = "node.crt.pem";
pub const NODE_KEY_FILE: &str = "node.key.pem";

/// Lifetime of a municipal CA certificate.
pub const CA_VALIDITY_DAYS: i64 = 20 * 365;
/// Longest node certificate lifetime [`issue`] accepts.
pub const MAX_NODE_VALIDITY_DAYS: u32 = 10 * 365;
/// `nextUpdate - thisUpdate` of the CRLs we sign. Nodes keep enforcing an
/// overdue CRL (see [`crate::crl::CrlFreshness`]); this only tells the UI when
/// the operator should have published a newer one.
pub const CRL_NEXT_UPDATE_DAYS: i64 = 30;
/// How far `notBefore` is set before the issuing time.
pub const BACKDATE: Duration = Duration::hours(1);
/// Longest CA name.
pub const MAX_CA_NAME_LEN: usize = 64;

/// Why a CA operation failed. Each variant names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// `init_ca` found an existing CA file, or `issue` an existing node key.
    #[error("{} already exists; refusing to overwrite it", path.display())]
    AlreadyExists { path: PathBuf },
    /// A CA file is absent (wrong `--ca-dir`, or the CA was never created).
    #[error("{} not found (is this a CA directory created by init-ca?)", path.display())]
    Missing { path: PathBuf },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// A PEM file does not hold what it should.
    #[error("{}: {reason}", path.display())]
    BadPem { path: PathBuf, reason: String },
    /// `ca.key.pem` is not the key of `ca.crt.pem`.
    #[error("{} does not match the certificate {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    /// `ca.state.json` is unreadable JSON or violates an invariant.
    #[error("{}: corrupt CA state: {reason}", path.display())]
    CorruptState { path: PathBuf, reason: String },
    /// The CA name is empty, too long or has control characters.
    #[error("invalid CA name {0:?}: 1 to 64 characters, no control characters")]
    InvalidName(String),
    /// The requested validity is 0 or above [`MAX_NODE_VALIDITY_DAYS`].
    #[error("invalid validity of {days} days: must be 1 to {MAX_NODE_VALIDITY_DAYS}")]
    InvalidValidity { days: u32 },
    /// `revoke` was asked about a node id this CA never issued to.
    #[error("this CA never issued a certificate to node {0}")]
    UnknownNode(NodeId),
    /// `revoke --serial` named a serial this CA never issued to the node.
    #[error("this CA never issued certificate {serial} to node {node}")]
    UnknownSerial { node: NodeId, serial: String },
    /// rcgen refused to build or sign something.
    #[error("signing failed: {0}")]
    Signing(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CaError + '_ {
    move |source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            CaError::AlreadyExists {
                path: path.to_path_buf(),
            }
        } else if source.kind() == io::ErrorKind::NotFound {
            CaError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            CaError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

fn signing(e: rcgen::Error) -> CaError {
    CaError::Signing(e.to_string())
}

/// One certificate the CA issued, as recorded in `ca.state.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedRecord {
    pub node_id: NodeId,
    pub role: Role,
    /// Serial magnitude in lowercase hex (see [`NodeIdentity::serial`]).
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// Unix seconds of revocation, if revoked.
    pub revoked_at: Option<i64>,
    /// Why it was revoked; none for a certificate revoked before reasons
    /// were recorded (its CRL entry says "unspecified", which nodes treat
    /// as a compromise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation_reason: Option<RevokeReason>,
}

/// Why a certificate is revoked: the CRL entry's reason code, which
/// decides what becomes of the changes it signed (see `crdt::signing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RevokeReason {
    /// Replaced by a newer certificate of the same node (a rotation), its
    /// key not lost: it opens no session any more, but the changes it
    /// signed stay valid.
    Superseded,
    /// Its key may be in other hands (a lost or stolen tablet): it opens
    /// no session, and the changes it signed are refused everywhere.
    KeyCompromise,
}

impl RevokeReason {
    fn crl_reason(reason: Option<RevokeReason>) -> RevocationReason {
        match reason {
            Some(RevokeReason::Superseded) => RevocationReason::Superseded,
            Some(RevokeReason::KeyCompromise) => RevocationReason::KeyCompromise,
            None => RevocationReason::Unspecified,
        }
    }
}

/// Content of `ca.state.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaState {
    pub version: u32,
    pub name: String,
    /// Number of the last CRL signed; 0 before the first.
    pub crl_number: u64,
    pub issued: Vec<IssuedRecord>,
}

impl CaState {
    const VERSION: u32 = 1;

    fn check(&self) -> Result<(), String> {
        if self.version != Self::VERSION {
            return Err(format!("unsupported version {}", self.version));
        }
        let mut serials = std::collections::BTreeSet::new();
        for r in &self.issued {
            if unhex(&r.serial).is_none_or(|s| s.is_empty()) {
                return Err(format!("serial {:?} of {} is not hex", r.serial, r.node_id));
            }
            if !serials.insert(r.serial.as_str()) {
                return Err(format!("serial {} recorded twice", r.serial));
            }
        }
        Ok(())
    }
}

/// What [`init_ca`] wrote.
#[derive(Debug, Clone)]
pub struct CaCreated {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub state_path: PathBuf,
}

/// What [`issue`] wrote.
#[derive(Debug, Clone)]
pub struct Issued {
    pub identity: NodeIdentity,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub ca_cert_path: PathBuf,
}

/// What [`revoke`] did.
#[derive(Debug, Clone)]
pub struct Revoked {
    pub crl_path: PathBuf,
    pub crl_number: u64,
    /// Serials (hex) revoked by this call (or changed from superseded to
    /// compromised); empty if all were revoked so before.
    pub newly_revoked: Vec<String>,
    /// Every serial (hex) the new CRL lists.
    pub listed: Vec<String>,
}

fn check_name(name: &str) -> Result<(), CaError> {
    if name.trim().is_empty()
        || name.chars().count() > MAX_CA_NAME_LEN
        || name.chars().any(char::is_control)
    {
        return Err(CaError::InvalidName(
            name.chars().take(MAX_CA_NAME_LEN).collect(),
        ));
    }
    Ok(())
}

/// A fresh positive 128-bit serial (first byte in 0x40..=0x7f, so it is
/// exactly 16 bytes in DER and never negative).
fn random_serial() -> Result<Vec<u8>, CaError> {
    let mut buf = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut buf)
        .map_err(|_| CaError::Signing("system random number generator failed".into()))?;
    buf[0] = (buf[0] & 0x3f) | 0x40;
    Ok(buf.to_vec())
}

/// Create a municipal CA in `dir` (created if absent) using the system clock.
pub fn init_ca(dir: &Path, name: &str) -> Result<CaCreated, CaError> {
    init_ca_at(dir, name, OffsetDateTime::now_utc())
}

/// [`init_ca`] with an explicit issuing time.
pub fn init_ca_at(dir: &Path, name: &str, now: OffsetDateTime) -> Result<CaCreated, CaError> {
    check_name(name)?;
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let state_path = dir.join(CA_STATE_FILE);
    for p in [&cert_path, &key_path, &state_path] {
        if p.exists() {
            return Err(CaError::AlreadyExists { path: p.clone() });
        }
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(signing)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Kizuna municipal CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
    params.key_identifier_method = KeyIdMethod::Sha256;
    let cert = params.self_signed(&key).map_err(signing)?;

    // The key first, with create_new: a concurrent init_ca loses here.
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600).map_err(io_err(&key_path))?;
    let state = CaState {
        version: CaState::VERSION,
        name: name.to_string(),
        crl_number: 0,
        issued: Vec::new(),
    };
    save_state(&state_path, &state)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644).map_err(io_err(&cert_path))?;
    Ok(CaCreated {
        cert_path,
        key_path,
        state_path,
    })
}

fn save_state(path: &Path, state: &CaState) -> Result<(), CaError> {
    state.check().map_err(|reason| CaError::CorruptState {
        path: path.to_path_buf(),
        reason,
    })?;
    let mut json = serde_json::to_vec_pretty(state).map_err(|e| CaError::CorruptState {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    json.push(b'\n');
    write_atomic(path, &json, 0o600).map_err(io_err(path))
}

fn load_state(path: &Path) -> Result<CaState, CaError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let state: CaState = serde_json::from_slice(&bytes).map_err(|e| CaError::CorruptState {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    state.check().map_err(|reason| CaError::CorruptState {
        path: path.to_path_buf(),
        reason,
    })?;
    Ok(state)
}

/// A loaded CA: its signing key, its certificate and the state file.
pub struct LoadedCa {
    pub dir: PathBuf,
    pub cert_der: CertificateDer<'static>,
    pub cert_pem: String,
    pub state: CaState,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for LoadedCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("LoadedCa")
            .field("dir", &self.dir)
            .field("name", &self.state.name)
            .finish_non_exhaustive()
    }
}

impl LoadedCa {
    /// Load the CA in `dir`, checking that key and certificate belong together.
    pub fn load(dir: &Path) -> Result<LoadedCa, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| CaError::BadPem {
                path: cert_path.clone(),
                reason: format!("no certificate: {e}"),
            })?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::BadPem {
            path: key_path.clone(),
            reason: format!("no usable private key: {e}"),
        })?;
        if crate::creds::spki_raw_key(&cert_der).as_deref() != Some(key.public_key_raw()) {
            return Err(CaError::KeyMismatch {
                key: key_path,
                cert: cert_path,
            });
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| CaError::BadPem {
            path: cert_path.clone(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
        let state = load_state(&dir.join(CA_STATE_FILE))?;
        Ok(LoadedCa {
            dir: dir.to_path_buf(),
            cert_der,
            cert_pem,
            state,
            issuer,
        })
    }

    /// The rcgen issuer, for tests and tools that sign unusual certificates.
    pub fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

/// The extension carrying `role`, as rcgen builds it (non-critical).
pub fn role_extension(role: Role) -> CustomExtension {
    CustomExtension::from_oid_content(ROLE_OID, encode_role(role))
}

/// The extension binding a node's change-signing key (non-critical).
pub fn signing_key_extension(key: &[u8; 32]) -> CustomExtension {
    CustomExtension::from_oid_content(
        crate::identity::SIGNING_KEY_OID,
        crate::identity::encode_signing_key(key),
    )
}

/// Certificate parameters of a standard node certificate, without serial.
pub fn node_params(
    role: Role,
    node_id: &NodeId,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, CaError> {
    let mut params =
        CertificateParams::new(vec![format!("{node_id}{NODE_DNS_SUFFIX}")]).map_err(signing)?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, node_id.as_str());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.custom_extensions = vec![role_extension(role)];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    Ok(params)
}

/// Issue a node certificate using the system clock. See [`issue_at`].
pub fn issue(
    ca_dir: &Path,
    role: Role,
    node_id: &NodeId,
    out_dir: &Path,
    validity_days: u32,
) -> Result<Issued, CaError> {
    issue_at(
        ca_dir,
        role,
        node_id,
        out_dir,
        validity_days,
        OffsetDateTime::now_utc(),
    )
}

/// Issue a certificate for `node_id` with `role`, valid from `now - BACKDATE`
/// for `validity_days`, and write it with its key and the CA certificate into
/// `out_dir`. Refuses to overwrite an existing `node.key.pem`.
pub fn issue_at(
    ca_dir: &Path,
    role: Role,
    node_id: &NodeId,
    out_dir: &Path,
    validity_days: u32,
    now: OffsetDateTime,
) -> Result<Issued, CaError> {
    issue_sealed_at(ca_dir, role, node_id, out_dir, validity_days, now, None)
}

/// [`issue_at`], writing `node.key.pem` sealed with `seal` (the node's
/// storage key, [`crate::storagekey`]) when given: the plain key never
/// reaches the disk.
pub fn issue_sealed_at(
    ca_dir: &Path,
    role: Role,
    node_id: &NodeId,
    out_dir: &Path,
    validity_days: u32,
    now: OffsetDateTime,
    seal: Option<&crate::storagekey::StorageKey>,
) -> Result<Issued, CaError> {
    if validity_days == 0 || validity_days > MAX_NODE_VALIDITY_DAYS {
        return Err(CaError::InvalidValidity {
            days: validity_days,
        });
    }
    let mut ca = LoadedCa::load(ca_dir)?;
    let cert_path = out_dir.join(NODE_CERT_FILE);
    let key_path = out_dir.join(NODE_KEY_FILE);
    let ca_cert_path = out_dir.join(CA_CERT_FILE);
    if key_path.exists() {
        return Err(CaError::AlreadyExists { path: key_path });
    }

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(signing)?;
    let mut params = node_params(
        role,
        node_id,
        now - BACKDATE,
        now + Duration::days(i64::from(validity_days)),
    )?;
    // The change-signing key is derived from the node key, so it needs no
    // file of its own; the certificate binds its public half.
    let seed = zeroize::Zeroizing::new(crdt::signing::seed_from_node_key(&key.serialize_der()));
    params
        .custom_extensions
        .push(signing_key_extension(&crdt::signing::public_key(&seed)));
    let serial = loop {
        let s = random_serial()?;
        if !ca.state.issued.iter().any(|r| r.serial == hex(&s)) {
            break s;
        }
    };
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let cert = params.signed_by(&key, &ca.issuer).map_err(signing)?;

    // Check what we are about to hand out with the same parser peers use.
    let identity = crate::identity::parse_leaf(cert.der())
        .map_err(|e| CaError::Signing(format!("issued certificate does not parse back: {e}")))?;
    assert_eq!(identity.node_id, *node_id);
    assert_eq!(identity.role, role);
    assert_eq!(identity.serial, normalize_serial(&serial));
    assert!(identity.signing_key.is_some());

    // Record before writing, so every certificate in the wild is revocable.
    ca.state.issued.push(IssuedRecord {
        node_id: node_id.clone(),
        role,
        serial: identity.serial_hex(),
        not_before: identity.not_before.unix_timestamp(),
        not_after: identity.not_after.unix_timestamp(),
        revoked_at: None,
        revocation_reason: None,
    });
    save_state(&ca_dir.join(CA_STATE_FILE), &ca.state)?;

    fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let key_pem = match seal {
        None => zeroize::Zeroizing::new(key.serialize_pem()),
        Some(k) => zeroize::Zeroizing::new(
            crate::storagekey::seal(&zeroize::Zeroizing::new(key.serialize_der()), k)
                .map_err(|e| CaError::Signing(e.to_string()))?,
        ),
    };
    write_new(&key_path, key_pem.as_bytes(), 0o600).map_err(io_err(&key_path))?;
    write_atomic(&cert_path, cert.pem().as_bytes(), 0o644).map_err(io_err(&cert_path))?;
    write_atomic(&ca_cert_path, ca.cert_pem.as_bytes(), 0o644).map_err(io_err(&ca_cert_path))?;
    Ok(Issued {
        identity,
        cert_path,
        key_path,
        ca_cert_path,
    })
}

/// Revoke every certificate issued to `node_id` as compromised, using the
/// system clock.
pub fn revoke(ca_dir: &Path, node_id: &NodeId) -> Result<Revoked, CaError> {
    revoke_at(ca_dir, node_id, OffsetDateTime::now_utc())
}

/// Revoke every certificate issued to `node_id` as compromised and write a
/// new signed CRL (`crl.der`) listing all revoked certificates, with a CRL
/// number one above the last.
pub fn revoke_at(ca_dir: &Path, node_id: &NodeId, now: OffsetDateTime) -> Result<Revoked, CaError> {
    revoke_serial_at(ca_dir, node_id, None, RevokeReason::KeyCompromise, now)
}

/// [`revoke_at`] limited to one certificate of the node when `serial` (hex,
/// as `certs issue` prints it) is given, for `reason`: after a rotation,
/// the old certificate is revoked as [`RevokeReason::Superseded`] and the
/// new one stays valid. A certificate revoked before as superseded and now
/// as compromised (the old tablet was lost after all) is listed as
/// compromised from this CRL on; a compromise is never downgraded.
pub fn revoke_serial_at(
    ca_dir: &Path,
    node_id: &NodeId,
    serial: Option<&str>,
    reason: RevokeReason,
    now: OffsetDateTime,
) -> Result<Revoked, CaError> {
    let mut ca = LoadedCa::load(ca_dir)?;
    let serial = serial.map(|s| s.trim().to_ascii_lowercase().replace(':', ""));
    let matches = |r: &IssuedRecord| {
        r.node_id == *node_id
            && serial
                .as_ref()
                .is_none_or(|s| r.serial.to_ascii_lowercase() == *s)
    };
    if !ca.state.issued.iter().any(matches) {
        return Err(match serial {
            Some(serial) if ca.state.issued.iter().any(|r| r.node_id == *node_id) => {
                CaError::UnknownSerial {
                    node: node_id.clone(),
                    serial,
                }
            }
            _ => CaError::UnknownNode(node_id.clone()),
        });
    }
    let mut newly_revoked = Vec::new();
    for r in ca.state.issued.iter_mut().filter(|r| matches(r)) {
        if r.revoked_at.is_none() {
            r.revoked_at = Some(now.unix_timestamp());
            r.revocation_reason = Some(reason);
            newly_revoked.push(r.serial.clone());
        } else if reason == RevokeReason::KeyCompromise
            && r.revocation_reason == Some(RevokeReason::Superseded)
        {
            r.revocation_reason = Some(reason);
            newly_revoked.push(r.serial.clone());
        }
    }
    let crl_number = ca
        .state
        .crl_number
        .checked_add(1)
        .ok_or_else(|| CaError::CorruptState {
            path: ca_dir.join(CA_STATE_FILE),
            reason: "CRL number exhausted".into(),
        })?;
    ca.state.crl_number = crl_number;

    let mut revoked_certs = Vec::new();
    let mut listed = Vec::new();
    for r in ca.state.issued.iter().filter(|r| r.revoked_at.is_some()) {
        let serial = unhex(&r.serial).expect("state checked on load");
        let revocation_time =
            OffsetDateTime::from_unix_timestamp(r.revoked_at.unwrap_or(0)).unwrap_or(now);
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial),
            revocation_time,
            reason_code: Some(RevokeReason::crl_reason(r.revocation_reason)),
            invalidity_date: None,
        });
        listed.push(r.serial.clone());
    }
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + Duration::days(CRL_NEXT_UPDATE_DAYS),
        crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&ca.issuer).map_err(signing)?;

    // Check the CRL with the same code nodes use before anyone sees it.
    let parsed = crate::crl::RevocationList::parse(crl.der(), &ca.cert_der)
        .map_err(|e| CaError::Signing(format!("signed CRL does not verify: {e}")))?;
    assert_eq!(parsed.number(), crl_number);
    assert_eq!(parsed.revoked_serials().len(), listed.len());

    // The number is persisted first: a crash afterwards wastes a number but
    // never reuses one.
    save_state(&ca_dir.join(CA_STATE_FILE), &ca.state)?;
    let crl_path = ca_dir.join(CRL_FILE);
    write_atomic(&crl_path, crl.der().as_ref(), 0o644).map_err(io_err(&crl_path))?;
    Ok(Revoked {
        crl_path,
        crl_number,
        newly_revoked,
        listed,
    })
}
