//! Helpers the node's integration tests share: the `kizuna` binary under
//! test, free loopback ports, and real `kizuna run` processes ([`proc`]).

use std::path::PathBuf;

pub mod proc;

/// The `kizuna` binary under test. `KIZUNA_BIN` overrides the path: with a
/// target dir shared by several worktrees another checkout's `kizuna` can
/// land at the same path.
pub fn kizuna_bin() -> PathBuf {
    std::env::var("KIZUNA_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_kizuna").into())
        .into()
}

/// A TCP port free on loopback right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A UDP port free on loopback right now.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
