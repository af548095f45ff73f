//! Last-known peer addresses, kept in a small JSON file so a restarted node
//! dials the peers it knew even without mDNS or static configuration.
//!
//! Format: `{"version":1,"peers":{"<node-id>":"<ip:port>",...}}`. Only
//! addresses we dialed successfully are recorded (an incoming connection's
//! source port is not where the peer listens). A missing or unreadable file
//! is not an error: it only costs discovery time, so it is logged.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use crdt::NodeId;
use serde::{Deserialize, Serialize};

use super::{lock, Inner};

/// Larger files are ignored (a few thousand peers fit easily).
const MAX_FILE_BYTES: u64 = 1 << 20;
/// Entries kept at most.
const MAX_PEERS: usize = 4096;

#[derive(Serialize, Deserialize)]
struct KnownPeers {
    version: u32,
    peers: BTreeMap<NodeId, SocketAddr>,
}

pub(crate) fn load(path: &Path) -> BTreeMap<NodeId, SocketAddr> {
    let read = || -> anyhow::Result<BTreeMap<NodeId, SocketAddr>> {
        let len = std::fs::metadata(path)?.len();
        anyhow::ensure!(
            len <= MAX_FILE_BYTES,
            "file is {len} bytes; limit {MAX_FILE_BYTES}"
        );
        let parsed: KnownPeers = serde_json::from_slice(&std::fs::read(path)?)?;
        anyhow::ensure!(parsed.version == 1, "unknown version {}", parsed.version);
        Ok(parsed.peers.into_iter().take(MAX_PEERS).collect())
    };
    match read() {
        Ok(p) => p,
        Err(e) => {
            if path.exists() {
                tracing::warn!(file = %path.display(), error = %format!("{e:#}"), "ignoring known-peers file");
            }
            BTreeMap::new()
        }
    }
}

/// Record that `node` answered at `addr`, and persist (atomically) if new.
pub(crate) fn remember(inner: &Inner, node: &NodeId, addr: SocketAddr) {
    let Some(path) = &inner.known_file else {
        return;
    };
    let snapshot = {
        let mut known = lock(&inner.known);
        if known.get(node) == Some(&addr) || (known.len() >= MAX_PEERS && !known.contains_key(node))
        {
            return;
        }
        known.insert(node.clone(), addr);
        KnownPeers {
            version: 1,
            peers: known.clone(),
        }
    };
    let write = || -> anyhow::Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&snapshot)?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    };
    if let Err(e) = write() {
        tracing::warn!(file = %path.display(), error = %format!("{e:#}"), "could not save known peers");
    }
}
