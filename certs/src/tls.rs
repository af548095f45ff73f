//! Mutual TLS between Kizuna nodes: rustls configs and the verifiers behind them.
//!
//! Model: every connection is TLS 1.3 with ALPN [`ALPN`] (`kizuna/1`), and
//! both sides present a node certificate. One [`PeerTrust`] per node holds the
//! municipal CA (the only trust anchor), the shared
//! [`RevocationState`] and a caller-supplied wall clock ([`WallClock`]). Build
//! the configs once with [`server_config`] and [`client_config`]; because the
//! verifiers consult the `RevocationState` at every handshake, a newly offered
//! CRL applies to the next handshake without rebuilding anything. Session
//! resumption and 0-RTT are disabled so that every connection runs the full
//! verification (E-1, E-12).
//!
//! A peer certificate is accepted only if (in this order) it chains directly
//! to the municipal CA under webpki at the clock's `now` with the right EKU,
//! it is a valid Kizuna node certificate ([`crate::identity::parse_leaf`]: one
//! known role, node id, not a CA), and its serial is not revoked. A client
//! additionally requires that the server's node id equals the expected one:
//! connect with [`server_name_for`]`(expected_node_id)` (from mDNS TXT or static
//! config); there is no "accept any valid node" mode. Rejections surface as
//! `rustls::Error::InvalidCertificate(CertificateError::Other(..))` carrying a
//! [`PeerCertError`]; extract it with [`rejection`]. After the handshake, get
//! the peer's identity with [`peer_identity`] on `peer_certificates()`, and
//! check `alpn_protocol() == Some(ALPN)` (H-1: an older peer fails ALPN).

use crate::clock::fmt_unix;
use crate::creds::NodeCredentials;
use crate::crl::RevocationState;
use crate::identity::{
    hex, parse_leaf, CertError, NodeIdentity, MAX_CERT_DER_LEN, NODE_DNS_SUFFIX,
};
use crdt::NodeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The one application protocol we speak. Bump for incompatible changes.
pub const ALPN: &[u8] = b"kizuna/1";

/// Wall-clock source for certificate validity checks (tests pass a fixed or
/// skewed time; nodes pass [`system_clock`]).
pub type WallClock = Arc<dyn Fn() -> UnixTime + Send + Sync>;

/// The system wall clock.
pub fn system_clock() -> WallClock {
    Arc::new(UnixTime::now)
}

/// Why a peer's certificate was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerCertError {
    /// Not issued by our municipal CA (e.g. another municipality's CA).
    #[error("peer certificate was not issued by this municipality's CA (unknown issuer)")]
    UnknownIssuer,
    /// Self-signed, not issued by any CA we know.
    #[error("peer certificate is self-signed, not issued by this municipality's CA")]
    SelfSigned,
    /// Names our CA as issuer, but our CA key did not sign it (forged, or a
    /// different CA that uses the same name).
    #[error("peer certificate signature does not verify with this municipality's CA key (forged, or another CA with the same name)")]
    BadSignature,
    /// Now is after the certificate's notAfter.
    #[error("peer certificate expired at {}; now is {} (if the peer was issued recently, the device clock may be wrong)", fmt_unix(*not_after), fmt_unix(*now))]
    Expired { now: u64, not_after: u64 },
    /// Now is before the certificate's notBefore; usually our clock is behind.
    #[error("peer certificate is not yet valid: device clock may be wrong: now is {}, certificate valid from {}", fmt_unix(*now), fmt_unix(*not_before))]
    NotYetValid { now: u64, not_before: u64 },
    /// The peer presented a CA certificate as its own.
    #[error("peer presented a CA certificate instead of a node certificate")]
    CaAsLeaf,
    /// The certificate lacks the EKU for its side of the connection.
    #[error("peer certificate is not valid for {usage} (extended key usage)")]
    WrongUsage { usage: &'static str },
    /// The serial is on the CRL we hold.
    #[error("peer certificate of node {node_id} (serial {serial}) is revoked")]
    Revoked { node_id: NodeId, serial: String },
    /// Chains fine but is not a valid Kizuna node certificate (role, id, ...).
    #[error("peer certificate rejected: {0}")]
    Certificate(#[from] CertError),
    /// The server is a valid node, but not the one we meant to reach.
    #[error("expected node {expected} but the peer's certificate is for node {found}")]
    WrongNodeId { expected: NodeId, found: NodeId },
    /// The client was asked to connect without naming the expected node.
    #[error("server name {0:?} is not a Kizuna node name <node-id>.kizuna; the expected node id is required")]
    NotANodeName(String),
    /// Any other chain problem (bad signature, unsupported algorithm, ...).
    #[error("peer certificate chain rejected: {0}")]
    Chain(String),
    /// The verifier panicked on this input; rejected.
    #[error("peer certificate verification failed unexpectedly; rejected")]
    VerifierPanic,
}

impl PeerCertError {
    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// The [`PeerCertError`] inside a rustls error, if the local verifier produced it.
pub fn rejection(err: &rustls::Error) -> Option<&PeerCertError> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref()
        }
        _ => None,
    }
}

/// Errors building configs.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA certificate is not usable as a trust anchor.
    #[error("municipal CA certificate is not a usable trust anchor: {0}")]
    BadCa(webpki::Error),
    /// rustls refused the configuration (e.g. unsupported key).
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// The node's credentials were issued by a CA other than the one in the
    /// revocation state.
    #[error("node credentials and revocation state use different CA certificates")]
    CaMismatch,
}

/// Which end of the connection a peer certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerSide {
    /// The peer is the server (we are the client): needs serverAuth.
    Server,
    /// The peer is the client (we are the server): needs clientAuth.
    Client,
}

/// Everything needed to judge a peer certificate.
pub struct PeerTrust {
    anchor: TrustAnchor<'static>,
    hint: Vec<DistinguishedName>,
    revocation: Arc<RevocationState>,
    clock: WallClock,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for PeerTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTrust")
            .field("crl_number", &self.revocation.current_number())
            .finish_non_exhaustive()
    }
}

impl PeerTrust {
    /// Trust the CA of `revocation` (the municipal CA), with `clock` for time.
    pub fn new(
        revocation: Arc<RevocationState>,
        clock: WallClock,
    ) -> Result<Arc<PeerTrust>, TlsError> {
        let anchor = webpki::anchor_from_trusted_cert(revocation.ca_cert())
            .map_err(TlsError::BadCa)?
            .to_owned();
        let hint = vec![DistinguishedName::from(anchor.subject.to_vec())];
        Ok(Arc::new(PeerTrust {
            anchor,
            hint,
            revocation,
            clock,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }))
    }

    /// The shared revocation state.
    pub fn revocation(&self) -> &Arc<RevocationState> {
        &self.revocation
    }

    /// Verify a peer's end-entity certificate at the clock's now. Intermediates
    /// are never used: node certificates are issued directly by the CA.
    pub fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        side: PeerSide,
    ) -> Result<NodeIdentity, PeerCertError> {
        let now = (self.clock)();
        catch_unwind(AssertUnwindSafe(|| {
            self.verify_peer_at(end_entity, side, now)
        }))
        .unwrap_or(Err(PeerCertError::VerifierPanic))
    }

    /// Verify an author's certificate relayed with its changes: the chain
    /// to the CA and the validity dates, as for a peer, but not revocation,
    /// which is asked per change (a revoked author's changes are
    /// quarantined, not blamed on the relay).
    pub fn verify_author(&self, der: &[u8]) -> Result<NodeIdentity, PeerCertError> {
        let now = (self.clock)();
        let der = CertificateDer::from(der);
        catch_unwind(AssertUnwindSafe(|| {
            self.verify_chain_at(&der, PeerSide::Client, now)
        }))
        .unwrap_or(Err(PeerCertError::VerifierPanic))
    }

    fn verify_peer_at(
        &self,
        ee_der: &CertificateDer<'_>,
        side: PeerSide,
        now: UnixTime,
    ) -> Result<NodeIdentity, PeerCertError> {
        let identity = self.verify_chain_at(ee_der, side, now)?;
        if self.revocation.is_revoked(&identity.serial) {
            return Err(PeerCertError::Revoked {
                node_id: identity.node_id,
                serial: hex(&identity.serial),
            });
        }
        Ok(identity)
    }

    fn verify_chain_at(
        &self,
        ee_der: &CertificateDer<'_>,
        side: PeerSide,
        now: UnixTime,
    ) -> Result<NodeIdentity, PeerCertError> {
        if ee_der.len() > MAX_CERT_DER_LEN {
            return Err(CertError::TooLarge {
                len: ee_der.len(),
                max: MAX_CERT_DER_LEN,
            }
            .into());
        }
        let ee = webpki::EndEntityCert::try_from(ee_der).map_err(|e| match e {
            webpki::Error::BadDer | webpki::Error::TrailingData(_) | webpki::Error::BadDerTime => {
                PeerCertError::Certificate(CertError::MalformedDer(e.to_string()))
            }
            other => PeerCertError::Chain(other.to_string()),
        })?;
        let (usage, usage_name) = match side {
            PeerSide::Server => (webpki::KeyUsage::server_auth(), "serverAuth"),
            PeerSide::Client => (webpki::KeyUsage::client_auth(), "clientAuth"),
        };
        ee.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            std::slice::from_ref(&self.anchor),
            &[],
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::UnknownIssuer if is_self_signed(ee_der) => PeerCertError::SelfSigned,
            webpki::Error::UnknownIssuer => PeerCertError::UnknownIssuer,
            webpki::Error::CertExpired { time, not_after } => PeerCertError::Expired {
                now: time.as_secs(),
                not_after: not_after.as_secs(),
            },
            webpki::Error::CertNotValidYet { time, not_before } => PeerCertError::NotYetValid {
                now: time.as_secs(),
                not_before: not_before.as_secs(),
            },
            webpki::Error::CaUsedAsEndEntity => PeerCertError::CaAsLeaf,
            webpki::Error::InvalidSignatureForPublicKey => PeerCertError::BadSignature,
            #[allow(deprecated)]
            webpki::Error::RequiredEkuNotFound | webpki::Error::RequiredEkuNotFoundContext(_) => {
                PeerCertError::WrongUsage { usage: usage_name }
            }
            other => PeerCertError::Chain(other.to_string()),
        })?;
        Ok(parse_leaf(ee_der)?)
    }

    fn verify_server(
        &self,
        end_entity: &CertificateDer<'_>,
        server_name: &ServerName<'_>,
    ) -> Result<NodeIdentity, PeerCertError> {
        let expected = expected_node(server_name)?;
        let identity = self.verify_peer(end_entity, PeerSide::Server)?;
        if identity.node_id != expected {
            return Err(PeerCertError::WrongNodeId {
                expected,
                found: identity.node_id,
            });
        }
        Ok(identity)
    }
}

/// Node certificates as change-author credentials (see `crdt::signing`):
/// chain and dates checked by [`PeerTrust::verify_author`], the signing key
/// from the certificate's extension, revocation (and its reason) from the
/// live list.
pub struct AuthorVerifier(pub Arc<PeerTrust>);

impl crdt::signing::Verifier for AuthorVerifier {
    fn credential(&self, cred: &[u8]) -> Result<crdt::signing::Author, String> {
        let id = self.0.verify_author(cred).map_err(|e| e.to_string())?;
        let key = id.signing_key.ok_or_else(|| {
            format!(
                "the certificate of {} has no change-signing key (issued before signed changes; issue it again)",
                id.node_id
            )
        })?;
        Ok(crdt::signing::Author {
            node: id.node_id,
            role: id.role,
            key,
            serial: id.serial,
        })
    }
    fn revoked(&self, author: &crdt::signing::Author) -> Option<crdt::signing::Revocation> {
        self.0.revocation.author_revocation(&author.serial)
    }
}

/// The engine trust of a node: it signs with the key derived from its node
/// key and checks authors against the CA and the live revocation list.
/// Refused when the certificate does not bind that key (issued before
/// changes were signed, or for another key).
pub fn engine_trust(
    creds: &crate::NodeCredentials,
    peers: Arc<PeerTrust>,
) -> Result<crdt::signing::Trust, String> {
    let seed = zeroize::Zeroizing::new(crdt::signing::seed_from_node_key(creds.key().secret_der()));
    let signer = crdt::signing::Signer::new(&seed, creds.cert.to_vec());
    if creds.identity.signing_key != Some(signer.public_key()) {
        return Err(format!(
            "{}: この証明書には変更署名用の鍵がありません。`kizuna certs issue` で証明書を発行し直してください / \
             this certificate does not bind the node's change-signing key (issued before changes were signed): \
             issue a new one with `kizuna certs issue`",
            creds.cert_path.display()
        ));
    }
    Ok(crdt::signing::Trust {
        signer: Some(Arc::new(signer)),
        verifier: Arc::new(AuthorVerifier(peers)),
    })
}

fn is_self_signed(der: &[u8]) -> bool {
    X509Certificate::from_der(der).is_ok_and(|(_, c)| c.issuer().as_raw() == c.subject().as_raw())
}

/// The node id a server name refers to (`shelter-1.kizuna` → `shelter-1`).
fn expected_node(server_name: &ServerName<'_>) -> Result<NodeId, PeerCertError> {
    let name = match server_name {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        other => return Err(PeerCertError::NotANodeName(format!("{other:?}"))),
    };
    name.strip_suffix(NODE_DNS_SUFFIX)
        .and_then(|id| NodeId::new(id).ok())
        .ok_or(PeerCertError::NotANodeName(name))
}

/// The TLS server name under which node `node` must be reached.
pub fn server_name_for(node: &NodeId) -> ServerName<'static> {
    ServerName::try_from(format!("{node}{NODE_DNS_SUFFIX}"))
        .expect("a valid node id plus .kizuna is a valid DNS name")
}

/// The identity of the peer after a completed handshake, from
/// `conn.peer_certificates()`. The verifiers already checked the chain.
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Result<NodeIdentity, CertError> {
    match certs.first() {
        Some(ee) => parse_leaf(ee),
        None => Err(CertError::MalformedDer(
            "peer presented no certificate".into(),
        )),
    }
}

#[derive(Debug)]
struct KizunaServerVerifier(Arc<PeerTrust>);

impl ServerCertVerifier for KizunaServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .verify_server(end_entity, server_name)
            .map_err(PeerCertError::into_rustls)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        Some(&self.0.hint)
    }
}

#[derive(Debug)]
struct KizunaClientVerifier(Arc<PeerTrust>);

impl ClientCertVerifier for KizunaClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.0.hint
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .verify_peer(end_entity, PeerSide::Client)
            .map_err(PeerCertError::into_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn check_same_ca(creds: &NodeCredentials, trust: &PeerTrust) -> Result<(), TlsError> {
    if creds.ca.as_ref() != trust.revocation.ca_cert().as_ref() {
        return Err(TlsError::CaMismatch);
    }
    Ok(())
}

/// Server side: presents `creds`, requires and verifies a client certificate.
pub fn server_config(
    creds: &NodeCredentials,
    trust: &Arc<PeerTrust>,
) -> Result<Arc<ServerConfig>, TlsError> {
    check_same_ca(creds, trust)?;
    let mut config = ServerConfig::builder_with_provider(trust.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(KizunaClientVerifier(trust.clone())))
        .with_single_cert(vec![creds.cert.clone()], creds.key().clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption: every connection re-verifies the client (revocation).
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// Client side: presents `creds`, verifies the server against the node id in
/// the server name ([`server_name_for`]).
pub fn client_config(
    creds: &NodeCredentials,
    trust: &Arc<PeerTrust>,
) -> Result<Arc<ClientConfig>, TlsError> {
    check_same_ca(creds, trust)?;
    let mut config = ClientConfig::builder_with_provider(trust.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(KizunaServerVerifier(trust.clone())))
        .with_client_auth_cert(vec![creds.cert.clone()], creds.key().clone_key())?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_early_data = false;
    Ok(Arc::new(config))
}
