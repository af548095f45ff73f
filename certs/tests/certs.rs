//! The `certs` integration suite: real CAs on disk, real rustls handshakes in
//! memory, real signatures. Each negative case asserts the specific error.

use certs::ca::{self, CaError, LoadedCa};
use certs::clock::{clock_sanity, ClockVerdict};
use certs::creds::{CredsError, NodeCredentials};
use certs::crl::{CrlError, CrlFreshness, OfferOutcome, RevocationList, RevocationState};
use certs::identity::{parse_leaf, CertError, MAX_CERT_DER_LEN};
use certs::tls::{
    client_config, peer_identity, rejection, server_config, server_name_for, PeerCertError,
    PeerSide, PeerTrust, WallClock, ALPN,
};
use crdt::{NodeId, Role};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CustomExtension,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, ServerConfig, ServerConnection,
    SignatureScheme,
};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration as StdDuration;
use tempfile::TempDir;
use time::{Duration, OffsetDateTime};

// ---------------------------------------------------------------- fixtures

/// A municipal CA in a temporary directory.
struct Pki {
    tmp: TempDir,
    ca_dir: PathBuf,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let tmp = tempfile::tempdir().unwrap();
        let ca_dir = tmp.path().join("ca");
        ca::init_ca(&ca_dir, name).unwrap();
        Pki { tmp, ca_dir }
    }

    fn loaded(&self) -> LoadedCa {
        LoadedCa::load(&self.ca_dir).unwrap()
    }

    fn ca_der(&self) -> CertificateDer<'static> {
        self.loaded().cert_der
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Issue a standard node certificate through the public CA API and load it.
    fn node(&self, role: Role, id: &str) -> NodeCredentials {
        let out = self.dir(id);
        ca::issue(&self.ca_dir, role, &nid(id), &out, 365).unwrap();
        NodeCredentials::load_dir(&out).unwrap()
    }

    /// A fresh revocation state trusting this CA.
    fn revocation(&self) -> Arc<RevocationState> {
        Arc::new(RevocationState::new(self.ca_der()))
    }

    fn trust(&self, revocation: &Arc<RevocationState>, clock: WallClock) -> Arc<PeerTrust> {
        PeerTrust::new(revocation.clone(), clock).unwrap()
    }

    /// Sign arbitrary leaf parameters with this CA's key.
    fn sign(
        &self,
        params: &CertificateParams,
    ) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.signed_by(&key, self.loaded().issuer()).unwrap();
        (
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

fn nid(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn clock_at(t: OffsetDateTime) -> WallClock {
    let secs = u64::try_from(t.unix_timestamp()).unwrap();
    Arc::new(move || UnixTime::since_unix_epoch(StdDuration::from_secs(secs)))
}

fn system() -> WallClock {
    certs::tls::system_clock()
}

/// Standard node parameters (valid now, role, CN, SAN, EKU) for tweaking.
fn params(role: Role, id: &str) -> CertificateParams {
    let mut p = ca::node_params(
        role,
        &nid(id),
        now() - Duration::hours(1),
        now() + Duration::days(30),
    )
    .unwrap();
    p.serial_number = Some(SerialNumber::from_slice(&[0x42, 0x17, 0x99]));
    p
}

// ------------------------------------------------- in-memory TLS handshakes

/// A hostile or misconfigured peer does not use our builders: it presents
/// whatever certificate it has and accepts anything.
#[derive(Debug)]
struct AcceptAnything;

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn rogue_server(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> Arc<ServerConfig> {
    let mut c = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    c.alpn_protocols = vec![ALPN.to_vec()];
    Arc::new(c)
}

fn rogue_client(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> Arc<ClientConfig> {
    let mut c = ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything))
        .with_client_auth_cert(vec![cert], key)
        .unwrap();
    c.alpn_protocols = vec![ALPN.to_vec()];
    Arc::new(c)
}

struct Outcome {
    client: Result<(), rustls::Error>,
    server: Result<(), rustls::Error>,
    c: ClientConnection,
    s: ServerConnection,
}

impl Outcome {
    fn client_rejection(&self) -> PeerCertError {
        let err = self
            .client
            .as_ref()
            .expect_err("client should have rejected the server");
        rejection(err)
            .unwrap_or_else(|| panic!("client error is not a PeerCertError: {err:?}"))
            .clone()
    }
    fn server_rejection(&self) -> PeerCertError {
        let err = self
            .server
            .as_ref()
            .expect_err("server should have rejected the client");
        rejection(err)
            .unwrap_or_else(|| panic!("server error is not a PeerCertError: {err:?}"))
            .clone()
    }
}

/// Drive a client and a server against each other by copying bytes until
/// both finish or one fails (and its alert reached the other side).
fn handshake(
    client: Arc<ClientConfig>,
    name: ServerName<'static>,
    server: Arc<ServerConfig>,
) -> Outcome {
    let mut c = ClientConnection::new(client, name).unwrap();
    let mut s = ServerConnection::new(server).unwrap();
    let mut client_res = Ok(());
    let mut server_res = Ok(());
    for _ in 0..16 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() && server_res.is_ok() {
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                if let Err(e) = s.process_new_packets() {
                    server_res = Err(e);
                    break;
                }
            }
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() && client_res.is_ok() {
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                if let Err(e) = c.process_new_packets() {
                    client_res = Err(e);
                    break;
                }
            }
        }
        let done = !c.is_handshaking() && !s.is_handshaking();
        let failed = client_res.is_err() || server_res.is_err();
        if (done || failed) && !c.wants_write() && !s.wants_write() {
            break;
        }
    }
    if client_res.is_ok() && server_res.is_ok() {
        assert!(
            !c.is_handshaking() && !s.is_handshaking(),
            "handshake did not finish"
        );
    }
    Outcome {
        client: client_res,
        server: server_res,
        c,
        s,
    }
}

/// Two honest nodes of the same CA with the given revocation states/clocks.
fn honest_pair(
    pki: &Pki,
    client: &NodeCredentials,
    client_rev: &Arc<RevocationState>,
    client_clock: WallClock,
    server: &NodeCredentials,
    server_rev: &Arc<RevocationState>,
    server_clock: WallClock,
) -> Outcome {
    let ct = pki.trust(client_rev, client_clock);
    let st = pki.trust(server_rev, server_clock);
    handshake(
        client_config(client, &ct).unwrap(),
        server_name_for(&server.identity.node_id),
        server_config(server, &st).unwrap(),
    )
}

// --------------------------------------------------------- positive cases

#[test]
fn positive_handshake_extracts_both_identities() {
    let pki = Pki::new("Kizuna CA Sendai");
    let clinic = pki.node(Role::Clinic, "clinic-7");
    let shelter = pki.node(Role::Shelter, "shelter-12");
    let rev = pki.revocation();
    let out = honest_pair(&pki, &shelter, &rev, system(), &clinic, &rev, system());
    out.client.as_ref().unwrap();
    out.server.as_ref().unwrap();
    assert_eq!(out.c.alpn_protocol(), Some(ALPN));
    assert_eq!(out.s.alpn_protocol(), Some(ALPN));

    let seen_by_client = peer_identity(out.c.peer_certificates().unwrap()).unwrap();
    assert_eq!(seen_by_client.node_id, nid("clinic-7"));
    assert_eq!(seen_by_client.role, Role::Clinic);
    assert_eq!(seen_by_client.serial, clinic.identity.serial);
    let seen_by_server = peer_identity(out.s.peer_certificates().unwrap()).unwrap();
    assert_eq!(seen_by_server.node_id, nid("shelter-12"));
    assert_eq!(seen_by_server.role, Role::Shelter);
    assert_eq!(seen_by_server, shelter.identity);
}

#[test]
fn issued_certificate_has_the_documented_shape() {
    let pki = Pki::new("Kizuna CA Sendai");
    let node = pki.node(Role::Ambulance, "amb-3");
    let (_, x) = x509_parser::parse_x509_certificate(&node.cert).unwrap();
    assert!(
        !x.basic_constraints().unwrap().unwrap().value.ca,
        "leaf must say CA:false explicitly"
    );
    let eku = x.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let role_ext = x
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == certs::ROLE_OID_STR)
        .unwrap();
    assert!(!role_ext.critical);
    assert_eq!(role_ext.value, b"\x0c\x09ambulance");
    assert_eq!(
        x.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        "amb-3"
    );
    assert_eq!(node.identity.serial.len(), 16, "random 128-bit serial");

    let state = pki.loaded().state;
    assert_eq!(state.issued.len(), 1);
    assert_eq!(state.issued[0].node_id, nid("amb-3"));
    assert_eq!(state.issued[0].role, Role::Ambulance);
    assert_eq!(state.issued[0].serial, node.identity.serial_hex());
    assert_eq!(
        state.issued[0].not_after,
        node.identity.not_after.unix_timestamp()
    );
    assert_eq!(state.crl_number, 0);
}

#[test]
fn keys_are_written_with_mode_0600_and_ca_is_never_overwritten() {
    let pki = Pki::new("Kizuna CA Sendai");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&pki.ca_dir.join("ca.key.pem")), 0o600);
    pki.node(Role::Hq, "hq-1");
    assert_eq!(mode(&pki.dir("hq-1").join("node.key.pem")), 0o600);

    let before = std::fs::read(pki.ca_dir.join("ca.key.pem")).unwrap();
    let err = ca::init_ca(&pki.ca_dir, "Another").unwrap_err();
    assert!(matches!(err, CaError::AlreadyExists { .. }), "{err}");
    assert_eq!(
        std::fs::read(pki.ca_dir.join("ca.key.pem")).unwrap(),
        before
    );

    // Issuing into a directory that already holds a key is refused too.
    let err = ca::issue(&pki.ca_dir, Role::Hq, &nid("hq-1"), &pki.dir("hq-1"), 365).unwrap_err();
    assert!(matches!(err, CaError::AlreadyExists { .. }), "{err}");
    let err = ca::issue(&pki.ca_dir, Role::Hq, &nid("hq-2"), &pki.dir("hq-2"), 0).unwrap_err();
    assert!(matches!(err, CaError::InvalidValidity { days: 0 }), "{err}");
}

#[test]
fn own_clock_policy() {
    let pki = Pki::new("Kizuna CA Sendai");
    let node = pki.node(Role::Shelter, "shelter-1");
    assert_eq!(clock_sanity(now(), &node.identity), ClockVerdict::Plausible);
    let tablet_2000 = OffsetDateTime::from_unix_timestamp(946_684_800).unwrap();
    let v = clock_sanity(tablet_2000, &node.identity);
    assert!(matches!(v, ClockVerdict::BeforeOwnCertificate { .. }));
    assert!(v.message().unwrap().starts_with("device clock looks wrong"));
    assert!(matches!(
        clock_sanity(now() + Duration::days(400), &node.identity),
        ClockVerdict::AfterOwnCertificateExpiry { .. }
    ));
}

// ------------------------------------------------- negative: chain & time

#[test]
fn client_rejects_server_from_another_municipality() {
    let ours = Pki::new("Kizuna CA Sendai");
    let theirs = Pki::new("Kizuna CA Ishinomaki");
    let me = ours.node(Role::Shelter, "shelter-1");
    let stranger = theirs.node(Role::Hq, "hq-1");
    let ct = ours.trust(&ours.revocation(), system());
    let out = handshake(
        client_config(&me, &ct).unwrap(),
        server_name_for(&nid("hq-1")),
        rogue_server(stranger.cert.clone(), stranger.key().clone_key()),
    );
    assert_eq!(out.client_rejection(), PeerCertError::UnknownIssuer);
    assert!(out
        .client_rejection()
        .to_string()
        .contains("not issued by this municipality's CA"));
}

#[test]
fn server_rejects_client_from_another_municipality() {
    let ours = Pki::new("Kizuna CA Sendai");
    let theirs = Pki::new("Kizuna CA Ishinomaki");
    let twin = Pki::new("Kizuna CA Sendai"); // same name as ours, different key
    let me = ours.node(Role::Hq, "hq-1");
    let st = ours.trust(&ours.revocation(), system());
    for (pki, expected) in [
        (&theirs, PeerCertError::UnknownIssuer),
        (&twin, PeerCertError::BadSignature),
    ] {
        let stranger = pki.node(Role::Shelter, "shelter-9");
        let out = handshake(
            rogue_client(stranger.cert.clone(), stranger.key().clone_key()),
            server_name_for(&nid("hq-1")),
            server_config(&me, &st).unwrap(),
        );
        assert_eq!(out.server_rejection(), expected);
        assert!(out.client.is_err(), "the rogue client must see the alert");
    }
}

#[test]
fn self_signed_leaf_is_rejected() {
    let pki = Pki::new("Kizuna CA Sendai");
    let me = pki.node(Role::Clinic, "clinic-1");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params(Role::Hq, "hq-1").self_signed(&key).unwrap();
    let ct = pki.trust(&pki.revocation(), system());
    let out = handshake(
        client_config(&me, &ct).unwrap(),
        server_name_for(&nid("hq-1")),
        rogue_server(
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        ),
    );
    assert_eq!(out.client_rejection(), PeerCertError::SelfSigned);
}

#[test]
fn ca_certificate_used_as_leaf_is_rejected() {
    let pki = Pki::new("Kizuna CA Sendai");
    let me = pki.node(Role::Shelter, "shelter-1");
    let ca_key_pem = std::fs::read(pki.ca_dir.join("ca.key.pem")).unwrap();
    let ca_key = rustls::pki_types::pem::PemObject::from_pem_slice(&ca_key_pem).unwrap();
    let st = pki.trust(&pki.revocation(), system());
    let out = handshake(
        rogue_client(pki.ca_der(), ca_key),
        server_name_for(&me.identity.node_id),
        server_config(&me, &st).unwrap(),
    );
    assert_eq!(out.server_rejection(), PeerCertError::CaAsLeaf);
    // The identity parser refuses it too.
    assert_eq!(parse_leaf(&pki.ca_der()), Err(CertError::CaAsLeaf));
}

#[test]
fn expired_certificate_is_rejected() {
    let pki = Pki::new("Kizuna CA Sendai");
    let me = pki.node(Role::Shelter, "shelter-1");
    let old_dir = pki.dir("old");
    ca::issue_at(
        &pki.ca_dir,
        Role::Hq,
        &nid("hq-old"),
        &old_dir,
        30,
        now() - Duration::days(400),
    )
    .unwrap();
    let old = NodeCredentials::load_dir(&old_dir).unwrap(); // loading ignores dates (clock policy)
    assert!(matches!(
        clock_sanity(now(), &old.identity),
        ClockVerdict::AfterOwnCertificateExpiry { .. }
    ));

    let ct = pki.trust(&pki.revocation(), system());
    let out = handshake(
        client_config(&me, &ct).unwrap(),
        server_name_for(&nid("hq-old")),
        rogue_server(old.cert.clone(), old.key().clone_key()),
    );
    let err = out.client_rejection();
    assert!(matches!(err, PeerCertError::Expired { .. }), "{err:?}");
    assert!(err.to_string().contains("expired at"), "{err}");
}

#[test]
fn not_yet_valid_gives_a_clock_hint() {
    // B-2: a tablet that booted at 2000-01-01 sees every certificate as not yet valid.
    let pki = Pki::new("Kizuna CA Sendai");
    let tablet = pki.node(Role::Shelter, "shelter-1");
    let hq = pki.node(Role::Hq, "hq-1");
    let rev = pki.revocation();
    let tablet_2000 = OffsetDateTime::from_unix_timestamp(946_684_800).unwrap();
    let out = honest_pair(
        &pki,
        &tablet,
        &rev,
        clock_at(tablet_2000),
        &hq,
        &rev,
        system(),
    );
    let err = out.client_rejection();
    assert!(matches!(err, PeerCertError::NotYetValid { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(
            "device clock may be wrong: now is 2000-01-01T00:00:00Z, certificate valid from"
        ),
        "{msg}"
    );

    // The other direction: the server's clock is wrong.
    let out = honest_pair(
        &pki,
        &hq,
        &rev,
        system(),
        &tablet,
        &rev,
        clock_at(tablet_2000),
    );
    assert!(matches!(
        out.server_rejection(),
        PeerCertError::NotYetValid { .. }
    ));
}

#[test]
fn wrong_extended_key_usage_is_rejected() {
    let pki = Pki::new("Kizuna CA Sendai");
    let me = pki.node(Role::Hq, "hq-1");
    let mut p = params(Role::Shelter, "shelter-1");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let (cert, key) = pki.sign(&p);
    let st = pki.trust(&pki.revocation(), system());
    let out = handshake(
        rogue_client(cert.clone(), key),
        server_name_for(&nid("hq-1")),
        server_config(&me, &st).unwrap(),
    );
    assert_eq!(
        out.server_rejection(),
        PeerCertError::WrongUsage {
            usage: "clientAuth"
        }
    );
    // Even as a server, our parser insists on both usages (every node is both).
    assert_eq!(
        parse_leaf(&cert),
        Err(CertError::WrongEku {
            missing: "clientAuth"
        })
    );
}

// ------------------------------------------------------- negative: roles

fn role_rejected_by_server(pki: &Pki, p: &CertificateParams) -> PeerCertError {
    let me = pki.node(Role::Hq, "hq-1");
    let (cert, key) = pki.sign(p);
    let st = pki.trust(&pki.revocation(), system());
    let out = handshake(
        rogue_client(cert, key),
        server_name_for(&nid("hq-1")),
        server_config(&me, &st).unwrap(),
    );
    out.server_rejection()
}

#[test]
fn missing_role_is_rejected() {
    let pki = Pki::new("Kizuna CA Sendai");
    let mut p = params(Role::Shelter, "shelter-1");
    p.custom_extensions.clear();
    let err = role_rejected_by_server(&pki, &p);
    assert_eq!(err, PeerCertError::Certificate(CertError::RoleMissing));
    assert!(err
        .to_string()
        .contains("certificate has no valid Kizuna role (found no role extension"));
}

#[test]
fn unknown_role_is_rejected() {
    let pki = Pki::new("Kizuna CA Sendai");
    let mut p = params(Role::Shelter, "shelter-1");
    p.custom_extensions = vec![CustomExtension::from_oid_content(
        certs::ROLE_OID,
        b"\x0c\x06doctor".to_vec(),
    )];
    let err = role_rejected_by_server(&pki, &p);
    assert_eq!(
        err,
        PeerCertError::Certificate(CertError::UnknownRole("doctor".into()))
    );
    assert!(
        err.to_string().contains("(found unknown role \"doctor\")"),
        "{err}"
    );
}

#[test]
fn two_roles_are_rejected() {
    let pki = Pki::new("Kizuna CA Sendai");
    let mut p = params(Role::Shelter, "shelter-1");
    p.custom_extensions.push(ca::role_extension(Role::Clinic));
    let err = role_rejected_by_server(&pki, &p);
    match &err {
        PeerCertError::Certificate(CertError::SeveralRoles { found }) => {
            assert_eq!(
                found,
                &vec!["\"shelter\"".to_string(), "\"clinic\"".to_string()]
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("found 2 role extensions"), "{err}");
}

#[test]
fn malformed_role_value_is_rejected() {
    let pki = Pki::new("Kizuna CA Sendai");
    for (bad, reason) in [
        (b"shelter".to_vec(), "not a UTF8String"),
        (
            b"\x0c\x09shelter".to_vec(),
            "length does not match the value",
        ),
        (b"\x13\x07shelter".to_vec(), "not a UTF8String"),
        (b"\x0c\x02\xff\xfe".to_vec(), "not UTF-8"),
    ] {
        let mut p = params(Role::Shelter, "shelter-1");
        p.custom_extensions = vec![CustomExtension::from_oid_content(certs::ROLE_OID, bad)];
        let (cert, _) = pki.sign(&p);
        assert_eq!(parse_leaf(&cert), Err(CertError::RoleMalformed(reason)));
    }
    let mut p = params(Role::Shelter, "shelter-1");
    p.custom_extensions = vec![CustomExtension::from_oid_content(
        certs::ROLE_OID,
        b"\x04\x07shelter".to_vec(),
    )];
    assert_eq!(
        role_rejected_by_server(&pki, &p),
        PeerCertError::Certificate(CertError::RoleMalformed("not a UTF8String"))
    );
}

#[test]
fn node_id_problems_are_rejected() {
    let pki = Pki::new("Kizuna CA Sendai");
    // SAN that disagrees with the CN.
    let mut p = params(Role::Shelter, "shelter-1");
    p.subject_alt_names = vec![rcgen::SanType::DnsName("hq-1.kizuna".try_into().unwrap())];
    let (cert, _) = pki.sign(&p);
    assert!(matches!(
        parse_leaf(&cert),
        Err(CertError::NodeIdSanMismatch { .. })
    ));
    // No CN at all.
    let mut p = params(Role::Shelter, "shelter-1");
    p.distinguished_name = rcgen::DistinguishedName::new();
    let (cert, _) = pki.sign(&p);
    assert_eq!(parse_leaf(&cert), Err(CertError::NodeIdMissing));
    // A CN that is not a valid node id.
    let mut p = params(Role::Shelter, "shelter-1");
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "../etc/passwd");
    p.subject_alt_names.clear();
    let (cert, _) = pki.sign(&p);
    assert!(matches!(
        parse_leaf(&cert),
        Err(CertError::NodeIdInvalid(_))
    ));
}

// ------------------------------------------------- negative: revocation

/// Rotation: a node gets a new certificate, then only the old one is
/// revoked; the new one stays good. A serial the node never had is refused.
#[test]
fn revoking_one_serial_after_a_rotation_keeps_the_new_certificate() {
    let pki = Pki::new("Kizuna CA Sendai");
    let old = pki.node(Role::Shelter, "shelter-9");
    // `issue` never overwrites: the new certificate goes to a new directory.
    let out = pki.dir("shelter-9-new");
    ca::issue(&pki.ca_dir, Role::Shelter, &nid("shelter-9"), &out, 365).unwrap();
    let new = NodeCredentials::load_dir(&out).unwrap();
    assert_ne!(old.identity.serial, new.identity.serial);
    let r = ca::revoke_serial_at(
        &pki.ca_dir,
        &nid("shelter-9"),
        Some(&old.identity.serial_hex().to_uppercase()),
        ca::RevokeReason::Superseded,
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    assert_eq!(r.newly_revoked, vec![old.identity.serial_hex()]);
    let rev = pki.revocation();
    rev.offer(&std::fs::read(&r.crl_path).unwrap()).unwrap();
    assert!(rev.is_revoked(&old.identity.serial));
    assert!(!rev.is_revoked(&new.identity.serial));
    // The CRL entry says why: superseded, so the old certificate's changes
    // stay valid (it still opens no session: `is_revoked` above).
    use crdt::signing::Revocation;
    assert_eq!(
        rev.author_revocation(&old.identity.serial),
        Some(Revocation::Superseded)
    );
    assert_eq!(rev.author_revocation(&new.identity.serial), None);
    // The old tablet lost after all: revoked again as compromised, listed
    // so from the next CRL on; never downgraded back.
    let again = |reason| {
        ca::revoke_serial_at(
            &pki.ca_dir,
            &nid("shelter-9"),
            Some(&old.identity.serial_hex()),
            reason,
            time::OffsetDateTime::now_utc(),
        )
        .unwrap()
    };
    let r = again(ca::RevokeReason::KeyCompromise);
    assert_eq!(r.newly_revoked, vec![old.identity.serial_hex()]);
    rev.offer(&std::fs::read(&r.crl_path).unwrap()).unwrap();
    assert_eq!(
        rev.author_revocation(&old.identity.serial),
        Some(Revocation::Compromised)
    );
    let r = again(ca::RevokeReason::Superseded);
    assert!(r.newly_revoked.is_empty());
    rev.offer(&std::fs::read(&r.crl_path).unwrap()).unwrap();
    assert_eq!(
        rev.author_revocation(&old.identity.serial),
        Some(Revocation::Compromised)
    );
    assert_eq!(rev.author_revocation(&new.identity.serial), None);
    // A whole node revoked without a reason given: compromised.
    let other = pki.node(Role::Shelter, "shelter-8");
    let r = ca::revoke(&pki.ca_dir, &nid("shelter-8")).unwrap();
    rev.offer(&std::fs::read(&r.crl_path).unwrap()).unwrap();
    assert_eq!(
        rev.author_revocation(&other.identity.serial),
        Some(Revocation::Compromised)
    );
    let e = ca::revoke_serial_at(
        &pki.ca_dir,
        &nid("shelter-9"),
        Some("00ff"),
        ca::RevokeReason::KeyCompromise,
        time::OffsetDateTime::now_utc(),
    )
    .unwrap_err();
    assert!(matches!(e, ca::CaError::UnknownSerial { .. }), "{e}");
}

#[test]
fn server_rejects_revoked_client() {
    let pki = Pki::new("Kizuna CA Sendai");
    let hq = pki.node(Role::Hq, "hq-1");
    let stolen = pki.node(Role::Ambulance, "amb-2");
    let revoked = ca::revoke(&pki.ca_dir, &nid("amb-2")).unwrap();
    assert_eq!(revoked.crl_number, 1);
    assert_eq!(revoked.newly_revoked, vec![stolen.identity.serial_hex()]);

    let server_rev = pki.revocation();
    let crl = std::fs::read(&revoked.crl_path).unwrap();
    assert_eq!(
        server_rev.offer(&crl).unwrap(),
        OfferOutcome::Applied {
            number: 1,
            newly_revoked: vec![stolen.identity.serial.clone()]
        }
    );
    let client_rev = pki.revocation(); // the stolen tablet never got the CRL
    let out = honest_pair(
        &pki,
        &stolen,
        &client_rev,
        system(),
        &hq,
        &server_rev,
        system(),
    );
    assert_eq!(
        out.server_rejection(),
        PeerCertError::Revoked {
            node_id: nid("amb-2"),
            serial: stolen.identity.serial_hex()
        }
    );
}

#[test]
fn client_rejects_revoked_server() {
    let pki = Pki::new("Kizuna CA Sendai");
    let me = pki.node(Role::Clinic, "clinic-1");
    let stolen = pki.node(Role::Shelter, "shelter-4");
    let crl = std::fs::read(ca::revoke(&pki.ca_dir, &nid("shelter-4")).unwrap().crl_path).unwrap();
    let client_rev = pki.revocation();
    client_rev.offer(&crl).unwrap();
    let out = honest_pair(
        &pki,
        &me,
        &client_rev,
        system(),
        &stolen,
        &pki.revocation(),
        system(),
    );
    assert!(matches!(
        out.client_rejection(),
        PeerCertError::Revoked { .. }
    ));
    assert!(out.client_rejection().to_string().contains("shelter-4"));
}

#[test]
fn new_crl_applies_to_existing_configs() {
    let pki = Pki::new("Kizuna CA Sendai");
    let hq = pki.node(Role::Hq, "hq-1");
    let tablet = pki.node(Role::Shelter, "shelter-3");
    let rev = pki.revocation();
    let st = pki.trust(&rev, system());
    let server_cfg = server_config(&hq, &st).unwrap();
    let client_cfg = client_config(&tablet, &pki.trust(&pki.revocation(), system())).unwrap();

    let out = handshake(
        client_cfg.clone(),
        server_name_for(&nid("hq-1")),
        server_cfg.clone(),
    );
    assert!(out.client.is_ok() && out.server.is_ok());

    let crl = std::fs::read(ca::revoke(&pki.ca_dir, &nid("shelter-3")).unwrap().crl_path).unwrap();
    assert!(matches!(
        rev.offer(&crl).unwrap(),
        OfferOutcome::Applied { number: 1, .. }
    ));
    let out = handshake(client_cfg, server_name_for(&nid("hq-1")), server_cfg);
    assert!(matches!(
        out.server_rejection(),
        PeerCertError::Revoked { .. }
    ));
}

// --------------------------------------------------- negative: naming

#[test]
fn wrong_expected_node_id_is_rejected() {
    let pki = Pki::new("Kizuna CA Sendai");
    let me = pki.node(Role::Shelter, "shelter-1");
    let impostor = pki.node(Role::Clinic, "clinic-2");
    let rev = pki.revocation();
    let ct = pki.trust(&rev, system());
    let st = pki.trust(&rev, system());
    // mDNS said clinic-1 lives at this address, but clinic-2 answered.
    let out = handshake(
        client_config(&me, &ct).unwrap(),
        server_name_for(&nid("clinic-1")),
        server_config(&impostor, &st).unwrap(),
    );
    assert_eq!(
        out.client_rejection(),
        PeerCertError::WrongNodeId {
            expected: nid("clinic-1"),
            found: nid("clinic-2")
        }
    );

    // No expected node id at all (an IP address or a foreign name) is refused.
    for name in [
        ServerName::try_from("192.168.1.20").unwrap(),
        ServerName::try_from("clinic-2.example").unwrap(),
    ] {
        let out = handshake(
            client_config(&me, &ct).unwrap(),
            name,
            server_config(&impostor, &st).unwrap(),
        );
        assert!(matches!(
            out.client_rejection(),
            PeerCertError::NotANodeName(_)
        ));
    }
}

// ------------------------------------------- negative: bytes & verifier

#[test]
fn malformed_and_huge_certificates_are_rejected_by_the_verifier() {
    let pki = Pki::new("Kizuna CA Sendai");
    let good = pki.node(Role::Clinic, "clinic-1");
    let trust = pki.trust(&pki.revocation(), system());
    let verify = |bytes: Vec<u8>| trust.verify_peer(&CertificateDer::from(bytes), PeerSide::Client);

    assert!(verify(good.cert.to_vec()).is_ok());
    let random: Vec<u8> = (0..700u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    assert!(matches!(
        verify(random),
        Err(PeerCertError::Certificate(CertError::MalformedDer(_)))
    ));
    let truncated = good.cert[..good.cert.len() / 2].to_vec();
    assert!(matches!(
        verify(truncated),
        Err(PeerCertError::Certificate(CertError::MalformedDer(_)))
    ));
    let mut trailing = good.cert.to_vec();
    trailing.push(0);
    assert!(verify(trailing).is_err());
    let mut flipped = good.cert.to_vec();
    let at = flipped.len() - 10; // inside the signature
    flipped[at] ^= 0x01;
    assert!(verify(flipped).is_err());
    let huge = vec![0x30; MAX_CERT_DER_LEN + 1];
    assert!(matches!(
        verify(huge.clone()),
        Err(PeerCertError::Certificate(CertError::TooLarge {
            max: MAX_CERT_DER_LEN,
            ..
        }))
    ));
    assert!(matches!(parse_leaf(&huge), Err(CertError::TooLarge { .. })));
    assert!(matches!(
        peer_identity(&[]),
        Err(CertError::MalformedDer(_))
    ));
}

// ---------------------------------------------------- negative: own creds

#[test]
fn key_not_matching_certificate_refuses_to_load() {
    let pki = Pki::new("Kizuna CA Sendai");
    pki.node(Role::Shelter, "shelter-1");
    pki.node(Role::Shelter, "shelter-2");
    let d1 = pki.dir("shelter-1");
    let d2 = pki.dir("shelter-2");
    let err = NodeCredentials::load(
        &d1.join("node.crt.pem"),
        &d2.join("node.key.pem"),
        &d1.join("ca.crt.pem"),
    )
    .unwrap_err();
    assert!(matches!(err, CredsError::KeyMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("shelter-2/node.key.pem") && msg.contains("shelter-1/node.crt.pem"),
        "{msg}"
    );
}

#[test]
fn missing_unreadable_and_bad_files_are_named() {
    let pki = Pki::new("Kizuna CA Sendai");
    pki.node(Role::Facility, "fac-1");
    let d = pki.dir("fac-1");

    let err = NodeCredentials::load_dir(&pki.dir("nowhere")).unwrap_err();
    assert!(
        matches!(
            err,
            CredsError::Missing {
                what: "node certificate",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("nowhere/node.crt.pem is missing"),
        "{err}"
    );

    std::fs::set_permissions(
        d.join("node.key.pem"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let err = NodeCredentials::load_dir(&d).unwrap_err();
    assert!(
        matches!(err, CredsError::InsecureKeyPermissions { mode: 0o644, .. }),
        "{err}"
    );
    std::fs::set_permissions(
        d.join("node.key.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    std::fs::write(d.join("ca.crt.pem"), "not pem at all").unwrap();
    let err = NodeCredentials::load_dir(&d).unwrap_err();
    assert!(
        matches!(
            err,
            CredsError::BadPem {
                what: "CA certificate",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("fac-1/ca.crt.pem"), "{err}");

    // A CA file from another municipality.
    let other = Pki::new("Kizuna CA Ishinomaki");
    std::fs::copy(other.ca_dir.join("ca.crt.pem"), d.join("ca.crt.pem")).unwrap();
    let err = NodeCredentials::load_dir(&d).unwrap_err();
    assert!(matches!(err, CredsError::NotIssuedByCa { .. }), "{err}");

    std::fs::remove_file(d.join("node.key.pem")).unwrap();
    let err = NodeCredentials::load_dir(&d).unwrap_err();
    assert!(
        matches!(
            err,
            CredsError::Missing {
                what: "private key",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn own_certificate_without_valid_role_refuses_to_start() {
    let pki = Pki::new("Kizuna CA Sendai");
    for (ext, found) in [
        (vec![], "found no role extension"),
        (
            vec![CustomExtension::from_oid_content(
                certs::ROLE_OID,
                b"\x0c\x06doctor".to_vec(),
            )],
            "found unknown role \"doctor\"",
        ),
        (
            vec![
                ca::role_extension(Role::Shelter),
                ca::role_extension(Role::Hq),
            ],
            "found 2 role extensions",
        ),
    ] {
        let mut p = params(Role::Shelter, "shelter-1");
        p.custom_extensions = ext;
        let (cert, key) = pki.sign(&p);
        let d = tempfile::tempdir().unwrap();
        let pem = |label: &str, der: &[u8]| pem_encode(label, der);
        std::fs::write(d.path().join("node.crt.pem"), pem("CERTIFICATE", &cert)).unwrap();
        std::fs::write(
            d.path().join("node.key.pem"),
            pem("PRIVATE KEY", key.secret_der()),
        )
        .unwrap();
        std::fs::set_permissions(
            d.path().join("node.key.pem"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::copy(pki.ca_dir.join("ca.crt.pem"), d.path().join("ca.crt.pem")).unwrap();
        let err = NodeCredentials::load_dir(d.path()).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, CredsError::InvalidOwnCertificate { .. }),
            "{msg}"
        );
        assert!(
            msg.contains("node.crt.pem: certificate has no valid Kizuna role ("),
            "{msg}"
        );
        assert!(msg.contains(found), "{msg}");
    }
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let body: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        body.join("\n")
    )
}

// ------------------------------------------------------- negative: CRLs

#[test]
fn stale_crl_is_refused_and_newer_kept() {
    let pki = Pki::new("Kizuna CA Sendai");
    let a = pki.node(Role::Shelter, "shelter-1");
    let b = pki.node(Role::Shelter, "shelter-2");
    let crl1 = std::fs::read(ca::revoke(&pki.ca_dir, &nid("shelter-1")).unwrap().crl_path).unwrap();
    let r2 = ca::revoke(&pki.ca_dir, &nid("shelter-2")).unwrap();
    assert_eq!(r2.crl_number, 2, "CRL numbers strictly increase");
    assert_eq!(r2.listed.len(), 2, "CRLs are cumulative");
    let crl2 = std::fs::read(&r2.crl_path).unwrap();
    assert_eq!(pki.loaded().state.crl_number, 2);

    let state = pki.revocation();
    assert_eq!(state.freshness(now()), CrlFreshness::NoneHeld);
    assert!(
        matches!(state.offer(&crl2).unwrap(), OfferOutcome::Applied { number: 2, ref newly_revoked } if newly_revoked.len() == 2)
    );
    // E-2: a peer offers the older CRL without shelter-2's revocation.
    assert_eq!(
        state.offer(&crl1).unwrap(),
        OfferOutcome::Stale {
            held: 2,
            offered: 1
        }
    );
    assert_eq!(
        state.offer(&crl2).unwrap(),
        OfferOutcome::Stale {
            held: 2,
            offered: 2
        }
    );
    assert_eq!(state.current_number(), Some(2));
    assert_eq!(state.current_der().unwrap(), crl2);
    assert!(state.is_revoked(&a.identity.serial) && state.is_revoked(&b.identity.serial));
    assert!(matches!(
        state.freshness(now()),
        CrlFreshness::Current { number: 2, .. }
    ));
    assert!(matches!(
        state.freshness(now() + Duration::days(31)),
        CrlFreshness::Overdue { number: 2, .. }
    ));

    // Revoking a node twice still advances the number; nothing new is listed.
    let r3 = ca::revoke(&pki.ca_dir, &nid("shelter-2")).unwrap();
    assert!(r3.newly_revoked.is_empty() && r3.crl_number == 3);
    let err = ca::revoke(&pki.ca_dir, &nid("never-issued")).unwrap_err();
    assert!(matches!(err, CaError::UnknownNode(_)), "{err}");
}

#[test]
fn crl_signed_by_another_ca_is_rejected() {
    let ours = Pki::new("Kizuna CA Sendai");
    ours.node(Role::Hq, "hq-1");
    let theirs = Pki::new("Kizuna CA Ishinomaki");
    theirs.node(Role::Hq, "hq-1");
    let foreign =
        std::fs::read(ca::revoke(&theirs.ca_dir, &nid("hq-1")).unwrap().crl_path).unwrap();
    let state = ours.revocation();
    assert_eq!(state.offer(&foreign), Err(CrlError::WrongIssuer));

    // Same CA name, different key: the issuer matches but the signature does not.
    let twin = Pki::new("Kizuna CA Sendai");
    twin.node(Role::Hq, "hq-1");
    let forged = std::fs::read(ca::revoke(&twin.ca_dir, &nid("hq-1")).unwrap().crl_path).unwrap();
    assert!(matches!(
        state.offer(&forged),
        Err(CrlError::BadSignature(_))
    ));

    // A CRL without a CRL number (hand-made with rcgen is impossible to omit,
    // so use a huge number instead) is refused.
    let loaded = ours.loaded();
    let params = CertificateRevocationListParams {
        this_update: now(),
        next_update: now() + Duration::days(1),
        crl_number: SerialNumber::from_slice(&[0x7f; 12]),
        issuing_distribution_point: None,
        revoked_certs: Vec::<RevokedCertParams>::new(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let big = params.signed_by(loaded.issuer()).unwrap();
    assert_eq!(state.offer(big.der()), Err(CrlError::NumberTooLarge));
    assert_eq!(state.current_number(), None);
}

#[test]
fn garbage_crl_bytes_are_rejected_without_panic() {
    let pki = Pki::new("Kizuna CA Sendai");
    pki.node(Role::Hq, "hq-1");
    let crl = std::fs::read(ca::revoke(&pki.ca_dir, &nid("hq-1")).unwrap().crl_path).unwrap();
    let state = pki.revocation();
    assert!(matches!(
        state.offer(b"definitely not a CRL"),
        Err(CrlError::Malformed(_))
    ));
    assert!(matches!(state.offer(&[]), Err(CrlError::Malformed(_))));
    assert!(matches!(
        state.offer(&crl[..crl.len() - 3]),
        Err(CrlError::Malformed(_))
    ));
    assert!(matches!(
        state.offer(&vec![0x30; 64 * 1024 + 1]),
        Err(CrlError::TooLarge { .. })
    ));
    let mut flipped = crl.clone();
    let at = flipped.len() - 5;
    flipped[at] ^= 0x40;
    assert!(state.offer(&flipped).is_err());
    assert_eq!(state.current_number(), None, "nothing applied");
    assert!(matches!(
        state.offer(&crl).unwrap(),
        OfferOutcome::Applied { number: 1, .. }
    ));
    // A certificate is not a CRL.
    assert!(RevocationList::parse(&pki.ca_der(), &pki.ca_der()).is_err());
}

#[test]
fn rogue_ca_flags_cannot_smuggle_an_intermediate() {
    // A leaf issued with CA:true by the municipal CA (operator mistake) is
    // still refused as a node certificate.
    let pki = Pki::new("Kizuna CA Sendai");
    let mut p = params(Role::Hq, "hq-1");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
    ];
    let (cert, _) = pki.sign(&p);
    let trust = pki.trust(&pki.revocation(), system());
    let err = trust.verify_peer(&cert, PeerSide::Client).unwrap_err();
    assert_eq!(err, PeerCertError::CaAsLeaf);
    assert_eq!(parse_leaf(&cert), Err(CertError::CaAsLeaf));
}

// ------------------------------------------------------ no panics, ever

mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    struct Fixture {
        _pki: Pki,
        cert: Vec<u8>,
        crl: Vec<u8>,
        ca: Vec<u8>,
        trust: Arc<PeerTrust>,
    }

    fn fixture() -> &'static Fixture {
        static F: OnceLock<Fixture> = OnceLock::new();
        F.get_or_init(|| {
            let pki = Pki::new("Kizuna CA Fuzz");
            let node = pki.node(Role::Clinic, "clinic-1");
            let crl =
                std::fs::read(ca::revoke(&pki.ca_dir, &nid("clinic-1")).unwrap().crl_path).unwrap();
            let trust = pki.trust(&pki.revocation(), system());
            Fixture {
                cert: node.cert.to_vec(),
                crl,
                ca: pki.ca_der().to_vec(),
                trust,
                _pki: pki,
            }
        })
    }

    /// Run every parser; the panic boundaries must never have been needed.
    fn all_parsers(bytes: &[u8]) {
        let f = fixture();
        assert_ne!(parse_leaf(bytes), Err(CertError::ParserPanic));
        assert_ne!(
            peer_identity(&[CertificateDer::from(bytes.to_vec())]),
            Err(CertError::ParserPanic)
        );
        assert_ne!(
            RevocationList::parse(bytes, &f.ca).err(),
            Some(CrlError::ParserPanic)
        );
        // Hostile "CA" bytes too.
        assert_ne!(
            RevocationList::parse(&f.crl, bytes).err(),
            Some(CrlError::ParserPanic)
        );
        let verdict = f
            .trust
            .verify_peer(&CertificateDer::from(bytes.to_vec()), PeerSide::Server);
        assert!(!matches!(
            verdict,
            Err(PeerCertError::VerifierPanic)
                | Err(PeerCertError::Certificate(CertError::ParserPanic))
        ));
        assert_ne!(
            f.trust.revocation().offer(bytes).err(),
            Some(CrlError::ParserPanic)
        );
    }

    #[test]
    fn every_truncation_of_valid_inputs() {
        let f = fixture();
        for n in 0..f.cert.len() {
            all_parsers(&f.cert[..n]);
            assert!(parse_leaf(&f.cert[..n]).is_err());
        }
        for n in 0..f.crl.len() {
            all_parsers(&f.crl[..n]);
            assert!(RevocationList::parse(&f.crl[..n], &f.ca).is_err());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

        #[test]
        fn random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            all_parsers(&bytes);
        }

        #[test]
        fn mutated_certificate(pos in 0usize..4096, val in any::<u8>()) {
            let mut c = fixture().cert.clone();
            let i = pos % c.len();
            c[i] = val;
            all_parsers(&c);
        }

        #[test]
        fn mutated_crl(pos in 0usize..4096, val in any::<u8>()) {
            let mut c = fixture().crl.clone();
            let i = pos % c.len();
            c[i] = val;
            all_parsers(&c);
        }
    }
}
