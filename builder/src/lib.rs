//! amictl: publish NixOS images as AMIs and roll fleets onto them.
//!
//! Each subcommand lives in its own module under [`cmd`] with its clap `Args` and `run()`;
//! the decisions they make live in pure, unit-tested modules beside them.

pub mod archive;
pub mod aws;
pub mod cmd;
pub mod effects;
pub mod fleet;
pub mod iam;
pub mod image;
pub mod local;
pub mod lock;
pub mod policy;
pub mod rollout;
pub mod ssm;
pub mod stack;
