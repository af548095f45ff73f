//! The real network edge: QUIC sessions between nodes, mDNS discovery,
//! reconnecting dialers and CRL gossip.
//!
//! Model: a [`Transport`] owns one quinn endpoint that both listens and dials.
//! Every connection is mutual TLS 1.3 (`certs::tls`, ALPN `kizuna/1`, no
//! resumption, no 0-RTT). Once the handshake is complete and the peer's node
//! identity is known, the connection becomes a *session* with a `u64` id and
//! one bidirectional stream of length-prefixed frames (u32 big-endian length,
//! then the body; the length is checked against [`crdt::wire::MAX_FRAME_BYTES`]
//! before anything is allocated). The accepting side (the TLS server) opens
//! that stream and writes a one-byte stream tag; the dialing side reports the
//! session only after reading that tag, because a TLS 1.3 client finishes its
//! handshake *before* the server has verified the client certificate. So a
//! client whose certificate is rejected never sees `Connected`.
//!
//! The driver (the thread that owns the engine) talks to the transport with
//! plain method calls ([`Transport::send`], [`Transport::close`],
//! [`Transport::offer_crl`], [`Transport::add_static_peer`]) that never block
//! and never need a tokio context. The transport reports through
//! [`TransportSinks`]: engine inputs (`crdt::api::Input::Connected`, `Frame`,
//! `Disconnected`) go to the input sink exactly as the engine takes them
//! (`kizuna run` passes them to `DriverHandle::input` unchanged), and
//! [`Notice`]s (why a session ended, discovered and rejected peers), which the
//! engine does not need, go to the optional notice sink. Every `Connected` is
//! followed by exactly one `Disconnected` for the same session (also on
//! shutdown), preceded by its [`Notice::SessionEnded`].
//!
//! Dialing is advisory and self-healing: each static, remembered or
//! discovered peer gets one dialer task that reconnects with capped,
//! jittered exponential backoff and waits while its session lives. A peer
//! may hold two sessions with us at once (both dialed); the engine copes.
//!
//! Revocation (E-1): a CRL travels on its own unidirectional stream (at most
//! [`certs::crl::MAX_CRL_DER_LEN`] bytes). Each side sends the CRL it holds
//! right after the session starts; a received CRL is offered to the shared
//! `RevocationState`; if it is newer, sessions with newly revoked peers are
//! closed and the CRL is forwarded to every other session. New handshakes
//! with revoked certificates already fail in the `certs` verifiers. Each CRL
//! applied is written to [`TransportConfig::crl_file`] (the one it replaced
//! kept beside it, see [`certs::crlstore`]), so a restart starts from the
//! newest one seen. The operator loads a list the same way, through
//! [`Transport::offer_crl`] (`POST /api/v1/crl`, `kizuna crl load`).

mod discovery;
mod peers;
mod quic;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context as _;
use certs::crl::{CrlError, OfferOutcome, RevocationState};
use certs::tls::PeerTrust;
use certs::NodeCredentials;
use crdt::api::Input;
use crdt::{NodeId, Role};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinSet;

/// A peer we dial because the configuration names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticPeer {
    pub node_id: NodeId,
    pub addr: SocketAddr,
}

/// Validated transport settings (built by the node's config layer).
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// UDP address to listen on (port 0 picks one; see [`Transport::local_addr`]).
    pub listen: SocketAddr,
    pub static_peers: Vec<StaticPeer>,
    /// Advertise and browse `_kizuna._udp.local.`.
    pub mdns: bool,
    /// mDNS instance name; defaults to the node id.
    pub mdns_instance: Option<String>,
    /// First reconnect delay after a failed dial or a lost session.
    pub reconnect_min_ms: u64,
    /// Cap of the exponential reconnect backoff.
    pub reconnect_max_ms: u64,
    /// Live sessions at most; further incoming connections are refused.
    pub max_sessions: usize,
    /// JSON file of last-known peer addresses, read at start and updated after
    /// each successful dial.
    pub known_peers_file: Option<PathBuf>,
    /// Where each newly applied CRL is written (atomically).
    pub crl_file: Option<PathBuf>,
}

impl TransportConfig {
    /// Defaults for everything but the listen address.
    pub fn new(listen: SocketAddr) -> TransportConfig {
        TransportConfig {
            listen,
            static_peers: Vec::new(),
            mdns: false,
            mdns_instance: None,
            reconnect_min_ms: 500,
            reconnect_max_ms: 30_000,
            max_sessions: 64,
            known_peers_file: None,
            crl_file: None,
        }
    }
}

/// Receives engine inputs: `Input::Connected`, `Input::Frame` (in stream
/// order) and `Input::Disconnected`. Called from transport tasks; must not
/// block. A frame comes with its share of the session's inbound budget
/// ([`Held`]): keep it until the engine has handled the frame.
pub type InputSink = Box<dyn Fn(Input, Held) + Send + Sync>;
/// A received frame's share of its session's inbound budget
/// ([`INBOUND_BUDGET_BYTES`]); `None` for inputs that hold nothing. While
/// a session's budget is held, its reader stops reading, so QUIC flow
/// control stops the peer instead of our memory growing.
pub type Held = Option<tokio::sync::OwnedSemaphorePermit>;
/// Receives [`Notice`]s. Called from transport tasks; must not block.
pub type NoticeSink = Box<dyn Fn(Notice) + Send + Sync>;

/// Where the transport reports (see the module docs).
pub struct TransportSinks {
    pub input: InputSink,
    pub notice: Option<NoticeSink>,
}

/// What the transport reports besides engine inputs: facts for logs, the
/// operator and tests, none of which the engine needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// The session ended and why; its `Input::Disconnected` follows.
    SessionEnded { session: u64, reason: String },
    /// mDNS announced a node (advisory: the handshake decides).
    Discovered {
        node: NodeId,
        role: Role,
        addr: SocketAddr,
    },
    /// A handshake with `addr` failed authentication or the protocol check.
    PeerRejected { addr: SocketAddr, reason: String },
    /// The session's received frames hold its whole inbound budget
    /// ([`INBOUND_BUDGET_BYTES`]): it stops reading until the engine has
    /// handled some, and QUIC flow control stalls the peer.
    InboundFull { session: u64 },
}

/// Why [`Transport::offer_crl`] failed.
pub type OfferError = CrlError;

/// Bytes of one session's received frames that may wait for the engine
/// a peer sending faster than the engine handles its frames is
/// slowed by QUIC flow control, not queued in memory. Four frames of the
/// largest size: the engine takes a frame at a time, so an honest peer is
/// never held back by more than the engine's own pace.
pub const INBOUND_BUDGET_BYTES: usize = 4 * crdt::wire::MAX_FRAME_BYTES;

/// Per-session send queue limit in bytes; beyond it the session is closed
/// (the engine resumes on the next session) rather than growing memory.
pub const MAX_SEND_QUEUE_BYTES: usize = 4 * crdt::wire::MAX_FRAME_BYTES;

/// Why a session ends, as told to the peer: the QUIC application close
/// code. The peer's dialer reads it to decide how soon to come back (see
/// `quic::after_session`): a refusal ([`CloseCode::refuses`]) is not
/// retried before the longest back-off, a shutdown or restart is retried
/// at once, anything else backs off by how long the session lasted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// Ended without blame (the peer said goodbye, a local fault).
    Normal = 0,
    /// The peer broke the transport protocol: wrong ALPN or stream tag,
    /// oversized or cut frames, oversized or stalled CRL gossip; or it
    /// speaks another protocol version.
    Protocol = 1,
    /// The peer's certificate is revoked.
    Revoked = 2,
    /// This node is shutting down or restarting (the process or its
    /// engine): come back soon.
    Shutdown = 3,
    /// This node cannot keep up with the peer (send queue overflow) or
    /// holds as many sessions with it as it may.
    Overload = 4,
    /// The peer's certificate or hello names the wrong node or role.
    Identity = 5,
    /// The peer broke a rule of the sync protocol or of policy, or is
    /// backed off after one.
    Policy = 6,
}

impl CloseCode {
    /// The code a received close carries, if it is one of ours.
    pub fn from_wire(code: u64) -> Option<CloseCode> {
        use CloseCode::*;
        [
            Normal, Protocol, Revoked, Shutdown, Overload, Identity, Policy,
        ]
        .into_iter()
        .find(|c| *c as u64 == code)
    }

    /// Whether a session closed with this code was refused: the one closed
    /// will be refused again if it comes back soon.
    pub fn refuses(self) -> bool {
        matches!(
            self,
            CloseCode::Protocol | CloseCode::Revoked | CloseCode::Identity | CloseCode::Policy
        )
    }
}

impl From<CloseCode> for quinn::VarInt {
    fn from(c: CloseCode) -> quinn::VarInt {
        quinn::VarInt::from_u32(c as u32)
    }
}

impl From<crdt::api::CloseCause> for CloseCode {
    fn from(c: crdt::api::CloseCause) -> CloseCode {
        use crdt::api::CloseCause;
        match c {
            CloseCause::Violation => CloseCode::Policy,
            CloseCause::Version => CloseCode::Protocol,
            CloseCause::Identity => CloseCode::Identity,
            CloseCause::Busy => CloseCode::Overload,
            CloseCause::Other => CloseCode::Normal,
        }
    }
}

pub(crate) enum Outgoing {
    Frame(Vec<u8>),
    Close(CloseCode, String),
}

/// A live session as seen by the driver-facing methods.
pub(crate) struct Session {
    pub node: NodeId,
    pub serial: Vec<u8>,
    pub addr: SocketAddr,
    pub conn: quinn::Connection,
    pub out: mpsc::UnboundedSender<Outgoing>,
    pub queued_bytes: Arc<AtomicUsize>,
    /// Told how the session ended when it is removed; the dialer waits
    /// on it.
    pub done: Option<oneshot::Sender<quic::Ending>>,
}

/// One peer a dialer task keeps connected.
pub(crate) struct DialTarget {
    pub addr: Mutex<SocketAddr>,
    pub wake: Notify,
    /// Named by the operator (static peer): only the operator re-aims it,
    /// never an mDNS announcement (anyone on the link can send one).
    pub pinned: AtomicBool,
    /// Created by an mDNS announcement (counted against the bound).
    pub discovered: bool,
}

/// Where a peer's address came from; decides what may re-aim a dialer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Configured or added by the operator.
    Static,
    /// From the known-peers file of an earlier run.
    Remembered,
    /// From an mDNS announcement (unauthenticated until the handshake).
    Mdns,
}

/// Dialers started by mDNS announcements, at most: spoofed announcements
/// for invented node ids must not grow tasks without bound.
pub const MAX_DISCOVERED_DIALERS: usize = 64;

pub(crate) struct Inner {
    pub local_node: NodeId,
    pub local_role: Role,
    pub endpoint: quinn::Endpoint,
    pub sinks: TransportSinks,
    pub crl_file: Option<PathBuf>,
    /// The list last written to `crl_file` (kept as the previous list when
    /// a newer one is saved).
    pub crl_saved: Mutex<Option<Vec<u8>>>,
    pub revocation: Arc<RevocationState>,
    pub sessions: Mutex<HashMap<u64, Session>>,
    pub next_session: AtomicU64,
    pub dialers: Mutex<HashMap<NodeId, Arc<DialTarget>>>,
    pub known: Mutex<BTreeMap<NodeId, SocketAddr>>,
    pub known_file: Option<PathBuf>,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    pub max_sessions: usize,
    pub tasks: Mutex<JoinSet<()>>,
    pub runtime: tokio::runtime::Handle,
    pub stopping: AtomicBool,
    pub stop_tx: watch::Sender<bool>,
    pub mdns: Mutex<Option<discovery::Mdns>>,
}

/// Lock ignoring poison: every guarded value stays consistent between
/// statements, so a panic elsewhere does not invalidate it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    pub fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        if self.stopping.load(Ordering::SeqCst) {
            return;
        }
        let mut tasks = lock(&self.tasks);
        while tasks.try_join_next().is_some() {}
        tasks.spawn_on(fut, &self.runtime);
    }

    /// Hands an engine input to the driver.
    pub fn input(&self, input: Input) {
        (self.sinks.input)(input, None);
    }

    /// Hands a received frame to the driver with its share of the inbound
    /// budget.
    pub fn input_held(&self, input: Input, held: Held) {
        (self.sinks.input)(input, held);
    }

    pub fn notice(&self, notice: Notice) {
        if let Some(n) = &self.sinks.notice {
            n(notice);
        }
    }

    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// Remove a session, close its connection and report it, exactly once.
    /// `close_code` is what we tell the peer; if the peer closed the
    /// connection first, its close (already in `conn`) says why it ended.
    pub fn end_session(&self, session: u64, close_code: CloseCode, reason: &str) {
        let removed = lock(&self.sessions).remove(&session);
        if let Some(mut s) = removed {
            let peer_code = match s.conn.close_reason() {
                Some(quinn::ConnectionError::ApplicationClosed(c)) => {
                    Some(c.error_code.into_inner())
                }
                _ => None,
            };
            let wire_reason: String = reason.chars().take(120).collect();
            s.conn.close(close_code.into(), wire_reason.as_bytes());
            if let Some(done) = s.done.take() {
                let _ = done.send(quic::ending(close_code, peer_code));
            }
            tracing::info!(session, peer = %s.node, addr = %s.addr, reason, "session ended");
            self.notice(Notice::SessionEnded {
                session,
                reason: reason.to_string(),
            });
            self.input(Input::Disconnected { session });
        }
    }

    /// Apply CRL bytes (from the operator, disk or a peer session `from`).
    pub fn apply_crl(
        self: &Arc<Self>,
        der: &[u8],
        from: Option<u64>,
    ) -> Result<OfferOutcome, CrlError> {
        let outcome = self.revocation.offer(der)?;
        match &outcome {
            OfferOutcome::Applied {
                number,
                newly_revoked,
            } => {
                tracing::info!(crl_number = number, newly_revoked = newly_revoked.len(), from_session = ?from, "CRL applied");
                if let Some(path) = &self.crl_file {
                    // Always the list in force now: two offers may finish
                    // in either order, and the older must not be saved last.
                    let mut saved = lock(&self.crl_saved);
                    if let Some(now) = self.revocation.current_der() {
                        if saved.as_deref() != Some(&now[..]) {
                            match certs::crlstore::save(path, &now, saved.as_deref()) {
                                Ok(()) => *saved = Some(now),
                                Err(e) => {
                                    tracing::warn!(path = %path.display(), error = %e, "could not keep the applied CRL")
                                }
                            }
                        }
                    }
                }
                let revoked: Vec<(u64, NodeId)> = lock(&self.sessions)
                    .iter()
                    .filter(|(_, s)| newly_revoked.contains(&s.serial))
                    .map(|(id, s)| (*id, s.node.clone()))
                    .collect();
                for (id, node) in revoked {
                    tracing::warn!(session = id, peer = %node, "closing session: peer certificate revoked");
                    self.end_session(id, CloseCode::Revoked, "peer certificate revoked");
                }
                let others: Vec<u64> = lock(&self.sessions)
                    .keys()
                    .copied()
                    .filter(|id| Some(*id) != from)
                    .collect();
                let der = Arc::new(der.to_vec());
                for id in others {
                    quic::send_crl(self, id, der.clone());
                }
            }
            OfferOutcome::Stale { held, offered } => {
                tracing::debug!(held, offered, from_session = ?from, "stale CRL offered");
                if let (Some(id), true) = (from, offered < held) {
                    if let Some(ours) = self.revocation.current_der() {
                        quic::send_crl(self, id, Arc::new(ours));
                    }
                }
            }
        }
        Ok(outcome)
    }

    /// Make sure a dialer keeps `node` connected at `addr`.
    pub fn ensure_dialer(self: &Arc<Self>, node: NodeId, addr: SocketAddr, origin: Origin) {
        if node == self.local_node {
            return;
        }
        let mut dialers = lock(&self.dialers);
        if let Some(t) = dialers.get(&node) {
            if origin == Origin::Static {
                t.pinned.store(true, Ordering::Relaxed);
            } else if t.pinned.load(Ordering::Relaxed) {
                if origin == Origin::Mdns {
                    tracing::debug!(peer = %node, %addr, "mDNS address for a static peer ignored");
                }
                return;
            }
            let mut a = lock(&t.addr);
            if *a != addr {
                tracing::info!(peer = %node, old = %*a, new = %addr, "peer address changed");
                *a = addr;
                t.wake.notify_one();
            }
            return;
        }
        if origin == Origin::Mdns
            && dialers.values().filter(|t| t.discovered).count() >= MAX_DISCOVERED_DIALERS
        {
            tracing::warn!(peer = %node, "too many mDNS-discovered peers; announcement ignored");
            return;
        }
        let target = Arc::new(DialTarget {
            addr: Mutex::new(addr),
            wake: Notify::new(),
            pinned: AtomicBool::new(origin == Origin::Static),
            discovered: origin == Origin::Mdns,
        });
        dialers.insert(node.clone(), target.clone());
        drop(dialers);
        let inner = self.clone();
        self.spawn(quic::dial_loop(inner, node, target));
    }
}

/// The network edge of one node. Dropping it without [`Transport::shutdown`]
/// aborts every task abruptly.
pub struct Transport {
    inner: Arc<Inner>,
    local_addr: SocketAddr,
}

impl Transport {
    /// Bind, start listening, advertise/browse mDNS if asked, and start
    /// dialing static and remembered peers. Must be called inside a tokio
    /// runtime; the other methods may be called from any thread.
    pub async fn start(
        cfg: TransportConfig,
        creds: NodeCredentials,
        trust: Arc<PeerTrust>,
        revocation: Arc<RevocationState>,
        sinks: TransportSinks,
    ) -> anyhow::Result<Transport> {
        anyhow::ensure!(
            cfg.reconnect_min_ms > 0 && cfg.reconnect_min_ms <= cfg.reconnect_max_ms,
            "reconnect_min_ms must be > 0 and <= reconnect_max_ms"
        );
        anyhow::ensure!(cfg.max_sessions > 0, "max_sessions must be > 0");
        let endpoint = quic::endpoint(&cfg, &creds, &trust)?;
        let local_addr = endpoint
            .local_addr()
            .context("reading the bound QUIC address")?;
        let (stop_tx, _) = watch::channel(false);
        let known = match &cfg.known_peers_file {
            Some(p) => peers::load(p),
            None => BTreeMap::new(),
        };
        let inner = Arc::new(Inner {
            local_node: creds.identity.node_id.clone(),
            local_role: creds.identity.role,
            endpoint,
            sinks,
            crl_file: cfg.crl_file.clone(),
            crl_saved: Mutex::new(revocation.current_der()),
            revocation,
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            dialers: Mutex::new(HashMap::new()),
            known: Mutex::new(known.clone()),
            known_file: cfg.known_peers_file.clone(),
            reconnect_min_ms: cfg.reconnect_min_ms,
            reconnect_max_ms: cfg.reconnect_max_ms,
            max_sessions: cfg.max_sessions,
            tasks: Mutex::new(JoinSet::new()),
            runtime: tokio::runtime::Handle::current(),
            stopping: AtomicBool::new(false),
            stop_tx,
            mdns: Mutex::new(None),
        });
        tracing::info!(node = %inner.local_node, role = %inner.local_role, addr = %local_addr, "transport listening");
        inner.spawn(quic::accept_loop(inner.clone()));
        for (node, addr) in known {
            inner.ensure_dialer(node, addr, Origin::Remembered);
        }
        // Static peers win over remembered addresses.
        for p in cfg.static_peers {
            inner.ensure_dialer(p.node_id, p.addr, Origin::Static);
        }
        if cfg.mdns {
            let instance = cfg
                .mdns_instance
                .clone()
                .unwrap_or_else(|| inner.local_node.to_string());
            match discovery::start(&inner, &instance, local_addr.port()) {
                Ok(m) => *lock(&inner.mdns) = Some(m),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "mDNS unavailable; continuing with static peers only")
                }
            }
        }
        Ok(Transport { inner, local_addr })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Queue a frame body for `session`. Never blocks. Unknown (already
    /// ended) sessions are ignored: their `Disconnected` is on its way. An
    /// oversized frame or an overflowing queue closes the session.
    pub fn send(&self, session: u64, frame_body: Vec<u8>) {
        let len = frame_body.len();
        let verdict = {
            let sessions = lock(&self.inner.sessions);
            let Some(s) = sessions.get(&session) else {
                tracing::debug!(session, "send on an ended session dropped");
                return;
            };
            if len > crdt::wire::MAX_FRAME_BYTES {
                Err("local frame exceeds the frame size limit")
            } else if s.queued_bytes.load(Ordering::SeqCst) + len > MAX_SEND_QUEUE_BYTES {
                Err("send queue overflow (peer too slow)")
            } else {
                s.queued_bytes.fetch_add(len, Ordering::SeqCst);
                let _ = s.out.send(Outgoing::Frame(frame_body));
                Ok(())
            }
        };
        if let Err(reason) = verdict {
            tracing::error!(session, frame_bytes = len, reason, "closing session");
            self.inner.end_session(session, CloseCode::Overload, reason);
        }
    }

    /// Close `session` after the frames queued before this call were sent,
    /// telling the peer `code`.
    pub fn close(&self, session: u64, code: CloseCode, reason: &str) {
        if let Some(s) = lock(&self.inner.sessions).get(&session) {
            let _ = s.out.send(Outgoing::Close(code, reason.to_string()));
        }
    }

    /// Apply a CRL (from the operator or disk): offer it to the revocation
    /// state, close every live session whose peer is newly revoked, and
    /// gossip it to all remaining sessions. `Stale` is an expected outcome.
    pub fn offer_crl(&self, der: Vec<u8>) -> Result<OfferOutcome, OfferError> {
        self.inner.apply_crl(&der, None)
    }

    /// The revocation state this transport enforces (CRL number, revoked
    /// serials), for metrics.
    pub fn revocation(&self) -> Arc<RevocationState> {
        self.inner.revocation.clone()
    }

    /// QUIC sessions open right now.
    pub fn session_count(&self) -> usize {
        self.inner.session_count()
    }

    /// Start (or re-aim) a dialer for a peer named at runtime.
    pub fn add_static_peer(&self, peer: StaticPeer) {
        self.inner
            .ensure_dialer(peer.node_id, peer.addr, Origin::Static);
    }

    /// What an mDNS announcement does (the browser calls this): dial the
    /// announced node at that address, unless it is a static peer (never
    /// re-aimed by an announcement) or [`MAX_DISCOVERED_DIALERS`] are
    /// already running. Public so tests can replay announcements.
    pub fn discovered(&self, node: NodeId, addr: SocketAddr) {
        self.inner.ensure_dialer(node, addr, Origin::Mdns);
    }

    /// Dialer tasks running (static, remembered and discovered peers).
    pub fn dialer_count(&self) -> usize {
        lock(&self.inner.dialers).len()
    }

    /// Close every session (each reported `Disconnected`), stop mDNS and all
    /// tasks, and release the UDP port.
    pub async fn shutdown(self) {
        let inner = self.inner.clone();
        inner.stopping.store(true, Ordering::SeqCst);
        let _ = inner.stop_tx.send(true);
        let ids: Vec<u64> = lock(&inner.sessions).keys().copied().collect();
        for id in ids {
            inner.end_session(id, CloseCode::Shutdown, "local node shutting down");
        }
        if let Some(m) = lock(&inner.mdns).take() {
            m.stop();
        }
        inner
            .endpoint
            .close(CloseCode::Shutdown.into(), b"shutdown");
        let mut tasks = std::mem::take(&mut *lock(&inner.tasks));
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            inner.endpoint.wait_idle(),
        )
        .await;
        tracing::info!(node = %inner.local_node, "transport stopped");
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        let _ = self.inner.stop_tx.send(true);
        lock(&self.inner.tasks).abort_all();
        if let Some(m) = lock(&self.inner.mdns).take() {
            m.stop();
        }
        self.inner
            .endpoint
            .close(CloseCode::Shutdown.into(), b"shutdown");
    }
}
