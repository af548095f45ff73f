//! Tap to household: card read through the real PC/SC stack plus the
//! registry lookup, on a registry of N residents.
//!
//! `cargo bench -p node --bench tap -- --residents 1000000 [--lookups 2000]
//! [--reads 300] [--slot 1]` imports a synthetic registry through the engine
//! (`Command::ImportHouseholds`, 5,000 households per batch, as
//! `benches/store.rs` does), then measures:
//!
//! - card read: `read_present_card` (connect, transaction, SELECT AID,
//!   SELECT file, READ BINARY, disconnect) against `kizuna-card-emu` on a
//!   vpcd slot through pcscd, started with `deploy/scripts/card-stack.sh`
//!   like the tests do. If the stack cannot be started the bench says so
//!   and measures the lookup only (`card_read_*` are then null).
//! - lookup: `Query::HouseholdByCard` for random registered cards, through
//!   `Engine::handle` on the SqliteStore.
//!
//! Prints a table and a final JSON line. Numbers only; nothing is asserted
//! about time.

/// The parts of `benches/support/` this benchmark uses (each benchmark
/// compiles only what it uses).
mod support {
    pub mod registry;
    pub mod stats;
}

use crdt::api::*;
use node::card::apdu::ApduLog;
use node::card::reader::{establish, read_present_card};
use node::card::CardProfile;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::ffi::CString;
use std::path::Path;
use std::process::{Child, Command as Proc, Stdio};
use std::time::{Duration, Instant};
use support::{registry::*, stats::*};

struct Emu(Child);

impl Drop for Emu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Card reads through pcscd + vpcd + kizuna-card-emu, or why not.
fn card_reads(slot: u16, reads: usize) -> Result<Vec<f64>, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/scripts/card-stack.sh");
    let out = Proc::new(&script)
        .arg("start")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "card-stack.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let reader = format!("Virtual PCD 00 {slot:02}");
    let emu = Proc::new(env!("CARGO_BIN_EXE_kizuna-card-emu"))
        .args([
            "--port",
            &(35963 + slot).to_string(),
            "--user-id",
            &card_of(7),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start kizuna-card-emu: {e}"))?;
    let _emu = Emu(emu);
    let ctx = establish().map_err(|e| format!("pcscd: {e}"))?;
    // Wait (bounded) for the card to be present in our slot.
    let name = CString::new(reader.clone()).unwrap();
    let start = Instant::now();
    loop {
        let mut st = [pcsc::ReaderState::new(name.clone(), pcsc::State::UNAWARE)];
        if ctx
            .get_status_change(Duration::from_millis(200), &mut st)
            .is_ok()
            && st[0].event_state().contains(pcsc::State::PRESENT)
        {
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(format!("no card appeared in {reader}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let profile = CardProfile::default();
    let log = ApduLog::new();
    let mut ms = Vec::with_capacity(reads);
    for i in 0..reads + 10 {
        let s = Instant::now();
        let tap = read_present_card(&ctx, &reader, &profile, &log)
            .map_err(|e| format!("read failed: {}", e.message_en()))?;
        let d = s.elapsed().as_secs_f64() * 1e3;
        assert_eq!(tap.user_id.as_str(), card_of(7));
        if i >= 10 {
            ms.push(d); // the first reads warm up pcscd and the emulator
        }
    }
    Ok(ms)
}

fn main() {
    let residents = arg("--residents", 100_000) as usize;
    let lookups = arg("--lookups", 2_000).max(1_000) as usize;
    let reads = arg("--reads", 300).max(1) as usize;
    let slot = arg("--slot", 1) as u16;
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let mut hq = build_registry(&dir.path().join("kizuna.db"), residents);
    let import_s = t.elapsed().as_secs_f64();

    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut lookup_ms = Vec::with_capacity(lookups);
    for _ in 0..lookups {
        let c = card_of((rng.next_u64() as usize) % residents);
        let s = Instant::now();
        let out = hq.handle(
            Input::Query {
                query: Query::HouseholdByCard { card_user_id: c },
            },
            now(),
            &mut rng,
        );
        lookup_ms.push(s.elapsed().as_secs_f64() * 1e3);
        assert!(matches!(
            out.first(),
            Some(Output::QueryReply(Ok(QueryReply::Household(Some(_)))))
        ));
    }
    drop(hq);
    let (l50, l99) = (pct(&mut lookup_ms, 0.5), pct(&mut lookup_ms, 0.99));

    let card = card_reads(slot, reads);
    let (c50, c99) = match &card {
        Ok(v) => {
            let mut v = v.clone();
            (Some(pct(&mut v, 0.5)), Some(pct(&mut v, 0.99)))
        }
        Err(why) => {
            println!("card stack not available ({why}); measuring the lookup only");
            (None, None)
        }
    };
    let f = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
    println!("residents                  {residents}");
    println!("import seconds             {import_s:.1}");
    println!(
        "card read p50 / p99 ms     {} / {}   ({} reads via pcscd+vpcd+emu)",
        f(c50),
        f(c99),
        card.as_ref().map(|v| v.len()).unwrap_or(0)
    );
    println!("lookup p50 / p99 ms        {l50:.3} / {l99:.3}   ({lookups} lookups)");
    println!(
        "tap-to-household p50 ms    {}",
        c50.map(|c| format!("{:.2}", c + l50))
            .unwrap_or_else(|| "-".into())
    );
    println!(
        "{}",
        serde_json::json!({
            "card_read_p50_ms": c50, "card_read_p99_ms": c99,
            "lookup_p50_ms": l50, "lookup_p99_ms": l99, "residents": residents,
        })
    );
}
