//! Shoal: a leaderless HTTP load-balancing reverse proxy.
//!
//! `core` is pure and deterministic; `proxy`, `admin`, `cluster` and `app` are the shells that
//! own sockets, clocks and tasks.

pub mod admin;
pub mod app;
pub mod cert;
pub mod client;
pub mod cluster;
pub mod config;
pub mod core;
pub mod demo;
pub mod discovery;
pub mod events;
pub mod net;
pub mod notify;
pub mod probe;
pub mod proxy;
pub mod sim;
pub mod sync;
pub mod telemetry;
pub mod tls;
pub mod uring;
