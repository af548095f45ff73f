//! The node's revocation list on disk: saved atomically with the list it
//! replaced kept beside it, and read back fail-closed.
//!
//! Model: a node keeps the newest CRL it applied in its data directory
//! (`crl.der`) and the one before it (`crl.prev.der`), each replaced
//! atomically (temporary file, fsync, rename, directory fsync), so a crash
//! leaves a whole file. A stored list that no longer parses or verifies
//! (damaged disk, an operator's mistake) never leaves the node with no list
//! at all: [`load`] falls back to the previous list and says so, and when
//! neither is usable it refuses ([`CrlFileError::Damaged`]), so the node
//! does not start as if nothing were revoked (fail closed). The operator
//! then loads the CA's current list (`kizuna crl load`) or, knowingly,
//! removes the file. Lists offered at runtime go through
//! [`RevocationState::offer`], which never replaces the held list with a
//! rejected one.

use crate::crl::{CrlError, OfferOutcome, RevocationState};
use crate::fsutil::write_atomic;
use std::io;
use std::path::{Path, PathBuf};

/// The newest applied CRL, in the data directory.
pub const CRL_FILE: &str = "crl.der";
/// The CRL that [`CRL_FILE`] replaced.
pub const CRL_PREV_FILE: &str = "crl.prev.der";

/// What [`load`] put in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// No stored list: nothing is revoked as far as this node knows yet.
    Nothing,
    /// The stored list, number `number`.
    Current { number: u64 },
    /// `crl.der` was damaged (`reason`); the previous list `number` is in
    /// force instead.
    Previous { number: u64, reason: String },
}

/// Why the stored list cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CrlFileError {
    #[error("保存された失効リスト {} が壊れていて、以前のリストも使えません。失効を確認できないため起動しません / the stored revocation list {} is damaged ({reason}) and no previous list is usable; refusing to run without it (fail closed). Load the CA's current list: kizuna crl load --config FILE CRL (or remove the file to run with no list)", path.display(), path.display())]
    Damaged { path: PathBuf, reason: String },
    #[error("失効リスト {} を読めません / cannot read the revocation list {}: {source}", path.display(), path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// The previous-list path beside `current` (`crl.der` → `crl.prev.der`).
pub fn prev_path(current: &Path) -> PathBuf {
    let stem = current
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("crl");
    current.with_file_name(format!("{stem}.prev.der"))
}

fn read_opt(path: &Path) -> Result<Option<Vec<u8>>, CrlFileError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CrlFileError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn number_of(o: &OfferOutcome) -> u64 {
    match o {
        OfferOutcome::Applied { number, .. } => *number,
        OfferOutcome::Stale { held, .. } => *held,
    }
}

/// Offers the stored list at `current` (and, if it is damaged, the one at
/// [`prev_path`]) to `state`.
pub fn load(current: &Path, state: &RevocationState) -> Result<Loaded, CrlFileError> {
    let prev = prev_path(current);
    let damaged: String = match read_opt(current)? {
        Some(der) => match state.offer(&der) {
            Ok(o) => {
                return Ok(Loaded::Current {
                    number: number_of(&o),
                })
            }
            Err(e) => e.to_string(),
        },
        None => "missing".into(),
    };
    match read_opt(&prev)? {
        Some(der) => match state.offer(&der) {
            Ok(o) => Ok(Loaded::Previous {
                number: number_of(&o),
                reason: damaged,
            }),
            Err(e) => Err(CrlFileError::Damaged {
                path: current.to_path_buf(),
                reason: format!("{damaged}; previous list: {e}"),
            }),
        },
        // Neither file: a node that never held a list.
        None if damaged == "missing" => Ok(Loaded::Nothing),
        None => Err(CrlFileError::Damaged {
            path: current.to_path_buf(),
            reason: damaged,
        }),
    }
}

/// Writes `der` (the list now in force) to `current`, first keeping
/// `previous` (the list it replaced, if any) at [`prev_path`]. Both files
/// 0600, each replaced atomically.
pub fn save(current: &Path, der: &[u8], previous: Option<&[u8]>) -> io::Result<()> {
    if let Some(p) = previous {
        write_atomic(&prev_path(current), p, 0o600)?;
    }
    write_atomic(current, der, 0o600)
}

/// Validates `der` against `state` and, if it is newer, applies and saves
/// it (for a stopped node's data directory). A rejected list changes
/// nothing: the error says which list stays in force.
pub fn apply_and_save(
    current: &Path,
    state: &RevocationState,
    der: &[u8],
) -> Result<OfferOutcome, Rejected> {
    let before = state.current_der();
    let outcome = state.offer(der).map_err(|e| Rejected {
        error: e,
        kept: state.current_number(),
    })?;
    if let OfferOutcome::Applied { .. } = outcome {
        save(current, der, before.as_deref()).map_err(|e| Rejected {
            error: CrlError::Malformed(format!("cannot save {}: {e}", current.display())),
            kept: state.current_number(),
        })?;
    }
    Ok(outcome)
}

/// A list refused at load time, and the list that stays in force.
#[derive(Debug, thiserror::Error)]
#[error("{}", rejected_message(error, *kept))]
pub struct Rejected {
    pub error: CrlError,
    /// The CRL number still in force (`None`: no list held).
    pub kept: Option<u64>,
}

/// The bilingual refusal for a rejected list: what was wrong, and that the
/// list in force stays.
pub fn rejected_message(error: &CrlError, kept: Option<u64>) -> String {
    let kept_ja = match kept {
        Some(n) => format!("現在の失効リスト (番号 {n}) を維持します"),
        None => "失効リストは読み込まれていません".to_string(),
    };
    let kept_en = match kept {
        Some(n) => format!("the revocation list in force (CRL number {n}) is kept"),
        None => "no revocation list is held".to_string(),
    };
    format!("失効リストを拒否しました: {kept_ja} / revocation list rejected ({error}); {kept_en}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca;
    use crdt::{NodeId, Role};

    struct Pki {
        _d: tempfile::TempDir,
        ca_dir: PathBuf,
        node_dir: PathBuf,
        amb1: PathBuf,
    }

    fn pki() -> Pki {
        let d = tempfile::tempdir().unwrap();
        let ca_dir = d.path().join("ca");
        ca::init_ca(&ca_dir, "Test City").unwrap();
        for n in ["amb-1", "amb-2"] {
            ca::issue(
                &ca_dir,
                Role::Ambulance,
                &NodeId::new(n).unwrap(),
                &d.path().join(n),
                30,
            )
            .unwrap();
        }
        let node_dir = d.path().join("node");
        std::fs::create_dir(&node_dir).unwrap();
        Pki {
            amb1: d.path().join("amb-1"),
            ca_dir,
            node_dir,
            _d: d,
        }
    }

    fn state(p: &Pki) -> RevocationState {
        let creds = crate::creds::NodeCredentials::load_dir(&p.amb1).unwrap();
        RevocationState::new(creds.ca.clone())
    }

    fn revoke(p: &Pki, n: &str) -> Vec<u8> {
        let r = ca::revoke(&p.ca_dir, &NodeId::new(n).unwrap()).unwrap();
        std::fs::read(r.crl_path).unwrap()
    }

    #[test]
    fn saved_lists_survive_damage_and_damage_with_nothing_to_fall_back_on_refuses() {
        let p = pki();
        let cur = p.node_dir.join(CRL_FILE);
        // Nothing stored: nothing in force, no error.
        assert_eq!(load(&cur, &state(&p)).unwrap(), Loaded::Nothing);

        let one = revoke(&p, "amb-1");
        let s = state(&p);
        apply_and_save(&cur, &s, &one).unwrap();
        let two = revoke(&p, "amb-2");
        apply_and_save(&cur, &s, &two).unwrap();
        assert_eq!(std::fs::read(&cur).unwrap(), two);
        assert_eq!(std::fs::read(prev_path(&cur)).unwrap(), one);
        use std::os::unix::fs::PermissionsExt;
        for f in [&cur, &prev_path(&cur)] {
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", f.display());
        }
        assert_eq!(
            load(&cur, &state(&p)).unwrap(),
            Loaded::Current { number: 2 }
        );

        // A truncated current list: the previous one is in force, and the
        // result says so.
        std::fs::write(&cur, &two[..two.len() / 2]).unwrap();
        let s = state(&p);
        match load(&cur, &s).unwrap() {
            Loaded::Previous { number: 1, reason } => assert!(reason.contains("DER"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(s.current_number() == Some(1));

        // Both damaged: refused (fail closed), with the remedy named.
        std::fs::write(prev_path(&cur), b"garbage").unwrap();
        let e = load(&cur, &state(&p)).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("fail closed") && m.contains("壊れて"), "{m}");
        assert!(m.contains("kizuna crl load"), "{m}");
    }

    #[test]
    fn a_rejected_list_changes_nothing_and_names_the_list_kept() {
        let p = pki();
        let cur = p.node_dir.join(CRL_FILE);
        let one = revoke(&p, "amb-1");
        let s = state(&p);
        apply_and_save(&cur, &s, &one).unwrap();
        let mut bad = revoke(&p, "amb-2");
        let n = bad.len();
        bad[n - 5] ^= 0xff; // signature no longer verifies
        let e = apply_and_save(&cur, &s, &bad).unwrap_err();
        assert_eq!(e.kept, Some(1));
        let m = e.to_string();
        assert!(m.contains("番号 1") && m.contains("CRL number 1"), "{m}");
        assert_eq!(s.current_number(), Some(1));
        assert_eq!(std::fs::read(&cur).unwrap(), one, "file unchanged");
        assert!(!prev_path(&cur).exists());
    }
}
