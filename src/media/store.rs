//! The object store behind `[media] store` (the `object_store` crate):
//! `file://` (a directory) or `s3://bucket/prefix` (AWS or any
//! S3-compatible server: `s3_endpoint`, `s3_region`, `s3_allow_http`,
//! credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`).
//!
//! Objects live under `{prefix}/{phone_number_id}/{user}/{media_id}`. A
//! write is never visible half done: an object up to the part size is one
//! `put` of bytes already verified; a larger one is a multipart upload
//! (S3: parts, then complete; a directory: a staging file renamed at the
//! end) that is aborted on any error or checksum mismatch, so the object
//! appears only once it is whole and verified.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions,
    PutPayload, WriteMultipart,
};
use sha2::{Digest, Sha256};

use crate::config::{MediaConfig, MediaStore};

/// Multipart parts uploaded at once per object (memory: this many parts).
const PARTS_IN_FLIGHT: usize = 2;

/// The store and where its objects are.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// `file:///abs/dir` or `s3://bucket` (no trailing `/`).
    uri_base: String,
    /// Inside the store (S3 prefix; empty for a directory).
    prefix: Vec<String>,
    /// Local directories cannot keep a content type.
    local: bool,
    /// A directory store's directory: its staging files are swept by hand
    /// (object_store never lists them).
    dir: Option<std::path::PathBuf>,
    part_size: usize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.describe())
    }
}

impl Store {
    /// Opens the store (a directory is created if missing).
    pub fn new(cfg: &MediaConfig) -> anyhow::Result<Store> {
        match &cfg.store {
            MediaStore::File(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| {
                    anyhow::anyhow!("media.store: cannot create {}: {e}", dir.display())
                })?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| anyhow::anyhow!("media.store: {e}"))?;
                Ok(Store {
                    inner: Arc::new(fs),
                    uri_base: format!("file://{}", dir.display())
                        .trim_end_matches('/')
                        .to_string(),
                    prefix: Vec::new(),
                    local: true,
                    dir: Some(dir.clone()),
                    part_size: cfg.part_size,
                })
            }
            MediaStore::S3 { bucket, prefix } => {
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_region(&cfg.s3_region)
                    .with_allow_http(cfg.s3_allow_http);
                if let Some(ep) = &cfg.s3_endpoint {
                    b = b.with_endpoint(ep).with_virtual_hosted_style_request(false);
                }
                let s3 = b.build().map_err(|e| anyhow::anyhow!("media.store: {e}"))?;
                Ok(Store {
                    inner: Arc::new(s3),
                    uri_base: format!("s3://{bucket}"),
                    prefix: prefix
                        .split('/')
                        .filter(|p| !p.is_empty())
                        .map(str::to_string)
                        .collect(),
                    local: false,
                    dir: None,
                    part_size: cfg.part_size,
                })
            }
        }
    }

    /// `file:///dir` or `s3://bucket/prefix`: where objects go.
    pub fn describe(&self) -> String {
        let mut s = self.uri_base.clone();
        for p in &self.prefix {
            s.push('/');
            s.push_str(p);
        }
        s
    }

    fn path_of(&self, parts: &[&str]) -> Path {
        Path::from_iter(
            self.prefix
                .iter()
                .map(String::as_str)
                .chain(parts.iter().copied()),
        )
    }

    /// `{prefix}/{phone_number_id}/{user}/{media_id}`.
    pub fn object_path(&self, phone_number_id: &str, user: &str, media_id: &str) -> Path {
        self.path_of(&[phone_number_id, user, media_id])
    }

    /// The object's URI (the record's `location`).
    pub fn uri(&self, path: &Path) -> String {
        format!("{}/{}", self.uri_base, path)
    }

    /// The object's size, if it exists.
    pub async fn size_of(&self, path: &Path) -> Result<Option<u64>, object_store::Error> {
        match self.inner.head(path).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The SHA-256 of an object's bytes, read as a stream.
    pub async fn sha256_of(&self, path: &Path) -> Result<([u8; 32], u64), object_store::Error> {
        let mut stream = self.inner.get(path).await?.into_stream();
        let mut h = Sha256::new();
        let mut n = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            n += chunk.len() as u64;
            h.update(&chunk);
        }
        Ok((h.finalize().into(), n))
    }

    /// The bytes of an object (tests, small objects).
    pub async fn read(&self, path: &Path) -> Result<Bytes, object_store::Error> {
        self.inner.get(path).await?.bytes().await
    }

    /// The bytes of an object and the content type it was stored with
    /// (`None` in a directory store, which keeps none).
    pub async fn read_with_type(
        &self,
        path: &Path,
    ) -> Result<(Bytes, Option<String>), object_store::Error> {
        let got = self.inner.get(path).await?;
        let ct = got
            .attributes
            .get(&Attribute::ContentType)
            .map(|v| v.to_string());
        Ok((got.bytes().await?, ct))
    }

    /// A writer for an object of `size` bytes (as announced by Meta).
    pub async fn writer(
        &self,
        path: Path,
        content_type: &str,
        size: u64,
    ) -> Result<ObjectWriter, object_store::Error> {
        let attributes = self.attributes(content_type);
        if size as usize <= self.part_size {
            return Ok(ObjectWriter::Small {
                store: self.inner.clone(),
                path,
                buf: Vec::with_capacity(size as usize),
                attributes,
            });
        }
        let opts = PutMultipartOptions {
            attributes,
            ..Default::default()
        };
        let upload = self.inner.put_multipart_opts(&path, opts).await?;
        Ok(ObjectWriter::Multi(WriteMultipart::new_with_chunk_size(
            upload,
            self.part_size,
        )))
    }

    fn attributes(&self, content_type: &str) -> Attributes {
        let mut a = Attributes::new();
        if !self.local && !content_type.is_empty() {
            a.insert(Attribute::ContentType, content_type.to_string().into());
        }
        a
    }

    /// Deletes every object of one user of one number; returns how many.
    /// In a directory store, the staging files of uploads under that user
    /// go too, whatever their age (they hold the person's bytes); an upload
    /// still running then fails and is retried.
    pub async fn delete_user(
        &self,
        phone_number_id: &str,
        user: &str,
    ) -> Result<usize, object_store::Error> {
        let prefix = self.path_of(&[phone_number_id, user]);
        let n = self.delete_where(&prefix, |_| true).await?;
        if let Some(dir) = &self.dir {
            let under = dir.join(phone_number_id).join(user);
            let _ = remove_staging(under, None).await;
        }
        Ok(n)
    }

    /// In a directory store: deletes the staging files (`NAME#N`, the
    /// uploads a crash cut) last modified before `cutoff`; returns how many.
    /// Nothing to do for S3 (its lifecycle rule drops incomplete uploads).
    pub async fn sweep_staging(&self, cutoff: SystemTime) -> std::io::Result<usize> {
        match &self.dir {
            Some(dir) => remove_staging(dir.clone(), Some(cutoff)).await,
            None => Ok(0),
        }
    }

    /// Deletes every object last modified before `cutoff`; returns how many.
    pub async fn sweep(&self, cutoff: SystemTime) -> Result<usize, object_store::Error> {
        let prefix = self.path_of(&[]);
        self.delete_where(&prefix, |m| SystemTime::from(m.last_modified) < cutoff)
            .await
    }

    async fn delete_where(
        &self,
        prefix: &Path,
        keep_if: impl Fn(&object_store::ObjectMeta) -> bool,
    ) -> Result<usize, object_store::Error> {
        let prefix = (!prefix.as_ref().is_empty()).then_some(prefix);
        let mut list = self.inner.list(prefix);
        let mut doomed = Vec::new();
        while let Some(m) = list.next().await {
            let m = m?;
            if keep_if(&m) {
                doomed.push(m.location);
            }
        }
        drop(list);
        let mut n = 0;
        for p in doomed {
            match self.inner.delete(&p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => n += 1,
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
}

/// One object being written.
pub enum ObjectWriter {
    /// Up to the part size: kept in memory, put once verified.
    Small {
        store: Arc<dyn ObjectStore>,
        path: Path,
        buf: Vec<u8>,
        attributes: Attributes,
    },
    /// A multipart upload.
    Multi(WriteMultipart),
}

impl ObjectWriter {
    /// Appends bytes; waits while [`PARTS_IN_FLIGHT`] parts are uploading.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), object_store::Error> {
        match self {
            ObjectWriter::Small { buf, .. } => {
                buf.extend_from_slice(chunk);
                Ok(())
            }
            ObjectWriter::Multi(w) => {
                w.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                w.write(chunk);
                Ok(())
            }
        }
    }

    /// Makes the object visible.
    pub async fn finish(self) -> Result<(), object_store::Error> {
        match self {
            ObjectWriter::Small {
                store,
                path,
                buf,
                attributes,
            } => {
                let opts = PutOptions {
                    attributes,
                    ..Default::default()
                };
                store
                    .put_opts(&path, PutPayload::from(buf), opts)
                    .await
                    .map(|_| ())
            }
            ObjectWriter::Multi(w) => w.finish().await.map(|_| ()),
        }
    }

    /// Drops what was written: nothing becomes visible.
    pub async fn abort(self) {
        if let ObjectWriter::Multi(w) = self {
            if let Err(e) = w.abort().await {
                tracing::warn!(error = %e, "media: aborting a multipart upload failed (the store's lifecycle rules should drop incomplete uploads)");
            }
        }
    }
}

/// Whether `name` is an object_store staging file's: `NAME#N`, N digits.
/// Object names here never hold a `#` (ids are digits or BSUIDs).
fn is_staging(name: &str) -> bool {
    name.rsplit_once('#').is_some_and(|(base, n)| {
        !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
    })
}

/// Removes the staging files under `root` (recursively; symbolic links are
/// not followed) modified before `cutoff` (None: any). A missing `root` is
/// no error.
async fn remove_staging(
    root: std::path::PathBuf,
    cutoff: Option<SystemTime>,
) -> std::io::Result<usize> {
    tokio::task::spawn_blocking(move || {
        let mut n = 0;
        let mut dirs = vec![root];
        while let Some(d) = dirs.pop() {
            let entries = match std::fs::read_dir(&d) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for e in entries {
                let e = e?;
                let kind = e.file_type()?;
                if kind.is_dir() {
                    dirs.push(e.path());
                    continue;
                }
                if !kind.is_file() || !is_staging(&e.file_name().to_string_lossy()) {
                    continue;
                }
                let old = match cutoff {
                    None => true,
                    Some(c) => e.metadata()?.modified()? < c,
                };
                if old {
                    match std::fs::remove_file(e.path()) {
                        Ok(()) => n += 1,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(n)
    })
    .await
    .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn dir_store(dir: &std::path::Path) -> Store {
        let env: std::collections::BTreeMap<String, String> = [
            ("WAGATE_APP_SECRET", "s"),
            ("WAGATE_VERIFY_TOKEN", "v"),
            ("WAGATE_API_TOKEN", "t"),
            ("WAGATE_ACCESS_TOKEN", "a"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain([(
            "WAGATE_MEDIA_STORE".to_string(),
            format!("file://{}", dir.display()),
        )])
        .collect();
        let c = crate::config::load(None, &env, crate::config::LoadOptions::default()).unwrap();
        Store::new(&c.media).unwrap()
    }

    fn file(dir: &std::path::Path, rel: &str, age: Duration) -> std::path::PathBuf {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"bytes").unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
        p
    }

    #[test]
    fn staging_names() {
        assert!(is_staging("1234567890#1"));
        assert!(is_staging("1234567890#42"));
        assert!(!is_staging("1234567890"));
        assert!(!is_staging("1234567890#"));
        assert!(!is_staging("#1"));
        assert!(!is_staging("1234567890#1a"));
    }

    /// The staging sweep removes staging files a day old and nothing else;
    /// erasure removes the person's staging files whatever their age, and
    /// no one else's.
    #[tokio::test]
    async fn staging_files_are_swept_when_old_and_erased_with_their_person() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let day = Duration::from_secs(86_400);
        let object = file(d, "100/15550001/9001", 2 * day);
        let old = file(d, "100/15550001/9002#1", 2 * day);
        let fresh = file(d, "100/15550001/9003#1", Duration::from_secs(60));
        let other = file(d, "100/15550002/9004#2", Duration::from_secs(60));
        let store = dir_store(d);
        let n = store.sweep_staging(SystemTime::now() - day).await.unwrap();
        assert_eq!(n, 1);
        assert!(!old.exists());
        assert!(object.exists() && fresh.exists() && other.exists());
        // Erasure of user 15550001: its object and its fresh staging file.
        assert_eq!(store.delete_user("100", "15550001").await.unwrap(), 1);
        assert!(!object.exists() && !fresh.exists());
        assert!(other.exists(), "another person's upload is left alone");
        // A store without a directory yet: nothing to sweep, no error.
        let gone = d.join("not-yet");
        let s2 = dir_store(&gone);
        std::fs::remove_dir_all(&gone).unwrap();
        assert_eq!(s2.sweep_staging(SystemTime::now()).await.unwrap(), 0);
    }

    /// The names `is_staging` looks for are object_store's own: an upload
    /// that a crash cut (its drop never ran) leaves exactly such a file,
    /// and the sweep removes it.
    #[tokio::test]
    async fn an_upload_cut_by_a_crash_leaves_a_staging_file_the_sweep_removes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = dir_store(tmp.path());
        let path = store.path_of(&["100", "15550001", "9005"]);
        let mut up = store.inner.put_multipart(&path).await.unwrap();
        up.put_part(PutPayload::from(vec![7u8; 1024]))
            .await
            .unwrap();
        std::mem::forget(up);
        let user = tmp.path().join("100/15550001");
        let names: Vec<String> = std::fs::read_dir(&user)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(is_staging(&names[0]), "{names:?}");
        let later = SystemTime::now() + std::time::Duration::from_secs(1);
        assert_eq!(store.sweep_staging(later).await.unwrap(), 1);
        assert_eq!(std::fs::read_dir(&user).unwrap().count(), 0);
    }
}
