//! API operators: `operators.json` in the data directory holds each
//! operator's name and the blake3 hash of their bearer token, never the
//! token itself. Tokens are 32 random bytes from the OS, printed once (hex)
//! by `kizuna operator add|token` and never stored or logged.
//!
//! The file is rewritten atomically (temp file, fsync, rename) with mode
//! 0600. The API re-reads it when its modification time changes, so a
//! rotated token takes effect without a restart.

use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const OPERATORS_FILE: &str = "operators.json";
const MAX_OPERATORS_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{path}: not a valid operators file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("operator name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("operator {0:?} already exists (use `kizuna operator token` to rotate its token)")]
    Exists(String),
    #[error("no operator named {0:?}")]
    Unknown(String),
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Operators {
    pub operators: Vec<OperatorEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OperatorEntry {
    pub name: String,
    /// Hex blake3 of the token.
    pub token_blake3: String,
}

fn hash_hex(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

fn new_token() -> String {
    let mut b = [0u8; 32];
    OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Operators {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(OPERATORS_FILE)
    }

    /// Loads the file; a missing file means no operators.
    pub fn load(data_dir: &Path) -> Result<Operators, AuthError> {
        let path = Self::path(data_dir);
        let io = |e: std::io::Error| AuthError::Io {
            path: path.clone(),
            reason: e.to_string(),
        };
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Operators::default()),
            Err(e) => return Err(io(e)),
            Ok(m) if m.len() > MAX_OPERATORS_BYTES => {
                return Err(AuthError::Corrupt {
                    path,
                    reason: "too large".into(),
                })
            }
            Ok(_) => {}
        }
        let bytes = std::fs::read(&path).map_err(io)?;
        serde_json::from_slice(&bytes).map_err(|e| AuthError::Corrupt {
            path,
            reason: e.to_string(),
        })
    }

    fn save(&self, data_dir: &Path) -> Result<(), AuthError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = Self::path(data_dir);
        let tmp = data_dir.join(format!("{OPERATORS_FILE}.tmp"));
        let io = |e: std::io::Error| AuthError::Io {
            path: path.clone(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(data_dir).map_err(io)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&serde_json::to_vec_pretty(self).expect("serialisable"))
            .map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        if let Ok(d) = std::fs::File::open(data_dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Adds an operator and returns its new token (print it once).
    pub fn add(data_dir: &Path, name: &str) -> Result<String, AuthError> {
        crdt::ids::check_id_str(name).map_err(|reason| AuthError::BadName {
            name: name.chars().take(64).collect(),
            reason,
        })?;
        let mut ops = Self::load(data_dir)?;
        if ops.operators.iter().any(|o| o.name == name) {
            return Err(AuthError::Exists(name.into()));
        }
        let token = new_token();
        ops.operators.push(OperatorEntry {
            name: name.into(),
            token_blake3: hash_hex(&token),
        });
        ops.save(data_dir)?;
        Ok(token)
    }

    /// Replaces an operator's token and returns the new one.
    pub fn rotate(data_dir: &Path, name: &str) -> Result<String, AuthError> {
        let mut ops = Self::load(data_dir)?;
        let token = new_token();
        let e = ops
            .operators
            .iter_mut()
            .find(|o| o.name == name)
            .ok_or_else(|| AuthError::Unknown(name.chars().take(64).collect()))?;
        e.token_blake3 = hash_hex(&token);
        ops.save(data_dir)?;
        Ok(token)
    }

    /// The operator owning `token`, if any. Compares hashes in constant
    /// time.
    pub fn verify(&self, token: &str) -> Option<&str> {
        let h = blake3::hash(token.as_bytes());
        self.operators
            .iter()
            .find(|o| {
                blake3::Hash::from_hex(&o.token_blake3)
                    .map(|stored| stored == h)
                    .unwrap_or(false)
            })
            .map(|o| o.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_verify_rotate() {
        let d = tempfile::tempdir().unwrap();
        let t = Operators::add(d.path(), "alice").unwrap();
        assert!(matches!(
            Operators::add(d.path(), "alice"),
            Err(AuthError::Exists(_))
        ));
        assert!(matches!(
            Operators::add(d.path(), "a b"),
            Err(AuthError::BadName { .. })
        ));
        let text = std::fs::read_to_string(Operators::path(d.path())).unwrap();
        assert!(!text.contains(&t), "token must not be stored");
        assert_eq!(Operators::load(d.path()).unwrap().verify(&t), Some("alice"));
        let t2 = Operators::rotate(d.path(), "alice").unwrap();
        let ops = Operators::load(d.path()).unwrap();
        assert_eq!(ops.verify(&t), None);
        assert_eq!(ops.verify(&t2), Some("alice"));
        assert!(matches!(
            Operators::rotate(d.path(), "bob"),
            Err(AuthError::Unknown(_))
        ));
    }
}
