//! `kizuna docs export`: every document of a data directory as standard
//! Automerge bytes (`<kind>/<id>.automerge`) plus `index.json` (kind, id,
//! file, size, heads), so the data can be read without Kizuna.
//!
//! The database is opened read-only, beside a running node if need be
//! (WAL allows it); nothing is written to the data directory.

use crate::console::{progress, Exit};
use crate::store::{SqliteStore, DB_FILE_NAME};
use anyhow::{anyhow, Context};
use crdt::store::Store;
use std::path::Path;

/// Exports every document of `data_dir` into `out` and prints a summary.
pub fn docs_export(data_dir: &Path, out: &Path) -> Result<(), Exit> {
    let db = data_dir.join(DB_FILE_NAME);
    if !db.exists() {
        return Err(Exit::bad_input(format!("{} does not exist", db.display())));
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
