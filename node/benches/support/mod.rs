//! Shared by the node benchmarks: flags, time, percentiles, peak memory,
//! and a synthetic registry imported through the real engine.

#![allow(dead_code)]

use crdt::api::{Command, Input, Now, Operator, Output};
use crdt::engine::{Engine, EngineConfig};
use crdt::model::{Household, Member, ShelterInfo};
use crdt::text::CardUserId;
use crdt::{NodeId, Role};
use node::store::SqliteStore;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// `--name N` from the command line, or the default.
pub fn arg(name: &str, default: u64) -> u64 {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn now() -> Now {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    Now {
        wall_ms: ms,
        mono_ms: ms,
        wall_trusted: true,
    }
}

pub fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p) as usize]
}

pub fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// CPU seconds this process has used so far, all threads (user and
/// system, from /proc/self/stat, in Linux's fixed user-visible clock
/// ticks of 10 ms). On a shared
/// machine wall time says how busy the others were as much as how fast we
/// are; CPU time per row is the number to compare between versions.
pub fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14 and stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / 100.0
}

/// Person `id` is `p{id:08}`; ids are computed, not kept, so the bench's
/// own memory stays out of the measured RSS.
pub fn person_of(id: usize) -> String {
    format!("p{id:08}")
}

/// The card user ID of person `id`.
pub fn card_of(id: usize) -> String {
    format!("{:013}", 1_000_000_000_000u64 + id as u64)
}

/// An hq engine on a new SQLite file at `path` holding `residents` persons
/// in households of 1 to 4, imported in batches of 5,000 households.
pub fn build_registry(path: &Path, residents: usize) -> Engine<SqliteStore> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let store = SqliteStore::open(path).unwrap();
    let mut hq = Engine::open(
        store,
        EngineConfig::for_tests(NodeId::new("hq-1").unwrap(), Role::Hq),
        now(),
    )
    .unwrap();
    let (mut next, mut batch) = (0usize, 0usize);
    let bar = indicatif::ProgressBar::new(residents as u64);
    while next < residents {
        let mut hh = Vec::new();
        while next < residents && hh.len() < 5_000 {
            let size = 1 + (rng.next_u32() % 4) as usize;
            let h = hh.len() + batch * 5_000;
            let members: Vec<Member> = (next..next + size.min(residents - next))
                .map(|id| Member {
                    person_id: person_of(id),
                    name: format!("住民 {id}"),
                    kana: format!("ジュウミン {id}"),
                    birth_date: "1970-01-01".into(),
                    card_user_id: Some(CardUserId::parse(&card_of(id)).unwrap()),
                })
                .collect();
            next += members.len();
            hh.push(Household {
                household_id: format!("h{h:08}"),
                address: "新潟県".into(),
                members,
            });
        }
        let cmd = Input::Command {
            op_id: format!("imp-{batch}"),
            operator: Operator("bench".into()),
            cmd: Command::ImportHouseholds { households: hh },
        };
        let out = hq.handle(cmd, now(), &mut rng);
        assert!(
            matches!(out.last(), Some(Output::Reply { result: Ok(_), .. })),
            "import failed"
        );
        batch += 1;
        bar.set_position(next as u64);
    }
    bar.finish_and_clear();
    hq
}

/// Opens shelter `s1` (capacity 100,000) on `e`, the shelter the benches'
/// check-ins go to.
pub fn put_shelter(e: &mut Engine<SqliteStore>, rng: &mut ChaCha8Rng) {
    let out = e.handle(
        Input::Command {
            op_id: "shelter".into(),
            operator: Operator("bench".into()),
            cmd: Command::PutShelter {
                shelter: ShelterInfo {
                    shelter_id: "s1".into(),
                    name: "体育館".into(),
                    capacity: 100_000,
                    ..Default::default()
                },
            },
        },
        now(),
        rng,
    );
    assert!(
        matches!(out.last(), Some(Output::Reply { result: Ok(_), .. })),
        "the shelter opens"
    );
}
