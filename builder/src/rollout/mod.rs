//! `amictl rollout`: replace a fleet across AZs without ever lowering healthy capacity.

pub mod config;
pub mod engine;
pub mod groups;
pub mod journal;
pub mod plan;
pub mod run;

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
