//! The crdt crate's one integration test binary.

mod engine;
mod layers;
mod properties;
mod tidy;
