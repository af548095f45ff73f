//! The crdt crate's one integration test binary.

mod engine;
mod properties;
mod tidy;
