//! `kizuna-sim`: a deterministic simulator that drives many
//! `crdt::engine::Engine`s (the code every node runs) through network,
//! storage, clock and SMTP faults drawn from one seed, checks named
//! invariants continuously, and replays any failure exactly.
//!
//! Codemap: [`scenario`] (TOML specs), [`world`] (nodes, links, faults,
//! workload, event queue), [`check`] (invariant checkers, apart from the
//! workloads), [`simstore`] (MemStore with indexes for scale),
//! [`report`] (table, JSON, SVG).

pub mod check;
pub mod report;
pub mod scenario;
pub mod simstore;
pub mod world;

use scenario::Scenario;
use world::{Summary, World};

/// Runs one seed of a scenario to the end (or the wall-clock deadline).
pub fn run_seed(sc: &Scenario, seed: u64, deadline: Option<std::time::Instant>) -> Summary {
    let mut w = World::new(sc.clone(), seed);
    w.run(deadline)
}

/// Runs one seed with a progress bar on stderr: the run of a process that
/// ends right after it, so the world is not freed (at disaster scale that
/// takes seconds; the process exit returns the memory at once).
pub fn run_seed_with_progress(
    sc: &Scenario,
    seed: u64,
    deadline: Option<std::time::Instant>,
    max_rss: Option<u64>,
    mutant: Option<world::MutantArg>,
    census_every_ms: Option<u64>,
) -> Summary {
    #[cfg(feature = "mutants")]
    let mut w = World::with_mutant(sc.clone(), seed, mutant);
    #[cfg(not(feature = "mutants"))]
    let mut w = {
        let _ = mutant;
        World::new(sc.clone(), seed)
    };
    w.max_rss = max_rss;
    w.census_every_ms = census_every_ms;
    let total = sc.total_ms() / 1000;
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} simulated s ({eta})",
        )
        .expect("valid template"),
    );
    w.progress = Some(bar.clone());
    let s = w.run(deadline);
    bar.finish_and_clear();
    std::mem::forget(w);
    s
}

/// The invariant meant to catch each planted mutant.
#[cfg(feature = "mutants")]
pub fn intended(m: crdt::mutants::Mutant) -> &'static str {
    use crdt::mutants::Mutant;
    match m {
        Mutant::SkipDurability => check::ACKED_WRITE_LOST,
        Mutant::WallClockLww => check::CONFLICT_DROPPED,
        Mutant::DropMissingDeps => check::RECEIVED_CHANGE_LOST,
        Mutant::MedicalToShelter => check::ROLE_LEAK,
        Mutant::MailSentEarly => check::MAIL_MISSING,
        Mutant::ReuseActor => check::PEER_VIOLATION,
        Mutant::AcceptForged => check::UNVERIFIED_APPLIED,
    }
}

/// Runs one seed with every engine carrying the planted bug `m`.
#[cfg(feature = "mutants")]
pub fn run_seed_mutant(
    sc: &Scenario,
    seed: u64,
    m: Option<crdt::mutants::Mutant>,
    deadline: Option<std::time::Instant>,
) -> Summary {
    let mut w = World::with_mutant(sc.clone(), seed, m);
    w.run(deadline)
}

/// How a mutant fared: caught at a seed (its intended invariant fired
/// with the mutant, and the same seed without it finished with no
/// violation at all), or not, with the invariants that did fire at the
/// first seed where any fired (if one did).
#[cfg(feature = "mutants")]
#[derive(Debug)]
pub struct MutantResult {
    pub mutant: crdt::mutants::Mutant,
    pub caught_at: Option<u64>,
    /// Invariants that fired at the catching seed (or the first seed
    /// where any fired).
    pub fired: Vec<&'static str>,
}

/// For each planted mutant, the first seed at which it is caught by its
/// intended invariant while the same seed passes without it. Mutants are
/// per engine (per world), so this may run beside anything.
#[cfg(feature = "mutants")]
pub fn catch_mutants(sc: &Scenario, seeds: u64, start: u64) -> Vec<MutantResult> {
    let mut out = vec![];
    for m in crdt::mutants::Mutant::ALL {
        let mut r = MutantResult {
            mutant: m,
            caught_at: None,
            fired: vec![],
        };
        for seed in start..start + seeds {
            let s = run_seed_mutant(sc, seed, Some(m), None);
            let names: std::collections::BTreeSet<&'static str> =
                s.invariant_violations.iter().map(|v| v.name).collect();
            if r.fired.is_empty() {
                r.fired = names.iter().copied().collect();
            }
            if !names.contains(intended(m)) {
                continue;
            }
            let clean = run_seed(sc, seed, None);
            if clean.finished && clean.invariant_violations.is_empty() {
                r.caught_at = Some(seed);
                r.fired = names.into_iter().collect();
                break;
            }
        }
        out.push(r);
    }
    out
}
