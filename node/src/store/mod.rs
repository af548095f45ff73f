//! Durable storage for the node: [`SqliteStore`], the SQLite implementation
//! of [`crdt::store::Store`], and [`DataDirLock`], which keeps a second
//! kizuna process away from the same data directory.
//!
//! How to drive it: take the lock, open the store, hand it to the engine.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use node::store::{DataDirLock, SqliteStore, DB_FILE_NAME};
//! let dir = std::path::Path::new("/var/lib/kizuna");
//! let _lock = DataDirLock::acquire(dir)?; // hold for the process lifetime
//! let store = SqliteStore::open(&dir.join(DB_FILE_NAME))?;
//! # drop(store); Ok(()) }
//! ```
//!
//! The engine calls [`crdt::store::Store::commit`] once per batch and
//! acknowledges nothing before it returns; the store runs on the engine's
//! thread with one connection. The schema and its migrations live in
//! [`schema`].
//!
//! # Durability points
//!
//! Every place where data reaches stable storage, and what it guarantees.
//! `synchronous=FULL` is set on every read-write connection, so SQLite
//! fsyncs at each point below; `NORMAL` would let a power cut roll back
//! acknowledged commits (A-2) and is never used.
//!
//! 1. **`SqliteStore::commit`**: one `BEGIN IMMEDIATE` … `COMMIT`. COMMIT
//!    appends the batch's pages to `kizuna.db-wal` and fsyncs the WAL
//!    before returning. This is the only acknowledgement point; a batch is
//!    wholly present or wholly absent after a crash (A-1, A-2).
//! 2. **WAL creation**: the first write after the WAL file is created
//!    fsyncs the directory too (SQLite's `UNIXFILE_DIRSYNC`), so the WAL's
//!    directory entry cannot vanish under committed frames.
//! 3. **New database file**: `open` fsyncs the parent directory after the
//!    first migrations when it created the file; SQLite does not.
//! 4. **Migrations** (at open): one transaction per migration with its
//!    `user_version` bump, each fsynced at COMMIT like point 1 (A-5).
//! 5. **`journal_mode=WAL` switch** (first open only): rewrites the header
//!    through a rollback journal, which SQLite fsyncs before and after.
//! 6. **Checkpoints** (automatic every ~1000 WAL pages, and when the last
//!    connection closes): SQLite fsyncs the WAL, copies pages into
//!    `kizuna.db`, fsyncs `kizuna.db`, and only then resets the WAL. A
//!    crash mid-checkpoint replays the WAL at the next open (A-5, A-9).
//!
//! Nothing else is durable: [`DataDirLock`]'s file holds only a pid hint,
//! and no in-memory state outlives the connection.
//!
//! # Errors
//!
//! SQLite's result codes become [`crdt::store::StoreError`]: `SQLITE_FULL`
//! → `Full` (A-6), `SQLITE_IOERR*` and anything unexpected → `Io`,
//! `SQLITE_CORRUPT`/`SQLITE_NOTADB` and any stored value that does not
//! decode → `Corrupt` (A-8); at open, someone else's file → `Foreign`, a
//! newer schema → `TooNew` with nothing written (A-13).

mod lock;
pub mod schema;
mod sqlite;

pub use lock::{DataDirLock, LockError, LOCK_FILE_NAME};
pub use sqlite::{FileState, OpenError, OpenOptions, SqliteStore, SQLITE_HEADER};

/// The database file's name inside the data directory. The WAL and its
/// index sit beside it as `kizuna.db-wal` and `kizuna.db-shm`.
pub const DB_FILE_NAME: &str = "kizuna.db";
