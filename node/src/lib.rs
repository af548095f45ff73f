//! The `kizuna` node: drives the [`crdt`] engine over SQLite ([`store`]),
//! on one engine thread ([`driver`]), behind a JSON API ([`api`]), set up
//! from one validated [`config::Config`].

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod demo;
pub mod driver;
pub mod import;
pub mod store;
