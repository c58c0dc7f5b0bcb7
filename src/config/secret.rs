//! Secrets: never in the file, read once from the variable or file it names.

use super::*;

/// A secret, never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub(super) String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Reads a secret named by `{field}_env` or `{field}_file`.
pub(super) fn secret(
    key: &str,
    env_name: &str,
    file: &str,
    env: &dyn Env,
) -> Result<Option<Secret>, ConfigError> {
    if !env_name.is_empty() && !file.is_empty() {
        return Err(invalid(
            key,
            "set either the _env or the _file form, not both",
        ));
    }
    if !file.is_empty() {
        let text = std::fs::read_to_string(file)
            .map_err(|e| invalid(format!("{key}_file"), format!("cannot read {file}: {e}")))?;
        let t = text.trim_end_matches(['\n', '\r']).to_string();
        if t.is_empty() {
            return Err(invalid(format!("{key}_file"), format!("{file} is empty")));
        }
        return Ok(Some(Secret(t)));
    }
    if !env_name.is_empty() {
        return Ok(env.var(env_name).filter(|v| !v.is_empty()).map(Secret));
    }
    Ok(None)
}

/// A secret the config requires: its `_env` or `_file` form, else the
/// `--dev` value, else an error naming the variable to set.
pub(super) fn required_secret(
    key: &str,
    (env_name, file): (&str, &str),
    env: &dyn Env,
    dev: Option<&str>,
    missing: &str,
    file_key: &str,
) -> Result<Secret, ConfigError> {
    match secret(key, env_name, file, env)? {
        Some(s) => Ok(s),
        None => match dev {
            Some(d) => Ok(Secret::new(d)),
            None => Err(invalid(
                key,
                format!(
                    "{missing}: set the environment variable {} (or {file_key})",
                    show_env(env_name)
                ),
            )),
        },
    }
}

fn show_env(name: &str) -> &str {
    if name.is_empty() {
        "(none configured)"
    } else {
        name
    }
}
