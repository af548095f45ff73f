//! The simulated network: links with a latency and bandwidth profile, loss,
//! duplication, reordering and clogging, partitions as blocked node pairs,
//! sessions over links (one per connection generation) and frame delivery
//! as scheduled events. Draws from the `net` random stream only.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Lan,
    Mobile,
    Satellite,
}

impl Profile {
    pub fn parse(s: &str) -> Profile {
        match s {
            "satellite" => Profile::Satellite,
            "mobile" => Profile::Mobile,
            _ => Profile::Lan,
        }
    }
    /// (rtt range ms, bytes per ms)
    fn params(self) -> ((u64, u64), f64) {
        match self {
            Profile::Lan => ((1, 5), 100_000.0),
            Profile::Mobile => ((40, 150), 1_000.0),
            // 64 kbit/s = 8 bytes per ms.
            Profile::Satellite => ((300, 700), 8.0),
        }
    }
}

pub(super) struct Link {
    pub(super) a: usize,
    pub(super) b: usize,
    pub(super) profile: Profile,
    pub(super) rtt_ms: u64,
    pub(super) up: bool,
    pub(super) gen: u32,
    pub(super) busy_until: [u64; 2],
    pub(super) last_arrival: [u64; 2],
    pub(super) clog_until: u64,
    pub(super) clog_factor: u64,
    /// A reconnect is scheduled.
    pub(super) connecting: bool,
    /// A frame of this connection was lost: like a broken QUIC stream,
    /// nothing after it is delivered until the connection is replaced.
    pub(super) broken: bool,
}

pub(super) fn sid(link: usize, gen: u32, side: u8) -> SessionId {
    ((link as u64) << 24) | (((gen & 0x7f_ffff) as u64) << 1) | side as u64
}

pub(super) fn sid_parts(s: SessionId) -> (usize, u32, u8) {
    (
        (s >> 24) as usize,
        ((s >> 1) & 0x7f_ffff) as u32,
        (s & 1) as u8,
    )
}

impl World {
    /// What the second path of a stray copy of `f` sends before it:
    /// `Authors` frames with the credentials of every author of the
    /// changes in `f` (none if it has no changes), at most
    /// [`wire::MAX_CREDS_PER_FRAME`] each, as a session's `introduce` sends
    /// them. A frame of a catch-up can carry changes of more authors than
    /// one `Authors` frame may: a stray copy introduced with only the first
    /// of them (as it was until this was a list) arrives, when early, before
    /// the session's own credentials, and its receiver rightly refuses a
    /// change whose author it never heard of and flags the honest sender.
    pub fn credentials_for(&self, f: &Frame) -> Vec<Vec<u8>> {
        let Frame::Changes { docs, .. } = f else {
            return vec![];
        };
        let authors: BTreeSet<[u8; 8]> = docs
            .iter()
            .flat_map(|d| &d.changes)
            .filter_map(|b| crdt::doc::parse_change(b).ok())
            .filter_map(|c| crdt::actor::Actor::from_bytes(&c.actor_id().to_bytes()))
            .map(|a| a.node_hash)
            .collect();
        let creds: Vec<Vec<u8>> = self
            .nodes
            .iter()
            .filter(|n| authors.contains(&crdt::actor::node_hash(n.id.as_str())))
            .filter_map(|n| n.cfg.trust.signer.as_ref().map(|s| s.credential().to_vec()))
            .collect();
        creds
            .chunks(wire::MAX_CREDS_PER_FRAME)
            .filter_map(|c| wire::encode(&Frame::Authors { creds: c.to_vec() }).ok())
            .collect()
    }

    pub(super) fn add_link(&mut self, a: usize, b: usize, profile: Profile) {
        if a == b
            || self
                .links
                .iter()
                .any(|l| (l.a, l.b) == (a, b) || (l.a, l.b) == (b, a))
        {
            return;
        }
        let ((lo, hi), _) = profile.params();
        let rtt_ms = range(&mut self.net_rng, lo, hi + 1);
        self.links.push(Link {
            a,
            b,
            profile,
            rtt_ms,
            up: false,
            gen: 0,
            busy_until: [0; 2],
            last_arrival: [0; 2],
            clog_until: 0,
            clog_factor: 1,
            connecting: false,
            broken: false,
        });
    }

    pub(super) fn build_links(&mut self) {
        let mut r = sub_rng(self.seed, "topology");
        let t = self.sc.topology.clone();
        let hq_link = Profile::parse(&t.hq_link);
        let shelters = self.idx(Role::Shelter);
        let hqs = self.hq.clone();
        let primary = hqs[0];
        for &h in &hqs[1..] {
            self.add_link(primary, h, Profile::Lan);
        }
        let gw = t.hq_gateways.min(shelters.len());
        let pick = |r: &mut ChaCha8Rng| {
            let u = unit(r);
            if u < t.satellite_fraction {
                Profile::Satellite
            } else if u < t.satellite_fraction + t.mobile_fraction {
                Profile::Mobile
            } else {
                Profile::Lan
            }
        };
        for (k, &s) in shelters.iter().enumerate() {
            if k < gw {
                for &h in &hqs {
                    self.add_link(h, s, hq_link);
                }
            } else {
                // A tree of shelters: HQ only through the gateways.
                let parent = shelters[range(&mut r, 0, k as u64) as usize];
                let p = pick(&mut r);
                self.add_link(s, parent, p);
            }
        }
        let extra = (self.sc.topology.extra_links * shelters.len() as f64) as usize;
        for _ in 0..extra {
            if shelters.len() < 2 {
                break;
            }
            let a = shelters[range(&mut r, 0, shelters.len() as u64) as usize];
            let b = shelters[range(&mut r, 0, shelters.len() as u64) as usize];
            let p = pick(&mut r);
            self.add_link(a, b, p);
        }
        let clinics = self.idx(Role::Clinic);
        for &c in &clinics {
            self.add_link(primary, c, Profile::Mobile);
            let s = shelters[range(&mut r, 0, shelters.len() as u64) as usize];
            self.add_link(c, s, Profile::Lan);
        }
        for &a in &self.idx(Role::Ambulance) {
            // Ambulances reach medical data over mobile to HQ and at clinics.
            self.add_link(primary, a, Profile::Mobile);
            if !clinics.is_empty() {
                let c = clinics[range(&mut r, 0, clinics.len() as u64) as usize];
                self.add_link(a, c, Profile::Lan);
            }
        }
        for &f in &self.idx(Role::Facility) {
            let s = shelters[range(&mut r, 0, shelters.len() as u64) as usize];
            self.add_link(f, s, Profile::Lan);
        }
    }

    pub(super) fn allowed(&self, l: usize) -> bool {
        let k = &self.links[l];
        let (a, b) = (&self.nodes[k.a], &self.nodes[k.b]);
        a.engine.is_some()
            && b.engine.is_some()
            && self.now >= a.join_at_ms.max(b.join_at_ms)
            && !self.blocked.contains(&(k.a, k.b))
            && !self.blocked.contains(&(k.b, k.a))
    }

    pub(super) fn connect(&mut self, l: usize) {
        let k = &mut self.links[l];
        k.connecting = false;
        if k.up {
            return;
        }
        if !self.allowed(l) {
            return;
        }
        let k = &mut self.links[l];
        k.up = true;
        k.broken = false;
        k.gen += 1;
        let (a, b, gen) = (k.a, k.b, k.gen);
        k.last_arrival = [self.now; 2];
        k.busy_until = [self.now; 2];
        let (na, ra) = (self.nodes[a].id.clone(), self.nodes[a].role);
        let (nb, rb) = (self.nodes[b].id.clone(), self.nodes[b].role);
        self.input(
            a,
            Input::Connected {
                session: sid(l, gen, 0),
                node: nb,
                role: rb,
                initiator: true,
            },
        );
        // Refused at once by the dialing side (its peer is backed off, or
        // already has two sessions): the link is down again and the other
        // side never hears of this session (it would stay open there).
        if !self.links[l].up || self.links[l].gen != gen {
            return;
        }
        self.input(
            b,
            Input::Connected {
                session: sid(l, gen, 1),
                node: na,
                role: ra,
                initiator: false,
            },
        );
    }

    pub(super) fn disconnect(&mut self, l: usize) {
        if !self.links[l].up {
            return;
        }
        self.links[l].up = false;
        let (a, b, gen) = (self.links[l].a, self.links[l].b, self.links[l].gen);
        self.input(
            a,
            Input::Disconnected {
                session: sid(l, gen, 0),
            },
        );
        self.input(
            b,
            Input::Disconnected {
                session: sid(l, gen, 1),
            },
        );
        self.links[l].connecting = true;
        let back = self.now + range(&mut self.net_rng, 1_000, 10_000);
        if self.reconnects_due.range(self.now..=back).next().is_none() {
            self.reconnects_due.insert(back);
            self.push(back, Ev::Reconnect);
        }
    }

    pub(super) fn send(&mut self, from: usize, session: SessionId, bytes: Vec<u8>) {
        let (l, gen, side) = sid_parts(session);
        if l >= self.links.len() || self.links[l].gen != gen || !self.links[l].up {
            return;
        }
        let to = if side == 0 {
            self.links[l].b
        } else {
            self.links[l].a
        };
        debug_assert_eq!(
            from,
            if side == 0 {
                self.links[l].a
            } else {
                self.links[l].b
            }
        );
        self.summary.frames += 1;
        self.summary.bytes += bytes.len() as u64;
        // Checks on every frame: policy and Individual Numbers.
        let frame = wire::decode(&bytes).ok();
        if let Some(f) = &frame {
            let to_id = self.nodes[to].id.clone();
            for v in check::role_leak(&to_id, self.nodes[to].role, f, self.now) {
                self.violate(v);
            }
        }
        if check::individual_numbers(&bytes) > 0 {
            let v = check::v(
                check::INDIVIDUAL_NUMBER_LEAK,
                self.now,
                format!(
                    "frame from {} carries an Individual Number",
                    self.nodes[from].id
                ),
            );
            self.violate(v);
        }
        let is_changes = matches!(frame, Some(Frame::Changes { .. }));
        let dir = side as usize;
        let (_, bw) = self.links[l].profile.params();
        let chaos = !self.healed;
        let k = &mut self.links[l];
        let tx = (bytes.len() as f64 / bw).ceil() as u64;
        let start = self.now.max(k.busy_until[dir]);
        k.busy_until[dir] = start + tx;
        let mut delay = k.rtt_ms / 2;
        if chaos && k.clog_until > self.now {
            delay *= k.clog_factor;
        }
        let departs = k.busy_until[dir];
        let mut arrive = departs + delay;
        let rtt = k.rtt_ms;
        self.push(
            departs,
            Ev::Sent {
                node: from,
                session,
                bytes: bytes.len(),
            },
        );
        let r = &mut self.net_rng;
        if chaos && self.mix.loss > 0.0 {
            // Lost packets are retransmitted by the transport; now and
            // then a connection breaks instead.
            while chance(r, self.mix.loss) {
                arrive += rtt.max(20) * 2;
                *self
                    .summary
                    .faults_injected
                    .entry("loss".into())
                    .or_default() += 1;
            }
            if chance(r, self.mix.loss * 0.02) {
                *self
                    .summary
                    .faults_injected
                    .entry("connection_drop".into())
                    .or_default() += 1;
                self.links[l].broken = true;
                self.push(arrive, Ev::Timeout(l));
                return;
            }
        }
        // A session is an ordered, reliable stream (QUIC): its own frames
        // always arrive in order. Reordering and duplication (C-7, C-8) are
        // modelled as stray copies of a frame's changes arriving at another
        // time, as if over a second path; the copies claim no log position.
        let k = &mut self.links[l];
        arrive = arrive.max(k.last_arrival[dir]);
        k.last_arrival[dir] = arrive;
        let stray_copy = || match frame.clone() {
            Some(Frame::Changes { docs, .. }) if !docs.is_empty() => {
                let f = Frame::Changes { docs, upto: None };
                wire::encode(&f).ok().map(|b| (b, f))
            }
            _ => None,
        };
        let mut copies = Vec::new();
        if chaos && is_changes && self.mix.reorder > 0.0 && chance(r, self.mix.reorder) {
            if let Some(copy) = stray_copy() {
                // Early (changes before their dependencies) or late.
                let early = range(r, 0, 2);
                let at = if early == 0 {
                    self.now + range(r, 0, rtt / 2 + 1)
                } else {
                    arrive + range(r, 0, 2 * rtt + 50)
                };
                copies.push(("reorder", at, copy));
            }
        }
        if chaos && is_changes && self.mix.duplication > 0.0 && chance(r, self.mix.duplication) {
            if let Some(copy) = stray_copy() {
                copies.push(("duplicate", arrive + range(r, 0, rtt + 20), copy));
            }
        }
        for (what, at, (copy, f)) in copies {
            *self.summary.faults_injected.entry(what.into()).or_default() += 1;
            // The second path is a session of its own, which introduced the
            // copy's authors before their changes (their credentials).
            for authors in self.credentials_for(&f) {
                self.push(
                    at,
                    Ev::Deliver {
                        link: l,
                        gen,
                        dir: side,
                        bytes: authors,
                        changes: None,
                        hostile: None,
                        stray: true,
                    },
                );
            }
            self.push(
                at,
                Ev::Deliver {
                    link: l,
                    gen,
                    dir: side,
                    bytes: copy,
                    changes: Some(Box::new(f)),
                    hostile: None,
                    stray: true,
                },
            );
        }
        // The receiver's checks need the changes again: keep them decoded.
        let changes = frame
            .filter(|f| matches!(f, Frame::Changes { .. }))
            .map(Box::new);
        self.push(
            arrive,
            Ev::Deliver {
                link: l,
                gen,
                dir: side,
                bytes,
                changes,
                hostile: None,
                stray: false,
            },
        );
    }

    pub(super) fn deliver(
        &mut self,
        l: usize,
        gen: u32,
        dir: u8,
        bytes: Vec<u8>,
        changes: Option<Box<Frame>>,
        hostile: Option<Box<HostileNote>>,
        stray: bool,
    ) {
        let k = &self.links[l];
        if !k.up || k.gen != gen || k.broken {
            return;
        }
        let (from, to) = if dir == 0 { (k.a, k.b) } else { (k.b, k.a) };
        if self.blocked.contains(&(from, to)) {
            // A blocked direction breaks the stream: a later frame never
            // overtakes a lost one.
            self.links[l].broken = true;
            return;
        }
        let session = sid(l, gen, 1 - dir);
        if let Some(note) = hostile {
            self.deliver_hostile(from, to, session, bytes, note);
            return;
        }
        let open = self.nodes[to]
            .engine
            .as_ref()
            .is_some_and(|e| e.has_session(session));
        if let (true, true, Some(Frame::Changes { docs, .. })) = (stray, open, changes.as_deref()) {
            // Of the stray copy and the frame it copies, one brings what
            // the other already did (whichever arrives second).
            self.summary.stray_changes += docs.iter().map(|d| d.changes.len() as u64).sum::<u64>();
        }
        let changes_frame = changes.filter(|_| open);
        let rest = self.input(to, Input::Frame { session, bytes });
        if let Some(f) = changes_frame {
            self.check_received(from, to, session, &f, &rest);
        }
        self.after_outputs(to, rest, None);
    }

    /// A frame of `node`'s `session` left it: its engine learns it was
    /// written, unless the session's link went down since.
    pub(super) fn sent(&mut self, node: usize, session: SessionId, bytes: usize) {
        let (l, gen, _) = sid_parts(session);
        if !self.links.get(l).is_some_and(|k| k.gen == gen && k.up) {
            return;
        }
        let rest = self.input(node, Input::Sent { session, bytes });
        self.after_outputs(node, rest, None);
    }

    pub(super) fn reconnect(&mut self) {
        for l in 0..self.links.len() {
            if !self.links[l].up && self.allowed(l) {
                self.connect(l);
            }
        }
    }

    pub(super) fn heal(&mut self) {
        self.healed = true;
        self.blocked.clear();
        self.smtp_down_until = 0;
        for k in &mut self.links {
            k.clog_until = 0;
        }
        for i in 0..self.nodes.len() {
            self.nodes[i].crash_after_ack = false;
            self.nodes[i].crash_after_mail = false;
            if self.nodes[i].engine.is_none() {
                self.restart(i);
            }
        }
        self.push(self.now, Ev::Reconnect);
    }
}
