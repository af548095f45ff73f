//! The workload of a scenario: the synthetic registry, shelters, contacts
//! and medical profiles, and the commands staff issue over simulated time
//! (check-ins, check-outs, transfers, medical reads and edits, resubmits),
//! plus provisioning of nodes that join late. Draws from the `workload`
//! random stream only.

use super::*;

pub(super) fn role_prefix(r: Role) -> &'static str {
    match r {
        Role::Hq => "hq",
        Role::Shelter => "shelter",
        Role::Clinic => "clinic",
        Role::Ambulance => "amb",
        Role::Facility => "facility",
    }
}

pub(super) const SURNAMES: [&str; 8] = [
    "山田", "佐藤", "鈴木", "高橋", "田中", "伊藤", "渡辺", "中村",
];

pub(super) const SURNAMES_KANA: [&str; 8] = [
    "ヤマダ",
    "サトウ",
    "スズキ",
    "タカハシ",
    "タナカ",
    "イトウ",
    "ワタナベ",
    "ナカムラ",
];

pub(super) const GIVEN: [&str; 6] = ["太郎", "花子", "一郎", "恵子", "健", "結衣"];

pub(super) const GIVEN_KANA: [&str; 6] = ["タロウ", "ハナコ", "イチロウ", "ケイコ", "ケン", "ユイ"];

impl World {
    pub(super) fn build_workload(&mut self) {
        let mut r = sub_rng(self.seed, "workload");
        let sc = self.sc.clone();
        let primary = self.hq[0];
        // Registry.
        let mut households: Vec<Household> = Vec::with_capacity(sc.registry.households);
        let mut card = 1_000_000_000_000u64;
        for h in 0..sc.registry.households {
            let members = range(&mut r, 1, sc.registry.max_members as u64 + 1) as usize;
            let sn = range(&mut r, 0, SURNAMES.len() as u64) as usize;
            let hid = format!("h{h}");
            let members = (0..members)
                .map(|m| {
                    let g = range(&mut r, 0, GIVEN.len() as u64) as usize;
                    card += 1 + range(&mut r, 0, 7);
                    let pid = format!("p{h}-{m}");
                    self.household_of.insert(pid.clone(), hid.clone());
                    Member {
                        person_id: pid,
                        name: format!("{} {}", SURNAMES[sn], GIVEN[g]),
                        kana: format!("{} {}", SURNAMES_KANA[sn], GIVEN_KANA[g]),
                        birth_date: format!(
                            "{}-{:02}-{:02}",
                            range(&mut r, 1930, 2024),
                            range(&mut r, 1, 13),
                            range(&mut r, 1, 29)
                        ),
                        card_user_id: chance(&mut r, 0.7)
                            .then(|| CardUserId::parse(&card.to_string()).expect("13 digits")),
                    }
                })
                .collect();
            households.push(Household {
                household_id: hid,
                address: format!("石川県輪島市河井町{}番地", range(&mut r, 1, 3000)),
                members,
            });
        }
        let mut t = 10;
        let provisioned = sc.registry.provisioned;
        // Provisioned: run HQ's imports now, before anything else happens;
        // otherwise as events during warmup.
        let at_hq = |w: &mut World, t: &mut u64, step: u64, op_id: String, cmd: Command| {
            if provisioned {
                w.command(primary, op_id, cmd, false);
            } else {
                w.push(
                    *t,
                    Ev::Cmd {
                        node: primary,
                        op_id,
                        cmd,
                        resubmit: false,
                    },
                );
                *t += step;
            }
        };
        for (b, chunk) in households.chunks(sc.registry.import_batch).enumerate() {
            let cmd = Command::ImportHouseholds {
                households: chunk.to_vec(),
            };
            at_hq(self, &mut t, 10, format!("import-{b}"), cmd);
        }
        let shelters = self.idx(Role::Shelter);
        for &s in &shelters {
            let id = self.nodes[s].id.as_str().to_string();
            let cap = range(&mut r, 50, 1000) as u32;
            let cmd = Command::PutShelter {
                shelter: ShelterInfo {
                    shelter_id: id.clone(),
                    name: format!("避難所 {id}"),
                    capacity: cap,
                    location: String::new(),
                    needs: String::new(),
                    ..Default::default()
                },
            };
            at_hq(self, &mut t, 1, format!("shelter-{id}"), cmd);
        }
        if provisioned {
            self.provision(primary);
        }
        let persons: Vec<String> = households
            .iter()
            .flat_map(|h| h.members.iter().map(|m| m.person_id.clone()))
            .collect();
        // Family contacts.
        let mut cn = 0;
        for p in &persons {
            if !chance(&mut r, sc.contacts.fraction) {
                continue;
            }
            let dnd = chance(&mut r, 0.05);
            let n = range(&mut r, 1, 3);
            let mut contacts = vec![];
            for _ in 0..n {
                cn += 1;
                let consent = chance(&mut r, sc.contacts.consent_fraction);
                let cid = format!("c{cn}");
                if consent && !dnd {
                    self.consented.insert((p.clone(), cid.clone()));
                }
                self.contact_pairs
                    .entry(p.clone())
                    .or_default()
                    .push(cid.clone());
                contacts.push(FamilyContact {
                    contact_id: cid,
                    name: "家族 連絡先".into(),
                    email: format!("family{cn}@example.jp"),
                    consent,
                    ..Default::default()
                });
            }
            self.push(
                t,
                Ev::Cmd {
                    node: primary,
                    op_id: format!("contacts-{p}"),
                    cmd: Command::PutContacts {
                        person_id: p.clone(),
                        contacts,
                        disclosure: Disclosure {
                            do_not_disclose: dnd,
                            share_shelter: chance(&mut r, 0.8),
                        },
                    },
                    resubmit: false,
                },
            );
            t += 1;
        }
        // Medical profiles.
        let mut profiled = vec![];
        for k in 0..sc.medical.profiles.min(persons.len()) {
            let p = persons[range(&mut r, 0, persons.len() as u64) as usize].clone();
            profiled.push(p.clone());
            self.push(
                t,
                Ev::Cmd {
                    node: primary,
                    op_id: format!("medical-{k}"),
                    cmd: Command::PutMedical {
                        person_id: p,
                        update: MedicalUpdate {
                            blood_type: Some(BloodType::AbNeg),
                            consent: Some(ConsentBasis::Consented),
                            add: vec![(MedicalSection::Allergy, "ペニシリン".into())],
                            ..Default::default()
                        },
                    },
                    resubmit: false,
                },
            );
            t += 1;
        }
        // Arrivals: shelters open over time; each desk takes 110-140 an hour.
        let start = sc.warmup_ms();
        let end = sc.chaos_end_ms();
        let spread = (sc.arrivals.open_spread_hours * 3_600_000.0) as u64;
        let mut order: Vec<usize> = (0..households.len()).collect();
        for i in (1..order.len()).rev() {
            let j = range(&mut r, 0, i as u64 + 1) as usize;
            order.swap(i, j);
        }
        let desks = sc.arrivals.desks_per_shelter.max(1);
        let mut desk_next: BTreeMap<(usize, usize), u64> = BTreeMap::new();
        let mut desk_gap: BTreeMap<(usize, usize), u64> = BTreeMap::new();
        let opens: Vec<u64> = shelters
            .iter()
            .map(|_| start + range(&mut r, 0, spread.max(1)))
            .collect();
        if let Some(lead) = sc.nodes.join_before_open_hours {
            let lead_ms = (lead * 3_600_000.0) as u64;
            for (k, &s) in shelters.iter().enumerate() {
                let at = opens[k].saturating_sub(lead_ms);
                self.nodes[s].join_at_ms = at;
                self.push(at, Ev::Reconnect);
            }
        }
        let mut arrived = 0usize;
        // Own streams: transfers and hostile input do not shift the draws
        // of the rest of the workload.
        let mut tr = sub_rng(self.seed, "transfers");
        for (n, &h) in order.iter().enumerate() {
            if arrived >= sc.arrivals.evacuees {
                break;
            }
            let k = range(&mut r, 0, shelters.len() as u64) as usize;
            let d = n % desks;
            let gap = *desk_gap.entry((k, d)).or_insert_with(|| {
                let rate = range(
                    &mut r,
                    sc.arrivals.per_desk_hour[0] as u64,
                    sc.arrivals.per_desk_hour[1] as u64 + 1,
                );
                3_600_000 / rate
            });
            let next = desk_next.entry((k, d)).or_insert(opens[k]);
            let at = *next;
            *next += gap;
            if at >= end {
                continue;
            }
            let hh = &households[h];
            arrived += hh.members.len();
            let ids: Vec<String> = hh.members.iter().map(|m| m.person_id.clone()).collect();
            let node = shelters[k];
            let op = format!("ci-{}", hh.household_id);
            let cmd = Command::CheckIn {
                person_ids: ids.clone(),
                shelter_id: None,
            };
            self.push(
                at,
                Ev::Cmd {
                    node,
                    op_id: op.clone(),
                    cmd: cmd.clone(),
                    resubmit: false,
                },
            );
            if chance(&mut r, sc.arrivals.double_submit_fraction) {
                self.push(
                    at + range(&mut r, 100, 10_000),
                    Ev::Cmd {
                        node,
                        op_id: op,
                        cmd: cmd.clone(),
                        resubmit: true,
                    },
                );
            }
            if shelters.len() > 1 && chance(&mut r, sc.arrivals.double_checkin_fraction) {
                let k2 =
                    (k + 1 + range(&mut r, 0, shelters.len() as u64 - 1) as usize) % shelters.len();
                self.push(
                    at,
                    Ev::Cmd {
                        node: shelters[k2],
                        op_id: format!("ci2-{}", hh.household_id),
                        cmd,
                        resubmit: false,
                    },
                );
            }
            if shelters.len() > 1 && chance(&mut tr, sc.arrivals.transfer_fraction) {
                let k2 = (k + 1 + range(&mut tr, 0, shelters.len() as u64 - 1) as usize)
                    % shelters.len();
                let leave = at + range(&mut tr, 60_000, (end - at).max(60_001));
                if leave < end {
                    let to = self.nodes[shelters[k2]].id.as_str().to_string();
                    self.push(
                        leave,
                        Ev::Cmd {
                            node,
                            op_id: format!("tr-{}", hh.household_id),
                            cmd: Command::Transfer {
                                person_ids: ids.clone(),
                                from_shelter: None,
                                to_shelter: to,
                            },
                            resubmit: false,
                        },
                    );
                    // They arrive at the second shelter within the hour.
                    self.push(
                        leave + range(&mut tr, 60_000, 3_600_000),
                        Ev::Cmd {
                            node: shelters[k2],
                            op_id: format!("tci-{}", hh.household_id),
                            cmd: Command::CheckIn {
                                person_ids: ids.clone(),
                                shelter_id: None,
                            },
                            resubmit: false,
                        },
                    );
                }
            }
            if chance(&mut r, sc.arrivals.checkout_fraction) {
                let out = at + range(&mut r, 60_000, (end - at).max(60_001));
                if out < end {
                    self.push(
                        out,
                        Ev::Cmd {
                            node,
                            op_id: format!("co-{}", hh.household_id),
                            cmd: Command::CheckOut {
                                person_ids: ids,
                                shelter_id: None,
                            },
                            resubmit: false,
                        },
                    );
                }
            }
        }
        self.adversarial_workload(&persons, start, end);
        // Medical reads by ambulances during the chaos phase.
        let ambulances = self.idx(Role::Ambulance);
        if !ambulances.is_empty() && !profiled.is_empty() {
            for k in 0..sc.medical.reads {
                let a = ambulances[range(&mut r, 0, ambulances.len() as u64) as usize];
                let p = profiled[range(&mut r, 0, profiled.len() as u64) as usize].clone();
                self.push(
                    range(&mut r, start, end),
                    Ev::Cmd {
                        node: a,
                        op_id: format!("read-{k}"),
                        // One in ten is a break-glass grant instead of
                        // a read (reads under it need no separate event).
                        cmd: if chance(&mut r, 0.1) {
                            Command::BreakGlass {
                                person_id: p,
                                reason: "emergency_transport".into(),
                                justification: "意識なし".into(),
                            }
                        } else {
                            Command::ReadMedical {
                                person_id: p,
                                reason: "emergency_transport".into(),
                                break_glass: false,
                            }
                        },
                        resubmit: false,
                    },
                );
            }
        }
    }

    /// Commands that carry an Individual Number in free text, in the forms
    /// people write it (plain, full-width digits, hyphenated, spaced), at
    /// random moments of the chaos phase: a medical note and a family
    /// contact's name at HQ, a shelter's needs at HQ, a break-glass
    /// justification on an ambulance. Each must be refused as invalid input; an accepted one
    /// is an `individual_number_leak`, and the frame and store scans
    /// check that none of them got anywhere.
    fn adversarial_workload(&mut self, persons: &[String], start: u64, end: u64) {
        let n = self.sc.arrivals.adversarial_inputs;
        if n == 0 || persons.is_empty() {
            return;
        }
        let mut r = sub_rng(self.seed, "adversarial");
        let primary = self.hq[0];
        let ambulances = self.idx(Role::Ambulance);
        let shelters = self.idx(Role::Shelter);
        for k in 0..n {
            let number = loop {
                let body: String = (0..11)
                    .map(|_| char::from(b'0' + range(&mut r, 0, 10) as u8))
                    .collect();
                if let Some(d) = (0..10u8)
                    .map(|d| format!("{body}{}", char::from(b'0' + d)))
                    .find(|c| crdt::text::is_individual_number(c))
                {
                    break d;
                }
            };
            let written = match k % 4 {
                0 => number.clone(),
                1 => number
                    .chars()
                    .map(|c| char::from_u32(c as u32 - '0' as u32 + '０' as u32).expect("digit"))
                    .collect(),
                2 => format!("{}-{}-{}", &number[..4], &number[4..8], &number[8..]),
                _ => format!("{} {} {}", &number[..4], &number[4..8], &number[8..]),
            };
            let text = format!("マイナンバー {written}");
            let p = persons[range(&mut r, 0, persons.len() as u64) as usize].clone();
            let (node, cmd) = match k % 4 {
                0 => (
                    primary,
                    Command::PutMedical {
                        person_id: p,
                        update: MedicalUpdate {
                            add: vec![(MedicalSection::Condition, text)],
                            ..Default::default()
                        },
                    },
                ),
                1 => (
                    primary,
                    Command::PutContacts {
                        person_id: p,
                        contacts: vec![FamilyContact {
                            contact_id: format!("adv{k}"),
                            name: text,
                            email: format!("adv{k}@example.jp"),
                            consent: true,
                            ..Default::default()
                        }],
                        disclosure: Disclosure {
                            do_not_disclose: false,
                            share_shelter: true,
                        },
                    },
                ),
                2 if !shelters.is_empty() => {
                    let s = shelters[range(&mut r, 0, shelters.len() as u64) as usize];
                    (
                        primary,
                        Command::PutShelter {
                            shelter: ShelterInfo {
                                shelter_id: self.nodes[s].id.as_str().to_string(),
                                name: format!("避難所 {}", self.nodes[s].id),
                                capacity: 500,
                                needs: text,
                                ..Default::default()
                            },
                        },
                    )
                }
                // Read reasons are codes from a closed list now; the
                // free text of a medical access is a break-glass
                // justification (audited, so it must never hold a number).
                _ if !ambulances.is_empty() => (
                    ambulances[range(&mut r, 0, ambulances.len() as u64) as usize],
                    Command::BreakGlass {
                        person_id: p,
                        reason: "emergency_transport".into(),
                        justification: text,
                    },
                ),
                _ => (
                    primary,
                    Command::PutMedical {
                        person_id: p,
                        update: MedicalUpdate {
                            add: vec![(MedicalSection::Allergy, text)],
                            ..Default::default()
                        },
                    },
                ),
            };
            let op_id = format!("adv-{k}");
            self.adversarial.insert(op_id.clone());
            self.summary.adversarial_inputs += 1;
            self.push(
                range(&mut r, start, end.max(start + 1)),
                Ev::Cmd {
                    node,
                    op_id,
                    cmd,
                    resubmit: false,
                },
            );
        }
    }

    /// Peacetime provisioning: every other node starts from a store holding
    /// exactly the registry and shelter documents of `from` (changes, heads
    /// and query rows, committed through the `Store` interface), then opens
    /// its engine on it as a freshly installed node would. The copies share
    /// memory until a node writes.
    pub(super) fn provision(&mut self, from: usize) {
        let src = &self.nodes[from]
            .engine
            .as_ref()
            .expect("hq is up")
            .store()
            .mem;
        let everyone = |k: &DocKey| matches!(k.kind, Kind::Registry | Kind::Shelter);
        let batch = Batch {
            changes: src
                .log
                .iter()
                .filter(|c| everyone(&c.change.key))
                .map(|c| c.record())
                .collect(),
            docs: src
                .docs
                .iter()
                .filter(|(k, _)| everyone(k))
                .map(|(k, (heads, _, _))| DocState {
                    key: k.clone(),
                    heads: heads.clone(),
                    // Loading replays the document's changes.
                    snapshot: None,
                })
                .collect(),
            projections: src
                .projections
                .iter()
                .filter(|(k, _)| everyone(k))
                .map(|(k, p)| (k.clone(), p.clone()))
                .collect(),
            // The authors of those changes, so they can be relayed.
            credentials: src
                .credentials
                .iter()
                .flat_map(|(h, cs)| cs.iter().map(|c| (*h, c.clone())))
                .collect(),
            ..Default::default()
        };
        let mut template = self.new_store();
        template
            .commit(&batch)
            .expect("memory stores accept every batch");
        template.mem.share();
        let mut index: Option<DocIndex> = None;
        for i in (0..self.nodes.len()).filter(|&i| i != from) {
            let now = Self::node_now(&self.nodes[i], self.now);
            let cfg = self.nodes[i].cfg.clone();
            let from = match &index {
                Some(i) => IndexFrom::Identical(i.clone()),
                None => IndexFrom::Store,
            };
            let e = self
                .open(template.clone(), &cfg, now, from)
                .expect("fresh store opens");
            // Every copy holds the same documents: one index, shared.
            index.get_or_insert_with(|| e.doc_index());
            self.nodes[i].engine = Some(e);
        }
        self.provisioned = index;
    }
}
