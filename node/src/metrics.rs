//! Prometheus metrics of a running node, served on their own listener
//! (`[metrics]` in the config: loopback by default; any other address needs
//! a bearer token file), in the OpenMetrics text format written by the
//! `prometheus-client` crate.
//!
//! Model: two kinds of numbers. *Event counters* are bumped where the event
//! passes: every sync frame the transport carries in either direction is
//! decoded once more here ([`Metrics::observe_frame`]) and counted by frame
//! type, and its changes by document kind; every card reader event by its
//! type; every committing engine batch lands in the driver's commit-time
//! histogram. *State* (peers, documents by kind, quarantine, outbox states,
//! audit entries, CRL, SQLite file sizes) is read on each scrape from one
//! engine `Status` query and the file system, so a scrape costs one query
//! and never walks the document index.
//!
//! Privacy: labels carry kinds, states, node ids and roles only; no person
//! id, name or address ever becomes a label or a value.

use crate::config::MetricsConfig;
use crate::driver::DriverHandle;
use crate::store::DB_FILE_NAME;
use anyhow::Context;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use crdt::api::{Query, QueryReply};
use crdt::wire::Frame;
use crdt::Kind;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

/// Where a frame went.
#[derive(Clone, Copy, Debug)]
pub enum Direction {
    Sent,
    Received,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Sent => "sent",
            Direction::Received => "received",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FrameLabels {
    direction: &'static str,
    frame: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindDirLabels {
    direction: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FileLabels {
    file: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    node_id: String,
    role: String,
    version: &'static str,
}

/// Every metric of one node. Cheap to share: the families are handles.
pub struct Metrics {
    registry: Mutex<Registry>,
    wire_bytes: Family<DirLabels, Counter>,
    frames: Family<FrameLabels, Counter>,
    changes: Family<KindDirLabels, Counter>,
    change_bytes: Family<KindDirLabels, Counter>,
    card_events: Family<TypeLabels, Counter>,
    peers: Family<StateLabels, Gauge>,
    sessions: Gauge,
    peer_sync_age: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    documents: Family<KindLabels, Gauge>,
    quarantined: Gauge,
    violations: Counter,
    outbox: Family<StateLabels, Gauge>,
    audit_entries: Counter,
    sqlite_bytes: Family<FileLabels, Gauge>,
    crl_number: Gauge,
    revoked: Gauge,
    incarnation: Gauge,
    /// Last totals read from the engine, so counters only ever add the
    /// difference (a restarted node starts its counters from zero again,
    /// which Prometheus' `rate()` handles as a reset).
    last: Mutex<(u64, u64)>,
}

/// What a scrape reads besides the metrics' own counters.
#[derive(Clone)]
pub struct Sources {
    pub driver: DriverHandle,
    pub data_dir: PathBuf,
    pub revocation: Option<Arc<certs::RevocationState>>,
    pub sessions: Option<Arc<dyn Fn() -> usize + Send + Sync>>,
}

impl Metrics {
    /// Registers every metric; `commit_seconds` is the driver's histogram.
    pub fn new(driver: &DriverHandle) -> Arc<Metrics> {
        let mut r = Registry::with_prefix("kizuna");
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            wire_bytes: Family::default(),
            frames: Family::default(),
            changes: Family::default(),
            change_bytes: Family::default(),
            card_events: Family::default(),
            peers: Family::default(),
            sessions: Gauge::default(),
            peer_sync_age: Family::default(),
            documents: Family::default(),
            quarantined: Gauge::default(),
            violations: Counter::default(),
            outbox: Family::default(),
            audit_entries: Counter::default(),
            sqlite_bytes: Family::default(),
            crl_number: Gauge::default(),
            revoked: Gauge::default(),
            incarnation: Gauge::default(),
            last: Mutex::new((0, 0)),
        };
        let info = Family::<InfoLabels, Gauge>::default();
        info.get_or_create(&InfoLabels {
            node_id: driver.info().node_id.to_string(),
            role: driver.info().role.to_string(),
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
        r.register(
            "node",
            "This node: its id, role and version (always 1)",
            info,
        );
        r.register(
            "incarnation",
            "Incarnation of this node's actor id (new at every start and restore)",
            m.incarnation.clone(),
        );
        r.register(
            "wire_bytes",
            "Sync frame bytes carried over QUIC, by direction",
            m.wire_bytes.clone(),
        );
        r.register(
            "frames",
            "Sync frames by direction and frame type",
            m.frames.clone(),
        );
        r.register(
            "sync_changes",
            "Document changes in sync frames, by direction and document kind",
            m.changes.clone(),
        );
        r.register(
            "sync_change_bytes",
            "Bytes of document changes in sync frames, by direction and document kind",
            m.change_bytes.clone(),
        );
        r.register(
            "card_events",
            "Card reader events by type (card_tap = resident read, staff_tap, card_error, card_status)",
            m.card_events.clone(),
        );
        r.register(
            "peers",
            "Peers this node knows of (state=known) and has a session with (state=connected)",
            m.peers.clone(),
        );
        r.register("sessions", "Open QUIC sessions", m.sessions.clone());
        r.register(
            "peer_last_sync_age_seconds",
            "Seconds since the last frame from each peer (sync lag; absent until one arrived)",
            m.peer_sync_age.clone(),
        );
        r.register(
            "documents",
            "Documents held, by kind (registry = households of the resident registry)",
            m.documents.clone(),
        );
        r.register(
            "quarantined_documents",
            "Documents held back because they failed to load or verify",
            m.quarantined.clone(),
        );
        r.register(
            "violations",
            "Peer changes refused by policy (a peer wrote or sent what its role may not)",
            m.violations.clone(),
        );
        r.register(
            "outbox",
            "Family safety mails by outbox state (headquarters)",
            m.outbox.clone(),
        );
        r.register(
            "audit_entries",
            "Entries this node wrote to its own audit chain",
            m.audit_entries.clone(),
        );
        r.register(
            "commit_seconds",
            "Engine time per committing input batch, the durable write included",
            driver.commit_seconds(),
        );
        r.register(
            "engine_restarts",
            "Times the engine was reopened after it panicked (see node::driver)",
            driver.restarts(),
        );
        r.register(
            "sqlite_bytes",
            "Size of the SQLite files (db, wal)",
            m.sqlite_bytes.clone(),
        );
        r.register(
            "crl_number",
            "Number of the newest certificate revocation list held (0: none)",
            m.crl_number.clone(),
        );
        r.register(
            "revoked_certificates",
            "Certificates listed in the newest revocation list held",
            m.revoked.clone(),
        );
        *m.registry.lock().expect("registry lock") = r;
        Arc::new(m)
    }

    /// Counts one sync frame body as it leaves or arrives. Malformed
    /// frames are counted as `malformed` (the engine ends their session).
    pub fn observe_frame(&self, dir: Direction, bytes: &[u8]) {
        let d = dir.as_str();
        self.wire_bytes
            .get_or_create(&DirLabels { direction: d })
            .inc_by(bytes.len() as u64);
        let frame = match crdt::wire::decode(bytes) {
            Ok(Frame::Hello { .. }) => "hello",
            Ok(Frame::Resume { .. }) => "resume",
            Ok(Frame::Reconcile { .. }) => "reconcile",
            Ok(Frame::Bye { .. }) => "bye",
            Ok(Frame::Authors { .. }) => "authors",
            Ok(Frame::Live) => "live",
            Ok(Frame::IHave { .. }) => "ihave",
            Ok(Frame::Graft { .. }) => "graft",
            Ok(Frame::Prune { .. }) => "prune",
            Ok(Frame::Changes { docs, .. }) => {
                for doc in &docs {
                    let l = KindDirLabels {
                        direction: d,
                        kind: doc.key.kind.as_str(),
                    };
                    self.changes
                        .get_or_create(&l)
                        .inc_by(doc.changes.len() as u64);
                    self.change_bytes
                        .get_or_create(&l)
                        .inc_by(doc.changes.iter().map(|c| c.len() as u64).sum());
                }
                "changes"
            }
            Err(_) => "malformed",
        };
        self.frames
            .get_or_create(&FrameLabels {
                direction: d,
                frame,
            })
            .inc();
    }

    /// Counts one card event by its `type` field.
    pub fn observe_card_event(&self, ev: &serde_json::Value) {
        let t = ev["type"].as_str().unwrap_or("unknown");
        // Only the known event types become labels (bounded cardinality).
        let t = match t {
            "card_tap" | "staff_tap" | "card_error" | "card_status" => t,
            _ => "other",
        };
        self.card_events
            .get_or_create(&TypeLabels { r#type: t.into() })
            .inc();
    }

    /// Reads the node's state into the gauges and renders everything.
    pub async fn scrape(&self, src: &Sources) -> anyhow::Result<String> {
        let st = match src.driver.query(Query::Status).await? {
            QueryReply::Status(s) => s,
            _ => anyhow::bail!("unexpected engine reply to a status query"),
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.incarnation.set(st.incarnation as i64);
        let connected = st.peers.iter().filter(|p| p.connected).count();
        self.peers
            .get_or_create(&StateLabels {
                state: "known".into(),
            })
            .set(st.peers.len() as i64);
        self.peers
            .get_or_create(&StateLabels {
                state: "connected".into(),
            })
            .set(connected as i64);
        self.sessions
            .set(src.sessions.as_ref().map(|f| f()).unwrap_or(connected) as i64);
        for p in &st.peers {
            if let Some(t) = p.last_sync {
                self.peer_sync_age
                    .get_or_create(&PeerLabels {
                        peer: p.node_id.to_string(),
                        role: p.role.to_string(),
                    })
                    .set(now_ms.saturating_sub(t) as f64 / 1000.0);
            }
        }
        for k in Kind::ALL {
            let n = st.documents_by_kind.get(&k).copied().unwrap_or(0);
            self.documents
                .get_or_create(&KindLabels { kind: k.as_str() })
                .set(n as i64);
        }
        self.quarantined.set(st.quarantined as i64);
        for s in [
            "pending",
            "sending",
            "indeterminate",
            "failed_permanent",
            "sent",
            "cancelled",
        ] {
            let n = st
                .outbox
                .iter()
                .filter(|(k, _)| {
                    serde_json::to_value(k)
                        .ok()
                        .as_ref()
                        .and_then(|v| v.as_str())
                        == Some(s)
                })
                .map(|(_, n)| *n)
                .sum::<usize>();
            self.outbox
                .get_or_create(&StateLabels { state: s.into() })
                .set(n as i64);
        }
        {
            let mut last = self.last.lock().expect("last lock");
            self.violations.inc_by(st.violations.saturating_sub(last.0));
            self.audit_entries
                .inc_by(st.audit_entries.saturating_sub(last.1));
            *last = (st.violations.max(last.0), st.audit_entries.max(last.1));
        }
        let db = src.data_dir.join(DB_FILE_NAME);
        for (label, path) in [
            ("db", db.clone()),
            ("wal", PathBuf::from(format!("{}-wal", db.display()))),
        ] {
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            self.sqlite_bytes
                .get_or_create(&FileLabels { file: label })
                .set(len as i64);
        }
        if let Some(rev) = &src.revocation {
            let cur = rev.current();
            self.crl_number
                .set(cur.as_ref().map(|c| c.number() as i64).unwrap_or(0));
            self.revoked.set(
                cur.as_ref()
                    .map(|c| c.revoked_serials().len() as i64)
                    .unwrap_or(0),
            );
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(
            &mut text,
            &self.registry.lock().expect("registry lock"),
        )?;
        Ok(text)
    }
}

#[derive(Clone)]
struct Served {
    metrics: Arc<Metrics>,
    sources: Sources,
    token: Option<Arc<str>>,
}

/// Reads the scraper's bearer token from `token_file` (trimmed; at least
/// 16 characters, so nobody leaves a placeholder in place).
pub fn read_token(cfg: &MetricsConfig) -> anyhow::Result<Option<Arc<str>>> {
    let Some(path) = &cfg.token_file else {
        return Ok(None);
    };
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("metrics.token_file: cannot read {}", path.display()))?;
    let t = t.trim();
    anyhow::ensure!(
        t.len() >= 16,
        "metrics.token_file {}: the token must be at least 16 characters",
        path.display()
    );
    Ok(Some(t.into()))
}

/// Binds the metrics listener (an error names `metrics.bind`).
pub async fn bind(cfg: &MetricsConfig) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(cfg.bind)
        .await
        .with_context(|| format!("cannot bind metrics.bind {}", cfg.bind))
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    sources: Sources,
    token: Option<Arc<str>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(handle))
        .with_state(Served {
            metrics,
            sources,
            token,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn handle(State(s): State<Served>, headers: HeaderMap) -> Response {
    if let Some(want) = &s.token {
        let got = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Compare digests so the time taken says nothing about the token.
        let ok = got.is_some_and(|g| blake3::hash(g.as_bytes()) == blake3::hash(want.as_bytes()));
        if !ok {
            return (StatusCode::UNAUTHORIZED, "bearer token required\n").into_response();
        }
    }
    match s.metrics.scrape(&s.sources).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "metrics scrape failed");
            (StatusCode::SERVICE_UNAVAILABLE, "engine unavailable\n").into_response()
        }
    }
}
