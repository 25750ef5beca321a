//! A fleet: the instances tagged `amictl:fleet=NAME`, spread over availability zones, and
//! the effects a rollout works through. Each effect is a trait (compute, Run Command, load
//! balancer, alarms), implemented for AWS and for the local fleet, and faked in tests.

pub mod asg;
pub mod drift;
pub mod ec2;
pub mod health;
pub mod table;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod elb;
pub mod sim;

pub const TAG_FLEET: &str = "amictl:fleet";
/// The rollout that launched an instance.
pub const TAG_ROLLOUT: &str = "amictl:rollout";
/// Set on an old instance a rollout has taken out of service: the rollout's id.
pub const TAG_RETIRING: &str = "amictl:retiring";
/// Digest of the launch settings other than the image (type, groups, profile, subnet).
pub const TAG_SPEC: &str = "amictl:spec";
pub const TAG_IMAGE: &str = "amictl:image";
/// The prefix whose resources these are (what the IAM policy's conditions match).
pub const TAG_PREFIX: &str = "amictl:prefix";
/// The tag EC2 Auto Scaling puts on every instance of a group.
pub const TAG_GROUP: &str = "aws:autoscaling:groupName";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Pending,
    Running,
    /// Stopping, stopped, shutting down: not serving, not coming back by itself.
    Down,
    Terminated,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub az: String,
    /// The image it runs (an AMI id, or a local release).
    pub image: String,
    /// The launch-settings digest it was launched with.
    pub spec: String,
    pub state: InstanceState,
    /// The rollout that launched it.
    pub rollout: Option<String>,
    /// The rollout that took it out of service, if one did.
    pub retiring: Option<String>,
    /// Where it answers from outside (public DNS name or address), if anywhere.
    pub address: Option<String>,
    /// The group that keeps it (an Auto Scaling group), if one does.
    #[serde(default)]
    pub group: Option<String>,
}

impl Instance {
    pub fn matches(&self, image: &str, spec: &str) -> bool {
        self.image == image && self.spec == spec
    }
}

/// One placement: an AZ and where instances go in it (a subnet on AWS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub az: String,
    pub subnet: String,
}

/// A launch request. `token` makes a repeated launch (a retry, a resumed rollout) return
/// the instance the first one made (ClientToken on AWS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub fleet: String,
    pub placement: Placement,
    pub image: String,
    pub spec: String,
    pub rollout: String,
    pub token: String,
    pub name: String,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CloudError {
    /// The AZ cannot take the instance now (InsufficientInstanceCapacity and friends).
    #[error("no capacity in {az}: {message}")]
    NoCapacity { az: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("access denied: {message} (the IAM policy needs {action})")]
    Denied {
        action: &'static str,
        message: String,
    },
    #[error("{0}")]
    Other(String),
}

impl From<crate::aws::AwsError> for CloudError {
    fn from(e: crate::aws::AwsError) -> Self {
        use crate::aws::AwsError;
        match e {
            AwsError::NotFound(m) => CloudError::NotFound(m),
            AwsError::Denied { action, message } => CloudError::Denied { action, message },
            other => CloudError::Other(other.to_string()),
        }
    }
}

/// Launching and retiring instances (EC2, or local processes).
pub trait Compute: Send + Sync {
    /// The fleet's instances that are not terminated.
    fn instances(
        &self,
        fleet: &str,
    ) -> impl Future<Output = Result<Vec<Instance>, CloudError>> + Send;
    fn launch(&self, launch: &Launch) -> impl Future<Output = Result<String, CloudError>> + Send;
    fn terminate(&self, ids: &[String]) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// Marks (Some) or unmarks (None) instances as taken out of service by a rollout.
    fn set_retiring(
        &self,
        ids: &[String],
        rollout: Option<&str>,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
}

/// What one invocation of a command on one instance came to (SSM Run Command's view).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Invocation {
    /// The command ran and exited with `code` (0 is SSM's Success, others its Failed).
    Exited {
        code: i32,
        stdout: String,
        stderr: String,
    },
    /// The instance cannot be reached yet (not registered with SSM, Undeliverable,
    /// Delivery Timed Out): retry until the deadline.
    Unreachable { reason: String },
    /// It ran but did not finish in time (Execution Timed Out), or was cancelled.
    TimedOut { reason: String },
}

/// What [`RunCommand`] runs. amictl's own commands are named, not spelled out: on AWS each
/// is an SSM document of amictl's with one fixed command, which IAM can grant by itself
/// (a document that takes a shell command is a root shell for whoever may send it); the
/// local fleet runs the agent's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The agent's health check (`ami-agent check --json`): its exit code is the verdict.
    Health,
    /// The agent's clock measurement (`ami-agent drift`).
    Drift,
    /// Restarts the agent (`health --heal`).
    RestartAgent,
    /// A shell command of the operator's: the local fleet only.
    Shell(String),
    /// An SSM Command document of the operator's (AWS only), sent without parameters.
    Document(String),
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Health => f.write_str("the health check"),
            Command::Drift => f.write_str("the clock measurement"),
            Command::RestartAgent => f.write_str("the agent restart"),
            Command::Shell(c) => write!(f, "`{c}`"),
            Command::Document(d) => write!(f, "document {d}"),
        }
    }
}

/// Running a command on instances (SSM Run Command, or locally).
pub trait RunCommand: Send + Sync {
    fn run(
        &self,
        instance_ids: &[String],
        command: &Command,
        timeout: Duration,
    ) -> impl Future<Output = Result<BTreeMap<String, Invocation>, CloudError>> + Send;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    Initial,
    Healthy,
    Unhealthy,
    Draining,
    /// Not registered (or fully drained).
    Unused,
}

/// A load balancer's target group.
pub trait LoadBalancer: Send + Sync {
    fn register(&self, ids: &[String]) -> impl Future<Output = Result<(), CloudError>> + Send;
    fn deregister(&self, ids: &[String]) -> impl Future<Output = Result<(), CloudError>> + Send;
    fn states(
        &self,
        ids: &[String],
    ) -> impl Future<Output = Result<BTreeMap<String, TargetState>, CloudError>> + Send;
    /// The stable URL in front of the fleet.
    fn url(&self) -> impl Future<Output = Result<Option<String>, CloudError>> + Send;
}

/// Alarms watched during and after a rollout (CloudWatch).
pub trait Alarms: Send + Sync {
    /// The names among `names` that are in ALARM now.
    fn firing(
        &self,
        names: &[String],
    ) -> impl Future<Output = Result<Vec<String>, CloudError>> + Send;
}

/// A group's size: the provider keeps `desired` instances, and scaling moves `desired`
/// between `min` and `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub min: usize,
    pub max: usize,
    pub desired: usize,
}

/// One release's instances in one AZ, kept at their desired count by the provider (an EC2
/// Auto Scaling group): an instance that dies or fails its health checks is replaced with
/// no amictl process running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub az: String,
    pub image: String,
    pub spec: String,
    /// The rollout that made it.
    pub rollout: Option<String>,
    /// The rollout that took it out of service, if one did.
    pub retiring: Option<String>,
    pub capacity: Capacity,
    /// Attached to the fleet's target group: its instances take traffic.
    pub attached: bool,
    /// Target groups other than the fleet's that it is attached to: a hand edit amictl
    /// did not make and will not undo.
    pub foreign_targets: Vec<String>,
    /// Its replacing and scaling are suspended: it keeps exactly the instances it has.
    pub held: bool,
    /// Its instances (launched by it, not yet terminated).
    pub instances: Vec<String>,
}

/// How a group scales, if it does: between `min` and `max` per AZ, following a target of
/// requests per instance when one is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scaling {
    pub min: usize,
    pub max: usize,
    pub target_requests_per_instance: Option<f64>,
}

/// A group to make: `capacity` instances of `image` in `placement`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewGroup {
    pub name: String,
    pub fleet: String,
    pub placement: Placement,
    pub image: String,
    pub spec: String,
    pub rollout: String,
    pub capacity: Capacity,
}

/// Releases as groups that keep their own capacity (EC2 Auto Scaling). A provider without
/// them (the local fleet, whose supervisor keeps its capacity) uses [`NoGroups`].
pub trait Groups: Send + Sync {
    /// The fleet's groups, but not those being deleted.
    fn groups(&self, fleet: &str) -> impl Future<Output = Result<Vec<Group>, CloudError>> + Send;
    /// Makes the group, not attached to the load balancer. Making one that exists (a
    /// resumed rollout) changes nothing.
    fn create(&self, group: &NewGroup) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// Puts its instances, and those it launches later, into the fleet's target group.
    fn attach(&self, name: &str) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// Takes its instances out of the target group (they drain); they keep running.
    fn detach(&self, name: &str) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// `Some(rollout)`: suspends its replacing and scaling and marks it as taken out of
    /// service by `rollout`, so it keeps exactly the instances it has until the rollout
    /// commits or rolls back. `None`: resumes both and unmarks it.
    fn hold(
        &self,
        name: &str,
        retiring: Option<&str>,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// Sets its size bounds (and the desired count within them) and its scaling target.
    fn resize(
        &self,
        name: &str,
        capacity: Capacity,
        target_requests_per_instance: Option<f64>,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    /// Deletes it and terminates its instances; deleting one that is gone changes nothing.
    fn delete(&self, name: &str) -> impl Future<Output = Result<(), CloudError>> + Send;
}

/// The [`Groups`] of a provider that has none: a rollout then launches instances itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoGroups;

impl Groups for NoGroups {
    async fn groups(&self, _fleet: &str) -> Result<Vec<Group>, CloudError> {
        Ok(Vec::new())
    }
    async fn create(&self, group: &NewGroup) -> Result<(), CloudError> {
        Err(CloudError::Other(format!(
            "this provider has no groups (asked to make {})",
            group.name
        )))
    }
    async fn attach(&self, _name: &str) -> Result<(), CloudError> {
        Ok(())
    }
    async fn detach(&self, _name: &str) -> Result<(), CloudError> {
        Ok(())
    }
    async fn hold(&self, _name: &str, _retiring: Option<&str>) -> Result<(), CloudError> {
        Ok(())
    }
    async fn resize(
        &self,
        _name: &str,
        _capacity: Capacity,
        _target: Option<f64>,
    ) -> Result<(), CloudError> {
        Ok(())
    }
    async fn delete(&self, _name: &str) -> Result<(), CloudError> {
        Ok(())
    }
}
