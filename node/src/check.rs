//! `kizuna config check FILE`: validates a node's configuration without
//! starting the node, so municipal IT can check a device before the day.
//!
//! Model: the file goes through the same [`Config::load`] as `kizuna run`
//! (syntax, unknown keys, ranges); then, unless `--skip-files` (for
//! templates on a machine without the node's files), everything `run` would
//! read at start is read too: the storage key (except a prompted one), the
//! certificate, key and CA (node id and role come from there; a sealed key
//! is unsealed with the storage key), the card profile, the metrics token,
//! and an existing database's owner (opened with the storage key when it is
//! encrypted). Nothing is written, bound or locked. The outcome is a
//! [`Report`]: facts, warnings (settings that are ignored or risky) and
//! errors; any error means exit 2, warnings alone do not.

use crate::config::Config;
use crate::store::{OpenOptions, SqliteStore, DB_FILE_NAME};
use crdt::store::Store;
use crdt::Role;
use std::path::Path;

/// What the check found.
#[derive(Debug, Default)]
pub struct Report {
    /// One line per fact ("node shelter-01 (shelter)").
    pub facts: Vec<String>,
    pub warnings: Vec<String>,
    pub errors: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// The report as printed: errors and warnings first, in Japanese and
    /// English, then the facts.
    pub fn render(&self, file: &Path) -> String {
        let mut s = String::new();
        for e in &self.errors {
            s.push_str(&format!("誤り error: {e}\n"));
        }
        for w in &self.warnings {
            s.push_str(&format!("注意 warning: {w}\n"));
        }
        if self.ok() {
            s.push_str(&format!("設定は有効です config ok: {}\n", file.display()));
        } else {
            s.push_str(&format!(
                "設定に誤りがあります config has errors: {}\n",
                file.display()
            ));
        }
        for f in &self.facts {
            s.push_str(&format!("  {f}\n"));
        }
        s
    }
}

/// Checks `file`. `expect_role`: the role the node is meant to have (a
/// template has no certificate to say so); `skip_files`: check the file
/// only, not the files it names.
pub fn check(file: &Path, expect_role: Option<Role>, skip_files: bool) -> Report {
    let mut r = Report::default();
    let cfg = match Config::load(file) {
        Ok(c) => c,
        Err(e) => {
            r.errors.push(e.to_string());
            return r;
        }
    };
    r.facts
        .push(format!("data_dir  {}", cfg.data_dir.display()));
    r.facts.push(format!(
        "quic      {} (mDNS {}, {} static peer(s))",
        cfg.net.listen,
        if cfg.net.mdns { "on" } else { "off" },
        cfg.net.static_peers.len()
    ));
    r.facts.push(format!("api       http://{}", cfg.http.bind));
    if cfg.metrics.enabled {
        r.facts
            .push(format!("metrics   http://{}/metrics", cfg.metrics.bind));
    }
    if !cfg.http.bind.ip().is_loopback() {
        r.warnings.push(format!(
            "http.bind {} is reachable from the network (every request still needs a token; put TLS in front of it)",
            cfg.http.bind
        ));
    }
    let mut role = expect_role;
    if !skip_files {
        // A prompted passphrase is not asked for here: the check must run
        // unattended (systemd's ExecStartPre).
        let storage_key = match &cfg.storage.key {
            Some(certs::storagekey::KeySource::Prompt) => {
                r.facts
                    .push("storage   key from a prompt at start (not read by the check)".into());
                None
            }
            Some(source) => match certs::storagekey::read(source) {
                Ok(k) => {
                    r.facts.push(format!("storage   key from the {source}"));
                    Some(std::sync::Arc::new(k))
                }
                Err(e) => {
                    r.errors.push(e.to_string());
                    None
                }
            },
            None => None,
        };
        match certs::NodeCredentials::load_protected(
            &cfg.certs.cert,
            &cfg.certs.key,
            &cfg.certs.ca,
            storage_key.as_deref(),
            false,
        ) {
            Ok(creds) => {
                let id = &creds.identity;
                r.facts.push(format!(
                    "node      {} ({}), certificate serial {}, valid until {}",
                    id.node_id,
                    id.role,
                    id.serial_hex(),
                    certs::clock::fmt_time(id.not_after)
                ));
                if let Some(m) = certs::clock_sanity(time::OffsetDateTime::now_utc(), id).message()
                {
                    r.warnings.push(m);
                }
                if let Some(want) = expect_role {
                    if want != id.role {
                        r.errors.push(format!(
                            "the certificate is for a {} node, not {want}",
                            id.role
                        ));
                    }
                }
                if cfg.net.static_peers.iter().any(|p| p.node_id == id.node_id) {
                    r.warnings.push(format!(
                        "net.static_peers names this node itself ({})",
                        id.node_id
                    ));
                }
                r.errors.extend(cfg.shelter_id_error(&id.node_id, id.role));
                role = Some(id.role);
                check_database(&cfg, &creds.identity, storage_key, &mut r);
            }
            Err(e) => r.errors.push(e.to_string()),
        }
        if cfg.card.enabled {
            if let Some(p) = &cfg.card.profile {
                match std::fs::read_to_string(p) {
                    Ok(t) => {
                        if let Err(e) = crate::card::CardProfile::from_toml(&t) {
                            r.errors.push(format!("card.profile {}: {e}", p.display()));
                        }
                    }
                    Err(e) => r.errors.push(format!("card.profile {}: {e}", p.display())),
                }
            }
        }
        if let Some(smtp) = &cfg.smtp {
            for (key, file) in [
                ("smtp.ca_file", &smtp.ca_file),
                ("smtp.password_file", &smtp.password_file),
            ] {
                if let Some(f) = file {
                    if let Err(e) = std::fs::File::open(f) {
                        r.errors.push(format!("{key} {}: {e}", f.display()));
                    }
                }
            }
        }
        if cfg.metrics.enabled {
            if let Err(e) = crate::metrics::read_token(&cfg.metrics) {
                r.errors.push(format!("{e:#}"));
            }
        }
    }
    match role {
        Some(role) => {
            r.warnings.extend(cfg.check_role(role));
            if cfg.storage.encrypt_for(role) && cfg.storage.key.is_none() {
                r.errors
                    .push(crate::config::StorageConfig::missing_key(role));
            }
            if role == Role::Hq && cfg.smtp.is_none() {
                r.warnings.push(
                    "no [smtp] on an hq node: family safety mail stays queued in the outbox".into(),
                );
            }
        }
        None if skip_files => r
            .warnings
            .push("role unknown (no certificate read): give --role to check role settings".into()),
        None => {}
    }
    r
}

/// An existing database must belong to the node in the certificate (a data
/// directory copied from another device would otherwise be refused only
/// at start).
fn check_database(
    cfg: &Config,
    id: &certs::NodeIdentity,
    key: Option<std::sync::Arc<certs::storagekey::StorageKey>>,
    r: &mut Report,
) {
    let db = cfg.data_dir.join(DB_FILE_NAME);
    if cfg.data_dir.exists() && !cfg.data_dir.is_dir() {
        r.errors.push(format!(
            "data_dir {} exists and is not a directory",
            cfg.data_dir.display()
        ));
        return;
    }
    if !db.exists() {
        r.facts
            .push("database  none yet (created at the first start)".into());
        return;
    }
    let opts = OpenOptions {
        read_only: true,
        quick_check: false,
        key,
        ..OpenOptions::default()
    };
    match SqliteStore::open_with(&db, &opts).and_then(|s| s.load_meta()) {
        Ok(Some(m)) => {
            if m.node_id != id.node_id || m.role != id.role {
                r.errors.push(format!(
                    "{} belongs to {} node {}, but the certificate is for {} node {}",
                    db.display(),
                    m.role,
                    m.node_id,
                    id.role,
                    id.node_id
                ));
            } else {
                r.facts.push(format!(
                    "database  {} (incarnation {})",
                    db.display(),
                    m.incarnation
                ));
            }
        }
        Ok(None) => r.facts.push(format!("database  {} (empty)", db.display())),
        Err(e) => r.errors.push(format!("{}: {e}", db.display())),
    }
}
