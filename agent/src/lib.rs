//! ami-agent: serves one release's static content on port 80, keeps it intact, reports
//! clock and content drift, and answers health checks from outside or through SSM.

pub mod check;
pub mod clock;
pub mod clockwatch;
pub mod cmd;
pub mod config;
pub mod health;
pub mod http;
pub mod manifest;
pub mod metrics;
pub mod notify;
pub mod probe;
pub mod site;
pub mod state;
