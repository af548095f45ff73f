//! Assembling a node: `kizuna run` and the pieces other commands reuse.
//!
//! [`run`] turns a validated [`Config`] and the node's certificate into a
//! running node: it locks the data directory, opens the SQLite store,
//! starts the engine thread ([`crate::driver`]), then on one tokio runtime
//! the clock watch, the QUIC transport ([`start_mesh`]), family mail (hq
//! with `[smtp]`), the card reader ([`start_card`]) and the HTTP API, and
//! on SIGINT or SIGTERM stops them in reverse order and hands the store
//! back. Every edge talks to the engine through its inputs: the transport
//! hands `Connected`/`Frame`/`Disconnected` to [`DriverHandle::input`]
//! unchanged, engine frames go back out through the net sink, card taps
//! become engine queries.
//!
//! Data-dir identity ([`open_hq`]): commands that write into a stopped
//! node's data directory (`registry import`, the demo's set-up) open it as
//! the headquarters node that owns it. The node id and role are read from
//! the database itself (written by `kizuna run` on first start); a fresh
//! data directory needs a node id and becomes an hq database for that id.
//! Opening a non-hq database is refused.
//!
//! This module depends on the edges it assembles and on nothing that
//! depends on it: `cli`, `import` and `demo` build on it, never the other
//! way round.

use crate::auth::OperatorsFile;
use crate::config::Config;
use crate::console::Exit;
use crate::driver::{Driver, DriverHandle, NetOut};
use crate::store::{DataDirLock, SqliteStore, DB_FILE_NAME};
use anyhow::Context;
use crdt::engine::EngineConfig;
use crdt::store::Store;
use crdt::{NodeId, Role};
use std::path::Path;
use std::sync::Arc;

/// The threads a bulk import builds documents on
/// (`EngineConfig::build_threads`): this machine's cores, or
/// `KIZUNA_BUILD_THREADS` when set (to compare, or to leave a core free).
pub fn cores() -> usize {
    if let Some(n) = std::env::var("KIZUNA_BUILD_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before
/// it).
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `kizuna run --config PATH`: runs the node until SIGINT or SIGTERM.
pub fn run(config: &Path) -> Result<(), Exit> {
    let cfg = Config::load(config).map_err(|e| Exit::bad_input(e.to_string()))?;
    // The role (from the certificate, public) decides whether data at
    // rest is encrypted; the storage key is read before anything in the
    // data directory is touched, so a missing key creates nothing.
    let role =
        certs::creds::peek_role(&cfg.certs.cert).map_err(|e| Exit::bad_input(e.to_string()))?;
    let encrypt = cfg.storage.encrypt_for(role);
    let storage_key = match (&cfg.storage.key, encrypt) {
        (Some(source), _) => Some(Arc::new(
            certs::storagekey::read(source).map_err(|e| Exit::bad_input(e.to_string()))?,
        )),
        (None, true) => {
            return Err(Exit::bad_input(format!(
                "{}: {}",
                cfg.source.display(),
                crate::config::StorageConfig::missing_key(role)
            )))
        }
        (None, false) => None,
    };
    let creds = certs::NodeCredentials::load_protected(
        &cfg.certs.cert,
        &cfg.certs.key,
        &cfg.certs.ca,
        storage_key.as_deref(),
        encrypt,
    )
    .map_err(|e| Exit::bad_input(e.to_string()))?;
    let (node_id, role) = (creds.identity.node_id.clone(), creds.identity.role);
    for w in cfg.check_role(role) {
        tracing::warn!("{w}");
    }
    if let Some(e) = cfg.shelter_id_error(&node_id, role) {
        return Err(Exit::bad_input(e));
    }
    let card_reader = if cfg.card.enabled {
        Some(card_reader_config(&cfg).map_err(|e| Exit::bad_input(format!("{e:#}")))?)
    } else {
        None
    };
    // TLS roots and the AUTH password are read now: a bad file stops the
    // start (exit 2) instead of failing every mail later.
    let smtp_settings = match (&cfg.smtp, role) {
        (Some(smtp), Role::Hq) => {
            Some(crate::mail::SmtpSettings::from_config(smtp).map_err(Exit::bad_input)?)
        }
        _ => None,
    };
    for p in crate::atrest::secure_data_dir(&cfg.data_dir)
        .with_context(|| format!("cannot secure {}", cfg.data_dir.display()))?
    {
        tracing::warn!(path = %p.display(), "group/other access removed (data directory 0700, files 0600)");
    }
    let lock = DataDirLock::acquire(&cfg.data_dir)?;
    let store_opts = crate::store::OpenOptions {
        key: storage_key.filter(|_| encrypt),
        ..Default::default()
    };
    let store = SqliteStore::open_checked(&cfg.data_dir.join(DB_FILE_NAME), &store_opts)
        .map_err(|e| Exit::bad_input(e.to_string()))?;
    tracing::info!(encrypted = encrypt, "store open");
    let (revocation, peer_trust) = load_revocation(&cfg, &creds)?;
    let trust = certs::tls::engine_trust(&creds, peer_trust.clone()).map_err(Exit::bad_input)?;
    let driver = Driver::start(store, cfg.engine_config(node_id.clone(), role, trust))?;
    // The screens' projection queries read on connections of their own
    // (the file is now current and in WAL mode).
    driver.attach_readers(&cfg.data_dir.join(DB_FILE_NAME), &store_opts);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(cfg.http.bind)
            .await
            .with_context(|| format!("cannot bind http.bind {}", cfg.http.bind))?;
        tracing::info!(node_id = %node_id, role = %role, http = %listener.local_addr()?, "kizuna running");
        watch_clock(&driver, creds.identity.clone());
        let metrics = crate::metrics::Metrics::new(&driver);
        let metrics_listener = match cfg.metrics.enabled {
            true => Some((
                crate::metrics::bind(&cfg.metrics).await?,
                crate::metrics::read_token(&cfg.metrics)?,
            )),
            false => None,
        };
        let progress = crate::upkeep::registry_at_start(&driver).await;
        let transport = start_mesh(&cfg, creds, (revocation, peer_trust), &driver, &metrics).await?;
        crate::upkeep::start(&driver, &transport, &cfg.data_dir, progress);
        if let Some((listener, token)) = metrics_listener {
            // Weak: the transport is unwrapped for its clean shutdown below.
            let t = Arc::downgrade(&transport);
            let sources = crate::metrics::Sources {
                driver: driver.clone(),
                data_dir: cfg.data_dir.clone(),
                revocation: Some(transport.revocation()),
                sessions: Some(Arc::new(move || {
                    t.upgrade().map(|t| t.session_count()).unwrap_or(0)
                })),
            };
            tracing::info!(metrics = %listener.local_addr()?, "metrics endpoint up");
            tokio::spawn(crate::metrics::serve(
                listener,
                metrics.clone(),
                sources,
                token,
                shutdown_signal(),
            ));
        }
        match (&cfg.smtp, role) {
            (Some(smtp), Role::Hq) => {
                if let Some(settings) = smtp_settings {
                    crate::mail::install(&driver, settings, tokio::runtime::Handle::current());
                }
                tracing::info!(host = %smtp.host, port = smtp.port, tls = ?smtp.tls, auth = smtp.username.is_some(), "family mail via SMTP");
            }
            (None, Role::Hq) => tracing::warn!(
                "no [smtp] configured: family safety mail stays queued in the outbox"
            ),
            _ => {}
        }
        if !cfg.http.bind.ip().is_loopback() {
            tracing::warn!(
                bind = %cfg.http.bind,
                "http.allow_plain_http: the API and screens are served WITHOUT TLS on a \
                 non-loopback address; passwords, sessions and medical data cross the network \
                 unencrypted"
            );
        }
        let mut state = crate::api::ApiState::new(driver.clone(), cfg.data_dir.clone())
            .with_identity(node_id.as_str(), role)
            .with_shelter(cfg.shelter_id(&node_id, role))
            .with_hosts(cfg.http.hosts.clone())
            .with_transport(transport.clone());
        let watcher = match card_reader {
            Some(reader) => {
                let operators = state.operators_file().clone();
                let (hub, watcher) = start_card(&cfg, reader, &driver, role, operators);
                let (m, mut rx) = (metrics.clone(), hub.subscribe());
                tokio::spawn(async move {
                    use tokio::sync::broadcast::error::RecvError;
                    loop {
                        match rx.recv().await {
                            Ok(ev) => m.observe_card_event(&ev),
                            Err(RecvError::Lagged(_)) => continue,
                            Err(RecvError::Closed) => break,
                        }
                    }
                });
                state = state.with_card(hub);
                Some(watcher)
            }
            None => None,
        };
        crate::api::serve(listener, state, shutdown_signal()).await?;
        if let Some(w) = watcher {
            w.stop();
        }
        driver.set_net_sink(Box::new(|_| {}));
        driver.set_mail_sink(Box::new(|_| {}));
        if let Ok(t) = Arc::try_unwrap(transport) {
            t.shutdown().await;
        }
        anyhow::Ok(())
    });
    driver.shutdown()?;
    drop(lock);
    result.map_err(Exit::from)
}

/// The reader settings from `[card]` (the profile file is read here, so a
/// bad profile stops the start like any other configuration error).
fn card_reader_config(cfg: &Config) -> anyhow::Result<crate::card::ReaderConfig> {
    let profile = match &cfg.card.profile {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("card.profile: cannot read {}", path.display()))?;
            crate::card::CardProfile::from_toml(&text)
                .with_context(|| format!("card.profile {}", path.display()))?
        }
        None => crate::card::CardProfile::default(),
    };
    Ok(crate::card::ReaderConfig {
        reader: cfg.card.reader.clone(),
        profile,
    })
}

/// Starts the card watcher; each of its events goes through
/// [`crate::card::flow::handle_event`] on a tokio task, in order.
/// `operators` is the node's one operators file (the API's).
pub fn start_card(
    cfg: &Config,
    reader: crate::card::ReaderConfig,
    driver: &DriverHandle,
    role: Role,
    operators: Arc<OperatorsFile>,
) -> (Arc<crate::card::flow::CardHub>, crate::card::CardWatcher) {
    use crate::card::flow::{handle_event, CardHub, TapContext, TapTarget};
    let hub = CardHub::new();
    let cx = TapContext {
        hub: hub.clone(),
        driver: driver.clone(),
        target: TapTarget::for_role(role),
        operators,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watcher = crate::card::CardWatcher::spawn(
        crate::card::watch::WatchConfig {
            reader,
            ..Default::default()
        },
        move |ev| tx.send(ev).is_ok(),
    );
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            handle_event(&cx, ev).await;
        }
    });
    tracing::info!(reader = ?cfg.card.reader, target = ?TapTarget::for_role(role), "card reader watcher started");
    (hub, watcher)
}

/// The CA, the stored revocation list and the peer verifier built on them:
/// one state for TLS peers and change authors alike, so a list loaded at
/// run time applies to both.
fn load_revocation(
    cfg: &Config,
    creds: &certs::NodeCredentials,
) -> anyhow::Result<(Arc<certs::crl::RevocationState>, Arc<certs::tls::PeerTrust>)> {
    let revocation = Arc::new(certs::crl::RevocationState::new(creds.ca.clone()));
    let crl_path = cfg.data_dir.join(certs::crlstore::CRL_FILE);
    // Fail closed: a damaged list falls back to the previous one, and with
    // neither usable the node does not start as if nothing were revoked.
    match certs::crlstore::load(&crl_path, &revocation)? {
        certs::crlstore::Loaded::Nothing => tracing::info!("no revocation list held yet"),
        certs::crlstore::Loaded::Current { number } => {
            tracing::info!(crl_number = number, "revocation list loaded")
        }
        certs::crlstore::Loaded::Previous { number, reason } => tracing::error!(
            path = %crl_path.display(),
            error = %reason,
            crl_number = number,
            "stored revocation list damaged; the previous list is in force (load the CA's current list: kizuna crl load)"
        ),
    }
    let trust = certs::tls::PeerTrust::new(revocation.clone(), certs::tls::system_clock())?;
    Ok((revocation, trust))
}

/// Starts QUIC with mutual TLS, mDNS and static peers. The transport hands
/// its engine inputs straight to the driver and carries the engine's
/// frames out; the newest CRL is kept in the data dir (`crl.der`, the one
/// before it in `crl.prev.der`, [`certs::crlstore`]).
pub async fn start_mesh(
    cfg: &Config,
    creds: certs::NodeCredentials,
    (revocation, trust): (Arc<certs::crl::RevocationState>, Arc<certs::tls::PeerTrust>),
    driver: &DriverHandle,
    metrics: &Arc<crate::metrics::Metrics>,
) -> anyhow::Result<Arc<crate::net::Transport>> {
    use crate::net::{StaticPeer, Transport, TransportConfig, TransportSinks};
    let crl_path = cfg.data_dir.join(certs::crlstore::CRL_FILE);
    let mut tcfg = TransportConfig::new(cfg.net.listen);

    tcfg.mdns = cfg.net.mdns;
    tcfg.known_peers_file = Some(cfg.data_dir.join("known_peers.json"));
    tcfg.crl_file = Some(crl_path);
    for p in &cfg.net.static_peers {
        match tokio::net::lookup_host(p.addr.as_str())
            .await
            .ok()
            .and_then(|mut a| a.next())
        {
            Some(addr) => tcfg.static_peers.push(StaticPeer {
                node_id: p.node_id.clone(),
                addr,
            }),
            None => {
                tracing::warn!(peer = %p.node_id, addr = %p.addr, "static peer address does not resolve; skipped")
            }
        }
    }
    let (d, m) = (driver.clone(), metrics.clone());
    let sinks = TransportSinks {
        // A stopped driver means the node is shutting down; the input is
        // moot then.
        input: Box::new(move |input, held| {
            if let crdt::api::Input::Frame { bytes, .. } = &input {
                m.observe_frame(crate::metrics::Direction::Received, bytes);
            }
            let _ = d.input_held(input, held);
        }),
        // The transport logs its notices itself.
        notice: None,
    };
    let transport = Arc::new(Transport::start(tcfg, creds, trust, revocation, sinks).await?);
    tracing::info!(quic = %transport.local_addr(), mdns = cfg.net.mdns, "mesh transport up");
    let (t, m) = (transport.clone(), metrics.clone());
    driver.set_net_sink(Box::new(move |o| match o {
        NetOut::Send { session, bytes } => {
            m.observe_frame(crate::metrics::Direction::Sent, &bytes);
            t.send(session, bytes)
        }
        NetOut::Close {
            session,
            code,
            reason,
        } => t.close(session, code, &reason),
    }));
    Ok(transport)
}

/// Judges the wall clock against the node's own certificate now and every
/// minute (B-2, B-4): a clock before the certificate was issued, or after it
/// expired, is shown as "device clock looks wrong" in the status API, logged,
/// and marks audit entries as written without trusted time. The node keeps
/// working; certificate checks are never relaxed.
pub fn watch_clock(driver: &DriverHandle, identity: certs::NodeIdentity) {
    let check = move || certs::clock_sanity(time::OffsetDateTime::now_utc(), &identity).message();
    // The first verdict is in place before the API answers.
    let mut last = check();
    if let Some(m) = &last {
        tracing::warn!(problem = %m, "device clock looks wrong");
    }
    driver.set_clock_problem(last.clone());
    let d = driver.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            let problem = check();
            if problem != last {
                match &problem {
                    Some(m) => tracing::warn!(problem = %m, "device clock looks wrong"),
                    None => tracing::info!("device clock looks right again"),
                }
                d.set_clock_problem(problem.clone());
                last = problem;
            }
        }
    });
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

/// Opens a stopped node's data dir as its owning hq node (see the module
/// docs): the lock, the store and the engine settings to start a driver.
pub fn open_hq(
    data_dir: &Path,
    node_id: Option<&str>,
) -> Result<(DataDirLock, SqliteStore, EngineConfig), Exit> {
    let lock = DataDirLock::acquire(data_dir)?;
    let store = crate::atrest::open_for_command(
        &data_dir.join(DB_FILE_NAME),
        crate::store::OpenOptions::default(),
    )
    .map_err(|e| Exit::bad_input(format!("{e:#}")))?;
    let id = match store.load_meta()? {
        Some(m) if m.role != Role::Hq => {
            return Err(Exit::bad_input(format!(
                "{} belongs to {} node {}; registry import needs an hq data directory",
                data_dir.display(),
                m.role,
                m.node_id
            )))
        }
        Some(m) => {
            if let Some(n) = node_id {
                if n != m.node_id.as_str() {
                    return Err(Exit::bad_input(format!(
                        "--node-id {n} does not match the data directory's node {}",
                        m.node_id
                    )));
                }
            }
            m.node_id
        }
        None => {
            let n = node_id.ok_or_else(|| {
                Exit::bad_input(format!(
                    "{} is a new data directory: give --node-id (the hq node's id from its certificate)",
                    data_dir.display()
                ))
            })?;
            NodeId::new(n).map_err(|e| Exit::bad_input(e.to_string()))?
        }
    };
    let mut cfg = EngineConfig::new(id, Role::Hq, crdt::signing::Trust::offline());
    cfg.build_threads = cores();
    Ok((lock, store, cfg))
}
