//! `kizuna docs export`: every document of a data directory as standard
//! Automerge bytes (`<kind>/<id>.automerge`) plus `index.json` (kind, id,
//! file, size, heads), so the data can be read without Kizuna; and
//! `kizuna export roster|pfif|handover` ([`crate::outputs`]).
//!
//! Every export is a disclosure the audit trail must answer for: the
//! command takes the data directory (so the node is stopped; a running
//! node serves the same outputs through its API), opens the node's own
//! engine, and appends an audit entry (operator `cli:$USER`, what, how
//! many) to the node's chain. Files are written 0600 in 0700 directories
//! ([`crate::outputs::write_private`]), whatever the umask.

use crate::console::{progress, Exit};
use crate::driver::{Driver, DriverHandle};
use crate::store::{DataDirLock, DB_FILE_NAME};
use anyhow::{anyhow, Context};
use crdt::api::{Command, Operator, Reply};
use crdt::engine::EngineConfig;
use crdt::store::Store;
use std::path::Path;

/// The operator named in audit entries of command-line exports.
pub fn cli_operator() -> String {
    let user: String = std::env::var("USER")
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(32)
        .collect();
    format!("cli:{}", if user.is_empty() { "unknown" } else { &user })
}

/// Opens a data directory as the node that owns it (any role), holding
/// its lock, with the engine running for audit entries.
pub fn open_own(data_dir: &Path) -> Result<(DataDirLock, DriverHandle), Exit> {
    let db = data_dir.join(DB_FILE_NAME);
    if !db.exists() {
        return Err(Exit::bad_input(format!("{} does not exist", db.display())));
    }
    let lock = DataDirLock::acquire(data_dir)?;
    let store = crate::atrest::open_for_command(&db, crate::store::OpenOptions::default())
        .map_err(|e| Exit::bad_input(format!("{e:#}")))?;
    let meta = store.load_meta()?.ok_or_else(|| {
        Exit::bad_input(format!("{}: the node never started", data_dir.display()))
    })?;
    // Audit entries written here are signed by the node at its next start.
    let cfg = EngineConfig::new(meta.node_id, meta.role, crdt::signing::Trust::offline());
    let driver = Driver::start(store, cfg)?;
    Ok((lock, driver))
}

fn audit_export(driver: &DriverHandle, what: &str, scope: &str, count: u64) -> Result<u64, Exit> {
    match driver.command_blocking(
        crate::api::new_op_id(),
        Operator(cli_operator()),
        Command::RecordExport {
            what: what.into(),
            scope: scope.into(),
            count,
        },
    )? {
        Reply::Audited { audit_seq } => Ok(audit_seq),
        _ => Err(Exit::from(anyhow!("unexpected engine reply"))),
    }
}

/// `kizuna export roster|pfif|handover`: renders on the node's own engine
/// (audited), writes `out` 0600, prints a summary.
pub fn output(data_dir: &Path, out: &Path, what: crate::outputs::Output) -> Result<(), Exit> {
    let (lock, driver) = open_own(data_dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(crate::outputs::render(
        &driver,
        &cli_operator(),
        what,
        crate::run::wall_ms(),
    ));
    driver.shutdown()?;
    drop(lock);
    let r = r.map_err(|e| match e {
        crate::outputs::OutputError::Refused(m) => Exit::bad_input(m),
        e => Exit::from(anyhow!("{e}")),
    })?;
    crate::outputs::write_private(out, &r.bytes)
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "exported {} record(s) to {} (audit entry {})",
        r.records,
        out.display(),
        r.audit_seq
    );
    Ok(())
}

/// Exports every document of `data_dir` into `out` and prints a summary.
pub fn docs_export(data_dir: &Path, out: &Path) -> Result<(), Exit> {
    let (lock, driver) = open_own(data_dir)?;
    let store = crate::atrest::open_for_command(
        &data_dir.join(DB_FILE_NAME),
        crate::store::OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )?;
    // Insurance numbers are masked in every export: the eligibility
    // documents (which hold them unmasked) are left out, and counted.
    let (index, skipped): (Vec<_>, Vec<_>) = store
        .doc_index()?
        .into_iter()
        .partition(|(k, _)| k.kind != crdt::Kind::Eligibility);
    crate::outputs::create_private_dir(out)
        .with_context(|| format!("cannot create {}", out.display()))?;
    let pb = progress(index.len() as u64, "exporting documents");
    let mut entries = Vec::new();
    for (key, heads) in index {
        let sd = store
            .load_doc(&key)?
            .ok_or_else(|| anyhow!("document {}/{} vanished", key.kind.as_str(), key.id))?;
        let doc = crdt::doc::Doc::load(key.clone(), sd.snapshot.as_deref(), &sd.changes)
            .map_err(|e| anyhow!("{e}"))?;
        let bytes = doc.save().map_err(|e| anyhow!("{e}"))?;
        // Kinds and ids are restricted to [A-Za-z0-9._-], never leading '.'.
        let rel = format!("{}/{}.automerge", key.kind.as_str(), key.id);
        let path = out.join(&rel);
        crate::outputs::write_private(&path, &bytes)
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
    crate::outputs::write_private(
        &out.join("index.json"),
        &serde_json::to_vec_pretty(&serde_json::json!({
            "documents": entries,
            "left_out": {"eligibility": skipped.len(),
                         "why": "insurance numbers leave a node only masked; eligibility documents are not exported"},
        }))?,
    )?;
    let seq = audit_export(&driver, "docs", "every document", n as u64)?;
    driver.shutdown()?;
    drop(lock);
    println!(
        "exported {n} documents to {} (audit entry {seq})",
        out.display()
    );
    Ok(())
}
