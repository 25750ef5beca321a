//! `ami-agent check`: the health check for SSM Run Command and for anyone outside.
//! Exit 0 healthy, 1 degraded, 2 unhealthy, 3 unknown; one line (or JSON) on stdout.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use tokio::sync::Semaphore;

use crate::check::{classify, Observation, Report, Thresholds};
use crate::health::encode_path;
use crate::manifest::Manifest;
use crate::state::Health;

/// Files fetched at once: enough to check a large site quickly, few enough to stay
/// invisible next to real traffic.
const PARALLEL_FETCHES: usize = 8;

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
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(args.timeout.max(1)))
        .user_agent(concat!("ami-agent-check/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let mut base = args.url.clone();
    if !base.path().ends_with('/') {
        // `http://host/site` means the site's root, not its parent's.
        base.set_path(&format!("{}/", base.path()));
    }
    let limits = Thresholds {
        max_clock_drift: args.max_clock_drift,
        expect_version: args.expect_version.clone(),
    };
    loop {
        let observation = observe(&client, &base, args.manifest.as_ref()).await;
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

async fn observe(
    client: &reqwest::Client,
    base: &Url,
    manifest_file: Option<&PathBuf>,
) -> Observation {
    let mut obs = Observation {
        url: base.to_string(),
        ..Default::default()
    };
    // /healthz first: it tells whether anything answers at all.
    match client.get(join(base, "healthz")).send().await {
        Err(e) => {
            obs.unreachable = Some(describe(&e));
            return obs;
        }
        Ok(r) if r.status().is_success() => {
            obs.health = match r.bytes().await {
                Ok(body) => serde_json::from_slice::<Health>(&body).ok(),
                Err(_) => None,
            }
        }
        Ok(_) => {}
    }
    let manifest = match manifest_file {
        Some(path) => Manifest::load(path).map_err(|e| e.to_string()),
        None => fetch_manifest(client, base).await,
    };
    let manifest = match manifest {
        Ok(m) => m,
        Err(e) => {
            obs.manifest_error = Some(e);
            return obs;
        }
    };
    obs.release = Some(manifest.version.clone());
    let slots = Arc::new(Semaphore::new(PARALLEL_FETCHES));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, entry) in manifest.files.into_iter().enumerate() {
        let (client, url, slots) = (
            client.clone(),
            join(base, &encode_path(&entry.path)),
            slots.clone(),
        );
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await;
            let problem = match client.get(url).send().await {
                Err(e) => Some(describe(&e)),
                Ok(r) if r.status() != reqwest::StatusCode::OK => {
                    Some(format!("status {}", r.status()))
                }
                Ok(r) => match r.bytes().await {
                    Err(e) => Some(describe(&e)),
                    Ok(body) => entry.mismatch(&body).map(|m| m.to_string()),
                },
            };
            (i, entry.path, problem)
        });
    }
    let mut files: Vec<_> = tasks.join_all().await;
    files.sort_by_key(|(i, _, _)| *i);
    obs.files = files
        .into_iter()
        .map(|(_, path, problem)| (path, problem))
        .collect();
    obs
}

async fn fetch_manifest(client: &reqwest::Client, base: &Url) -> Result<Manifest, String> {
    let url = join(base, "manifest.json");
    let hint = "pass the release's manifest with --manifest FILE";
    let response = client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| format!("cannot get {url}: {}; {hint}", describe(&e)))?;
    if !response.status().is_success() {
        return Err(format!("{url} answered {}; {hint}", response.status()));
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("cannot get {url}: {}; {hint}", describe(&e)))?;
    let manifest: Manifest = serde_json::from_slice(&body)
        .map_err(|e| format!("{url} is not a manifest: {e}; {hint}"))?;
    manifest
        .validate()
        .map_err(|e| format!("{url}: {e}; {hint}"))?;
    Ok(manifest)
}

fn join(base: &Url, path: &str) -> Url {
    base.join(path).unwrap_or_else(|_| base.clone())
}

/// reqwest's Display hides the cause ("error sending request"); operators need it.
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
