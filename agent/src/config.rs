//! `ami-agent serve` settings: flags (with env fallbacks) over the config file (what the
//! NixOS module writes) over defaults. Resolution is pure and unit-tested.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::clock::Source;

/// The config file: TOML, snake_case keys, unknown keys rejected (a typo must not be
/// silently ignored on a production host).
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub root: Option<PathBuf>,
    pub manifest: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub reuse_port: Option<bool>,
    pub health_interval: Option<u64>,
    pub drift_interval: Option<u64>,
    pub drift_sources: Option<Vec<String>>,
    pub max_connections: Option<usize>,
    pub header_read_timeout: Option<u64>,
    pub keep_alive_timeout: Option<u64>,
    pub send_timeout: Option<u64>,
    pub shutdown_timeout: Option<u64>,
}

/// What the command line said; `None` means "not given".
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub root: Option<PathBuf>,
    pub manifest: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub reuse_port: bool,
    pub health_interval: Option<u64>,
    pub drift_interval: Option<u64>,
    pub drift_sources: Vec<String>,
    pub max_connections: Option<usize>,
    pub header_read_timeout: Option<u64>,
    pub keep_alive_timeout: Option<u64>,
    pub send_timeout: Option<u64>,
    pub shutdown_timeout: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub root: PathBuf,
    pub manifest: Option<PathBuf>,
    pub listen: SocketAddr,
    pub reuse_port: bool,
    pub health_interval: Duration,
    pub drift_interval: Duration,
    pub drift_sources: Vec<Source>,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub send_timeout: Duration,
    pub shutdown_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the config file {} is invalid: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("no content directory: pass --root DIR (or set `root` in the config file)")]
    NoRoot,
    #[error("{name} must be at least {min}, got {value}")]
    TooSmall {
        name: &'static str,
        min: u64,
        value: u64,
    },
    #[error("bad drift source {value:?}: {reason}")]
    Source { value: String, reason: String },
}

pub const DEFAULT_LISTEN: &str = "0.0.0.0:80";

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }
}

pub fn resolve(cli: Overrides, file: FileConfig) -> Result<Settings, ConfigError> {
    let root = cli.root.or(file.root).ok_or(ConfigError::NoRoot)?;
    let secs = |name, value: u64, min: u64| {
        if value < min {
            Err(ConfigError::TooSmall { name, min, value })
        } else {
            Ok(Duration::from_secs(value))
        }
    };
    let sources = if !cli.drift_sources.is_empty() {
        cli.drift_sources
    } else {
        file.drift_sources.unwrap_or_default()
    };
    let drift_sources = if sources.is_empty() {
        crate::clock::default_sources()
    } else {
        sources
            .iter()
            .map(|s| {
                s.parse::<Source>().map_err(|e| ConfigError::Source {
                    value: s.clone(),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<_, _>>()?
    };
    let max_connections = cli.max_connections.or(file.max_connections).unwrap_or(4096);
    if max_connections == 0 {
        return Err(ConfigError::TooSmall {
            name: "max_connections",
            min: 1,
            value: 0,
        });
    }
    Ok(Settings {
        root,
        manifest: cli.manifest.or(file.manifest),
        listen: cli
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default")),
        reuse_port: cli.reuse_port || file.reuse_port.unwrap_or(false),
        health_interval: secs(
            "health_interval",
            cli.health_interval.or(file.health_interval).unwrap_or(10),
            1,
        )?,
        drift_interval: secs(
            "drift_interval",
            cli.drift_interval.or(file.drift_interval).unwrap_or(60),
            1,
        )?,
        drift_sources,
        max_connections,
        header_read_timeout: secs(
            "header_read_timeout",
            cli.header_read_timeout
                .or(file.header_read_timeout)
                .unwrap_or(10),
            1,
        )?,
        keep_alive_timeout: secs(
            "keep_alive_timeout",
            cli.keep_alive_timeout
                .or(file.keep_alive_timeout)
                .unwrap_or(75),
            1,
        )?,
        send_timeout: secs(
            "send_timeout",
            cli.send_timeout.or(file.send_timeout).unwrap_or(60),
            1,
        )?,
        shutdown_timeout: secs(
            "shutdown_timeout",
            cli.shutdown_timeout.or(file.shutdown_timeout).unwrap_or(10),
            0,
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let file: FileConfig = toml::from_str(
            r#"
            root = "/srv/www"
            listen = "127.0.0.1:8080"
            health_interval = 5
            drift_sources = ["http://example.com/"]
            "#,
        )
        .unwrap();
        let s = resolve(Overrides::default(), file.clone()).unwrap();
        assert_eq!(s.root, PathBuf::from("/srv/www"));
        assert_eq!(s.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s.health_interval, Duration::from_secs(5));
        assert_eq!(s.drift_interval, Duration::from_secs(60));
        assert_eq!(s.drift_sources.len(), 1);

        let cli = Overrides {
            root: Some("/other".into()),
            health_interval: Some(2),
            ..Default::default()
        };
        let s = resolve(cli, file).unwrap();
        assert_eq!(s.root, PathBuf::from("/other"));
        assert_eq!(s.health_interval, Duration::from_secs(2));
        assert_eq!(s.listen, "127.0.0.1:8080".parse().unwrap());
    }

    #[test]
    fn defaults_and_errors() {
        let s = resolve(
            Overrides {
                root: Some("/r".into()),
                ..Default::default()
            },
            FileConfig::default(),
        )
        .unwrap();
        assert_eq!(s.listen.to_string(), DEFAULT_LISTEN);
        // nginx's defaults; the keep-alive one outlasts an ALB's 60 s idle timeout.
        assert_eq!(s.keep_alive_timeout, Duration::from_secs(75));
        assert_eq!(s.send_timeout, Duration::from_secs(60));
        assert_eq!(s.header_read_timeout, Duration::from_secs(10));
        assert_eq!(s.drift_sources, crate::clock::default_sources());
        assert!(matches!(
            resolve(Overrides::default(), FileConfig::default()),
            Err(ConfigError::NoRoot)
        ));
        let zero = Overrides {
            root: Some("/r".into()),
            health_interval: Some(0),
            ..Default::default()
        };
        assert!(resolve(zero, FileConfig::default())
            .unwrap_err()
            .to_string()
            .contains("health_interval"));
        let file: FileConfig =
            toml::from_str("root = \"/r\"\nsend_timeout = 0\nkeep_alive_timeout = 5\n").unwrap();
        assert!(resolve(Overrides::default(), file.clone())
            .unwrap_err()
            .to_string()
            .contains("send_timeout must be at least 1"));
        let s = resolve(
            Overrides {
                send_timeout: Some(7),
                ..Default::default()
            },
            file,
        )
        .unwrap();
        assert_eq!(s.send_timeout, Duration::from_secs(7));
        assert_eq!(s.keep_alive_timeout, Duration::from_secs(5));
        let bad = Overrides {
            root: Some("/r".into()),
            drift_sources: vec!["gopher://x".into()],
            ..Default::default()
        };
        assert!(matches!(
            resolve(bad, FileConfig::default()),
            Err(ConfigError::Source { .. })
        ));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err =
            toml::from_str::<FileConfig>("root = \"/r\"\nhealth_intervall = 5\n").unwrap_err();
        assert!(err.to_string().contains("health_intervall"), "{err}");
    }
}
