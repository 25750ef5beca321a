//! The builder's integration tests, one test binary with a module per file: each binary
//! is linked against the AWS SDK, and one link instead of one per file is most of what
//! `cargo test` costs in a release build (the way Nix builds and tests amictl).
//! Fixtures stay in `builder/tests/policy/`.

mod common;

mod archive;
mod block_writer;
mod destroy_moto;
mod fleet_moto;
mod iam_isolation;
mod iam_policy;
mod image_lifecycle_moto;
mod local_balancer;
mod lock_moto;
mod policy;
mod publish_engine;
mod publish_moto;
mod publish_s3_moto;
mod register_request;
mod rollout_groups_sim;
mod rollout_moto;
mod rollout_sim;
mod ssm_documents_moto;
mod stack_moto;
mod up_moto;
