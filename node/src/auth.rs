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
//! Bearer tokens expire ([`DEFAULT_TOKEN_DAYS`] after they are issued or
//! rotated; an entry without an expiry is refused, fail closed).
//!
//! Staff cards: an operator may also register the 13-digit user ID of their
//! own municipal card (`kizuna operator add --card ID`). Only a keyed
//! blake3 hash is stored (key: 32 random bytes per entry, `card_salt`), so
//! the file never holds the ID and a leaked file cannot be matched against
//! a list of IDs without hashing each one per entry. A card alone never
//! signs anyone in: the tap must be followed by the operator's PIN
//! (`kizuna operator pin`), checked against a slow hash.
//!
//! Browser sign-in: a password (`kizuna operator password`, stored as
//! PBKDF2-HMAC-SHA256 with [`PASSWORD_ITERATIONS`] iterations and a random
//! salt) and, on nodes whose role reads medical data, a TOTP code (RFC 6238,
//! `kizuna operator totp`) as the second factor; or a staff card tap plus
//! PIN; or a one-time sign-in link ([`SigninLinks`]). Each gives a session
//! in [`Sessions`] (memory only, lost on restart), bound to the operator's
//! credential stamp: removing the operator or rotating any of their
//! credentials ends every session they hold.

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
    #[error("{0}")]
    BadSecret(&'static str),
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
    /// When the bearer token stops working (wall ms); `None` (files from
    /// before expiry existed) is treated as expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires_ms: Option<u64>,
    /// Browser sign-in password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<SlowHash>,
    /// PIN asked after a staff card tap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<SlowHash>,
    /// Hex TOTP secret (the second factor on medical nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totp_secret: Option<String>,
}

/// PBKDF2-HMAC-SHA256 of a password or PIN.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SlowHash {
    pub salt: String,
    pub iterations: u32,
    pub hash: String,
}

/// OWASP's current figure for PBKDF2-HMAC-SHA256.
pub const PASSWORD_ITERATIONS: u32 = 600_000;
/// Bearer tokens last this long after `operator add` or `operator token`.
pub const DEFAULT_TOKEN_DAYS: u64 = 90;
pub const MIN_PASSWORD_CHARS: usize = 10;

impl SlowHash {
    pub fn new(secret: &str, iterations: u32) -> SlowHash {
        let mut salt = [0u8; 16];
        OsRng.fill_bytes(&mut salt);
        let mut out = [0u8; 32];
        ring::pbkdf2::derive(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(iterations.max(1)).expect("non-zero"),
            &salt,
            secret.as_bytes(),
            &mut out,
        );
        SlowHash {
            salt: hex(&salt),
            iterations: iterations.max(1),
            hash: hex(&out),
        }
    }

    /// Constant-time check of `secret` (ring compares in constant time).
    pub fn verify(&self, secret: &str) -> bool {
        let (Some(salt), Some(hash)) = (unhex(&self.salt), unhex(&self.hash)) else {
            return false;
        };
        let Some(iter) = std::num::NonZeroU32::new(self.iterations) else {
            return false;
        };
        ring::pbkdf2::verify(
            ring::pbkdf2::PBKDF2_HMAC_SHA256,
            iter,
            &salt,
            secret.as_bytes(),
            &hash,
        )
        .is_ok()
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// RFC 6238 TOTP (HMAC-SHA1, 30 s steps, 6 digits) of `secret` at Unix
/// second `t`.
pub fn totp(secret: &[u8], t: u64) -> u32 {
    hotp(secret, t / 30)
}

fn hotp(secret: &[u8], counter: u64) -> u32 {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = ring::hmac::sign(&key, &counter.to_be_bytes());
    let h = tag.as_ref();
    let off = (h[h.len() - 1] & 0x0f) as usize;
    let bin = u32::from_be_bytes([h[off] & 0x7f, h[off + 1], h[off + 2], h[off + 3]]);
    bin % 1_000_000
}

/// RFC 4648 base32 without padding (what authenticator apps read).
pub fn base32(b: &[u8]) -> String {
    const A: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buf, mut bits) = (0u32, 0u32);
    for &x in b {
        buf = (buf << 8) | x as u32;
        bits += 8;
        while bits >= 5 {
            out.push(A[((buf >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(A[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why a bearer token was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenRefusal {
    Unknown,
    Expired,
}

/// Why a browser sign-in failed. One message for wrong name or password
/// (no hint which), separate ones for what the operator can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginRefusal {
    BadCredentials,
    SecondFactorRequired,
    BadSecondFactor,
    NoPin,
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
    /// A digest of every credential: a session remembers it and ends when
    /// it changes (rotation) or the operator is gone (removal).
    pub fn stamp(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        for part in [
            Some(self.name.as_str()),
            Some(self.token_blake3.as_str()),
            self.card_blake3.as_deref(),
            self.password.as_ref().map(|p| p.hash.as_str()),
            self.pin.as_ref().map(|p| p.hash.as_str()),
            self.totp_secret.as_deref(),
        ] {
            let p = part.unwrap_or("");
            h.update(&(p.len() as u64).to_le_bytes());
            h.update(p.as_bytes());
        }
        *h.finalize().as_bytes()
    }

    /// Checks a TOTP code at Unix second `t` (one step either side).
    pub fn totp_ok(&self, code: &str, t: u64) -> bool {
        let Some(secret) = self.totp_secret.as_deref().and_then(unhex) else {
            return false;
        };
        let code = code.trim();
        if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        let Ok(n) = code.parse::<u32>() else {
            return false;
        };
        [t.saturating_sub(30), t, t + 30]
            .iter()
            .any(|&x| totp(&secret, x) == n)
    }

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
            token_expires_ms: Some(now_ms() + DEFAULT_TOKEN_DAYS * 86_400_000),
            password: None,
            pin: None,
            totp_secret: None,
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
        e.token_expires_ms = Some(now_ms() + DEFAULT_TOKEN_DAYS * 86_400_000);
        ops.save(data_dir)?;
        Ok(token)
    }

    fn update(
        data_dir: &Path,
        name: &str,
        f: impl FnOnce(&mut OperatorEntry),
    ) -> Result<(), AuthError> {
        let mut ops = Self::load(data_dir)?;
        let e = ops
            .operators
            .iter_mut()
            .find(|o| o.name == name)
            .ok_or_else(|| AuthError::Unknown(name.chars().take(64).collect()))?;
        f(e);
        ops.save(data_dir)
    }

    /// Sets (or replaces) an operator's browser password.
    pub fn set_password(data_dir: &Path, name: &str, password: &str) -> Result<(), AuthError> {
        if password.chars().count() < MIN_PASSWORD_CHARS {
            return Err(AuthError::BadSecret(
                "a password needs at least 10 characters",
            ));
        }
        if password.chars().any(char::is_control) {
            return Err(AuthError::BadSecret("a password has no control characters"));
        }
        let h = SlowHash::new(password, PASSWORD_ITERATIONS);
        Self::update(data_dir, name, |e| e.password = Some(h))
    }

    /// Sets (or replaces) the PIN asked after a staff card tap: 4 to 8
    /// digits.
    pub fn set_pin(data_dir: &Path, name: &str, pin: &str) -> Result<(), AuthError> {
        if !(4..=8).contains(&pin.len()) || !pin.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AuthError::BadSecret("a PIN is 4 to 8 digits"));
        }
        let h = SlowHash::new(pin, PASSWORD_ITERATIONS);
        Self::update(data_dir, name, |e| e.pin = Some(h))
    }

    /// Gives an operator a new TOTP secret and returns it (print it once,
    /// as base32 or an `otpauth://` URI).
    pub fn new_totp(data_dir: &Path, name: &str) -> Result<Vec<u8>, AuthError> {
        let mut secret = vec![0u8; 20];
        OsRng.fill_bytes(&mut secret);
        let h = hex(&secret);
        Self::update(data_dir, name, |e| e.totp_secret = Some(h))?;
        Ok(secret)
    }

    /// Removes an operator: their token stops working and every session
    /// they hold ends.
    pub fn remove(data_dir: &Path, name: &str) -> Result<(), AuthError> {
        let mut ops = Self::load(data_dir)?;
        let before = ops.operators.len();
        ops.operators.retain(|o| o.name != name);
        if ops.operators.len() == before {
            return Err(AuthError::Unknown(name.chars().take(64).collect()));
        }
        ops.save(data_dir)
    }

    pub fn get(&self, name: &str) -> Option<&OperatorEntry> {
        self.operators.iter().find(|o| o.name == name)
    }

    /// The operator owning `token`, if it has not expired at `now_ms`.
    /// Compares hashes in constant time.
    pub fn verify_at(&self, token: &str, now_ms: u64) -> Result<&str, TokenRefusal> {
        let h = blake3::hash(token.as_bytes());
        let e = self
            .operators
            .iter()
            .find(|o| {
                blake3::Hash::from_hex(&o.token_blake3)
                    .map(|stored| stored == h)
                    .unwrap_or(false)
            })
            .ok_or(TokenRefusal::Unknown)?;
        match e.token_expires_ms {
            Some(exp) if exp > now_ms => Ok(e.name.as_str()),
            _ => Err(TokenRefusal::Expired),
        }
    }

    /// [`Self::verify_at`] now.
    pub fn verify(&self, token: &str) -> Option<&str> {
        self.verify_at(token, now_ms()).ok()
    }

    /// A password sign-in; `second_factor` is the TOTP code, required when
    /// `needs_2fa`. `t` is the Unix second for TOTP.
    pub fn login(
        &self,
        name: &str,
        password: &str,
        second_factor: Option<&str>,
        needs_2fa: bool,
        t: u64,
    ) -> Result<&OperatorEntry, LoginRefusal> {
        let e = self.get(name);
        let ok = match e.and_then(|e| e.password.as_ref()) {
            Some(h) => h.verify(password),
            None => {
                // Same cost for an unknown name, so timing does not tell.
                SlowHash {
                    salt: "00".repeat(16),
                    iterations: PASSWORD_ITERATIONS,
                    hash: "00".repeat(32),
                }
                .verify(password);
                false
            }
        };
        let e = match (ok, e) {
            (true, Some(e)) => e,
            _ => return Err(LoginRefusal::BadCredentials),
        };
        if needs_2fa {
            match second_factor.map(str::trim).filter(|c| !c.is_empty()) {
                None => return Err(LoginRefusal::SecondFactorRequired),
                Some(c) if !e.totp_ok(c, t) => return Err(LoginRefusal::BadSecondFactor),
                Some(_) => {}
            }
        }
        Ok(e)
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

/// Lifetime of a browser or staff-card session.
pub const CARD_SESSION_TTL: std::time::Duration = std::time::Duration::from_secs(8 * 3600);
/// Sessions kept at most; the one expiring first is dropped beyond.
pub const MAX_SESSIONS: usize = 10_000;

/// How a session was opened (shown on the screen, kept for audit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    Password,
    Card,
    Link,
}

/// One signed-in operator.
#[derive(Clone, Debug)]
pub struct Session {
    pub operator: String,
    /// Sent back in `X-CSRF-Token` with every state-changing request.
    pub csrf: String,
    pub via: Via,
    stamp: [u8; 32],
    expires: std::time::Instant,
}

/// Operator sessions by the blake3 of their token, in memory only: a
/// restart ends them all.
#[derive(Default)]
pub struct Sessions {
    map: std::sync::Mutex<std::collections::HashMap<[u8; 32], Session>>,
}

impl Sessions {
    /// Opens a session for `op`, valid for `ttl`; returns its token.
    pub fn issue(&self, op: &OperatorEntry, via: Via, ttl: std::time::Duration) -> String {
        let token = new_token();
        let now = std::time::Instant::now();
        let mut m = self.map.lock().expect("sessions lock");
        m.retain(|_, s| s.expires > now);
        if m.len() >= MAX_SESSIONS {
            if let Some(k) = m.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k) {
                m.remove(&k);
            }
        }
        m.insert(
            *blake3::hash(token.as_bytes()).as_bytes(),
            Session {
                operator: op.name.clone(),
                csrf: new_token(),
                via,
                stamp: op.stamp(),
                expires: now + ttl,
            },
        );
        token
    }

    /// The live session of `token`, if its operator still exists with the
    /// same credentials; a session whose operator was removed or rotated
    /// is dropped.
    pub fn get(&self, token: &str, ops: &Operators) -> Option<Session> {
        let h = *blake3::hash(token.as_bytes()).as_bytes();
        let mut m = self.map.lock().expect("sessions lock");
        let s = m.get(&h)?;
        let live = s.expires > std::time::Instant::now()
            && ops.get(&s.operator).is_some_and(|e| e.stamp() == s.stamp);
        if live {
            Some(s.clone())
        } else {
            m.remove(&h);
            None
        }
    }

    /// Ends a session (logout).
    pub fn end(&self, token: &str) {
        let h = *blake3::hash(token.as_bytes()).as_bytes();
        self.map.lock().expect("sessions lock").remove(&h);
    }
}

pub const LINKS_FILE: &str = "signin-links.json";

/// One-time sign-in links: `kizuna operator link` (and `kizuna demo`)
/// write the blake3 of a random token with its operator and expiry; the
/// node's `GET /ui/link/{token}` consumes it once and opens a session.
/// Whoever can write the data directory can already act as any operator,
/// so a link adds no power; it saves typing a password on a new screen.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigninLinks {
    pub links: Vec<SigninLink>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigninLink {
    pub token_blake3: String,
    pub operator: String,
    pub expires_ms: u64,
}

impl SigninLinks {
    /// Runs `f` on the links file under an exclusive lock (the CLI and the
    /// node both rewrite it), saving atomically when `f` says so.
    fn locked<T>(
        data_dir: &Path,
        f: impl FnOnce(&mut SigninLinks) -> (bool, T),
    ) -> Result<T, AuthError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = data_dir.join(LINKS_FILE);
        let io = |e: std::io::Error| AuthError::Io {
            path: path.clone(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(data_dir).map_err(io)?;
        let lock = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(data_dir.join("signin-links.lock"))
            .map_err(io)?;
        lock.lock().map_err(io)?;
        let mut links: SigninLinks = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| AuthError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SigninLinks::default(),
            Err(e) => return Err(io(e)),
        };
        let now = now_ms();
        let before = links.links.len();
        links.links.retain(|l| l.expires_ms > now);
        let (changed, out) = f(&mut links);
        if changed || links.links.len() != before {
            let tmp = data_dir.join(format!("{LINKS_FILE}.tmp"));
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            file.write_all(&serde_json::to_vec_pretty(&links).expect("serialisable"))
                .map_err(io)?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
        }
        Ok(out)
    }

    /// Issues a link token for `operator`, valid for `ttl`.
    pub fn issue(
        data_dir: &Path,
        operator: &str,
        ttl: std::time::Duration,
    ) -> Result<String, AuthError> {
        if Operators::load(data_dir)?.get(operator).is_none() {
            return Err(AuthError::Unknown(operator.chars().take(64).collect()));
        }
        let token = new_token();
        let link = SigninLink {
            token_blake3: hash_hex(&token),
            operator: operator.to_string(),
            expires_ms: now_ms() + ttl.as_millis() as u64,
        };
        Self::locked(data_dir, |l| {
            l.links.push(link);
            (true, ())
        })?;
        Ok(token)
    }

    /// Consumes a link token: the operator it names, once.
    pub fn consume(data_dir: &Path, token: &str) -> Result<Option<String>, AuthError> {
        let h = blake3::hash(token.as_bytes());
        Self::locked(data_dir, |l| {
            let pos = l.links.iter().position(|x| {
                blake3::Hash::from_hex(&x.token_blake3)
                    .map(|s| s == h)
                    .unwrap_or(false)
            });
            match pos {
                Some(i) => (true, Some(l.links.remove(i).operator)),
                None => (false, None),
            }
        })
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
    fn sessions_expire_and_end_with_removal_or_rotation() {
        let d = tempfile::tempdir().unwrap();
        Operators::add(d.path(), "alice").unwrap();
        Operators::add(d.path(), "bob").unwrap();
        let ops = Operators::load(d.path()).unwrap();
        let s = Sessions::default();
        let a = s.issue(ops.get("alice").unwrap(), Via::Password, CARD_SESSION_TTL);
        let b = s.issue(ops.get("bob").unwrap(), Via::Card, CARD_SESSION_TTL);
        assert_eq!(s.get(&a, &ops).unwrap().operator, "alice");
        assert!(s.get("nope", &ops).is_none());
        let z = s.issue(
            ops.get("alice").unwrap(),
            Via::Link,
            std::time::Duration::ZERO,
        );
        assert!(s.get(&z, &ops).is_none());
        // Rotation of alice's token ends her session, not bob's.
        Operators::rotate(d.path(), "alice").unwrap();
        let ops = Operators::load(d.path()).unwrap();
        assert!(s.get(&a, &ops).is_none());
        assert!(s.get(&b, &ops).is_some());
        Operators::remove(d.path(), "bob").unwrap();
        let ops = Operators::load(d.path()).unwrap();
        assert!(s.get(&b, &ops).is_none());
        s.end(&b);
    }

    #[test]
    fn tokens_expire() {
        let d = tempfile::tempdir().unwrap();
        let t = Operators::add(d.path(), "alice").unwrap();
        let ops = Operators::load(d.path()).unwrap();
        let exp = ops.get("alice").unwrap().token_expires_ms.unwrap();
        assert_eq!(ops.verify_at(&t, exp - 1), Ok("alice"));
        assert_eq!(ops.verify_at(&t, exp), Err(TokenRefusal::Expired));
        assert_eq!(ops.verify_at("x", 0), Err(TokenRefusal::Unknown));
        // An entry without an expiry (an old file) is refused.
        let old = format!(
            r#"{{"operators":[{{"name":"x","token_blake3":"{}"}}]}}"#,
            blake3::hash(b"tok").to_hex()
        );
        let o: Operators = serde_json::from_str(&old).unwrap();
        assert_eq!(o.verify_at("tok", 0), Err(TokenRefusal::Expired));
    }

    #[test]
    fn passwords_pins_and_totp() {
        let d = tempfile::tempdir().unwrap();
        Operators::add(d.path(), "alice").unwrap();
        assert!(Operators::set_password(d.path(), "alice", "short").is_err());
        Operators::set_password(d.path(), "alice", "correct horse battery").unwrap();
        assert!(Operators::set_pin(d.path(), "alice", "12a4").is_err());
        Operators::set_pin(d.path(), "alice", "2468").unwrap();
        let text = std::fs::read_to_string(Operators::path(d.path())).unwrap();
        assert!(!text.contains("correct horse") && !text.contains("2468"));
        let ops = Operators::load(d.path()).unwrap();
        assert!(ops
            .login("alice", "correct horse battery", None, false, 0)
            .is_ok());
        assert_eq!(
            ops.login("alice", "wrong password!", None, false, 0).err(),
            Some(LoginRefusal::BadCredentials)
        );
        assert_eq!(
            ops.login("nobody", "correct horse battery", None, false, 0)
                .err(),
            Some(LoginRefusal::BadCredentials)
        );
        assert_eq!(
            ops.login("alice", "correct horse battery", None, true, 0)
                .err(),
            Some(LoginRefusal::SecondFactorRequired)
        );
        let secret = Operators::new_totp(d.path(), "alice").unwrap();
        let ops = Operators::load(d.path()).unwrap();
        let t = 1_790_000_000;
        let code = format!("{:06}", totp(&secret, t));
        assert!(ops
            .login("alice", "correct horse battery", Some(&code), true, t + 20)
            .is_ok());
        assert_eq!(
            ops.login("alice", "correct horse battery", Some(&code), true, t + 400)
                .err(),
            Some(LoginRefusal::BadSecondFactor)
        );
        assert!(ops
            .get("alice")
            .unwrap()
            .pin
            .as_ref()
            .unwrap()
            .verify("2468"));
        assert!(!ops
            .get("alice")
            .unwrap()
            .pin
            .as_ref()
            .unwrap()
            .verify("2469"));
    }

    #[test]
    fn totp_matches_rfc_6238() {
        // RFC 6238 appendix B, SHA-1 secret; the 6-digit codes are the
        // last six digits of the 8-digit table.
        let secret = b"12345678901234567890";
        assert_eq!(totp(secret, 59), 287082);
        assert_eq!(totp(secret, 1111111109), 81804);
        assert_eq!(totp(secret, 1234567890), 5924);
        assert_eq!(totp(secret, 2000000000), 279037);
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
    }

    #[test]
    fn signin_links_are_used_once() {
        let d = tempfile::tempdir().unwrap();
        Operators::add(d.path(), "alice").unwrap();
        assert!(SigninLinks::issue(d.path(), "nobody", CARD_SESSION_TTL).is_err());
        let t = SigninLinks::issue(d.path(), "alice", CARD_SESSION_TTL).unwrap();
        let text = std::fs::read_to_string(d.path().join(LINKS_FILE)).unwrap();
        assert!(!text.contains(&t));
        assert_eq!(
            SigninLinks::consume(d.path(), &t).unwrap().as_deref(),
            Some("alice")
        );
        assert_eq!(SigninLinks::consume(d.path(), &t).unwrap(), None);
        let t = SigninLinks::issue(d.path(), "alice", std::time::Duration::ZERO).unwrap();
        assert_eq!(SigninLinks::consume(d.path(), &t).unwrap(), None);
    }
}
