//! Certificates made by the test (rcgen; nothing is committed) and TLS
//! clients that trust them: a hyper-util client over hyper-rustls, and a bare
//! tokio-rustls connection to read the certificate a server presents.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls_pki_types::pem::PemObject;

/// A PEM certificate (chain) and its PEM private key.
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert_pem: String,
    pub key_pem: String,
    /// The leaf's DER, to compare with what a server presents.
    pub der: CertificateDer<'static>,
}

/// A test CA that issues server and client certificates.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        Pki { ca }
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A server certificate for `127.0.0.1` and `localhost`, with `cn` as
    /// its subject and `serial` as its serial number.
    pub fn server(&self, cn: &str, serial: u64) -> Pair {
        self.issue(cn, serial, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate.
    pub fn client(&self, cn: &str) -> Pair {
        self.issue(cn, 1, ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, cn: &str, serial: u64, eku: ExtendedKeyUsagePurpose) -> Pair {
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        p.distinguished_name.push(DnType::CommonName, cn);
        p.serial_number = Some(SerialNumber::from(serial));
        p.extended_key_usages = vec![eku];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &*self.ca).unwrap();
        Pair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }
}

/// Writes `pair` to `dir/{name}.crt` and `dir/{name}.key`, each replaced at
/// once (written beside it, then renamed), and returns both paths.
pub fn write_pair(dir: &Path, name: &str, pair: &Pair) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    replace_file(&cert, pair.cert_pem.as_bytes());
    replace_file(&key, pair.key_pem.as_bytes());
    (cert, key)
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls client config trusting `ca_pem`, presenting `identity` if given.
pub fn client_config(ca_pem: &str, identity: Option<&Pair>) -> rustls::ClientConfig {
    client_config_with(ca_pem, identity, rustls::DEFAULT_VERSIONS)
}

/// As [`client_config`], offering only `versions`.
pub fn client_config_with(
    ca_pem: &str,
    identity: Option<&Pair>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    match identity {
        None => b.with_no_client_auth(),
        Some(p) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(p.cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .unwrap();
            let key = PrivateKeyDer::from_pem_slice(p.key_pem.as_bytes()).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
    }
}

pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A pooled HTTPS client (ALPN `h2` and `http/1.1`) trusting `ca_pem`.
pub fn https_client(ca_pem: &str, identity: Option<&Pair>) -> HttpsClient {
    https_client_with(ca_pem, identity, true)
}

/// As [`https_client`]; `pooled = false` opens a new connection (and a new
/// handshake) for every request.
pub fn https_client_with(ca_pem: &str, identity: Option<&Pair>, pooled: bool) -> HttpsClient {
    let conn = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_config(ca_pem, identity))
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    let mut b = Client::builder(TokioExecutor::new());
    if !pooled {
        b.pool_max_idle_per_host(0);
    }
    b.build(conn)
}

/// A TLS connection to `addr` (its IP as the server name) with `config`.
pub async fn handshake(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::IpAddress(addr.ip().into());
    tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))?
}

/// The leaf certificate `addr` presents to a new connection.
pub async fn presented_leaf(addr: SocketAddr, ca_pem: &str) -> CertificateDer<'static> {
    let tls = handshake(addr, client_config(ca_pem, None))
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].clone()
}
