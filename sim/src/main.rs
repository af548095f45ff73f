//! `kizuna-sim`: run one seed, sweep many, or prove the planted mutants
//! are caught. See the crate docs (`sim/src/lib.rs`) for the model.

use anyhow::Result;
use clap::{Parser, Subcommand};
use sim::scenario::Scenario;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "kizuna-sim",
    about = "Deterministic simulator for the Kizuna sync core"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one seed.
    Run {
        #[arg(long)]
        scenario: String,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        json: Option<String>,
        #[arg(long)]
        svg: Option<String>,
        /// Stop after this many wall seconds (reports how far it got).
        #[arg(long)]
        budget_secs: Option<u64>,
        /// Stop when the simulator's resident memory passes this many GiB
        /// (reports how far it got). Default: 90% of this machine's memory.
        #[arg(long)]
        max_rss_gib: Option<f64>,
        /// With `--features mutants`: plant this bug (as `mutants` names it).
        #[arg(long)]
        mutant: Option<String>,
        /// Print a census of the world's memory by part (engine state,
        /// store tables, event queue) on stderr every this many simulated
        /// hours.
        #[arg(long)]
        census_hours: Option<f64>,
    },
    /// Run many seeds; exit 1 listing failing seeds.
    Sweep {
        #[arg(long)]
        scenario: String,
        #[arg(long)]
        seeds: u64,
        #[arg(long, default_value_t = 0)]
        start: u64,
        #[arg(long)]
        budget_secs: Option<u64>,
    },
    /// With `--features mutants`: each planted bug must be caught.
    Mutants {
        #[arg(long)]
        scenario: String,
        #[arg(long)]
        seeds: u64,
        #[arg(long, default_value_t = 0)]
        start: u64,
    },
}

fn replay(scenario: &str, seed: u64) -> String {
    format!("kizuna-sim run --scenario {scenario} --seed {seed}")
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("kizuna-sim: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> Result<bool> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            scenario,
            seed,
            json,
            svg,
            budget_secs,
            max_rss_gib,
            mutant,
            census_hours,
        } => {
            let sc = Scenario::load(&scenario)?;
            let planted = plant(mutant.as_deref())?;
            let deadline = budget_secs.map(|b| Instant::now() + std::time::Duration::from_secs(b));
            let max_rss = match max_rss_gib {
                Some(g) => {
                    anyhow::ensure!(
                        g.is_finite() && g > 0.0,
                        "--max-rss-gib must be a positive number of GiB, not {g}"
                    );
                    Some((g * (1u64 << 30) as f64) as u64)
                }
                None => Some(sim::world::memory_total() / 10 * 9).filter(|&m| m > 0),
            };
            if let Some(h) = census_hours {
                anyhow::ensure!(
                    h.is_finite() && h > 0.0,
                    "--census-hours must be a positive number of hours, not {h}"
                );
            }
            let census = census_hours.map(|h| ((h * 3_600_000.0) as u64).max(1));
            let s = sim::run_seed_with_progress(&sc, seed, deadline, max_rss, planted, census);
            print!("{}", sim::report::table(&s));
            if let Some(p) = json {
                std::fs::write(&p, serde_json::to_string_pretty(&sim::report::json(&s))?)?;
            }
            if let Some(p) = svg {
                std::fs::write(&p, sim::report::svg(&s))?;
            }
            if !s.invariant_violations.is_empty() {
                for v in &s.invariant_violations {
                    println!("  {} at {} ms: {}", v.name, v.at_ms, v.detail);
                }
                let planted = mutant.map(|m| format!(" --mutant {m}")).unwrap_or_default();
                println!("FAILED; replay with: {}{planted}", replay(&scenario, seed));
                return Ok(false);
            }
            if !s.finished {
                // Stopped at its time or memory budget: the final checks
                // (durability, convergence, store scans, mail) never ran.
                println!(
                    "NOT FINISHED ({}): the final checks did not run",
                    s.stopped.as_deref().unwrap_or("stopped early")
                );
                return Ok(false);
            }
            Ok(true)
        }
        Cmd::Sweep {
            scenario,
            seeds,
            start,
            budget_secs,
        } => {
            let sc = Scenario::load(&scenario)?;
            let t0 = Instant::now();
            let mut failing = vec![];
            let mut node_hours = 0.0;
            let mut ran = 0;
            let mut max_rounds = 0;
            // Changes received over all seeds: new, already held, held
            // from stray copies; convergence times after the chaos.
            let (mut new, mut held, mut stray) = (0u64, 0u64, 0u64);
            let mut conv_ms = vec![];
            // One digest of every seed's trace hash, in seed order: a
            // refactor that must not change behaviour keeps it identical.
            let mut traces = blake3::Hasher::new();
            for seed in start..start + seeds {
                if budget_secs.is_some_and(|b| t0.elapsed().as_secs() >= b) {
                    break;
                }
                let s = sim::run_seed(&sc, seed, None);
                ran += 1;
                if !s.finished {
                    println!(
                        "seed {seed}: NOT FINISHED; replay: {}",
                        replay(&scenario, seed)
                    );
                    failing.push(seed);
                }
                traces.update(s.trace_hash.as_bytes());
                node_hours += s.nodes as f64 * s.simulated_hours;
                max_rounds = max_rounds.max(s.convergence_rounds.unwrap_or(0));
                new += s.changes_new;
                held += s.changes_already_held;
                stray += s.stray_changes;
                conv_ms.extend(s.convergence_ms);
                if !s.invariant_violations.is_empty() {
                    let names: std::collections::BTreeSet<&str> =
                        s.invariant_violations.iter().map(|v| v.name).collect();
                    println!(
                        "seed {seed}: FAILED {:?}; replay: {}",
                        names,
                        replay(&scenario, seed)
                    );
                    failing.push(seed);
                }
            }
            let secs = t0.elapsed().as_secs_f64().max(1e-9);
            println!(
                "{ran} seeds in {secs:.1} s ({:.2} seeds/s); {node_hours:.1} simulated node-hours, {:.1} node-hours per wall second; max convergence rounds {max_rounds}",
                ran as f64 / secs,
                node_hours / secs
            );
            conv_ms.sort_unstable();
            println!(
                "changes received per new change {:.3} ({:.3} without stray copies; {new} new, {held} already held, {stray} stray copies); convergence after the chaos mean {:.0} ms, median {} ms, max {} ms",
                (new + held) as f64 / new.max(1) as f64,
                (new + held - stray) as f64 / new.max(1) as f64,
                conv_ms.iter().sum::<u64>() as f64 / conv_ms.len().max(1) as f64,
                conv_ms.get(conv_ms.len() / 2).copied().unwrap_or(0),
                conv_ms.last().copied().unwrap_or(0),
            );
            println!(
                "trace digest of seeds {start}..{}: {}",
                start + ran,
                &traces.finalize().to_hex()[..16]
            );
            if failing.is_empty() {
                println!("all seeds passed");
                Ok(true)
            } else {
                println!("failing seeds: {failing:?}");
                Ok(false)
            }
        }
        Cmd::Mutants {
            scenario,
            seeds,
            start,
        } => mutants(&scenario, seeds, start),
    }
}

/// The planted bug named on the command line (it goes into every engine
/// of the run's world, never into the process).
#[cfg(feature = "mutants")]
fn plant(name: Option<&str>) -> Result<Option<crdt::mutants::Mutant>> {
    let Some(name) = name else { return Ok(None) };
    crdt::mutants::Mutant::ALL
        .into_iter()
        .find(|m| format!("{m:?}") == name)
        .map(Some)
        .ok_or_else(|| anyhow::anyhow!("unknown mutant {name}"))
}

#[cfg(not(feature = "mutants"))]
fn plant(name: Option<&str>) -> Result<Option<sim::world::MutantArg>> {
    anyhow::ensure!(
        name.is_none(),
        "build with `--features mutants` to plant a mutant"
    );
    Ok(None)
}

#[cfg(feature = "mutants")]
fn mutants(scenario: &str, seeds: u64, start: u64) -> Result<bool> {
    let sc = Scenario::load(scenario)?;
    let results = sim::catch_mutants(&sc, seeds, start);
    println!(
        "{:<18} {:<22} {:<5} {}",
        "mutant", "intended invariant", "seed", "invariants fired"
    );
    let mut all = true;
    for r in &results {
        let m = format!("{:?}", r.mutant);
        let fired = r.fired.join(",");
        match r.caught_at {
            Some(seed) => println!(
                "{m:<18} {:<22} {seed:<5} {fired}; same seed without it passes; kizuna-sim run --scenario {scenario} --seed {seed} --mutant {m}",
                sim::intended(r.mutant)
            ),
            None => {
                all = false;
                println!(
                    "{m:<18} {:<22} -     SURVIVED (fired: {})",
                    sim::intended(r.mutant),
                    if fired.is_empty() { "nothing" } else { &fired }
                )
            }
        }
    }
    Ok(all)
}
#[cfg(not(feature = "mutants"))]
fn mutants(_: &str, _: u64, _: u64) -> Result<bool> {
    anyhow::bail!("build with `--features mutants` to run the mutants command")
}
