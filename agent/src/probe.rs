//! Checking an agent over HTTP: `/healthz`, the release's manifest and every file in it.
//! `ami-agent check` runs this on the instance (through SSM) and `amictl health --url`
//! from outside; the verdict itself is the pure [`crate::check::classify`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use reqwest::Url;
use tokio::sync::Semaphore;

use crate::check::{classify, Observation, Report, Thresholds};
use crate::health::encode_path;
use crate::manifest::Manifest;
use crate::state::Health;

/// Files fetched at once: enough to check a large site quickly, few enough to stay
/// invisible next to real traffic.
const PARALLEL_FETCHES: usize = 8;

/// The HTTP client of a check: no proxy (the agent is local or addressed directly) and
/// `timeout` for each request.
pub fn client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout.max(Duration::from_secs(1)))
        .user_agent(concat!("ami-agent-check/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// `http://host/site` means the site's root, not its parent's.
pub fn site_root(url: &Url) -> Url {
    let mut base = url.clone();
    if !base.path().ends_with('/') {
        base.set_path(&format!("{}/", base.path()));
    }
    base
}

/// Checks the agent at `url` once: against `manifest` when given, else against the
/// manifest the agent publishes.
pub async fn check_url(
    url: &Url,
    manifest: Option<&Path>,
    limits: &Thresholds,
    timeout: Duration,
) -> Report {
    let base = site_root(url);
    let observation = match client(timeout) {
        Ok(client) => observe(&client, &base, manifest).await,
        Err(e) => Observation {
            url: base.to_string(),
            unreachable: Some(describe(&e)),
            ..Default::default()
        },
    };
    classify(&observation, limits)
}

/// Everything one check sees of the agent at `base` (a site root, see [`site_root`]).
pub async fn observe(
    client: &reqwest::Client,
    base: &Url,
    manifest_file: Option<&Path>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_root_keeps_the_site_path() {
        let root = |u: &str| site_root(&Url::parse(u).unwrap()).to_string();
        assert_eq!(root("http://h"), "http://h/");
        assert_eq!(root("http://h/site"), "http://h/site/");
        assert_eq!(root("http://h/site/"), "http://h/site/");
    }
}
