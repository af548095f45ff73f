//! Deliberately planted bugs, compiled only with the `mutants` feature,
//! so `kizuna-sim mutants` can prove each is caught by a named invariant.
//! One mutant is active per process.

use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Mutant {
    /// Acknowledge a write before it is committed.
    SkipDurability = 1,
    /// Presence: last writer by wall clock wins; conflicts vanish.
    WallClockLww = 2,
    /// Drop received changes whose dependencies are missing.
    DropMissingDeps = 3,
    /// Send medical documents to shelter nodes.
    MedicalToShelter = 4,
    /// Mark a family mail sent before the server accepted it.
    MailSentEarly = 5,
    /// Reuse the previous actor id after a restart.
    ReuseActor = 6,
}

impl Mutant {
    pub const ALL: [Mutant; 6] = [
        Mutant::SkipDurability,
        Mutant::WallClockLww,
        Mutant::DropMissingDeps,
        Mutant::MedicalToShelter,
        Mutant::MailSentEarly,
        Mutant::ReuseActor,
    ];
}

static ACTIVE: AtomicU8 = AtomicU8::new(0);

pub fn set(m: Option<Mutant>) {
    ACTIVE.store(m.map_or(0, |m| m as u8), Ordering::SeqCst);
}

pub fn active(m: Mutant) -> bool {
    ACTIVE.load(Ordering::Relaxed) == m as u8
}
