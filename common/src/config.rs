//! Loads a binary's configuration struct from an optional TOML file plus environment overrides.
//!
//! *Design.* Every binary has one `Config` struct with `#[serde(default, deny_unknown_fields)]`
//! and a doc comment on each field. The file is parsed into a TOML table, then every
//! environment variable `PREFIX_KEY` (nested tables with `__`: `INSTAPOD_MAIL__SMTP_URL` is
//! `mail.smtp_url`) replaces the matching key. An override's value is read as a TOML value when
//! it parses as one (`8080`, `true`, `["127.0.0.1"]`) and as a plain string otherwise. Problems
//! are collected and reported together: every unreadable override and every field serde rejects.
//!
//! *Limitations.* serde stops at the first type error in the merged table, so two wrong field
//! types are reported one run at a time; unknown keys and bad overrides are all listed at once.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::{Table, Value};

/// Why a configuration could not be loaded; the message lists every problem found.
#[derive(Debug, thiserror::Error)]
pub enum LoadConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
    Invalid { problems: Vec<String> },
}

/// Reads `path` (when given) and applies environment overrides that start with `env_prefix`
/// (for example `"INSTAPOD_"`), then deserialises into `T`.
pub fn load<T: DeserializeOwned>(path: Option<&Path>, env_prefix: &str) -> Result<T, LoadConfigError> {
    load_from(path, env_prefix, std::env::vars())
}

/// Like [`load`], with the environment given explicitly (for tests).
pub fn load_from<T: DeserializeOwned>(
    path: Option<&Path>,
    env_prefix: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, LoadConfigError> {
    let mut problems = Vec::new();
    let mut table = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| LoadConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            match text.parse::<Table>() {
                Ok(table) => table,
                Err(err) => {
                    problems.push(format!("{}: {}", path.display(), err.message()));
                    Table::new()
                }
            }
        }
        None => Table::new(),
    };
    let mut overrides: Vec<(String, String)> = env.into_iter().filter(|(key, _)| key.starts_with(env_prefix)).collect();
    overrides.sort();
    for (key, raw) in overrides {
        let dotted = key[env_prefix.len()..].to_ascii_lowercase();
        // The variable naming the config file itself is not a field.
        if dotted == "config" {
            continue;
        }
        let path: Vec<&str> = dotted.split("__").collect();
        if path.iter().any(|part| part.is_empty()) {
            problems.push(format!("{key}: empty key segment"));
            continue;
        }
        if let Err(problem) = insert(&mut table, &path, parse_override(&raw)) {
            problems.push(format!("{key}: {problem}"));
        }
    }
    if !problems.is_empty() {
        return Err(LoadConfigError::Invalid { problems });
    }
    T::deserialize(Value::Table(table)).map_err(|err| LoadConfigError::Invalid {
        problems: vec![err.to_string().trim().to_string()],
    })
}

/// A TOML value when the text is one (numbers, booleans, arrays, inline tables, quoted
/// strings), else the text as a string.
fn parse_override(raw: &str) -> Value {
    format!("v = {raw}")
        .parse::<Table>()
        .ok()
        .and_then(|mut table| table.remove("v"))
        .unwrap_or_else(|| Value::String(raw.to_string()))
}

fn insert(table: &mut Table, path: &[&str], value: Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty key")?;
    let mut current = table;
    for part in parents {
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        current = entry.as_table_mut().ok_or_else(|| format!("`{part}` is not a table"))?;
    }
    current.insert(last.to_string(), value);
    Ok(())
}

/// Wraps a secret so that `Debug` prints `***`; serde reads it as a plain string.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself; call only where it is used, never to log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        listen: String,
        port: u16,
        proxies: Vec<String>,
        mail: Mail,
        password: Secret,
    }
    #[derive(Debug, serde::Deserialize, PartialEq, Default)]
    #[serde(default, deny_unknown_fields)]
    struct Mail {
        smtp_url: String,
    }
    impl Default for Sample {
        fn default() -> Self {
            Sample {
                listen: "a".into(),
                port: 1,
                proxies: vec![],
                mail: Mail::default(),
                password: Secret::default(),
            }
        }
    }

    fn check(file: &str, env: &[(&str, &str)]) -> Result<Sample, LoadConfigError> {
        let dir = std::env::temp_dir().join(format!("instapod-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(format!("{}.toml", file.len()));
        std::fs::write(&path, file).expect("write config");
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        load_from(Some(&path), "T_", env)
    }

    #[test]
    fn env_overrides_file_and_parses_values() {
        let config = check(
            "listen = \"file\"\nport = 5\n",
            &[
                ("T_PORT", "8080"),
                ("T_PROXIES", "[\"127.0.0.1\"]"),
                ("T_MAIL__SMTP_URL", "smtp://x:25"),
                ("T_PASSWORD", "hunter2"),
                ("OTHER", "ignored"),
            ],
        )
        .expect("valid");
        assert_eq!(config.listen, "file");
        assert_eq!(config.port, 8080);
        assert_eq!(config.proxies, vec!["127.0.0.1".to_string()]);
        assert_eq!(config.mail.smtp_url, "smtp://x:25");
        assert_eq!(config.password.expose(), "hunter2");
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn reports_every_bad_override_and_unknown_keys() {
        let err = check("", &[("T_A__", "1"), ("T___B", "2")]).expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains("T_A__") && text.contains("T___B"), "{text}");
        let err = check("nope = 1\n", &[]).expect_err("unknown field");
        assert!(err.to_string().contains("nope"), "{err}");
        let err = check("port = \"x\"\n", &[]).expect_err("bad type");
        assert!(err.to_string().contains("port"), "{err}");
    }
}
