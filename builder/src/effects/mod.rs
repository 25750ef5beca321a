//! The effects fleet commands work through, built in one place for each provider: compute,
//! Run Command, the load balancer, alarms and the fleet's lock, for AWS ([`aws`]) and for
//! the local fleet ([`local`]); the simulated cloud ([`crate::fleet::sim`]) implements the
//! same traits for tests and benchmarks. Commands parse their arguments, build one
//! provider's effects once, and hand them to the library: the rollout engine
//! ([`crate::rollout::run`]), health and drift ([`crate::fleet::health`],
//! [`crate::fleet::drift`]), destroy.

pub mod aws;
pub mod local;

pub use crate::rollout::engine::Effects;
