//! Sessions with peers: the sync protocol as the engine runs it.
//!
//! A session is one ordered, breakable stream with one peer. It opens with
//! `Hello` (protocol version, identity, and the receiver-held [`Cursor`]:
//! how far into the peer's change log we already hold everything). Each
//! side checks the cursor it was given against its own log and answers
//! `Resume { ok }`:
//!
//! - **Resume** (peers met before): the side streams its change log from
//!   the cursor, filtered by what the peer may hold, in frames that carry
//!   the log position they complete (`upto`). The receiver stores that
//!   position in the same transaction as the changes, so it rolls back with
//!   them; a sender restored from an old backup fails the hash check. No
//!   reconciliation is needed at all.
//! - **Reconcile** (first meeting, or a cursor refused either way): the
//!   dialing side runs range-based set reconciliation over the documents
//!   both roles may receive. Turns alternate; a turn is one or more
//!   `Reconcile` frames, the last with `more: false`. Ranges whose
//!   fingerprints (sum of item hashes) match are done; a differing range is
//!   split 16-way until it holds at most 32 items, which are then listed
//!   with their heads (stage 0). For each differing document, a side that
//!   knows all of the other's heads sends exactly the changes the other
//!   lacks; otherwise it answers with its own heads (stage 1, then 2), and
//!   only for truly concurrent histories sends a superset. An empty turn
//!   ends the exchange. Documents only the peer may hold (a node's own audit
//!   chain for headquarters) are offered one by one in each side's first
//!   turn.
//!
//! Either way, once a side has caught up (stream read to the end, or the
//! exchange over and its send queue empty), every new change is pushed to
//! the peer as it is committed, and those frames carry the new log end as
//! `upto`, so the next session resumes from there. Catch-up sends are
//! drained a bounded number of frames per input (memory stays bounded).

use crate::actor::Actor;
use crate::api::{Now, Output, SessionId, UiEvent};
use crate::derive;
use crate::doc::{parse_change, Doc, DocError, Hash32};
use crate::engine::{may_send, Engine, IndexEntry, Txn};
use crate::ids::{DocKey, NodeId, Role};
use crate::policy;
use crate::share::Applied;
use crate::store::{Batch, Cursor, Store};
use crate::wire::{self, DocChanges, Frame, Item, Range, RangeBody};
use automerge::Change;
use rustc_hash::FxHashSet;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Ranges with at most this many items are listed item by item.
const ITEMS_THRESHOLD: usize = 32;
/// A larger differing range is split into this many parts.
const SPLIT: usize = 16;
/// Frames of catch-up changes emitted per session per input.
const FRAMES_PER_DRAIN: usize = 8;
/// Log entries read per step when streaming.
const STREAM_READ: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Waiting for the peer's `Hello`.
    Opening,
    /// Streaming our log after sequence number `base`. The urgent pass
    /// (presence and medical only, so they cross a thin link first) reads
    /// to the end, then the full pass reads again from `base` and sends the
    /// rest, claiming log positions as it goes. `pos` is where the current
    /// pass is.
    Stream { base: u64, pos: u64, urgent: bool },
    /// Reconciling; our catch-up sends are in `outq`.
    Reconcile,
    /// Caught up: new changes are pushed as they are committed.
    Live,
}

pub(crate) struct Session {
    pub(crate) node: NodeId,
    pub(crate) role: Role,
    pub(crate) initiator: bool,
    pub(crate) hello: bool,
    pub(crate) peer_incarnation: u32,
    pub(crate) mode: Mode,
    /// Our verdict on the peer's cursor, and theirs on ours.
    my_verdict: Option<bool>,
    peer_verdict: Option<bool>,
    /// The reconciliation exchange: started, finished.
    exchange_started: bool,
    exchange_over: bool,
    /// Our own one-way documents were offered.
    offered_own: bool,
    /// Reply ranges accumulated while a peer's turn arrives in parts.
    reply_buf: Vec<Range>,
    turn_received: usize,
    /// Documents the peer lacks changes of, by priority, with the heads
    /// it reported (empty when it does not have the document).
    pub(crate) outq: BTreeMap<(u8, DocKey), Vec<Hash32>>,
    /// Change hashes this session is known to have (sent or received).
    pub(crate) seen: FxHashSet<Hash32>,
    /// The last log position we told the peer it holds.
    pub(crate) upto_sent: u64,
}

impl Session {
    pub(crate) fn new(node: NodeId, role: Role, initiator: bool) -> Session {
        Session {
            node,
            role,
            initiator,
            hello: false,
            peer_incarnation: 0,
            mode: Mode::Opening,
            my_verdict: None,
            peer_verdict: None,
            exchange_started: false,
            exchange_over: false,
            offered_own: false,
            reply_buf: Vec::new(),
            turn_received: 0,
            outq: BTreeMap::new(),
            seen: FxHashSet::default(),
            upto_sent: 0,
        }
    }

    /// Caught up: the peer holds (or was sent) everything of our log it
    /// may hold, so pushes may carry `upto`.
    pub(crate) fn is_live(&self) -> bool {
        self.mode == Mode::Live
    }
}

/// The key under which we remember a peer's heads: per incarnation, so a
/// peer restored from a backup is not assumed to hold what it lost.
fn peer_heads_key(node: &NodeId, incarnation: u32) -> Option<NodeId> {
    NodeId::new(format!("{node}.i{incarnation}")).ok()
}

/// Splits documents into frames of about `TARGET_FRAME_BYTES`, in order.
pub(crate) fn chunk_docs(docs: Vec<DocChanges>) -> Vec<Vec<DocChanges>> {
    let mut frames: Vec<Vec<DocChanges>> = vec![vec![]];
    let mut size = 0;
    for d in docs {
        let n: usize = d.changes.iter().map(Vec::len).sum::<usize>() + 48;
        let last = frames.last().expect("one frame");
        if !last.is_empty()
            && (size + n > wire::TARGET_FRAME_BYTES || last.len() >= wire::MAX_DOCS_PER_FRAME)
        {
            frames.push(vec![]);
            size = 0;
        }
        size += n;
        frames.last_mut().expect("one frame").push(d);
    }
    frames
}

/// A document listed more than once in a frame (a log streamed in order
/// interleaves documents) as one entry with all its changes, at its first
/// place: its later changes must build on its earlier ones, which are not
/// committed (nor, with many documents between, still cached) yet.
fn merge_by_key(docs: Vec<DocChanges>) -> Vec<DocChanges> {
    let mut first: rustc_hash::FxHashMap<&DocKey, usize> = Default::default();
    let repeated = docs
        .iter()
        .enumerate()
        .any(|(i, d)| *first.entry(&d.key).or_insert(i) != i);
    if !repeated {
        return docs;
    }
    let mut at: rustc_hash::FxHashMap<DocKey, usize> = Default::default();
    let mut out: Vec<DocChanges> = Vec::new();
    for d in docs {
        match at.get(&d.key) {
            Some(&i) => out[i].changes.extend(d.changes),
            None => {
                at.insert(d.key.clone(), out.len());
                out.push(d);
            }
        }
    }
    out
}

fn short_digest(heads: &[Hash32]) -> [u8; 8] {
    let d = crate::doc::heads_digest(heads);
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

impl<S: Store> Engine<S> {
    /// On a tick: tell live peers how far into our log they are.
    pub(crate) fn tick_cursors(&mut self, out: &mut Vec<Output>) {
        let Some(end) = self.log_end else { return };
        let due: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.is_live() && s.upto_sent < end.seq)
            .map(|(k, _)| *k)
            .collect();
        for sid in due {
            self.sessions.get_mut(&sid).expect("present").upto_sent = end.seq;
            self.send(
                sid,
                &Frame::Changes {
                    docs: vec![],
                    upto: Some(end),
                },
                out,
            );
        }
    }

    pub(crate) fn send(&mut self, session: SessionId, f: &Frame, out: &mut Vec<Output>) {
        match wire::encode(f) {
            Ok(b) => {
                self.stats.frames_sent += 1;
                self.stats.bytes_sent += b.len() as u64 + 4;
                out.push(Output::Send { session, bytes: b });
            }
            Err(e) => out.push(Output::Close {
                session,
                reason: format!("internal: {e}"),
            }),
        }
    }

    fn bye(&mut self, session: SessionId, code: u16, reason: String, out: &mut Vec<Output>) {
        let f = Frame::Bye {
            code,
            reason: reason.chars().take(200).collect(),
        };
        self.send(session, &f, out);
        out.push(Output::Close { session, reason });
        self.sessions.remove(&session);
    }

    fn violation(&mut self, session: SessionId, reason: String, out: &mut Vec<Output>) {
        self.stats.violations += 1;
        if let Some(s) = self.sessions.get(&session) {
            out.push(Output::Event(UiEvent::PeerViolation {
                node_id: s.node.clone(),
                reason,
            }));
        }
    }

    pub(crate) fn connected(
        &mut self,
        sid: SessionId,
        node: NodeId,
        role: Role,
        initiator: bool,
        out: &mut Vec<Output>,
    ) {
        self.peers.entry(node.clone()).or_insert((role, None)).0 = role;
        let resume = self.store.sync_cursor(&node).ok().flatten();
        self.sessions
            .insert(sid, Session::new(node, role, initiator));
        let hello = Frame::Hello {
            version: wire::PROTOCOL_VERSION,
            node: self.cfg.node_id.clone(),
            role: self.cfg.role,
            incarnation: self.meta.incarnation,
            resume,
        };
        self.send(sid, &hello, out);
    }

    pub(crate) fn frame(&mut self, sid: SessionId, bytes: &[u8], now: Now, out: &mut Vec<Output>) {
        let Some(s) = self.sessions.get(&sid) else {
            return;
        };
        let (peer, peer_role) = (s.node.clone(), s.role);
        let f = match wire::decode(bytes) {
            Ok(f) => f,
            Err(e) => return self.bye(sid, wire::BYE_PROTOCOL, e.to_string(), out),
        };
        if let Some(p) = self.peers.get_mut(&peer) {
            p.1 = Some(now.wall_ms);
        }
        match f {
            Frame::Hello {
                version,
                node,
                role,
                incarnation,
                resume,
            } => {
                if version != wire::PROTOCOL_VERSION {
                    let why = format!("protocol version {version} is not supported (this node speaks {}); upgrade needed", wire::PROTOCOL_VERSION);
                    return self.bye(sid, wire::BYE_VERSION, why, out);
                }
                if node != peer || role != peer_role {
                    let why = format!(
                        "hello names {node} ({role}) but the certificate says {peer} ({peer_role})"
                    );
                    return self.bye(sid, wire::BYE_IDENTITY, why, out);
                }
                // Is the peer's cursor a position in our own log?
                let ok =
                    resume.is_some_and(|c| self.store.log_at(c.seq).ok().flatten() == Some(c.hash));
                let s = self.sessions.get_mut(&sid).expect("checked");
                s.hello = true;
                s.peer_incarnation = incarnation;
                s.my_verdict = Some(ok);
                s.mode = match (ok, resume) {
                    (true, Some(c)) => Mode::Stream {
                        base: c.seq,
                        pos: c.seq,
                        urgent: true,
                    },
                    _ => Mode::Reconcile,
                };
                self.send(sid, &Frame::Resume { ok }, out);
                self.maybe_start_exchange(sid, out);
            }
            _ if !self.sessions[&sid].hello => {
                self.bye(sid, wire::BYE_PROTOCOL, "frame before hello".into(), out)
            }
            Frame::Resume { ok } => {
                self.sessions.get_mut(&sid).expect("checked").peer_verdict = Some(ok);
                self.maybe_start_exchange(sid, out);
            }
            Frame::Reconcile { ranges, more } => self.reconcile(sid, ranges, more, out),
            Frame::Changes { docs, upto } => self.receive(sid, docs, upto, now, out),
            Frame::Bye { code, reason } => {
                out.push(Output::Close {
                    session: sid,
                    reason: format!("peer closed ({code}): {reason}"),
                });
                self.sessions.remove(&sid);
            }
        }
    }

    /// The dialing side starts reconciliation once both verdicts are known
    /// and either cursor was refused (or absent).
    fn maybe_start_exchange(&mut self, sid: SessionId, out: &mut Vec<Output>) {
        let s = &self.sessions[&sid];
        let (Some(mine), Some(theirs)) = (s.my_verdict, s.peer_verdict) else {
            return;
        };
        if !s.initiator || s.exchange_started || (mine && theirs) {
            return;
        }
        let role = s.role;
        let mut ranges = vec![self.describe(role, None, None)];
        ranges.extend(self.own_offers(sid));
        let s = self.sessions.get_mut(&sid).expect("present");
        s.exchange_started = true;
        self.send_turn(sid, ranges, out);
    }

    /// Documents only the peer may receive from us (our own audit chain
    /// for headquarters), offered item by item, once per session.
    fn own_offers(&mut self, sid: SessionId) -> Vec<Range> {
        let s = self.sessions.get_mut(&sid).expect("present");
        if s.offered_own {
            return vec![];
        }
        s.offered_own = true;
        let (peer, role) = (s.node.clone(), s.role);
        self.index
            .iter()
            .filter(|(k, _)| !self.shared(role, k) && may_send(role, &peer, k))
            .map(|(k, e)| Range {
                lo: Some(k.clone()),
                hi: Some(k.clone()),
                body: RangeBody::Items {
                    items: vec![Item {
                        key: k.clone(),
                        heads: e.heads.clone(),
                    }],
                    stage: 1,
                },
            })
            .collect()
    }

    /// Sends one turn: the ranges split over frames, the last `more: false`.
    fn send_turn(&mut self, sid: SessionId, ranges: Vec<Range>, out: &mut Vec<Output>) {
        let chunks: Vec<Vec<Range>> = if ranges.is_empty() {
            vec![vec![]]
        } else {
            ranges
                .chunks(wire::MAX_RANGES_PER_FRAME / 4)
                .map(<[Range]>::to_vec)
                .collect()
        };
        let n = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            self.send(
                sid,
                &Frame::Reconcile {
                    ranges: chunk,
                    more: i + 1 < n,
                },
                out,
            );
        }
    }

    /// Documents both ends may receive take part in reconciliation.
    pub(crate) fn shared(&self, peer_role: Role, key: &DocKey) -> bool {
        policy::may_receive(self.cfg.role, key) && policy::may_receive(peer_role, key)
    }

    fn range_items(
        &self,
        peer_role: Role,
        lo: &Option<DocKey>,
        hi: &Option<DocKey>,
    ) -> Vec<(&DocKey, &IndexEntry)> {
        use std::ops::Bound::*;
        if let (Some(l), Some(h)) = (lo, hi) {
            if l >= h {
                return vec![];
            }
        }
        let lo_b = lo.as_ref().map_or(Unbounded, Included);
        let hi_b = hi.as_ref().map_or(Unbounded, Excluded);
        self.index
            .range::<_, DocKey>((lo_b, hi_b))
            .filter(|(k, _)| self.shared(peer_role, k))
            .collect()
    }

    fn fingerprint(items: &[(&DocKey, &IndexEntry)]) -> RangeBody {
        let sum = items.iter().fold(0u128, |a, (_, e)| a.wrapping_add(e.fp));
        RangeBody::Fingerprint {
            fp: sum.to_le_bytes(),
            count: items.len() as u32,
        }
    }

    /// Our side of a range: its item list when small, else a fingerprint.
    fn describe(&self, role: Role, lo: Option<DocKey>, hi: Option<DocKey>) -> Range {
        let items = self.range_items(role, &lo, &hi);
        let body = if items.len() <= ITEMS_THRESHOLD {
            RangeBody::Digests {
                items: items
                    .iter()
                    .map(|(k, e)| ((*k).clone(), short_digest(&e.heads)))
                    .collect(),
            }
        } else {
            Self::fingerprint(&items)
        };
        Range { lo, hi, body }
    }

    /// May this document be exchanged with the peer at all?
    fn exchangeable(&self, role: Role, peer: &NodeId, key: &DocKey) -> bool {
        policy::may_hold(self.cfg.role, &self.cfg.node_id, key) && may_send(role, peer, key)
    }

    fn knows_all(&mut self, key: &DocKey, heads: &[Hash32]) -> bool {
        if let Some(e) = self.index.get(key) {
            if heads.iter().all(|h| e.heads.contains(h)) {
                return true;
            }
        }
        match self.load(key) {
            Ok(Some(d)) => heads.iter().all(|h| d.knows(h)),
            _ => false,
        }
    }

    fn reconcile(&mut self, sid: SessionId, ranges: Vec<Range>, more: bool, out: &mut Vec<Output>) {
        let (peer, role, inc) = {
            let s = self.sessions.get_mut(&sid).expect("present");
            s.exchange_started = true;
            s.turn_received += ranges.len();
            (s.node.clone(), s.role, s.peer_incarnation)
        };
        let mut reply: Vec<Range> = Vec::new();
        let mut to_send: Vec<(DocKey, Vec<Hash32>)> = Vec::new();
        let mut learned: Vec<(DocKey, Vec<Hash32>)> = Vec::new();
        for r in ranges {
            match r.body {
                RangeBody::Fingerprint { fp, count } => {
                    let items = self.range_items(role, &r.lo, &r.hi);
                    if Self::fingerprint(&items) == (RangeBody::Fingerprint { fp, count }) {
                        continue;
                    }
                    if items.len() <= ITEMS_THRESHOLD {
                        reply.push(self.describe(role, r.lo, r.hi));
                        continue;
                    }
                    let keys: Vec<DocKey> = items.iter().map(|(k, _)| (*k).clone()).collect();
                    let chunk = keys.len().div_ceil(SPLIT);
                    let mut bounds: Vec<Option<DocKey>> = vec![r.lo.clone()];
                    bounds.extend(
                        (chunk..keys.len())
                            .step_by(chunk)
                            .map(|i| Some(keys[i].clone())),
                    );
                    bounds.push(r.hi.clone());
                    for w in bounds.windows(2) {
                        let sub = self.range_items(role, &w[0], &w[1]);
                        reply.push(Range {
                            lo: w[0].clone(),
                            hi: w[1].clone(),
                            body: Self::fingerprint(&sub),
                        });
                    }
                }
                RangeBody::Digests { items } => {
                    let theirs: BTreeMap<DocKey, [u8; 8]> = items
                        .into_iter()
                        .filter(|(k, _)| self.exchangeable(role, &peer, k))
                        .collect();
                    let mut want = Vec::new();
                    for (k, e) in self.range_items(role, &r.lo, &r.hi) {
                        match theirs.get(k) {
                            None => to_send.push((k.clone(), vec![])),
                            Some(d) if *d == short_digest(&e.heads) => {}
                            Some(_) => want.push(Item {
                                key: k.clone(),
                                heads: e.heads.clone(),
                            }),
                        }
                    }
                    for k in theirs.keys() {
                        if !self.index.contains_key(k) {
                            want.push(Item {
                                key: k.clone(),
                                heads: vec![],
                            });
                        }
                    }
                    if !want.is_empty() {
                        reply.push(Range {
                            lo: r.lo,
                            hi: r.hi,
                            body: RangeBody::Items {
                                items: want,
                                stage: 1,
                            },
                        });
                    }
                }
                RangeBody::Items { items, stage } => {
                    let mut want = Vec::new();
                    let items: Vec<Item> = items
                        .into_iter()
                        .filter(|i| self.exchangeable(role, &peer, &i.key))
                        .collect();
                    for i in items {
                        let (k, h) = (i.key, i.heads);
                        let mine = self.index.get(&k).map(|e| e.heads.clone());
                        if mine.as_ref() == Some(&h) {
                            continue;
                        }
                        if !h.is_empty() {
                            learned.push((k.clone(), h.clone()));
                        }
                        if mine.is_some() && self.knows_all(&k, &h) {
                            // We hold all they have: send exactly what they lack.
                            to_send.push((k, h));
                            continue;
                        }
                        match stage {
                            // They may simply be ahead: show our heads first.
                            1 => want.push(Item {
                                key: k,
                                heads: mine.unwrap_or_default(),
                            }),
                            // Neither knows the other's heads: concurrent
                            // histories. Send a superset, and at stage 2 ask
                            // for theirs.
                            _ => {
                                if mine.is_some() {
                                    to_send.push((k.clone(), h));
                                }
                                if stage == 2 {
                                    want.push(Item {
                                        key: k,
                                        heads: mine.unwrap_or_default(),
                                    });
                                }
                            }
                        }
                    }
                    if !want.is_empty() && stage < 3 {
                        reply.push(Range {
                            lo: r.lo,
                            hi: r.hi,
                            body: RangeBody::Items {
                                items: want,
                                stage: stage + 1,
                            },
                        });
                    }
                }
            }
        }
        if let Some(key) = peer_heads_key(&peer, inc) {
            if !learned.is_empty() {
                let peer_heads = learned
                    .into_iter()
                    .map(|(k, h)| (key.clone(), k, h))
                    .collect();
                let _ = self.store.commit(&Batch {
                    peer_heads,
                    ..Default::default()
                });
            }
        }
        let own = self.own_offers(sid);
        let s = self.sessions.get_mut(&sid).expect("present");
        for (k, h) in to_send {
            if may_send(role, &peer, &k) {
                s.outq.insert((k.kind.priority(), k), h);
            }
        }
        s.reply_buf.extend(reply);
        s.reply_buf.extend(own);
        if more {
            return;
        }
        // The peer's turn is complete: answer with ours, or end the exchange.
        let reply = std::mem::take(&mut s.reply_buf);
        let received = std::mem::take(&mut s.turn_received);
        if reply.is_empty() {
            s.exchange_over = true;
            if received > 0 {
                self.send_turn(sid, vec![], out);
            }
        } else {
            self.send_turn(sid, reply, out);
        }
    }

    /// Emits catch-up changes, highest priority first, a bounded number of
    /// frames per session per input, and moves sessions to live mode
    /// when they have caught up.
    pub(crate) fn drain(&mut self, out: &mut Vec<Output>) {
        let sids: Vec<SessionId> = self.sessions.keys().copied().collect();
        for sid in sids {
            if self.sessions.get(&sid).is_some_and(|s| !s.outq.is_empty()) {
                self.drain_queue(sid, out);
            }
            let Some(s) = self.sessions.get(&sid) else {
                continue;
            };
            match s.mode {
                Mode::Stream { base, pos, urgent } => {
                    self.drain_stream(sid, base, pos, urgent, out)
                }
                Mode::Reconcile if s.exchange_over && s.outq.is_empty() => {
                    // Everything we held at the start is equal at the peer or
                    // was sent; everything since was pushed live.
                    self.go_live(sid, out);
                }
                _ => {}
            }
        }
    }

    fn go_live(&mut self, sid: SessionId, out: &mut Vec<Output>) {
        let end = self.log_end;
        let s = self.sessions.get_mut(&sid).expect("present");
        s.mode = Mode::Live;
        if let Some(c) = end {
            if c.seq > s.upto_sent {
                s.upto_sent = c.seq;
                self.send(
                    sid,
                    &Frame::Changes {
                        docs: vec![],
                        upto: Some(c),
                    },
                    out,
                );
            }
        }
    }

    fn drain_stream(
        &mut self,
        sid: SessionId,
        base: u64,
        mut pos: u64,
        mut urgent: bool,
        out: &mut Vec<Output>,
    ) {
        let (peer, role) = {
            let s = &self.sessions[&sid];
            (s.node.clone(), s.role)
        };
        let mut frames = 0;
        while frames < FRAMES_PER_DRAIN {
            let entries = match self.store.log_since(pos, STREAM_READ) {
                Ok(e) => e,
                Err(_) => return,
            };
            let Some((last_seq, last)) = entries.last().map(|(n, c)| (*n, c.hash)) else {
                if urgent {
                    // Urgent pass done: now everything, from the start.
                    urgent = false;
                    pos = base;
                    self.sessions.get_mut(&sid).expect("present").mode =
                        Mode::Stream { base, pos, urgent };
                    continue;
                }
                return self.go_live(sid, out);
            };
            let s = self.sessions.get_mut(&sid).expect("present");
            let mut docs: Vec<DocChanges> = Vec::new();
            for (_, c) in entries {
                let is_urgent = matches!(
                    c.key.kind,
                    crate::ids::Kind::Presence | crate::ids::Kind::Medical
                );
                if (urgent && !is_urgent)
                    || !may_send(role, &peer, &c.key)
                    || !s.seen.insert(c.hash)
                {
                    continue;
                }
                match docs.last_mut() {
                    Some(d) if d.key == c.key => d.changes.push(c.bytes),
                    _ => docs.push(DocChanges {
                        key: c.key,
                        changes: vec![c.bytes],
                    }),
                }
            }
            pos = last_seq;
            s.mode = Mode::Stream { base, pos, urgent };
            // Only the full pass may claim a log position: the urgent pass
            // skipped the other kinds.
            let upto = (!urgent).then_some(Cursor {
                seq: last_seq,
                hash: last,
            });
            if let Some(c) = upto {
                s.upto_sent = c.seq;
            }
            if docs.is_empty() && upto.is_none() {
                continue;
            }
            let chunks = chunk_docs(docs);
            let n = chunks.len();
            for (i, docs) in chunks.into_iter().enumerate() {
                let upto = if i + 1 == n { upto } else { None };
                self.send(sid, &Frame::Changes { docs, upto }, out);
                frames += 1;
            }
        }
    }

    fn drain_queue(&mut self, sid: SessionId, out: &mut Vec<Output>) {
        let (peer, inc) = {
            let s = &self.sessions[&sid];
            (s.node.clone(), s.peer_incarnation)
        };
        let hint_key = peer_heads_key(&peer, inc);
        let mut frames = 0;
        let mut docs: Vec<DocChanges> = Vec::new();
        let mut size = 0usize;
        while frames < FRAMES_PER_DRAIN {
            let Some(((_, key), their)) =
                self.sessions.get_mut(&sid).and_then(|s| s.outq.pop_first())
            else {
                break;
            };
            let mut base = their;
            if let Some(Ok(Some(h))) = hint_key.as_ref().map(|p| self.store.peer_heads(p, &key)) {
                base.extend(h);
            }
            let changes = match self.load(&key) {
                Ok(Some(doc)) => doc.changes_since(&base),
                _ => continue,
            };
            let s = self.sessions.get_mut(&sid).expect("present");
            let bytes: Vec<Vec<u8>> = changes
                .into_iter()
                .filter(|c| s.seen.insert(c.hash().0))
                .map(|c| c.raw_bytes().to_vec())
                .collect();
            if bytes.is_empty() {
                continue;
            }
            size += bytes.iter().map(Vec::len).sum::<usize>() + 48;
            docs.push(DocChanges {
                key,
                changes: bytes,
            });
            if size >= wire::TARGET_FRAME_BYTES || docs.len() >= wire::MAX_DOCS_PER_FRAME {
                self.send(
                    sid,
                    &Frame::Changes {
                        docs: std::mem::take(&mut docs),
                        upto: None,
                    },
                    out,
                );
                size = 0;
                frames += 1;
            }
        }
        if !docs.is_empty() {
            self.send(sid, &Frame::Changes { docs, upto: None }, out);
        }
    }

    /// Applies changes from a peer after checking, at this hop, that the
    /// peer may hold each document and each change's author may write it.
    /// A frame's `upto` is stored with the changes it completes.
    fn receive(
        &mut self,
        sid: SessionId,
        docs: Vec<DocChanges>,
        upto: Option<Cursor>,
        now: Now,
        out: &mut Vec<Output>,
    ) {
        let (peer, role) = {
            let s = &self.sessions[&sid];
            (s.node.clone(), s.role)
        };
        let mut txn = Txn::default();
        for dc in merge_by_key(docs) {
            let key = dc.key;
            if !policy::may_hold(self.cfg.role, &self.cfg.node_id, &key)
                || !policy::may_hold(role, &peer, &key)
            {
                self.stats.changes_rejected += dc.changes.len() as u64;
                self.violation(
                    sid,
                    format!("sent {key}, which its role or ours may not hold"),
                    out,
                );
                continue;
            }
            let parsed: Result<Vec<Arc<Change>>, String> = dc
                .changes
                .iter()
                .map(|b| {
                    let c = match &self.share {
                        Some(share) => share.parse(b),
                        None => parse_change(b).map(Arc::new),
                    }
                    .map_err(|e| e.to_string())?;
                    self.check_author(&c, &key, &peer, role)?;
                    Ok(c)
                })
                .collect();
            let changes = match parsed {
                Ok(c) => c,
                Err(why) => {
                    self.stats.changes_rejected += dc.changes.len() as u64;
                    self.violation(sid, format!("{key}: {why}"), out);
                    continue;
                }
            };
            if let Some(s) = self.sessions.get_mut(&sid) {
                s.seen.extend(changes.iter().map(|c| c.hash().0));
            }
            // Nothing new (the same change from another peer): done.
            if let Ok(Some(d)) = self.load(&key) {
                if changes.iter().all(|c| d.knows(&c.hash().0)) {
                    self.stats.changes_known += changes.len() as u64;
                    continue;
                }
            }
            // Taken out of the cache: put back only once the changes are
            // applied and valid.
            let base = match self.take_doc(&key) {
                Ok(Some(d)) => d,
                _ => Arc::new(Doc::new(key.clone())),
            };
            let offered = changes.len();
            let new: Vec<Change> = changes
                .into_iter()
                .filter(|c| !base.knows(&c.hash().0))
                .map(Arc::unwrap_or_clone)
                .collect();
            self.stats.changes_known += (offered - new.len()) as u64;
            // A change we do not know, under our own current actor, was made
            // by someone else using our identity: a cloned node (D-5).
            if new
                .iter()
                .any(|c| c.actor_id().to_bytes() == self.actor.to_bytes().as_slice())
            {
                self.stats.changes_rejected += new.len() as u64;
                self.violation(sid, format!("{key}: a change under this node's own actor id that it never made (cloned node?)"), out);
                continue;
            }
            #[cfg(feature = "mutants")]
            let new: Vec<Change> =
                if crate::mutants::active(crate::mutants::Mutant::DropMissingDeps) {
                    let batch: std::collections::BTreeSet<Hash32> =
                        new.iter().map(|c| c.hash().0).collect();
                    new.into_iter()
                        .filter(|c| {
                            c.deps()
                                .iter()
                                .all(|d| base.knows(&d.0) || batch.contains(&d.0))
                        })
                        .collect()
                } else {
                    new
                };
            if new.is_empty() {
                self.cache_insert(base);
                continue;
            }
            let applied = match self.apply_changes(base, &new) {
                Ok(a) => a,
                Err(e) => {
                    self.stats.changes_rejected += new.len() as u64;
                    self.violation(sid, format!("{key}: {e}"), out);
                    continue;
                }
            };
            let projection = match applied.projection {
                Ok(p) => p,
                Err(e) => {
                    // Schema-invalid data is refused; the last valid view stays (I-22).
                    self.stats.changes_rejected += new.len() as u64;
                    self.violation(sid, e, out);
                    continue;
                }
            };
            self.cache_insert(applied.doc);
            self.stats.changes_applied += new.len() as u64;
            txn.touched.insert(key.clone());
            self.record(&mut txn, &key, new, projection, Some(sid));
        }
        if let Some(c) = upto {
            txn.batch.cursors.push((peer.clone(), c));
        }
        if !txn.batch.changes.is_empty() {
            let mut meta = self.meta.clone();
            meta.hlc = self.hlc.last();
            txn.meta = Some(meta);
        }
        if let Err(e) = self.commit(txn, now, out) {
            // Nothing was stored, the cursor included; the peer offers the
            // changes again next session.
            out.push(Output::Close {
                session: sid,
                reason: format!("storage: {e}"),
            });
            self.sessions.remove(&sid);
        }
    }

    /// `base` with `new` applied, and the rows derived from the result;
    /// from the share when another engine already computed exactly this.
    fn apply_changes(&mut self, base: Arc<Doc>, new: &[Change]) -> Result<Applied, DocError> {
        // A document with changes waiting for dependencies is more than its
        // heads: neither looked up nor offered.
        let share = self.share.clone().filter(|_| !base.has_waiting());
        let (heads, added): (Vec<Hash32>, Vec<Hash32>) = match &share {
            Some(_) => (base.heads(), new.iter().map(|c| c.hash().0).collect()),
            None => Default::default(),
        };
        if let Some(hit) = share
            .as_ref()
            .and_then(|s| s.applied(&base.key, &heads, &added))
        {
            return Ok(hit);
        }
        // Not shared with anyone: changed in place, no copy.
        let mut doc = Arc::try_unwrap(base).unwrap_or_else(|shared| (*shared).clone());
        doc.apply(new.to_vec())?;
        let projection = derive::projection(&doc)
            .map(Arc::new)
            .map_err(|e| e.to_string());
        let applied = Applied {
            doc: Arc::new(doc),
            projection,
        };
        if let (Some(s), false) = (&share, applied.doc.has_waiting()) {
            s.put_applied(&heads, &added, applied.clone());
        }
        Ok(applied)
    }

    fn check_author(
        &self,
        c: &Change,
        key: &DocKey,
        peer: &NodeId,
        peer_role: Role,
    ) -> Result<(), String> {
        let actor =
            Actor::from_bytes(c.actor_id().to_bytes()).ok_or("change has a foreign actor id")?;
        if actor.is_node(peer.as_str()) && actor.role != peer_role {
            return Err(format!(
                "change claims role {} but the peer's certificate says {peer_role}",
                actor.role
            ));
        }
        if !policy::may_author(actor.role, key, |id| actor.is_node(id)) {
            return Err(format!("a {} node may not write {key}", actor.role));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Kind;

    fn dc(id: &str, changes: &[u8]) -> DocChanges {
        DocChanges {
            key: DocKey::new(Kind::Presence, id).unwrap(),
            changes: changes.iter().map(|c| vec![*c]).collect(),
        }
    }

    #[test]
    fn a_document_listed_twice_in_a_frame_is_handled_once_with_all_changes() {
        let merged = merge_by_key(vec![dc("a", &[1]), dc("b", &[2]), dc("a", &[3, 4])]);
        assert_eq!(merged, vec![dc("a", &[1, 3, 4]), dc("b", &[2])]);
        let distinct = vec![dc("a", &[1]), dc("b", &[2])];
        assert_eq!(merge_by_key(distinct.clone()), distinct);
    }
}
