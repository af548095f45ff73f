//! The crdt crate's one integration test binary.

mod engine;
mod frames;
mod layers;
mod properties;
mod tidy;
