//! `kizuna-card-emu`: a synthetic municipal IC card for the vsmartcard
//! `vpcd` reader driver, used by the card tests and for demos.
//!
//! It connects to vpcd (TCP, default localhost:35963 = "Virtual PCD 00 00";
//! 35964 is slot 1), which makes pcscd see a card inserted; exiting or
//! dropping the connection removes it. It serves
//! [`node::card::emu::EmuCard`] with the default card profile and the given
//! user ID, with faults chosen by flags, records every APDU it receives in
//! hex to `--apdu-log`, and reconnects when vpcd goes away (pcscd restart)
//! unless `--once` is given. After a simulated removal
//! (`--remove-at-step`) it exits, so the card stays removed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use node::card::emu::{serve_vpcd, EmuCard, Faults, SessionEnd, EMU_ATR};
use node::card::profile::{hex, parse_hex, CardProfile};

#[derive(Parser, Debug)]
#[command(
    name = "kizuna-card-emu",
    about = "Synthetic municipal IC card for vpcd"
)]
struct Args {
    /// vpcd host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// vpcd port (35963 + slot).
    #[arg(long, default_value_t = 35963)]
    port: u16,
    /// The user ID stored on the card.
    #[arg(long, default_value = "1234567890123")]
    user_id: String,
    /// Raw file content instead of the user ID: `ascii:TEXT` or `hex:BYTES`.
    #[arg(long)]
    data: Option<String>,
    /// Card profile TOML (default: the synthetic default profile).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// SELECT of the municipal application answers 6A82.
    #[arg(long)]
    no_municipal_app: bool,
    /// Answer `--fail-sw` (hex status word) at APDU step K (1-based).
    #[arg(long, requires = "fail_sw")]
    fail_at_step: Option<u32>,
    #[arg(long, requires = "fail_at_step")]
    fail_sw: Option<String>,
    /// Answer these raw hex bytes at APDU step K (e.g. a 1-byte response).
    #[arg(long, requires = "respond")]
    respond_at_step: Option<u32>,
    #[arg(long, requires = "respond_at_step")]
    respond: Option<String>,
    /// How many consecutive steps the fail/respond fault lasts.
    #[arg(long, default_value_t = 1)]
    fault_count: u32,
    /// Simulate removal at APDU step K: drop the connection, then exit.
    #[arg(long)]
    remove_at_step: Option<u32>,
    /// READ BINARY answers 61xx; GET RESPONSE delivers the data.
    #[arg(long)]
    more_data: bool,
    /// Announce this xx in 61xx instead of the true length.
    #[arg(long)]
    more_data_announce: Option<u8>,
    /// The first READ BINARY answers 6Cxx.
    #[arg(long)]
    wrong_le: bool,
    /// Announce this xx in 6Cxx instead of the true length.
    #[arg(long)]
    wrong_le_value: Option<u8>,
    /// Append N extra bytes to READ BINARY data.
    #[arg(long, default_value_t = 0)]
    trailing_bytes: usize,
    /// ATR in hex.
    #[arg(long)]
    atr: Option<String>,
    /// Append every received APDU (hex, one per line) to this file.
    #[arg(long)]
    apdu_log: Option<PathBuf>,
    /// Exit when vpcd closes the connection instead of reconnecting.
    #[arg(long)]
    once: bool,
    /// Give up if vpcd cannot be reached for this long.
    #[arg(long, default_value_t = 60)]
    connect_timeout_secs: u64,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let profile = match &args.profile {
        Some(p) => CardProfile::from_toml(&std::fs::read_to_string(p)?)?,
        None => CardProfile::default(),
    };
    let content: Vec<u8> = match &args.data {
        Some(d) if d.starts_with("ascii:") => d.as_bytes()["ascii:".len()..].to_vec(),
        Some(d) if d.starts_with("hex:") => parse_hex("data", &d["hex:".len()..])?,
        Some(d) => d.as_bytes().to_vec(),
        None => args.user_id.as_bytes().to_vec(),
    };
    let sw_bytes = |s: &str| -> anyhow::Result<Vec<u8>> {
        let b = parse_hex("fail-sw", s)?;
        anyhow::ensure!(b.len() == 2, "--fail-sw takes 2 bytes, e.g. 6982");
        Ok(b)
    };
    let respond_at_step = match (
        args.fail_at_step,
        &args.fail_sw,
        args.respond_at_step,
        &args.respond,
    ) {
        (Some(k), Some(sw), _, _) => Some((k, sw_bytes(sw)?)),
        (_, _, Some(k), Some(raw)) => Some((k, parse_hex("respond", raw)?)),
        _ => None,
    };
    let faults = Faults {
        no_municipal_app: args.no_municipal_app,
        respond_at_step,
        respond_count: args.fault_count,
        remove_at_step: args.remove_at_step,
        more_data: args.more_data || args.more_data_announce.is_some(),
        more_data_announce: args.more_data_announce,
        wrong_le: args.wrong_le || args.wrong_le_value.is_some(),
        wrong_le_value: args.wrong_le_value,
        trailing_bytes: args.trailing_bytes,
    };
    let atr = match &args.atr {
        Some(a) => parse_hex("atr", a)?,
        None => EMU_ATR.to_vec(),
    };
    let mut apdu_log = match &args.apdu_log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ),
        None => None,
    };
    let addr = format!("{}:{}", args.host, args.port);
    loop {
        let stream = connect(&addr, Duration::from_secs(args.connect_timeout_secs))?;
        stream.set_nodelay(true)?;
        tracing::info!(%addr, "card inserted (connected to vpcd)");
        // A fresh card per insertion: steps count from 1 again.
        let mut card = EmuCard::new(profile.clone(), &content, faults.clone());
        let mut stream = QuickAck(stream);
        let end = serve_vpcd(&mut stream, &mut card, &atr, |apdu| {
            if let Some(f) = apdu_log.as_mut() {
                let _ = writeln!(f, "{}", hex(apdu));
                let _ = f.flush();
            }
        });
        match end {
            Ok(SessionEnd::Removed) => {
                tracing::info!(step = card.steps(), "card removed (simulated)");
                drop(stream);
                return Ok(());
            }
            Ok(SessionEnd::PeerClosed) => tracing::info!("vpcd closed the connection"),
            Err(e) => tracing::warn!(error = %e, "vpcd connection error"),
        }
        if args.once {
            return Ok(());
        }
    }
}

/// The vpcd connection, acknowledging every read at once.
///
/// Debian's vpcd (vsmartcard 3.3) sends each message as two writes, the
/// 2-byte length and then the payload, on a socket without TCP_NODELAY.
/// Nagle's algorithm holds the payload until the length is acknowledged,
/// and Linux delays that ACK (about 40 ms here) because we answer in a
/// request/response rhythm. Measured with strace on pcscd: every vpcd
/// message after the first waited ~43 ms, three at each insertion (the
/// power-up) and one per APDU, which a card on a real reader never costs.
/// Setting TCP_QUICKACK after a read sends the pending ACK at once; Linux
/// leaves quick-ack mode by itself, so it is set after every read.
struct QuickAck(TcpStream);

impl Read for QuickAck {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        // Best effort: without it the card still works, only slower.
        let _ = rustix::net::sockopt::set_tcp_quickack(&self.0, true);
        Ok(n)
    }
}

impl Write for QuickAck {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Connects to vpcd, retrying with backoff (vpcd listens only while pcscd
/// runs).
fn connect(addr: &str, give_up_after: Duration) -> anyhow::Result<TcpStream> {
    let start = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() < give_up_after => {
                tracing::debug!(error = %e, "vpcd not reachable yet");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(e) => anyhow::bail!("cannot reach vpcd at {addr} within {give_up_after:?}: {e}"),
        }
    }
}
