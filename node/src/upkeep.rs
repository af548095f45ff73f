//! Background upkeep of a running node, for the operator:
//!
//! - **First sync progress.** Before the mesh starts the node logs how many
//!   households of the resident registry it holds ("registry held at
//!   start"; 0 on a new node), so a registry pulled from a peer always
//!   shows as growth. Then every [`PROGRESS_EVERY`] it reads its own status
//!   and, while the registry grows, logs how many households it holds and
//!   how fast they arrive ("registry sync: households held"). The same
//!   count is `documents_by_kind.registry` in `/api/v1/status` and
//!   `kizuna_documents{kind="registry"}` in the metrics.
//! - **Revocation lists handed in by the operator.** The node keeps the
//!   newest CRL it holds in `<data_dir>/crl.der`. An operator who copies a
//!   newer CRL from the CA over that file (`kizuna certs revoke` wrote it)
//!   needs no restart: the file is checked every [`PROGRESS_EVERY`], and a
//!   changed file is offered to the transport, which applies it if it is
//!   newer and valid, closes sessions with newly revoked peers and gossips
//!   it on. A stale or invalid file is logged and changes nothing.
//!
//! Both hold only a weak reference to the transport, so they never keep it
//! alive past the node's shutdown.

use crate::driver::DriverHandle;
use crate::net::Transport;
use crdt::api::{Query, QueryReply};
use crdt::Kind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

/// How often progress and the CRL file are checked.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Name of the node's stored CRL inside the data directory.
pub const CRL_FILE_NAME: &str = "crl.der";

/// Reads and logs the registry held now: call before the mesh starts, so
/// the first households a peer sends are reported as progress.
pub async fn registry_at_start(driver: &DriverHandle) -> Progress {
    let mut progress = Progress::default();
    if let Ok(QueryReply::Status(st)) = driver.query(Query::Status).await {
        progress.observe(registry_held(&st));
    }
    progress
}

fn registry_held(st: &crdt::api::Status) -> usize {
    st.documents_by_kind
        .get(&Kind::Registry)
        .copied()
        .unwrap_or(0)
}

/// Starts the upkeep task on the current tokio runtime, continuing from
/// `progress` ([`registry_at_start`]).
pub fn start(
    driver: &DriverHandle,
    transport: &Arc<Transport>,
    data_dir: &Path,
    mut progress: Progress,
) {
    let driver = driver.clone();
    let transport = Arc::downgrade(transport);
    let crl_path = data_dir.join(CRL_FILE_NAME);
    tokio::spawn(async move {
        let mut crl_seen = file_stamp(&crl_path);
        loop {
            tokio::time::sleep(PROGRESS_EVERY).await;
            if transport.strong_count() == 0 {
                return;
            }
            match driver.query(Query::Status).await {
                Ok(QueryReply::Status(st)) => progress.observe(registry_held(&st)),
                Ok(_) => {}
                Err(_) => return, // the engine has stopped
            }
            let stamp = file_stamp(&crl_path);
            if stamp != crl_seen {
                crl_seen = stamp;
                offer_crl_file(&transport, &crl_path);
            }
        }
    });
}

/// Registry sync progress between two observations.
#[derive(Default)]
pub struct Progress {
    last: Option<(usize, Instant)>,
}

impl Progress {
    fn observe(&mut self, households: usize) {
        let now = Instant::now();
        match self.last {
            None => {
                tracing::info!(households, "registry held at start");
            }
            Some((before, at)) if households != before => {
                let secs = now.duration_since(at).as_secs_f64().max(0.001);
                let added = households.saturating_sub(before);
                tracing::info!(
                    households,
                    added,
                    per_second = (added as f64 / secs).round() as u64,
                    "registry sync: households held"
                );
            }
            Some(_) => return,
        }
        self.last = Some((households, now));
    }
}

/// (modified time, length) of a file, `None` when it does not exist.
fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn offer_crl_file(transport: &Weak<Transport>, path: &PathBuf) {
    let Some(t) = transport.upgrade() else { return };
    let der = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the CRL file");
            return;
        }
    };
    match t.offer_crl(der) {
        Ok(certs::OfferOutcome::Applied {
            number,
            newly_revoked,
        }) => tracing::info!(
            crl_number = number,
            newly_revoked = newly_revoked.len(),
            "revocation list from the data directory applied and gossiped"
        ),
        Ok(certs::OfferOutcome::Stale { .. }) => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "revocation list file refused")
        }
    }
}
