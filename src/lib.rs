//! Shoal: a leaderless HTTP load-balancing reverse proxy.
//!
//! `core` is pure and deterministic; `proxy`, `admin`, `cluster` and `app` are the shells that
//! own sockets, clocks and tasks.

pub mod core;
pub mod config;
pub mod tls;
pub mod telemetry;
pub mod proxy;
pub mod admin;
pub mod app;
pub mod client;
pub mod demo;
