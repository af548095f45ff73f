//! The node crate's one integration test binary (`cargo nextest run -p node
//! --test it`). Each module is one tier, named by its test-name prefix
//! (`card::…`, `faults::…`); `support` is shared by all of them.
//!
//! | module | what it drives |
//! |---|---|
//! | `card` | pcscd + vpcd + `kizuna-card-emu` (the `card-stack` test group, one at a time) |
//! | `cli` | the `kizuna` binary and the JSON API over real HTTP; configs, the systemd unit, provisioning |
//! | `crash` | `kizuna` killed with SIGKILL mid-write |
//! | `faults` | power cuts, I/O faults and disk full through `faultvfs`; corruption |
//! | `fuzz_regressions` | the committed fuzz seeds and crashers replayed on stable |
//! | `group_commit` | the driver's group commit |
//! | `intake` | registry import and the exports through the binary |
//! | `mail` | family mail against a real SMTP server process |
//! | `net` | the QUIC transport over real sockets |
//! | `privacy` | canaries through real nodes, files and logs |
//! | `provision` | first registry sync progress; metrics off loopback; certificate rotation; retiring a node |
//! | `revocation` | CRLs loaded into running nodes |
//! | `store` | the `Store` conformance suite and durability on SQLite files |

mod support;

mod card;
mod cli;
mod crash;
mod faults;
mod fuzz_regressions;
mod group_commit;
mod intake;
mod mail;
mod net;
mod privacy;
mod provision;
mod revocation;
mod store;
