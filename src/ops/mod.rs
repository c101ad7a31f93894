//! Watching and steering a peer: the admin API and status page, the event feed, logs and
//! metric names, and systemd's readiness protocol.

pub mod admin;
pub mod events;
pub mod notify;
pub mod telemetry;
