//! The agent's integration tests, one test binary with a module per file: each binary is a
//! whole link (with LTO in the release profile Nix builds and tests in), and one link
//! instead of six is most of what `cargo test` costs there.

mod common;

mod agent;
mod drift;
mod health;
mod hostile;
mod semantics;
mod serve;
