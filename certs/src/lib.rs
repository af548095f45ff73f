//! Kizuna's municipal PKI: who may join the mesh, and as what.
//!
//! Model: each municipality runs one offline CA ([`ca`]) that issues every
//! node a certificate carrying its node id and its role ([`identity`]), and
//! revokes nodes with numbered, signed CRLs ([`crl`]). A node loads its own
//! credentials at startup and refuses to start if anything is off ([`creds`]),
//! judges its own wall clock against its certificate ([`clock`]), and talks to
//! peers only over mutual TLS whose verifiers accept nothing but valid,
//! unrevoked node certificates of its own municipality ([`tls`]). The
//! operator drives the CA through [`cli`] (`kizuna certs …`).
//!
//! Typical node startup:
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! let creds = certs::creds::NodeCredentials::load_dir("/etc/kizuna/tls".as_ref())?;
//! let verdict = certs::clock::clock_sanity(time::OffsetDateTime::now_utc(), &creds.identity);
//! if let Some(msg) = verdict.message() { eprintln!("{msg}"); }
//! let revocation = Arc::new(certs::crl::RevocationState::new(creds.ca.clone()));
//! if let Ok(bytes) = std::fs::read("/var/lib/kizuna/crl.der") { revocation.offer(&bytes)?; }
//! let trust = certs::tls::PeerTrust::new(revocation.clone(), certs::tls::system_clock())?;
//! let server = certs::tls::server_config(&creds, &trust)?;
//! let client = certs::tls::client_config(&creds, &trust)?;
//! # let _ = (server, client); Ok(()) }
//! ```
//!
//! Every parser of untrusted bytes here is size-limited and runs inside a
//! panic boundary; every error is a typed enum whose variants say when they
//! happen.

pub mod ca;
pub mod cli;
pub mod clock;
pub mod creds;
pub mod crl;
pub mod crlstore;
mod fsutil;
pub mod identity;
pub mod storagekey;
pub mod tls;

pub use clock::{clock_sanity, ClockVerdict};
pub use creds::{CredsError, NodeCredentials};
pub use crl::{CrlError, OfferOutcome, RevocationList, RevocationState};
pub use identity::{CertError, NodeIdentity, ROLE_OID, ROLE_OID_STR};
pub use tls::{peer_identity, PeerCertError, PeerTrust, ALPN};
