//! The `kizuna` node: drives the [`crdt`] engine over SQLite ([`store`]),
//! on one engine thread ([`driver`]), talks to peers over QUIC with mutual
//! TLS ([`net`]), reads IC cards over PC/SC ([`card`]), serves a JSON API
//! ([`api`]), all set up from one validated [`config::Config`].

pub mod api;
pub mod auth;
pub mod card;
pub mod cli;
pub mod config;
pub mod demo;
pub mod driver;
pub mod import;
pub mod mail;
pub mod net;
pub mod store;
