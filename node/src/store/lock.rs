//! One process per data directory.
//!
//! [`DataDirLock::acquire`] takes an exclusive `flock` on `DIR/kizuna.lock`
//! (std's [`File::try_lock`]) and holds it until the lock is dropped or the
//! process dies, in which case the kernel releases it, so a kill -9 never
//! leaves a stale lock behind. Two kizuna processes on one directory would
//! each believe they own the incarnation counter and the change sequence;
//! the second one is refused before it opens the store. The holder's pid is
//! written into the file purely as a hint for the error message; the lock
//! itself, not the file's content, is what counts.
//!
//! Durability: nothing here is fsynced; the lock file carries no data.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Name of the lock file inside the data directory.
pub const LOCK_FILE_NAME: &str = "kizuna.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process (or another handle in this process) holds the lock.
    #[error("data directory {dir} is in use: another kizuna is running with it{}", holder.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Held { dir: PathBuf, holder: Option<u32> },
    /// The directory or lock file could not be created, opened or locked.
    #[error("cannot lock data directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An exclusive hold on a data directory; released on drop.
#[derive(Debug)]
pub struct DataDirLock {
    // Keeping the file open keeps the flock.
    file: File,
    dir: PathBuf,
}

impl DataDirLock {
    /// Creates `dir` if needed and takes the exclusive lock on its
    /// `kizuna.lock`, failing at once (no waiting) if it is held.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, LockError> {
        let io = |source| LockError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        // The data directory holds personal data: 0700 from its creation
        // (parents too, when this creates them), whatever the umask.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        let path = dir.join(LOCK_FILE_NAME);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut s = String::new();
                let holder = file
                    .read_to_string(&mut s)
                    .ok()
                    .and_then(|_| s.trim().parse().ok());
                return Err(LockError::Held {
                    dir: dir.to_path_buf(),
                    holder,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        // A hint for humans and for the error above; failures are harmless.
        let _ = file
            .set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| write!(file, "{}", std::process::id()));
        Ok(DataDirLock {
            file,
            dir: dir.to_path_buf(),
        })
    }

    /// The locked data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for DataDirLock {
    fn drop(&mut self) {
        // Closing the descriptor releases the flock anyway; unlocking first
        // makes the release explicit and independent of dup'ed descriptors.
        let _ = self.file.unlock();
    }
}
