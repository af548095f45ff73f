//! `kizuna-testbed` (run it as `deploy/testbed`): an N-node Kizuna mesh in
//! network namespaces on this machine, for exercises, demonstrations and
//! the end-to-end tests. Needs root, iproute2, nftables and curl, and the
//! built `kizuna` binary (next to this one, or `$KIZUNA_BIN`). See
//! [`tests::testbed`] for what it makes and how it cleans up, and
//! docs/operations.md for a walk through it.
//!
//! Exit codes: 0 ok, 1 failure, 2 usage.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tests::testbed::{self, Layout, Plan, State};

#[derive(Parser, Debug)]
#[command(
    name = "deploy/testbed",
    about = "An N-node Kizuna mesh in network namespaces on this machine"
)]
struct Cli {
    /// Testbed name: prefixes its namespaces (NAME-1.., NAME-br).
    #[arg(long, global = true, default_value = "kztb", env = "KIZUNA_TESTBED")]
    name: String,
    /// Directory for its files (default /var/tmp/kizuna-testbed/NAME).
    #[arg(long, global = true, env = "KIZUNA_TESTBED_DIR")]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create CA, certificates, configs, registry and data, and start every
    /// node. On failure everything made is removed again.
    Up {
        #[arg(long, default_value_t = 1)]
        hq: usize,
        #[arg(long, default_value_t = 2)]
        shelters: usize,
        #[arg(long, default_value_t = 1)]
        clinics: usize,
        #[arg(long, default_value_t = 1)]
        ambulances: usize,
        #[arg(long, default_value_t = 0)]
        facilities: usize,
        /// Registry size in residents (about 3 per household).
        #[arg(long, conflicts_with = "households")]
        residents: Option<usize>,
        /// Registry size in households.
        #[arg(long)]
        households: Option<usize>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// No mDNS (nodes meet through static peers only).
        #[arg(long)]
        no_mdns: bool,
        /// No static peers (nodes meet through mDNS only).
        #[arg(long)]
        no_static_peers: bool,
        /// Provision only; start the nodes later with `start`.
        #[arg(long)]
        no_start: bool,
        /// All nodes in one namespace on loopback ports.
        #[arg(long)]
        loopback: bool,
    },
    /// Start nodes that are not running (default: all).
    Start { nodes: Vec<String> },
    /// Cut two groups of nodes apart. A group: a node id, ids separated by
    /// commas, a role (shelter) or `all`.
    Partition {
        a: String,
        b: String,
        /// Drop only what A sends to B.
        #[arg(long)]
        oneway: bool,
    },
    /// End every partition and isolation (or those between A and B).
    Heal {
        a: Option<String>,
        b: Option<String>,
    },
    /// Pull a node's cable (its bridge port down); `heal` plugs it back.
    Isolate { node: String },
    /// Drop PERCENT % of incoming UDP at the nodes (default all; 0 ends it).
    Loss { percent: u8, nodes: Option<String> },
    /// SIGKILL a node (a crash).
    Kill { node: String },
    /// SIGTERM a node and wait for it to stop.
    Stop { node: String },
    /// Stop a node if it runs, then start it again.
    Restart { node: String },
    /// Per node: up, peers, documents, registry, last sync, CRL, URL and
    /// sign-in link.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// One API request to a node with the testbed operator's token.
    Api {
        node: String,
        method: String,
        path: String,
        /// JSON body.
        body: Option<String>,
    },
    /// A node's Prometheus metrics.
    Metrics { node: String },
    /// Stop every node and remove namespaces, links, nftables tables and
    /// files.
    Down {
        /// Keep the directory (logs, databases) for inspection.
        #[arg(long)]
        keep_files: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deploy/testbed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    anyhow::ensure!(
        std::fs::read_to_string("/proc/self/status")
            .map(|s| s
                .lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
            .unwrap_or(false),
        "run as root (network namespaces and nftables)"
    );
    testbed::check_name(&cli.name)?;
    let dir = cli.dir.unwrap_or_else(|| testbed::default_dir(&cli.name));
    let load = || State::load(&dir);
    match cli.cmd {
        Cmd::Up {
            hq,
            shelters,
            clinics,
            ambulances,
            facilities,
            residents,
            households,
            seed,
            no_mdns,
            no_static_peers,
            no_start,
            loopback,
        } => {
            let households = households
                .or(residents.map(|r| r.div_ceil(3)))
                .unwrap_or(200);
            let plan = Plan {
                nodes: Plan::roles(
                    hq,
                    shelters,
                    clinics,
                    ambulances,
                    facilities,
                    !no_static_peers,
                ),
                households,
                seed,
                mdns: !no_mdns,
                layout: if loopback {
                    Layout::Loopback
                } else {
                    Layout::Mesh
                },
                start: !no_start,
            };
            let started = std::time::Instant::now();
            let st = testbed::up(&cli.name, &dir, &testbed::find_kizuna()?, &plan)?;
            eprintln!(
                "testbed {} up in {:.1} s: {} nodes, {} households / {} persons",
                st.name,
                started.elapsed().as_secs_f64(),
                st.nodes.len(),
                st.households,
                st.persons
            );
            print!("{}", testbed::render_status(&st, &testbed::status(&st)));
        }
        Cmd::Start { nodes } => {
            let mut st = load()?;
            let ids = if nodes.is_empty() {
                st.select("all")?
            } else {
                nodes
                    .iter()
                    .map(|n| st.select(n))
                    .collect::<Result<Vec<_>>>()?
                    .concat()
            };
            testbed::start(&mut st, &ids)?;
        }
        Cmd::Partition { a, b, oneway } => {
            let mut st = load()?;
            let (a, b) = (st.select(&a)?, st.select(&b)?);
            testbed::partition(&mut st, &a, &b, oneway)?;
        }
        Cmd::Heal { a, b } => {
            let mut st = load()?;
            match (a, b) {
                (Some(a), Some(b)) => {
                    let (a, b) = (st.select(&a)?, st.select(&b)?);
                    testbed::heal(&mut st, Some((&a, &b)))?
                }
                (None, None) => testbed::heal(&mut st, None)?,
                _ => anyhow::bail!("heal takes no group or two"),
            }
        }
        Cmd::Isolate { node } => {
            let mut st = load()?;
            testbed::isolate(&mut st, &node, true)?;
        }
        Cmd::Loss { percent, nodes } => {
            let mut st = load()?;
            let ids = st.select(nodes.as_deref().unwrap_or("all"))?;
            testbed::loss(&mut st, &ids, percent)?;
        }
        Cmd::Kill { node } => testbed::kill(&mut load()?, &node)?,
        Cmd::Stop { node } => testbed::stop(&mut load()?, &node)?,
        Cmd::Restart { node } => testbed::restart(&mut load()?, &node)?,
        Cmd::Status { json } => {
            let st = load()?;
            let rows = testbed::status(&st);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "name": st.name, "dir": st.dir, "layout": st.layout,
                        "households": st.households, "persons": st.persons,
                        "faults": st.faults, "nodes": rows,
                    }))?
                );
            } else {
                print!("{}", testbed::render_status(&st, &rows));
            }
        }
        Cmd::Api {
            node,
            method,
            path,
            body,
        } => {
            let st = load()?;
            let body = body
                .map(|b| serde_json::from_str(&b))
                .transpose()
                .map_err(|e| anyhow::anyhow!("body is not JSON: {e}"))?;
            let (code, v) = st.api(&node, &method, &path, body.as_ref())?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            anyhow::ensure!((200..300).contains(&code), "HTTP {code}");
        }
        Cmd::Metrics { node } => print!("{}", load()?.scrape(&node)?),
        Cmd::Down { keep_files } => {
            testbed::down(&cli.name, &dir, keep_files)?;
            eprintln!("testbed {} removed", cli.name);
        }
    }
    Ok(())
}
