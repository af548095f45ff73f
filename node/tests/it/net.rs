//! The QUIC edge over real sockets on 127.0.0.1 with real certificates.
//!
//! Every wait is bounded by a deadline that only guards against hangs; the
//! tests synchronise on transport events, never on sleeps.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use certs::crl::{OfferOutcome, RevocationState};
use certs::tls::{PeerTrust, WallClock};
use certs::{ca, NodeCredentials};
use crdt::api::Input;
use crdt::{NodeId, Role};
use node::net::{CloseCode, Notice, StaticPeer, Transport, TransportConfig, TransportSinks};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

const DEADLINE: Duration = Duration::from_secs(20);

struct Pki {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    ca_dir: PathBuf,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let ca_dir = root.join("ca");
        std::fs::create_dir_all(&ca_dir).unwrap();
        ca::init_ca(&ca_dir, name).unwrap();
        Pki {
            _tmp: tmp,
            root,
            ca_dir,
        }
    }

    /// Issues a node certificate; returns its credentials directory.
    fn node_at(&self, role: Role, id: &str, now: time::OffsetDateTime, days: u32) -> PathBuf {
        let out = self.root.join(id);
        std::fs::create_dir_all(&out).unwrap();
        ca::issue_at(&self.ca_dir, role, &nid(id), &out, days, now).unwrap();
        out
    }

    fn node(&self, role: Role, id: &str) -> PathBuf {
        self.node_at(role, id, time::OffsetDateTime::now_utc(), 365)
    }

    fn revoke(&self, id: &str) -> Vec<u8> {
        let r = ca::revoke(&self.ca_dir, &nid(id)).unwrap();
        std::fs::read(&r.crl_path).unwrap()
    }
}

fn nid(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

fn clock() -> WallClock {
    certs::tls::system_clock()
}

fn cfg(listen: SocketAddr, peers: Vec<StaticPeer>) -> TransportConfig {
    let mut c = TransportConfig::new(listen);
    c.static_peers = peers;
    c.reconnect_min_ms = 50;
    c.reconnect_max_ms = 400;
    c
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// What a test sees: the engine inputs and the notices of one transport,
/// in the order it reported them.
#[derive(Debug)]
enum Ev {
    Input(Input),
    Notice(Notice),
}

struct Node {
    t: Transport,
    rx: UnboundedReceiver<Ev>,
    revocation: Arc<RevocationState>,
    /// While `Some`, the inbound budget of every received frame is kept
    /// here, as a busy engine keeps it; `None` releases it at once.
    hold: Arc<std::sync::Mutex<Option<Vec<tokio::sync::OwnedSemaphorePermit>>>>,
}

async fn start_with(dir: &Path, c: TransportConfig, crl: Option<&[u8]>) -> anyhow::Result<Node> {
    let creds = NodeCredentials::load_dir(dir).unwrap();
    let revocation = Arc::new(RevocationState::new(creds.ca.clone()));
    if let Some(der) = crl {
        revocation.offer(der).unwrap();
    }
    let trust = PeerTrust::new(revocation.clone(), clock()).unwrap();
    let (tx, rx) = unbounded_channel();
    let tx2 = tx.clone();
    let hold = Arc::new(std::sync::Mutex::new(
        None::<Vec<tokio::sync::OwnedSemaphorePermit>>,
    ));
    let h = hold.clone();
    let sinks = TransportSinks {
        input: Box::new(move |i, held| {
            if let (Some(p), Some(kept)) = (held, h.lock().unwrap().as_mut()) {
                kept.push(p);
            }
            let _ = tx.send(Ev::Input(i));
        }),
        notice: Some(Box::new(move |n| {
            let _ = tx2.send(Ev::Notice(n));
        })),
    };
    let t = Transport::start(c, creds, trust, revocation.clone(), sinks).await?;
    Ok(Node {
        t,
        rx,
        revocation,
        hold,
    })
}

async fn start(creds: &Path, c: TransportConfig) -> Node {
    start_with(creds, c, None).await.unwrap()
}

/// Next event matching `pred`, skipping others; panics at the deadline.
async fn wait_for(
    rx: &mut UnboundedReceiver<Ev>,
    what: &str,
    mut pred: impl FnMut(&Ev) -> bool,
) -> Ev {
    let found = tokio::time::timeout(DEADLINE, async {
        loop {
            let ev = rx.recv().await.expect("event channel closed");
            if pred(&ev) {
                return ev;
            }
            eprintln!("(skipping while waiting for {what}: {ev:?})");
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("no {what} within the deadline"))
}

/// Waits for a `PeerRejected` and fails if a `Connected` comes first.
async fn expect_rejected(rx: &mut UnboundedReceiver<Ev>, who: &str) -> String {
    match wait_for(rx, "rejection", |e| {
        matches!(
            e,
            Ev::Notice(Notice::PeerRejected { .. }) | Ev::Input(Input::Connected { .. })
        )
    })
    .await
    {
        Ev::Notice(Notice::PeerRejected { addr, reason }) => {
            eprintln!("{who} rejected {addr}: {reason}");
            // rustls renders the verifier's error with Debug inside its own
            // Display, so match case-insensitively on the variant name.
            reason.to_lowercase()
        }
        other => panic!("{who}: expected a rejection, got {other:?}"),
    }
}

async fn connected(rx: &mut UnboundedReceiver<Ev>) -> (u64, NodeId, Role, bool) {
    match wait_for(rx, "Connected", |e| {
        matches!(e, Ev::Input(Input::Connected { .. }))
    })
    .await
    {
        Ev::Input(Input::Connected {
            session,
            node,
            role,
            initiator,
        }) => (session, node, role, initiator),
        _ => unreachable!(),
    }
}

/// A-14, the receiving half of backpressure: while our engine is busy
/// with a peer's frames, the peer cannot make us queue more of them than
/// the inbound budget: the session stops reading (and says so) and QUIC
/// flow control stalls the sender. Once the engine has handled them, the
/// rest arrive, whole and in order. The sending half, the engine's send
/// window, is `crdt`'s
/// `a_session_whose_transport_writes_nothing_is_sent_no_more_than_the_window`.
#[tokio::test]
async fn a_busy_engine_slows_the_peer_instead_of_queueing_its_frames() {
    use node::net::{INBOUND_BUDGET_BYTES, MAX_SEND_QUEUE_BYTES};
    let (_pki, mut a, mut b) = shelter_dialing_hq().await;
    let (sa, ..) = connected(&mut a.rx).await;
    let (sb, ..) = connected(&mut b.rx).await;
    // b's engine handles nothing from now on.
    *b.hold.lock().unwrap() = Some(Vec::new());
    let size = 3 << 20;
    let body = |i: usize| vec![i as u8; size];
    let fits = INBOUND_BUDGET_BYTES / size;
    // One at a time (a's own send queue is bounded too) until b holds all
    // the budget allows.
    for i in 0..fits {
        a.t.send(sa, body(i));
        assert_eq!(frame(&mut b.rx, sb).await, body(i));
    }
    let more = 3;
    assert!(more * size <= MAX_SEND_QUEUE_BYTES);
    for i in fits..fits + more {
        a.t.send(sa, body(i));
    }
    // The next frame does not fit: b's session says it stops reading.
    // Frames reach the engine in order from the one reader that says so,
    // so none beyond the budget was handed over before it.
    let full = wait_for(&mut b.rx, "InboundFull", |e| {
        matches!(
            e,
            Ev::Notice(Notice::InboundFull { .. }) | Ev::Input(Input::Frame { .. })
        )
    })
    .await;
    assert!(
        matches!(full, Ev::Notice(Notice::InboundFull { session }) if session == sb),
        "a frame beyond the inbound budget was read while the engine was busy"
    );
    assert_eq!(b.hold.lock().unwrap().as_ref().map(Vec::len), Some(fits));
    // The engine catches up: the rest arrive, whole and in order.
    drop(b.hold.lock().unwrap().take());
    for i in fits..fits + more {
        assert_eq!(frame(&mut b.rx, sb).await, body(i));
    }
    a.t.shutdown().await;
    b.t.shutdown().await;
}

async fn frame(rx: &mut UnboundedReceiver<Ev>, session: u64) -> Vec<u8> {
    match wait_for(
        rx,
        "Frame",
        |e| matches!(e, Ev::Input(Input::Frame { session: s, .. }) if *s == session),
    )
    .await
    {
        Ev::Input(Input::Frame { bytes, .. }) => bytes,
        _ => unreachable!(),
    }
}

/// Waits for the end of `session`: its `SessionEnded` notice (returns the
/// reason), then its `Input::Disconnected`, with no frame of it between.
async fn disconnected(rx: &mut UnboundedReceiver<Ev>, session: u64) -> String {
    let reason = match wait_for(
        rx,
        "SessionEnded",
        |e| matches!(e, Ev::Notice(Notice::SessionEnded { session: s, .. }) if *s == session),
    )
    .await
    {
        Ev::Notice(Notice::SessionEnded { reason, .. }) => reason,
        _ => unreachable!(),
    };
    match wait_for(rx, "Disconnected", |e| match e {
        Ev::Input(Input::Disconnected { session: s })
        | Ev::Input(Input::Frame { session: s, .. }) => *s == session,
        _ => false,
    })
    .await
    {
        Ev::Input(Input::Disconnected { .. }) => reason,
        other => panic!("after the end of session {session}: {other:?}"),
    }
}

/// shelter-1 (`a`) with hq-1 (`b`) as its static peer, both started; the
/// `Pki` holds their credentials.
async fn shelter_dialing_hq() -> (Pki, Node, Node) {
    let pki = Pki::new("Kizuna Test City");
    let a_creds = pki.node(Role::Shelter, "shelter-1");
    let b_creds = pki.node(Role::Hq, "hq-1");
    let b = start(&b_creds, cfg(localhost(), vec![])).await;
    let a = start(
        &a_creds,
        cfg(localhost(), vec![peer("hq-1", b.t.local_addr())]),
    )
    .await;
    (pki, a, b)
}

fn peer(id: &str, addr: SocketAddr) -> StaticPeer {
    StaticPeer {
        node_id: nid(id),
        addr,
    }
}

#[tokio::test]
async fn static_peers_connect_and_frames_round_trip_in_order() {
    let (_pki, mut a, mut b) = shelter_dialing_hq().await;

    let (sa, node, role, init) = connected(&mut a.rx).await;
    assert_eq!((node, role, init), (nid("hq-1"), Role::Hq, true));
    let (sb, node, role, init) = connected(&mut b.rx).await;
    assert_eq!((node, role, init), (nid("shelter-1"), Role::Shelter, false));

    let big: Vec<u8> = (0..(1usize << 20)).map(|i| (i % 251) as u8).collect();
    let frames: Vec<Vec<u8>> = vec![
        b"hello".to_vec(),
        Vec::new(),
        big.clone(),
        b"after big".to_vec(),
    ];
    for f in &frames {
        a.t.send(sa, f.clone());
        b.t.send(sb, f.clone());
    }
    for f in &frames {
        assert_eq!(&frame(&mut b.rx, sb).await, f);
        assert_eq!(&frame(&mut a.rx, sa).await, f);
    }

    // A graceful close delivers what was queued before it.
    a.t.send(sa, b"last words".to_vec());
    a.t.close(sa, CloseCode::Normal, "test done");
    assert_eq!(frame(&mut b.rx, sb).await, b"last words");
    let reason = disconnected(&mut b.rx, sb).await;
    eprintln!("b saw: {reason}");
    let reason = disconnected(&mut a.rx, sa).await;
    assert!(reason.contains("test done"), "{reason}");
    a.t.shutdown().await;
    b.t.shutdown().await;
}

#[tokio::test]
async fn spoofed_mdns_announcements_cannot_re_aim_a_static_peer_or_grow_dialers() {
    let (_pki, mut a, mut b) = shelter_dialing_hq().await;
    let (s1, node, _, _) = connected(&mut a.rx).await;
    assert_eq!(node, nid("hq-1"));
    let (sb, _, _, _) = connected(&mut b.rx).await;
    // 1,000 announcements anyone on the link could send: headquarters'
    // node id at other addresses, and invented node ids.
    for i in 0..1000u32 {
        let spoofed: SocketAddr = format!("127.0.0.1:{}", 20000 + i).parse().unwrap();
        if i % 2 == 0 {
            a.t.discovered(nid("hq-1"), spoofed);
        } else {
            a.t.discovered(nid(&format!("fake-{i}")), spoofed);
        }
    }
    assert!(
        a.t.dialer_count() <= 1 + node::net::MAX_DISCOVERED_DIALERS,
        "{} dialers",
        a.t.dialer_count()
    );
    // Headquarters drops the session; the static dialer still aims at the
    // real address and reconnects.
    b.t.close(sb, CloseCode::Normal, "test: reconnect");
    disconnected(&mut a.rx, s1).await;
    let (s2, node, _, init) = connected(&mut a.rx).await;
    assert!(s2 != s1 && node == nid("hq-1") && init);
    a.t.shutdown().await;
    b.t.shutdown().await;
}

/// A hand-made quinn client with valid credentials, connected to `server`
/// and past the stream tag.
async fn raw_client(
    pki: &Pki,
    id: &str,
    server: SocketAddr,
    server_id: &str,
) -> (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
) {
    let creds = NodeCredentials::load_dir(&pki.node(Role::Shelter, id)).unwrap();
    let revocation = Arc::new(RevocationState::new(creds.ca.clone()));
    let trust = PeerTrust::new(revocation, clock()).unwrap();
    let tls = certs::tls::client_config(&creds, &trust).unwrap();
    let qc = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let mut ep = quinn::Endpoint::client(localhost()).unwrap();
    ep.set_default_client_config(qc);
    let conn = ep
        .connect(server, &format!("{server_id}.kizuna"))
        .unwrap()
        .await
        .unwrap();
    let (send, mut recv) = conn.accept_bi().await.unwrap();
    let mut tag = [0u8; 1];
    recv.read_exact(&mut tag).await.unwrap();
    (ep, conn, send, recv)
}

#[tokio::test]
async fn hostile_crl_gossip_is_rejected_and_oversized_gossip_closes() {
    let pki = Pki::new("Kizuna Test City");
    let mut server = start(&pki.node(Role::Hq, "hq-1"), cfg(localhost(), vec![])).await;
    let (_ep, conn, mut send, _recv) =
        raw_client(&pki, "shelter-7", server.t.local_addr(), "hq-1").await;
    let (s, _, _, _) = connected(&mut server.rx).await;

    // Garbage within the size limit: rejected, the session stays.
    let mut uni = conn.open_uni().await.unwrap();
    uni.write_all(&[0x30, 0x82, 0xff, 0xff, 0x01])
        .await
        .unwrap();
    uni.finish().unwrap();
    send.write_all(&3u32.to_be_bytes()).await.unwrap();
    send.write_all(b"abc").await.unwrap();
    assert_eq!(frame(&mut server.rx, s).await, b"abc");
    assert_eq!(server.revocation.current_number(), None);

    // Over 64 KiB: the connection is closed.
    let mut uni = conn.open_uni().await.unwrap();
    uni.write_all(&vec![0u8; certs::crl::MAX_CRL_DER_LEN + 1])
        .await
        .unwrap();
    let _ = uni.finish();
    let reason = disconnected(&mut server.rx, s).await;
    assert!(reason.contains("exceeds"), "{reason}");
    server.t.shutdown().await;
}

#[tokio::test]
async fn oversized_length_prefix_closes_the_connection() {
    let pki = Pki::new("Kizuna Test City");
    let server_creds = pki.node(Role::Hq, "hq-1");
    let raw_creds = NodeCredentials::load_dir(&pki.node(Role::Shelter, "shelter-9")).unwrap();
    let mut server = start(&server_creds, cfg(localhost(), vec![])).await;

    // A hand-made quinn client with valid credentials.
    let revocation = Arc::new(RevocationState::new(raw_creds.ca.clone()));
    let trust = PeerTrust::new(revocation, clock()).unwrap();
    let tls = certs::tls::client_config(&raw_creds, &trust).unwrap();
    let qc = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let mut ep = quinn::Endpoint::client(localhost()).unwrap();
    ep.set_default_client_config(qc);
    let conn = ep
        .connect(server.t.local_addr(), "hq-1.kizuna")
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.accept_bi().await.unwrap();
    let mut tag = [0u8; 1];
    recv.read_exact(&mut tag).await.unwrap();

    let (s, node, _, init) = connected(&mut server.rx).await;
    assert_eq!((node, init), (nid("shelter-9"), false));
    let over = (crdt::wire::MAX_FRAME_BYTES as u32 + 1).to_be_bytes();
    send.write_all(&over).await.unwrap();
    let reason = disconnected(&mut server.rx, s).await;
    assert!(reason.contains("limit"), "{reason}");
    match tokio::time::timeout(DEADLINE, conn.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(1))
        }
        other => panic!("unexpected close {other:?}"),
    }
    server.t.shutdown().await;
}

#[tokio::test]
async fn foreign_expired_revoked_and_misnamed_peers_are_rejected() {
    let pki = Pki::new("Kizuna Test City");
    let other = Pki::new("Other Town");
    let server_creds = pki.node(Role::Hq, "hq-1");
    let revoked_creds = pki.node(Role::Ambulance, "amb-666");
    let crl = pki.revoke("amb-666");
    let mut server = start_with(&server_creds, cfg(localhost(), vec![]), Some(&crl))
        .await
        .unwrap();
    let target = vec![peer("hq-1", server.t.local_addr())];

    // Another municipality: both ends refuse.
    let foreign = other.node(Role::Shelter, "shelter-1");
    let mut f = start(&foreign, cfg(localhost(), target.clone())).await;
    let r = expect_rejected(&mut f.rx, "foreign client").await;
    assert!(r.contains("unknownissuer"), "{r}");
    expect_rejected(&mut server.rx, "server (foreign)").await;
    f.t.shutdown().await;

    // Expired client certificate: the server refuses it.
    let past = time::OffsetDateTime::now_utc() - time::Duration::days(30);
    let expired = pki.node_at(Role::Shelter, "shelter-old", past, 1);
    let mut e = start(&expired, cfg(localhost(), target.clone())).await;
    let r = expect_rejected(&mut server.rx, "server (expired)").await;
    assert!(r.contains("expired"), "{r}");
    expect_rejected(&mut e.rx, "expired client").await;
    e.t.shutdown().await;

    // Revoked client certificate.
    let mut v = start(&revoked_creds, cfg(localhost(), target.clone())).await;
    let r = expect_rejected(&mut server.rx, "server (revoked)").await;
    assert!(r.contains("revoked"), "{r}");
    expect_rejected(&mut v.rx, "revoked client").await;
    v.t.shutdown().await;

    // Node id mismatch: the config says hq-2 lives there, but hq-1 answers.
    let honest = pki.node(Role::Shelter, "shelter-2");
    let mut h = start(
        &honest,
        cfg(localhost(), vec![peer("hq-2", server.t.local_addr())]),
    )
    .await;
    let r = expect_rejected(&mut h.rx, "client (wrong node id)").await;
    assert!(r.contains("wrongnodeid"), "{r}");
    expect_rejected(&mut server.rx, "server (client aborted)").await;
    h.t.shutdown().await;
    server.t.shutdown().await;
}

#[tokio::test]
async fn crl_gossip_closes_sessions_with_the_revoked_peer() {
    let pki = Pki::new("Kizuna Test City");
    let a_creds = pki.node(Role::Hq, "hq-1");
    let b_creds = pki.node(Role::Shelter, "shelter-1");
    let c_creds = pki.node(Role::Ambulance, "amb-3");
    // B keeps each CRL it applies, so a restart starts from the newest.
    let b_crl_file = pki.root.join("b-crl.der");
    let mut bc = cfg(localhost(), vec![]);
    bc.crl_file = Some(b_crl_file.clone());
    let mut b = start(&b_creds, bc).await;
    let b_addr = b.t.local_addr();
    let mut a = start(&a_creds, cfg(localhost(), vec![peer("shelter-1", b_addr)])).await;
    let mut c = start(&c_creds, cfg(localhost(), vec![peer("shelter-1", b_addr)])).await;
    let (_, _, _, _) = connected(&mut a.rx).await;
    let (sc, _, _, _) = connected(&mut c.rx).await;
    let mut b_sessions = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let (s, node, _, _) = connected(&mut b.rx).await;
        b_sessions.insert(node, s);
    }
    let b_to_c = b_sessions[&nid("amb-3")];

    let crl = pki.revoke("amb-3");
    assert!(matches!(
        a.t.offer_crl(crl.clone()).unwrap(),
        OfferOutcome::Applied { .. }
    ));
    let reason = disconnected(&mut b.rx, b_to_c).await;
    assert!(reason.contains("revoked"), "{reason}");
    assert_eq!(b.revocation.current_number(), Some(1));
    assert_eq!(std::fs::read(&b_crl_file).unwrap(), crl, "B kept the CRL");
    let r = disconnected(&mut c.rx, sc).await;
    eprintln!("c saw: {r}");
    // C keeps dialing B and is refused now.
    expect_rejected(&mut c.rx, "revoked C").await;
    let r = expect_rejected(&mut b.rx, "B refusing C").await;
    assert!(r.contains("revoked"), "{r}");
    // The same CRL again is stale, not an error.
    assert!(matches!(
        a.t.offer_crl(crl).unwrap(),
        OfferOutcome::Stale { .. }
    ));
    for n in [a, b, c] {
        n.t.shutdown().await;
    }
}

#[tokio::test]
async fn dialer_reconnects_after_the_peer_restarts_on_the_same_port() {
    let pki = Pki::new("Kizuna Test City");
    let a_creds = pki.node(Role::Shelter, "shelter-1");
    let b_creds = pki.node(Role::Hq, "hq-1");
    let known = pki.root.join("known-peers.json");
    let b = start(&b_creds, cfg(localhost(), vec![])).await;
    let b_addr = b.t.local_addr();
    let mut a_cfg = cfg(localhost(), vec![peer("hq-1", b_addr)]);
    a_cfg.known_peers_file = Some(known.clone());
    let mut a = start(&a_creds, a_cfg).await;
    let (s1, _, _, _) = connected(&mut a.rx).await;
    b.t.shutdown().await;
    disconnected(&mut a.rx, s1).await;

    // Rebind the same port; the old socket may take a moment to go away.
    let b2 = rebind(&b_creds, b_addr).await;
    let (s2, node, _, init) = connected(&mut a.rx).await;
    assert!(s2 != s1 && node == nid("hq-1") && init);
    let text = std::fs::read_to_string(&known).unwrap();
    assert!(
        text.contains("hq-1") && text.contains(&b_addr.to_string()),
        "{text}"
    );
    b2.t.shutdown().await;
    a.t.shutdown().await;
}

async fn rebind(creds: &Path, addr: SocketAddr) -> Node {
    tokio::time::timeout(DEADLINE, async {
        loop {
            match start_with(creds, cfg(addr, vec![]), None).await {
                Ok(n) => return n,
                Err(e) => {
                    eprintln!("rebind: {e:#}");
                    tokio::task::yield_now().await;
                }
            }
        }
    })
    .await
    .expect("could not rebind the port")
}

#[tokio::test]
async fn known_peers_file_is_dialed_at_start() {
    let pki = Pki::new("Kizuna Test City");
    let a_creds = pki.node(Role::Shelter, "shelter-1");
    let b_creds = pki.node(Role::Hq, "hq-1");
    let b = start(&b_creds, cfg(localhost(), vec![])).await;
    let known = pki.root.join("known.json");
    write_known(&known, "hq-1", b.t.local_addr());
    let mut a_cfg = cfg(localhost(), vec![]);
    a_cfg.known_peers_file = Some(known);
    let mut a = start(&a_creds, a_cfg).await;
    let (_, node, _, _) = connected(&mut a.rx).await;
    assert_eq!(node, nid("hq-1"));
    a.t.shutdown().await;
    b.t.shutdown().await;
}

fn write_known(path: &Path, id: &str, addr: SocketAddr) {
    std::fs::write(
        path,
        format!("{{\"version\":1,\"peers\":{{\"{id}\":\"{addr}\"}}}}"),
    )
    .unwrap();
}

#[tokio::test]
async fn mdns_peers_find_each_other() {
    let pki = Pki::new("Kizuna Test City");
    let a_creds = pki.node(Role::Shelter, "shelter-md1");
    let b_creds = pki.node(Role::Clinic, "clinic-md2");
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let mut ac = cfg(any, vec![]);
    ac.mdns = true;
    let mut bc = ac.clone();
    bc.mdns_instance = Some("clinic-md2-test".into());
    let mut a = start(&a_creds, ac).await;
    let mut b = start(&b_creds, bc).await;
    let ev = wait_for(&mut a.rx, "Discovered", |e| {
        matches!(e, Ev::Notice(Notice::Discovered { .. }))
    })
    .await;
    eprintln!("a discovered: {ev:?}");
    let (_, node, role, _) = connected(&mut a.rx).await;
    assert_eq!((node, role), (nid("clinic-md2"), Role::Clinic));
    let (_, node, _, _) = connected(&mut b.rx).await;
    assert_eq!(node, nid("shelter-md1"));
    a.t.shutdown().await;
    b.t.shutdown().await;
}

/// Signed changes over real QUIC (issue 12): a certified shelter node that
/// writes as headquarters (hq's role under hq's node id, signed with the
/// only key it has) is cut off by headquarters at the first hop, and the
/// forgery is quarantined there, never stored. Headquarters runs a real
/// engine on a real SQLite file with the node's own author verifier.
///
/// Headquarters closes the session as a violation (QUIC close code
/// `Policy`), so the shelter's dialer does not come back before its
/// longest back-off: while it redials another peer that closes it as
/// restarting five times, it never redials headquarters. Counted in
/// dials, not seconds.
#[tokio::test]
async fn a_shelter_writing_as_headquarters_is_refused_at_the_first_hop_and_backs_off() {
    use crdt::wire::{self, DocChanges, Frame};
    use crdt::{DocKey, Kind};
    use node::driver::{Driver, NetOut};
    let pki = Pki::new("Kizuna test CA");
    let hq_dir = pki.node(Role::Hq, "hq-1");
    let shelter_dir = pki.node(Role::Shelter, "shelter-1");
    let data = tempfile::tempdir().unwrap();

    // Headquarters: transport and engine, wired as `kizuna run` wires them.
    let creds = NodeCredentials::load_dir(&hq_dir).unwrap();
    let revocation = Arc::new(RevocationState::new(creds.ca.clone()));
    let trust = PeerTrust::new(revocation.clone(), clock()).unwrap();
    let engine_trust = certs::tls::engine_trust(&creds, trust.clone()).unwrap();
    let store = node::store::SqliteStore::open(&data.path().join("kizuna.db")).unwrap();
    let driver = Driver::start(
        store,
        crdt::engine::EngineConfig::new(nid("hq-1"), Role::Hq, engine_trust),
    )
    .unwrap();
    let d = driver.clone();
    let sinks = TransportSinks {
        input: Box::new(move |i, held| {
            let _ = d.input_held(i, held);
        }),
        notice: None,
    };
    let hq = Arc::new(
        Transport::start(cfg(localhost(), vec![]), creds, trust, revocation, sinks)
            .await
            .unwrap(),
    );
    let t = hq.clone();
    driver.set_net_sink(Box::new(move |o| match o {
        NetOut::Send { session, bytes } => t.send(session, bytes),
        NetOut::Close {
            session,
            code,
            reason,
        } => t.close(session, code, &reason),
    }));

    // The rogue shelter speaks the protocol by hand over its transport. Its
    // shortest back-off is 50 ms, its longest an hour.
    let mut rogue_cfg = cfg(localhost(), vec![peer("hq-1", hq.local_addr())]);
    rogue_cfg.reconnect_max_ms = 3_600_000;
    let mut rogue = start(&shelter_dir, rogue_cfg).await;
    let (sid, ..) = connected(&mut rogue.rx).await;
    let shelter = NodeCredentials::load_dir(&shelter_dir).unwrap();
    let send = |f: &Frame| rogue.t.send(sid, wire::encode(f).unwrap());
    send(&Frame::Hello {
        version: wire::PROTOCOL_VERSION,
        node: nid("shelter-1"),
        role: Role::Shelter,
        incarnation: 1,
        resume: None,
    });
    send(&Frame::Authors {
        creds: vec![shelter.cert.to_vec()],
    });
    // Re-point a registry card: hq's role, hq's node id, the shelter's key.
    let key = DocKey::new(Kind::Registry, "h-forged").unwrap();
    let mut doc = crdt::doc::Doc::new(key.clone());
    let actor = crdt::actor::Actor::new(Role::Hq, &nid("hq-1"), 77);
    let change = doc
        .write(actor, 0, "", &[("address".into(), Some("\"x\"".into()))])
        .unwrap()
        .unwrap();
    let own_key = crdt::signing::Signer::new(
        &crdt::signing::seed_from_node_key(shelter.key().secret_der()),
        vec![],
    );
    let mut dc = DocChanges::new(key.clone());
    dc.push(change.raw_bytes().to_vec(), &own_key.sign(&change.hash().0));
    send(&Frame::Changes {
        docs: vec![dc],
        upto: None,
    });
    // Headquarters says why it closes, then closes.
    let bye = wait_for(&mut rogue.rx, "hq's Bye", |e| match e {
        Ev::Input(Input::Frame { session, bytes }) if *session == sid => {
            matches!(wire::decode(bytes), Ok(Frame::Bye { .. }))
        }
        _ => false,
    })
    .await;
    let Ev::Input(Input::Frame { bytes, .. }) = bye else {
        unreachable!()
    };
    let Ok(Frame::Bye { code, reason }) = wire::decode(&bytes) else {
        unreachable!()
    };
    assert_eq!(code, wire::BYE_POLICY);
    assert!(reason.contains("unverifiable"), "{reason}");
    disconnected(&mut rogue.rx, sid).await;

    // The shelter's dialer also keeps another peer, hq-2, which closes
    // every session as restarting: redialled at the shortest back-off.
    let mut hq2 = start(&pki.node(Role::Hq, "hq-2"), cfg(localhost(), vec![])).await;
    rogue.t.add_static_peer(peer("hq-2", hq2.t.local_addr()));
    for round in 0..5 {
        let (_, node, ..) = connected(&mut rogue.rx).await;
        assert_eq!(
            node,
            nid("hq-2"),
            "round {round}: the peer that refused us was redialled"
        );
        let (s2, ..) = connected(&mut hq2.rx).await;
        hq2.t.close(s2, CloseCode::Shutdown, "test: restarting");
    }
    hq2.t.shutdown().await;
    rogue.t.shutdown().await;

    use crdt::store::Store;
    let store = driver.shutdown().unwrap().expect("the store comes back");
    let held = store.log_since(0, 100_000).unwrap();
    assert!(
        held.iter().all(|(_, c)| c.hash != change.hash().0),
        "the forgery is never stored"
    );
    assert!(store
        .quarantined()
        .unwrap()
        .iter()
        .any(|(k, why)| *k == key && why.contains("unverifiable")));
}
