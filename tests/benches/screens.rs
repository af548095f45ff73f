//! The screens' speed, measured in headless Chromium against real nodes.
//! Prints numbers; asserts nothing about time.
//!
//! 1. **HQ dashboard at scale**: a headquarters node with a registry of
//!    `--residents` persons, `--shelters` shelters and `--evacuees`
//!    persons checked in (spread over the shelters), and one shelter node.
//!    - first paint: a fresh navigation to the dashboard until its shelter
//!      table is filled (`performance.now()` at that moment), `--loads`
//!      times; also the browser's first contentful paint;
//!    - live update: a check-in at the shelter node until the dashboard
//!      shows it, end to end, and from the moment the change reached the
//!      dashboard (its server-sent event) to the moment it is on screen.
//! 2. **Shelter tap**: a card tap (`kizuna-card-emu` on vpcd slot 0) until
//!    the household is on the shelter screen, `--taps` times: p50, p99 over
//!    all taps, each checked to show the card holder's household. Split
//!    into stages: pcscd noticing the card (it polls a vpcd reader every
//!    400 ms), our reader loop, the card read, the lookup, the event's way
//!    to the page and the drawing (the node's stages come in the event's
//!    `timing`, the page's in `data-*` attributes; one clock, one machine).
//!
//! ```text
//! cargo build --release -p node --bins
//! cargo bench -p tests --bench screens -- --residents 1000000 --shelters 855 --evacuees 184000
//! cargo bench -p tests --bench screens -- --only taps --taps 100   # the tap part alone
//! ```

#[path = "../browser/harness.rs"]
mod harness;

use anyhow::{bail, Context, Result};
use harness::*;
use serde_json::json;
use std::time::{Duration, Instant};

struct Args {
    /// `--only dashboard` or `--only taps`: run one part.
    only: Option<String>,
    residents: usize,
    shelters: usize,
    evacuees: usize,
    loads: usize,
    updates: usize,
    taps: usize,
}

fn args() -> Args {
    let mut a = Args {
        only: None,
        residents: 30_000,
        shelters: 855,
        evacuees: 6_000,
        loads: 5,
        updates: 20,
        taps: 30,
    };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < v.len() {
        let n = || v.get(i + 1).and_then(|x| x.parse().ok()).expect("a number");
        match v[i].as_str() {
            "--residents" => a.residents = n(),
            "--shelters" => a.shelters = n(),
            "--evacuees" => a.evacuees = n(),
            "--loads" => a.loads = n(),
            "--updates" => a.updates = n(),
            "--taps" => a.taps = n(),
            "--only" => {
                let part = v.get(i + 1).cloned().unwrap_or_default();
                assert!(
                    part == "dashboard" || part == "taps",
                    "--only dashboard|taps"
                );
                a.only = Some(part);
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

/// Waits until pcscd reports a card on vpcd slot `slot` and returns that
/// moment (Unix ms): where the virtual stack hands over to the node.
fn card_present_at(slot: u16) -> Result<u128> {
    use std::ffi::CString;
    let ctx = pcsc::Context::establish(pcsc::Scope::User)?;
    let name = CString::new(format!("Virtual PCD 00 {slot:02}"))?;
    let mut states = [pcsc::ReaderState::new(name, pcsc::State::UNAWARE)];
    let start = Instant::now();
    loop {
        match ctx.get_status_change(Duration::from_millis(500), &mut states) {
            Ok(()) | Err(pcsc::Error::Timeout) => {}
            Err(e) => bail!("pcsc: {e}"),
        }
        if states[0].event_state().contains(pcsc::State::PRESENT) {
            return Ok(std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis());
        }
        states[0].sync_current_state();
        if start.elapsed() > DEADLINE {
            bail!("timed out waiting for the card on slot {slot}");
        }
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize;
    v[idx.min(v.len() - 1)]
}

fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64
}

fn main() -> Result<()> {
    let a = args();
    // `cargo bench` also runs bench binaries with `--bench`; CI only builds.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        if a.only.as_deref() != Some("taps") {
            dashboard(&a).await.context("dashboard")?;
        }
        if a.taps == 0 || a.only.as_deref() == Some("dashboard") {
            return Ok(());
        }
        taps(&a).await.context("taps")
    })
}

async fn dashboard(a: &Args) -> Result<()> {
    use crdt::Role::*;
    let households = a.residents.div_ceil(3);
    let t = Instant::now();
    let csv = node::demo::synthetic_registry(households, 11);
    let residents = csv.lines().count() - 1;
    let shelter_ids: Vec<String> = (1..=a.shelters).map(|i| format!("s-{i:03}")).collect();
    let shelters: Vec<(&str, &str)> = shelter_ids
        .iter()
        .map(|s| (s.as_str(), s.as_str()))
        .collect();
    let specs = [
        NodeSpec {
            id: "hq-1",
            role: Hq,
            card_slot: None,
        },
        NodeSpec {
            id: "s-001",
            role: Shelter,
            card_slot: None,
        },
    ];
    let mut mesh = tokio::task::block_in_place(|| Mesh::create(&specs, &csv, &shelters))?;
    println!(
        "setup: registry of {residents} residents, {} shelters imported in {:.1} s",
        a.shelters,
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    mesh.node("hq-1")
        .start_within(std::time::Duration::from_secs(900))?;
    println!(
        "setup: hq answered {:.1} s after its start",
        t.elapsed().as_secs_f64()
    );
    // Evacuees: persons p000001.. checked in at hq, 200 per request,
    // round-robin over the shelters.
    let t = Instant::now();
    let hq = mesh.node("hq-1");
    let mut k = 0usize;
    while k < a.evacuees.min(residents) {
        let n = 200.min(a.evacuees.min(residents) - k);
        let ids: Vec<String> = (k + 1..=k + n).map(|p| format!("p{p:06}")).collect();
        let shelter = &shelter_ids[(k / 200) % shelter_ids.len()];
        let (s, r) = hq.api(
            "POST",
            "/api/v1/checkins",
            Some(json!({"person_ids": ids, "shelter_id": shelter, "op_id": format!("bench-{k}")})),
        )?;
        anyhow::ensure!(s == 201, "check-in: {s} {r}");
        k += n;
    }
    println!(
        "setup: {k} evacuees checked in at hq in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let b = Browser::start().await?;
    b.c.set_window_size(1600, 1000).await?;
    // First paint twice: hq idle, then hq serving a new shelter node's
    // first sync of the whole registry (what hq does when nodes join).
    first_paint(&b, &mut mesh, a, residents, "hq idle").await?;
    mesh.node("s-001")
        .start_within(std::time::Duration::from_secs(900))?;
    first_paint(
        &b,
        &mut mesh,
        a,
        residents,
        "hq serving a new node's first sync",
    )
    .await?;
    // Live updates are measured once the shelter holds the registry: a
    // check-in made during the first sync waits behind it.
    let t = Instant::now();
    let want = households as u64;
    tokio::task::block_in_place(|| {
        wait_for_long(
            "the shelter's first sync",
            std::time::Duration::from_secs(1800),
            || {
                let (s, v) = mesh.node("s-001").api("GET", "/api/v1/status", None).ok()?;
                (s == 200 && v["documents_by_kind"]["registry"].as_u64()? >= want).then_some(())
            },
        )
    })?;
    println!(
        "setup: the shelter node held the registry ({want} households) {:.1} s after the first paint loads",
        t.elapsed().as_secs_f64()
    );
    // Live updates: field-registered persons checked in at the shelter.
    let s1 = mesh.node("s-001");
    let mut e2e = Vec::new();
    let mut at_hq = Vec::new();
    // Where the time after the event goes: the wait before the page asks
    // for /shelters, the call (of which hq's own time, from its
    // Server-Timing header), and the page drawing the answer.
    let mut phases: [Vec<f64>; 4] = Default::default();
    for i in 0..a.updates {
        b.js("performance.clearResourceTimings(); return 0;")
            .await?;
        let (s, r) = s1.api(
            "POST",
            "/api/v1/persons",
            Some(json!({"name": format!("速報 {i}"), "kana": format!("ソクホウ {i}")})),
        )?;
        anyhow::ensure!(s == 201, "register: {s} {r}");
        let pid = r["person_id"].as_str().unwrap().to_string();
        let before = b
            .js("return Number(document.body.dataset.occupancy);")
            .await?
            .as_f64()
            .unwrap_or(0.0);
        let t0 = now_ms();
        let (s, r) = s1.api(
            "POST",
            "/api/v1/checkins",
            Some(json!({"person_ids": [pid]})),
        )?;
        anyhow::ensure!(s == 201, "check-in: {s} {r}");
        b.c.execute("window.__before = arguments[0];", vec![json!(before)])
            .await?;
        b.wait_js(
            "the update",
            "return Number(document.body.dataset.occupancy) > window.__before;",
        )
        .await?;
        let v = b.js("return [Number(document.body.dataset.eventAt), Number(document.body.dataset.paintedAt)];").await?;
        let (ev, painted) = (
            v[0].as_f64().unwrap_or(f64::NAN),
            v[1].as_f64().unwrap_or(f64::NAN),
        );
        e2e.push(painted - t0);
        at_hq.push(painted - ev);
        let r = b
            .js("const e = performance.getEntriesByType('resource').filter(e => e.name.includes('/api/v1/shelters')).pop(); \
                 if (!e) return null; const st = (e.serverTiming || []).find(x => x.name === 'app'); \
                 return [performance.timeOrigin + e.startTime, performance.timeOrigin + e.responseEnd, st ? st.duration : null];")
            .await?;
        if let Some(r) = r.as_array() {
            let (start, end) = (
                r[0].as_f64().unwrap_or(f64::NAN),
                r[1].as_f64().unwrap_or(f64::NAN),
            );
            phases[0].push(start - ev);
            phases[1].push(end - start);
            phases[2].push(r[2].as_f64().unwrap_or(f64::NAN));
            phases[3].push(painted - end);
        }
    }
    println!(
        "hq dashboard live update ({} check-ins at a shelter node): end to end p50 {:.0} ms, p99 {:.0} ms; after the change reached the dashboard p50 {:.0} ms, p99 {:.0} ms",
        a.updates,
        pct(&mut e2e.clone(), 50.0),
        pct(&mut e2e, 99.0),
        pct(&mut at_hq.clone(), 50.0),
        pct(&mut at_hq, 99.0)
    );
    let [wait, call, server, draw] = &mut phases;
    println!(
        "  of which (p50): event until /shelters asked {:.0} ms; the call {:.0} ms, of which hq's own time {:.0} ms; drawing the answer {:.0} ms ({} of {} updates timed)",
        pct(&mut wait.clone(), 50.0),
        pct(&mut call.clone(), 50.0),
        pct(&mut server.clone(), 50.0),
        pct(&mut draw.clone(), 50.0),
        wait.len(),
        a.updates
    );
    b.close().await;
    // To study hq's queries at this scale afterwards (sqlite3 on a copy).
    if let Some(to) = std::env::var_os("KIZUNA_BENCH_KEEP_HQ") {
        let to = std::path::PathBuf::from(to);
        std::fs::create_dir_all(&to)?;
        for f in ["kizuna.db", "kizuna.db-wal"] {
            let from = mesh.node("hq-1").data().join(f);
            if from.exists() {
                std::fs::copy(&from, to.join(f))?;
            }
        }
        println!("hq's store copied to {}", to.display());
    }
    Ok(())
}

async fn first_paint(
    b: &Browser,
    mesh: &mut Mesh,
    a: &Args,
    residents: usize,
    when: &str,
) -> Result<()> {
    let mut paint = Vec::new();
    let mut fcp = Vec::new();
    let mut calls: std::collections::BTreeMap<String, Vec<(f64, f64, f64)>> = Default::default();
    for _ in 0..a.loads {
        let link = mesh.node("hq-1").link("desk")?;
        b.c.goto(&link).await?;
        let ms = b.wait_js("the dashboard", "return document.body.dataset.ready === '1' && Number(document.body.dataset.readyMs);").await?;
        paint.push(ms.as_f64().unwrap_or(f64::NAN));
        let f = b.js("const p = performance.getEntriesByName('first-contentful-paint')[0]; return p ? p.startTime : null;").await?;
        if let Some(f) = f.as_f64() {
            fcp.push(f);
        }
        // Where the time goes: each API call of the load, from the request
        // leaving the page to its last byte.
        let r = b
            .js("return performance.getEntriesByType('resource').filter(e => e.name.includes('/api/v1/')).map(e => [new URL(e.name).pathname, e.startTime, e.responseEnd, ((e.serverTiming || []).find(x => x.name === 'app') || {}).duration]);")
            .await?;
        for e in r.as_array().into_iter().flatten() {
            let path = e[0].as_str().unwrap_or("?").to_string();
            let (s, end) = (e[1].as_f64().unwrap_or(0.0), e[2].as_f64().unwrap_or(0.0));
            let app = e[3].as_f64().unwrap_or(f64::NAN);
            calls.entry(path).or_default().push((s, end, app));
        }
    }
    let rows = b
        .js("return document.querySelectorAll('#shelters tbody tr').length;")
        .await?;
    let occ = b
        .js("return Number(document.body.dataset.occupancy);")
        .await?;
    println!(
        "hq dashboard first paint, {when} ({rows} shelters, {occ} evacuees, {residents} residents): table filled p50 {:.0} ms, max {:.0} ms; first contentful paint p50 {:.0} ms ({} loads)",
        pct(&mut paint.clone(), 50.0),
        pct(&mut paint, 100.0),
        pct(&mut fcp, 50.0),
        a.loads
    );
    for (path, v) in &calls {
        let mut start: Vec<f64> = v.iter().map(|x| x.0).collect();
        let mut end: Vec<f64> = v.iter().map(|x| x.1).collect();
        let mut app: Vec<f64> = v.iter().map(|x| x.2).collect();
        println!(
            "  {path}: requested at p50 {:.0} ms, answered at p50 {:.0} ms, hq's own time p50 {:.0} ms ({} calls)",
            pct(&mut start, 50.0),
            pct(&mut end, 50.0),
            pct(&mut app, 50.0),
            v.len()
        );
    }
    Ok(())
}

async fn taps(a: &Args) -> Result<()> {
    use crdt::Role::*;
    card_stack_start()?;
    let csv = node::demo::synthetic_registry(300, 5);
    // (card user ID, its holder's household) for every registered card.
    let cards: Vec<(String, String)> = csv
        .lines()
        .skip(1)
        .filter_map(|l| {
            let card = l.rsplit(',').next().filter(|c| c.len() == 13)?;
            let household = l.split(',').next()?;
            Some((card.to_string(), household.to_string()))
        })
        .collect();
    let specs = [
        NodeSpec {
            id: "hq-1",
            role: Hq,
            card_slot: None,
        },
        NodeSpec {
            id: "shelter-01",
            role: Shelter,
            card_slot: Some(0),
        },
    ];
    let mut mesh = tokio::task::block_in_place(|| {
        Mesh::create(&specs, &csv, &[("shelter-01", "三条小学校")])
    })?;
    for n in mesh.nodes.iter_mut() {
        n.start()?;
    }
    let s1 = mesh.node("shelter-01");
    wait_for("the registry at the shelter", || {
        let (s, v) = s1.api("GET", "/api/v1/persons?limit=1000", None).ok()?;
        (s == 200 && v.as_array()?.len() >= csv.lines().count() - 1).then_some(())
    })?;
    let b = Browser::start().await?;
    b.c.goto(&s1.link("desk")?).await?;
    b.wait_js(
        "the reader",
        "return document.getElementById('card-status').dataset.status === 'ready';",
    )
    .await?;
    let mut lat = Vec::new();
    // Stages, each from the previous one's end (ms).
    let mut st: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for i in 0..a.taps {
        let (card, household) = &cards[i % cards.len()];
        let t0 = now_ms();
        let tap = Card::tap(0, card)?;
        let present = tokio::task::block_in_place(|| card_present_at(0))? as f64;
        b.c.execute("window.__t0 = arguments[0];", vec![json!(t0)])
            .await?;
        let v = b
            .wait_js(
                "the household",
                "const d = document.body.dataset; const h = Number(d.householdAt || 0); \
                 return h >= window.__t0 && [h, d.householdId, Number(d.tapEventAt), JSON.parse(d.tapTiming || '{}')];",
            )
            .await?;
        let at = v[0].as_f64().unwrap();
        let shown = v[1].as_str().unwrap_or("");
        anyhow::ensure!(
            shown == household,
            "tap {i}: the screen shows household {shown:?}, the card's is {household:?}"
        );
        let event_at = v[2].as_f64().unwrap_or(f64::NAN);
        let t = &v[3];
        let f = |k: &str| t[k].as_f64().unwrap_or(f64::NAN);
        let (seen, read, lookup, sent) = (
            f("seen_at_ms"),
            f("read_ms"),
            f("lookup_ms"),
            f("sent_at_ms"),
        );
        lat.push(at - t0);
        let mut push = |k, x| st.entry(k).or_default().push(x);
        push("a", present - t0);
        push("b", seen - t0);
        push("c", read);
        push("d", lookup);
        push("e", sent - seen - read - lookup);
        push("f", event_at - sent);
        push("g", at - event_at);
        push("h", at - seen);
        drop(tap);
    }
    println!(
        "shelter tap to household on screen ({} taps, kizuna-card-emu on vpcd, each showed the card's household): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        a.taps,
        pct(&mut lat.clone(), 50.0),
        pct(&mut lat.clone(), 99.0),
        pct(&mut lat, 100.0)
    );
    let names = [
        ("a", "emulator start until pcscd reports the card (to the bench's own PC/SC client)"),
        ("b", "emulator start until the node's reader loop saw the card (pcscd's poll + the loop's wake-up)"),
        ("c", "card read: connect, transaction, 3 APDUs, disconnect"),
        ("d", "registry lookup (engine query)"),
        ("e", "reader thread to the event task (channels)"),
        ("f", "event sent until it reached the page (SSE)"),
        ("g", "event at the page until the household was drawn"),
        ("h", "the node's part: loop saw the card until the household was drawn"),
    ];
    for (k, what) in names {
        let v = st.entry(k).or_default();
        println!(
            "  {what}: p50 {:.1} ms, p99 {:.1} ms",
            pct(&mut v.clone(), 50.0),
            pct(v, 99.0)
        );
    }
    b.close().await;
    Ok(())
}
