//! `WAGATE_{SECTION}_{KEY}` overrides, leaf by leaf, and the contract's aliases.

use super::*;

/// Environment variables of the contract (DESIGN §7) whose names do not follow
/// the generic `WAGATE_{SECTION}_{KEY}` rule.
const ENV_ALIASES: &[(&str, &str)] = &[
    ("WAGATE_TOPIC_PREFIX", "kafka.topic_prefix"),
    ("WAGATE_DEFAULT_THROUGHPUT", "egress.default_throughput"),
];

/// The env variable that overrides the leaf at `path` (`kafka.brokers` →
/// `WAGATE_KAFKA_BROKERS`, `listen` → `WAGATE_LISTEN`).
pub fn env_name_for(path: &str) -> String {
    format!("WAGATE_{}", path.replace('.', "_").to_ascii_uppercase())
}

/// Applies `WAGATE_…` overrides to every scalar leaf of the config (maps of
/// apps and tenants are not overridable leaf by leaf; their secrets already
/// come from the environment).
pub fn apply_env(raw: RawConfig, env: &dyn Env) -> Result<RawConfig, ConfigError> {
    let mut value = toml::Value::try_from(&raw).map_err(|e| invalid("config", e.to_string()))?;
    let mut overrides: Vec<(String, String)> = Vec::new();
    collect_leaves(&value, "", &mut overrides);
    let mut changed = false;
    for (path, var) in overrides.into_iter().chain(
        ENV_ALIASES
            .iter()
            .map(|(v, p)| (p.to_string(), v.to_string())),
    ) {
        let Some(text) = env.var(&var) else { continue };
        set_leaf(&mut value, &path, &text).map_err(|m| invalid(var.clone(), m))?;
        changed = true;
    }
    if !changed {
        return Ok(raw);
    }
    value
        .try_into()
        .map_err(|e: toml::de::Error| invalid("environment", e.to_string()))
}

fn collect_leaves(v: &toml::Value, prefix: &str, out: &mut Vec<(String, String)>) {
    if let toml::Value::Table(t) = v {
        for (k, child) in t {
            if prefix.is_empty() && (k == "apps" || k == "tenants") {
                continue;
            }
            // Property names hold dots: the table is set in the file only.
            if prefix == "kafka" && k == "librdkafka" {
                continue;
            }
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match child {
                toml::Value::Table(_) => collect_leaves(child, &path, out),
                _ => {
                    let var = env_name_for(&path);
                    out.push((path, var));
                }
            }
        }
    }
}

fn set_leaf(root: &mut toml::Value, path: &str, text: &str) -> Result<(), String> {
    let mut cur = root;
    let parts: Vec<&str> = path.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        cur = cur.get_mut(*p).ok_or_else(|| format!("no section {p}"))?;
    }
    let last = parts[parts.len() - 1];
    let table = cur.as_table_mut().ok_or("not a table")?;
    let old = table.get(last).ok_or("no such key")?;
    let new = match old {
        toml::Value::Integer(_) => toml::Value::Integer(
            text.trim()
                .parse::<i64>()
                .map_err(|_| format!("expected a whole number, got {text:?}"))?,
        ),
        toml::Value::Boolean(_) => toml::Value::Boolean(match text.trim() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => return Err(format!("expected true or false, got {text:?}")),
        }),
        toml::Value::Float(_) => toml::Value::Float(
            text.trim()
                .parse::<f64>()
                .map_err(|_| format!("expected a number, got {text:?}"))?,
        ),
        toml::Value::Array(_) => toml::Value::Array(
            text.split(',')
                .map(|s| toml::Value::String(s.trim().to_string()))
                .filter(|v| v.as_str() != Some(""))
                .collect(),
        ),
        _ => toml::Value::String(text.to_string()),
    };
    table.insert(last.to_string(), new);
    Ok(())
}
