//! Kizuna's deterministic core.
//!
//! Everything that decides anything lives here: the domain model and its
//! validation, the documents, role policy, the sync protocol and the
//! [`engine::Engine`] that ties them together. This crate never reads a
//! clock, never draws OS randomness and never does IO: time and randomness
//! are arguments, storage is the synchronous [`store::Store`] trait, and the
//! network is bytes in and bytes out. `node` drives it for real, `sim`
//! drives the very same code inside a seeded simulation.

pub mod ids;
pub mod policy;

pub use ids::{DocKey, Kind, NodeId, Role};
pub mod access;
pub mod actor;
pub mod api;
mod cache;
mod commands;
pub mod content;
pub mod derive;
pub mod doc;
pub mod engine;
pub mod hlc;
mod index;
pub mod jst;
mod mail;
pub mod mailtext;
pub mod model;
#[cfg(feature = "mutants")]
pub mod mutants;
pub mod par;
pub mod queries;
mod reconcile;
mod replica;
mod sessions;
#[cfg(any(test, feature = "share"))]
pub mod share;
pub mod signing;
pub mod store;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod text;
pub mod views;
pub mod wire;
