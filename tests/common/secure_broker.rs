//! A broker that speaks TLS (and SASL/SCRAM) on loopback, started by the
//! test that needs it: Tansu on a plaintext port with the memory of a
//! SQLite file (so SCRAM users created before `--authentication` persist),
//! and Debian's `stunnel` in front of it as the TLS endpoint, since Tansu
//! 0.6 accepts `--cert` / `--key` but serves plaintext. Tansu advertises
//! stunnel's port, so every connection a client makes goes through TLS.
//! Certificates are made here with rcgen, in a temporary directory; both
//! processes are killed when the value is dropped.
#![allow(dead_code)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::free_port;
use super::process::KillOnDrop;

/// A certificate authority made by the test.
pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    pub pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa { params, key, pem }
    }

    /// A leaf certificate for `localhost` / 127.0.0.1 signed by this CA,
    /// valid from `not_before` days ago for `days` days: (cert PEM, key PEM).
    pub fn leaf(&self, name: &str, not_before_days: i64, days: i64) -> (String, String) {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(not_before_days);
        params.not_after = params.not_before + time::Duration::days(days);
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// How the broker is set up.
#[derive(Default)]
pub struct SecureOptions {
    /// SCRAM users (name, password, mechanism `scram256` or `scram512`);
    /// any makes Tansu require SASL authentication.
    pub scram_users: Vec<(String, String, String)>,
    /// stunnel requires a client certificate signed by this CA (PEM).
    pub client_ca_pem: Option<String>,
}

pub struct SecureBroker {
    pub dir: tempfile::TempDir,
    /// The TLS endpoint (stunnel), which Tansu advertises.
    pub tls_addr: String,
    /// The CA that signed the broker's certificate (a PEM file).
    pub ca_file: PathBuf,
    pub ca: TestCa,
    tansu: KillOnDrop,
    stunnel: KillOnDrop,
}

fn wait_port(port: u16, what: &str, log: &Path) {
    let end = Instant::now() + Duration::from_secs(15);
    while Instant::now() < end {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{what} did not open port {port} within 15 s; its log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

fn tansu_bin() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_default();
    let p = Path::new(&home).join(".cargo/bin/tansu");
    if p.exists() {
        p
    } else {
        PathBuf::from("tansu")
    }
}

fn stunnel_bin() -> &'static str {
    for b in ["/usr/bin/stunnel4", "/usr/bin/stunnel"] {
        if Path::new(b).exists() {
            return b;
        }
    }
    panic!("stunnel is not installed: run the README's test command (scripts/test.sh runs scripts/ensure-packages.sh, which installs Debian's stunnel4)")
}

fn tansu(dir: &Path, port: u16, advertised: u16, auth: bool, log: &str) -> KillOnDrop {
    let mut cmd = Command::new(tansu_bin());
    cmd.arg("broker")
        .arg("--listener-url")
        .arg(format!("tcp://127.0.0.1:{port}"))
        .arg("--advertised-listener-url")
        .arg(format!("tcp://127.0.0.1:{advertised}"))
        .arg("--storage-engine")
        // Tansu reads the SQLite URL's path relative to its working directory.
        .arg("sqlite://tansu.db")
        .arg("--silent")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(log)).unwrap());
    if auth {
        cmd.arg("--authentication");
    }
    let child = KillOnDrop::new(cmd.spawn().expect("start tansu (scripts/tansu.sh install)"));
    wait_port(port, "tansu", &dir.join(log));
    child
}

impl SecureBroker {
    pub fn start(opts: SecureOptions) -> SecureBroker {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("wagate test broker CA");
        let (cert, key) = ca.leaf("localhost", 1, 30);
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca.pem).unwrap();
        std::fs::write(dir.path().join("broker.pem"), &cert).unwrap();
        std::fs::write(dir.path().join("broker.key"), &key).unwrap();
        let (plain, tls) = (free_port(), free_port());
        if !opts.scram_users.is_empty() {
            // Users are created over the Kafka protocol, which an
            // authenticating Tansu refuses before a login: create them on
            // an open Tansu first; the SQLite file keeps them.
            let open = tansu(dir.path(), plain, plain, false, "tansu-setup.log");
            for (name, password, mechanism) in &opts.scram_users {
                let out = Command::new(tansu_bin())
                    .args(["user", "create", "--broker"])
                    .arg(format!("tcp://127.0.0.1:{plain}"))
                    .args(["--mechanism", mechanism, name, password])
                    .stdin(Stdio::null())
                    .output()
                    .expect("tansu user create");
                assert!(
                    out.status.success(),
                    "tansu user create {name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            drop(open);
            // The port is free again once the process is reaped.
            std::thread::sleep(Duration::from_millis(200));
        }
        let tansu = tansu(
            dir.path(),
            plain,
            tls,
            !opts.scram_users.is_empty(),
            "tansu.log",
        );
        let mut conf = format!(
            "foreground = yes\npid =\noutput = {log}\ndebug = 4\n\n[kafka]\naccept = 127.0.0.1:{tls}\nconnect = 127.0.0.1:{plain}\ncert = {cert}\nkey = {key}\n",
            log = dir.path().join("stunnel.log").display(),
            cert = dir.path().join("broker.pem").display(),
            key = dir.path().join("broker.key").display(),
        );
        if let Some(client_ca) = &opts.client_ca_pem {
            let f = dir.path().join("client-ca.pem");
            std::fs::write(&f, client_ca).unwrap();
            conf.push_str(&format!(
                "CAfile = {}\nverifyChain = yes\nrequireCert = yes\n",
                f.display()
            ));
        }
        let conf_file = dir.path().join("stunnel.conf");
        std::fs::write(&conf_file, conf).unwrap();
        let stunnel = KillOnDrop::new(
            Command::new(stunnel_bin())
                .arg(&conf_file)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("stunnel.stderr")).unwrap())
                .spawn()
                .expect("start stunnel"),
        );
        wait_port(tls, "stunnel", &dir.path().join("stunnel.stderr"));
        SecureBroker {
            tls_addr: format!("127.0.0.1:{tls}"),
            ca_file,
            ca,
            dir,
            tansu,
            stunnel,
        }
    }

    /// A file in the broker's temporary directory.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Tansu's and stunnel's logs, for a failing test's message.
    pub fn logs(&self) -> String {
        ["tansu.log", "stunnel.log"]
            .iter()
            .map(|f| {
                let t = std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
                let lines: Vec<&str> = t.lines().collect();
                format!(
                    "--- {f}\n{}",
                    lines[lines.len().saturating_sub(20)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}
