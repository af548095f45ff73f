//! The real PC/SC transport: finds a reader, waits for a card, connects in
//! shared mode, runs [`read_user_id`] inside a PC/SC transaction (so no
//! other application can interleave APDUs), and disconnects.
//!
//! [`read_card`] is the one-shot entry point used by `kizuna card read`;
//! [`crate::card::watch::CardWatcher`] reuses [`read_present_card`] for each
//! tap. pcsc errors are mapped to [`TransportError`] by [`map_pcsc`].

use std::ffi::{CStr, CString};
use std::time::{Duration, Instant};

use pcsc::{Context, Disposition, Protocols, ReaderState, Scope, ShareMode, State};
use serde::Serialize;

use super::apdu::{read_user_id, ApduLog, CardError, Step, Transmit, TransportError};
use super::id::UserId;
use super::profile::CardProfile;

/// Which reader to use and how to read the card.
#[derive(Debug, Clone, Default)]
pub struct ReaderConfig {
    /// Exact PC/SC reader name; `None` uses any reader (the first one with a
    /// card).
    pub reader: Option<String>,
    pub profile: CardProfile,
}

/// A successful read: the ID and the reader it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tap {
    pub user_id: UserId,
    pub reader: String,
}

/// Maps a `pcsc::Error` to the transport faults we tell people about.
pub fn map_pcsc(e: pcsc::Error) -> TransportError {
    use pcsc::Error as E;
    match e {
        E::NoService => TransportError::NoService,
        E::ServiceStopped | E::Shutdown => TransportError::ServiceStopped,
        E::NoReadersAvailable => TransportError::NoReadersAvailable,
        E::UnknownReader => TransportError::UnknownReader,
        E::ReaderUnavailable => TransportError::ReaderUnavailable,
        E::RemovedCard => TransportError::RemovedCard,
        E::ResetCard => TransportError::ResetCard,
        E::UnresponsiveCard => TransportError::UnresponsiveCard,
        E::UnpoweredCard => TransportError::UnpoweredCard,
        E::UnsupportedCard | E::CardUnsupported | E::InvalidAtr => TransportError::UnsupportedCard,
        E::NoSmartcard => TransportError::NoSmartcard,
        E::Timeout | E::WaitedTooLong => TransportError::Timeout,
        E::SharingViolation => TransportError::SharingViolation,
        E::CommError | E::CommDataLost | E::NotTransacted => TransportError::CommError,
        E::ProtoMismatch => TransportError::ProtocolMismatch,
        E::InsufficientBuffer => TransportError::InsufficientBuffer,
        E::Cancelled | E::SystemCancelled | E::CancelledByUser => TransportError::Cancelled,
        E::ServerTooBusy | E::NoMemory => TransportError::ServiceBusy,
        other => TransportError::Other { code: other as u32 },
    }
}

/// [`Transmit`] over a connected PC/SC card (or transaction).
pub struct PcscTransmit<'a> {
    card: &'a pcsc::Card,
}

impl<'a> PcscTransmit<'a> {
    pub fn new(card: &'a pcsc::Card) -> Self {
        PcscTransmit { card }
    }
}

impl Transmit for PcscTransmit<'_> {
    fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, TransportError> {
        let mut buf = [0u8; pcsc::MAX_BUFFER_SIZE];
        let resp = self.card.transmit(apdu, &mut buf).map_err(map_pcsc)?;
        Ok(resp.to_vec())
    }
}

/// Lists the reader names pcscd knows. No readers is an empty list.
pub fn list_readers(ctx: &Context) -> Result<Vec<String>, TransportError> {
    match ctx.list_readers_owned() {
        Ok(names) => Ok(names
            .into_iter()
            .map(|n| n.to_string_lossy().into_owned())
            .collect()),
        Err(pcsc::Error::NoReadersAvailable) => Ok(Vec::new()),
        Err(e) => Err(map_pcsc(e)),
    }
}

/// Opens a PC/SC context (fails with `NoService` when pcscd is down).
pub fn establish() -> Result<Context, TransportError> {
    Context::establish(Scope::User).map_err(map_pcsc)
}

/// Reads the card that is present in `reader`: connect (shared), begin a
/// transaction, read, end the transaction and disconnect leaving the card
/// as it is (a reset on transaction end upsets vpcd and gains nothing: the
/// next read selects the application again).
pub fn read_present_card(
    ctx: &Context,
    reader: &str,
    profile: &CardProfile,
    log: &ApduLog,
) -> Result<Tap, CardError> {
    let connect_err = |source| CardError::Transport {
        step: Step::Connect,
        source,
    };
    let name = CString::new(reader).map_err(|_| CardError::ReaderNotFound {
        name: reader.to_owned(),
    })?;
    let mut card = ctx
        .connect(&name, ShareMode::Shared, Protocols::ANY)
        .map_err(|e| connect_err(map_pcsc(e)))?;
    let result = {
        let tx = card.transaction().map_err(|e| connect_err(map_pcsc(e)))?;
        let result = read_user_id(&mut PcscTransmit::new(&tx), profile, log);
        if let Err((_, e)) = tx.end(Disposition::LeaveCard) {
            tracing::debug!(error = %map_pcsc(e), "ending the card transaction failed");
        }
        result
    };
    if let Err((_, e)) = card.disconnect(Disposition::LeaveCard) {
        tracing::debug!(error = %map_pcsc(e), "disconnect failed");
    }
    let user_id = result?;
    Ok(Tap {
        user_id,
        reader: reader.to_owned(),
    })
}

/// Waits up to `timeout` for a card on the configured reader (or any) and
/// reads it once.
pub fn read_card(
    config: &ReaderConfig,
    timeout: Duration,
    log: &ApduLog,
) -> Result<Tap, CardError> {
    let start = Instant::now();
    let connect_err = |source| CardError::Transport {
        step: Step::Connect,
        source,
    };
    let ctx = establish().map_err(connect_err)?;
    let readers = list_readers(&ctx).map_err(connect_err)?;
    let wanted: Vec<String> = match &config.reader {
        Some(name) => {
            if !readers.iter().any(|r| r == name) {
                return Err(if readers.is_empty() {
                    connect_err(TransportError::NoReadersAvailable)
                } else {
                    CardError::ReaderNotFound { name: name.clone() }
                });
            }
            vec![name.clone()]
        }
        None if readers.is_empty() => return Err(connect_err(TransportError::NoReadersAvailable)),
        None => readers,
    };
    let mut states: Vec<ReaderState> = wanted
        .iter()
        .map(|n| ReaderState::new(CString::new(n.as_str()).unwrap_or_default(), State::UNAWARE))
        .collect();
    loop {
        let remaining = timeout.saturating_sub(start.elapsed());
        match ctx.get_status_change(remaining, &mut states) {
            Ok(()) => {}
            Err(pcsc::Error::Timeout) => {
                return Err(CardError::NoCard {
                    waited_ms: start.elapsed().as_millis() as u64,
                })
            }
            Err(e) => return Err(connect_err(map_pcsc(e))),
        }
        for rs in states.iter_mut() {
            let state = rs.event_state();
            if state.contains(State::PRESENT) && !state.contains(State::MUTE) {
                let name = reader_name(rs.name());
                return read_present_card(&ctx, &name, &config.profile, log);
            }
            if state.contains(State::UNKNOWN) || state.contains(State::UNAVAILABLE) {
                return Err(connect_err(TransportError::ReaderUnavailable));
            }
            rs.sync_current_state();
        }
        if start.elapsed() >= timeout {
            return Err(CardError::NoCard {
                waited_ms: start.elapsed().as_millis() as u64,
            });
        }
    }
}

fn reader_name(name: &CStr) -> String {
    name.to_string_lossy().into_owned()
}
