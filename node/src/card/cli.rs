//! `kizuna card …`: read one card, watch a reader, list readers.
//!
//! [`CardCmd::run`] is the whole command; the binary only parses arguments
//! and calls it. Output goes to stdout (one line per tap, or JSON with
//! `--json`); errors go to stderr as "日本語 / English (code, SW)" and give
//! exit code 2 for card errors, 3 when the reader or service is missing,
//! 4 when no card was tapped in time, 1 for configuration errors.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;

use super::apdu::{ApduLog, CardError};
use super::profile::CardProfile;
use super::reader::{establish, list_readers, read_card, ReaderConfig};
use super::watch::{CardEvent, CardWatcher, WatchConfig};

/// Options shared by the reading sub-commands.
#[derive(Debug, Clone, clap::Args)]
pub struct ReadOpts {
    /// Exact PC/SC reader name (default: any reader).
    #[arg(long)]
    pub reader: Option<String>,
    /// TOML file with the card profile (aid, file_id, offset, length, encoding).
    #[arg(long, env = "KIZUNA_CARD_PROFILE")]
    pub profile: Option<PathBuf>,
    /// Append the header of every APDU sent to this file.
    #[arg(long)]
    pub apdu_log: Option<PathBuf>,
    /// Print JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum CardCmd {
    /// Wait for one card, print its user ID and the reader used.
    Read {
        #[command(flatten)]
        opts: ReadOpts,
        /// How long to wait for a card.
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
    },
    /// Print every tap as it happens, plus reader status changes.
    Watch {
        #[command(flatten)]
        opts: ReadOpts,
    },
    /// List the PC/SC readers with their current state.
    Readers,
}

impl CardCmd {
    pub fn run(self) -> ExitCode {
        match self.run_inner() {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        }
    }

    fn run_inner(self) -> anyhow::Result<ExitCode> {
        match self {
            CardCmd::Read { opts, timeout_secs } => {
                let (config, log) = prepare(&opts)?;
                match read_card(&config, Duration::from_secs(timeout_secs), &log) {
                    Ok(tap) => {
                        if opts.json {
                            println!(
                                "{}",
                                json!({"ok": true, "user_id": tap.user_id, "reader": tap.reader})
                            );
                        } else {
                            println!("{}\t{}", tap.user_id, tap.reader);
                        }
                        Ok(ExitCode::SUCCESS)
                    }
                    Err(e) => {
                        report_error(&e, opts.json);
                        Ok(ExitCode::from(exit_code(&e)))
                    }
                }
            }
            CardCmd::Watch { opts } => {
                let (reader, log) = prepare(&opts)?;
                let (watcher, rx) = CardWatcher::spawn_mpsc(WatchConfig {
                    reader,
                    log,
                    ..WatchConfig::default()
                });
                for ev in rx {
                    print_event(&ev, opts.json);
                }
                watcher.stop();
                Ok(ExitCode::SUCCESS)
            }
            CardCmd::Readers => {
                let ctx = establish()
                    .map_err(|e| anyhow::anyhow!("{} / {}", e.message_ja(), e.message_en()))?;
                let readers = list_readers(&ctx)
                    .map_err(|e| anyhow::anyhow!("{} / {}", e.message_ja(), e.message_en()))?;
                let mut states: Vec<pcsc::ReaderState> = readers
                    .iter()
                    .filter_map(|r| std::ffi::CString::new(r.as_str()).ok())
                    .map(|n| pcsc::ReaderState::new(n, pcsc::State::UNAWARE))
                    .collect();
                // A zero timeout just reports the current states.
                let _ = ctx.get_status_change(Duration::ZERO, &mut states);
                for rs in &states {
                    println!("{}\t{:?}", rs.name().to_string_lossy(), rs.event_state());
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

fn prepare(opts: &ReadOpts) -> anyhow::Result<(ReaderConfig, ApduLog)> {
    let profile = match &opts.profile {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading card profile {}", path.display()))?;
            CardProfile::from_toml(&text)
                .with_context(|| format!("card profile {}", path.display()))?
        }
        None => CardProfile::default(),
    };
    let log = match &opts.apdu_log {
        Some(path) => ApduLog::with_file(path)
            .with_context(|| format!("opening APDU log {}", path.display()))?,
        None => ApduLog::new(),
    };
    Ok((
        ReaderConfig {
            reader: opts.reader.clone(),
            profile,
        },
        log,
    ))
}

/// Exit code for a failed read.
pub fn exit_code(e: &CardError) -> u8 {
    match e {
        CardError::NoCard { .. } => 4,
        CardError::ReaderNotFound { .. } => 3,
        CardError::Transport { source, .. } if source.is_service_or_reader_lost() => 3,
        _ => 2,
    }
}

/// The JSON form of a failed read.
pub fn error_json(e: &CardError) -> serde_json::Value {
    json!({
        "ok": false,
        "code": e.code(),
        "step": e.step(),
        "sw": e.sw().map(|sw| sw.to_string()),
        "tap_again": e.is_tap_again(),
        "message_ja": e.message_ja(),
        "message_en": e.message_en(),
    })
}

fn report_error(e: &CardError, as_json: bool) {
    if as_json {
        println!("{}", error_json(e));
    }
    let sw = e.sw().map(|sw| format!(", SW={sw}")).unwrap_or_default();
    eprintln!("{} ({}{sw})", e.message(), e.code());
}

fn print_event(ev: &CardEvent, as_json: bool) {
    match (ev, as_json) {
        (
            CardEvent::Tap {
                user_id, reader, ..
            },
            true,
        ) => {
            println!(
                "{}",
                json!({"event": "tap", "user_id": user_id, "reader": reader})
            )
        }
        (
            CardEvent::Tap {
                user_id, reader, ..
            },
            false,
        ) => println!("tap\t{user_id}\t{reader}"),
        (CardEvent::Status(s), true) => {
            println!(
                "{}",
                json!({"event": "status", "reader_status": s, "message_ja": s.message_ja(), "message_en": s.message_en()})
            )
        }
        (CardEvent::Status(s), false) => {
            println!("status\t{} / {}", s.message_ja(), s.message_en())
        }
        (CardEvent::ReadFailed(e), true) => {
            let mut v = error_json(e);
            v["event"] = json!("read-failed");
            println!("{v}")
        }
        (CardEvent::ReadFailed(e), false) => println!("failed\t{} ({})", e.message(), e.code()),
    }
}
