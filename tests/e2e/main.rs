//! End-to-end tests of the real `kizuna` binary on the namespace testbed
//! (`deploy/testbed`, the `kizuna-testbed` binary of this package). Needs
//! root (network namespaces, nftables), `curl`, and `kizuna` built in the
//! same profile: `cargo build --release -p node --bin kizuna`.

mod field;
mod mesh;
mod testbed;
