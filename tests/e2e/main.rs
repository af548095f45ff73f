//! End-to-end tests of the real `kizuna` binary. Needs root (network
//! namespaces, nftables), `curl`, and the binary built in the same profile:
//! `cargo build --release -p node --bin kizuna`.

mod mesh;
mod testbed;
