//! wagate: a gateway between Meta's WhatsApp Business Platform (Cloud API)
//! and Kafka. See ARCHITECTURE.md for the map of this crate.
//!
//! No unsafe code but in two named places: `kafka::batch` (librdkafka's
//! batch consume) and the cache-line prefetch hints of `contacts`.
#![deny(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod admin;
pub mod app;
pub mod clock;
pub mod config;
pub mod contacts;
pub mod doctor;
pub mod egress;
pub mod http;
pub mod ingress;
pub mod kafka;
pub mod media;
pub mod meta;
pub mod metrics;
pub mod numbers;
pub mod ratelimit;
pub mod replay;
pub mod sandbox;
pub mod templates;
pub mod tls;
