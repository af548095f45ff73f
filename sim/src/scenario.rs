//! Scenarios are data: TOML files in `sim/scenarios/` describe the nodes,
//! the registry, the evacuee arrivals, links and phases of one simulated
//! disaster. Unknown keys are errors so a typo never silently changes a run.

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// Simulated time before chaos: HQ imports and the registry spreads.
    pub warmup_hours: f64,
    /// Chaos phase (faults and workload).
    pub chaos_hours: f64,
    /// Healed liveness phase: no faults, must converge.
    pub liveness_hours: f64,
    /// Every node gets `Input::Tick` this often.
    pub tick_ms: u64,
    /// Invariants that scan every node run this often (and at the end).
    pub check_every_ms: u64,
    pub nodes: Nodes,
    pub registry: Registry,
    pub arrivals: Arrivals,
    pub medical: Medical,
    pub contacts: Contacts,
    pub topology: Topology,
    #[serde(default)]
    pub faults: FaultLimits,
    /// `EngineConfig.cache_docs` of every node (the engine's default when
    /// absent); large scenarios keep it small, as a tablet would.
    #[serde(default)]
    pub cache_docs: Option<usize>,
    /// Engines share materialised documents (`crdt::share`), up to this
    /// many: a document one node loaded or a change one node applied is not
    /// computed again by the others. Results are identical without it (the
    /// same trace hash); it is what lets hundreds of nodes fit in one
    /// process. Absent: every engine computes everything itself, exactly as
    /// a node does.
    #[serde(default)]
    pub share_docs: Option<usize>,
    /// Every node pushes each new change to every connected peer (protocol
    /// 2's flooding) instead of along the tree: for before/after numbers.
    #[serde(default)]
    pub flood: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nodes {
    pub hq: usize,
    #[serde(default)]
    pub backup_hq: usize,
    pub shelters: usize,
    #[serde(default)]
    pub clinics: usize,
    #[serde(default)]
    pub ambulances: usize,
    #[serde(default)]
    pub facilities: usize,
    /// When set, each shelter node is switched on and joins the mesh this
    /// many hours before its shelter opens (shelters open over
    /// `arrivals.open_spread_hours`), so the registry rolls out as shelters
    /// open instead of reaching every shelter at once. Absent: all at t=0.
    #[serde(default)]
    pub join_before_open_hours: Option<f64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    pub households: usize,
    /// Members per household are drawn from 1..=max_members.
    pub max_members: usize,
    /// Households per import command (the engine allows 20,000).
    #[serde(default = "default_import_batch")]
    pub import_batch: usize,
    /// Nodes were installed in peacetime and already hold the registry and
    /// the shelter list when the disaster starts: HQ imports them before
    /// t=0 and every other node starts from a copy of those documents (one
    /// copy in memory, shared until a node changes it). Without it the
    /// registry spreads from HQ over the mesh during warmup.
    #[serde(default)]
    pub provisioned: bool,
}

fn default_import_batch() -> usize {
    2000
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arrivals {
    /// Persons checked in over the chaos phase.
    pub evacuees: usize,
    pub desks_per_shelter: usize,
    /// Check-ins per hour per desk, drawn per desk from this range.
    pub per_desk_hour: [u32; 2],
    /// Shelters open at times spread over this many hours after warmup.
    pub open_spread_hours: f64,
    /// Fraction of arriving households also checked in, at the same
    /// moment, at a second shelter (D-1).
    #[serde(default)]
    pub double_checkin_fraction: f64,
    /// Fraction of check-ins submitted twice with the same op id (D-3).
    #[serde(default)]
    pub double_submit_fraction: f64,
    /// Fraction of checked-in households checked out later.
    #[serde(default)]
    pub checkout_fraction: f64,
    /// Fraction of checked-in households transferred later to another
    /// shelter (a departure from the first; the second checks them in).
    #[serde(default)]
    pub transfer_fraction: f64,
    /// Commands carrying an Individual Number (plain, full-width,
    /// hyphenated, spaced) in free text; each must be refused and none
    /// may reach a frame, a store or a mail.
    #[serde(default)]
    pub adversarial_inputs: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Medical {
    pub profiles: usize,
    /// Reads by ambulances over the chaos phase.
    pub reads: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contacts {
    /// Fraction of persons with family contacts.
    pub fraction: f64,
    /// Fraction of contacts with consent.
    pub consent_fraction: f64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Shelters with a direct link to headquarters; the others reach it
    /// through a tree of shelters.
    pub hq_gateways: usize,
    /// Link profile from HQ to gateway shelters: lan, mobile or satellite.
    pub hq_link: String,
    /// Fractions of shelter-to-shelter links that are satellite or mobile
    /// (the rest are LAN-like).
    pub satellite_fraction: f64,
    pub mobile_fraction: f64,
    /// Extra shelter-to-shelter links (cycles), as a fraction of shelters.
    pub extra_links: f64,
}

/// Upper bounds for the per-seed fault draw; 0 or false disables a fault.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultLimits {
    pub loss: f64,
    pub duplication: f64,
    pub reorder: bool,
    pub clog: bool,
    pub partitions: bool,
    pub crashes: bool,
    pub io_errors: bool,
    pub skew: bool,
    pub smtp: bool,
    pub restore_backup: bool,
    pub hq_failover: bool,
    /// Faults per chaos hour at full intensity.
    pub events_per_hour: f64,
    /// Forged and hostile changes from a compromised shelter.
    #[serde(default = "yes")]
    pub hostile: bool,
}

fn yes() -> bool {
    true
}

impl Default for FaultLimits {
    fn default() -> Self {
        FaultLimits {
            loss: 0.30,
            duplication: 0.50,
            reorder: true,
            clog: true,
            partitions: true,
            crashes: true,
            io_errors: true,
            skew: true,
            smtp: true,
            restore_backup: true,
            hq_failover: true,
            events_per_hour: 20.0,
            hostile: true,
        }
    }
}

impl Scenario {
    pub fn load(path: &str) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read scenario {path}: {e}"))?;
        let s: Scenario =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("scenario {path}: {e}"))?;
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.nodes.hq >= 1, "at least one hq node");
        anyhow::ensure!(self.nodes.shelters >= 1, "at least one shelter");
        anyhow::ensure!(self.tick_ms >= 100, "tick_ms must be at least 100");
        anyhow::ensure!(self.registry.max_members >= 1 && self.registry.max_members <= 30);
        anyhow::ensure!(self.registry.import_batch >= 1 && self.registry.import_batch <= 20_000);
        anyhow::ensure!(self.arrivals.per_desk_hour[0] >= 1);
        anyhow::ensure!(self.arrivals.per_desk_hour[0] <= self.arrivals.per_desk_hour[1]);
        anyhow::ensure!(self.topology.hq_gateways >= 1);
        for l in [&self.topology.hq_link] {
            anyhow::ensure!(
                ["lan", "mobile", "satellite"].contains(&l.as_str()),
                "unknown link profile {l}"
            );
        }
        Ok(())
    }

    pub fn total_ms(&self) -> u64 {
        ((self.warmup_hours + self.chaos_hours + self.liveness_hours) * 3_600_000.0) as u64
    }
    pub fn warmup_ms(&self) -> u64 {
        (self.warmup_hours * 3_600_000.0) as u64
    }
    pub fn chaos_end_ms(&self) -> u64 {
        ((self.warmup_hours + self.chaos_hours) * 3_600_000.0) as u64
    }
}
