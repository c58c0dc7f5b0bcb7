//! `wagate-loadgen`'s pieces: a bounded load generator that posts signed
//! Meta-shaped webhooks to a loopback gateway, and a bare hyper server to
//! compare with.
//!
//! Safety: only loopback targets are accepted ([`target`]), and every loop
//! is bounded in count and in time ([`gen`]).

pub mod baseline;
pub mod gen;
pub mod payload;
pub mod report;
pub mod target;
