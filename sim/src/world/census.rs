//! A census of what the world holds in memory, by part: every engine's
//! in-memory state (`crdt::engine::Footprint`, entries summed over nodes,
//! with the largest node's count), every store's tables, and the event
//! queue. Printed every `--census-hours` simulated hours, so a run that
//! grows shows which part grows with time or with sessions. Reads only:
//! the run and its trace hash are the same with or without it.

use super::*;

impl World {
    /// One line: `name=sum/max-per-node` for each part, then the process
    /// resident memory.
    pub fn census(&self) -> String {
        let mut parts: BTreeMap<&'static str, (u64, u64)> = BTreeMap::new();
        let mut add = |name: &'static str, n: usize| {
            let e = parts.entry(name).or_default();
            e.0 += n as u64;
            e.1 = e.1.max(n as u64);
        };
        for node in &self.nodes {
            let stores: Vec<&SimStore> = node
                .engine
                .as_ref()
                .map(|e| e.store())
                .into_iter()
                .chain(node.parked.as_ref())
                .collect();
            if let Some(e) = &node.engine {
                let f = e.footprint();
                let z = &f.sessions;
                add("sessions", z.open);
                add("seen", z.seen);
                add("pushed", z.pushed);
                add("creds_sent", z.creds_sent);
                add("outq", z.outq);
                add("announce", z.announce);
                add("wanted", z.wanted);
                add("pending", z.pending);
                add("pending_hashes", z.pending_hashes);
                add("grafted", z.grafted);
                add("poisoned", z.poisoned);
                add("peers", z.peers);
                add("backoff", z.backoff);
                add("directory", f.directory);
                add("index", f.index);
                add("cache_docs", f.cache.docs);
                add("cache_held", f.cache.held);
                add("cache_pinned", f.cache.pinned);
                add("cache_order", f.cache.order);
                add("unsettled", f.unsettled);
                add("mail_states", f.mail_states);
            }
            for s in stores {
                let m = &s.mem;
                add("st_log", m.log.len());
                add("st_hashes", m.hashes.len());
                add("st_docs", m.docs.len());
                add("st_projections", m.projections.len());
                add("st_peer_heads", m.peer_heads.len());
                add(
                    "st_peer_heads_hashes",
                    m.peer_heads.values().map(Vec::len).sum(),
                );
                add("st_cursors", m.cursors.len());
                add("st_credentials", m.credentials.len());
                add("st_ops", m.ops.len());
                add("st_quarantine", m.quarantine.len());
            }
            if let Some((b, ..)) = &node.backup {
                add("backups", 1);
                add("bk_log", b.mem.log.len());
                add("bk_peer_heads", b.mem.peer_heads.len());
            }
        }
        let (mut frames, mut bytes, mut decoded) = (0usize, 0usize, 0usize);
        for ev in self.queue.values() {
            if let Ev::Deliver {
                bytes: b, changes, ..
            } = ev
            {
                frames += 1;
                bytes += b.len();
                decoded += changes.is_some() as usize;
            }
        }
        add("q_events", self.queue.len());
        add("q_frames", frames);
        add("q_bytes", bytes);
        add("q_decoded", decoded);
        add("first_replies", self.first_replies.len());
        let mut line = format!(
            "census t={:.2}h rss={:.2}GiB",
            self.now as f64 / 3_600_000.0,
            run::rss() as f64 / (1u64 << 30) as f64
        );
        for (name, (sum, max)) in parts {
            line.push_str(&format!(" {name}={sum}/{max}"));
        }
        line
    }
}
