//! API operators: `operators.json` in the data directory holds each
//! operator's name and the blake3 hash of their bearer token, never the
//! token itself. Tokens are 32 random bytes from the OS, printed once (hex)
//! by `kizuna operator add|token` and never stored or logged.
//!
//! The file is rewritten atomically (temp file, fsync, rename) with mode
//! 0600. A running node reads it through one [`OperatorsFile`], shared by
//! the API's token check and the card flow's staff-card check, which
//! re-reads it when its modification time changes, so a rotated token or a
//! new staff card takes effect without a restart.
//!
//! Staff cards: an operator may also register the 13-digit user ID of their
//! own municipal card (`kizuna operator add --card ID`). Only a keyed
//! blake3 hash is stored (key: 32 random bytes per entry, `card_salt`), so
//! the file never holds the ID and a leaked file cannot be matched against
//! a list of IDs without hashing each one per entry. A tap of that card on
//! the node lets `POST /api/v1/sessions/card` issue a short-lived session
//! token ([`CardSessions`], in memory only, lost on restart).

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
    #[error("another operator already registered this card")]
    CardTaken,
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
    /// Hex of the 32-byte key for [`Self::card_blake3`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_salt: Option<String>,
    /// Hex keyed blake3 of the staff card's 13-digit user ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_blake3: Option<String>,
}

fn card_hash(salt: &[u8; 32], card: &str) -> blake3::Hash {
    blake3::keyed_hash(salt, card.as_bytes())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl OperatorEntry {
    /// Whether this operator registered `card` (a validated user ID).
    pub fn has_card(&self, card: &str) -> bool {
        let (Some(salt), Some(h)) = (&self.card_salt, &self.card_blake3) else {
            return false;
        };
        let (Some(salt), Ok(stored)) = (unhex32(salt), blake3::Hash::from_hex(h)) else {
            return false;
        };
        // blake3::Hash equality is constant time.
        card_hash(&salt, card) == stored
    }
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
        Self::add_with_card(data_dir, name, None)
    }

    /// Adds an operator, optionally with a staff card (a validated 13-digit
    /// user ID, stored only as a keyed hash), and returns its new token.
    pub fn add_with_card(
        data_dir: &Path,
        name: &str,
        card: Option<&crate::card::UserId>,
    ) -> Result<String, AuthError> {
        crdt::ids::check_id_str(name).map_err(|reason| AuthError::BadName {
            name: name.chars().take(64).collect(),
            reason,
        })?;
        let mut ops = Self::load(data_dir)?;
        if ops.operators.iter().any(|o| o.name == name) {
            return Err(AuthError::Exists(name.into()));
        }
        if let Some(c) = card {
            if ops.operators.iter().any(|o| o.has_card(c.as_str())) {
                return Err(AuthError::CardTaken);
            }
        }
        let token = new_token();
        let (card_salt, card_blake3) = match card {
            None => (None, None),
            Some(c) => {
                let mut salt = [0u8; 32];
                OsRng.fill_bytes(&mut salt);
                (
                    Some(hex(&salt)),
                    Some(card_hash(&salt, c.as_str()).to_hex().to_string()),
                )
            }
        };
        ops.operators.push(OperatorEntry {
            name: name.into(),
            token_blake3: hash_hex(&token),
            card_salt,
            card_blake3,
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

    /// The operator whose staff card is `card`, if any.
    pub fn by_card(&self, card: &str) -> Option<&str> {
        self.operators
            .iter()
            .find(|o| o.has_card(card))
            .map(|o| o.name.as_str())
    }
}

/// The operators file of one data directory as a running node sees it:
/// loaded once and re-read only when the file's modification time changes
/// (or while it does not exist). One per node, shared by the API and the
/// card flow, so a tap never reads the file again when nothing changed.
pub struct OperatorsFile {
    data_dir: PathBuf,
    current: std::sync::Mutex<(Option<std::time::SystemTime>, std::sync::Arc<Operators>)>,
}

impl OperatorsFile {
    pub fn new(data_dir: &Path) -> std::sync::Arc<OperatorsFile> {
        std::sync::Arc::new(OperatorsFile {
            data_dir: data_dir.to_path_buf(),
            current: std::sync::Mutex::new((None, std::sync::Arc::new(Operators::default()))),
        })
    }

    /// The current operators. An unreadable or corrupt file is an error
    /// (the caller decides: the API refuses, a tap counts as a resident's).
    pub fn current(&self) -> Result<std::sync::Arc<Operators>, AuthError> {
        let path = Operators::path(&self.data_dir);
        let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.0 != mtime || mtime.is_none() {
            let ops = Operators::load(&self.data_dir)?;
            *cur = (mtime, std::sync::Arc::new(ops));
        }
        Ok(cur.1.clone())
    }
}

/// Lifetime of a session issued for a staff card tap.
pub const CARD_SESSION_TTL: std::time::Duration = std::time::Duration::from_secs(8 * 3600);

/// Short-lived operator sessions issued after a staff card tap. Kept in
/// memory (by token hash); a restart ends them all.
#[derive(Default)]
pub struct CardSessions {
    sessions: std::sync::Mutex<std::collections::HashMap<[u8; 32], (String, std::time::Instant)>>,
}

impl CardSessions {
    /// Issues a token for `operator`, valid for `ttl`.
    pub fn issue(&self, operator: &str, ttl: std::time::Duration) -> String {
        let token = new_token();
        let now = std::time::Instant::now();
        let mut s = self.sessions.lock().expect("sessions lock");
        s.retain(|_, (_, exp)| *exp > now);
        s.insert(
            *blake3::hash(token.as_bytes()).as_bytes(),
            (operator.to_string(), now + ttl),
        );
        token
    }

    /// The operator of a live session token.
    pub fn verify(&self, token: &str) -> Option<String> {
        let h = *blake3::hash(token.as_bytes()).as_bytes();
        let s = self.sessions.lock().expect("sessions lock");
        s.get(&h)
            .filter(|(_, exp)| *exp > std::time::Instant::now())
            .map(|(name, _)| name.clone())
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

    #[test]
    fn staff_card_is_stored_hashed_and_matched() {
        let d = tempfile::tempdir().unwrap();
        let card = crate::card::UserId::parse("5555555555555").unwrap();
        Operators::add_with_card(d.path(), "staff-1", Some(&card)).unwrap();
        Operators::add(d.path(), "alice").unwrap();
        assert!(matches!(
            Operators::add_with_card(d.path(), "staff-2", Some(&card)),
            Err(AuthError::CardTaken)
        ));
        let text = std::fs::read_to_string(Operators::path(d.path())).unwrap();
        assert!(!text.contains("5555555555555"), "card must not be stored");
        let ops = Operators::load(d.path()).unwrap();
        assert_eq!(ops.by_card("5555555555555"), Some("staff-1"));
        assert_eq!(ops.by_card("5555555555556"), None);
        // Files written before staff cards still load.
        let old = r#"{"operators":[{"name":"x","token_blake3":"00"}]}"#;
        let o: Operators = serde_json::from_str(old).unwrap();
        assert_eq!(o.by_card("5555555555555"), None);
    }

    /// One load per change of the file: a tap or a request in between
    /// reads nothing (the cached list stays even if the bytes changed under
    /// an unchanged modification time), and a new mtime is seen at once.
    #[test]
    fn operators_file_is_reread_only_when_it_changes() {
        let d = tempfile::tempdir().unwrap();
        let card = crate::card::UserId::parse("5555555555555").unwrap();
        Operators::add_with_card(d.path(), "staff-1", Some(&card)).unwrap();
        let file = OperatorsFile::new(d.path());
        let first = file.current().unwrap();
        assert_eq!(first.by_card("5555555555555"), Some("staff-1"));
        let path = Operators::path(d.path());
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, b"not json").unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(mtime).unwrap();
        let again = file.current().unwrap();
        assert!(std::sync::Arc::ptr_eq(&first, &again), "not re-read");
        f.set_modified(mtime + std::time::Duration::from_secs(5))
            .unwrap();
        assert!(matches!(file.current(), Err(AuthError::Corrupt { .. })));
        std::fs::remove_file(&path).unwrap();
        assert!(file.current().unwrap().operators.is_empty());
    }

    #[test]
    fn card_sessions_expire() {
        let s = CardSessions::default();
        let t = s.issue("staff-1", std::time::Duration::from_secs(60));
        assert_eq!(s.verify(&t).as_deref(), Some("staff-1"));
        assert_eq!(s.verify("nope"), None);
        let t2 = s.issue("staff-1", std::time::Duration::ZERO);
        assert_eq!(s.verify(&t2), None);
    }
}
