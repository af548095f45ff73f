//! Online backup and restore of a node's data directory
//! (`kizuna backup create|restore`).
//!
//! **Create** runs beside the live node (or a stopped one): it opens the
//! database read-only and writes a consistent snapshot with `VACUUM INTO`
//! ([`SqliteStore::snapshot_into`]: one read transaction, so the copy is the
//! state after one commit; every check-in acknowledged before the backup
//! started is in it, because acknowledgements follow the durable commit).
//! The node keeps serving and committing meanwhile (WAL: one writer and
//! readers do not block each other). Beside the database the backup holds
//! the operators file, the stored CRL and the known peers, and a
//! `manifest.json` (node id, role, incarnation, change-log end, size and
//! BLAKE3 digest of the database). Everything is written under
//! `OUT.partial`, fsynced, and renamed to `OUT` last: a backup directory
//! either is complete or does not exist. The node's private key is *not*
//! copied: keep certificates apart from backups (or issue a new one).
//!
//! **Restore** checks the backup (digest, `quick_check`, manifest against
//! the database's own meta), refuses a data directory that already holds a
//! database, and copies it in. The restored node must never reuse an actor
//! id: after the backup the node may have restarted (each start takes the
//! next incarnation) and its changes under those incarnations may live on
//! in peers. So restore sets the incarnation to at least
//! `max(backup + 1, unix seconds now, --incarnation-floor)`: normal starts
//! advance it by one, far slower than seconds pass, so a clock-derived
//! value is above every incarnation used since the backup. A clock before
//! the backup's own time is refused (it cannot be trusted for this) unless
//! the operator gives `--incarnation-floor`. Peers then see a new
//! incarnation, do not assume it holds what the lost disk held, and the
//! change-log cursors they kept fail their hash check, so the next sessions
//! reconcile and send back everything the node lost that reached them.

use crate::auth::OPERATORS_FILE;
use crate::store::{DataDirLock, OpenOptions, SqliteStore, DB_FILE_NAME};
use crate::upkeep::CRL_FILE_NAME;
use anyhow::{anyhow, bail, ensure, Context};
use crdt::store::{Batch, Store};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const MANIFEST_FILE: &str = "manifest.json";
/// Written into a restored data directory: where it came from.
pub const RESTORED_FILE: &str = "restored.json";
pub const FORMAT: u32 = 1;
/// Files copied beside the database when present.
const SIDE_FILES: [&str; 3] = [OPERATORS_FILE, CRL_FILE_NAME, "known_peers.json"];

/// `manifest.json` of a backup.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub node_id: String,
    pub role: String,
    pub incarnation: u32,
    /// Sequence number of the last entry of the node's change log.
    pub log_end: u64,
    pub documents: usize,
    pub created_unix_ms: u64,
    pub db_bytes: u64,
    pub db_blake3: String,
    pub files: Vec<String>,
}

/// What `create` did.
#[derive(Debug)]
pub struct Created {
    pub manifest: Manifest,
    pub dir: PathBuf,
    pub elapsed: Duration,
}

/// What `restore` did.
#[derive(Debug)]
pub struct Restored {
    pub manifest: Manifest,
    /// The incarnation the node takes at its next start.
    pub incarnation: u32,
    pub elapsed: Duration,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn fsync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync {}", dir.display()))
}

fn fsync_file(path: &Path) -> anyhow::Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot fsync {}", path.display()))
}

fn digest_file(path: &Path) -> anyhow::Result<(u64, String)> {
    let mut h = blake3::Hasher::new();
    let f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let n = std::io::copy(&mut std::io::BufReader::new(f), &mut h)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok((n, h.finalize().to_hex().to_string()))
}

/// Opens a database read-only; an encrypted one with the storage key the
/// command was given (`--storage-key-*`), refused without it.
fn read_only(path: &Path, quick_check: bool) -> anyhow::Result<SqliteStore> {
    crate::atrest::open_for_command(
        path,
        OpenOptions {
            read_only: true,
            quick_check,
            ..OpenOptions::default()
        },
    )
    .with_context(|| format!("cannot open {}", path.display()))
}

/// Backs up `data_dir` into the new directory `out`.
pub fn create(data_dir: &Path, out: &Path) -> anyhow::Result<Created> {
    let started = Instant::now();
    let db = data_dir.join(DB_FILE_NAME);
    ensure!(db.exists(), "{} does not exist", db.display());
    ensure!(
        !out.exists(),
        "{} already exists; choose a new directory for each backup",
        out.display()
    );
    let partial = PathBuf::from(format!("{}.partial", out.display()));
    if partial.exists() {
        // Left by an interrupted backup: never part of a finished one.
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("cannot remove {}", partial.display()))?;
    }
    std::fs::create_dir_all(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let result = (|| {
        let copy = partial.join(DB_FILE_NAME);
        // No quick_check of the live file: it costs a full scan, and the
        // copy is checked by every restore.
        read_only(&db, false)?
            .snapshot_into(&copy)
            .context("snapshot of the database")?;
        fsync_file(&copy)?;
        let store = read_only(&copy, false)?;
        let meta = store
            .load_meta()?
            .ok_or_else(|| anyhow!("{} has never been started as a node", db.display()))?;
        let log_end = store.log_end()?.map(|c| c.seq).unwrap_or(0);
        let documents = store.doc_index()?.len();
        drop(store);
        let mut files = vec![DB_FILE_NAME.to_string()];
        for f in SIDE_FILES {
            let src = data_dir.join(f);
            if src.exists() {
                std::fs::copy(&src, partial.join(f))
                    .with_context(|| format!("cannot copy {}", src.display()))?;
                fsync_file(&partial.join(f))?;
                files.push(f.to_string());
            }
        }
        let (db_bytes, db_blake3) = digest_file(&copy)?;
        let manifest = Manifest {
            format: FORMAT,
            node_id: meta.node_id.to_string(),
            role: meta.role.to_string(),
            incarnation: meta.incarnation,
            log_end,
            documents,
            created_unix_ms: unix_ms(),
            db_bytes,
            db_blake3,
            files,
        };
        let mpath = partial.join(MANIFEST_FILE);
        std::fs::write(&mpath, serde_json::to_vec_pretty(&manifest)?)
            .with_context(|| format!("cannot write {}", mpath.display()))?;
        fsync_file(&mpath)?;
        fsync_dir(&partial)?;
        std::fs::rename(&partial, out)
            .with_context(|| format!("cannot rename {} to {}", partial.display(), out.display()))?;
        if let Some(parent) = out.parent() {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            fsync_dir(parent)?;
        }
        anyhow::Ok(manifest)
    })();
    match result {
        Ok(manifest) => Ok(Created {
            manifest,
            dir: out.to_path_buf(),
            elapsed: started.elapsed(),
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            Err(e)
        }
    }
}

/// Reads and verifies a backup directory (manifest, digest, quick_check,
/// meta). Returns the manifest.
pub fn verify(backup: &Path) -> anyhow::Result<Manifest> {
    let mpath = backup.join(MANIFEST_FILE);
    let m: Manifest = serde_json::from_slice(
        &std::fs::read(&mpath).with_context(|| format!("cannot read {}", mpath.display()))?,
    )
    .with_context(|| format!("{} is not a Kizuna backup manifest", mpath.display()))?;
    ensure!(
        m.format == FORMAT,
        "{}: backup format {} is not supported (this build reads {FORMAT})",
        mpath.display(),
        m.format
    );
    let db = backup.join(DB_FILE_NAME);
    let (bytes, digest) = digest_file(&db)?;
    ensure!(
        bytes == m.db_bytes && digest == m.db_blake3,
        "{} does not match its manifest (damaged or altered backup)",
        db.display()
    );
    let store = read_only(&db, true)?;
    let meta = store
        .load_meta()?
        .ok_or_else(|| anyhow!("{} holds no node", db.display()))?;
    ensure!(
        meta.node_id.as_str() == m.node_id && meta.role.to_string() == m.role,
        "{}: the database belongs to {} {}, the manifest says {} {}",
        backup.display(),
        meta.role,
        meta.node_id,
        m.role,
        m.node_id
    );
    Ok(m)
}

/// The incarnation a node restored from `m` takes (see the module docs).
pub fn restored_incarnation(
    m: &Manifest,
    now_unix_ms: u64,
    floor: Option<u32>,
) -> anyhow::Result<u32> {
    if floor.is_none() && now_unix_ms < m.created_unix_ms {
        bail!(
            "this machine's clock ({}) is earlier than the backup ({}): set the clock, or give --incarnation-floor \
             with a value above every incarnation the node has used (its peers' logs show it)",
            certs::clock::fmt_unix(now_unix_ms / 1000),
            certs::clock::fmt_unix(m.created_unix_ms / 1000)
        );
    }
    let secs = u32::try_from(now_unix_ms / 1000).unwrap_or(u32::MAX - 1);
    let inc = (m.incarnation.saturating_add(1))
        .max(secs)
        .max(floor.unwrap_or(0));
    ensure!(
        inc < u32::MAX,
        "no incarnation left above {}",
        m.incarnation
    );
    Ok(inc)
}

/// Restores `backup` into `data_dir` (which must hold no database).
pub fn restore(backup: &Path, data_dir: &Path, floor: Option<u32>) -> anyhow::Result<Restored> {
    let started = Instant::now();
    let m = verify(backup)?;
    let incarnation = restored_incarnation(&m, unix_ms(), floor)?;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let lock = DataDirLock::acquire(data_dir)?;
    let db = data_dir.join(DB_FILE_NAME);
    for f in [db.clone(), PathBuf::from(format!("{}-wal", db.display()))] {
        ensure!(
            !f.exists(),
            "{} already exists: move the old data directory away before restoring into it",
            f.display()
        );
    }
    let tmp = data_dir.join(format!("{DB_FILE_NAME}.restoring"));
    std::fs::copy(backup.join(DB_FILE_NAME), &tmp)
        .with_context(|| format!("cannot copy the database into {}", data_dir.display()))?;
    {
        // Open without checks (verify ran quick_check on the same bytes)
        // and store the incarnation *before* the one to take: the next
        // start bumps it by one, exactly as after any restart.
        let mut store = crate::atrest::open_for_command(
            &tmp,
            OpenOptions {
                quick_check: false,
                ..OpenOptions::default()
            },
        )?;
        let mut meta = store.load_meta()?.expect("verified");
        meta.incarnation = incarnation - 1;
        store.commit(&Batch {
            meta: Some(meta),
            ..Default::default()
        })?;
    }
    for f in SIDE_FILES {
        let src = backup.join(f);
        if src.exists() {
            std::fs::copy(&src, data_dir.join(f))
                .with_context(|| format!("cannot copy {}", src.display()))?;
            fsync_file(&data_dir.join(f))?;
        }
    }
    // The WAL belongs to the temporary name; SQLite checkpointed it into
    // the file when the store closed above.
    let tmp_wal = PathBuf::from(format!("{}-wal", tmp.display()));
    ensure!(
        !tmp_wal.exists() || std::fs::metadata(&tmp_wal)?.len() == 0,
        "{} was not checkpointed",
        tmp_wal.display()
    );
    let _ = std::fs::remove_file(&tmp_wal);
    let _ = std::fs::remove_file(format!("{}-shm", tmp.display()));
    fsync_file(&tmp)?;
    std::fs::rename(&tmp, &db)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), db.display()))?;
    let record = serde_json::json!({
        "from": backup.display().to_string(),
        "backup": m,
        "restored_unix_ms": unix_ms(),
        "incarnation": incarnation,
    });
    std::fs::write(
        data_dir.join(RESTORED_FILE),
        serde_json::to_vec_pretty(&record)?,
    )?;
    fsync_file(&data_dir.join(RESTORED_FILE))?;
    fsync_dir(data_dir)?;
    drop(lock);
    Ok(Restored {
        manifest: m,
        incarnation,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(inc: u32, created_ms: u64) -> Manifest {
        Manifest {
            format: FORMAT,
            node_id: "hq-1".into(),
            role: "hq".into(),
            incarnation: inc,
            log_end: 0,
            documents: 0,
            created_unix_ms: created_ms,
            db_bytes: 0,
            db_blake3: String::new(),
            files: vec![],
        }
    }

    #[test]
    fn restored_incarnation_is_above_backup_clock_and_floor() {
        let now = 1_800_000_000_000;
        let m = manifest(7, now - 1000);
        assert_eq!(restored_incarnation(&m, now, None).unwrap(), 1_800_000_000);
        // A backup taken after an earlier restore already has a large one.
        let m = manifest(1_900_000_000, now - 1000);
        assert_eq!(restored_incarnation(&m, now, None).unwrap(), 1_900_000_001);
        assert_eq!(
            restored_incarnation(&m, now, Some(2_000_000_000)).unwrap(),
            2_000_000_000
        );
        // A clock before the backup itself is refused without a floor.
        let m = manifest(7, now + 60_000);
        let e = restored_incarnation(&m, now, None).unwrap_err();
        assert!(e.to_string().contains("--incarnation-floor"), "{e}");
        assert_eq!(
            restored_incarnation(&m, now, Some(50)).unwrap(),
            1_800_000_000
        );
        let m = manifest(u32::MAX - 1, now);
        assert!(restored_incarnation(&m, now, None).is_err());
    }
}
