//! Inbound media (DESIGN §13): every image, audio, video, document and
//! sticker of `wa.inbound.messages` fetched from Meta into an object store,
//! and exactly one `wa.inbound.media` record per item.
//!
//! - `record.rs`: the media item of an InboundMessage record, the
//!   `wa.inbound.media` record and its error;
//! - `fetch.rs`: Meta's lookup and download, classified (retry or not);
//! - `store.rs`: the object store (`file://`, `s3://`), whole-or-nothing
//!   writes, erasure by user, the retention sweep;
//! - `worker.rs`: the consumer group, the tasks, the commit tracker.
//!
//! Architecture invariants:
//! - the webhook path never waits for media: the worker reads the durable
//!   records, after the 200;
//! - an offset is committed only when the record of every media item at or
//!   before it in its partition is acknowledged by Kafka;
//! - an object is visible only whole and with the SHA-256 Meta announced
//!   (a mismatch aborts the upload: `failed`, nothing stored).

pub mod fetch;
pub mod record;
pub mod store;
pub mod worker;

pub use record::{media_item, ItemError, MediaItem, MediaRecord};
pub use store::Store;
pub use worker::Media;

/// The `wagate_media_*` metrics.
pub mod metrics {
    pub use crate::metrics::{
        MEDIA_BYTES as BYTES, MEDIA_DELETED as DELETED, MEDIA_FETCHES as FETCHES,
        MEDIA_FETCH_SECONDS as FETCH_SECONDS,
        MEDIA_OLDEST_PENDING_SECONDS as OLDEST_PENDING_SECONDS, MEDIA_PENDING as PENDING,
        MEDIA_RETRIES as RETRIES, MEDIA_REUSED as REUSED, MEDIA_SKIPPED as SKIPPED,
    };

    /// Describes them and publishes the counters at 0.
    pub fn describe() {
        use ::metrics::{counter, describe_counter, describe_gauge};
        describe_counter!(
            FETCHES,
            "Media items by outcome (stored, failed) and reason."
        );
        describe_counter!(BYTES, "Media bytes downloaded from Meta.");
        describe_counter!(RETRIES, "Media lookups or downloads retried, by reason.");
        describe_gauge!(PENDING, "Media items read from Kafka and not yet recorded.");
        describe_gauge!(
            OLDEST_PENDING_SECONDS,
            "Age of the oldest media item not yet recorded (queue lag)."
        );
        describe_counter!(
            SKIPPED,
            "Media items not fetched again: already recorded (history)."
        );
        describe_counter!(REUSED, "Media items found stored and verified (a crash before the record), not downloaded again.");
        describe_counter!(
            DELETED,
            "Media objects deleted, by reason (retention, erasure, staging: files of uploads a crash cut in a directory store)."
        );
        counter!(FETCHES, "outcome" => "stored", "reason" => "none").absolute(0);
        for r in super::record::FAIL_REASONS {
            counter!(FETCHES, "outcome" => "failed", "reason" => r).absolute(0);
        }
        counter!(BYTES).absolute(0);
        for r in [
            "http_5xx",
            "timeout",
            "connect",
            "url_expired",
            "auth",
            "rate",
            "meta_transient",
            "truncated",
            "store",
        ] {
            counter!(RETRIES, "reason" => r).absolute(0);
        }
        counter!(DELETED, "reason" => "retention").absolute(0);
        counter!(DELETED, "reason" => "erasure").absolute(0);
        counter!(DELETED, "reason" => "staging").absolute(0);
    }
}

/// What `serve --dev` adds for media: a local folder and, in its sandbox,
/// the media id of `tests/fixtures/inbound_image.json`.
pub mod dev {
    /// The media id in `tests/fixtures/inbound_image.json`.
    pub const FIXTURE_MEDIA_ID: &str = "1482936571029384";

    /// `{temp}/wagate-dev-media`.
    pub fn folder() -> std::path::PathBuf {
        std::env::temp_dir().join("wagate-dev-media")
    }

    /// A 1×1 PNG, served for [`FIXTURE_MEDIA_ID`].
    pub const PNG: &[u8] = &[
        0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44,
        0x52, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f,
        0x15, 0xc4, 0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8,
        0xcf, 0xc0, 0xf0, 0x1f, 0x00, 0x05, 0x00, 0x01, 0xff, 0x89, 0x99, 0x3d, 0x1d, 0x00, 0x00,
        0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
    ];

    /// Serves [`PNG`] as [`FIXTURE_MEDIA_ID`].
    pub fn seed(sb: &crate::sandbox::Sandbox) {
        sb.media().add(FIXTURE_MEDIA_ID, PNG, "image/png");
    }
}
