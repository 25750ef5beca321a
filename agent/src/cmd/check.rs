//! `ami-agent check`: the health check for SSM Run Command and for anyone outside.
//! Exit 0 healthy, 1 degraded, 2 unhealthy, 3 unknown; one line (or JSON) on stdout.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;

use crate::check::{classify, Report, Thresholds};
use crate::probe::{client, observe, site_root};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the agent answers.
    #[arg(long, env = "AMI_AGENT_CHECK_URL", default_value = "http://127.0.0.1/")]
    pub url: Url,
    /// The manifest to check against [default: the one the agent publishes].
    #[arg(long, env = "AMI_AGENT_MANIFEST")]
    pub manifest: Option<PathBuf>,
    /// The release the agent must serve.
    #[arg(long)]
    pub expect_version: Option<String>,
    /// Clock drift beyond this many seconds makes the result degraded.
    #[arg(long, default_value_t = 2)]
    pub max_clock_drift: i64,
    /// Seconds each request may take.
    #[arg(long, default_value_t = 5)]
    pub timeout: u64,
    /// Print JSON instead of one summary line.
    #[arg(long)]
    pub json: bool,
    /// Check again every SECS seconds, forever, one line per check.
    #[arg(long, value_name = "SECS")]
    pub watch: Option<u64>,
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let client = client(Duration::from_secs(args.timeout.max(1)))?;
    let base = site_root(&args.url);
    let limits = Thresholds {
        max_clock_drift: args.max_clock_drift,
        expect_version: args.expect_version.clone(),
    };
    loop {
        let observation = observe(&client, &base, args.manifest.as_deref()).await;
        let report = classify(&observation, &limits);
        print_report(&report, args.json, args.watch.is_some());
        match args.watch {
            None => return Ok(report.exit_code),
            Some(secs) => tokio::time::sleep(Duration::from_secs(secs.max(1))).await,
        }
    }
}

fn print_report(report: &Report, json: bool, timestamped: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string(report).expect("a report always serializes")
        );
    } else if timestamped {
        println!(
            "{} {}",
            httpdate::fmt_http_date(std::time::SystemTime::now()),
            report.summary
        );
    } else {
        println!("{}", report.summary);
    }
}
