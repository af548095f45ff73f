//! Deliberately planted bugs, compiled only with the `mutants` feature,
//! so `kizuna-sim mutants` can prove each is caught by the invariant meant
//! to catch it.
//!
//! A mutant belongs to one engine ([`crate::engine::EngineConfig::mutant`]),
//! not to the process: while an engine opens or handles an input it makes
//! its mutant the current one of the calling thread ([`enter`]), and the
//! planted sites ask [`active`]. Two engines in one process (the
//! simulator's nodes, parallel tests) therefore never see each other's
//! mutant, and code outside an engine (the simulator's checkers) always
//! runs unmutated.

use std::cell::Cell;

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
    /// Accept forged changes (bad signature, borrowed role, a document
    /// the author may not write) as if verified.
    AcceptForged = 7,
}

impl Mutant {
    pub const ALL: [Mutant; 7] = [
        Mutant::SkipDurability,
        Mutant::WallClockLww,
        Mutant::DropMissingDeps,
        Mutant::MedicalToShelter,
        Mutant::MailSentEarly,
        Mutant::ReuseActor,
        Mutant::AcceptForged,
    ];
}

thread_local! {
    /// The mutant of the engine this thread is running, 0 for none.
    static CURRENT: Cell<u8> = const { Cell::new(0) };
}

/// Whether the engine now running on this thread carries `m`.
pub fn active(m: Mutant) -> bool {
    CURRENT.with(|c| c.get() == m as u8)
}

/// Restores the previous current mutant when dropped.
pub(crate) struct Scope(u8);

impl Drop for Scope {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.0));
    }
}

/// Makes `m` (an engine's mutant) current on this thread until the
/// returned scope is dropped.
pub(crate) fn enter(m: Option<Mutant>) -> Scope {
    Scope(CURRENT.with(|c| c.replace(m.map_or(0, |m| m as u8))))
}
