//! The shelter the benchmarks' check-ins go to.

use super::registry::now;
use crdt::api::{Command, Input, Operator, Output};
use crdt::engine::Engine;
use crdt::model::ShelterInfo;
use node::store::SqliteStore;
use rand_chacha::ChaCha8Rng;

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
