//! How every Kafka client of the process connects: the brokers, the client
//! id, the security settings (TLS, SASL) and the `[kafka.librdkafka]`
//! passthrough, prepared once as one [`Connection`] from which each client
//! (producers, the egress consumer, the contacts readers, history reads,
//! admin, `tail`, `dlq redrive`, `topics …`) takes its base
//! `rdkafka::ClientConfig`.
//!
//! The passthrough is checked here, at start: a property that would break a
//! delivery guarantee (or has a key of its own) is refused with the reason,
//! and every property is handed to librdkafka once on a throwaway
//! configuration, so a property it rejects stops the start naming it.

use std::sync::Arc;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;

use super::diagnose::Diagnostics;
use crate::config::Secret;

/// `kafka.security_protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    /// librdkafka's name, which is also the config value.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }
    pub fn parse(s: &str) -> Option<SecurityProtocol> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "plaintext" => SecurityProtocol::Plaintext,
            "ssl" => SecurityProtocol::Ssl,
            "sasl_plaintext" => SecurityProtocol::SaslPlaintext,
            "sasl_ssl" => SecurityProtocol::SaslSsl,
            _ => return None,
        })
    }
    pub fn tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
    pub fn sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

/// `kafka.sasl_mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
    OauthBearer,
}

impl SaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::OauthBearer => "OAUTHBEARER",
        }
    }
    pub fn parse(s: &str) -> Option<SaslMechanism> {
        Some(match s.trim().to_ascii_uppercase().as_str() {
            "PLAIN" => SaslMechanism::Plain,
            "SCRAM-SHA-256" => SaslMechanism::ScramSha256,
            "SCRAM-SHA-512" => SaslMechanism::ScramSha512,
            "OAUTHBEARER" => SaslMechanism::OauthBearer,
            _ => return None,
        })
    }
}

/// How wagate authenticates with SASL.
#[derive(Debug, Clone)]
pub enum Sasl {
    /// PLAIN or SCRAM: a username and a password.
    Password {
        mechanism: SaslMechanism,
        username: Secret,
        password: Secret,
    },
    /// OAUTHBEARER with OIDC client credentials: librdkafka fetches the
    /// token from the endpoint and refreshes it.
    Oidc {
        token_endpoint_url: String,
        client_id: String,
        client_secret: Secret,
        scope: Option<String>,
    },
}

/// The validated security settings of `[kafka]`.
#[derive(Debug, Clone)]
pub struct Security {
    pub protocol: SecurityProtocol,
    pub ca_file: Option<String>,
    pub certificate_file: Option<String>,
    pub key_file: Option<String>,
    pub key_password: Option<Secret>,
    pub sasl: Option<Sasl>,
}

impl Security {
    pub const PLAINTEXT: Security = Security {
        protocol: SecurityProtocol::Plaintext,
        ca_file: None,
        certificate_file: None,
        key_file: None,
        key_password: None,
        sasl: None,
    };

    /// librdkafka's properties for these settings, each with the config
    /// key it comes from (for error messages) and whether it is a secret.
    fn properties(&self) -> Vec<Prop> {
        let mut v = Vec::new();
        let mut put = |name: &'static str, value: String, key: &'static str, secret: bool| {
            v.push(Prop {
                name: name.to_string(),
                value,
                key: key.to_string(),
                secret,
            })
        };
        if self.protocol != SecurityProtocol::Plaintext {
            put(
                "security.protocol",
                self.protocol.as_str().into(),
                "kafka.security_protocol",
                false,
            );
        }
        if let Some(f) = &self.ca_file {
            put("ssl.ca.location", f.clone(), "kafka.ssl_ca_file", false);
        }
        if let Some(f) = &self.certificate_file {
            put(
                "ssl.certificate.location",
                f.clone(),
                "kafka.ssl_certificate_file",
                false,
            );
        }
        if let Some(f) = &self.key_file {
            put("ssl.key.location", f.clone(), "kafka.ssl_key_file", false);
        }
        if let Some(p) = &self.key_password {
            put(
                "ssl.key.password",
                p.expose().into(),
                "kafka.ssl_key_password",
                true,
            );
        }
        match &self.sasl {
            None => {}
            Some(Sasl::Password {
                mechanism,
                username,
                password,
            }) => {
                put(
                    "sasl.mechanism",
                    mechanism.as_str().into(),
                    "kafka.sasl_mechanism",
                    false,
                );
                put(
                    "sasl.username",
                    username.expose().into(),
                    "kafka.sasl_username",
                    true,
                );
                put(
                    "sasl.password",
                    password.expose().into(),
                    "kafka.sasl_password",
                    true,
                );
            }
            Some(Sasl::Oidc {
                token_endpoint_url,
                client_id,
                client_secret,
                scope,
            }) => {
                put(
                    "sasl.mechanism",
                    "OAUTHBEARER".into(),
                    "kafka.sasl_mechanism",
                    false,
                );
                put(
                    "sasl.oauthbearer.method",
                    "oidc".into(),
                    "kafka.sasl_mechanism",
                    false,
                );
                put(
                    "sasl.oauthbearer.token.endpoint.url",
                    token_endpoint_url.clone(),
                    "kafka.sasl_oauthbearer_token_endpoint_url",
                    false,
                );
                put(
                    "sasl.oauthbearer.client.id",
                    client_id.clone(),
                    "kafka.sasl_oauthbearer_client_id",
                    false,
                );
                put(
                    "sasl.oauthbearer.client.secret",
                    client_secret.expose().into(),
                    "kafka.sasl_oauthbearer_client_secret",
                    true,
                );
                if let Some(s) = scope {
                    put(
                        "sasl.oauthbearer.scope",
                        s.clone(),
                        "kafka.sasl_oauthbearer_scope",
                        false,
                    );
                }
            }
        }
        v
    }
}

/// One librdkafka property and the config key it comes from.
#[derive(Clone)]
struct Prop {
    name: String,
    value: String,
    key: String,
    secret: bool,
}

/// A passthrough or security setting librdkafka (or wagate) refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConnectionError {
    /// The config key at fault (`kafka.ssl_ca_file`,
    /// `kafka.librdkafka."socket.timeout.ms"`, …).
    pub key: String,
    pub message: String,
}

/// The passthrough properties wagate refuses, with the reason: they would
/// break a guarantee, or a key of wagate's own sets them.
pub fn refused_property(name: &str) -> Option<&'static str> {
    Some(match name {
        "acks" | "request.required.acks" => {
            "wagate's producers use acks=all: a 200 to Meta means every in-sync replica has the records"
        }
        "enable.idempotence" => {
            "the idempotent producer keeps librdkafka's retries from writing a record twice"
        }
        "enable.auto.commit" | "auto.commit.enable" | "enable.auto.offset.store" => {
            "egress commits an offset only after the request's result is stored"
        }
        "auto.offset.reset" => {
            "egress reads a new consumer group from the earliest offset, so no send request is skipped"
        }
        "partitioner" | "partitioner_cb" => {
            "murmur2_random keeps each key on the partition Java clients pick, which keeps a user's records in order"
        }
        "isolation.level" => "wagate's readers never read aborted records",
        "enable.partition.eof" => "wagate's readers rely on it being off",
        "transactional.id" => "wagate does not produce in transactions",
        "group.id" | "group.instance.id" => {
            "use egress.group_id / egress.instance_id (the readers set their own)"
        }
        "bootstrap.servers" | "metadata.broker.list" => "use kafka.brokers",
        "client.id" => "use kafka.client_id",
        "linger.ms" | "queue.buffering.max.ms" => "use kafka.linger_ms and ingress.linger_ms",
        "compression.type" | "compression.codec" => "use kafka.compression",
        "message.timeout.ms" | "delivery.timeout.ms" => "use kafka.message_timeout_ms",
        "queue.buffering.max.messages" => "use kafka.queue_max_messages",
        "message.max.bytes" => {
            "derived from server.max_body_bytes, so that every body under the limit can be stored"
        }
        "security.protocol" => "use kafka.security_protocol",
        "ssl.ca.location" => "use kafka.ssl_ca_file",
        "ssl.certificate.location" => "use kafka.ssl_certificate_file",
        "ssl.key.location" => "use kafka.ssl_key_file",
        "ssl.key.password" => {
            "a secret: use kafka.ssl_key_password_env or kafka.ssl_key_password_file"
        }
        "ssl.key.pem" => "a private key is a secret: use kafka.ssl_key_file",
        "sasl.mechanism" | "sasl.mechanisms" => "use kafka.sasl_mechanism",
        "sasl.username" => "use kafka.sasl_username_env or kafka.sasl_username_file",
        "sasl.password" => "a secret: use kafka.sasl_password_env or kafka.sasl_password_file",
        "sasl.oauthbearer.method" => "set by kafka.sasl_mechanism = \"OAUTHBEARER\" (OIDC)",
        "sasl.oauthbearer.client.id" => "use kafka.sasl_oauthbearer_client_id",
        "sasl.oauthbearer.client.secret" => {
            "a secret: use kafka.sasl_oauthbearer_client_secret_env or _file"
        }
        "sasl.oauthbearer.token.endpoint.url" => "use kafka.sasl_oauthbearer_token_endpoint_url",
        "sasl.oauthbearer.scope" => "use kafka.sasl_oauthbearer_scope",
        _ => return None,
    })
}

/// Everything a Kafka client of this process connects with. Cheap to clone;
/// clones share the [`Diagnostics`] that the clients' error callbacks feed.
#[derive(Clone)]
pub struct Connection {
    brokers: String,
    client_id: String,
    /// Security settings, then the passthrough (applied last).
    props: Arc<[Prop]>,
    /// Index in `props` where the passthrough starts.
    passthrough_from: usize,
    diagnostics: Diagnostics,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let props: Vec<(&str, &str)> = self
            .props
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    if p.secret { "***" } else { p.value.as_str() },
                )
            })
            .collect();
        f.debug_struct("Connection")
            .field("brokers", &self.brokers)
            .field("client_id", &self.client_id)
            .field("props", &props)
            .finish()
    }
}

impl Connection {
    /// A plaintext connection without passthrough (tests, benches, `--dev`).
    pub fn plaintext(brokers: impl Into<String>) -> Connection {
        Connection {
            brokers: brokers.into(),
            client_id: "wagate".into(),
            props: Arc::from(Vec::new()),
            passthrough_from: 0,
            diagnostics: Diagnostics::default(),
        }
    }

    /// Checks the security settings and the passthrough with librdkafka and
    /// prepares them. `passthrough` is `[kafka.librdkafka]`.
    pub fn new<'a>(
        brokers: &str,
        client_id: &str,
        security: &Security,
        passthrough: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<Connection, ConnectionError> {
        let mut props = security.properties();
        let passthrough_from = props.len();
        for (name, value) in passthrough {
            let key = format!("kafka.librdkafka.\"{name}\"");
            if let Some(why) = refused_property(name) {
                return Err(ConnectionError {
                    key,
                    message: format!("refused: {why}"),
                });
            }
            props.push(Prop {
                name: name.clone(),
                value: value.clone(),
                key,
                secret: false,
            });
        }
        // Each property on its own: librdkafka names what it rejects.
        for p in &props {
            let mut cc = ClientConfig::new();
            cc.set(&p.name, &p.value);
            if let Err(e) = cc.create_native_config() {
                let why = match e {
                    KafkaError::ClientConfig(_, desc, _, _) => desc,
                    other => other.to_string(),
                };
                return Err(ConnectionError {
                    key: p.key.clone(),
                    message: format!("librdkafka rejects it: {why}"),
                });
            }
        }
        let conn = Connection {
            brokers: brokers.to_string(),
            client_id: client_id.to_string(),
            props: Arc::from(props),
            passthrough_from,
            diagnostics: Diagnostics::new(security.protocol.tls()),
        };
        if !conn.props.is_empty() {
            conn.check_clients()?;
        }
        Ok(conn)
    }

    /// Creates a throwaway producer and consumer (without brokers, so
    /// nothing connects) with every property: librdkafka checks the
    /// combination and loads the CA, certificate and key here.
    fn check_clients(&self) -> Result<(), ConnectionError> {
        use rdkafka::consumer::BaseConsumer;
        use rdkafka::producer::BaseProducer;
        let mut cc = ClientConfig::new();
        for p in self.props.iter() {
            cc.set(&p.name, &p.value);
        }
        let producer = cc.create::<BaseProducer>().map(drop);
        let consumer = producer.and_then(|_| {
            cc.set("group.id", "wagate-config-check")
                .create::<BaseConsumer>()
                .map(drop)
        });
        consumer.map_err(|e| {
            let text = match e {
                KafkaError::ClientCreation(t) => t,
                other => other.to_string(),
            };
            ConnectionError {
                key: self.key_for(&text),
                message: format!("librdkafka cannot create a client: {text}"),
            }
        })
    }

    /// The config key a librdkafka creation error most likely points at.
    fn key_for(&self, text: &str) -> String {
        let named = |prop: &str| self.props.iter().find(|p| p.name == prop);
        let lower = text.to_ascii_lowercase();
        for (needle, prop) in [
            ("ssl.ca", "ssl.ca.location"),
            ("ca certificate", "ssl.ca.location"),
            ("ssl.certificate", "ssl.certificate.location"),
            ("ssl.key.password", "ssl.key.password"),
            ("private key", "ssl.key.location"),
            ("ssl.key", "ssl.key.location"),
            ("sasl.oauthbearer", "sasl.oauthbearer.method"),
            ("sasl.mechanism", "sasl.mechanism"),
        ] {
            if lower.contains(needle) {
                if let Some(p) = named(prop) {
                    return p.key.clone();
                }
            }
        }
        // A passthrough property named in the message.
        if let Some(p) = self.props[self.passthrough_from..]
            .iter()
            .find(|p| text.contains(p.name.as_str()))
        {
            return p.key.clone();
        }
        "kafka".into()
    }

    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// The same settings against other brokers (`tail --brokers`).
    pub fn with_brokers(&self, brokers: impl Into<String>) -> Connection {
        Connection {
            brokers: brokers.into(),
            ..self.clone()
        }
    }

    /// Where the clients' error callbacks report connection problems.
    pub fn diagnostics(&self) -> &Diagnostics {
        &self.diagnostics
    }

    /// The base configuration of a client: bootstrap servers, client id and
    /// security, then `role`'s own settings, then the passthrough (last, so
    /// a tuning property set there wins over wagate's default for it; every
    /// property that a guarantee depends on is refused in [`Connection::new`]).
    pub fn client_config(&self, role: impl FnOnce(&mut ClientConfig)) -> ClientConfig {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id);
        for p in &self.props[..self.passthrough_from] {
            cc.set(&p.name, &p.value);
        }
        role(&mut cc);
        for p in &self.props[self.passthrough_from..] {
            cc.set(&p.name, &p.value);
        }
        cc
    }

    /// Whether the connection uses TLS (for log lines).
    pub fn security_protocol(&self) -> &str {
        self.props
            .iter()
            .find(|p| p.name == "security.protocol")
            .map_or("plaintext", |p| p.value.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn pass(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn guarantees_are_refused_with_the_reason() {
        for name in [
            "acks",
            "enable.idempotence",
            "enable.auto.commit",
            "enable.auto.offset.store",
            "partitioner",
            "isolation.level",
            "bootstrap.servers",
            "sasl.password",
        ] {
            let e = Connection::new(
                "b:9092",
                "wagate",
                &Security::PLAINTEXT,
                &pass(&[(name, "x")]),
            )
            .unwrap_err();
            assert_eq!(e.key, format!("kafka.librdkafka.\"{name}\""));
            assert!(e.message.starts_with("refused: "), "{e}");
        }
    }

    #[test]
    fn a_property_librdkafka_rejects_is_named() {
        let e = Connection::new(
            "b:9092",
            "wagate",
            &Security::PLAINTEXT,
            &pass(&[("socket.timeout.ms", "60000"), ("no.such.property", "1")]),
        )
        .unwrap_err();
        assert_eq!(e.key, "kafka.librdkafka.\"no.such.property\"", "{e}");
        let e = Connection::new(
            "b:9092",
            "wagate",
            &Security::PLAINTEXT,
            &pass(&[("socket.timeout.ms", "soon")]),
        )
        .unwrap_err();
        assert_eq!(e.key, "kafka.librdkafka.\"socket.timeout.ms\"", "{e}");
    }

    #[test]
    fn passthrough_comes_last_and_secrets_are_not_printed() {
        let sec = Security {
            protocol: SecurityProtocol::SaslPlaintext,
            sasl: Some(Sasl::Password {
                mechanism: SaslMechanism::ScramSha256,
                username: Secret::new("alice"),
                password: Secret::new("pa55word"),
            }),
            ..Security::PLAINTEXT
        };
        let c = Connection::new(
            "b:9092",
            "wagate",
            &sec,
            &pass(&[("fetch.wait.max.ms", "200")]),
        )
        .unwrap();
        let cc = c.client_config(|cc| {
            cc.set("fetch.wait.max.ms", "20");
        });
        assert_eq!(cc.get("fetch.wait.max.ms"), Some("200"));
        assert_eq!(cc.get("security.protocol"), Some("sasl_plaintext"));
        assert_eq!(cc.get("sasl.mechanism"), Some("SCRAM-SHA-256"));
        assert_eq!(cc.get("bootstrap.servers"), Some("b:9092"));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("pa55word") && !shown.contains("alice"),
            "{shown}"
        );
    }

    #[test]
    fn a_ca_file_librdkafka_cannot_load_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let sec = Security {
            protocol: SecurityProtocol::Ssl,
            ca_file: Some(ca.display().to_string()),
            ..Security::PLAINTEXT
        };
        let e = Connection::new("b:9093", "wagate", &sec, &BTreeMap::new()).unwrap_err();
        assert_eq!(e.key, "kafka.ssl_ca_file", "{e}");
    }

    #[test]
    fn oidc_client_credentials_are_accepted_by_librdkafka() {
        // Needs librdkafka built with libcurl (the `curl` feature).
        let sec = Security {
            protocol: SecurityProtocol::SaslSsl,
            sasl: Some(Sasl::Oidc {
                token_endpoint_url: "https://idp.example/oauth2/token".into(),
                client_id: "wagate".into(),
                client_secret: Secret::new("s"),
                scope: Some("kafka".into()),
            }),
            ..Security::PLAINTEXT
        };
        Connection::new("b:9093", "wagate", &sec, &BTreeMap::new()).unwrap();
    }
}
