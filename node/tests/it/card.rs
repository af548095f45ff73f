//! Card reader tests through the real stack: pcscd + the vsmartcard vpcd
//! driver (started idempotently by `deploy/scripts/card-stack.sh`), the
//! `kizuna-card-emu` synthetic card connected to one vpcd slot, and the real
//! PC/SC reader code (library calls and the `kizuna card` binary).
//!
//! All tests share one vpcd slot (default slot 0, "Virtual PCD 00 00";
//! override with `KIZUNA_TEST_VPCD_SLOT`) and some restart pcscd, so they are
//! serialized by a global mutex. There are no sleeps as synchronisation:
//! every wait polls a condition under a deadline that only guards against
//! hangs. Every emulator records the APDUs it receives into one suite log;
//! each test checks that no VERIFY and no My Number AID ever reached a card.

use crate::support::free_port;
use std::ffi::CString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use node::card::apdu::{ApduLog, CardError, Sw, TransportError};
use node::card::emu::is_forbidden_received;
use node::card::reader::{establish, read_card, ReaderConfig};
use node::card::watch::{CardEvent, CardWatcher, ReaderStatus, WatchConfig};
use node::card::{CardProfile, Encoding};

const ID: &str = "1234567890123";
/// Guard against hangs, not a timing assertion.
const DEADLINE: Duration = Duration::from_secs(30);

static SERIAL: Mutex<()> = Mutex::new(());

fn slot() -> u16 {
    std::env::var("KIZUNA_TEST_VPCD_SLOT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}
fn reader_name() -> String {
    format!("Virtual PCD 00 {:02}", slot())
}
fn vpcd_port() -> u16 {
    35963 + slot()
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/scripts/card-stack.sh")
}

fn stack(cmd: &str) {
    let out = Command::new(script())
        .arg(cmd)
        .output()
        .expect("running card-stack.sh");
    assert!(
        out.status.success(),
        "card-stack.sh {cmd} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Takes the suite lock and makes sure pcscd + vpcd run with no card in
/// our slot.
fn setup() -> MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    stack("start");
    wait_reader_empty();
    guard
}

fn suite_log() -> &'static Path {
    static LOG: OnceLock<PathBuf> = OnceLock::new();
    LOG.get_or_init(|| {
        std::env::temp_dir().join(format!("kizuna-card-suite-{}.apdu.log", std::process::id()))
    })
}

/// Polls `f` until it yields a value or the deadline passes.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn reader_state() -> Option<pcsc::State> {
    let ctx = establish().ok()?;
    let mut states = [pcsc::ReaderState::new(
        CString::new(reader_name()).unwrap(),
        pcsc::State::UNAWARE,
    )];
    ctx.get_status_change(Duration::from_millis(200), &mut states)
        .ok()?;
    Some(states[0].event_state())
}

fn wait_reader_empty() {
    wait_for("an empty reader", || {
        reader_state().filter(|s| s.contains(pcsc::State::EMPTY))
    });
}

/// A running `kizuna-card-emu`; dropping it removes the card and waits
/// until pcscd has seen the reader empty (so the next insertion is seen).
struct Emu {
    child: Child,
    log: PathBuf,
}

impl Emu {
    fn start(args: &[&str]) -> Emu {
        let dir = std::env::temp_dir();
        let log = dir.join(format!(
            "kizuna-card-emu-{}-{}.log",
            std::process::id(),
            unique()
        ));
        let child = Command::new(env!("CARGO_BIN_EXE_kizuna-card-emu"))
            .args(["--port", &vpcd_port().to_string(), "--apdu-log"])
            .arg(&log)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting kizuna-card-emu");
        Emu { child, log }
    }

    fn apdus(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Emu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let apdus = std::fs::read_to_string(&self.log).unwrap_or_default();
        // Append this card's APDUs to the suite log, then check them.
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(suite_log())
        {
            let _ = f.write_all(apdus.as_bytes());
        }
        let _ = std::fs::remove_file(&self.log);
        if !std::thread::panicking() {
            assert_no_forbidden(&apdus);
            wait_reader_empty();
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

fn assert_no_forbidden(apdus: &str) {
    for line in apdus.lines() {
        let bytes = node::card::profile::parse_hex("apdu", line).expect("hex APDU line");
        assert!(
            !is_forbidden_received(&bytes),
            "forbidden APDU reached the card: {line}"
        );
        assert_ne!(bytes.get(1), Some(&0x20), "VERIFY reached the card: {line}");
    }
}

/// The `kizuna` binary Cargo built for these tests. (An earlier version
/// copied it to a per-process path in /tmp for worktrees sharing one target
/// directory; every nextest process left a 128 MB copy behind.)
fn kizuna_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kizuna"))
}

fn config() -> ReaderConfig {
    ReaderConfig {
        reader: Some(reader_name()),
        profile: CardProfile::default(),
    }
}

fn read(config: &ReaderConfig) -> (Result<node::card::Tap, CardError>, ApduLog) {
    let log = ApduLog::new();
    (read_card(config, Duration::from_secs(20), &log), log)
}

#[test]
fn reads_the_user_id_through_pcscd() {
    let _g = setup();
    let emu = Emu::start(&["--user-id", ID]);
    let (r, log) = read(&config());
    let tap = r.expect("read");
    assert_eq!(tap.user_id.as_str(), ID);
    assert_eq!(tap.reader, reader_name());
    assert_eq!(
        emu.apdus(),
        ["00A4040C08F04B495A554E4101", "00A4020C020001", "00B000000D"]
    );
    assert!(log.records().iter().all(|r| r.sent && r.header[1] != 0x20));
    drop(emu);

    // Any reader: the first one with a card.
    let emu = Emu::start(&["--user-id", "9876543210987"]);
    let (r, _) = read(&ReaderConfig::default());
    assert_eq!(r.unwrap().user_id.as_str(), "9876543210987");
    drop(emu);
}

#[test]
fn cli_read_prints_the_id_and_reader() {
    let _g = setup();
    let emu = Emu::start(&["--user-id", ID]);
    let out = Command::new(kizuna_bin())
        .args([
            "card",
            "read",
            "--json",
            "--timeout-secs",
            "20",
            "--reader",
            &reader_name(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["user_id"], ID);
    assert_eq!(v["reader"], reader_name());
    drop(emu);

    let emu = Emu::start(&["--no-municipal-app"]);
    let out = Command::new(kizuna_bin())
        .args([
            "card",
            "read",
            "--timeout-secs",
            "20",
            "--reader",
            &reader_name(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("このカードには自治体アプリケーションがありません"),
        "{err}"
    );
    assert!(
        err.contains("This card has no municipal application"),
        "{err}"
    );
    assert!(err.contains("SW=6A82"), "{err}");
    drop(emu);
}

/// F-1: removal at every APDU step k registers nothing and says "tap again".
#[test]
fn removal_at_every_step_registers_nothing() {
    let _g = setup();
    for (variant, steps) in [
        (&[][..], 3u32),
        (&["--more-data"][..], 4),
        (&["--wrong-le"][..], 4),
    ] {
        for k in 1..=steps {
            let mut args = variant.to_vec();
            let ks = k.to_string();
            args.extend(["--remove-at-step", ks.as_str()]);
            let emu = Emu::start(&args);
            let (r, _) = read(&config());
            let e = r.expect_err("a removed card must not yield an ID");
            assert!(e.is_tap_again(), "{variant:?} k={k}: {e:?}");
            assert!(e.message_en().contains("tap again"), "{}", e.message_en());
            assert_eq!(
                emu.apdus().len() as u32,
                k,
                "{variant:?}: the read stopped at the removal"
            );
            drop(emu);
        }
    }
}

/// I-6..I-13 through the real stack: each mapped card answer gives its code
/// and message, and never an ID.
#[test]
fn every_mapped_card_error_gives_its_message() {
    let _g = setup();
    let cases: &[(&[&str], &str, Option<u16>, &str)] = &[
        (
            &["--no-municipal-app"],
            "no-municipal-app",
            Some(0x6A82),
            "This card has no municipal application",
        ),
        (
            &["--fail-at-step", "2", "--fail-sw", "6A82"],
            "no-id-file",
            Some(0x6A82),
            "no user ID file",
        ),
        (
            &["--fail-at-step", "3", "--fail-sw", "6982"],
            "security-not-satisfied",
            Some(0x6982),
            "never uses PINs",
        ),
        (
            &["--fail-at-step", "1", "--fail-sw", "6983"],
            "auth-blocked",
            Some(0x6983),
            "blocked",
        ),
        (
            &["--fail-at-step", "3", "--fail-sw", "63C2"],
            "verification-failed",
            Some(0x63C2),
            "never uses PINs",
        ),
        (
            &["--fail-at-step", "3", "--fail-sw", "6700"],
            "wrong-length",
            Some(0x6700),
            "Unsupported card or reader error (SW=6700)",
        ),
        (
            &["--fail-at-step", "3", "--fail-sw", "6A86"],
            "wrong-p1p2",
            Some(0x6A86),
            "Unsupported card or reader error (SW=6A86)",
        ),
        (
            &["--fail-at-step", "1", "--fail-sw", "6D00"],
            "ins-not-supported",
            Some(0x6D00),
            "Unsupported card or reader error (SW=6D00)",
        ),
        (
            &["--fail-at-step", "1", "--fail-sw", "6E00"],
            "cla-not-supported",
            Some(0x6E00),
            "Unsupported card or reader error (SW=6E00)",
        ),
        (
            &["--fail-at-step", "2", "--fail-sw", "6F00"],
            "no-diagnosis",
            Some(0x6F00),
            "Unsupported card or reader error (SW=6F00)",
        ),
        (
            &[
                "--fail-at-step",
                "3",
                "--fail-sw",
                "6281",
                "--fault-count",
                "2",
            ],
            "data-corrupted",
            Some(0x6281),
            "corrupted",
        ),
        (
            &[
                "--fail-at-step",
                "3",
                "--fail-sw",
                "6282",
                "--fault-count",
                "2",
            ],
            "end-of-file",
            Some(0x6282),
            "ends early",
        ),
        (
            &["--more-data-announce", "20"],
            "bad-more-data",
            Some(0x6114),
            "more-data",
        ),
        (
            &["--wrong-le-value", "5"],
            "bad-wrong-le",
            Some(0x6C05),
            "Invalid length",
        ),
        (
            &["--respond-at-step", "1", "--respond", "90"],
            "response-too-short",
            None,
            "tap again",
        ),
        (
            &["--respond-at-step", "1", "--respond", "AB90009000"],
            "unexpected-data",
            None,
            "Unexpected data",
        ),
        (
            &["--trailing-bytes", "3"],
            "trailing-bytes",
            None,
            "Extra bytes",
        ),
        (
            &["--data", "ascii:12345678901X3"],
            "id-not-digits",
            None,
            "ID must be 13 digits",
        ),
        (
            &["--data", "hex:3132333435363738393031FF33"],
            "id-bad-encoding",
            None,
            "not valid ASCII",
        ),
        (
            &["--data", "ascii:123456789018"],
            "end-of-file",
            Some(0x6282),
            "ends early",
        ),
    ];
    for (args, code, sw, en) in cases {
        let emu = Emu::start(args);
        let (r, _) = read(&config());
        let e = r.expect_err(code);
        assert_eq!(e.code(), *code, "{args:?}: {e:?}");
        assert_eq!(e.sw(), sw.map(Sw), "{args:?}");
        assert!(e.message_en().contains(en), "{args:?}: {}", e.message_en());
        assert!(!e.message_ja().is_empty());
        drop(emu);
    }
    // Protocol features that succeed.
    for args in [
        &["--more-data"][..],
        &["--wrong-le"],
        &["--fail-at-step", "3", "--fail-sw", "6281"],
    ] {
        let emu = Emu::start(args);
        let (r, _) = read(&config());
        assert_eq!(r.expect("read").user_id.as_str(), ID, "{args:?}");
        drop(emu);
    }
}

/// I-13: a card that holds an Individual-Number-shaped value is rejected,
/// and the digits appear in no error text or message.
#[test]
fn individual_number_on_a_card_is_rejected_and_never_echoed() {
    let _g = setup();
    let dir = tempfile::tempdir().unwrap();
    let profile_path = dir.path().join("profile.toml");
    let profile = CardProfile {
        encoding: Encoding::Utf8,
        ..CardProfile::default()
    };
    std::fs::write(&profile_path, toml::to_string(&profile).unwrap()).unwrap();
    let emu = Emu::start(&[
        "--profile",
        profile_path.to_str().unwrap(),
        "--data",
        "ascii:123456789018 ",
    ]);
    let (r, _) = read(&ReaderConfig {
        reader: Some(reader_name()),
        profile: profile.clone(),
    });
    let e = r.unwrap_err();
    assert_eq!(e.code(), "id-individual-number-shaped");
    let shown = format!("{e} {e:?} {}", e.message());
    assert!(!shown.contains("123456789018"), "{shown}");
    drop(emu);

    // Through the CLI: nothing on stdout, the digits nowhere.
    let emu = Emu::start(&[
        "--profile",
        profile_path.to_str().unwrap(),
        "--data",
        "ascii:123456789018 ",
    ]);
    let out = Command::new(kizuna_bin())
        .args([
            "card",
            "read",
            "--json",
            "--timeout-secs",
            "20",
            "--reader",
            &reader_name(),
            "--profile",
        ])
        .arg(&profile_path)
        .env("RUST_LOG", "info,node=debug")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("individual-number-shaped"), "{all}");
    assert!(!all.contains("123456789018"), "{all}");
    // Full-width digits under a UTF-8 profile are the documented
    // normalisation (39 bytes: 13 three-byte digits).
    drop(emu);
    let wide = CardProfile {
        length: 39,
        ..profile
    };
    let wide_path = dir.path().join("wide.toml");
    std::fs::write(&wide_path, toml::to_string(&wide).unwrap()).unwrap();
    let emu = Emu::start(&[
        "--profile",
        wide_path.to_str().unwrap(),
        "--data",
        "hex:EFBC91EFBC92EFBC93EFBC94EFBC95EFBC96EFBC97EFBC98EFBC99EFBC90EFBC91EFBC92EFBC93",
    ]);
    let (r, _) = read(&ReaderConfig {
        reader: Some(reader_name()),
        profile: wide,
    });
    assert_eq!(r.unwrap().user_id.as_str(), ID);
    drop(emu);
}

/// F-4: another application holds the card exclusively.
#[test]
fn sharing_violation_names_the_cause() {
    let _g = setup();
    let emu = Emu::start(&[]);
    let ctx = establish().unwrap();
    let name = CString::new(reader_name()).unwrap();
    let holder = wait_for("an exclusive connection", || {
        ctx.connect(&name, pcsc::ShareMode::Exclusive, pcsc::Protocols::ANY)
            .ok()
    });
    let (r, _) = read(&config());
    let e = r.unwrap_err();
    assert!(
        matches!(
            e,
            CardError::Transport {
                source: TransportError::SharingViolation,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.message_en().contains("Another application"));
    assert!(e.message_ja().contains("別のアプリケーション"));
    drop(holder);
    let (r, _) = read(&config());
    assert_eq!(r.unwrap().user_id.as_str(), ID);
    drop(emu);
}

fn next_event(
    rx: &mpsc::Receiver<CardEvent>,
    what: &str,
    mut pred: impl FnMut(&CardEvent) -> bool,
) -> CardEvent {
    let start = Instant::now();
    loop {
        let left = DEADLINE
            .checked_sub(start.elapsed())
            .unwrap_or_else(|| panic!("timed out waiting for {what}"));
        let ev = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
        if pred(&ev) {
            return ev;
        }
    }
}

/// The event is a tap of the card `user_id` on our reader (its timing
/// differs on every run).
fn assert_tap(ev: &CardEvent, user_id: &str) {
    match ev {
        CardEvent::Tap {
            user_id: got,
            reader,
            ..
        } => {
            assert_eq!(got, &node::card::UserId::parse(user_id).unwrap());
            assert_eq!(reader, &reader_name());
        }
        other => panic!("expected a tap, got {other:?}"),
    }
}

/// F-2: pcscd stopped → "card service not running"; restarted → the
/// watcher and the emulator both reconnect and taps work again.
#[test]
fn pcscd_restart_recovers() {
    let _g = setup();
    let cfg = WatchConfig {
        reader: config(),
        ..WatchConfig::default()
    };
    let (watcher, rx) = CardWatcher::spawn_mpsc(cfg);
    next_event(&rx, "ready", |e| {
        matches!(e, CardEvent::Status(ReaderStatus::Ready { .. }))
    });
    // No --once: the emulator reconnects when vpcd comes back.
    let emu = Emu::start(&["--user-id", ID]);
    let ev = next_event(&rx, "first tap", |e| matches!(e, CardEvent::Tap { .. }));
    assert_tap(&ev, ID);

    stack("stop");
    let ev = next_event(&rx, "service down", |e| {
        matches!(e, CardEvent::Status(ReaderStatus::ServiceDown))
    });
    assert_eq!(ev, CardEvent::Status(ReaderStatus::ServiceDown));
    match ev {
        CardEvent::Status(s) => assert_eq!(
            s.message_en(),
            "card service not running (register without a card)"
        ),
        _ => unreachable!(),
    }
    // A one-shot read says the same.
    let (r, _) = read(&config());
    let e = r.unwrap_err();
    assert!(
        matches!(
            e,
            CardError::Transport {
                source: TransportError::NoService,
                ..
            }
        ),
        "{e:?}"
    );

    stack("start");
    next_event(&rx, "ready again", |e| {
        matches!(e, CardEvent::Status(ReaderStatus::Ready { .. }))
    });
    let ev = next_event(&rx, "tap after restart", |e| {
        !matches!(e, CardEvent::Status(_))
    });
    assert_tap(&ev, ID);
    watcher.stop();
    drop(emu);
}

/// F-2: no reader → "no reader", then the reader returns and taps work.
#[test]
fn no_reader_then_reader_returns() {
    let _g = setup();
    stack("start-no-readers");
    let (r, _) = read(&config());
    let e = r.unwrap_err();
    assert!(
        matches!(
            e,
            CardError::Transport {
                source: TransportError::NoReadersAvailable,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.message_en().contains("No card reader"));

    let cfg = WatchConfig {
        reader: config(),
        ..WatchConfig::default()
    };
    let (watcher, rx) = CardWatcher::spawn_mpsc(cfg);
    let ev = next_event(&rx, "no reader", |e| matches!(e, CardEvent::Status(_)));
    assert_eq!(
        ev,
        CardEvent::Status(ReaderStatus::NoReader {
            wanted: Some(reader_name())
        })
    );

    stack("start");
    next_event(&rx, "ready", |e| {
        matches!(e, CardEvent::Status(ReaderStatus::Ready { .. }))
    });
    let emu = Emu::start(&["--user-id", ID]);
    let ev = next_event(&rx, "tap", |e| !matches!(e, CardEvent::Status(_)));
    assert!(matches!(ev, CardEvent::Tap { .. }), "{ev:?}");
    watcher.stop();
    drop(emu);
}

/// The watcher reports a pulled card as a failed read, never as a tap, and
/// the next tap works.
#[test]
fn watcher_reports_removal_then_next_tap() {
    let _g = setup();
    let (watcher, rx) = CardWatcher::spawn_mpsc(WatchConfig {
        reader: config(),
        ..WatchConfig::default()
    });
    next_event(&rx, "ready", |e| {
        matches!(e, CardEvent::Status(ReaderStatus::Ready { .. }))
    });
    let emu = Emu::start(&["--remove-at-step", "3"]);
    let ev = next_event(&rx, "failed read", |e| !matches!(e, CardEvent::Status(_)));
    match ev {
        CardEvent::ReadFailed(e) => assert!(e.is_tap_again(), "{e:?}"),
        other => panic!("expected a failed read, got {other:?}"),
    }
    drop(emu);
    let emu = Emu::start(&["--user-id", "1111111111111"]);
    let ev = next_event(&rx, "tap", |e| !matches!(e, CardEvent::Status(_)));
    assert_tap(&ev, "1111111111111");
    watcher.stop();
    drop(emu);
}

/// `kizuna card watch --json` prints one JSON line per tap.
#[test]
fn cli_watch_prints_json_taps() {
    let _g = setup();
    let mut child = Command::new(kizuna_bin())
        .args(["card", "watch", "--json", "--reader", &reader_name()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut emu = None;
    let start = Instant::now();
    let tap = loop {
        let left = DEADLINE
            .checked_sub(start.elapsed())
            .expect("timed out waiting for a tap line");
        let line = rx.recv_timeout(left).expect("watch output");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["event"] == "status" && v["reader_status"]["status"] == "ready" && emu.is_none() {
            emu = Some(Emu::start(&["--user-id", ID]));
        }
        if v["event"] == "tap" {
            break v;
        }
    };
    assert_eq!(tap["user_id"], ID);
    assert_eq!(tap["reader"], reader_name());
    let _ = child.kill();
    let _ = child.wait();
    drop(emu);
}

/// The union of every emulator's APDU log so far (each test also checks its
/// own): no VERIFY, no My Number AID.
#[test]
fn suite_apdu_log_has_no_verify_and_no_my_number_aid() {
    let _g = setup();
    let emu = Emu::start(&[]);
    let (r, _) = read(&config());
    r.unwrap();
    drop(emu);
    let text = std::fs::read_to_string(suite_log()).unwrap();
    assert!(text.lines().count() >= 3);
    assert_no_forbidden(&text);
    assert!(
        !text.contains("D392"),
        "a My Number-family AID reached a card"
    );
}

// ----- the node's card flows: `kizuna run` with `[card]` -------------------
//
// The flow test runs a real `kizuna run` on an **hq** node: only an hq data
// directory accepts `kizuna registry import`, and a shelter gets its
// registry only by syncing from hq, which would add a second node and a
// QUIC sync to a card test. The hq role resolves a tap exactly like a
// shelter (household + members, `TapTarget::Household`); the per-role
// difference (ambulance/clinic → the card holder's person id) is tested on
// the resolution function itself over a real SqliteStore in
// `node/src/card/flow.rs` (`resolve_tap_per_role`).

const STAFF: &str = "5555555555555";
const UNKNOWN: &str = "9999999999999";

struct Node {
    child: Child,
    http: std::net::SocketAddr,
    token: String,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kizuna(args: &[&str]) -> String {
    let out = Command::new(kizuna_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "kizuna {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// An hq node with a 2-household registry, a desk operator (token) and a
/// staff operator with a staff card, watching our vpcd reader.
fn start_node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    certs::ca::init_ca(&ca, "Test CA").unwrap();
    let node_id = crdt::NodeId::new("hq-1").unwrap();
    certs::ca::issue(&ca, crdt::Role::Hq, &node_id, &dir.path().join("certs"), 30).unwrap();
    let data = dir.path().join("data");
    let csv = dir.path().join("registry.csv");
    std::fs::write(
        &csv,
        format!(
            "household_id,address,person_id,name,kana,birth_date,card_user_id\n\
             h1,新潟県三条市,p1,山田 太郎,ヤマダ タロウ,1950-04-01,{ID}\n\
             h1,新潟県三条市,p2,山田 花子,ヤマダ ハナコ,1952-05-02,\n\
             h2,新潟県三条市,p3,佐藤 一郎,サトウ イチロウ,1980-01-01,1111111111111\n"
        ),
    )
    .unwrap();
    let d = data.to_str().unwrap();
    kizuna(&[
        "registry",
        "import",
        "--data-dir",
        d,
        "--node-id",
        "hq-1",
        csv.to_str().unwrap(),
    ]);
    let token = kizuna(&["operator", "add", "--data-dir", d, "--name", "desk"])
        .trim()
        .to_string();
    kizuna(&[
        "operator",
        "add",
        "--data-dir",
        d,
        "--name",
        "staff-1",
        "--card",
        STAFF,
    ]);
    // The card alone signs nobody in: the tap needs the operator's PIN.
    let mut pin = Command::new(kizuna_bin())
        .args(["operator", "pin", "--data-dir", d, "--name", "staff-1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        pin.stdin.take().unwrap().write_all(b"2468\n").unwrap();
    }
    assert!(pin.wait().unwrap().success());
    let http: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.path().join("kizuna.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[certs]\ndir = \"certs\"\n[net]\nlisten = \"127.0.0.1:{}\"\nmdns = false\n\
             [http]\nbind = \"{http}\"\n[card]\nreader = \"{}\"\n",
            free_port(),
            reader_name()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("kizuna.log")).unwrap();
    let child = Command::new(kizuna_bin())
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info,node=debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let node = Node {
        child,
        http,
        token,
        _dir: dir,
    };
    wait_for("the node's API", || {
        let r = try_http(node.http, "GET", "/api/v1/status", Some(&node.token), "")?;
        (r.0 == 200).then_some(())
    });
    node
}

/// HTTP/1.0 (no chunking, the server closes): (status, body).
fn try_http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split(' ').nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Some((status, body.to_string()))
}

/// Like [`try_http`] without a token, with extra headers (a `Host` given
/// here replaces the default one).
fn try_http_with(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    let host = headers
        .iter()
        .find(|(k, _)| *k == "Host")
        .map(|(_, v)| *v)
        .unwrap_or("localhost");
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Length: {}\r\nContent-Type: application/json\r\n",
        body.len()
    );
    for (k, v) in headers.iter().filter(|(k, _)| *k != "Host") {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split(' ').nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Some((status, body.to_string()))
}

fn http(
    node: &Node,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    let (s, b) = try_http(node.http, method, path, token, body).expect("http request");
    (
        s,
        serde_json::from_str(&b).unwrap_or(serde_json::Value::Null),
    )
}

/// A subscription to `/api/v1/events`: one JSON value per `data:` line.
struct Events(mpsc::Receiver<serde_json::Value>);

impl Events {
    fn subscribe(node: &Node) -> Events {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(node.http).unwrap();
        write!(
            s,
            "GET /api/v1/events HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\r\n",
            node.token
        )
        .unwrap();
        let mut r = BufReader::new(s);
        // The handler subscribes before answering: after the headers,
        // nothing is missed.
        let mut line = String::new();
        loop {
            line.clear();
            assert!(r.read_line(&mut line).unwrap() > 0, "events stream closed");
            if line == "\r\n" || line == "\n" {
                break;
            }
        }
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in r.lines().map_while(Result::ok) {
                if let Some(d) = line.strip_prefix("data:") {
                    let v: serde_json::Value = serde_json::from_str(d.trim()).unwrap();
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        Events(rx)
    }

    /// The next card event (card_tap, card_error, staff_tap), skipping
    /// engine and status events.
    fn next_card(&self) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let left = DEADLINE
                .checked_sub(start.elapsed())
                .expect("timed out waiting for a card event");
            let v = self.0.recv_timeout(left).expect("a card event");
            if matches!(
                v["type"].as_str(),
                Some("card_tap" | "card_error" | "staff_tap")
            ) {
                return v;
            }
        }
    }
}

fn wait_reader_ready(node: &Node) {
    wait_for("card_reader ready in /api/v1/status", || {
        let (s, v) = http(node, "GET", "/api/v1/status", Some(&node.token), "");
        (s == 200 && v["card_reader"]["status"] == "ready").then_some(())
    });
}

#[test]
fn run_announces_taps_errors_and_staff_sessions() {
    let _g = setup();
    let node = start_node();
    wait_reader_ready(&node);
    let (_, st) = http(&node, "GET", "/api/v1/status", Some(&node.token), "");
    assert_eq!(st["card_reader"]["degraded"], false);
    assert_eq!(st["card_reader"]["readers"][0], reader_name());
    assert_eq!(st["card_reader"]["message_en"], "ready: tap a card");
    let events = Events::subscribe(&node);

    // A registered resident card: the household and its members.
    let emu = Emu::start(&["--user-id", ID]);
    let v = events.next_card();
    assert_eq!(v["type"], "card_tap", "{v}");
    assert_eq!(v["household_id"], "h1");
    assert_eq!(v["reader"], reader_name());
    let members: Vec<_> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["person_id"].as_str().unwrap())
        .collect();
    assert_eq!(members, ["p1", "p2"]);
    assert_eq!(v["members"][0]["location"], serde_json::Value::Null);
    assert!(
        !v.to_string().contains(ID),
        "the card id is not broadcast: {v}"
    );
    // The client may fetch the same household by card.
    let (s, h) = http(
        &node,
        "GET",
        &format!("/api/v1/households/by-card/{ID}"),
        Some(&node.token),
        "",
    );
    assert_eq!((s, &h["household_id"]), (200, &serde_json::json!("h1")));
    drop(emu);
    // A resident card never yields a session.
    let (s, e) = http(
        &node,
        "POST",
        "/api/v1/sessions/card",
        None,
        r#"{"pin":"2468"}"#,
    );
    assert_eq!(s, 403, "{e}");
    assert_eq!(e["error"]["code"], "not_staff");

    // Unknown card: a tap with no household and a reason.
    let emu = Emu::start(&["--user-id", UNKNOWN]);
    let v = events.next_card();
    assert_eq!(v["type"], "card_tap", "{v}");
    assert_eq!(v["household_id"], serde_json::Value::Null);
    assert_eq!(v["reason"], "card_not_in_registry");
    assert!(v["reason_en"]
        .as_str()
        .unwrap()
        .contains("card not in registry"));
    assert!(v["reason_ja"]
        .as_str()
        .unwrap()
        .contains("住民台帳にありません"));
    drop(emu);

    // Removed mid-read: a card_error with a code and no ids; the next event
    // is the next card's tap (nothing registered in between).
    let emu = Emu::start(&["--user-id", ID, "--remove-at-step", "2"]);
    let v = events.next_card();
    assert_eq!(v["type"], "card_error", "{v}");
    assert_eq!(v["tap_again"], true);
    assert!(v["code"].as_str().is_some_and(|c| !c.is_empty()), "{v}");
    assert!(
        v["message_en"].as_str().unwrap().contains("tap again"),
        "{v}"
    );
    assert!(v.get("household_id").is_none() && v.get("person_id").is_none());
    drop(emu);
    let emu = Emu::start(&["--user-id", "1111111111111"]);
    let v = events.next_card();
    assert_eq!(
        (&v["type"], &v["household_id"]),
        (&"card_tap".into(), &"h2".into()),
        "{v}"
    );
    drop(emu);

    // Staff card: staff_tap, then one session whose token works.
    let (s, e) = http(
        &node,
        "POST",
        "/api/v1/sessions/card",
        None,
        r#"{"pin":"2468"}"#,
    );
    assert_eq!(s, 403, "no staff tap yet");
    assert_eq!(
        e["error"]["code"], "not_staff",
        "the last tap was a resident's"
    );
    let emu = Emu::start(&["--user-id", STAFF]);
    let v = events.next_card();
    assert_eq!(v["type"], "staff_tap", "{v}");
    assert_eq!(v["operator"], "staff-1");
    assert!(!v.to_string().contains(STAFF));
    drop(emu);
    // No PIN, a wrong PIN, a foreign page: refused, the tap stays usable.
    let (s, _) = http(&node, "POST", "/api/v1/sessions/card", None, "");
    assert_eq!(s, 415);
    let (s, r) = http(
        &node,
        "POST",
        "/api/v1/sessions/card",
        None,
        r#"{"pin":"1111"}"#,
    );
    assert_eq!(
        (s, r["error"]["code"].as_str()),
        (403, Some("bad_pin")),
        "{r}"
    );
    let (s, r) = try_http_with(
        node.http,
        "POST",
        "/api/v1/sessions/card",
        &[("Origin", "http://evil.example")],
        r#"{"pin":"2468"}"#,
    )
    .unwrap();
    assert_eq!(s, 403, "{r}");
    let (s, r) = try_http_with(
        node.http,
        "POST",
        "/api/v1/sessions/card",
        &[("Host", "evil.example")],
        r#"{"pin":"2468"}"#,
    )
    .unwrap();
    assert_eq!(s, 403, "{r}");
    let (s, sess) = http(
        &node,
        "POST",
        "/api/v1/sessions/card",
        None,
        r#"{"pin":"2468"}"#,
    );
    assert_eq!(s, 201, "{sess}");
    assert_eq!(sess["operator"], "staff-1");
    let token = sess["token"].as_str().unwrap().to_string();
    let (s, _) = http(&node, "GET", "/api/v1/status", Some(&token), "");
    assert_eq!(s, 200);
    let (s, _) = http(&node, "GET", "/api/v1/status", Some("not-a-token"), "");
    assert_eq!(s, 401);
    // One session per tap.
    let (s, _) = http(
        &node,
        "POST",
        "/api/v1/sessions/card",
        None,
        r#"{"pin":"2468"}"#,
    );
    assert_eq!(s, 403);
    // A resident tap after a staff tap cancels it.
    let emu = Emu::start(&["--user-id", STAFF]);
    assert_eq!(events.next_card()["type"], "staff_tap");
    drop(emu);
    let emu = Emu::start(&["--user-id", ID]);
    assert_eq!(events.next_card()["type"], "card_tap");
    drop(emu);
    let (s, _) = http(
        &node,
        "POST",
        "/api/v1/sessions/card",
        None,
        r#"{"pin":"2468"}"#,
    );
    assert_eq!(s, 403);

    // Cardless fallback over the same node: search by kana + birth date,
    // register a person without a card (with the staff session).
    let (s, r) = http(
        &node,
        "GET",
        "/api/v1/search?q=%E3%83%A4%E3%83%9E%E3%83%80&birth_date=1952-05-02",
        Some(&token),
        "",
    );
    assert_eq!(s, 200, "{r}");
    let ids: Vec<_> = r
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["person_id"].clone())
        .collect();
    assert_eq!(ids, [serde_json::json!("p2")]);
    let (s, r) = http(
        &node,
        "GET",
        "/api/v1/search?q=%E3%83%A4%E3%83%9E%E3%83%80",
        Some(&token),
        "",
    );
    assert_eq!((s, r.as_array().unwrap().len()), (200, 2));
    let (s, _) = http(
        &node,
        "GET",
        "/api/v1/search?q=x&birth_date=1952-13-02",
        Some(&token),
        "",
    );
    assert_eq!(s, 400);
    let (s, r) = http(
        &node,
        "POST",
        "/api/v1/persons",
        Some(&token),
        r#"{"name":"鈴木 次郎","kana":"スズキ ジロウ","birth_date":"1990-02-03","note":"カードなし","op_id":"reg-1"}"#,
    );
    assert_eq!(s, 201, "{r}");
    let pid = r["person_id"].as_str().unwrap().to_string();
    let (s, r) = http(
        &node,
        "GET",
        "/api/v1/search?q=%E3%81%99%E3%81%9A%E3%81%8D&birth_date=1990-02-03",
        Some(&token),
        "",
    );
    assert_eq!(s, 200);
    assert_eq!(r[0]["person_id"], pid.as_str(), "{r}");
    drop(events);
    // The card IDs (staff and resident) never reach the node's log, even
    // at debug level; the taps themselves do.
    let log = std::fs::read_to_string(node._dir.path().join("kizuna.log")).unwrap();
    assert!(log.contains("card tap"), "{log}");
    for id in [STAFF, ID, UNKNOWN] {
        assert!(!log.contains(id), "card id {id} in the log");
    }
    drop(node);
}

/// Reader status changes reach `/api/v1/status` and the event stream.
#[test]
fn run_reports_reader_status_changes() {
    let _g = setup();
    let node = start_node();
    wait_reader_ready(&node);
    let events = Events::subscribe(&node);
    stack("stop");
    let start = Instant::now();
    let v = loop {
        let left = DEADLINE.checked_sub(start.elapsed()).expect("card_status");
        let v = events.0.recv_timeout(left).expect("card_status");
        if v["type"] == "card_status" {
            break v;
        }
    };
    assert_eq!(v["status"], "service-down", "{v}");
    assert_eq!(v["degraded"], true);
    assert!(v["message_ja"]
        .as_str()
        .unwrap()
        .contains("カードなしで受付できます"));
    let (_, st) = http(&node, "GET", "/api/v1/status", Some(&node.token), "");
    assert_eq!(st["card_reader"]["status"], "service-down");
    stack("start");
    wait_reader_ready(&node);
    drop(events);
    drop(node);
}
