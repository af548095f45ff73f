//! Reading the resident's user ID from a municipal IC card over PC/SC.
//!
//! The model is a pure core driven by thin shells. [`profile`] says which
//! application, file, offset and length hold the 13-digit user ID (it is
//! configuration, because every municipality lays its card out differently);
//! [`apdu`] runs the SELECT / SELECT / READ BINARY conversation over any
//! [`apdu::Transmit`] implementation, maps every status word and transport
//! fault to a typed error with a Japanese and English message, and refuses,
//! before anything reaches a card, any APDU that could touch the Individual
//! Number (My Number) applications or a PIN; [`id`] validates the result.
//! [`reader`] is the real PC/SC transport (the `pcsc` crate), [`watch`] the
//! long-running reader loop that survives a missing reader, a stopped pcscd
//! and cards pulled mid-read, and [`cli`] the `kizuna card` sub-commands.
//! [`emu`] is the synthetic card that the `kizuna-card-emu` binary serves to
//! the vsmartcard `vpcd` driver and that unit tests call in memory, so both
//! transports run against one card model. [`flow`] is what `kizuna run`
//! does with each tap: staff login, household or person lookup, events.
//!
//! To read once: `reader::read_card(&ReaderConfig::default(), timeout, &log)`.
//! To watch: `watch::CardWatcher::spawn(config, sender)` and receive
//! [`watch::CardEvent`]s.
//!
//! Architecture invariants: a read either yields a complete, validated
//! [`id::UserId`] or an error, never a partial identity; the guard in
//! [`apdu::ApduGuard`] sees every APDU before it is sent; digits read from a
//! card never appear in an error, a log line or a `Debug` output unless they
//! form a valid user ID.

pub mod apdu;
pub mod cli;
pub mod emu;
pub mod flow;
pub mod id;
pub mod profile;
pub mod reader;
pub mod watch;

pub use apdu::{ApduGuard, ApduLog, CardError, Transmit, TransportError};
pub use id::{is_individual_number, UserId, UserIdError};
pub use profile::{CardProfile, Encoding};
pub use reader::{read_card, ReaderConfig, Tap};
pub use watch::{CardEvent, CardWatcher, ReaderStatus};

#[cfg(test)]
mod tests;
