//! Egress: send requests from Kafka into Meta's Graph API under Meta's
//! limits, one result per request. (In progress: request/result types, the
//! Graph client and the error table are here; the drain is next.)
//!
//! Architecture invariant: egress never imports ingress.

pub mod graph;
pub mod request;
