//! quinn plumbing: endpoint configuration, the accept loop, dialers, and the
//! per-session task that moves frames and CRLs.
//!
//! Every session runs in one task that races four things: the frame reader,
//! the frame writer, the CRL stream acceptor and `Connection::closed`; the
//! first to finish decides the `Disconnected` reason, and
//! [`Inner::end_session`] makes sure it is reported exactly once.
//!
//! The side that ends a session closes the connection with a
//! [`CloseCode`] saying why; the other side, seeing the frame stream end,
//! waits a moment for that close instead of closing first, so its dialer
//! learns why ([`Ending`]) and picks the next delay from it
//! ([`after_session`]): a peer that refused us is not redialled before the
//! longest back-off, one that is restarting is redialled at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use certs::crl::MAX_CRL_DER_LEN;
use certs::tls::{peer_identity, server_name_for, PeerTrust, ALPN};
use certs::{NodeCredentials, NodeIdentity};
use crdt::wire::MAX_FRAME_BYTES;
use crdt::NodeId;
use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::{Connection, ConnectionError, RecvStream, SendStream, VarInt};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, oneshot};

use super::{
    lock, CloseCode, DialTarget, Inner, Notice, Outgoing, Session, TransportConfig,
    INBOUND_BUDGET_BYTES,
};

/// First byte on the frame stream, written by the accepting side. Bump it
/// together with ALPN if the stream layout changes.
const STREAM_TAG: u8 = 0x01;
/// Bound on the whole dial (handshake plus stream tag).
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on reading one gossiped CRL (slowloris, E-11).
const CRL_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful close waits for the peer to acknowledge queued data,
/// and how long a side whose peer ended the frame stream waits for the
/// peer's close (which says why) before closing itself.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// A session that lasted at least this long counts as a good connection, and
/// the next dial starts from the shortest delay again. A shorter one that
/// ended for no stated reason (overload, a lost link, a normal close)
/// backs off like a failed dial, so a peer that ends every session at once
/// is not redialled twice a second for ever. Why a session ended weighs
/// more than how long it lasted (see [`after_session`]).
const STABLE_SESSION: Duration = Duration::from_secs(10);

fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // One frame stream; one CRL stream at a time (E-11).
    t.max_concurrent_bidi_streams(VarInt::from_u32(1));
    t.max_concurrent_uni_streams(VarInt::from_u32(1));
    // A whole maximal frame may be in flight on the frame stream.
    let frame_window = (MAX_FRAME_BYTES + 4) as u32;
    t.stream_receive_window(VarInt::from_u32(frame_window));
    t.receive_window(VarInt::from_u32(frame_window + MAX_CRL_DER_LEN as u32));
    t.send_window(2 * MAX_FRAME_BYTES as u64);
    t.datagram_receive_buffer_size(None);
    t.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .expect("30 s is a valid idle timeout"),
    ));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t
}

/// Bind the endpoint with server and default client configs.
pub(crate) fn endpoint(
    cfg: &TransportConfig,
    creds: &NodeCredentials,
    trust: &Arc<PeerTrust>,
) -> anyhow::Result<quinn::Endpoint> {
    let transport = Arc::new(transport_config());
    let server_tls =
        certs::tls::server_config(creds, trust).context("building TLS server config")?;
    let client_tls =
        certs::tls::client_config(creds, trust).context("building TLS client config")?;
    anyhow::ensure!(
        server_tls.max_early_data_size == 0,
        "0-RTT must be disabled (E-12)"
    );
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(server_tls).context("TLS server config unusable for QUIC")?,
    ));
    server.transport_config(transport.clone());
    server.max_incoming(cfg.max_sessions.saturating_mul(2).max(4));
    let mut client = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client_tls).context("TLS client config unusable for QUIC")?,
    ));
    client.transport_config(transport);
    let mut endpoint = quinn::Endpoint::server(server, cfg.listen)
        .with_context(|| format!("binding QUIC on {}", cfg.listen))?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// Why a handshake or the post-handshake checks failed.
enum HandshakeFailure {
    /// The peer refused us: a TLS alert (our certificate is unknown,
    /// expired, revoked or misnamed there) or a refusing close code after
    /// its own checks. Reported as `PeerRejected`; the dialer backs off
    /// to its longest delay (`code` is the QUIC error code, for the log).
    Refused { code: u64, reason: String },
    /// Authentication or protocol rejection: reported as `PeerRejected`.
    Rejected(String),
    /// Unreachable, timed out, shut down: logged only.
    Unreachable(String),
}

/// TLS alerts travel as QUIC transport error codes 0x100 + alert.
const TLS_ALERTS: std::ops::RangeInclusive<u64> = 0x100..=0x1ff;

fn classify(e: &ConnectionError) -> HandshakeFailure {
    match e {
        ConnectionError::TimedOut | ConnectionError::LocallyClosed | ConnectionError::Reset => {
            HandshakeFailure::Unreachable(e.to_string())
        }
        ConnectionError::ApplicationClosed(c) => {
            let code = c.error_code.into_inner();
            match CloseCode::from_wire(code) {
                Some(CloseCode::Shutdown) => HandshakeFailure::Unreachable(e.to_string()),
                Some(c) if c.refuses() => HandshakeFailure::Refused {
                    code,
                    reason: e.to_string(),
                },
                _ => HandshakeFailure::Rejected(e.to_string()),
            }
        }
        // Sent by the peer (a local TLS failure is a `TransportError`).
        ConnectionError::ConnectionClosed(c) if TLS_ALERTS.contains(&u64::from(c.error_code)) => {
            HandshakeFailure::Refused {
                code: u64::from(c.error_code),
                reason: e.to_string(),
            }
        }
        _ => HandshakeFailure::Rejected(e.to_string()),
    }
}

/// ALPN and identity checks shared by both sides.
fn check_peer(inner: &Inner, conn: &Connection) -> Result<NodeIdentity, String> {
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<HandshakeData>().ok())
        .and_then(|h| h.protocol);
    if alpn.as_deref() != Some(ALPN) {
        conn.close(
            CloseCode::Protocol.into(),
            b"upgrade needed: kizuna/1 required",
        );
        return Err(format!(
            "peer does not speak {} (upgrade needed on one side)",
            String::from_utf8_lossy(ALPN)
        ));
    }
    let certs = conn
        .peer_identity()
        .and_then(|p| p.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| "peer presented no certificate".to_string())?;
    let identity = peer_identity(&certs).map_err(|e| {
        conn.close(CloseCode::Identity.into(), b"bad certificate");
        format!("peer certificate unusable: {e}")
    })?;
    if identity.node_id == inner.local_node {
        conn.close(CloseCode::Identity.into(), b"connected to self");
        return Err("connected to ourselves".to_string());
    }
    // A CRL may have arrived between the verifier's check and now.
    if inner.revocation.is_revoked(&identity.serial) {
        conn.close(CloseCode::Revoked.into(), b"certificate revoked");
        return Err(format!("peer {} is revoked", identity.node_id));
    }
    Ok(identity)
}

/// Accept incoming connections until the endpoint closes.
pub(crate) async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        let addr = incoming.remote_address();
        if inner.session_count() >= inner.max_sessions {
            tracing::warn!(%addr, max = inner.max_sessions, "refusing connection: session limit reached");
            incoming.refuse();
            continue;
        }
        let inner2 = inner.clone();
        inner.spawn(async move {
            // Awaiting `Incoming` runs the full handshake; 0-RTT is never
            // accepted (the TLS config disables early data as well).
            let result = async {
                let conn = incoming
                    .accept()
                    .map_err(|e| HandshakeFailure::Rejected(e.to_string()))?
                    .await
                    .map_err(|e| classify(&e))?;
                check_peer(&inner2, &conn)
                    .map(|id| (conn, id))
                    .map_err(HandshakeFailure::Rejected)
            }
            .await;
            match result {
                Ok((conn, identity)) => {
                    let _ = establish(&inner2, conn, identity, addr, None);
                }
                Err(
                    HandshakeFailure::Rejected(reason) | HandshakeFailure::Refused { reason, .. },
                ) => {
                    tracing::warn!(%addr, reason, "incoming peer rejected");
                    inner2.notice(Notice::PeerRejected { addr, reason });
                }
                Err(HandshakeFailure::Unreachable(reason)) => {
                    tracing::debug!(%addr, reason, "incoming handshake abandoned");
                }
            }
        });
    }
}

/// Dial `node` at `addr` once; on success the session is registered and the
/// returned receiver resolves when it ends, with how it ended.
async fn dial_once(
    inner: &Arc<Inner>,
    node: &NodeId,
    addr: SocketAddr,
) -> Result<oneshot::Receiver<Ending>, HandshakeFailure> {
    let name = server_name_for(node);
    let connecting = inner
        .endpoint
        .connect(addr, &name.to_str())
        .map_err(|e| HandshakeFailure::Unreachable(e.to_string()))?;
    let conn = connecting.await.map_err(|e| classify(&e))?;
    let identity = check_peer(inner, &conn).map_err(HandshakeFailure::Rejected)?;
    // The server opens the frame stream only after it verified our
    // certificate; until then we are not connected (see the module docs).
    let (send, mut recv) = conn.accept_bi().await.map_err(|e| classify(&e))?;
    let mut tag = [0u8; 1];
    recv.read_exact(&mut tag)
        .await
        .map_err(|e| HandshakeFailure::Rejected(format!("frame stream did not start: {e}")))?;
    if tag[0] != STREAM_TAG {
        conn.close(CloseCode::Protocol.into(), b"bad stream tag");
        return Err(HandshakeFailure::Rejected(format!(
            "unknown frame stream tag {:#04x} (protocol version skew?)",
            tag[0]
        )));
    }
    establish(inner, conn, identity, addr, Some((send, recv)))
        .map_err(HandshakeFailure::Unreachable)
}

/// Keep `node` connected: dial, wait for the session to end, back off, redial.
pub(crate) async fn dial_loop(inner: Arc<Inner>, node: NodeId, target: Arc<DialTarget>) {
    let mut stop = inner.stop_tx.subscribe();
    let mut rng = ChaCha8Rng::from_entropy();
    let min = inner.reconnect_min_ms;
    let max = inner.reconnect_max_ms;
    let mut backoff_ms = min;
    // Whether the peer's refusal was logged at WARN: once per run of
    // refusals, not at every redial.
    let mut refusal_logged = false;
    loop {
        if *stop.borrow() {
            return;
        }
        let addr = *lock(&target.addr);
        if inner.session_count() < inner.max_sessions {
            let attempt = tokio::time::timeout(DIAL_TIMEOUT, dial_once(&inner, &node, addr)).await;
            match attempt {
                Ok(Ok(done)) => {
                    super::peers::remember(&inner, &node, addr);
                    let started = tokio::time::Instant::now();
                    let ending = done.await.unwrap_or(Ending::Other);
                    match ending {
                        Ending::RefusedByPeer(code) => {
                            log_refusal(&node, code, max, &mut refusal_logged)
                        }
                        _ => refusal_logged = false,
                    }
                    backoff_ms = after_session(backoff_ms, started.elapsed(), ending, min, max);
                }
                Ok(Err(HandshakeFailure::Refused { code, reason })) => {
                    tracing::debug!(peer = %node, %addr, reason, "dial refused");
                    log_refusal(&node, code, max, &mut refusal_logged);
                    inner.notice(Notice::PeerRejected { addr, reason });
                    let refused = Ending::RefusedByPeer(code);
                    backoff_ms = after_session(backoff_ms, Duration::ZERO, refused, min, max);
                }
                Ok(Err(HandshakeFailure::Rejected(reason))) => {
                    tracing::warn!(peer = %node, %addr, reason, "dial rejected");
                    inner.notice(Notice::PeerRejected { addr, reason });
                    backoff_ms = doubled(backoff_ms, min, max);
                }
                Ok(Err(HandshakeFailure::Unreachable(reason))) => {
                    tracing::debug!(peer = %node, %addr, reason, "dial failed");
                    backoff_ms = doubled(backoff_ms, min, max);
                }
                Err(_) => {
                    tracing::debug!(peer = %node, %addr, "dial timed out");
                    backoff_ms = doubled(backoff_ms, min, max);
                }
            }
        }
        // Full jitter over the upper half keeps restarted meshes from dialing
        // in lockstep.
        let delay_ms = backoff_ms / 2 + rng.next_u64() % (backoff_ms / 2 + 1);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(delay_ms)) => {}
            _ = target.wake.notified() => { backoff_ms = min; }
            _ = stop.changed() => return,
        }
    }
}

/// Logs, at WARN and once per run of refusals, that `node` refuses us.
/// Ids and codes only: the peer's reason text is its own words (debug).
fn log_refusal(node: &NodeId, close_code: u64, backoff_ms: u64, logged: &mut bool) {
    if !*logged {
        tracing::warn!(
            peer = %node,
            close_code,
            backoff_ms,
            "peer refuses this node (policy, protocol or certificate); redialling at the longest back-off"
        );
        *logged = true;
    }
}

/// How a session ended, as far as redialling its peer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The peer closed it with a refusal ([`CloseCode::refuses`]: a
    /// violation, our certificate or identity, the protocol), or refused
    /// our certificate at the handshake. The QUIC code, for the log.
    RefusedByPeer(u64),
    /// We closed it with a refusal: the peer broke a rule, and our engine
    /// refuses its sessions for a while anyway.
    RefusedByUs,
    /// The peer said it is shutting down or restarting.
    PeerRestarting,
    /// Anything else: a lost link, a normal close, overload.
    Other,
}

/// How a session ended, from the code we closed it with and the one the
/// peer closed it with, if it closed first. A peer's own close says why
/// the session ended; ours matters only when the peer said nothing.
pub(crate) fn ending(ours: CloseCode, peer: Option<u64>) -> Ending {
    match peer.map(|code| (code, CloseCode::from_wire(code))) {
        Some((code, Some(c))) if c.refuses() => Ending::RefusedByPeer(code),
        Some((_, Some(CloseCode::Shutdown))) => Ending::PeerRestarting,
        _ if ours.refuses() => Ending::RefusedByUs,
        _ => Ending::Other,
    }
}

/// The back-off after a session that lasted `lived` and ended as `ending`:
/// the longest after a refusal (either way: redialling sooner only
/// repeats it, and the peer's engine backs off a violator for longer
/// still), the shortest when the peer is restarting (even if the session
/// was short) or after a stable session, otherwise doubled (up to `max`)
/// like a failed dial.
fn after_session(backoff_ms: u64, lived: Duration, ending: Ending, min: u64, max: u64) -> u64 {
    match ending {
        Ending::RefusedByPeer(_) | Ending::RefusedByUs => max,
        Ending::PeerRestarting => min,
        Ending::Other if lived >= STABLE_SESSION => min,
        Ending::Other => doubled(backoff_ms, min, max),
    }
}

/// The back-off after a failed dial.
fn doubled(backoff_ms: u64, min: u64, max: u64) -> u64 {
    backoff_ms.saturating_mul(2).clamp(min, max)
}

/// Register a verified connection as a session, report `Connected` and start
/// its task. `stream` is the frame stream for the dialing side; the accepting
/// side opens it inside the task.
fn establish(
    inner: &Arc<Inner>,
    conn: Connection,
    identity: NodeIdentity,
    addr: SocketAddr,
    stream: Option<(SendStream, RecvStream)>,
) -> Result<oneshot::Receiver<Ending>, String> {
    let initiator = stream.is_some();
    let session = inner.next_session.fetch_add(1, Ordering::SeqCst);
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = oneshot::channel();
    let queued = Arc::new(AtomicUsize::new(0));
    {
        let mut sessions = lock(&inner.sessions);
        if inner.stopping.load(Ordering::SeqCst) {
            conn.close(CloseCode::Shutdown.into(), b"shutdown");
            return Err("shutting down".into());
        }
        sessions.insert(
            session,
            Session {
                node: identity.node_id.clone(),
                serial: identity.serial.clone(),
                addr,
                conn: conn.clone(),
                out: out_tx,
                queued_bytes: queued.clone(),
                done: Some(done_tx),
            },
        );
    }
    tracing::info!(session, peer = %identity.node_id, role = %identity.role, %addr, initiator, "session connected");
    inner.input(crdt::api::Input::Connected {
        session,
        node: identity.node_id.clone(),
        role: identity.role,
        initiator,
    });
    let inner2 = inner.clone();
    inner.spawn(run_session(inner2, session, conn, stream, out_rx, queued));
    Ok(done_rx)
}

async fn run_session(
    inner: Arc<Inner>,
    session: u64,
    conn: Connection,
    stream: Option<(SendStream, RecvStream)>,
    out_rx: mpsc::UnboundedReceiver<Outgoing>,
    queued: Arc<AtomicUsize>,
) {
    let local_close: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    // Set once the peer ended the frame stream: it is ending the session
    // and its close, with the code saying why, is on its way.
    let peer_ended = Arc::new(AtomicBool::new(false));
    let (code_, reason) = async {
        let (send, recv) = match stream {
            Some(s) => s,
            None => {
                let (mut send, recv) = match conn.open_bi().await {
                    Ok(s) => s,
                    Err(e) => return (CloseCode::Normal, describe(&e)),
                };
                if let Err(e) = send.write_all(&[STREAM_TAG]).await {
                    return (CloseCode::Normal, format!("frame stream broke: {e}"));
                }
                (send, recv)
            }
        };
        if let Some(der) = inner.revocation.current_der() {
            send_crl(&inner, session, Arc::new(der));
        }
        let ended = peer_ended.clone();
        tokio::select! {
            r = read_frames(&inner, session, recv, &peer_ended) => r,
            r = write_frames(&inner, session, send, out_rx, queued, local_close.clone(), ended) => r,
            r = accept_crls(&inner, session, &conn) => r,
            e = conn.closed() => (CloseCode::Normal, describe(&e)),
        }
    }
    .await;
    let reason = lock(&local_close).take().unwrap_or(reason);
    inner.end_session(session, code_, &reason);
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ApplicationClosed(c) => format!(
            "closed by peer (code {}): {}",
            c.error_code,
            String::from_utf8_lossy(&c.reason)
        ),
        ConnectionError::LocallyClosed => "closed locally".to_string(),
        ConnectionError::TimedOut => "peer unreachable (idle timeout)".to_string(),
        other => format!("connection lost: {other}"),
    }
}

/// Read length-prefixed frames until the stream ends or misbehaves.
async fn read_frames(
    inner: &Inner,
    session: u64,
    mut recv: RecvStream,
    peer_ended: &AtomicBool,
) -> (CloseCode, String) {
    // What this session's frames may hold while they wait for the engine.
    let budget = Arc::new(tokio::sync::Semaphore::new(INBOUND_BUDGET_BYTES));
    loop {
        let mut len = [0u8; 4];
        match recv.read_exact(&mut len).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => {
                // The peer's close follows at once (`Connection::closed`
                // ends the session then); close first only if it does not.
                peer_ended.store(true, Ordering::SeqCst);
                tokio::time::sleep(CLOSE_FLUSH_TIMEOUT).await;
                return (CloseCode::Normal, "peer ended the session".into());
            }
            Err(quinn::ReadExactError::FinishedEarly(_)) => {
                return (
                    CloseCode::Protocol,
                    "peer ended the stream inside a length prefix".into(),
                )
            }
            Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e))) => {
                return (CloseCode::Normal, describe(&e))
            }
            Err(quinn::ReadExactError::ReadError(e)) => {
                return (CloseCode::Protocol, format!("frame stream broke: {e}"))
            }
        }
        let n = u32::from_be_bytes(len) as usize;
        // I-29: check before allocating.
        if n > MAX_FRAME_BYTES {
            tracing::warn!(
                session,
                frame_bytes = n,
                limit = MAX_FRAME_BYTES,
                "peer sent an oversized frame"
            );
            return (
                CloseCode::Protocol,
                format!("peer announced a {n}-byte frame; limit is {MAX_FRAME_BYTES}"),
            );
        }
        // Backpressure: wait (not reading, so the peer's stream stalls)
        // until the engine has handled enough of the earlier frames.
        let want = n.max(1) as u32;
        let held = match budget.clone().try_acquire_many_owned(want) {
            Ok(held) => held,
            Err(_) => {
                tracing::debug!(session, "inbound budget full; waiting for the engine");
                inner.notice(Notice::InboundFull { session });
                budget
                    .clone()
                    .acquire_many_owned(want)
                    .await
                    .expect("the budget is never closed")
            }
        };
        let mut body = vec![0u8; n];
        if let Err(e) = recv.read_exact(&mut body).await {
            return match e {
                quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e)) => {
                    (CloseCode::Normal, describe(&e))
                }
                e => (CloseCode::Protocol, format!("frame cut short: {e}")),
            };
        }
        inner.input_held(
            crdt::api::Input::Frame {
                session,
                bytes: body,
            },
            Some(held),
        );
    }
}

/// Write queued frames in order; on `Close`, flush and end gracefully.
/// After each frame, tell the engine how much of the session's frames
/// were written (`Input::Sent`), which opens its send window: while the
/// peer does not read, QUIC flow control stalls these writes, and the
/// engine stops making frames for the session.
async fn write_frames(
    inner: &Inner,
    session: u64,
    mut send: SendStream,
    mut out_rx: mpsc::UnboundedReceiver<Outgoing>,
    queued: Arc<AtomicUsize>,
    local_close: Arc<Mutex<Option<String>>>,
    peer_ended: Arc<AtomicBool>,
) -> (CloseCode, String) {
    while let Some(item) = out_rx.recv().await {
        match item {
            Outgoing::Frame(body) => {
                queued.fetch_sub(body.len(), Ordering::SeqCst);
                debug_assert!(body.len() <= MAX_FRAME_BYTES);
                let len = (body.len() as u32).to_be_bytes();
                if let Err(e) = send.write_all(&len).await {
                    return (CloseCode::Normal, format!("frame stream broke: {e}"));
                }
                if let Err(e) = send.write_all(&body).await {
                    return (CloseCode::Normal, format!("frame stream broke: {e}"));
                }
                inner.input(crdt::api::Input::Sent {
                    session,
                    bytes: body.len(),
                });
            }
            Outgoing::Close(code, reason) => {
                *lock(&local_close) = Some(format!("closed locally: {reason}"));
                let _ = send.finish();
                let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, send.stopped()).await;
                if peer_ended.load(Ordering::SeqCst) {
                    // Our engine answers the peer's goodbye: the peer
                    // closes, and its close says why (see `read_frames`).
                    break;
                }
                return (code, reason);
            }
        }
    }
    // The session was removed (sender dropped): nothing more to do.
    std::future::pending().await
}

/// Receive gossiped CRLs, one unidirectional stream each.
async fn accept_crls(inner: &Arc<Inner>, session: u64, conn: &Connection) -> (CloseCode, String) {
    loop {
        let mut recv = match conn.accept_uni().await {
            Ok(r) => r,
            Err(e) => return (CloseCode::Normal, describe(&e)),
        };
        let der =
            match tokio::time::timeout(CRL_READ_TIMEOUT, recv.read_to_end(MAX_CRL_DER_LEN)).await {
                Err(_) => return (CloseCode::Protocol, "CRL gossip stalled".into()),
                Ok(Err(quinn::ReadToEndError::TooLong)) => {
                    return (
                        CloseCode::Protocol,
                        format!("gossiped CRL exceeds {MAX_CRL_DER_LEN} bytes"),
                    )
                }
                Ok(Err(e)) => return (CloseCode::Normal, format!("CRL stream broke: {e}")),
                Ok(Ok(der)) => der,
            };
        match inner.apply_crl(&der, Some(session)) {
            Ok(outcome) => tracing::debug!(session, ?outcome, "gossiped CRL offered"),
            // E-3: a bad CRL is rejected; the peer may just hold a CRL of
            // another municipality, so the session stays.
            Err(e) => tracing::warn!(session, error = %e, "gossiped CRL rejected"),
        }
    }
}

/// Send `der` to `session` on a fresh unidirectional stream (spawned).
pub(crate) fn send_crl(inner: &Arc<Inner>, session: u64, der: Arc<Vec<u8>>) {
    let Some(conn) = lock(&inner.sessions).get(&session).map(|s| s.conn.clone()) else {
        return;
    };
    inner.spawn(async move {
        let r = tokio::time::timeout(CRL_READ_TIMEOUT, async {
            let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
            s.write_all(&der).await.map_err(|e| e.to_string())?;
            s.finish().map_err(|e| e.to_string())?;
            // Keep the stream alive until the peer has it.
            let _ = s.stopped().await;
            Ok::<(), String>(())
        })
        .await;
        match r {
            Ok(Ok(())) => tracing::debug!(session, crl_bytes = der.len(), "CRL gossiped"),
            Ok(Err(e)) => tracing::debug!(session, error = %e, "CRL gossip failed"),
            Err(_) => tracing::debug!(session, "CRL gossip timed out"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 500;
    const MAX: u64 = 30_000;
    const AT_ONCE: Duration = Duration::from_millis(20);

    #[test]
    fn a_stable_session_resets_the_back_off() {
        let other = Ending::Other;
        assert_eq!(after_session(16_000, STABLE_SESSION, other, MIN, MAX), MIN);
        let hour = Duration::from_secs(3600);
        assert_eq!(after_session(16_000, hour, other, MIN, MAX), MIN);
    }

    #[test]
    fn sessions_the_peer_ends_at_once_back_off_like_failed_dials() {
        let mut backoff = MIN;
        let mut delays = Vec::new();
        for _ in 0..8 {
            backoff = after_session(backoff, AT_ONCE, Ending::Other, MIN, MAX);
            delays.push(backoff);
        }
        assert_eq!(
            delays,
            [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000]
        );
        // Just short of stable still counts as ended at once.
        let short = STABLE_SESSION - Duration::from_millis(1);
        assert_eq!(after_session(MIN, short, Ending::Other, MIN, MAX), 1_000);
    }

    /// A peer that refused us (a violation, our certificate) is not
    /// redialled before the longest back-off, at once and however long
    /// the session lasted; so is one we refused ourselves.
    #[test]
    fn a_refusal_backs_off_to_the_longest_delay_at_once() {
        for ending in [Ending::RefusedByPeer(6), Ending::RefusedByUs] {
            for lived in [AT_ONCE, STABLE_SESSION, Duration::from_secs(3600)] {
                assert_eq!(
                    after_session(MIN, lived, ending, MIN, MAX),
                    MAX,
                    "{ending:?} {lived:?}"
                );
            }
        }
    }

    /// A peer that said it is shutting down or restarting is redialled at
    /// the shortest delay, even after a short session and a long back-off.
    #[test]
    fn a_restarting_peer_is_redialled_at_once() {
        let restarting = Ending::PeerRestarting;
        assert_eq!(after_session(16_000, AT_ONCE, restarting, MIN, MAX), MIN);
        assert_eq!(
            after_session(MAX, Duration::ZERO, restarting, MIN, MAX),
            MIN
        );
    }

    /// The peer's own close says why the session ended; ours only when
    /// the peer said nothing; unknown codes (a newer peer) end plainly.
    #[test]
    fn the_ending_is_read_from_the_close_codes() {
        use CloseCode::*;
        let peer = |c: CloseCode| Some(c as u64);
        for c in [Policy, Protocol, Identity, Revoked] {
            assert_eq!(
                ending(Normal, peer(c)),
                Ending::RefusedByPeer(c as u64),
                "{c:?}"
            );
        }
        assert_eq!(ending(Normal, peer(Shutdown)), Ending::PeerRestarting);
        assert_eq!(ending(Normal, peer(Normal)), Ending::Other);
        assert_eq!(ending(Normal, peer(Overload)), Ending::Other);
        assert_eq!(ending(Normal, Some(99)), Ending::Other);
        assert_eq!(ending(Normal, None), Ending::Other);
        assert_eq!(ending(Policy, None), Ending::RefusedByUs);
        assert_eq!(ending(Protocol, peer(Normal)), Ending::RefusedByUs);
        assert_eq!(ending(Overload, None), Ending::Other);
        assert_eq!(ending(Shutdown, None), Ending::Other);
        // The engine's causes travel as these codes.
        use crdt::api::CloseCause;
        assert!(CloseCode::from(CloseCause::Violation).refuses());
        assert!(CloseCode::from(CloseCause::Version).refuses());
        assert!(CloseCode::from(CloseCause::Identity).refuses());
        assert!(!CloseCode::from(CloseCause::Busy).refuses());
        assert!(!CloseCode::from(CloseCause::Other).refuses());
        for c in [
            Normal, Protocol, Revoked, Shutdown, Overload, Identity, Policy,
        ] {
            assert_eq!(CloseCode::from_wire(c as u64), Some(c));
        }
    }
}
