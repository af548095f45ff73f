//! What every node benchmark uses: its `--name N` flags, the wall clock
//! as the engine's `Now`, and a synthetic registry imported through the
//! real engine. The other files of `support/` are for some benchmarks
//! only; each benchmark names the ones it compiles.

use crdt::api::{Command, Input, Now, Operator, Output};
use crdt::engine::{Engine, EngineConfig};
use crdt::model::{Household, Member};
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
