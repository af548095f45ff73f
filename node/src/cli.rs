//! The `kizuna` command line: subcommands turn flags into validated
//! settings, run, and render errors as messages and exit codes
//! (0 ok, 1 failure, 2 bad input: config, import rows, usage).
//!
//! Data-dir identity: `registry import` opens the data directory as the
//! headquarters node that owns it. The node id and role are read from the
//! database itself (written by `kizuna run` on first start); a fresh data
//! directory needs `--node-id ID` and becomes an hq database for that id.
//! Importing into a non-hq database is refused.

use crate::auth::Operators;
use crate::config::Config;
use crate::driver::Driver;
use crate::import::{self, Encoding};
use crate::store::{DataDirLock, SqliteStore, DB_FILE_NAME};
use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};
use crdt::api::{Command, Operator, Reply};
use crdt::engine::EngineConfig;
use crdt::store::Store;
use crdt::{NodeId, Role};
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(
    name = "kizuna",
    version,
    about = "Kizuna edge-sync node for disaster response"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the node: engine, JSON API, QUIC, mDNS, card reader (`[card]`).
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Manage API operators (bearer tokens).
    Operator {
        #[command(subcommand)]
        cmd: OperatorCmd,
    },
    /// Resident registry.
    Registry {
        #[command(subcommand)]
        cmd: RegistryCmd,
    },
    /// Documents.
    Docs {
        #[command(subcommand)]
        cmd: DocsCmd,
    },
    /// A whole mesh on loopback: CA, certs, configs, synthetic registry,
    /// hq + 2 shelters + clinic + ambulance as child processes.
    Demo {
        /// Directory for everything (default: a new temp directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Print one JSON object per node instead of `role url token`.
        #[arg(long)]
        json: bool,
        /// QUIC ports are base..base+4, HTTP ports base+100..base+104.
        #[arg(long, default_value_t = 17700)]
        base_port: u16,
        #[arg(long, default_value_t = 500)]
        households: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Municipal IC card reader (PC/SC).
    #[command(subcommand)]
    Card(crate::card::cli::CardCmd),
    /// Municipal CA and node certificates.
    Certs {
        #[command(subcommand)]
        cmd: certs::cli::CertsCmd,
    },
}

#[derive(Subcommand, Debug)]
pub enum OperatorCmd {
    /// Add an operator and print its new token (shown once).
    Add {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        name: String,
        /// The 13-digit user ID of the operator's own card (staff card
        /// login; stored only as a keyed hash).
        #[arg(long)]
        card: Option<String>,
    },
    /// Rotate an operator's token and print the new one.
    Token {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum RegistryCmd {
    /// Import a registry CSV (all or nothing). Format: docs/cli.md.
    Import {
        #[arg(long)]
        data_dir: PathBuf,
        file: PathBuf,
        #[arg(long, value_enum, default_value = "auto")]
        encoding: Encoding,
        /// Node id for a fresh data directory (it becomes an hq database).
        #[arg(long)]
        node_id: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum DocsCmd {
    /// Save every document as standard Automerge bytes, plus index.json.
    Export {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

/// An error with its exit code.
#[derive(Debug)]
pub struct Exit {
    pub code: i32,
    pub message: String,
}

impl<E: Into<anyhow::Error>> From<E> for Exit {
    fn from(e: E) -> Exit {
        let e: anyhow::Error = e.into();
        Exit {
            code: 1,
            message: format!("{e:#}"),
        }
    }
}

fn bad_input(message: impl Into<String>) -> Exit {
    Exit {
        code: 2,
        message: message.into(),
    }
}

pub fn main_with(cli: Cli) -> Result<(), Exit> {
    match cli.cmd {
        Cmd::Run { config } => run(&config),
        Cmd::Operator { cmd } => {
            let token = match cmd {
                OperatorCmd::Add {
                    data_dir,
                    name,
                    card,
                } => {
                    let card = card
                        .map(|c| {
                            crate::card::UserId::normalize(&c)
                                .map_err(|e| bad_input(format!("--card: {}", e.code())))
                        })
                        .transpose()?;
                    Operators::add_with_card(&data_dir, &name, card.as_ref())?
                }
                OperatorCmd::Token { data_dir, name } => Operators::rotate(&data_dir, &name)?,
            };
            println!("{token}");
            Ok(())
        }
        Cmd::Registry {
            cmd:
                RegistryCmd::Import {
                    data_dir,
                    file,
                    encoding,
                    node_id,
                },
        } => {
            println!(
                "{}",
                registry_import(&data_dir, &file, encoding, node_id.as_deref())?
            );
            Ok(())
        }
        Cmd::Demo {
            dir,
            json,
            base_port,
            households,
            seed,
        } => crate::demo::run(crate::demo::DemoArgs {
            dir,
            json,
            base_port,
            households,
            seed,
        }),
        Cmd::Docs {
            cmd: DocsCmd::Export { data_dir, out },
        } => docs_export(&data_dir, &out),
        Cmd::Certs { cmd } => certs::cli::run(cmd).map_err(Exit::from),
        Cmd::Card(_) => unreachable!("main dispatches card commands with their own exit codes"),
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn run(config: &Path) -> Result<(), Exit> {
    let cfg = Config::load(config).map_err(|e| bad_input(e.to_string()))?;
    let creds = certs::NodeCredentials::load(&cfg.certs.cert, &cfg.certs.key, &cfg.certs.ca)
        .map_err(|e| bad_input(e.to_string()))?;
    let (node_id, role) = (creds.identity.node_id.clone(), creds.identity.role);
    for w in cfg.check_role(role) {
        tracing::warn!("{w}");
    }
    let card_reader = if cfg.card.enabled {
        Some(card_reader_config(&cfg).map_err(|e| bad_input(format!("{e:#}")))?)
    } else {
        None
    };
    let lock = DataDirLock::acquire(&cfg.data_dir)?;
    let store = SqliteStore::open(&cfg.data_dir.join(DB_FILE_NAME))?;
    let driver = Driver::start(store, cfg.engine_config(node_id.clone(), role))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(cfg.http.bind)
            .await
            .with_context(|| format!("cannot bind http.bind {}", cfg.http.bind))?;
        tracing::info!(node_id = %node_id, role = %role, http = %listener.local_addr()?, "kizuna running");
        watch_clock(&driver, creds.identity.clone());
        let transport = start_mesh(&cfg, creds, &driver).await?;
        match (&cfg.smtp, role) {
            (Some(smtp), Role::Hq) => {
                crate::mail::install(
                    &driver,
                    crate::mail::SmtpSettings::from_config(smtp),
                    tokio::runtime::Handle::current(),
                );
                tracing::info!(host = %smtp.host, port = smtp.port, "family mail via SMTP");
            }
            (None, Role::Hq) => tracing::warn!(
                "no [smtp] configured: family safety mail stays queued in the outbox"
            ),
            _ => {}
        }
        let mut state = crate::api::ApiState::new(driver.clone(), cfg.data_dir.clone());
        let watcher = match card_reader {
            Some(reader) => {
                let (hub, watcher) = start_card(&cfg, reader, &driver, role);
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
        if let Ok(t) = std::sync::Arc::try_unwrap(transport) {
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
fn start_card(
    cfg: &Config,
    reader: crate::card::ReaderConfig,
    driver: &crate::driver::DriverHandle,
    role: Role,
) -> (
    std::sync::Arc<crate::card::flow::CardHub>,
    crate::card::CardWatcher,
) {
    use crate::card::flow::{handle_event, CardHub, TapContext, TapTarget};
    let hub = CardHub::new();
    let cx = TapContext {
        hub: hub.clone(),
        driver: driver.clone(),
        target: TapTarget::for_role(role),
        data_dir: cfg.data_dir.clone(),
        db: Some(cfg.data_dir.join(DB_FILE_NAME)),
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

/// Starts QUIC with mutual TLS, mDNS and static peers, and connects the
/// transport to the engine: transport events become engine inputs, engine
/// frames go out on their sessions. The newest CRL is kept in the data dir.
async fn start_mesh(
    cfg: &Config,
    creds: certs::NodeCredentials,
    driver: &crate::driver::DriverHandle,
) -> anyhow::Result<std::sync::Arc<crate::net::Transport>> {
    use crate::net::{StaticPeer, Transport, TransportConfig, TransportEvent};
    use crdt::api::Input;
    use std::sync::Arc;
    let revocation = Arc::new(certs::crl::RevocationState::new(creds.ca.clone()));
    let crl_path = cfg.data_dir.join("crl.der");
    if let Ok(der) = std::fs::read(&crl_path) {
        if let Err(e) = revocation.offer(&der) {
            tracing::warn!(path = %crl_path.display(), error = %e, "stored revocation list rejected");
        }
    }
    let trust = certs::tls::PeerTrust::new(revocation.clone(), certs::tls::system_clock())?;
    let mut tcfg = TransportConfig::new(cfg.net.listen);
    tcfg.mdns = cfg.net.mdns;
    tcfg.known_peers_file = Some(cfg.data_dir.join("known_peers.json"));
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
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let transport = Arc::new(Transport::start(tcfg, creds, trust, revocation.clone(), tx).await?);
    tracing::info!(quic = %transport.local_addr(), mdns = cfg.net.mdns, "mesh transport up");
    let t = transport.clone();
    driver.set_net_sink(Box::new(move |o| match o {
        crate::driver::NetOut::Send { session, bytes } => t.send(session, bytes),
        crate::driver::NetOut::Close { session, reason } => t.close(session, &reason),
    }));
    let d = driver.clone();
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            match ev {
                TransportEvent::Connected {
                    session,
                    node,
                    role,
                    initiator,
                } => {
                    let _ = d.input(Input::Connected {
                        session,
                        node,
                        role,
                        initiator,
                    });
                }
                TransportEvent::Frame { session, bytes } => {
                    let _ = d.input(Input::Frame { session, bytes });
                }
                TransportEvent::Disconnected { session, reason } => {
                    tracing::info!(session, %reason, "session ended");
                    let _ = d.input(Input::Disconnected { session });
                    if let Some(der) = revocation.current_der() {
                        let _ = std::fs::write(&crl_path, der);
                    }
                }
                TransportEvent::Discovered { node, role, addr } => {
                    tracing::info!(peer = %node, %role, %addr, "discovered by mDNS")
                }
                TransportEvent::PeerRejected { addr, reason } => {
                    tracing::warn!(%addr, %reason, "peer rejected")
                }
            }
        }
    });
    Ok(transport)
}

/// Judges the wall clock against the node's own certificate now and every
/// minute (B-2, B-4): a clock before the certificate was issued, or after it
/// expired, is shown as "device clock looks wrong" in the status API, logged,
/// and marks audit entries as written without trusted time. The node keeps
/// working; certificate checks are never relaxed.
fn watch_clock(driver: &crate::driver::DriverHandle, identity: certs::NodeIdentity) {
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

fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::with_draw_target(
        Some(len),
        indicatif::ProgressDrawTarget::stderr(),
    );
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({eta})")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Opens the data dir as its owning hq node (see the module docs).
pub(crate) fn open_hq(
    data_dir: &Path,
    node_id: Option<&str>,
) -> Result<(DataDirLock, SqliteStore, EngineConfig), Exit> {
    let lock = DataDirLock::acquire(data_dir)?;
    let store = SqliteStore::open(&data_dir.join(DB_FILE_NAME))?;
    let id = match store.load_meta()? {
        Some(m) if m.role != Role::Hq => {
            return Err(bad_input(format!(
                "{} belongs to {} node {}; registry import needs an hq data directory",
                data_dir.display(),
                m.role,
                m.node_id
            )))
        }
        Some(m) => {
            if let Some(n) = node_id {
                if n != m.node_id.as_str() {
                    return Err(bad_input(format!(
                        "--node-id {n} does not match the data directory's node {}",
                        m.node_id
                    )));
                }
            }
            m.node_id
        }
        None => {
            let n = node_id.ok_or_else(|| {
                bad_input(format!(
                    "{} is a new data directory: give --node-id (the hq node's id from its certificate)",
                    data_dir.display()
                ))
            })?;
            NodeId::new(n).map_err(|e| bad_input(e.to_string()))?
        }
    };
    Ok((lock, store, EngineConfig::new(id, Role::Hq)))
}

/// Validates and imports a registry file; returns the summary line.
pub(crate) fn registry_import(
    data_dir: &Path,
    file: &Path,
    enc: Encoding,
    node_id: Option<&str>,
) -> Result<String, Exit> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let reg = match import::parse_file(&bytes, enc, wall_ms()) {
        Ok(r) => r,
        Err(errors) => {
            for e in &errors {
                eprintln!("{}:{e}", file.display());
            }
            return Err(bad_input(format!(
                "{}: {} bad row(s); nothing was imported",
                file.display(),
                errors.len()
            )));
        }
    };
    let (lock, store, ecfg) = open_hq(data_dir, node_id)?;
    let driver = Driver::start(store, ecfg)?;
    let batches = import::batches(&reg.households);
    let pb = progress(reg.households.len() as u64, "importing households");
    let mut landed = 0usize;
    let mut failure = None;
    for (i, b) in batches.iter().enumerate() {
        let r = driver.command_blocking(
            import::batch_op_id(&bytes, i),
            Operator("registry-import".into()),
            Command::ImportHouseholds {
                households: b.to_vec(),
            },
        );
        match r {
            Ok(Reply::Imported { .. }) | Ok(_) => {
                landed += 1;
                pb.inc(b.len() as u64);
            }
            Err(e) => {
                failure = Some((i, e));
                break;
            }
        }
    }
    pb.finish_and_clear();
    driver.shutdown()?;
    drop(lock);
    match failure {
        None => Ok(format!(
            "imported {} households, {} persons ({:?}, {} batch(es))",
            reg.households.len(),
            reg.persons,
            reg.encoding,
            batches.len()
        )),
        Some((i, e)) => Err(Exit {
            code: 1,
            message: format!(
                "batch {} of {} failed: {e} ({}); batches 1..={landed} were committed and the rest were not. \
                 Re-running the same file is safe: committed batches are recognised by their op id and not written twice",
                i + 1,
                batches.len(),
                e.code()
            ),
        }),
    }
}

fn docs_export(data_dir: &Path, out: &Path) -> Result<(), Exit> {
    let db = data_dir.join(DB_FILE_NAME);
    if !db.exists() {
        return Err(bad_input(format!("{} does not exist", db.display())));
    }
    let store = SqliteStore::open_readonly(&db)?;
    let index = store.doc_index()?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let pb = progress(index.len() as u64, "exporting documents");
    let mut entries = Vec::new();
    for (key, heads) in index {
        let sd = store
            .load_doc(&key)?
            .ok_or_else(|| anyhow!("document {}/{} vanished", key.kind.as_str(), key.id))?;
        let doc = crdt::doc::Doc::load(key.clone(), sd.snapshot.as_deref(), &sd.changes)
            .map_err(|e| anyhow!("{e}"))?;
        let bytes = doc.save();
        // Kinds and ids are restricted to [A-Za-z0-9._-], never leading '.'.
        let rel = format!("{}/{}.automerge", key.kind.as_str(), key.id);
        let path = out.join(&rel);
        std::fs::create_dir_all(path.parent().expect("has parent"))?;
        std::fs::write(&path, &bytes)
            .with_context(|| format!("cannot write {}", path.display()))?;
        entries.push(serde_json::json!({
            "kind": key.kind.as_str(),
            "id": key.id,
            "file": rel,
            "bytes": bytes.len(),
            "heads": heads.iter().map(|h| h.iter().map(|b| format!("{b:02x}")).collect::<String>()).collect::<Vec<_>>(),
        }));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let n = entries.len();
    std::fs::write(
        out.join("index.json"),
        serde_json::to_vec_pretty(&serde_json::json!({"documents": entries}))?,
    )?;
    println!("exported {n} documents to {}", out.display());
    Ok(())
}
