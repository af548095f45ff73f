//! A synthetic municipal card implementing the default [`CardProfile`], with
//! injectable faults, and the vpcd wire protocol that serves it to pcscd.
//!
//! [`EmuCard`] is a small ISO 7816-4 state machine (selected application,
//! selected EF) that answers SELECT by AID, SELECT EF, READ BINARY and GET
//! RESPONSE. [`Faults`] bends it: no municipal application (6A82), a raw
//! answer or status word at APDU step k, removal at step k, 61xx chaining,
//! 6Cxx, trailing bytes, other file content. Steps count APDUs from 1 since
//! the card was inserted (the emulator connected to vpcd), so "step k" is
//! the k-th APDU of a read on a fresh card. Every APDU received is recorded
//! in full, so tests can prove that no VERIFY and no My Number AID ever
//! reached a card.
//!
//! Unit tests call [`EmuCard`] in memory through [`Transmit`]; the
//! `kizuna-card-emu` binary drives it with [`serve_vpcd`] over TCP to the
//! vsmartcard `vpcd` driver. vpcd framing: every message is a 2-byte
//! big-endian length then the payload; a 1-byte payload is a control
//! message from vpcd (0 power off, 1 power on, 2 reset, 4 get ATR, which we
//! answer with the ATR); anything else is a command APDU, answered with the
//! response APDU. The emulator is the TCP client; vpcd listens on
//! 35963 + slot. Closing the connection removes the card.

use std::io::{self, Read, Write};

use super::apdu::{Transmit, TransportError, JPKI_AP, MY_NUMBER_FACE_AP, MY_NUMBER_TEXT_AP};
use super::profile::{hex, CardProfile};

/// The emulator's ATR: direct convention, T=0 and T=1 offered, no
/// historical bytes (`3B 80 80 01 01`, TCK = 01).
pub const EMU_ATR: [u8; 5] = [0x3B, 0x80, 0x80, 0x01, 0x01];

/// Default size of the ID file; the ID sits at the profile's offset.
const EF_SIZE: usize = 32;

/// Faults to inject. All default to "behave".
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// SELECT of the municipal AID answers 6A82.
    pub no_municipal_app: bool,
    /// At APDU step k (1-based), answer these raw bytes instead, for
    /// `respond_count` consecutive steps.
    pub respond_at_step: Option<(u32, Vec<u8>)>,
    pub respond_count: u32,
    /// At APDU step k, the card is removed (no answer).
    pub remove_at_step: Option<u32>,
    /// READ BINARY answers `61 xx` and GET RESPONSE delivers the data.
    /// `more_data_announce` overrides the announced xx.
    pub more_data: bool,
    pub more_data_announce: Option<u8>,
    /// The first READ BINARY answers `6C xx` (xx = the ID length unless
    /// overridden by `wrong_le_value`).
    pub wrong_le: bool,
    pub wrong_le_value: Option<u8>,
    /// Extra bytes appended to READ BINARY data.
    pub trailing_bytes: usize,
}

/// What the card does with one APDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Respond(Vec<u8>),
    /// The card leaves the field: no answer, connection dropped.
    Removed,
}

/// Every APDU the card saw, in order.
#[derive(Debug, Clone, Default)]
pub struct ReceivedLog {
    pub apdus: Vec<Vec<u8>>,
}

impl ReceivedLog {
    /// True when any received APDU was a PIN command or selected a My
    /// Number application.
    pub fn any_forbidden(&self) -> bool {
        self.apdus.iter().any(|a| is_forbidden_received(a))
    }
}

/// True for VERIFY-family commands and SELECTs mentioning a My Number AID.
pub fn is_forbidden_received(apdu: &[u8]) -> bool {
    if apdu.len() >= 2 && matches!(apdu[1], 0x20 | 0x21 | 0x24 | 0x2C) {
        return true;
    }
    [&MY_NUMBER_TEXT_AP[..], &MY_NUMBER_FACE_AP[..], &JPKI_AP[..]]
        .iter()
        .any(|aid| apdu.windows(aid.len()).any(|w| w == *aid))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Selected {
    None,
    App,
    IdFile,
}

/// The in-memory card.
#[derive(Debug, Clone)]
pub struct EmuCard {
    profile: CardProfile,
    ef: Vec<u8>,
    faults: Faults,
    selected: Selected,
    step: u32,
    pending: Vec<u8>,
    wrong_le_sent: bool,
    removed: bool,
    pub received: ReceivedLog,
}

impl EmuCard {
    /// A card whose ID file holds `content` at the profile's offset.
    pub fn new(profile: CardProfile, content: &[u8], faults: Faults) -> EmuCard {
        let offset = usize::from(profile.offset);
        let mut ef = vec![0u8; (offset + content.len()).max(EF_SIZE)];
        ef[offset..offset + content.len()].copy_from_slice(content);
        // The file ends right after the content so READ BINARY past it fails.
        ef.truncate(offset + content.len());
        EmuCard {
            profile,
            ef,
            faults,
            selected: Selected::None,
            step: 0,
            pending: Vec::new(),
            wrong_le_sent: false,
            removed: false,
            received: ReceivedLog::default(),
        }
    }

    /// A well-behaved card with the default profile and this user ID.
    pub fn with_user_id(user_id: &str) -> EmuCard {
        EmuCard::new(
            CardProfile::default(),
            user_id.as_bytes(),
            Faults::default(),
        )
    }

    /// Power-on or warm reset: back to the MF, nothing selected.
    pub fn reset(&mut self) {
        self.selected = Selected::None;
        self.pending.clear();
    }

    /// APDUs received since insertion.
    pub fn steps(&self) -> u32 {
        self.step
    }

    pub fn handle(&mut self, apdu: &[u8]) -> Answer {
        self.step += 1;
        self.received.apdus.push(apdu.to_vec());
        if self.removed || self.faults.remove_at_step == Some(self.step) {
            self.removed = true;
            return Answer::Removed;
        }
        if let Some((k, raw)) = &self.faults.respond_at_step {
            let count = self.faults.respond_count.max(1);
            if self.step >= *k && self.step < k + count {
                return Answer::Respond(raw.clone());
            }
        }
        Answer::Respond(self.process(apdu))
    }

    fn process(&mut self, apdu: &[u8]) -> Vec<u8> {
        const OK: [u8; 2] = [0x90, 0x00];
        if apdu.len() < 4 {
            return vec![0x67, 0x00];
        }
        let (cla, ins, p1, p2) = (apdu[0], apdu[1], apdu[2], apdu[3]);
        if cla != 0x00 {
            return vec![0x6E, 0x00];
        }
        let body = &apdu[4..];
        match ins {
            0xA4 => {
                let Some((&lc, rest)) = body.split_first() else {
                    return vec![0x67, 0x00];
                };
                if rest.len() < usize::from(lc) {
                    return vec![0x67, 0x00];
                }
                let data = &rest[..usize::from(lc)];
                self.pending.clear();
                match p1 {
                    0x04 => {
                        if !self.faults.no_municipal_app && data == self.profile.aid.as_slice() {
                            self.selected = Selected::App;
                            OK.to_vec()
                        } else {
                            self.selected = Selected::None;
                            vec![0x6A, 0x82]
                        }
                    }
                    0x02 => {
                        if self.selected == Selected::None {
                            return vec![0x69, 0x86];
                        }
                        if data == self.profile.file_id {
                            self.selected = Selected::IdFile;
                            OK.to_vec()
                        } else {
                            vec![0x6A, 0x82]
                        }
                    }
                    _ => vec![0x6A, 0x86],
                }
            }
            0xB0 => {
                if self.selected != Selected::IdFile {
                    return vec![0x69, 0x86];
                }
                if p1 & 0x80 != 0 || body.len() != 1 {
                    return vec![0x6A, 0x86];
                }
                let offset = usize::from(u16::from_be_bytes([p1, p2]));
                if offset > self.ef.len() {
                    return vec![0x6B, 0x00];
                }
                let le = if body[0] == 0 {
                    256
                } else {
                    usize::from(body[0])
                };
                if self.faults.wrong_le && !self.wrong_le_sent {
                    self.wrong_le_sent = true;
                    let xx = self.faults.wrong_le_value.unwrap_or(self.profile.length);
                    return vec![0x6C, xx];
                }
                let available = &self.ef[offset..];
                let mut data: Vec<u8> = available[..le.min(available.len())].to_vec();
                data.extend(std::iter::repeat_n(b'9', self.faults.trailing_bytes));
                let short = data.len() < le && self.faults.trailing_bytes == 0;
                if self.faults.more_data {
                    let xx = self.faults.more_data_announce.unwrap_or(data.len() as u8);
                    self.pending = data;
                    return vec![0x61, xx];
                }
                data.extend_from_slice(if short { &[0x62, 0x82] } else { &OK });
                data
            }
            0xC0 => {
                if self.pending.is_empty() {
                    return vec![0x69, 0x85];
                }
                let le = if body.first() == Some(&0) {
                    256
                } else {
                    usize::from(*body.first().unwrap_or(&0))
                };
                let n = le.min(self.pending.len());
                let mut data: Vec<u8> = self.pending.drain(..n).collect();
                if self.pending.is_empty() {
                    data.extend_from_slice(&OK);
                } else {
                    data.extend_from_slice(&[0x61, self.pending.len().min(255) as u8]);
                }
                data
            }
            // The synthetic card has no PIN: VERIFY has no reference data.
            0x20 => vec![0x6A, 0x88],
            _ => vec![0x6D, 0x00],
        }
    }
}

impl Transmit for EmuCard {
    fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, TransportError> {
        match self.handle(apdu) {
            Answer::Respond(r) => Ok(r),
            Answer::Removed => Err(TransportError::RemovedCard),
        }
    }
}

/// How a vpcd session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// vpcd closed the connection (pcscd stopped or restarted).
    PeerClosed,
    /// The card simulated its removal.
    Removed,
}

/// Largest vpcd message we accept (an extended APDU is at most 65544).
const MAX_VPCD_MSG: usize = 65_544;

/// Serves `card` over one vpcd connection until it ends. `on_apdu` sees
/// every command APDU (for the `--apdu-log` file) before it is answered.
pub fn serve_vpcd<S: Read + Write>(
    stream: &mut S,
    card: &mut EmuCard,
    atr: &[u8],
    mut on_apdu: impl FnMut(&[u8]),
) -> io::Result<SessionEnd> {
    loop {
        let mut len = [0u8; 2];
        match stream.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Ok(SessionEnd::PeerClosed)
            }
            Err(e) => return Err(e),
        }
        let len = usize::from(u16::from_be_bytes(len));
        if len == 0 || len > MAX_VPCD_MSG {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("vpcd message of {len} bytes"),
            ));
        }
        let mut msg = vec![0u8; len];
        stream.read_exact(&mut msg)?;
        if len == 1 {
            match msg[0] {
                0x00 => tracing::debug!("vpcd: power off"),
                0x01 => {
                    tracing::debug!("vpcd: power on");
                    card.reset();
                }
                0x02 => {
                    tracing::debug!("vpcd: reset");
                    card.reset();
                }
                0x04 => write_msg(stream, atr)?,
                other => tracing::warn!(control = other, "vpcd: unknown control message"),
            }
            continue;
        }
        on_apdu(&msg);
        tracing::debug!(header = %hex(&msg[..4.min(msg.len())]), step = card.steps() + 1, "apdu");
        match card.handle(&msg) {
            Answer::Respond(r) => write_msg(stream, &r)?,
            Answer::Removed => return Ok(SessionEnd::Removed),
        }
    }
}

fn write_msg<S: Write>(stream: &mut S, payload: &[u8]) -> io::Result<()> {
    let len = u16::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "payload above 65535 bytes"))?;
    let mut frame = Vec::with_capacity(payload.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(payload);
    stream.write_all(&frame)?;
    stream.flush()
}
