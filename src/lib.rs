//! Shoal: a leaderless HTTP load-balancing reverse proxy.
//!
//! `core` is pure and deterministic (the pool, balancing, health and consensus state machines);
//! the shells own sockets, clocks, files and tasks: `proxy` (the data plane), `cluster` (the
//! consensus driver and peer transport), `app` (one peer wired from a config: probes, health and
//! discovery loops, reload), `ops` (admin API, events, metrics and logs, systemd), `net`
//! (sockets, TLS, io_uring), `dns` (the resolver). `cli` is code only the command line uses;
//! `sim` the deterministic simulations. `docs/ARCHITECTURE.md` walks through it.

pub mod app;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod core;
pub mod dns;
pub mod net;
pub mod ops;
pub mod proxy;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod sync;
