//! Data at rest on the node's own disk: file modes, the encrypted
//! database, and moving a plaintext database to an encrypted one.
//!
//! Model: a node may keep its database encrypted with SQLCipher (on by
//! default for ambulance nodes, whose tablets get lost; available to every
//! role through `[storage]` in the config, see [`crate::config`]). The key
//! is the node's one storage key ([`certs::storagekey`]): from a key file,
//! a systemd credential or a typed passphrase. The same key seals the
//! node's TLS private key. What is encrypted: every page of `kizuna.db`
//! and of its WAL (SQLCipher encrypts WAL frames with the database key);
//! the WAL index (`kizuna.db-shm`) holds page numbers and checksums only;
//! temporary tables and sorts stay in memory (`temp_store = MEMORY`), so
//! no plaintext temp file is ever written.
//!
//! How to drive it: [`restrict_umask`] first thing in `main`, then
//! [`secure_data_dir`] before a node uses its data directory, and open the
//! store through [`SqliteStore::open_checked`] with the key (for `kizuna
//! run`) or [`open_for_command`] (for commands run against a stopped
//! node's directory, whose `--storage-key-*` flags `cli` registers with
//! [`set_command_key_source`]). [`encrypt_data_dir`] is `kizuna store
//! encrypt`, [`rekey_data_dir`] is `kizuna store rekey` (key rotation).
//!
//! Files: the data directory is 0700 and every file in it 0600. The
//! process umask (077) covers every file any part of the node creates
//! (SQLite's database, WAL and index, the lock, operators, CRL, known
//! peers), new database files are created 0600 explicitly, and
//! [`secure_data_dir`] tightens what an older version or an operator left
//! looser (never loosening anything).

use crate::store::{FileState, OpenError, OpenOptions, SqliteStore, DB_FILE_NAME};
use anyhow::{bail, Context};
use certs::storagekey::{KeySource, StorageKey};
use crdt::store::Store;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Sets the process umask to 077: everything the node creates is private
/// to its user, whoever else shares the machine.
pub fn restrict_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Creates `dir` 0700 if missing; otherwise takes group and other access
/// away from it and from every file and directory in it (recursively).
/// Returns the paths it had to tighten, for the log.
pub fn secure_data_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut tightened = Vec::new();
    tighten(dir, &mut tightened)?;
    Ok(tightened)
}

fn tighten(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        // Never follow links out of the data directory.
        return Ok(());
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))?;
        out.push(path.to_path_buf());
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            tighten(&entry?.path(), out)?;
        }
    }
    Ok(())
}

static COMMAND_KEY: OnceLock<Option<KeySource>> = OnceLock::new();

/// The storage key source a command's `--storage-key-*` flags named (set
/// once, by `cli`, before the command runs).
pub fn set_command_key_source(source: Option<KeySource>) {
    let _ = COMMAND_KEY.set(source);
}

fn command_key_source() -> Option<&'static KeySource> {
    COMMAND_KEY.get().and_then(Option::as_ref)
}

/// Reads the command's storage key, if its flags named one.
pub fn command_key() -> anyhow::Result<Option<Arc<StorageKey>>> {
    command_key_source()
        .map(|s| certs::storagekey::read(s).map(Arc::new))
        .transpose()
        .map_err(Into::into)
}

/// Opens the store of a stopped node's data directory for a command:
/// encrypted when the file is (or, for a new file, when a key was given),
/// with the key from the command's flags; the same refusals as the node
/// (no key for an encrypted file, a key for a plaintext one).
pub fn open_for_command(db: &Path, mut opts: OpenOptions) -> anyhow::Result<SqliteStore> {
    let state = FileState::of(db).with_context(|| format!("cannot read {}", db.display()))?;
    let key = match (state, command_key_source()) {
        // Say which flag is missing before anything else.
        (FileState::Encrypted, None) => {
            return Err(OpenError::KeyMissing {
                path: db.to_path_buf(),
            }
            .into())
        }
        _ => command_key()?,
    };
    opts.key = key;
    Ok(SqliteStore::open_checked(db, &opts)?)
}

/// What [`encrypt_data_dir`] did.
#[derive(Debug)]
pub struct Encrypted {
    pub db: PathBuf,
    pub bytes: u64,
    pub documents: usize,
}

/// `kizuna store encrypt --data-dir DIR`: turns a stopped node's plaintext
/// database into an encrypted one, atomically.
///
/// 1. Takes the data directory's lock (the node must be stopped) and
///    opens the plaintext store (which replays its WAL), checkpointing
///    everything into the main file.
/// 2. Exports every table and the schema version into `kizuna.db.encrypting`
///    (new, 0600) with SQLCipher's `sqlcipher_export`, fsyncs it, reopens
///    it with the key and compares a digest of every row with the
///    original's. A crash up to here leaves the plaintext database as it
///    was; a leftover `.encrypting` file is removed by the next run.
/// 3. Closes the plaintext store (SQLite removes its WAL and index), then
///    renames the encrypted file over `kizuna.db` and fsyncs the
///    directory: one atomic step, before which the node sees the old
///    database and after which the new one.
/// 4. Overwrites the old file's blocks through its still open descriptor
///    with zeros (best effort: flash and journaling file systems may keep
///    copies; see docs/operations.md for full-disk encryption).
pub fn encrypt_data_dir(data_dir: &Path, key: &Arc<StorageKey>) -> anyhow::Result<Encrypted> {
    let db = data_dir.join(DB_FILE_NAME);
    let lock = crate::store::DataDirLock::acquire(data_dir)?;
    match FileState::of(&db).with_context(|| format!("cannot read {}", db.display()))? {
        FileState::Plain => {}
        FileState::Encrypted => bail!(
            "{}: データベースはすでに暗号化されています / the database is already encrypted",
            db.display()
        ),
        FileState::Absent | FileState::Empty => bail!(
            "{}: データベースがありません / no database to encrypt (a new node with [storage] encrypt creates an encrypted one)",
            db.display()
        ),
    }
    let plain = SqliteStore::open(&db)?;
    // Held across the rename: the descriptor still reaches the old
    // plaintext file's blocks afterwards, to overwrite them.
    let old = std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .with_context(|| format!("cannot open {}", db.display()))?;
    let documents = reencrypt(data_dir, &db, plain, key)?;
    // After the close checkpointed the WAL into it: its final length.
    let old_len = old.metadata()?.len();
    wipe(old, old_len);
    let bytes = std::fs::metadata(&db)?.len();
    drop(lock);
    Ok(Encrypted {
        db,
        bytes,
        documents,
    })
}

/// What [`rekey_data_dir`] did.
#[derive(Debug)]
pub struct Rekeyed {
    pub db: PathBuf,
    pub documents: usize,
    /// False when the database was already under the new key (a rerun).
    pub db_rekeyed: bool,
    /// Whether the node key was re-sealed (false: not given, or already
    /// under the new key).
    pub node_key_resealed: bool,
}

/// `kizuna store rekey`: moves a stopped node's encrypted database, and
/// optionally its sealed node key, from storage key `old` to `new`.
///
/// Everything is checked before anything is written: the old (or, on a
/// rerun, the new) key must open the database and the node key. The
/// database is copied under the new key exactly as [`encrypt_data_dir`]
/// does (export, fsync, reopen with the new key, compare every row's
/// digest, one atomic rename); then the node key is re-sealed
/// atomically. A crash at any point leaves each file whole under one of
/// the two keys, and running the same command again finishes the job
/// (a file already under the new key is left alone).
pub fn rekey_data_dir(
    data_dir: &Path,
    old: &Arc<StorageKey>,
    new: &Arc<StorageKey>,
    node_key: Option<&Path>,
) -> anyhow::Result<Rekeyed> {
    let db = data_dir.join(DB_FILE_NAME);
    let lock = crate::store::DataDirLock::acquire(data_dir)?;
    match FileState::of(&db).with_context(|| format!("cannot read {}", db.display()))? {
        FileState::Encrypted => {}
        FileState::Plain => bail!(
            "{}: データベースは暗号化されていません / the database is not encrypted: use kizuna store encrypt",
            db.display()
        ),
        FileState::Absent | FileState::Empty => bail!(
            "{}: データベースがありません / no database to rekey",
            db.display()
        ),
    }
    if let Some(p) = node_key {
        let pem = zeroize::Zeroizing::new(
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        );
        if certs::storagekey::unseal(&pem, new, p).is_err() {
            certs::storagekey::unseal(&pem, old, p)?;
        }
    }
    let open = |k: &Arc<StorageKey>| {
        SqliteStore::open_checked(
            &db,
            &OpenOptions {
                key: Some(k.clone()),
                ..OpenOptions::default()
            },
        )
    };
    let (documents, db_rekeyed) = match open(old) {
        Ok(store) => (reencrypt(data_dir, &db, store, new)?, true),
        Err(OpenError::WrongKey { .. }) => match open(new) {
            Ok(store) => (store.doc_index()?.len(), false),
            Err(OpenError::WrongKey { .. }) => bail!(
                "{}: 暗号鍵が違います。古い鍵でも新しい鍵でも開けません。何も変更していません / neither the old nor the new storage key opens the database; nothing was changed",
                db.display()
            ),
            Err(e) => return Err(e.into()),
        },
        Err(e) => return Err(e.into()),
    };
    let node_key_resealed = match node_key {
        Some(p) => certs::storagekey::reseal_file(p, old, new)?,
        None => false,
    };
    drop(lock);
    Ok(Rekeyed {
        db,
        documents,
        db_rekeyed,
        node_key_resealed,
    })
}

/// Copies the open `store` into `kizuna.db.encrypting` under `key`,
/// checks the copy row by row, closes `store` and renames the copy over
/// `db` (see [`encrypt_data_dir`], steps 2 to 4). Returns the number of
/// documents.
fn reencrypt(
    data_dir: &Path,
    db: &Path,
    store: SqliteStore,
    key: &Arc<StorageKey>,
) -> anyhow::Result<usize> {
    let tmp = data_dir.join(format!("{DB_FILE_NAME}.encrypting"));
    if tmp.exists() {
        // Left by an interrupted run, never in use.
        std::fs::remove_file(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    let digest = store.content_digest()?;
    store
        .export_encrypted(&tmp, key)
        .with_context(|| format!("cannot export into {}", tmp.display()))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot fsync {}", tmp.display()))?;
    let documents = {
        let enc = SqliteStore::open_checked(
            &tmp,
            &OpenOptions {
                read_only: true,
                key: Some(key.clone()),
                ..OpenOptions::default()
            },
        )?;
        if enc.content_digest()? != digest {
            bail!(
                "{}: the encrypted copy differs from the original; nothing was changed",
                tmp.display()
            );
        }
        enc.doc_index()?.len()
    };
    // Closing the only connection checkpoints and removes the WAL; a WAL
    // left behind would be replayed into the new file.
    drop(store);
    for side in ["-wal", "-shm"] {
        let p = data_dir.join(format!("{DB_FILE_NAME}{side}"));
        if std::fs::metadata(&p).is_ok_and(|m| m.len() > 0) {
            bail!(
                "{} still exists after closing the database; nothing was changed",
                p.display()
            );
        }
        let _ = std::fs::remove_file(&p);
    }
    std::fs::rename(&tmp, db)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), db.display()))?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync {}", data_dir.display()))?;
    Ok(documents)
}

/// Overwrites a replaced file's content with zeros (best effort).
fn wipe(mut f: std::fs::File, len: u64) {
    use std::io::{Seek, Write};
    let zeros = vec![0u8; 1 << 20];
    let mut left = len;
    let mut ok = f.seek(std::io::SeekFrom::Start(0)).is_ok();
    while ok && left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        ok = f.write_all(&zeros[..n]).is_ok();
        left -= n as u64;
    }
    let _ = f.sync_all();
}
