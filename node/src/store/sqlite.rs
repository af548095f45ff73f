//! [`SqliteStore`]: the [`crdt::store::Store`] contract on one SQLite file.
//!
//! The store owns a single [`rusqlite::Connection`] and is driven from the
//! engine's thread. Every [`Batch`] becomes one `BEGIN IMMEDIATE`
//! transaction that applies it with exactly [`crdt::store::MemStore`]'s
//! semantics; `commit` returns after `COMMIT`, which under
//! `journal_mode=WAL` + `synchronous=FULL` means the WAL has been fsynced.
//! Any error rolls the whole batch back. Reads run on the same connection;
//! `load_doc` reads inside one read transaction so the snapshot and its
//! change tail come from one consistent state.
//!
//! Opening checks, in this order and before anything is written: the
//! `application_id` (somebody else's file → [`StoreError::Foreign`]), the
//! `user_version` (a newer schema → [`StoreError::TooNew`], A-13) and
//! `PRAGMA quick_check` (→ [`StoreError::Corrupt`], A-8). Only then does it
//! switch to WAL and run pending migrations (see [`super::schema`]).
//!
//! Values read back are checked, never trusted: a bad kind code, a heads
//! blob whose length is not a multiple of 32, unknown status text, invalid
//! UTF-8 or unparsable meta JSON all become [`StoreError::Corrupt`], never a
//! panic.

use super::schema::{APPLICATION_ID, DIGEST_TABLES, MIGRATIONS, SCHEMA_VERSION};
use certs::storagekey::StorageKey;
use crdt::doc::Hash32;
use crdt::signing::{AuthorHash, Seal};
use crdt::store::{
    Batch, ChangeRecord, Cursor, Damaged, LocationRow, LocationStatus, Meta, PersonRow, ShelterRow,
    Store, StoreError, StoredDoc,
};
use crdt::{DocKey, Kind, NodeId};
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How a store is opened. `Default` is what the node uses.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// How long a statement waits for a lock held by another connection
    /// (only ever a read-only inspector; the data-dir lock keeps writers
    /// out) before failing with a busy error.
    pub busy_timeout_ms: u64,
    /// Run `PRAGMA quick_check` at open. Costs a scan of the file.
    pub quick_check: bool,
    /// Open without write access: no WAL switch, no migrations, commits
    /// fail. The schema must already be current.
    pub read_only: bool,
    /// Truncate the WAL back to this size after checkpoints.
    pub journal_size_limit_bytes: u64,
    /// The SQLite VFS to open through; `None` is the platform's default.
    /// Only the fault-injection tests set it (the `faultvfs` crate).
    pub vfs: Option<String>,
    /// `PRAGMA synchronous = OFF` instead of `FULL`: no fsync at all.
    /// Exists only as the power-cut harness's negative control (it must
    /// see acknowledged writes vanish, proving it can fail); the node
    /// never sets it, and `node/tests/it/faults.rs` checks that a default
    /// open runs with `FULL`.
    pub no_fsync_for_fault_tests: bool,
    /// The storage key: the database (and its WAL) are SQLCipher-encrypted
    /// with it. `None` opens a plaintext database.
    pub key: Option<Arc<StorageKey>>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            busy_timeout_ms: 5_000,
            quick_check: true,
            read_only: false,
            journal_size_limit_bytes: 64 * 1024 * 1024,
            vfs: None,
            no_fsync_for_fault_tests: false,
            key: None,
        }
    }
}

/// The SQLite implementation of [`Store`].
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Maps SQLite's result codes onto the store's error kinds.
pub(crate) fn map_err(e: rusqlite::Error) -> StoreError {
    use rusqlite::Error as E;
    match &e {
        E::SqliteFailure(f, _) => match f.code {
            ErrorCode::DiskFull => StoreError::Full,
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => {
                StoreError::Corrupt(e.to_string())
            }
            _ => StoreError::Io(e.to_string()),
        },
        // A value of the wrong type or encoding can only come from a
        // damaged file: this program writes every column with one type.
        E::FromSqlConversionFailure(..)
        | E::IntegralValueOutOfRange(..)
        | E::Utf8Error(..)
        | E::InvalidColumnType(..) => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Io(e.to_string()),
    }
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn kind_from_sql(code: i64) -> Result<Kind, StoreError> {
    u8::try_from(code)
        .ok()
        .and_then(Kind::from_code)
        .ok_or_else(|| corrupt(format!("unknown document kind code {code}")))
}

fn heads_to_blob(heads: &[Hash32]) -> Vec<u8> {
    heads.concat()
}

fn hash32(b: &[u8]) -> Result<Hash32, StoreError> {
    b.try_into().map_err(|_| {
        StoreError::Corrupt(format!("stored change hash has {} bytes, not 32", b.len()))
    })
}

fn heads_from_blob(blob: &[u8]) -> Result<Vec<Hash32>, StoreError> {
    if !blob.len().is_multiple_of(32) {
        return Err(corrupt(format!(
            "heads blob of {} bytes is not a multiple of 32",
            blob.len()
        )));
    }
    Ok(blob
        .chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            h
        })
        .collect())
}

fn status_to_sql(s: LocationStatus) -> &'static str {
    match s {
        LocationStatus::In => "in",
        LocationStatus::Out => "out",
        LocationStatus::Pending => "pending",
    }
}

fn status_from_sql(s: &str) -> Result<LocationStatus, StoreError> {
    match s {
        "in" => Ok(LocationStatus::In),
        "out" => Ok(LocationStatus::Out),
        "pending" => Ok(LocationStatus::Pending),
        other => Err(corrupt(format!("unknown location status {other:?}"))),
    }
}

/// SQLite integers are i64; u64 values are stored bit-for-bit.
fn u64_to_sql(v: u64) -> i64 {
    v as i64
}
fn u64_from_sql(v: i64) -> u64 {
    v as u64
}
/// Limits and offsets beyond i64 mean "all".
fn usize_to_sql(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

const PERSON_COLS: &str = "person_id, household_id, name, kana, search_key, birth_date, district";
/// Tie-break shared by every list: document key order, then position in
/// that document's projection (MemStore's iteration order).
const SOURCE_ORDER: &str = "source_kind, source_id, pos";

fn person_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PersonRow> {
    Ok(PersonRow {
        person_id: r.get(0)?,
        household_id: r.get(1)?,
        name: r.get(2)?,
        kana: r.get(3)?,
        search_key: r.get(4)?,
        birth_date: r.get(5)?,
        district: r.get(6)?,
    })
}

const LOCATION_COLS: &str = "person_id, shelter_id, status, since_ms, conflict";

fn location_from_row(
    r: &rusqlite::Row<'_>,
) -> rusqlite::Result<(String, String, String, i64, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn location_from_parts(
    (person_id, shelter_id, status, since_ms, conflict): (String, String, String, i64, i64),
) -> Result<LocationRow, StoreError> {
    Ok(LocationRow {
        person_id,
        shelter_id,
        status: status_from_sql(&status)?,
        since_ms: u64_from_sql(since_ms),
        conflict: match conflict {
            0 => false,
            1 => true,
            c => return Err(corrupt(format!("conflict flag {c}"))),
        },
    })
}

impl SqliteStore {
    /// Change records from a `SELECT seq, kind, doc_id, hash, bytes, seal`
    /// taking `after` and `limit`.
    fn change_records(
        &self,
        sql: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, ChangeRecord)>, StoreError> {
        let mut st = self.conn.prepare_cached(sql).map_err(map_err)?;
        let rows = st
            .query_map(
                params![after as i64, limit.min(i64::MAX as usize) as i64],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                        r.get::<_, Vec<u8>>(4)?,
                        r.get::<_, Option<Vec<u8>>>(5)?,
                    ))
                },
            )
            .map_err(map_err)?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, kind, id, hash, bytes, seal) = row.map_err(map_err)?;
            let seal = match seal {
                None => None,
                Some(b) => Some(
                    Seal::from_bytes(&b)
                        .ok_or_else(|| StoreError::Corrupt("a seal is not 72 bytes".into()))?,
                ),
            };
            let key = DocKey::new(kind_from_sql(kind)?, id)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            out.push((
                seq as u64,
                ChangeRecord {
                    key,
                    hash: hash32(&hash)?,
                    bytes,
                    seal,
                },
            ));
        }
        Ok(out)
    }
    /// Opens (creating if missing) the store at `path` with the default
    /// options: checks, quick_check, WAL, migrations.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        Self::open_with(path, &OpenOptions::default())
    }

    /// Opens an existing, current store for reading only.
    pub fn open_readonly(path: &Path) -> Result<SqliteStore, StoreError> {
        Self::open_with(
            path,
            &OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        )
    }

    /// [`SqliteStore::open_checked`] with the at-rest errors folded into
    /// [`StoreError`] (their messages unchanged): a file without SQLite's
    /// header opened without a key is [`StoreError::Corrupt`] (damaged,
    /// unless it is encrypted), the others [`StoreError::Foreign`].
    pub fn open_with(path: &Path, opts: &OpenOptions) -> Result<SqliteStore, StoreError> {
        Self::open_checked(path, opts).map_err(|e| match e {
            OpenError::Store(e) => e,
            e @ OpenError::KeyMissing { .. } => StoreError::Corrupt(e.to_string()),
            other => StoreError::Foreign(other.to_string()),
        })
    }

    /// Opens (creating if missing, unless read-only) the store at `path`.
    /// Before SQLite reads anything it compares the file's first bytes
    /// with the options: an encrypted file without a key, or a plaintext
    /// file with one, is refused ([`OpenError`]) with nothing written, so
    /// there is never a silent fallback to plaintext and never a fresh
    /// database over an encrypted one. A new file is created 0600 from
    /// its first byte (SQLite gives the WAL and its index the database
    /// file's mode).
    pub fn open_checked(path: &Path, opts: &OpenOptions) -> Result<SqliteStore, OpenError> {
        let at_rest = FileState::of(path).map_err(|e| {
            OpenError::Store(StoreError::Io(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        })?;
        match (at_rest, &opts.key) {
            (FileState::Encrypted, None) => {
                return Err(OpenError::KeyMissing {
                    path: path.to_path_buf(),
                })
            }
            (FileState::Plain, Some(_)) => {
                return Err(OpenError::NotEncrypted {
                    path: path.to_path_buf(),
                })
            }
            _ => {}
        }
        let existed = at_rest != FileState::Absent;
        if !existed && !opts.read_only {
            create_private(path).map_err(|e| {
                OpenError::Store(StoreError::Io(format!(
                    "cannot create {}: {e}",
                    path.display()
                )))
            })?;
        }
        let flags = if opts.read_only {
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
        };
        let conn = match &opts.vfs {
            None => Connection::open_with_flags(path, flags),
            Some(vfs) => Connection::open_with_flags_and_vfs(path, flags, vfs.as_str()),
        }
        .map_err(|e| match map_err(e) {
            StoreError::Io(m) => StoreError::Io(format!("cannot open {}: {m}", path.display())),
            other => other,
        })?;
        if let Some(key) = &opts.key {
            // SQLCipher: the key must be the connection's first statement.
            // Every page of the file and of its WAL is then encrypted
            // (AES-256, HMAC per page); the WAL index holds no content.
            conn.pragma_update(None, "key", &*key.sqlcipher_key())
                .map_err(map_err)?;
            let probe: Result<i64, _> =
                conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0));
            match probe {
                Ok(_) => {}
                Err(rusqlite::Error::SqliteFailure(f, _))
                    if f.code == ErrorCode::NotADatabase && at_rest == FileState::Encrypted =>
                {
                    return Err(OpenError::WrongKey {
                        path: path.to_path_buf(),
                    })
                }
                Err(e) => return Err(OpenError::Store(map_err(e))),
            }
        }
        conn.busy_timeout(Duration::from_millis(opts.busy_timeout_ms))
            .map_err(map_err)?;
        conn.set_prepared_statement_cache_capacity(64);
        // Never let the schema run functions with side effects, and check
        // cell sizes while reading so damage is found, not followed.
        // Temporary tables and sort spills stay in memory: a temp file
        // would hold plaintext beside an encrypted database.
        conn.execute_batch(
            "PRAGMA trusted_schema = OFF; PRAGMA cell_size_check = ON; PRAGMA temp_store = MEMORY;",
        )
        .map_err(map_err)?;
        Ok(Self::check_and_migrate(conn, path, opts, existed)?)
    }

    /// The rest of opening, on a connection that can read the file.
    fn check_and_migrate(
        conn: Connection,
        path: &Path,
        opts: &OpenOptions,
        existed: bool,
    ) -> Result<SqliteStore, StoreError> {
        // 1. Whose file is this, and which version? Read-only so far.
        let app_id: i32 = conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .map_err(map_err)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(map_err)?;
        let version = u32::try_from(version)
            .map_err(|_| StoreError::Foreign(format!("user_version {version} is negative")))?;
        if app_id != APPLICATION_ID {
            if app_id != 0 {
                return Err(StoreError::Foreign(format!(
                    "{}: application_id {app_id:#010x}, expected {APPLICATION_ID:#010x} (Kizuna)",
                    path.display()
                )));
            }
            let objects: i64 = conn
                .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
                .map_err(map_err)?;
            if objects != 0 || version != 0 {
                return Err(StoreError::Foreign(format!(
                    "{}: an SQLite database without Kizuna's application_id",
                    path.display()
                )));
            }
        }
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                found: version,
                known: SCHEMA_VERSION,
            });
        }

        // 2. Is it intact?
        if opts.quick_check {
            let report = collect_check(&conn, "quick_check")?;
            if report != "ok" {
                return Err(StoreError::Corrupt(format!(
                    "{}: quick_check: {report}",
                    path.display()
                )));
            }
        }

        let mut store = SqliteStore {
            conn,
            path: path.to_path_buf(),
        };
        if opts.read_only {
            if version != SCHEMA_VERSION {
                return Err(StoreError::Io(format!(
                    "{}: schema version {version} needs migrating to {SCHEMA_VERSION}; open it read-write once",
                    path.display()
                )));
            }
            return Ok(store);
        }

        // 3. Durability settings, then migrations.
        let mode: String = store
            .conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(map_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Io(format!(
                "{}: cannot switch to WAL (journal_mode is {mode})",
                path.display()
            )));
        }
        store
            .conn
            .execute_batch(&format!(
                "PRAGMA synchronous = {}; PRAGMA foreign_keys = ON; PRAGMA journal_size_limit = {};",
                if opts.no_fsync_for_fault_tests {
                    "OFF"
                } else {
                    "FULL"
                },
                opts.journal_size_limit_bytes
            ))
            .map_err(map_err)?;
        store.migrate()?;
        if !existed {
            // SQLite fsyncs the directory for a new WAL, not for a new
            // main database file: make the file's directory entry durable.
            sync_parent_dir(path)?;
        }

        // Check what we just established before anyone writes through us;
        // a mismatch here means the file is not what SQLite told us.
        let app_id: i32 = store
            .conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .map_err(map_err)?;
        let version: i64 = store
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(map_err)?;
        if app_id != APPLICATION_ID || version != i64::from(SCHEMA_VERSION) {
            return Err(StoreError::Corrupt(format!(
                "{}: after migrating, application_id is {app_id:#010x} and user_version {version}",
                path.display()
            )));
        }
        Ok(store)
    }

    /// Applies every pending migration, each in its own IMMEDIATE
    /// transaction together with its `user_version` bump.
    fn migrate(&mut self) -> Result<(), StoreError> {
        loop {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(map_err)?;
            let version: i64 = tx
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .map_err(map_err)?;
            let version = usize::try_from(version)
                .map_err(|_| StoreError::Foreign(format!("user_version {version}")))?;
            if version >= MIGRATIONS.len() {
                return Ok(());
            }
            tx.execute_batch(MIGRATIONS[version]).map_err(map_err)?;
            if version == 2 {
                derive_withheld(&tx)?;
            }
            tx.pragma_update(None, "user_version", version as i64 + 1)
                .map_err(map_err)?;
            if version == 0 {
                tx.pragma_update(None, "application_id", APPLICATION_ID)
                    .map_err(map_err)?;
            }
            tx.commit().map_err(map_err)?;
        }
    }

    /// The connection's `PRAGMA synchronous` (0 OFF, 1 NORMAL, 2 FULL,
    /// 3 EXTRA), so tests can hold the store to `FULL`.
    pub fn synchronous(&self) -> Result<i64, StoreError> {
        self.conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .map_err(map_err)
    }

    /// Writes a copy of the whole database, encrypted with `key`, into
    /// the new file `dest` (created 0600) with SQLCipher's
    /// `sqlcipher_export`: schema, every row, `user_version` and
    /// `application_id`. Not fsynced here (the caller does).
    pub fn export_encrypted(&self, dest: &Path, key: &StorageKey) -> Result<(), StoreError> {
        let d = dest
            .to_str()
            .ok_or_else(|| StoreError::Io(format!("{} is not UTF-8", dest.display())))?;
        create_private(dest)
            .map_err(|e| StoreError::Io(format!("cannot create {}: {e}", dest.display())))?;
        self.conn
            .execute(
                "ATTACH DATABASE ?1 AS enc KEY ?2",
                params![d, key.sqlcipher_key().as_str()],
            )
            .map_err(map_err)?;
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(map_err)?;
        let copied = self
            .conn
            .query_row("SELECT sqlcipher_export('enc')", [], |_| Ok(()))
            .and_then(|()| {
                self.conn.execute_batch(&format!(
                    "PRAGMA enc.user_version = {version}; PRAGMA enc.application_id = {APPLICATION_ID};"
                ))
            });
        let detached = self.conn.execute_batch("DETACH DATABASE enc");
        copied.and(detached).map_err(map_err)
    }

    /// The database file this store was opened on.
    pub fn db_path(&self) -> &Path {
        &self.path
    }

    /// `PRAGMA integrity_check`: `"ok"` or SQLite's list of problems, one
    /// per line.
    pub fn integrity_check(&self) -> Result<String, StoreError> {
        collect_check(&self.conn, "integrity_check")
    }

    /// Writes a consistent copy of the whole database to `dest` (which must
    /// not exist) with `VACUUM INTO`: one read transaction, so the copy is
    /// the state after some commit, never a mix, and under WAL the node's
    /// writer keeps committing meanwhile. Works on a read-only store. The
    /// copy is compacted and is not fsynced here (the caller does).
    pub fn snapshot_into(&self, dest: &Path) -> Result<(), StoreError> {
        let d = dest
            .to_str()
            .ok_or_else(|| StoreError::Io(format!("{} is not UTF-8", dest.display())))?;
        self.conn.execute("VACUUM INTO ?1", [d]).map_err(map_err)?;
        Ok(())
    }

    /// A BLAKE3 digest of every row of every table in a fixed order, for
    /// "nothing changed" assertions. Equal content gives equal digests
    /// regardless of page layout, WAL state or vacuuming.
    pub fn content_digest(&self) -> Result<[u8; 32], StoreError> {
        let mut h = blake3::Hasher::new();
        for (table, order) in DIGEST_TABLES {
            h.update(table.as_bytes());
            h.update(&[0]);
            let mut st = self
                .conn
                .prepare(&format!("SELECT * FROM {table} ORDER BY {order}"))
                .map_err(map_err)?;
            let ncol = st.column_count();
            let mut rows = st.query([]).map_err(map_err)?;
            while let Some(r) = rows.next().map_err(map_err)? {
                h.update(b"R");
                for i in 0..ncol {
                    match r.get_ref(i).map_err(map_err)? {
                        ValueRef::Null => {
                            h.update(b"N");
                        }
                        ValueRef::Integer(v) => {
                            h.update(b"I");
                            h.update(&v.to_le_bytes());
                        }
                        ValueRef::Real(v) => {
                            h.update(b"F");
                            h.update(&v.to_le_bytes());
                        }
                        ValueRef::Text(b) => {
                            h.update(b"T");
                            h.update(&(b.len() as u64).to_le_bytes());
                            h.update(b);
                        }
                        ValueRef::Blob(b) => {
                            h.update(b"B");
                            h.update(&(b.len() as u64).to_le_bytes());
                            h.update(b);
                        }
                    }
                }
            }
        }
        Ok(*h.finalize().as_bytes())
    }

    fn persons_where(
        &self,
        filter: &str,
        order: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<PersonRow>, StoreError> {
        let sql = format!("SELECT {PERSON_COLS} FROM persons {filter} ORDER BY {order}");
        let mut st = self.conn.prepare_cached(&sql).map_err(map_err)?;
        let rows = st.query_map(params, person_from_row).map_err(map_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(map_err)
    }
}

/// Why a store cannot be opened: the store's own errors, or a mismatch
/// between the file and the storage key. Messages in Japanese and English;
/// none of them leaves anything written.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The file is encrypted and no key was given.
    /// An SQLCipher file and a damaged one look alike without the key
    /// (neither starts with SQLite's header), so the message names both.
    #[error("{}: データベースは暗号化されていますが、暗号鍵が設定されていません (暗号化していない場合はファイルが壊れています) / the database is encrypted, but no storage key was given ([storage] key_file, key_credential or key_prompt in the config; --storage-key-file, --storage-key-credential or --storage-key-prompt for commands); if it was never encrypted, the file is damaged (not an SQLite header)", path.display())]
    KeyMissing { path: PathBuf },
    /// The key does not open the file (or its first page is damaged).
    #[error("{}: 暗号鍵が違うか、ファイルが壊れています / wrong storage key, or the file is damaged", path.display())]
    WrongKey { path: PathBuf },
    /// A key was given for a plaintext database.
    #[error("{}: データベースが暗号化されていません。`kizuna store encrypt --data-dir DIR` で暗号化してください / the database is not encrypted, but a storage key is configured; encrypt it with `kizuna store encrypt --data-dir DIR` (refusing to use it in plaintext)", path.display())]
    NotEncrypted { path: PathBuf },
}

/// What the first bytes of a database file say about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileState {
    /// No file: a new database.
    Absent,
    /// A zero-length file: SQLite's empty database.
    Empty,
    /// Starts with SQLite's plaintext header.
    Plain,
    /// Anything else: SQLCipher's random salt (or somebody else's file,
    /// which the key check then refuses).
    Encrypted,
}

/// The first 16 bytes of every plaintext SQLite database.
pub const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

impl FileState {
    pub fn of(path: &Path) -> std::io::Result<FileState> {
        use std::io::Read;
        let mut f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileState::Absent),
            Err(e) => return Err(e),
        };
        let mut head = Vec::with_capacity(16);
        f.by_ref().take(16).read_to_end(&mut head)?;
        Ok(match head.as_slice() {
            [] => FileState::Empty,
            h if h == SQLITE_HEADER => FileState::Plain,
            _ => FileState::Encrypted,
        })
    }
}

/// Creates an empty file with mode 0600 (whatever the umask).
fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
}

fn collect_check(conn: &Connection, pragma: &str) -> Result<String, StoreError> {
    let mut st = conn.prepare(&format!("PRAGMA {pragma}")).map_err(map_err)?;
    let lines = st
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(map_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err)?;
    Ok(lines.join("\n"))
}

fn sync_parent_dir(path: &Path) -> Result<(), StoreError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::Io(format!("fsync of {}: {e}", dir.display())))
}

impl Store for SqliteStore {
    fn load_meta(&self) -> Result<Option<Meta>, StoreError> {
        let json: Option<String> = self
            .conn
            .prepare_cached("SELECT json FROM meta WHERE id = 0")
            .and_then(|mut st| st.query_row([], |r| r.get(0)).optional())
            .map_err(map_err)?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| corrupt(format!("meta: {e}"))))
            .transpose()
    }

    fn doc_index(&self) -> Result<Vec<(DocKey, Vec<Hash32>)>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT kind, id, heads FROM docs ORDER BY kind, id")
            .map_err(map_err)?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })
            .map_err(map_err)?;
        let mut out = Vec::new();
        for row in rows {
            let (kind, id, heads) = row.map_err(map_err)?;
            out.push((
                DocKey {
                    kind: kind_from_sql(kind)?,
                    id,
                },
                heads_from_blob(&heads)?,
            ));
        }
        Ok(out)
    }

    fn load_doc(&self, key: &DocKey) -> Result<Option<StoredDoc>, StoreError> {
        // One read transaction: the snapshot and its tail from one state.
        let tx = self.conn.unchecked_transaction().map_err(map_err)?;
        let doc: Option<(Option<Vec<u8>>, i64)> = tx
            .prepare_cached("SELECT snapshot, snapshot_seq FROM docs WHERE kind = ?1 AND id = ?2")
            .and_then(|mut st| {
                st.query_row(params![key.kind.code(), key.id], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
            })
            .map_err(map_err)?;
        let Some((snapshot, snapshot_seq)) = doc else {
            return Ok(None);
        };
        let changes = {
            let mut st = tx
                .prepare_cached(
                    "SELECT bytes FROM changes WHERE kind = ?1 AND doc_id = ?2 AND seq > ?3 ORDER BY seq",
                )
                .map_err(map_err)?;
            let rows = st
                .query_map(params![key.kind.code(), key.id, snapshot_seq], |r| {
                    r.get::<_, Vec<u8>>(0)
                })
                .map_err(map_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(map_err)?
        };
        tx.finish().map_err(map_err)?;
        Ok(Some(StoredDoc { snapshot, changes }))
    }

    fn doc_changes(&self, key: &DocKey) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT bytes FROM changes WHERE kind = ?1 AND doc_id = ?2 ORDER BY seq",
            )
            .map_err(map_err)?;
        let rows = st
            .query_map(params![key.kind.code(), key.id], |r| r.get::<_, Vec<u8>>(0))
            .map_err(map_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(map_err)
    }

    fn doc_records(&self, key: &DocKey) -> Result<Vec<ChangeRecord>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT hash, bytes, seal FROM changes WHERE kind = ?1 AND doc_id = ?2 ORDER BY seq",
            )
            .map_err(map_err)?;
        let rows = st
            .query_map(params![key.kind.code(), key.id], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Option<Vec<u8>>>(2)?,
                ))
            })
            .map_err(map_err)?;
        let mut out = Vec::new();
        for row in rows {
            let (hash, bytes, seal) = row.map_err(map_err)?;
            out.push(ChangeRecord {
                key: key.clone(),
                hash: hash32(&hash)?,
                bytes,
                // Read to sort damaged rows from intact ones: a damaged
                // seal is no seal.
                seal: seal.and_then(|b| Seal::from_bytes(&b)),
            });
        }
        Ok(out)
    }

    fn damaged(&self) -> Result<Vec<Damaged>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT kind, doc_id, heads, at_risk FROM damaged ORDER BY kind, doc_id",
            )
            .map_err(map_err)?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                ))
            })
            .map_err(map_err)?;
        let mut out = Vec::new();
        for row in rows {
            let (kind, id, heads, at_risk) = row.map_err(map_err)?;
            out.push(Damaged {
                key: DocKey::new(kind_from_sql(kind)?, id)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                heads: heads_from_blob(&heads)?,
                at_risk: heads_from_blob(&at_risk)?,
            });
        }
        Ok(out)
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(map_err)?;
        apply(&tx, batch).map_err(map_err)?;
        // Dropping `tx` on any error above rolls everything back. COMMIT
        // returns after the WAL is fsynced (synchronous=FULL).
        tx.commit().map_err(map_err)
    }

    fn log_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, ChangeRecord)>, StoreError> {
        self.change_records(
            "SELECT seq, kind, doc_id, hash, bytes, seal FROM changes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            after,
            limit,
        )
    }

    fn unsigned(&self, after: u64, limit: usize) -> Result<Vec<(u64, ChangeRecord)>, StoreError> {
        self.change_records(
            "SELECT seq, kind, doc_id, hash, bytes, seal FROM changes \
             WHERE seal IS NULL AND seq > ?1 ORDER BY seq LIMIT ?2",
            after,
            limit,
        )
    }

    fn seals(&self, hashes: &[Hash32]) -> Result<Vec<Option<Seal>>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT seal FROM changes WHERE hash = ?1")
            .map_err(map_err)?;
        hashes
            .iter()
            .map(|h| {
                let b: Option<Option<Vec<u8>>> = st
                    .query_row([&h[..]], |r| r.get(0))
                    .optional()
                    .map_err(map_err)?;
                b.flatten()
                    .map(|b| {
                        Seal::from_bytes(&b)
                            .ok_or_else(|| StoreError::Corrupt("a seal is not 72 bytes".into()))
                    })
                    .transpose()
            })
            .collect()
    }

    fn credentials(&self) -> Result<Vec<(AuthorHash, Vec<u8>)>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT author, cred FROM authors ORDER BY author, seq")
            .map_err(map_err)?;
        let rows = st
            .query_map([], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(map_err)?;
        let mut out = Vec::new();
        for row in rows {
            let (a, c) = row.map_err(map_err)?;
            let a: AuthorHash = a
                .try_into()
                .map_err(|_| StoreError::Corrupt("an author hash is not 8 bytes".into()))?;
            out.push((a, c));
        }
        Ok(out)
    }

    fn log_at(&self, seq: u64) -> Result<Option<Hash32>, StoreError> {
        let h: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT hash FROM changes WHERE seq = ?1")
            .and_then(|mut st| st.query_row([seq as i64], |r| r.get(0)).optional())
            .map_err(map_err)?;
        h.map(|h| hash32(&h)).transpose()
    }

    fn log_end(&self) -> Result<Option<Cursor>, StoreError> {
        let row: Option<(i64, Vec<u8>)> = self
            .conn
            .prepare_cached("SELECT seq, hash FROM changes ORDER BY seq DESC LIMIT 1")
            .and_then(|mut st| st.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).optional())
            .map_err(map_err)?;
        row.map(|(seq, h)| {
            Ok(Cursor {
                seq: seq as u64,
                hash: hash32(&h)?,
            })
        })
        .transpose()
    }

    fn sync_cursor(&self, peer: &NodeId) -> Result<Option<Cursor>, StoreError> {
        let row: Option<(i64, Vec<u8>)> = self
            .conn
            .prepare_cached("SELECT seq, hash FROM sync_cursors WHERE peer = ?1")
            .and_then(|mut st| {
                st.query_row([peer.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(map_err)?;
        row.map(|(seq, h)| {
            Ok(Cursor {
                seq: seq as u64,
                hash: hash32(&h)?,
            })
        })
        .transpose()
    }

    fn op_result(&self, op_id: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .prepare_cached("SELECT result FROM ops WHERE op_id = ?1")
            .and_then(|mut st| st.query_row([op_id], |r| r.get(0)).optional())
            .map_err(map_err)
    }

    fn peer_heads(
        &self,
        peer: &NodeId,
        incarnation: u32,
        key: &DocKey,
    ) -> Result<Option<Vec<Hash32>>, StoreError> {
        let blob: Option<Vec<u8>> = self
            .conn
            .prepare_cached(
                "SELECT heads FROM peer_heads \
                 WHERE peer = ?1 AND kind = ?2 AND doc_id = ?3 AND incarnation = ?4",
            )
            .and_then(|mut st| {
                st.query_row(
                    params![peer.as_str(), key.kind.code(), key.id, incarnation],
                    |r| r.get(0),
                )
                .optional()
            })
            .map_err(map_err)?;
        blob.map(|b| heads_from_blob(&b)).transpose()
    }

    fn quarantined(&self) -> Result<Vec<(DocKey, String)>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT kind, doc_id, reason FROM quarantine ORDER BY kind, doc_id")
            .map_err(map_err)?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(map_err)?;
        let mut out = Vec::new();
        for row in rows {
            let (kind, id, reason) = row.map_err(map_err)?;
            out.push((
                DocKey {
                    kind: kind_from_sql(kind)?,
                    id,
                },
                reason,
            ));
        }
        Ok(out)
    }

    fn known_persons(
        &self,
        person_ids: &[&str],
    ) -> Result<std::collections::BTreeSet<String>, StoreError> {
        // One read transaction and one prepared statement for the batch,
        // instead of an implicit transaction per person.
        let tx = self.conn.unchecked_transaction().map_err(map_err)?;
        let mut st = tx
            .prepare_cached("SELECT 1 FROM persons WHERE person_id = ?1 LIMIT 1")
            .map_err(map_err)?;
        let mut known = std::collections::BTreeSet::new();
        for p in person_ids {
            if st.exists([p]).map_err(map_err)? {
                known.insert(p.to_string());
            }
        }
        drop(st);
        tx.finish().map_err(map_err)?;
        Ok(known)
    }

    fn person(&self, person_id: &str) -> Result<Option<PersonRow>, StoreError> {
        Ok(self
            .persons_where(
                "WHERE person_id = ?1",
                &format!("{SOURCE_ORDER} LIMIT 1"),
                [person_id],
            )?
            .pop())
    }

    fn persons(&self, limit: usize, offset: usize) -> Result<Vec<PersonRow>, StoreError> {
        self.persons_where(
            "",
            &format!("person_id, {SOURCE_ORDER} LIMIT ?1 OFFSET ?2"),
            params![usize_to_sql(limit), usize_to_sql(offset)],
        )
    }

    fn search(&self, key: &str, limit: usize) -> Result<Vec<PersonRow>, StoreError> {
        // instr on blobs is a plain byte-substring test: no wildcards, no
        // collation, embedded NULs handled; for UTF-8 it equals str::contains.
        self.persons_where(
            "WHERE instr(CAST(search_key AS BLOB), CAST(?1 AS BLOB)) > 0 \
             OR instr(CAST(name_key AS BLOB), CAST(?1 AS BLOB)) > 0",
            &format!("person_id, {SOURCE_ORDER} LIMIT ?2"),
            params![key, usize_to_sql(limit)],
        )
    }

    fn household_by_card(&self, card_user_id: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .prepare_cached(&format!(
                "SELECT household_id FROM cards WHERE card_user_id = ?1 ORDER BY {SOURCE_ORDER} LIMIT 1"
            ))
            .and_then(|mut st| st.query_row([card_user_id], |r| r.get(0)).optional())
            .map_err(map_err)
    }

    fn person_by_card(&self, card_user_id: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .prepare_cached(&format!(
                "SELECT person_id FROM cards WHERE card_user_id = ?1 ORDER BY {SOURCE_ORDER} LIMIT 1"
            ))
            .and_then(|mut st| st.query_row([card_user_id], |r| r.get(0)).optional())
            .map_err(map_err)
    }

    fn household_members(&self, household_id: &str) -> Result<Vec<PersonRow>, StoreError> {
        self.persons_where(
            "WHERE household_id = ?1",
            &format!("person_id, {SOURCE_ORDER}"),
            [household_id],
        )
    }

    fn location(&self, person_id: &str) -> Result<Option<LocationRow>, StoreError> {
        let parts = self
            .conn
            .prepare_cached(&format!(
                "SELECT {LOCATION_COLS} FROM locations WHERE person_id = ?1 ORDER BY {SOURCE_ORDER} LIMIT 1"
            ))
            .and_then(|mut st| st.query_row([person_id], location_from_row).optional())
            .map_err(map_err)?;
        parts.map(location_from_parts).transpose()
    }

    fn shelters(&self) -> Result<Vec<ShelterRow>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT shelter_id, name, capacity FROM shelters ORDER BY shelter_id, name, capacity",
            )
            .map_err(map_err)?;
        let rows = st
            .query_map([], |r| {
                Ok(ShelterRow {
                    shelter_id: r.get(0)?,
                    name: r.get(1)?,
                    capacity: r.get(2)?,
                })
            })
            .map_err(map_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(map_err)
    }

    fn occupancy(&self) -> Result<BTreeMap<String, u32>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT shelter_id, count(*) FROM locations WHERE status = 'in' GROUP BY shelter_id",
            )
            .map_err(map_err)?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(map_err)?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (shelter, n) = row.map_err(map_err)?;
            out.insert(shelter, u32::try_from(n).unwrap_or(u32::MAX));
        }
        Ok(out)
    }

    fn evacuees(
        &self,
        shelter_id: Option<&str>,
    ) -> Result<Vec<(PersonRow, LocationRow)>, StoreError> {
        // Rows in source order; crdt::store::evacuees_from picks each
        // person's first location and person row exactly as MemStore does.
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "SELECT {LOCATION_COLS} FROM locations ORDER BY {SOURCE_ORDER}"
            ))
            .map_err(map_err)?;
        let mut locations = Vec::new();
        for row in st.query_map([], location_from_row).map_err(map_err)? {
            locations.push(location_from_parts(row.map_err(map_err)?)?);
        }
        let persons = self.persons_where(
            "WHERE person_id IN (SELECT person_id FROM locations)",
            SOURCE_ORDER,
            [],
        )?;
        Ok(crdt::store::evacuees_from(
            locations.iter(),
            persons.iter(),
            shelter_id,
        ))
    }

    fn withheld(&self) -> Result<std::collections::BTreeSet<String>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT DISTINCT person_id FROM withheld")
            .map_err(map_err)?;
        let rows = st.query_map([], |r| r.get(0)).map_err(map_err)?;
        rows.collect::<Result<_, _>>().map_err(map_err)
    }

    fn conflicts(&self) -> Result<Vec<LocationRow>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "SELECT {LOCATION_COLS} FROM locations WHERE conflict = 1"
            ))
            .map_err(map_err)?;
        let rows = st.query_map([], location_from_row).map_err(map_err)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(location_from_parts(row.map_err(map_err)?)?);
        }
        // Sorted here, not in SQL: since_ms is a u64 stored as i64, whose
        // SQL order differs above i64::MAX. Conflicts are few.
        out.sort();
        Ok(out)
    }

    fn district_counts(&self) -> Result<Vec<crdt::store::DistrictCount>, StoreError> {
        // Two passes, each in index order: every resident's district
        // (covering index), then the few located persons looked up by id.
        // One pass probing `locations` for each of a million residents
        // costs about three times as much.
        let counts = |sql: &str| -> Result<BTreeMap<String, i64>, StoreError> {
            let mut st = self.conn.prepare_cached(sql).map_err(map_err)?;
            let rows = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(map_err)?;
            rows.collect::<Result<_, _>>().map_err(map_err)
        };
        let residents = counts(
            "SELECT district, count(*) FROM persons WHERE district IS NOT NULL GROUP BY district",
        )?;
        let accounted = counts(
            "SELECT district, count(*) FROM persons WHERE district IS NOT NULL \
             AND person_id IN (SELECT person_id FROM locations) GROUP BY district",
        )?;
        Ok(residents
            .into_iter()
            .map(|(district, n)| crdt::store::DistrictCount {
                residents: u32::try_from(n).unwrap_or(u32::MAX),
                accounted: u32::try_from(accounted.get(&district).copied().unwrap_or(0))
                    .unwrap_or(u32::MAX),
                district,
            })
            .collect())
    }

    fn unaccounted(
        &self,
        district: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<PersonRow>, StoreError> {
        self.persons_where(
            "WHERE district = ?1 AND person_id > ?2 \
             AND NOT EXISTS (SELECT 1 FROM locations l WHERE l.person_id = persons.person_id)",
            &format!("person_id, {SOURCE_ORDER} LIMIT ?3"),
            params![district, after, usize_to_sql(limit)],
        )
    }

    fn roster(&self, shelter_id: &str) -> Result<Vec<LocationRow>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "SELECT {LOCATION_COLS} FROM locations WHERE shelter_id = ?1 AND status != 'out' \
                 ORDER BY person_id, {SOURCE_ORDER}"
            ))
            .map_err(map_err)?;
        let rows = st
            .query_map([shelter_id], location_from_row)
            .map_err(map_err)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(location_from_parts(row.map_err(map_err)?)?);
        }
        Ok(out)
    }

    fn arrivals(&self, bucket_ms: u64) -> Result<Vec<(u64, u32)>, StoreError> {
        let bucket_ms = bucket_ms.max(1);
        // Grouped in Rust: since_ms is a u64 stored as i64, and the counts
        // per distinct arrival time are far fewer than persons.
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT since_ms, count(*) FROM locations WHERE status = 'in' GROUP BY since_ms",
            )
            .map_err(map_err)?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
            .map_err(map_err)?;
        let mut m: BTreeMap<u64, u32> = BTreeMap::new();
        for row in rows {
            let (since, n) = row.map_err(map_err)?;
            let b = u64_from_sql(since) / bucket_ms * bucket_ms;
            let e = m.entry(b).or_default();
            *e = e.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        }
        Ok(m.into_iter().collect())
    }
}

/// Migration 3's Rust step: the `withheld` rows of every stored contacts
/// document, derived as a commit would have derived them. A document that
/// does not load is left to the engine (it quarantines it on first load).
fn derive_withheld(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    let code = Kind::Contacts.code();
    let docs: Vec<(String, Option<Vec<u8>>, i64)> = {
        let mut st = tx
            .prepare("SELECT id, snapshot, snapshot_seq FROM docs WHERE kind = ?1")
            .map_err(map_err)?;
        let rows = st
            .query_map([code], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(map_err)?;
        rows.collect::<Result<_, _>>().map_err(map_err)?
    };
    let mut changes = tx
        .prepare(
            "SELECT bytes FROM changes WHERE kind = ?1 AND doc_id = ?2 AND seq > ?3 ORDER BY seq",
        )
        .map_err(map_err)?;
    let mut insert = tx
        .prepare(
            "INSERT INTO withheld (source_kind, source_id, pos, person_id) VALUES (?1, ?2, ?3, ?4)",
        )
        .map_err(map_err)?;
    for (id, snapshot, seq) in docs {
        let tail: Vec<Vec<u8>> = changes
            .query_map(params![code, id, seq], |r| r.get(0))
            .map_err(map_err)?
            .collect::<Result<_, _>>()
            .map_err(map_err)?;
        let Ok(key) = DocKey::new(Kind::Contacts, &id) else {
            continue;
        };
        let Ok(doc) = crdt::doc::Doc::load(key, snapshot.as_deref(), &tail) else {
            continue;
        };
        if let Ok(p) = crdt::derive::projection(&doc) {
            for (i, person) in p.withheld.iter().enumerate() {
                insert
                    .execute(params![code, id, i as i64, person])
                    .map_err(map_err)?;
            }
        }
    }
    Ok(())
}

/// Applies a batch inside an open transaction, in MemStore's order: meta,
/// changes (so a snapshot in the same batch covers them), docs,
/// projections, ops, peer heads, quarantine.
fn apply(tx: &rusqlite::Transaction<'_>, batch: &Batch) -> rusqlite::Result<()> {
    if let Some(meta) = &batch.meta {
        let json = serde_json::to_string(meta)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        tx.prepare_cached("INSERT OR REPLACE INTO meta (id, json) VALUES (0, ?1)")?
            .execute([json])?;
    }
    if !batch.drop_changes.is_empty() {
        let mut st = tx.prepare_cached("DELETE FROM changes WHERE hash = ?1")?;
        for h in &batch.drop_changes {
            st.execute([&h[..]])?;
        }
    }
    if !batch.changes.is_empty() {
        let mut st = tx.prepare_cached(
            "INSERT OR IGNORE INTO changes (hash, kind, doc_id, bytes, seal) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        // A rebuilt document's verified changes replace the rows with
        // their hashes (damage may have moved or altered one); the row
        // keeps its place in the log.
        let mut replace = tx.prepare_cached(
            "INSERT INTO changes (hash, kind, doc_id, bytes, seal) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (hash) DO UPDATE SET kind = excluded.kind, doc_id = excluded.doc_id, \
             bytes = excluded.bytes, seal = coalesce(changes.seal, excluded.seal)",
        )?;
        for c in &batch.changes {
            let seal = c.seal.map(|s| s.to_bytes().to_vec());
            let st = if batch.repaired.contains(&c.key) {
                &mut replace
            } else {
                &mut st
            };
            st.execute(params![
                &c.hash[..],
                c.key.kind.code(),
                c.key.id,
                c.bytes,
                seal
            ])?;
        }
    }
    if !batch.seals.is_empty() {
        let mut st =
            tx.prepare_cached("UPDATE changes SET seal = ?2 WHERE hash = ?1 AND seal IS NULL")?;
        for (hash, seal) in &batch.seals {
            st.execute(params![&hash[..], &seal.to_bytes()[..]])?;
        }
    }
    if !batch.credentials.is_empty() {
        let mut st =
            tx.prepare_cached("INSERT OR IGNORE INTO authors (author, cred) VALUES (?1, ?2)")?;
        for (author, cred) in &batch.credentials {
            st.execute(params![&author[..], cred])?;
        }
    }
    if !batch.docs.is_empty() {
        let mut keep = tx.prepare_cached(
            "INSERT INTO docs (kind, id, heads) VALUES (?1, ?2, ?3) \
             ON CONFLICT (kind, id) DO UPDATE SET heads = excluded.heads",
        )?;
        let mut snap = tx.prepare_cached(
            "INSERT INTO docs (kind, id, heads, snapshot, snapshot_seq) \
             VALUES (?1, ?2, ?3, ?4, (SELECT coalesce(max(seq), 0) FROM changes)) \
             ON CONFLICT (kind, id) DO UPDATE SET heads = excluded.heads, \
             snapshot = excluded.snapshot, snapshot_seq = excluded.snapshot_seq",
        )?;
        for d in &batch.docs {
            let heads = heads_to_blob(&d.heads);
            match &d.snapshot {
                None => keep.execute(params![d.key.kind.code(), d.key.id, heads])?,
                Some(s) => snap.execute(params![d.key.kind.code(), d.key.id, heads, s])?,
            };
        }
    }
    if !batch.projections.is_empty() {
        let mut del: Vec<_> = ["persons", "cards", "locations", "shelters", "withheld"]
            .iter()
            .map(|t| {
                tx.prepare_cached(&format!(
                    "DELETE FROM {t} WHERE source_kind = ?1 AND source_id = ?2"
                ))
            })
            .collect::<Result<_, _>>()?;
        let mut person = tx.prepare_cached(
            "INSERT INTO persons (source_kind, source_id, pos, person_id, household_id, name, kana, search_key, name_key, birth_date, district) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        let mut card = tx.prepare_cached(
            "INSERT INTO cards (source_kind, source_id, pos, card_user_id, household_id, person_id) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        let mut location = tx.prepare_cached(
            "INSERT INTO locations (source_kind, source_id, pos, person_id, shelter_id, status, since_ms, conflict) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        let mut shelter = tx.prepare_cached(
            "INSERT INTO shelters (source_kind, source_id, pos, shelter_id, name, capacity) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        let mut withheld = tx.prepare_cached(
            "INSERT INTO withheld (source_kind, source_id, pos, person_id) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for (key, p) in &batch.projections {
            let (k, id) = (key.kind.code(), key.id.as_str());
            for st in &mut del {
                st.execute(params![k, id])?;
            }
            for (i, person) in p.withheld.iter().enumerate() {
                withheld.execute(params![k, id, i as i64, person])?;
            }
            for (i, r) in p.persons.iter().enumerate() {
                person.execute(params![
                    k,
                    id,
                    i as i64,
                    r.person_id,
                    r.household_id,
                    r.name,
                    r.kana,
                    r.search_key,
                    crdt::text::search_key(&r.name),
                    r.birth_date,
                    r.district
                ])?;
            }
            for (i, (card_user_id, household_id, person_id)) in p.cards.iter().enumerate() {
                card.execute(params![
                    k,
                    id,
                    i as i64,
                    card_user_id,
                    household_id,
                    person_id
                ])?;
            }
            for (i, l) in p.locations.iter().enumerate() {
                location.execute(params![
                    k,
                    id,
                    i as i64,
                    l.person_id,
                    l.shelter_id,
                    status_to_sql(l.status),
                    u64_to_sql(l.since_ms),
                    l.conflict
                ])?;
            }
            for (i, s) in p.shelters.iter().enumerate() {
                shelter.execute(params![k, id, i as i64, s.shelter_id, s.name, s.capacity])?;
            }
        }
    }
    if !batch.ops.is_empty() {
        let mut st =
            tx.prepare_cached("INSERT OR IGNORE INTO ops (op_id, result) VALUES (?1, ?2)")?;
        for (op, result) in &batch.ops {
            st.execute([op, result])?;
        }
    }
    if !batch.peer_heads.is_empty() {
        // A peer's rows are of one incarnation: another one's replace them.
        let mut drop_older =
            tx.prepare_cached("DELETE FROM peer_heads WHERE peer = ?1 AND incarnation <> ?2")?;
        let mut st = tx.prepare_cached(
            "INSERT OR REPLACE INTO peer_heads (peer, kind, doc_id, heads, incarnation) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut current: Option<(&NodeId, u32)> = None;
        for (peer, inc, key, heads) in &batch.peer_heads {
            if current != Some((peer, *inc)) {
                drop_older.execute(params![peer.as_str(), inc])?;
                current = Some((peer, *inc));
            }
            st.execute(params![
                peer.as_str(),
                key.kind.code(),
                key.id,
                heads_to_blob(heads),
                inc
            ])?;
        }
    }
    if !batch.cursors.is_empty() {
        let mut st = tx.prepare_cached(
            "INSERT OR REPLACE INTO sync_cursors (peer, seq, hash) VALUES (?1, ?2, ?3)",
        )?;
        for (peer, c) in &batch.cursors {
            st.execute(params![peer.as_str(), c.seq as i64, c.hash.to_vec()])?;
        }
    }
    if !batch.repaired.is_empty() {
        let mut d = tx.prepare_cached("DELETE FROM damaged WHERE kind = ?1 AND doc_id = ?2")?;
        let mut q = tx.prepare_cached("DELETE FROM quarantine WHERE kind = ?1 AND doc_id = ?2")?;
        for key in &batch.repaired {
            d.execute(params![key.kind.code(), key.id])?;
            q.execute(params![key.kind.code(), key.id])?;
        }
    }
    if !batch.damaged.is_empty() {
        let mut st = tx.prepare_cached(
            "INSERT OR REPLACE INTO damaged (kind, doc_id, heads, at_risk) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for d in &batch.damaged {
            st.execute(params![
                d.key.kind.code(),
                d.key.id,
                heads_to_blob(&d.heads),
                heads_to_blob(&d.at_risk)
            ])?;
        }
    }
    if !batch.quarantine.is_empty() {
        let mut st = tx.prepare_cached(
            "INSERT OR REPLACE INTO quarantine (kind, doc_id, reason) VALUES (?1, ?2, ?3)",
        )?;
        for (key, reason) in &batch.quarantine {
            st.execute(params![key.kind.code(), key.id, reason])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crdt::store::ChangeRecord;
    use rusqlite::ffi;

    fn sqlite_err(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(ffi::Error::new(code), None)
    }

    #[test]
    fn result_codes_map_to_store_errors() {
        assert_eq!(map_err(sqlite_err(ffi::SQLITE_FULL)), StoreError::Full);
        assert!(matches!(
            map_err(sqlite_err(ffi::SQLITE_IOERR_FSYNC)),
            StoreError::Io(_)
        ));
        assert!(matches!(
            map_err(sqlite_err(ffi::SQLITE_CORRUPT)),
            StoreError::Corrupt(_)
        ));
        assert!(matches!(
            map_err(sqlite_err(ffi::SQLITE_NOTADB)),
            StoreError::Corrupt(_)
        ));
        assert!(matches!(
            map_err(sqlite_err(ffi::SQLITE_BUSY)),
            StoreError::Io(_)
        ));
    }

    #[test]
    fn stored_values_are_checked_on_the_way_back() {
        let heads = vec![[1u8; 32], [2u8; 32]];
        assert_eq!(heads_from_blob(&heads_to_blob(&heads)).unwrap(), heads);
        assert_eq!(heads_from_blob(&[]).unwrap(), Vec::<Hash32>::new());
        assert!(matches!(
            heads_from_blob(&[0; 33]),
            Err(StoreError::Corrupt(_))
        ));
        for s in [
            LocationStatus::In,
            LocationStatus::Out,
            LocationStatus::Pending,
        ] {
            assert_eq!(status_from_sql(status_to_sql(s)).unwrap(), s);
        }
        assert!(status_from_sql("IN").is_err());
        assert!(kind_from_sql(-1).is_err());
        assert!(kind_from_sql(Kind::ALL.len() as i64).is_err());
        for v in [0, 1, i64::MAX as u64, 1 << 63, u64::MAX] {
            assert_eq!(u64_from_sql(u64_to_sql(v)), v);
        }
        assert_eq!(usize_to_sql(usize::MAX), i64::MAX);
    }

    /// A-6 without a small file system: SQLite's own page limit raises
    /// SQLITE_FULL through the same path as ENOSPC does.
    #[test]
    fn page_limit_full_rolls_back_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        let key = DocKey::new(Kind::Registry, "big").unwrap();
        let batch = |from: u8| Batch {
            changes: (from..from + 50)
                .map(|i| ChangeRecord {
                    key: key.clone(),
                    hash: [i; 32],
                    bytes: vec![i; 3000],
                    seal: None,
                })
                .collect(),
            ops: vec![(format!("op-{from}"), "{}".into())],
            ..Default::default()
        };
        s.commit(&batch(0)).unwrap();
        let digest = s.content_digest().unwrap();
        let pages: i64 = s
            .conn
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .unwrap();
        s.conn
            .pragma_update(None, "max_page_count", pages + 5)
            .unwrap();
        assert_eq!(s.commit(&batch(100)).unwrap_err(), StoreError::Full);
        assert_eq!(s.content_digest().unwrap(), digest);
        assert_eq!(s.op_result("op-100").unwrap(), None);
        s.conn
            .pragma_update(None, "max_page_count", 1_000_000)
            .unwrap();
        s.commit(&batch(100)).unwrap();
        assert_eq!(s.doc_changes(&key).unwrap().len(), 100);
        assert_eq!(s.integrity_check().unwrap(), "ok");
    }
}
