//! Code only the command line uses: the admin client behind `shoal pool`/`peers`, `shoal cert`
//! and `shoal demo`.

pub mod cert;
pub mod client;
pub mod demo;
