//! A fleet's settings: command-line flags over the `[fleets.NAME]` table of `amictl.toml`
//! (pure merge, unit-tested). Unknown keys are errors.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::fleet::Scaling;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    pub ami: Option<String>,
    pub per_az: Option<usize>,
    /// AWS: the fewest instances per AZ scaling may leave (default: `per_az`).
    pub min_per_az: Option<usize>,
    /// AWS: the most instances per AZ scaling may reach (default: the minimum: fixed size).
    pub max_per_az: Option<usize>,
    /// AWS: scale each AZ's group to keep this many requests per instance (a target
    /// tracking policy on ALBRequestCountPerTarget).
    pub target_requests_per_instance: Option<f64>,
    pub subnets: Option<Vec<String>>,
    pub security_groups: Option<Vec<String>>,
    pub instance_type: Option<String>,
    pub instance_profile: Option<String>,
    pub target_group: Option<String>,
    pub prefix: Option<String>,
    /// Local fleets only: on AWS the check is an SSM document (`health_document`).
    pub health_command: Option<String>,
    /// An SSM Command document of the operator's, instead of amictl's `{prefix}HealthCheck`.
    pub health_document: Option<String>,
    pub timeout: Option<u64>,
    pub max_surge: Option<usize>,
    pub alarms: Option<Vec<String>>,
    pub bake: Option<u64>,
    /// The S3 bucket holding the fleet's lock (the stack's bucket, with `--stack`).
    pub lock_bucket: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub fleets: BTreeMap<String, FleetFile>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    pub ami: String,
    pub per_az: usize,
    /// How each AZ's group scales; None: fixed at `per_az`.
    pub scaling: Option<Scaling>,
    pub subnets: Vec<String>,
    pub security_groups: Vec<String>,
    pub instance_type: String,
    pub instance_profile: Option<String>,
    pub target_group: Option<String>,
    pub prefix: String,
    /// As given; [`crate::ssm::documents::on_aws`] makes the health gate of them.
    pub health_command: Option<String>,
    pub health_document: Option<String>,
    pub timeout: u64,
    pub max_surge: usize,
    pub alarms: Vec<String>,
    pub bake: u64,
    pub lock_bucket: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path} is invalid: {message}")]
    Parse { path: String, message: String },
    #[error("fleet {fleet}: {what} is missing: pass {flag} or set `{key}` under [fleets.{fleet}] in amictl.toml")]
    Missing {
        fleet: String,
        what: &'static str,
        flag: &'static str,
        key: &'static str,
    },
    #[error("fleet {0}: --subnets needs one subnet in each of at least two availability zones")]
    OneAz(String),
    #[error("fleet {0}: --per-az must be at least 1")]
    ZeroPerAz(String),
    #[error("fleet {fleet}: {problem}")]
    Scaling { fleet: String, problem: String },
}

impl ConfigFile {
    /// Reads `path`; a missing file is an empty configuration.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: path.display().to_string(),
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
            Err(e) => Err(ConfigError::Read {
                path: path.display().to_string(),
                message: e.to_string(),
            }),
        }
    }
}

/// Flags (`cli`) win over the file's table for the fleet.
pub fn merge(
    fleet: &str,
    cli: FleetFile,
    file: Option<&FleetFile>,
) -> Result<FleetConfig, ConfigError> {
    let f = file.cloned().unwrap_or_default();
    let missing = |what, flag, key| ConfigError::Missing {
        fleet: fleet.to_owned(),
        what,
        flag,
        key,
    };
    let subnets = cli.subnets.or(f.subnets).unwrap_or_default();
    if subnets.len() < 2 {
        return Err(ConfigError::OneAz(fleet.to_owned()));
    }
    let per_az = cli.per_az.or(f.per_az).unwrap_or(2);
    if per_az == 0 {
        return Err(ConfigError::ZeroPerAz(fleet.to_owned()));
    }
    let scaling = scaling(
        per_az,
        cli.min_per_az.or(f.min_per_az),
        cli.max_per_az.or(f.max_per_az),
        cli.target_requests_per_instance
            .or(f.target_requests_per_instance),
    )
    .map_err(|problem| ConfigError::Scaling {
        fleet: fleet.to_owned(),
        problem,
    })?;
    Ok(FleetConfig {
        scaling,
        ami: cli
            .ami
            .or(f.ami)
            .ok_or_else(|| missing("the AMI", "--ami", "ami"))?,
        per_az,
        subnets,
        security_groups: cli
            .security_groups
            .or(f.security_groups)
            .filter(|g| !g.is_empty())
            .ok_or_else(|| {
                missing(
                    "the security groups",
                    "--security-groups",
                    "security_groups",
                )
            })?,
        instance_type: cli
            .instance_type
            .or(f.instance_type)
            .unwrap_or_else(|| "t3.micro".into()),
        instance_profile: cli.instance_profile.or(f.instance_profile),
        target_group: cli.target_group.or(f.target_group),
        prefix: cli.prefix.or(f.prefix).unwrap_or_else(|| "amictl-".into()),
        health_command: cli.health_command.or(f.health_command),
        health_document: cli.health_document.or(f.health_document),
        timeout: cli.timeout.or(f.timeout).unwrap_or(600),
        max_surge: cli.max_surge.or(f.max_surge).unwrap_or(1).max(1),
        alarms: cli.alarms.or(f.alarms).unwrap_or_default(),
        bake: cli.bake.or(f.bake).unwrap_or(0),
        lock_bucket: cli.lock_bucket.or(f.lock_bucket),
    })
}

/// The scaling bounds (pure): None when none is asked for (a fixed `per_az`); the minimum
/// defaults to `per_az`, the maximum to the minimum.
pub fn scaling(
    per_az: usize,
    min: Option<usize>,
    max: Option<usize>,
    target: Option<f64>,
) -> Result<Option<Scaling>, String> {
    if min.is_none() && max.is_none() && target.is_none() {
        return Ok(None);
    }
    if target.is_some() && max.is_none() {
        return Err("--target-requests-per-instance needs --max-per-az: the most instances per AZ scaling may reach".into());
    }
    if let Some(t) = target {
        if !(t.is_finite() && t > 0.0) {
            return Err(format!(
                "--target-requests-per-instance {t} must be a number of requests above 0"
            ));
        }
    }
    let min = min.unwrap_or(per_az);
    let max = max.unwrap_or(min);
    if min == 0 {
        return Err(
            "--min-per-az must be at least 1: an AZ with no instance serves nothing".into(),
        );
    }
    if min > max {
        return Err(format!(
            "--min-per-az {min} is above --max-per-az {max}: lower the minimum or raise the maximum"
        ));
    }
    Ok(Some(Scaling {
        min,
        max,
        target_requests_per_instance: target,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_and_errors_name_the_fix() {
        let file: ConfigFile = toml::from_str(
            r#"
            [fleets.web]
            ami = "ami-file"
            subnets = ["subnet-a", "subnet-b"]
            security_groups = ["sg-1"]
            per_az = 3
            "#,
        )
        .unwrap();
        let cli = FleetFile {
            ami: Some("ami-flag".into()),
            ..Default::default()
        };
        let c = merge("web", cli, file.fleets.get("web")).unwrap();
        assert_eq!((c.ami.as_str(), c.per_az, c.max_surge), ("ami-flag", 3, 1));
        assert_eq!((c.health_command, c.health_document), (None, None));
        let e = merge(
            "api",
            FleetFile {
                subnets: Some(vec!["a".into(), "b".into()]),
                ..Default::default()
            },
            None,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("--ami") && e.to_string().contains("[fleets.api]"),
            "{e}"
        );
        let e = merge(
            "api",
            FleetFile {
                subnets: Some(vec!["a".into()]),
                ..Default::default()
            },
            None,
        )
        .unwrap_err();
        assert_eq!(e, ConfigError::OneAz("api".into()));
        assert!(toml::from_str::<ConfigFile>("[fleets.web]\namii = \"x\"\n").is_err());
    }

    #[test]
    fn scaling_bounds_and_their_errors() {
        assert_eq!(scaling(2, None, None, None), Ok(None));
        assert_eq!(
            scaling(2, None, Some(5), None),
            Ok(Some(Scaling {
                min: 2,
                max: 5,
                target_requests_per_instance: None
            }))
        );
        assert_eq!(
            scaling(2, Some(3), None, None)
                .unwrap()
                .map(|s| (s.min, s.max)),
            Some((3, 3))
        );
        let e = scaling(2, Some(5), Some(3), None).unwrap_err();
        assert!(e.contains("--min-per-az 5 is above --max-per-az 3"), "{e}");
        let e = scaling(2, None, None, Some(100.0)).unwrap_err();
        assert!(e.contains("needs --max-per-az"), "{e}");
        assert!(scaling(2, None, Some(4), Some(0.0)).is_err());
        assert!(scaling(2, Some(0), Some(4), None).is_err());
        let e = merge(
            "web",
            FleetFile {
                ami: Some("ami-1".into()),
                subnets: Some(vec!["a".into(), "b".into()]),
                security_groups: Some(vec!["sg".into()]),
                min_per_az: Some(4),
                max_per_az: Some(2),
                ..Default::default()
            },
            None,
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("fleet web: --min-per-az 4"),
            "{e}"
        );
    }
}
