//! The stack's outputs (pure): parsed into what a rollout needs, shown to people, and
//! turned into the fleet settings `rollout --stack` starts from.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::rollout::config::FleetFile;

/// The outputs `stack.yaml` declares, by their output keys.
pub mod key {
    pub const VPC: &str = "Vpc";
    pub const SUBNETS: &str = "Subnets";
    pub const INSTANCE_SECURITY_GROUP: &str = "InstanceSecurityGroup";
    pub const INSTANCE_PROFILE: &str = "InstanceProfile";
    pub const TARGET_GROUP: &str = "TargetGroup";
    pub const ALARMS: &str = "Alarms";
    pub const URL: &str = "Url";
    pub const IMPORT_BUCKET: &str = "ImportBucket";
}

/// A deployed stack's outputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StackOutputs {
    pub vpc: String,
    /// One public subnet in each of two availability zones.
    pub subnets: Vec<String>,
    pub instance_security_group: String,
    /// The instance profile's name.
    pub instance_profile: String,
    /// The target group's ARN.
    pub target_group: String,
    /// The CloudWatch alarms' names.
    pub alarms: Vec<String>,
    /// The load balancer's address, `http://DNS/`.
    pub url: String,
    pub import_bucket: String,
    /// The stack's `Prefix` parameter: the prefix of the names in it, and of the fleet's
    /// SSM documents. Not an output; read beside them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stack {stack} has no output {} (is it deployed from this amictl's template? `amictl stack deploy --name {stack}` updates it)", missing.join(", "))]
pub struct MissingOutputs {
    pub stack: String,
    pub missing: Vec<&'static str>,
}

/// A comma-joined output as a list, without empty items.
fn list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

impl StackOutputs {
    /// From DescribeStacks' outputs (key -> value); names every missing or empty one.
    pub fn parse(
        stack: &str,
        outputs: &BTreeMap<String, String>,
    ) -> Result<StackOutputs, MissingOutputs> {
        let mut missing = Vec::new();
        let mut get = |k: &'static str| match outputs.get(k).map(|v| v.trim()) {
            Some(v) if !v.is_empty() => v.to_owned(),
            _ => {
                missing.push(k);
                String::new()
            }
        };
        let parsed = StackOutputs {
            vpc: get(key::VPC),
            subnets: list(&get(key::SUBNETS)),
            instance_security_group: get(key::INSTANCE_SECURITY_GROUP),
            instance_profile: get(key::INSTANCE_PROFILE),
            target_group: get(key::TARGET_GROUP),
            alarms: list(&get(key::ALARMS)),
            url: get(key::URL),
            import_bucket: get(key::IMPORT_BUCKET),
            prefix: None,
        };
        if missing.is_empty() {
            Ok(parsed)
        } else {
            Err(MissingOutputs {
                stack: stack.to_owned(),
                missing,
            })
        }
    }

    /// What `rollout --stack` starts from: the fleet's network, profile, target group,
    /// alarms, the stack's prefix (whose SSM documents it gates on) and its bucket (which
    /// holds the fleet's lock). Everything else (AMI, size, type, ...) stays with the flags
    /// and amictl.toml.
    pub fn fleet_defaults(&self) -> FleetFile {
        FleetFile {
            subnets: Some(self.subnets.clone()),
            security_groups: Some(vec![self.instance_security_group.clone()]),
            instance_profile: Some(self.instance_profile.clone()),
            target_group: Some(self.target_group.clone()),
            alarms: Some(self.alarms.clone()),
            lock_bucket: Some(self.import_bucket.clone()),
            prefix: self.prefix.clone(),
            ..FleetFile::default()
        }
    }
}

/// `upper` with each setting it lacks taken from `lower`: amictl.toml's table over the
/// stack's defaults, so that the order is flags, then the file, then the stack.
pub fn beneath(upper: Option<&FleetFile>, lower: FleetFile) -> FleetFile {
    let u = upper.cloned().unwrap_or_default();
    FleetFile {
        ami: u.ami.or(lower.ami),
        per_az: u.per_az.or(lower.per_az),
        min_per_az: u.min_per_az.or(lower.min_per_az),
        max_per_az: u.max_per_az.or(lower.max_per_az),
        target_requests_per_instance: u
            .target_requests_per_instance
            .or(lower.target_requests_per_instance),
        subnets: u.subnets.or(lower.subnets),
        security_groups: u.security_groups.or(lower.security_groups),
        instance_type: u.instance_type.or(lower.instance_type),
        instance_profile: u.instance_profile.or(lower.instance_profile),
        target_group: u.target_group.or(lower.target_group),
        prefix: u.prefix.or(lower.prefix),
        health_command: u.health_command.or(lower.health_command),
        health_document: u.health_document.or(lower.health_document),
        timeout: u.timeout.or(lower.timeout),
        max_surge: u.max_surge.or(lower.max_surge),
        alarms: u.alarms.or(lower.alarms),
        bake: u.bake.or(lower.bake),
        lock_bucket: u.lock_bucket.or(lower.lock_bucket),
    }
}

/// The outputs for people: `Key  value` lines in key order, then the URL alone on the last
/// line (as `rollout` prints it, so `| tail -n1` gives the address).
pub fn render(outputs: &BTreeMap<String, String>) -> String {
    let width = outputs
        .keys()
        .filter(|k| k.as_str() != key::URL)
        .map(String::len)
        .max()
        .unwrap_or(0);
    let mut text = String::new();
    for (k, v) in outputs.iter().filter(|(k, _)| k.as_str() != key::URL) {
        text.push_str(&format!("{k:width$}  {v}\n"));
    }
    if let Some(url) = outputs.get(key::URL) {
        text.push_str(url);
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::config::merge;

    fn full() -> BTreeMap<String, String> {
        [
            ("Vpc", "vpc-1"),
            ("Subnets", "subnet-a,subnet-b"),
            ("InstanceSecurityGroup", "sg-1"),
            ("InstanceProfile", "amictl-instance"),
            ("TargetGroup", "arn:aws:elasticloadbalancing:tg"),
            ("Alarms", "amictl-unhealthy-hosts, amictl-target-5xx"),
            ("Url", "http://lb.example/"),
            ("ImportBucket", "amictl-import-1-us-east-1"),
            ("Extra", "ignored"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    #[test]
    fn parses_every_output() {
        let o = StackOutputs::parse("web", &full()).unwrap();
        assert_eq!(o.subnets, vec!["subnet-a", "subnet-b"]);
        assert_eq!(
            o.alarms,
            vec!["amictl-unhealthy-hosts", "amictl-target-5xx"]
        );
        assert_eq!(o.url, "http://lb.example/");
        let json = serde_json::to_value(&o).unwrap();
        assert_eq!(json["instance_security_group"], "sg-1");
    }

    #[test]
    fn names_what_is_missing() {
        let mut m = full();
        m.remove("Url");
        m.insert("Subnets".into(), " ".into());
        let e = StackOutputs::parse("web", &m).unwrap_err();
        assert_eq!(e.missing, vec!["Subnets", "Url"]);
        assert!(
            e.to_string().contains("amictl stack deploy --name web"),
            "{e}"
        );
    }

    #[test]
    fn flags_then_file_then_stack() {
        let mut outputs = StackOutputs::parse("web", &full()).unwrap();
        outputs.prefix = Some("amictl-pr-7-".into());
        let stack = outputs.fleet_defaults();
        let file = FleetFile {
            target_group: Some("tg-from-file".into()),
            ami: Some("ami-file".into()),
            ..FleetFile::default()
        };
        let cli = FleetFile {
            security_groups: Some(vec!["sg-flag".into()]),
            ..FleetFile::default()
        };
        let c = merge("web", cli, Some(&beneath(Some(&file), stack.clone()))).unwrap();
        assert_eq!(c.security_groups, vec!["sg-flag"]);
        assert_eq!(c.target_group.as_deref(), Some("tg-from-file"));
        assert_eq!(c.subnets, vec!["subnet-a", "subnet-b"]);
        assert_eq!(c.instance_profile.as_deref(), Some("amictl-instance"));
        assert_eq!(c.alarms.len(), 2);
        assert_eq!(c.ami, "ami-file");
        // The stack's prefix names the SSM documents the gate sends; its bucket holds the
        // fleet's lock.
        assert_eq!(c.prefix, "amictl-pr-7-");
        assert_eq!(c.lock_bucket.as_deref(), Some("amictl-import-1-us-east-1"));
        // Without a file table, the stack's values alone.
        let c = merge(
            "web",
            FleetFile {
                ami: Some("ami-1".into()),
                ..FleetFile::default()
            },
            Some(&beneath(None, stack)),
        )
        .unwrap();
        assert_eq!(c.security_groups, vec!["sg-1"]);
        assert_eq!(
            c.target_group.as_deref(),
            Some("arn:aws:elasticloadbalancing:tg")
        );
    }

    #[test]
    fn url_last() {
        assert_eq!(
            render(&full()),
            "Alarms                 amictl-unhealthy-hosts, amictl-target-5xx\n\
             Extra                  ignored\n\
             ImportBucket           amictl-import-1-us-east-1\n\
             InstanceProfile        amictl-instance\n\
             InstanceSecurityGroup  sg-1\n\
             Subnets                subnet-a,subnet-b\n\
             TargetGroup            arn:aws:elasticloadbalancing:tg\n\
             Vpc                    vpc-1\n\
             http://lb.example/\n"
        );
        assert_eq!(render(&BTreeMap::new()), "");
    }
}
