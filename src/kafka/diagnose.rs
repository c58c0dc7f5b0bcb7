//! Connection problems that a setting fixes: librdkafka's errors and log
//! lines about TLS and SASL turned into one log line that names the
//! setting to check, and kept (the latest) for `/readyz`.
//!
//! Every client context of the process forwards `error` and `log` here
//! ([`Diagnostics::on_error`], [`Diagnostics::on_log`]); the same problem is
//! logged at most once per [`REPEAT_EVERY`] however many clients report it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;

/// How often the same problem is logged again while it lasts.
pub const REPEAT_EVERY: Duration = Duration::from_secs(30);

/// A connection problem with the setting that fixes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// The broker's certificate does not verify against the CA wagate trusts.
    UntrustedCertificate,
    /// The broker refused wagate's client certificate (absent, expired,
    /// signed by a CA it does not trust).
    ClientCertificate,
    /// wagate speaks plaintext to a TLS listener.
    PlaintextToTls,
    /// wagate speaks TLS to a plaintext listener.
    TlsToPlaintext,
    /// Another TLS handshake failure.
    TlsHandshake,
    /// The broker refused the SASL credentials.
    Authentication,
    /// The broker does not offer the configured mechanism.
    Mechanism,
    /// wagate has no SASL settings but the listener wants SASL, or the reverse.
    SaslProtocol,
    /// The OAUTHBEARER token could not be fetched.
    OauthToken,
}

impl Problem {
    /// What is wrong and the setting to check.
    pub fn hint(self) -> &'static str {
        match self {
            Problem::UntrustedCertificate => {
                "the broker's TLS certificate is not trusted: check kafka.ssl_ca_file (the CA that signed the brokers' certificates; empty = the system's CA store) and that kafka.brokers names the hosts in the certificate"
            }
            Problem::ClientCertificate => {
                "the broker refused wagate's client certificate: check kafka.ssl_certificate_file and kafka.ssl_key_file (present, not expired, signed by a CA the broker trusts)"
            }
            Problem::PlaintextToTls => {
                "the broker's listener speaks TLS but wagate connects in plaintext: set kafka.security_protocol to \"ssl\" or \"sasl_ssl\""
            }
            Problem::TlsToPlaintext => {
                "wagate speaks TLS but the broker's listener does not: check kafka.security_protocol and the port in kafka.brokers"
            }
            Problem::TlsHandshake => {
                "the TLS handshake with the broker failed: check kafka.security_protocol, kafka.ssl_ca_file, kafka.ssl_certificate_file and kafka.ssl_key_file"
            }
            Problem::Authentication => {
                "the broker refused the SASL credentials: check kafka.sasl_username_env / _file, kafka.sasl_password_env / _file and kafka.sasl_mechanism"
            }
            Problem::Mechanism => {
                "the broker does not offer this SASL mechanism: check kafka.sasl_mechanism"
            }
            Problem::SaslProtocol => {
                "the broker's listener and wagate disagree on SASL: check kafka.security_protocol (sasl_plaintext / sasl_ssl for a SASL listener)"
            }
            Problem::OauthToken => {
                "no OAUTHBEARER token: check kafka.sasl_oauthbearer_token_endpoint_url, kafka.sasl_oauthbearer_client_id and the client secret"
            }
        }
    }

    /// Reads a librdkafka error or log text (and, when known, its code).
    pub fn classify(text: &str) -> Option<Problem> {
        let t = text.to_ascii_lowercase();
        let has = |s: &str| t.contains(s);
        Some(
            if has("certificate verify failed") || has("broker certificate could not be verified") {
                Problem::UntrustedCertificate
            } else if has("alert certificate")
                || has("alert bad certificate")
                || has("alert unknown ca")
                || has("certificate required")
                || has("alert handshake failure") && has("ssl.certificate")
            {
                Problem::ClientCertificate
            } else if has("connecting to a ssl listener")
                || has("invalid response size 352518912")
                || has("invalid response size 369295616")
            {
                // 352518912 = 0x15030300: a TLS alert read as a Kafka frame size.
                Problem::PlaintextToTls
            } else if has("wrong version number")
                || has("packet length too long")
                || has("record layer failure")
                || has("http request")
            {
                Problem::TlsToPlaintext
            } else if has("ssl handshake failed") || has("_ssl") && has("handshake") {
                Problem::TlsHandshake
            } else if has("unsupported sasl mechanism") || has("mechanism") && has("not supported")
            {
                Problem::Mechanism
            } else if has("connecting to a sasl listener")
                || has("might require sasl")
                || has("illegal_sasl_state")
            {
                Problem::SaslProtocol
            } else if has("oauthbearer") && (has("token") || has("oidc")) && has("fail") {
                Problem::OauthToken
            } else if has("authentication failed")
                || has("sasl authentication error")
                || has("invalid credentials")
                || has("saslauthenticate")
                || has("sasl_authentication_failed")
            {
                Problem::Authentication
            } else {
                return None;
            },
        )
    }
}

#[derive(Default)]
struct State {
    last: Option<(Problem, Instant)>,
    logged: Vec<(Problem, Instant)>,
}

/// The latest connection problem the clients reported (shared by clones).
#[derive(Clone, Default)]
pub struct Diagnostics {
    state: Arc<Mutex<State>>,
    /// The connection uses TLS: a disconnect before the first answer is
    /// then not a TLS listener spoken to in plaintext.
    tls: bool,
}

impl Diagnostics {
    pub fn new(tls: bool) -> Diagnostics {
        Diagnostics {
            tls,
            ..Diagnostics::default()
        }
    }

    /// [`Problem::classify`], plus what only the connection's own settings
    /// tell: a plaintext connection dropped while asking for the API
    /// versions (the first request) most likely reached a TLS listener.
    fn classify(&self, text: &str) -> Option<Problem> {
        Problem::classify(text).or_else(|| {
            let t = text.to_ascii_lowercase();
            (!self.tls && t.contains("disconnected") && t.contains("state apiversion_query"))
                .then_some(Problem::PlaintextToTls)
        })
    }

    /// Called by a client context's `error`.
    pub fn on_error(&self, error: &KafkaError, reason: &str) {
        let text = format!("{error}: {reason}");
        match self.classify(&text) {
            Some(p) => self.report(p, &text),
            None => tracing::error!(target: "librdkafka", "librdkafka: {text}"),
        }
    }

    /// Called by a client context's `log`; lines that are not a known
    /// problem are forwarded as librdkafka's default context does.
    pub fn on_log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        use RDKafkaLogLevel as L;
        // Connection failures come as "FAIL" lines, at info level for a
        // plain disconnect.
        if !matches!(level, L::Debug) {
            if let Some(p) = self.classify(msg) {
                self.report(p, msg);
                return;
            }
        }
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", "librdkafka: {fac} {msg}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", "librdkafka: {fac} {msg}"),
            L::Notice | L::Info => tracing::info!(target: "librdkafka", "librdkafka: {fac} {msg}"),
            L::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {msg}"),
        }
    }

    /// Notes `problem` and logs it (once per [`REPEAT_EVERY`]).
    pub fn report(&self, problem: Problem, detail: &str) {
        let now = Instant::now();
        let log = {
            let mut s = self.state.lock().unwrap();
            s.last = Some((problem, now));
            s.logged
                .retain(|(_, at)| now.duration_since(*at) < REPEAT_EVERY);
            let fresh = !s.logged.iter().any(|(p, _)| *p == problem);
            if fresh {
                s.logged.push((problem, now));
            }
            fresh
        };
        if log {
            tracing::error!(librdkafka = %detail, "kafka: {}", problem.hint());
        }
    }

    /// The latest problem reported within `within`.
    pub fn recent(&self, within: Duration) -> Option<Problem> {
        let s = self.state.lock().unwrap();
        s.last
            .filter(|(_, at)| at.elapsed() < within)
            .map(|(p, _)| p)
    }

    /// Forgets the latest problem (Kafka answered again).
    pub fn clear(&self) {
        self.state.lock().unwrap().last = None;
    }
}

/// A client context that only reports problems: admin clients and the
/// readers without a context of their own.
#[derive(Clone)]
pub struct ConnContext(pub Diagnostics);

impl rdkafka::client::ClientContext for ConnContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        self.0.on_log(level, fac, msg);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.0.on_error(&error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for ConnContext {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn librdkafka_texts_are_classified() {
        for (text, want) in [
            ("ssl://127.0.0.1:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified, verify that ssl.ca.location is correctly configured or root CA certificates are installed (install ca-certificates package) (after 4ms in state SSL_HANDSHAKE)", Problem::UntrustedCertificate),
            ("127.0.0.1:9093/bootstrap: Disconnected while requesting ApiVersion: might be caused by incorrect security.protocol configuration (connecting to a SSL listener?) or broker version is < 0.10 (see api.version.request) (after 1ms in state APIVERSION_QUERY)", Problem::PlaintextToTls),
            ("127.0.0.1:9093/bootstrap: Receive failed: Invalid response size 352518912 (0..1000000000): increase receive.message.max.bytes", Problem::PlaintextToTls),
            ("sasl_plaintext://127.0.0.1:9092/bootstrap: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-256 (after 3ms in state AUTH_REQ)", Problem::Authentication),
            ("ssl://127.0.0.1:9092/bootstrap: SSL handshake failed: error:0A00010B:SSL routines::wrong version number (after 0ms in state SSL_HANDSHAKE)", Problem::TlsToPlaintext),
            ("ssl://127.0.0.1:9093/bootstrap: SSL handshake failed: error:0A000415:SSL routines::sslv3 alert certificate expired: SSL alert number 45", Problem::ClientCertificate),
        ] {
            assert_eq!(Problem::classify(text), Some(want), "{text}");
        }
        assert_eq!(Problem::classify("127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: Connection refused"), None);
    }

    #[test]
    fn a_plaintext_disconnect_before_the_first_answer_is_a_tls_listener() {
        let text = "127.0.0.1:39911/bootstrap: Disconnected: connection reset by peer (after 11ms in state APIVERSION_QUERY)";
        assert_eq!(Problem::classify(text), None);
        assert_eq!(
            Diagnostics::new(false).classify(text),
            Some(Problem::PlaintextToTls)
        );
        assert_eq!(Diagnostics::new(true).classify(text), None);
        // As librdkafka's log queue hands it over: facility apart, thread first.
        let d = Diagnostics::new(false);
        d.on_log(
            RDKafkaLogLevel::Info,
            "FAIL",
            &format!("[thrd:127.0.0.1:39911/bootstrap]: {text}"),
        );
        assert_eq!(
            d.recent(Duration::from_secs(60)),
            Some(Problem::PlaintextToTls)
        );
    }

    #[test]
    fn the_latest_problem_is_kept_and_cleared() {
        let d = Diagnostics::default();
        assert_eq!(d.recent(Duration::from_secs(60)), None);
        d.report(Problem::Authentication, "x");
        d.report(Problem::UntrustedCertificate, "y");
        assert_eq!(
            d.recent(Duration::from_secs(60)),
            Some(Problem::UntrustedCertificate)
        );
        d.clear();
        assert_eq!(d.recent(Duration::from_secs(60)), None);
    }
}
