//! The pure core: pool, balancing, health and consensus state machines.
//!
//! Nothing here touches sockets, clocks, files, tasks or metrics: time and randomness come in as
//! arguments, decisions go out as values. That is what lets the simulation drive it over many
//! seeds and what keeps the request path short.

#![forbid(unsafe_code)]

pub mod autopilot;
pub mod balance;
pub mod detector;
pub mod discovery;
pub mod health;
pub mod paxos;
pub mod pool;
