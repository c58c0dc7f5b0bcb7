//! Meta's WhatsApp Cloud API: wire types, webhook signature, the webhook
//! fan-out into records. Pure code.
//!
//! Architecture invariant: nothing in `meta` does I/O or knows about Kafka or
//! HTTP servers; it turns bytes into bytes, so it can be benchmarked and
//! property-tested in isolation.

pub mod errors;
pub mod identity;
pub mod scan;
pub mod signature;
pub mod webhook;
