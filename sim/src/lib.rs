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
) -> Summary {
    let mut w = World::new(sc.clone(), seed);
    w.max_rss = max_rss;
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

/// For each planted mutant, the first (invariant, seed) that catches it.
#[cfg(feature = "mutants")]
pub fn catch_mutants(
    sc: &Scenario,
    seeds: u64,
    start: u64,
) -> Vec<(crdt::mutants::Mutant, Option<(String, u64)>)> {
    let mut out = vec![];
    for m in crdt::mutants::Mutant::ALL {
        crdt::mutants::set(Some(m));
        let mut caught = None;
        for seed in start..start + seeds {
            let s = run_seed(sc, seed, None);
            if !s.invariant_violations.is_empty() {
                let names: std::collections::BTreeSet<&str> =
                    s.invariant_violations.iter().map(|v| v.name).collect();
                caught = Some((names.into_iter().collect::<Vec<_>>().join(","), seed));
                break;
            }
        }
        crdt::mutants::set(None);
        out.push((m, caught));
    }
    out
}
