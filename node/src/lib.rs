//! The `kizuna` node: drives the [`crdt`] engine over SQLite ([`store`]),
//! on one engine thread ([`driver`]), talks to peers over QUIC with mutual
//! TLS ([`net`]), reads IC cards over PC/SC ([`card`]), serves a JSON API
//! ([`api`]) and the browser screens ([`web`]), all set up from one
//! validated [`config::Config`] and assembled by [`run`].
//!
//! Layers, each depending only on those before it: the edges (`store`,
//! `driver`, `net`, `card`, `api`, `web`, `auth`, `mail`, `config`,
//! `console`), then [`run`] (assembly), then the commands built on it
//! (`import`, `export`, `demo`), then [`cli`] (flags and dispatch), which
//! nothing imports.

pub mod api;
pub mod atrest;
pub mod auth;
pub mod backup;
pub mod card;
pub mod check;
pub mod cli;
pub mod config;
pub mod console;
pub mod crlcmd;
pub mod data_api;
pub mod demo;
pub mod driver;
pub mod export;
pub mod import;
pub mod mail;
pub mod metrics;
pub mod net;
pub mod outputs;
pub mod run;
pub mod store;
pub mod upkeep;
pub mod web;
