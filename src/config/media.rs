//! `[media]` (DESIGN §13): inbound media fetched into an object store.

use super::*;

/// `[media]` as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMedia {
    pub enabled: bool,
    /// `file:///abs/path`, `s3://bucket/prefix`; empty: `file://` under
    /// `./wagate-media` (made absolute at start).
    pub store: String,
    /// The media worker's consumer group on `wa.inbound.messages`.
    pub group_id: String,
    pub max_bytes: u64,
    /// Fetches in flight per business number.
    pub concurrency_per_number: u64,
    /// Fetches in flight in the process.
    pub concurrency: u64,
    /// Objects older than this are deleted by the sweep (0: never).
    pub retention_days: u64,
    /// How often the retention sweep runs.
    pub sweep_interval_secs: u64,
    /// Deadline of one lookup or download (the download's whole body).
    pub fetch_timeout_ms: u64,
    /// Tries per item (lookup + download) on 5xx, timeouts, connection errors.
    pub max_attempts: u64,
    /// Objects larger than this are uploaded in parts of this size (S3's
    /// minimum is 5 MiB).
    pub part_size_bytes: u64,
    /// How far back `wa.inbound.media` is read at each assignment, to skip
    /// items already recorded (a crash between the record and the commit).
    pub history_window_secs: u64,
    /// S3-compatible stores: endpoint URL (empty: AWS).
    pub s3_endpoint: String,
    pub s3_region: String,
    /// Allow an `http://` endpoint.
    pub s3_allow_http: bool,
}

impl Default for RawMedia {
    fn default() -> Self {
        RawMedia {
            enabled: true,
            store: String::new(),
            group_id: "wagate-media".into(),
            max_bytes: 100 * 1024 * 1024,
            concurrency_per_number: 4,
            concurrency: 16,
            retention_days: 30,
            sweep_interval_secs: 3600,
            fetch_timeout_ms: 120_000,
            max_attempts: 8,
            part_size_bytes: 8 * 1024 * 1024,
            history_window_secs: 86_400,
            s3_endpoint: String::new(),
            s3_region: "us-east-1".into(),
            s3_allow_http: false,
        }
    }
}

/// Where objects go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaStore {
    /// An absolute directory.
    File(PathBuf),
    S3 {
        bucket: String,
        /// Without leading or trailing `/`; may be empty.
        prefix: String,
    },
}

/// `[media]`, validated.
#[derive(Debug, Clone)]
pub struct MediaConfig {
    pub enabled: bool,
    pub store: MediaStore,
    pub group_id: String,
    pub max_bytes: u64,
    pub concurrency_per_number: usize,
    pub concurrency: usize,
    /// None: never swept.
    pub retention: Option<Duration>,
    pub sweep_interval: Duration,
    pub fetch_timeout: Duration,
    pub max_attempts: u32,
    pub part_size: usize,
    pub history_window: Duration,
    pub s3_endpoint: Option<String>,
    pub s3_region: String,
    pub s3_allow_http: bool,
}

/// The directory an empty `media.store` means.
pub const DEFAULT_MEDIA_DIR: &str = "wagate-media";

pub(super) fn media(m: &RawMedia) -> Result<MediaConfig, ConfigError> {
    use super::validate::positive;
    let store = parse_store(&m.store)?;
    let part_size = positive("media.part_size_bytes", m.part_size_bytes)?;
    if part_size < 5 * 1024 * 1024 && matches!(store, MediaStore::S3 { .. }) {
        return Err(invalid(
            "media.part_size_bytes",
            "at least 5 MiB (5242880) with an S3 store: S3 refuses smaller parts",
        ));
    }
    if part_size > 1 << 30 {
        return Err(invalid("media.part_size_bytes", "at most 1 GiB"));
    }
    let scheme_ok = m.s3_endpoint.starts_with("http://") || m.s3_endpoint.starts_with("https://");
    if !m.s3_endpoint.is_empty() && !scheme_ok {
        return Err(invalid(
            "media.s3_endpoint",
            "an http:// or https:// URL, e.g. http://127.0.0.1:9000",
        ));
    }
    if m.s3_endpoint.starts_with("http://") && !m.s3_allow_http {
        return Err(invalid(
            "media.s3_endpoint",
            "is http://: set media.s3_allow_http = true to allow it",
        ));
    }
    if m.group_id.trim().is_empty() {
        return Err(invalid("media.group_id", "must not be empty"));
    }
    Ok(MediaConfig {
        enabled: m.enabled,
        store,
        group_id: m.group_id.clone(),
        max_bytes: positive("media.max_bytes", m.max_bytes)?,
        concurrency_per_number: positive("media.concurrency_per_number", m.concurrency_per_number)?
            .min(1024) as usize,
        concurrency: positive("media.concurrency", m.concurrency)?.min(4096) as usize,
        retention: (m.retention_days > 0)
            .then(|| Duration::from_secs(m.retention_days.min(36_500) * 86_400)),
        sweep_interval: Duration::from_secs(positive(
            "media.sweep_interval_secs",
            m.sweep_interval_secs,
        )?),
        fetch_timeout: Duration::from_millis(positive(
            "media.fetch_timeout_ms",
            m.fetch_timeout_ms,
        )?),
        max_attempts: positive("media.max_attempts", m.max_attempts)?.min(100) as u32,
        part_size: part_size as usize,
        history_window: Duration::from_secs(positive(
            "media.history_window_secs",
            m.history_window_secs,
        )?),
        s3_endpoint: (!m.s3_endpoint.is_empty()).then(|| m.s3_endpoint.clone()),
        s3_region: if m.s3_region.is_empty() {
            "us-east-1".into()
        } else {
            m.s3_region.clone()
        },
        s3_allow_http: m.s3_allow_http,
    })
}

/// `file:///abs`, `file://rel` (relative to the working directory),
/// `s3://bucket[/prefix]`, or empty (`./wagate-media`).
pub fn parse_store(s: &str) -> Result<MediaStore, ConfigError> {
    let bad = |m: &str| invalid("media.store", m.to_string());
    let s = s.trim();
    let dir = |p: &str| -> Result<MediaStore, ConfigError> {
        if p.is_empty() {
            return Err(bad(
                "file:// needs a path, e.g. file:///var/lib/wagate/media",
            ));
        }
        let p = Path::new(p);
        let abs = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| bad(&format!("cannot resolve a relative path: {e}")))?
                .join(p)
        };
        Ok(MediaStore::File(abs))
    };
    if s.is_empty() {
        return dir(DEFAULT_MEDIA_DIR);
    }
    if let Some(p) = s.strip_prefix("file://") {
        return dir(p);
    }
    if let Some(rest) = s.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !ok {
            return Err(bad(
                "s3://BUCKET[/PREFIX]: a bucket name of 3 to 63 lowercase letters, digits, '-' or '.'",
            ));
        }
        return Ok(MediaStore::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        });
    }
    Err(bad(
        "expected file:///path or s3://bucket/prefix (other object_store schemes are not enabled)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_parse_and_errors_name_the_key() {
        assert_eq!(
            parse_store("file:///var/m").unwrap(),
            MediaStore::File("/var/m".into())
        );
        assert_eq!(
            parse_store("s3://my-bucket/a/b/").unwrap(),
            MediaStore::S3 {
                bucket: "my-bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert!(
            matches!(parse_store("").unwrap(), MediaStore::File(p) if p.ends_with(DEFAULT_MEDIA_DIR))
        );
        for bad in ["gs://x", "s3://A", "file://", "s3://"] {
            let e = parse_store(bad).unwrap_err().to_string();
            assert!(e.contains("media.store"), "{e}");
        }
        let mut m = RawMedia {
            store: "s3://bucket".into(),
            part_size_bytes: 1024,
            ..RawMedia::default()
        };
        assert!(media(&m)
            .unwrap_err()
            .to_string()
            .contains("media.part_size_bytes"));
        m.part_size_bytes = 8 << 20;
        m.s3_endpoint = "http://127.0.0.1:9000".into();
        assert!(media(&m).unwrap_err().to_string().contains("s3_allow_http"));
        m.s3_allow_http = true;
        assert!(media(&m).is_ok());
    }

    #[test]
    fn every_key_has_its_environment_variable() {
        let env: std::collections::BTreeMap<String, String> = [
            ("WAGATE_APP_SECRET", "s"),
            ("WAGATE_VERIFY_TOKEN", "v"),
            ("WAGATE_API_TOKEN", "t"),
            ("WAGATE_ACCESS_TOKEN", "a"),
            ("WAGATE_MEDIA_STORE", "s3://bucket/p"),
            ("WAGATE_MEDIA_S3_ENDPOINT", "http://127.0.0.1:9000"),
            ("WAGATE_MEDIA_S3_ALLOW_HTTP", "true"),
            ("WAGATE_MEDIA_CONCURRENCY_PER_NUMBER", "2"),
            ("WAGATE_MEDIA_RETENTION_DAYS", "0"),
            ("WAGATE_MEDIA_ENABLED", "false"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = crate::config::load(None, &env, LoadOptions::default()).unwrap();
        assert!(!c.media.enabled);
        assert_eq!(c.media.concurrency_per_number, 2);
        assert_eq!(c.media.retention, None);
        assert_eq!(
            c.media.s3_endpoint.as_deref(),
            Some("http://127.0.0.1:9000")
        );
        assert!(matches!(c.media.store, MediaStore::S3 { ref bucket, .. } if bucket == "bucket"));
        let mut bad = env.clone();
        bad.insert("WAGATE_MEDIA_MAX_BYTES".into(), "0".into());
        let e = crate::config::load(None, &bad, LoadOptions::default()).unwrap_err();
        assert!(e.to_string().contains("media.max_bytes"), "{e}");
    }
}
