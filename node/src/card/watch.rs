//! The long-running reader loop: waits for taps and keeps working through
//! every device fault.
//!
//! [`CardWatcher::spawn`] runs the loop on its own (blocking) thread and
//! hands each [`CardEvent`] to a sink closure; [`CardWatcher::spawn_mpsc`]
//! wraps a `std::sync::mpsc` channel, and a tokio `UnboundedSender` fits the
//! same closure (`move |ev| tx.send(ev).is_ok()`). The loop is a small state
//! machine: establish a PC/SC context (pcscd down → status
//! [`ReaderStatus::ServiceDown`], retry with backoff), list readers (none →
//! [`ReaderStatus::NoReader`], retry with backoff), then wait on the readers
//! plus the PnP pseudo-reader with a bounded `get_status_change`. A card
//! that appears is read exactly once per insertion; the result is a
//! [`CardEvent::Tap`] or a [`CardEvent::ReadFailed`] (a card pulled mid-read
//! is a "tap again" failure, never a partial tap). Any service or reader
//! error drops the context and starts over, which is how the loop recovers
//! when pcscd restarts or a reader is replugged. Status events are sent only
//! when the status changes. Backoff runs from [`WatchConfig::min_backoff`]
//! to [`WatchConfig::max_backoff`]; every wait is bounded by
//! [`WatchConfig::wait_slice`] so [`CardWatcher::stop`] returns promptly.

use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use pcsc::{ReaderState, State, PNP_NOTIFICATION};
use serde::Serialize;

use super::apdu::{ApduLog, CardError, TransportError};
use super::id::UserId;
use super::reader::{establish, list_readers, map_pcsc, read_present_card, ReaderConfig};

/// The reader's state as shown on the banner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum ReaderStatus {
    /// pcscd is not running: degraded mode.
    ServiceDown,
    /// No reader (or not the configured one): degraded mode.
    NoReader { wanted: Option<String> },
    /// Waiting for taps on these readers.
    Ready { readers: Vec<String> },
}

impl ReaderStatus {
    pub fn message_ja(&self) -> String {
        match self {
            ReaderStatus::ServiceDown => {
                "カードサービスが動いていません（カードなしで受付できます）".into()
            }
            ReaderStatus::NoReader { wanted: Some(name) } => {
                format!("カードリーダー「{name}」がありません（カードなしで受付できます）")
            }
            ReaderStatus::NoReader { wanted: None } => {
                "カードリーダーがありません（カードなしで受付できます）".into()
            }
            ReaderStatus::Ready { .. } => "カードをタッチしてください".into(),
        }
    }

    pub fn message_en(&self) -> String {
        match self {
            ReaderStatus::ServiceDown => {
                "card service not running (register without a card)".into()
            }
            ReaderStatus::NoReader { wanted: Some(name) } => {
                format!("no reader {name:?} (register without a card)")
            }
            ReaderStatus::NoReader { wanted: None } => "no reader (register without a card)".into(),
            ReaderStatus::Ready { .. } => "ready: tap a card".into(),
        }
    }
}

/// When the loop saw a card and how long reading it took: the first
/// stages of a tap, carried to the screen's `card_tap` event so a slow
/// tap can be split into stages (no identity in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapTiming {
    /// Wall-clock time at which `get_status_change` reported the card.
    pub seen_at: SystemTime,
    /// Connect, transaction, the APDUs and disconnect.
    pub read: Duration,
}

/// What the watcher reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CardEvent {
    Tap {
        user_id: UserId,
        reader: String,
        timing: TapTiming,
    },
    Status(ReaderStatus),
    ReadFailed(CardError),
}

/// Watcher settings.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    pub reader: ReaderConfig,
    pub log: ApduLog,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Longest single `get_status_change` wait.
    pub wait_slice: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            reader: ReaderConfig::default(),
            log: ApduLog::new(),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            wait_slice: Duration::from_millis(250),
        }
    }
}

/// Handle to the watcher thread; stopping (or dropping) ends it.
pub struct CardWatcher {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl CardWatcher {
    /// Starts the loop. `sink` returns false when nobody listens any more,
    /// which ends the loop.
    pub fn spawn(
        config: WatchConfig,
        sink: impl FnMut(CardEvent) -> bool + Send + 'static,
    ) -> CardWatcher {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("card-watch".into())
            .spawn(move || {
                Loop {
                    config,
                    stop: flag,
                    sink,
                    last_status: None,
                }
                .run()
            })
            .expect("spawning the card watcher thread");
        CardWatcher {
            stop,
            handle: Some(handle),
        }
    }

    /// Starts the loop with a `std::sync::mpsc` channel.
    pub fn spawn_mpsc(config: WatchConfig) -> (CardWatcher, mpsc::Receiver<CardEvent>) {
        let (tx, rx) = mpsc::channel();
        (
            CardWatcher::spawn(config, move |ev| tx.send(ev).is_ok()),
            rx,
        )
    }

    /// Stops the loop and waits for the thread (at most about one wait slice).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for CardWatcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Loop<F> {
    config: WatchConfig,
    stop: Arc<AtomicBool>,
    sink: F,
    last_status: Option<ReaderStatus>,
}

/// Why the inner wait loop ended.
enum Restart {
    Stop,
    Lost(TransportError),
    ReadersChanged,
}

impl<F: FnMut(CardEvent) -> bool> Loop<F> {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn emit(&mut self, ev: CardEvent) {
        if !(self.sink)(ev) {
            self.stop.store(true, Ordering::SeqCst);
        }
    }

    fn status(&mut self, status: ReaderStatus) {
        if self.last_status.as_ref() != Some(&status) {
            tracing::info!(status = %status.message_en(), "card reader status");
            self.last_status = Some(status.clone());
            self.emit(CardEvent::Status(status));
        }
    }

    fn status_for(&mut self, e: TransportError) {
        // When pcscd stops, readers usually vanish first; ask the service
        // itself so the banner names the real cause.
        let service_down = matches!(
            e,
            TransportError::NoService | TransportError::ServiceStopped
        ) || matches!(
            establish().and_then(|ctx| list_readers(&ctx)),
            Err(TransportError::NoService | TransportError::ServiceStopped)
        );
        match e {
            _ if service_down => self.status(ReaderStatus::ServiceDown),
            _ => {
                let wanted = self.config.reader.reader.clone();
                self.status(ReaderStatus::NoReader { wanted })
            }
        }
    }

    /// Sleeps up to `d`, waking early when stopped.
    fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stopped() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }

    fn run(mut self) {
        let mut backoff = self.config.min_backoff;
        while !self.stopped() {
            match self.session() {
                Restart::Stop => break,
                Restart::ReadersChanged => {
                    backoff = self.config.min_backoff;
                    continue;
                }
                Restart::Lost(e) => {
                    tracing::debug!(error = %e, backoff_ms = backoff.as_millis() as u64, "card watcher restarting");
                    self.status_for(e);
                }
            }
            self.pause(backoff);
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
    }

    /// One context's lifetime: list readers, then wait for cards.
    fn session(&mut self) -> Restart {
        let ctx = match establish() {
            Ok(c) => c,
            Err(e) => return Restart::Lost(e),
        };
        let readers = match list_readers(&ctx) {
            Ok(r) => r,
            Err(e) => return Restart::Lost(e),
        };
        let wanted: Vec<String> = match &self.config.reader.reader {
            Some(name) => readers.into_iter().filter(|r| r == name).collect(),
            None => readers,
        };
        if wanted.is_empty() {
            return Restart::Lost(TransportError::NoReadersAvailable);
        }
        self.status(ReaderStatus::Ready {
            readers: wanted.clone(),
        });
        let mut states: Vec<ReaderState> = wanted
            .iter()
            .filter_map(|n| CString::new(n.as_str()).ok())
            .map(|n| ReaderState::new(n, State::UNAWARE))
            .collect();
        states.push(ReaderState::new(PNP_NOTIFICATION(), State::UNAWARE));
        let mut first = true;
        loop {
            if self.stopped() {
                return Restart::Stop;
            }
            match ctx.get_status_change(self.config.wait_slice, &mut states) {
                Ok(()) => {}
                Err(pcsc::Error::Timeout) => continue,
                Err(e) => return Restart::Lost(map_pcsc(e)),
            }
            let seen_at = SystemTime::now();
            let (pnp, readers) = states
                .split_last_mut()
                .expect("the PnP state is always last");
            // The PnP pseudo-reader: a reader came or went.
            if !first && pnp.event_state().contains(State::CHANGED) {
                return Restart::ReadersChanged;
            }
            pnp.sync_current_state();
            let mut inserted = Vec::new();
            for rs in readers.iter_mut() {
                let before = rs.current_state();
                let now = rs.event_state();
                if now.intersects(State::UNKNOWN | State::UNAVAILABLE) {
                    return Restart::Lost(TransportError::ReaderUnavailable);
                }
                if now.contains(State::PRESENT)
                    && !now.contains(State::MUTE)
                    && !before.contains(State::PRESENT)
                {
                    inserted.push(rs.name().to_string_lossy().into_owned());
                }
                rs.sync_current_state();
            }
            for name in inserted {
                let started = Instant::now();
                match read_present_card(&ctx, &name, &self.config.reader.profile, &self.config.log)
                {
                    Ok(tap) => {
                        let read = started.elapsed();
                        // Never the card's user ID: it keys a person's records.
                        tracing::info!(reader = %tap.reader, read_ms = read.as_secs_f64() * 1e3, "card tap");
                        self.emit(CardEvent::Tap {
                            user_id: tap.user_id,
                            reader: tap.reader,
                            timing: TapTiming { seen_at, read },
                        });
                    }
                    Err(CardError::Transport { source, .. })
                        if source.is_service_or_reader_lost() =>
                    {
                        return Restart::Lost(source);
                    }
                    Err(e) => {
                        tracing::warn!(code = e.code(), step = %e.step(), sw = ?e.sw(), "card read failed");
                        self.emit(CardEvent::ReadFailed(e));
                    }
                }
            }
            first = false;
        }
    }
}
