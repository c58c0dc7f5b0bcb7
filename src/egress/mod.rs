//! Egress: send requests from Kafka into Meta's Graph API under Meta's
//! limits, one result per request. See `drain` for the lanes and the ordering/commit invariants.
//!
//! Architecture invariant: egress never imports ingress.

pub mod drain;
pub mod graph;
pub mod policy;
pub mod redrive;
pub mod request;
pub mod tier;
