//! The storage key: the one secret that protects a node's data at rest,
//! and the sealed form of the node's private key.
//!
//! Model: a node that keeps data at rest encrypted (on by default for
//! ambulance nodes, see the node's `[storage]` config) has one
//! [`StorageKey`]. It comes from a [`KeySource`]: a key file (0600, never
//! group- or world-readable), a systemd credential (a file in
//! `$CREDENTIALS_DIRECTORY`, which systemd decrypts, e.g. with the TPM,
//! into a private in-memory file system) or a passphrase typed at start.
//! A key file or credential holding exactly 64 hex digits is a raw
//! 256-bit key (what [`StorageKey::generate`] writes); anything else is a
//! passphrase, stretched by a slow KDF. The node hands the key to
//! SQLCipher for its database (see `node::store`) and uses it here to
//! seal and unseal its TLS private key:
//!
//! ```text
//! -----BEGIN KIZUNA SEALED PRIVATE KEY-----
//! base64( "KZSK" | version 1 | kdf | iterations u32 BE | salt[16] |
//!         nonce[12] | AES-256-GCM(PKCS#8 DER) with the header as AAD )
//! -----END KIZUNA SEALED PRIVATE KEY-----
//! ```
//!
//! The KDF is HKDF-SHA256 for raw keys (already uniformly random) and
//! PBKDF2-HMAC-SHA512 with [`PASSPHRASE_ITERATIONS`] for passphrases, the
//! salt fresh per sealing. A wrong key fails the GCM tag: nothing is ever
//! "decrypted" into garbage. Every failure is a [`KeyError`] whose message
//! is in Japanese and English and names the file; key material never
//! appears in messages or `Debug` output, and is zeroed when dropped.

use base64::Engine as _;
use ring::aead;
use ring::rand::{SecureRandom, SystemRandom};
use std::fs;
use std::io::{self, BufRead, Write};
use std::num::NonZeroU32;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use zeroize::{Zeroize, Zeroizing};

/// Largest key file or credential read.
pub const MAX_KEY_FILE_LEN: u64 = 4096;
/// Shortest passphrase accepted.
pub const MIN_PASSPHRASE_CHARS: usize = 8;
/// PBKDF2-HMAC-SHA512 rounds for passphrases (SQLCipher 4's own default
/// for its database key).
pub const PASSPHRASE_ITERATIONS: u32 = 256_000;
/// The environment variable systemd sets to the unit's credentials.
pub const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";
/// The PEM label of a sealed private key.
pub const SEALED_LABEL: &str = "KIZUNA SEALED PRIVATE KEY";

const MAGIC: &[u8; 4] = b"KZSK";
const VERSION: u8 = 1;
const KDF_HKDF: u8 = 1;
const KDF_PBKDF2: u8 = 2;
const HEADER_LEN: usize = 4 + 1 + 1 + 4 + 16 + 12;
const HKDF_INFO: &[u8] = b"kizuna sealed node key v1";

/// Where the storage key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// A file holding the key (64 hex digits) or a passphrase.
    File(PathBuf),
    /// A systemd credential: `$CREDENTIALS_DIRECTORY/<name>`.
    Credential(String),
    /// A passphrase read from standard input (a prompt without echo when
    /// it is a terminal; `systemd-ask-password … | kizuna …` otherwise).
    Prompt,
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::File(p) => write!(f, "key file {}", p.display()),
            KeySource::Credential(n) => write!(f, "systemd credential {n}"),
            KeySource::Prompt => f.write_str("passphrase"),
        }
    }
}

/// Why the storage key cannot be had or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("保存データの暗号鍵がありません / storage key missing: {what} {} does not exist", path.display())]
    Missing { what: &'static str, path: PathBuf },
    #[error("保存データの暗号鍵を読めません / cannot read the storage key {}: {source}", path.display())]
    Unreadable { path: PathBuf, source: io::Error },
    #[error("暗号鍵ファイルの権限が緩すぎます / storage key {} has insecure permissions {mode:04o} (group/others may read it); run: chmod 600 {}", path.display(), path.display())]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("systemd の資格情報ディレクトリがありません / storage key credential {name}: ${CREDENTIALS_DIRECTORY} is not set (LoadCredential=/LoadCredentialEncrypted= in the unit)")]
    NoCredentialsDirectory { name: String },
    #[error("暗号鍵が不正です / unusable storage key from {source_name}: {reason}")]
    Invalid { source_name: String, reason: String },
    #[error("秘密鍵 {} は封印されていません / private key {} is not sealed", path.display(), path.display())]
    NotSealed { path: PathBuf },
    #[error("封印された秘密鍵 {} を開けません: 暗号鍵が違うか、ファイルが壊れています / cannot unseal private key {}: wrong storage key, or the file is damaged", path.display(), path.display())]
    WrongKey { path: PathBuf },
    #[error("封印された秘密鍵 {} の形式が不正です / sealed private key {} is malformed: {reason}", path.display(), path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error("乱数を得られません / no system randomness")]
    Random,
}

/// The secret itself. Zeroed on drop; `Debug` shows only its kind.
pub struct StorageKey {
    /// Raw 256-bit key, or the passphrase's UTF-8 bytes.
    material: Zeroizing<Vec<u8>>,
    raw: bool,
}

impl std::fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.raw {
            "raw 256-bit"
        } else {
            "passphrase"
        };
        write!(f, "StorageKey({kind}, <redacted>)")
    }
}

impl StorageKey {
    /// A new random raw key.
    pub fn generate() -> Result<StorageKey, KeyError> {
        let mut k = Zeroizing::new(vec![0u8; 32]);
        SystemRandom::new()
            .fill(&mut k)
            .map_err(|_| KeyError::Random)?;
        Ok(StorageKey {
            material: k,
            raw: true,
        })
    }

    /// Parses key file, credential or prompt content: one trailing line
    /// end is dropped; 64 hex digits are a raw key, anything else a
    /// passphrase of at least [`MIN_PASSPHRASE_CHARS`] characters, valid
    /// UTF-8 without control characters.
    pub fn from_bytes(content: &[u8], source_name: &str) -> Result<StorageKey, KeyError> {
        let invalid = |reason: &str| KeyError::Invalid {
            source_name: source_name.to_string(),
            reason: reason.to_string(),
        };
        let body = content.strip_suffix(b"\n").unwrap_or(content);
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        if body.is_empty() {
            return Err(invalid("empty"));
        }
        if body.len() == 64 && body.iter().all(u8::is_ascii_hexdigit) {
            let mut k = Zeroizing::new(vec![0u8; 32]);
            for (i, pair) in body.chunks(2).enumerate() {
                k[i] = (hex_val(pair[0]) << 4) | hex_val(pair[1]);
            }
            return Ok(StorageKey {
                material: k,
                raw: true,
            });
        }
        let text = std::str::from_utf8(body).map_err(|_| invalid("not UTF-8"))?;
        if text.chars().any(char::is_control) {
            return Err(invalid("control characters in the passphrase"));
        }
        if text.chars().count() < MIN_PASSPHRASE_CHARS {
            return Err(invalid(&format!(
                "a passphrase needs at least {MIN_PASSPHRASE_CHARS} characters (or give 64 hex digits)"
            )));
        }
        Ok(StorageKey {
            material: Zeroizing::new(body.to_vec()),
            raw: false,
        })
    }

    /// Is this a raw 256-bit key (not a passphrase)?
    pub fn is_raw(&self) -> bool {
        self.raw
    }

    /// Key file content for a raw key: 64 lower-case hex digits and a
    /// line end. `None` for a passphrase.
    pub fn to_file_contents(&self) -> Option<Zeroizing<String>> {
        self.raw.then(|| {
            let mut s = Zeroizing::new(String::with_capacity(65));
            for b in self.material.iter() {
                s.push(char::from(HEX[usize::from(b >> 4)]));
                s.push(char::from(HEX[usize::from(b & 15)]));
            }
            s.push('\n');
            s
        })
    }

    /// The value of SQLCipher's `PRAGMA key`: `x'<64 hex>'` for a raw key
    /// (used as the database key directly), else the passphrase (which
    /// SQLCipher stretches with PBKDF2 and the file's own salt).
    pub fn sqlcipher_key(&self) -> Zeroizing<String> {
        if self.raw {
            let hex = self.to_file_contents().expect("raw");
            Zeroizing::new(format!("x'{}'", hex.trim_end()))
        } else {
            // Checked UTF-8 at construction.
            Zeroizing::new(String::from_utf8_lossy(&self.material).into_owned())
        }
    }

    fn derive(&self, kdf: u8, iterations: u32, salt: &[u8]) -> Zeroizing<[u8; 32]> {
        let mut out = Zeroizing::new([0u8; 32]);
        match kdf {
            KDF_HKDF => {
                let prk =
                    ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, salt).extract(&self.material);
                let okm = prk
                    .expand(&[HKDF_INFO], ring::hkdf::HKDF_SHA256)
                    .expect("32 bytes is a valid HKDF-SHA256 length");
                okm.fill(&mut out[..]).expect("32 bytes");
            }
            _ => ring::pbkdf2::derive(
                ring::pbkdf2::PBKDF2_HMAC_SHA512,
                NonZeroU32::new(iterations.max(1)).expect("max(1)"),
                salt,
                &self.material,
                &mut out[..],
            ),
        }
        out
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => c - b'A' + 10,
    }
}

/// Reads the storage key from its source (see the module docs).
pub fn read(source: &KeySource) -> Result<StorageKey, KeyError> {
    match source {
        KeySource::File(path) => read_key_file("key file", path, &source.to_string()),
        KeySource::Credential(name) => {
            let dir = std::env::var_os(CREDENTIALS_DIRECTORY)
                .ok_or_else(|| KeyError::NoCredentialsDirectory { name: name.clone() })?;
            // systemd makes credential files read-only for the service
            // user in a private mount; the permission check still holds.
            read_key_file(
                "credential",
                &Path::new(&dir).join(name),
                &source.to_string(),
            )
        }
        KeySource::Prompt => read_passphrase(),
    }
}

fn read_key_file(
    what: &'static str,
    path: &Path,
    source_name: &str,
) -> Result<StorageKey, KeyError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(KeyError::Missing {
                what,
                path: path.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(KeyError::Unreadable {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(KeyError::InsecurePermissions {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    if meta.len() > MAX_KEY_FILE_LEN {
        return Err(KeyError::Invalid {
            source_name: source_name.to_string(),
            reason: format!("larger than {MAX_KEY_FILE_LEN} bytes"),
        });
    }
    let bytes = Zeroizing::new(fs::read(path).map_err(|source| KeyError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?);
    StorageKey::from_bytes(&bytes, source_name)
}

/// One line from standard input; on a terminal, after a prompt on
/// standard error and with echo off.
fn read_passphrase() -> Result<StorageKey, KeyError> {
    use rustix::termios;
    let stdin = io::stdin();
    let tty = termios::isatty(&stdin);
    let saved = if tty {
        let mut err = io::stderr();
        let _ = write!(err, "保存データの暗号パスフレーズ / storage passphrase: ");
        let _ = err.flush();
        termios::tcgetattr(&stdin).ok().inspect(|t| {
            let mut quiet = t.clone();
            quiet.local_modes.remove(termios::LocalModes::ECHO);
            let _ = termios::tcsetattr(&stdin, termios::OptionalActions::Now, &quiet);
        })
    } else {
        None
    };
    let mut line = Zeroizing::new(String::new());
    let r = stdin.lock().read_line(&mut line);
    if let Some(t) = saved {
        let _ = termios::tcsetattr(&stdin, termios::OptionalActions::Now, &t);
        eprintln!();
    }
    r.map_err(|source| KeyError::Unreadable {
        path: PathBuf::from("<stdin>"),
        source,
    })?;
    StorageKey::from_bytes(line.as_bytes(), "passphrase")
}

/// Writes a new random raw key to `path` (mode 0600 from the first byte,
/// refusing to overwrite) and returns it.
pub fn generate_key_file(path: &Path) -> Result<StorageKey, KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let key = StorageKey::generate()?;
    let text = key.to_file_contents().expect("raw");
    let io_err = |source| KeyError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err)?;
    f.write_all(text.as_bytes()).map_err(io_err)?;
    f.sync_all().map_err(io_err)?;
    Ok(key)
}

/// Is this file content a sealed private key?
pub fn is_sealed(pem: &[u8]) -> bool {
    let begin = format!("-----BEGIN {SEALED_LABEL}-----");
    std::str::from_utf8(pem).is_ok_and(|s| s.trim_start().starts_with(&begin))
}

/// Seals a PKCS#8 DER private key with the storage key (see the module
/// docs for the format). Returns the PEM text.
pub fn seal(pkcs8_der: &[u8], key: &StorageKey) -> Result<String, KeyError> {
    let rng = SystemRandom::new();
    let (kdf, iterations) = if key.raw {
        (KDF_HKDF, 0)
    } else {
        (KDF_PBKDF2, PASSPHRASE_ITERATIONS)
    };
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.push(VERSION);
    header.push(kdf);
    header.extend_from_slice(&iterations.to_be_bytes());
    let mut salt_nonce = [0u8; 28];
    rng.fill(&mut salt_nonce).map_err(|_| KeyError::Random)?;
    header.extend_from_slice(&salt_nonce);
    let (salt, nonce) = (&salt_nonce[..16], &salt_nonce[16..]);
    let aead_key = aead_key(&key.derive(kdf, iterations, salt));
    let mut body = Zeroizing::new(pkcs8_der.to_vec());
    aead_key
        .seal_in_place_append_tag(
            aead::Nonce::try_assume_unique_for_key(nonce).expect("12 bytes"),
            aead::Aad::from(&header),
            &mut *body,
        )
        .map_err(|_| KeyError::Random)?;
    let mut blob = header;
    blob.extend_from_slice(&body);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&blob);
    let mut pem = format!("-----BEGIN {SEALED_LABEL}-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {SEALED_LABEL}-----\n"));
    Ok(pem)
}

/// Opens a sealed private key (`path` names it in errors). Returns the
/// PKCS#8 DER, zeroed when dropped.
pub fn unseal(pem: &[u8], key: &StorageKey, path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let malformed = |reason: &str| KeyError::Malformed {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if !is_sealed(pem) {
        return Err(KeyError::NotSealed {
            path: path.to_path_buf(),
        });
    }
    let text = std::str::from_utf8(pem).map_err(|_| malformed("not UTF-8"))?;
    let b64: String = text
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    let blob = base64::engine::general_purpose::STANDARD
        .decode(b64.as_bytes())
        .map_err(|_| malformed("bad base64"))?;
    if blob.len() < HEADER_LEN + aead::AES_256_GCM.tag_len() {
        return Err(malformed("too short"));
    }
    let (header, sealed) = blob.split_at(HEADER_LEN);
    if &header[..4] != MAGIC || header[4] != VERSION {
        return Err(malformed("unknown format or version"));
    }
    let kdf = header[5];
    if kdf != KDF_HKDF && kdf != KDF_PBKDF2 {
        return Err(malformed("unknown key derivation"));
    }
    let iterations = u32::from_be_bytes(header[6..10].try_into().expect("4 bytes"));
    if kdf == KDF_PBKDF2 && !(1_000..=10_000_000).contains(&iterations) {
        return Err(malformed("iteration count out of range"));
    }
    let (salt, nonce) = (&header[10..26], &header[26..38]);
    let aead_key = aead_key(&key.derive(kdf, iterations, salt));
    let mut body = Zeroizing::new(sealed.to_vec());
    let plain_len = aead_key
        .open_in_place(
            aead::Nonce::try_assume_unique_for_key(nonce).expect("12 bytes"),
            aead::Aad::from(header),
            &mut body,
        )
        .map_err(|_| KeyError::WrongKey {
            path: path.to_path_buf(),
        })?
        .len();
    body.truncate(plain_len);
    Ok(body)
}

fn aead_key(k: &[u8; 32]) -> aead::LessSafeKey {
    aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, k).expect("32-byte key"))
}

/// Replaces the plain PKCS#8 PEM key at `path` with its sealed form,
/// atomically (temporary file, fsync, rename; 0600 from the first
/// byte). The plain file's blocks are overwritten with zeros first
/// through the old inode once the sealed file is in place.
pub fn seal_file(path: &Path, key: &StorageKey) -> Result<(), KeyError> {
    use rustls_pki_types::pem::PemObject;
    let io_err = |source| KeyError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    let pem = Zeroizing::new(fs::read(path).map_err(io_err)?);
    if is_sealed(&pem) {
        return Err(KeyError::Malformed {
            path: path.to_path_buf(),
            reason: "already sealed".into(),
        });
    }
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(&pem).map_err(|e| {
        KeyError::Malformed {
            path: path.to_path_buf(),
            reason: format!("no PKCS#8 PRIVATE KEY block ({e})"),
        }
    })?;
    let sealed = seal(der.secret_pkcs8_der(), key)?;
    // Keep the old inode to wipe it after the rename.
    let old = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err)?;
    crate::fsutil::write_atomic(path, sealed.as_bytes(), 0o600).map_err(io_err)?;
    wipe(old, pem.len());
    Ok(())
}

/// Re-seals the sealed private key at `path` from the storage key `old`
/// to `new`, atomically (key rotation, `kizuna store rekey`). A key
/// already sealed with `new` is left alone (`Ok(false)`), so an
/// interrupted rotation can simply be run again; neither key opening it
/// is [`KeyError::WrongKey`] with nothing changed.
pub fn reseal_file(path: &Path, old: &StorageKey, new: &StorageKey) -> Result<bool, KeyError> {
    let pem = Zeroizing::new(fs::read(path).map_err(|source| KeyError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?);
    if unseal(&pem, new, path).is_ok() {
        return Ok(false);
    }
    let der = unseal(&pem, old, path)?;
    let sealed = seal(&der, new)?;
    crate::fsutil::write_atomic(path, sealed.as_bytes(), 0o600).map_err(|source| {
        KeyError::Unreadable {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(true)
}

/// Best effort: overwrite a replaced secret's blocks with zeros (the file
/// system or flash may still keep copies; full-disk encryption covers
/// those).
fn wipe(mut f: fs::File, len: usize) {
    use std::io::Seek;
    let mut zeros = vec![0u8; len];
    let _ = f
        .seek(io::SeekFrom::Start(0))
        .and_then(|_| f.write_all(&zeros))
        .and_then(|_| f.sync_all());
    zeros.zeroize();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passphrase() -> StorageKey {
        StorageKey::from_bytes(b"correct horse battery staple\n", "test").unwrap()
    }

    #[test]
    fn key_material_forms() {
        let raw = StorageKey::from_bytes(&[b'a'; 64], "t").unwrap();
        assert!(raw.is_raw());
        assert_eq!(
            raw.sqlcipher_key().as_str(),
            format!("x'{}'", "a".repeat(64))
        );
        let upper =
            StorageKey::from_bytes(format!("{}\r\n", "AB".repeat(32)).as_bytes(), "t").unwrap();
        assert_eq!(
            upper.to_file_contents().unwrap().as_str(),
            format!("{}\n", "ab".repeat(32))
        );
        let p = passphrase();
        assert!(!p.is_raw());
        assert_eq!(p.sqlcipher_key().as_str(), "correct horse battery staple");
        for bad in [
            &b""[..],
            b"\n",
            b"short",
            b"with\0nul here",
            b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8",
        ] {
            assert!(StorageKey::from_bytes(bad, "t").is_err(), "{bad:?}");
        }
        assert!(!format!("{p:?}").contains("horse"));
        let g = StorageKey::generate().unwrap();
        let again = StorageKey::from_bytes(g.to_file_contents().unwrap().as_bytes(), "t").unwrap();
        assert_eq!(*g.material, *again.material);
    }

    #[test]
    fn reseal_moves_a_sealed_key_to_the_new_storage_key_once() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("node.key.pem");
        let (old, new, other) = (
            StorageKey::generate().unwrap(),
            StorageKey::generate().unwrap(),
            StorageKey::generate().unwrap(),
        );
        let secret = b"pkcs8 stand-in".to_vec();
        fs::write(&path, seal(&secret, &old).unwrap()).unwrap();
        assert!(matches!(
            reseal_file(&path, &other, &new),
            Err(KeyError::WrongKey { .. })
        ));
        assert!(reseal_file(&path, &old, &new).unwrap());
        let pem = fs::read(&path).unwrap();
        assert_eq!(&unseal(&pem, &new, &path).unwrap()[..], &secret[..]);
        assert!(unseal(&pem, &old, &path).is_err());
        // Run again (an interrupted rotation): nothing to do.
        assert!(!reseal_file(&path, &old, &new).unwrap());
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn seal_round_trip_and_wrong_key() {
        let der = b"not really pkcs8 but bytes all the same".to_vec();
        for key in [StorageKey::generate().unwrap(), passphrase()] {
            let pem = seal(&der, &key).unwrap();
            assert!(is_sealed(pem.as_bytes()));
            assert!(!pem.contains("really"));
            let back = unseal(pem.as_bytes(), &key, Path::new("k")).unwrap();
            assert_eq!(*back, der);
            let other = StorageKey::generate().unwrap();
            assert!(matches!(
                unseal(pem.as_bytes(), &other, Path::new("k")),
                Err(KeyError::WrongKey { .. })
            ));
            // Any flipped bit in the body (header included) is refused.
            let mut blob: Vec<u8> = pem.into_bytes();
            let i = blob.len() / 2;
            blob[i] = if blob[i] == b'A' { b'B' } else { b'A' };
            assert!(unseal(&blob, &key, Path::new("k")).is_err());
        }
    }

    #[test]
    fn key_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("storage.key");
        let err = read(&KeySource::File(path.clone())).unwrap_err();
        assert!(matches!(err, KeyError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("暗号鍵") && err.to_string().contains("missing"));
        let key = generate_key_file(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let back = read(&KeySource::File(path.clone())).unwrap();
        assert_eq!(*key.material, *back.material);
        assert!(generate_key_file(&path).is_err(), "never overwrites");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            read(&KeySource::File(path.clone())),
            Err(KeyError::InsecurePermissions { .. })
        ));
    }
}
