//! The `node` library: the shells that drive the `crdt` core against real
//! devices and networks. The `kizuna` binary is a thin front over it.

pub mod card;
pub mod net;
pub mod store;
