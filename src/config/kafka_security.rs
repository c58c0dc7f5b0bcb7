//! `[kafka]`'s security keys and `[kafka.librdkafka]` → the one
//! [`Connection`] every Kafka client is made from. Files must exist and be
//! readable now; secrets come from their `_env` or `_file` form only.

use super::*;
use crate::kafka::{Connection, Sasl, SaslMechanism, Security, SecurityProtocol};

/// A file the config names: readable at start, or an error naming the key.
fn readable_file(key: &str, path: &str) -> Result<Option<String>, ConfigError> {
    let path = path.trim();
    if path.is_empty() {
        return Ok(None);
    }
    std::fs::File::open(path).map_err(|e| invalid(key, format!("cannot read {path}: {e}")))?;
    Ok(Some(path.to_string()))
}

/// `{field}_env` / `{field}_file`, where a set file replaces the default
/// variable (as for `graph.access_token`).
fn optional_secret(
    key: &str,
    env_name: &str,
    default_env: &str,
    file: &str,
    env: &dyn Env,
) -> Result<Option<Secret>, ConfigError> {
    let env_name = if !file.is_empty() && env_name == default_env {
        ""
    } else {
        env_name
    };
    secret(key, env_name, file, env)
}

fn needed(key: &str, s: Option<Secret>, env_name: &str, why: &str) -> Result<Secret, ConfigError> {
    s.ok_or_else(|| {
        invalid(
            key,
            format!(
                "{why}: set the environment variable {} (or {key}_file)",
                if env_name.is_empty() {
                    "(none configured)"
                } else {
                    env_name
                }
            ),
        )
    })
}

pub(super) fn connection(k: &RawKafka, env: &dyn Env) -> Result<Connection, ConfigError> {
    let d = RawKafka::default();
    let protocol = SecurityProtocol::parse(&k.security_protocol).ok_or_else(|| {
        invalid(
            "kafka.security_protocol",
            format!(
                "expected plaintext, ssl, sasl_plaintext or sasl_ssl, got {:?}",
                k.security_protocol
            ),
        )
    })?;
    let tls_only = |key: &str, v: &str| {
        if !v.trim().is_empty() && !protocol.tls() {
            Err(invalid(
                key,
                "is a TLS setting: set kafka.security_protocol to \"ssl\" or \"sasl_ssl\"",
            ))
        } else {
            Ok(())
        }
    };
    tls_only("kafka.ssl_ca_file", &k.ssl_ca_file)?;
    tls_only("kafka.ssl_certificate_file", &k.ssl_certificate_file)?;
    tls_only("kafka.ssl_key_file", &k.ssl_key_file)?;
    let ca_file = readable_file("kafka.ssl_ca_file", &k.ssl_ca_file)?;
    let certificate_file = readable_file("kafka.ssl_certificate_file", &k.ssl_certificate_file)?;
    let key_file = readable_file("kafka.ssl_key_file", &k.ssl_key_file)?;
    if certificate_file.is_some() != key_file.is_some() {
        let missing = if key_file.is_none() {
            "kafka.ssl_key_file"
        } else {
            "kafka.ssl_certificate_file"
        };
        return Err(invalid(
            missing,
            "mutual TLS needs both kafka.ssl_certificate_file and kafka.ssl_key_file",
        ));
    }
    let key_password = if key_file.is_some() {
        optional_secret(
            "kafka.ssl_key_password",
            &k.ssl_key_password_env,
            &d.ssl_key_password_env,
            &k.ssl_key_password_file,
            env,
        )?
    } else if !k.ssl_key_password_file.is_empty() {
        return Err(invalid(
            "kafka.ssl_key_password_file",
            "a key password needs kafka.ssl_key_file",
        ));
    } else {
        None
    };
    let mechanism = if k.sasl_mechanism.trim().is_empty() {
        None
    } else {
        Some(SaslMechanism::parse(&k.sasl_mechanism).ok_or_else(|| {
            invalid(
                "kafka.sasl_mechanism",
                format!(
                    "expected PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER, got {:?}",
                    k.sasl_mechanism
                ),
            )
        })?)
    };
    let sasl = match (protocol.sasl(), mechanism) {
        (false, None) => None,
        (false, Some(_)) => {
            return Err(invalid(
                "kafka.sasl_mechanism",
                "SASL needs kafka.security_protocol \"sasl_ssl\" (or \"sasl_plaintext\")",
            ))
        }
        (true, None) => {
            return Err(invalid(
                "kafka.sasl_mechanism",
                format!(
                    "required with kafka.security_protocol = \"{}\": PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER",
                    protocol.as_str()
                ),
            ))
        }
        (true, Some(SaslMechanism::OauthBearer)) => Some(oidc(k, env)?),
        (true, Some(mechanism)) => {
            let username = optional_secret(
                "kafka.sasl_username",
                &k.sasl_username_env,
                &d.sasl_username_env,
                &k.sasl_username_file,
                env,
            )?;
            let password = optional_secret(
                "kafka.sasl_password",
                &k.sasl_password_env,
                &d.sasl_password_env,
                &k.sasl_password_file,
                env,
            )?;
            Some(Sasl::Password {
                mechanism,
                username: needed(
                    "kafka.sasl_username",
                    username,
                    &k.sasl_username_env,
                    "SASL needs a username",
                )?,
                password: needed(
                    "kafka.sasl_password",
                    password,
                    &k.sasl_password_env,
                    "SASL needs a password",
                )?,
            })
        }
    };
    if mechanism != Some(SaslMechanism::OauthBearer) {
        for (key, v) in [
            (
                "kafka.sasl_oauthbearer_token_endpoint_url",
                &k.sasl_oauthbearer_token_endpoint_url,
            ),
            (
                "kafka.sasl_oauthbearer_client_id",
                &k.sasl_oauthbearer_client_id,
            ),
            ("kafka.sasl_oauthbearer_scope", &k.sasl_oauthbearer_scope),
        ] {
            if !v.trim().is_empty() {
                return Err(invalid(key, "needs kafka.sasl_mechanism = \"OAUTHBEARER\""));
            }
        }
    }
    let security = Security {
        protocol,
        ca_file,
        certificate_file,
        key_file,
        key_password,
        sasl,
    };
    Connection::new(k.brokers.trim(), &k.client_id, &security, &k.librdkafka)
        .map_err(|e| invalid(e.key, e.message))
}

fn oidc(k: &RawKafka, env: &dyn Env) -> Result<Sasl, ConfigError> {
    let d = RawKafka::default();
    let url = k.sasl_oauthbearer_token_endpoint_url.trim();
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(invalid(
            "kafka.sasl_oauthbearer_token_endpoint_url",
            format!("OAUTHBEARER needs the OIDC token endpoint (an https URL), got {url:?}"),
        ));
    }
    if k.sasl_oauthbearer_client_id.trim().is_empty() {
        return Err(invalid(
            "kafka.sasl_oauthbearer_client_id",
            "OAUTHBEARER needs the OIDC client id",
        ));
    }
    let secret = optional_secret(
        "kafka.sasl_oauthbearer_client_secret",
        &k.sasl_oauthbearer_client_secret_env,
        &d.sasl_oauthbearer_client_secret_env,
        &k.sasl_oauthbearer_client_secret_file,
        env,
    )?;
    let scope = k.sasl_oauthbearer_scope.trim();
    Ok(Sasl::Oidc {
        token_endpoint_url: url.to_string(),
        client_id: k.sasl_oauthbearer_client_id.trim().to_string(),
        client_secret: needed(
            "kafka.sasl_oauthbearer_client_secret",
            secret,
            &k.sasl_oauthbearer_client_secret_env,
            "OAUTHBEARER needs the OIDC client secret",
        )?,
        scope: (!scope.is_empty()).then(|| scope.to_string()),
    })
}
