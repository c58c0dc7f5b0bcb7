//! Listener TLS (DESIGN §11): rustls with the ring provider, TLS 1.2 and
//! 1.3, ALPN `h2` and `http/1.1`. The certificate and key live behind a
//! [`CertStore`] (the rustls certificate resolver), which a small task
//! ([`watch`]) refreshes when the files change: new handshakes get the new
//! pair, connections already open keep theirs, and a file that does not load
//! leaves the previous pair in place (logged and counted). The client CA of
//! `[internal_tls]` is read once at start.
//!
//! What happens on the socket (the handshake under a deadline, inside each
//! connection's task, counted when it fails) is in `http::serve`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// How often [`watch`] looks at the certificate and key files.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// The files of one listener's TLS settings, with the config section they
/// came from (`server.tls`, `internal_tls`) so that every error names its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub section: &'static str,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Client certificates signed by these CAs are required (`internal_tls`).
    pub client_ca_file: Option<PathBuf>,
}

/// A TLS settings problem: the key at fault and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TlsError {
    pub key: String,
    pub message: String,
}

impl TlsFiles {
    fn err(&self, leaf: &str, message: impl Into<String>) -> TlsError {
        TlsError {
            key: format!("{}.{leaf}", self.section),
            message: message.into(),
        }
    }

    /// Reads and checks the certificate chain and key: both files readable,
    /// PEM that parses, a private key the provider takes, and a key that
    /// matches the first (leaf) certificate.
    pub fn load_key(&self) -> Result<CertifiedKey, TlsError> {
        let cert_pem = read(&self.cert_file).map_err(|m| self.err("cert_file", m))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| {
                self.err(
                    "cert_file",
                    format!("{}: not PEM: {}", show(&self.cert_file), pem_reason(&e)),
                )
            })?;
        if chain.is_empty() {
            return Err(self.err(
                "cert_file",
                format!("{}: no CERTIFICATE block", show(&self.cert_file)),
            ));
        }
        let key_pem = read(&self.key_file).map_err(|m| self.err("key_file", m))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            self.err(
                "key_file",
                format!(
                    "{}: no PEM private key (PKCS#8, PKCS#1 or SEC1): {}",
                    show(&self.key_file),
                    pem_reason(&e)
                ),
            )
        })?;
        let signer = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| self.err("key_file", format!("{}: {e}", show(&self.key_file))))?;
        let ck = CertifiedKey::new(chain, signer);
        match ck.keys_match() {
            Ok(()) => Ok(ck),
            // ring knows every public key it signs with; if one day it does
            // not, the handshake still proves the pair.
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(ck),
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                Err(self.err(
                    "key_file",
                    format!(
                        "{}: the key does not match the first certificate of {}",
                        show(&self.key_file),
                        show(&self.cert_file)
                    ),
                ))
            }
            Err(e) => Err(self.err(
                "cert_file",
                format!("{}: the first certificate: {e}", show(&self.cert_file)),
            )),
        }
    }

    /// The client CAs, when client certificates are required.
    fn client_roots(&self) -> Result<Option<RootCertStore>, TlsError> {
        let Some(path) = &self.client_ca_file else {
            return Ok(None);
        };
        let pem = read(path).map_err(|m| self.err("client_ca_file", m))?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&pem) {
            let c = c.map_err(|e| {
                self.err(
                    "client_ca_file",
                    format!("{}: not PEM: {}", show(path), pem_reason(&e)),
                )
            })?;
            roots.add(c).map_err(|e| {
                self.err(
                    "client_ca_file",
                    format!("{}: not a CA certificate: {e}", show(path)),
                )
            })?;
        }
        if roots.is_empty() {
            return Err(self.err(
                "client_ca_file",
                format!("{}: no CERTIFICATE block", show(path)),
            ));
        }
        Ok(Some(roots))
    }

    /// Everything a listener's TLS needs, checked: the key pair (see
    /// [`TlsFiles::load_key`]) and the client CAs.
    pub fn check(&self) -> Result<(), TlsError> {
        self.load_key()?;
        self.client_roots()?;
        Ok(())
    }
}

/// What is wrong with a PEM file, in words that never quote it (a key
/// file's lines are secret).
fn pem_reason(e: &rustls_pki_types::pem::Error) -> &'static str {
    use rustls_pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { .. } => "a section has no END line",
        E::IllegalSectionStart { .. } => "a malformed section start line",
        E::Base64Decode(_) => "bad base64 inside a section",
        E::NoItemsFound => "no block of the expected kind",
        E::SectionTooLarge => "a section over 256 MB",
        _ => "unreadable",
    }
}

fn show(p: &Path) -> std::path::Display<'_> {
    p.display()
}

fn read(p: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate and key new handshakes get; replaced as a whole.
#[derive(Debug)]
pub struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    pub fn new(key: CertifiedKey) -> CertStore {
        CertStore {
            current: RwLock::new(Arc::new(key)),
        }
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn replace(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A listener's TLS: the acceptor every connection's handshake uses, and the
/// store [`watch`] refreshes.
#[derive(Clone)]
pub struct ListenerTls {
    pub acceptor: TlsAcceptor,
    pub store: Arc<CertStore>,
    pub files: TlsFiles,
    /// The files' stamp as they were loaded.
    loaded: Stamp,
}

impl ListenerTls {
    /// Loads the files and builds the rustls server config: TLS 1.3 and
    /// 1.2, ALPN `h2` then `http/1.1`, client certificates required when a
    /// client CA is set.
    pub fn new(files: &TlsFiles) -> Result<ListenerTls, TlsError> {
        let loaded = Stamp::of(files);
        let store = Arc::new(CertStore::new(files.load_key()?));
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| files.err("cert_file", e.to_string()))?;
        let builder = match files.client_roots()? {
            Some(roots) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|e| files.err("client_ca_file", e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(store.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ListenerTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            store,
            files: files.clone(),
            loaded,
        })
    }
}

/// What the watcher compares: modification time, length and (on Unix)
/// inode of both files, through symlinks (a file replaced by a rename, or a
/// Kubernetes secret volume's swapped link, is a new inode even when its
/// time and length look the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp([Option<(SystemTime, u64, u64)>; 2]);

impl Stamp {
    fn of(files: &TlsFiles) -> Stamp {
        let one = |p: &Path| {
            std::fs::metadata(p).ok().map(|m| {
                #[cfg(unix)]
                let ino = std::os::unix::fs::MetadataExt::ino(&m);
                #[cfg(not(unix))]
                let ino = 0;
                (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), ino)
            })
        };
        Stamp([one(&files.cert_file), one(&files.key_file)])
    }
}

/// Re-reads `tls`'s certificate and key whenever the files' modification
/// time or length change, until `stop`. A change is loaded once it has held
/// still for one interval (a certificate and its key are two files, written
/// one after the other); a pair that does not load is logged and counted,
/// and the previous pair stays in use.
pub async fn watch(
    listener: &'static str,
    tls: ListenerTls,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut loaded = tls.loaded;
    let mut seen = loaded;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let files = tls.files.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || Stamp::of(&files)).await else {
            continue;
        };
        if now == loaded {
            seen = now;
            continue;
        }
        if now != seen {
            // Still changing (or just changed): look again next tick.
            seen = now;
            continue;
        }
        let files = tls.files.clone();
        let Ok(result) = tokio::task::spawn_blocking(move || files.load_key()).await else {
            continue;
        };
        loaded = now;
        match result {
            Ok(key) => {
                tls.store.replace(key);
                m::tls_cert_reload(listener, true);
                tracing::info!(listener, cert_file = %tls.files.cert_file.display(), "tls: certificate reloaded");
            }
            Err(e) => {
                m::tls_cert_reload(listener, false);
                tracing::warn!(listener, error = %e, "tls: new certificate or key not loaded; the previous one stays in use");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(cn: &str) -> (String, String, CertificateDer<'static>) {
        let c = rcgen::generate_simple_self_signed(vec![cn.to_string()]).unwrap();
        (
            c.cert.pem(),
            c.signing_key.serialize_pem(),
            c.cert.der().clone(),
        )
    }

    fn files(dir: &Path, cert: &str, key: &str) -> TlsFiles {
        let f = TlsFiles {
            section: "server.tls",
            cert_file: dir.join("c.pem"),
            key_file: dir.join("k.pem"),
            client_ca_file: None,
        };
        std::fs::write(&f.cert_file, cert).unwrap();
        std::fs::write(&f.key_file, key).unwrap();
        f
    }

    #[test]
    fn errors_name_the_key_at_fault() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1, _) = pair("a.test");
        let (_, k2, _) = pair("b.test");
        assert!(files(dir.path(), &c1, &k1).load_key().is_ok());

        let e = files(dir.path(), &c1, &k2).load_key().unwrap_err();
        assert_eq!(e.key, "server.tls.key_file");
        assert!(e.message.contains("does not match"), "{e}");

        let e = files(dir.path(), "hello", &k1).load_key().unwrap_err();
        assert_eq!(e.key, "server.tls.cert_file");
        assert!(e.message.contains("no CERTIFICATE"), "{e}");

        let e = files(dir.path(), &c1, "hello").load_key().unwrap_err();
        assert_eq!(e.key, "server.tls.key_file");
        // The key's bytes never appear in a message.
        let e = files(dir.path(), &c1, &c1).load_key().unwrap_err();
        assert_eq!(e.key, "server.tls.key_file");
        assert!(!e.message.contains("BEGIN"), "{e}");

        let mut f = files(dir.path(), &c1, &k1);
        f.key_file = dir.path().join("missing.pem");
        let e = f.load_key().unwrap_err();
        assert_eq!(e.key, "server.tls.key_file");
        assert!(e.message.contains("cannot read"), "{e}");

        let mut f = files(dir.path(), &c1, &k1);
        f.section = "internal_tls";
        f.client_ca_file = Some(dir.path().join("k.pem"));
        let e = f.check().unwrap_err();
        assert_eq!(e.key, "internal_tls.client_ca_file");
    }

    #[tokio::test]
    async fn the_watcher_swaps_a_good_pair_and_keeps_the_old_one_on_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1, d1) = pair("one.test");
        let (c2, k2, d2) = pair("two.test");
        let f = files(dir.path(), &c1, &k1);
        let tls = ListenerTls::new(&f).unwrap();
        let store = tls.store.clone();
        assert_eq!(store.current().cert[0], d1);
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch("test", tls, Duration::from_millis(20), stop.clone()));
        let wait_for = |want: CertificateDer<'static>| {
            let store = store.clone();
            async move {
                for _ in 0..250 {
                    if store.current().cert[0] == want {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                false
            }
        };
        // The key first, then the certificate: the pair in between (if a
        // tick sees it) does not match and is refused; the final one loads.
        std::fs::write(&f.key_file, &k2).unwrap();
        std::fs::write(&f.cert_file, &c2).unwrap();
        assert!(wait_for(d2.clone()).await, "the new pair was not loaded");
        // A broken certificate: the second pair stays.
        std::fs::write(&f.cert_file, "garbage").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(store.current().cert[0], d2);
        // Fixed again (the first pair back): loaded.
        std::fs::write(&f.key_file, &k1).unwrap();
        std::fs::write(&f.cert_file, &c1).unwrap();
        assert!(wait_for(d1).await, "the repaired pair was not loaded");
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the watcher stops on the token")
            .unwrap();
    }
}
