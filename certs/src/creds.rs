//! Loading a node's own credentials (certificate, key, CA) at startup.
//!
//! Model: a node refuses to start unless its credentials are complete and
//! consistent (H-2, I-4, I-5). [`NodeCredentials::load_dir`] reads the three
//! files [`crate::ca::issue`] writes (`node.crt.pem`, `node.key.pem`,
//! `ca.crt.pem`); [`NodeCredentials::load`] takes explicit paths from the
//! config. Every failure is a [`CredsError`] naming the file and the problem:
//! missing, unreadable, group/world-accessible key, bad PEM, key not matching
//! the certificate, certificate not issued by the configured CA, or a
//! certificate without a valid Kizuna role ("certificate has no valid Kizuna
//! role (found …)"). There is no fallback to an insecure mode.
//!
//! The private key may be sealed with the node's storage key
//! ([`crate::storagekey`]; [`NodeCredentials::load_protected`]); on a node
//! that encrypts its data at rest a plain key is refused unless systemd
//! hands it over as a credential.
//!
//! Validity dates are deliberately *not* checked here: a node with a wrong
//! clock must still start and say so (see [`crate::clock`]).

use crate::ca::{CA_CERT_FILE, NODE_CERT_FILE, NODE_KEY_FILE};
use crate::identity::{parse_leaf, CertError, NodeIdentity};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::x509::SubjectPublicKeyInfo;

/// Largest credential file we read (PEM of a certificate or key is ~1 KiB).
pub const MAX_CRED_FILE_LEN: u64 = 64 * 1024;

/// Why the node's own credentials cannot be used. Each names the file(s).
#[derive(Debug, thiserror::Error)]
pub enum CredsError {
    /// The file does not exist.
    #[error("{what} {} is missing", path.display())]
    Missing { what: &'static str, path: PathBuf },
    /// The file exists but cannot be read (permissions, I/O error, too big).
    #[error("{what} {} is unreadable: {source}", path.display())]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The private key is accessible to group or others.
    #[error("private key {} has insecure permissions {mode:04o} (group/others may read it); run: chmod 600 {}", path.display(), path.display())]
    InsecureKeyPermissions { path: PathBuf, mode: u32 },
    /// The file is not PEM of the expected kind.
    #[error("{what} {} is not valid PEM: {reason}", path.display())]
    BadPem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// The private key does not belong to the certificate.
    #[error("private key {} does not match certificate {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    /// The certificate is not a valid Kizuna node certificate (bad role, node
    /// id, EKU, CA flag, DER).
    #[error("{}: {source}", path.display())]
    InvalidOwnCertificate { path: PathBuf, source: CertError },
    /// A sealed key that cannot be opened (no storage key, wrong key,
    /// malformed), or a storage key that cannot be read.
    #[error("{0}")]
    Sealed(#[from] crate::storagekey::KeyError),
    /// Storage encryption is on, but the private key sits in plaintext on
    /// disk (not sealed, not a systemd credential).
    #[error("秘密鍵 {} が平文のままです / private key {} is stored in plaintext on a node that encrypts its data at rest; seal it with: kizuna certs seal --key {} --storage-key-file FILE (or load it as a systemd credential)", path.display(), path.display(), path.display())]
    PlainKeyAtRest { path: PathBuf },
    /// A sealed key, but no storage key was configured to open it.
    #[error("秘密鍵 {} は封印されていますが、暗号鍵が設定されていません / private key {} is sealed, but no storage key is configured ([storage] key_file, key_credential or key_prompt)", path.display(), path.display())]
    SealedWithoutKey { path: PathBuf },
    /// The certificate is not signed by the configured municipal CA.
    #[error("certificate {} was not issued by the CA in {}: {detail}", cert.display(), ca.display())]
    NotIssuedByCa {
        cert: PathBuf,
        ca: PathBuf,
        detail: String,
    },
}

/// A node's own verified credentials.
pub struct NodeCredentials {
    pub identity: NodeIdentity,
    pub cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    pub ca: CertificateDer<'static>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub ca_path: PathBuf,
}

impl std::fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCredentials")
            .field("identity", &self.identity)
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("ca_path", &self.ca_path)
            .finish_non_exhaustive()
    }
}

fn read_limited(what: &'static str, path: &Path) -> Result<Vec<u8>, CredsError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(CredsError::Missing {
                what,
                path: path.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(CredsError::Unreadable {
                what,
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if meta.len() > MAX_CRED_FILE_LEN {
        return Err(CredsError::Unreadable {
            what,
            path: path.to_path_buf(),
            source: io::Error::other(format!(
                "{} bytes, larger than the {MAX_CRED_FILE_LEN}-byte limit",
                meta.len()
            )),
        });
    }
    fs::read(path).map_err(|source| CredsError::Unreadable {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The municipal CA certificate (PEM) at `path`, to check revocation
/// lists against without loading a node's credentials.
pub fn read_ca_cert(path: &Path) -> Result<CertificateDer<'static>, CredsError> {
    read_cert("CA certificate", path)
}

fn read_cert(what: &'static str, path: &Path) -> Result<CertificateDer<'static>, CredsError> {
    let bytes = read_limited(what, path)?;
    CertificateDer::from_pem_slice(&bytes).map_err(|e| CredsError::BadPem {
        what,
        path: path.to_path_buf(),
        reason: format!("no CERTIFICATE block ({e})"),
    })
}

/// The role in a node certificate file, read before the rest of the
/// credentials (the role decides how the private key must be protected).
pub fn peek_role(cert_path: &Path) -> Result<crdt::Role, CredsError> {
    let cert = read_cert("node certificate", cert_path)?;
    parse_leaf(&cert)
        .map(|id| id.role)
        .map_err(|source| CredsError::InvalidOwnCertificate {
            path: cert_path.to_path_buf(),
            source,
        })
}

impl NodeCredentials {
    /// Load `node.crt.pem`, `node.key.pem` and `ca.crt.pem` from `dir`.
    pub fn load_dir(dir: &Path) -> Result<NodeCredentials, CredsError> {
        Self::load(
            &dir.join(NODE_CERT_FILE),
            &dir.join(NODE_KEY_FILE),
            &dir.join(CA_CERT_FILE),
        )
    }

    /// Load and check credentials from explicit paths; the private key
    /// must be plain PKCS#8 PEM.
    pub fn load(
        cert_path: &Path,
        key_path: &Path,
        ca_path: &Path,
    ) -> Result<NodeCredentials, CredsError> {
        Self::load_protected(cert_path, key_path, ca_path, None, false)
    }

    /// Load and check credentials whose private key may be sealed with
    /// the storage key ([`crate::storagekey`]). With `require_protected`
    /// (the node encrypts its data at rest) a plain key is accepted only
    /// from the systemd credentials directory, which systemd keeps in
    /// memory and decrypts itself.
    pub fn load_protected(
        cert_path: &Path,
        key_path: &Path,
        ca_path: &Path,
        storage_key: Option<&crate::storagekey::StorageKey>,
        require_protected: bool,
    ) -> Result<NodeCredentials, CredsError> {
        let cert = read_cert("node certificate", cert_path)?;
        let ca = read_cert("CA certificate", ca_path)?;

        let key_bytes = read_limited("private key", key_path)?;
        let mode = fs::metadata(key_path)
            .map_err(|source| CredsError::Unreadable {
                what: "private key",
                path: key_path.to_path_buf(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(CredsError::InsecureKeyPermissions {
                path: key_path.to_path_buf(),
                mode: mode & 0o7777,
            });
        }
        let key = if crate::storagekey::is_sealed(&key_bytes) {
            let storage_key = storage_key.ok_or_else(|| CredsError::SealedWithoutKey {
                path: key_path.to_path_buf(),
            })?;
            let der = crate::storagekey::unseal(&key_bytes, storage_key, key_path)?;
            PrivateKeyDer::Pkcs8(rustls_pki_types::PrivatePkcs8KeyDer::from(der.to_vec()))
        } else {
            if require_protected && !in_credentials_directory(key_path) {
                return Err(CredsError::PlainKeyAtRest {
                    path: key_path.to_path_buf(),
                });
            }
            PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| CredsError::BadPem {
                what: "private key",
                path: key_path.to_path_buf(),
                reason: format!("no PRIVATE KEY block ({e})"),
            })?
        };

        let identity = parse_leaf(&cert).map_err(|source| CredsError::InvalidOwnCertificate {
            path: cert_path.to_path_buf(),
            source,
        })?;

        let key_raw = key_public_raw(&key).map_err(|reason| CredsError::BadPem {
            what: "private key",
            path: key_path.to_path_buf(),
            reason,
        })?;
        if spki_raw_key(&cert).as_deref() != Some(key_raw.as_slice()) {
            return Err(CredsError::KeyMismatch {
                key: key_path.to_path_buf(),
                cert: cert_path.to_path_buf(),
            });
        }

        check_issued_by(&cert, &ca, &identity).map_err(|detail| CredsError::NotIssuedByCa {
            cert: cert_path.to_path_buf(),
            ca: ca_path.to_path_buf(),
            detail,
        })?;

        Ok(NodeCredentials {
            identity,
            cert,
            key,
            ca,
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            ca_path: ca_path.to_path_buf(),
        })
    }

    /// The private key (for the rustls configs in [`crate::tls`]).
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }
}

/// Is `path` inside `$CREDENTIALS_DIRECTORY` (a systemd credential)?
fn in_credentials_directory(path: &Path) -> bool {
    let Some(dir) = std::env::var_os(crate::storagekey::CREDENTIALS_DIRECTORY) else {
        return false;
    };
    match (fs::canonicalize(dir), fs::canonicalize(path)) {
        (Ok(d), Ok(p)) => p.starts_with(d),
        _ => false,
    }
}

/// Verify the certificate chains to `ca`, evaluated at the certificate's own
/// `notBefore` so that the device clock does not matter here.
fn check_issued_by(
    cert: &CertificateDer<'_>,
    ca: &CertificateDer<'_>,
    identity: &NodeIdentity,
) -> Result<(), String> {
    let anchor = webpki::anchor_from_trusted_cert(ca)
        .map_err(|e| format!("CA certificate unusable: {e}"))?;
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| e.to_string())?;
    let at = u64::try_from(identity.not_before.unix_timestamp())
        .unwrap_or(0)
        .saturating_add(1);
    let algs = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    ee.verify_for_usage(
        algs,
        &[anchor],
        &[],
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(at)),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| match e {
        webpki::Error::UnknownIssuer => "unknown issuer (another CA?)".to_string(),
        other => other.to_string(),
    })
}

/// The raw public key bits of a certificate's SubjectPublicKeyInfo.
pub(crate) fn spki_raw_key(cert: &[u8]) -> Option<Vec<u8>> {
    std::panic::catch_unwind(|| {
        let (_, c) = X509Certificate::from_der(cert).ok()?;
        Some(c.public_key().subject_public_key.data.to_vec())
    })
    .ok()
    .flatten()
}

/// The raw public key bits belonging to a private key.
fn key_public_raw(key: &PrivateKeyDer<'_>) -> Result<Vec<u8>, String> {
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| format!("unsupported or corrupt private key: {e}"))?;
    let spki = signing.public_key().ok_or("cannot derive the public key")?;
    let (_, parsed) = SubjectPublicKeyInfo::from_der(spki.as_ref()).map_err(|e| e.to_string())?;
    Ok(parsed.subject_public_key.data.to_vec())
}
