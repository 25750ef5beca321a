//! Prometheus metrics. Counters the request path touches are created once at start, so a
//! request costs one atomic add and never takes the family's lock.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReleaseLabel {
    version: String,
}

/// Statuses the agent itself answers with; anything else goes through the family.
const COMMON: [u16; 8] = [200, 206, 304, 400, 404, 405, 416, 500];

pub struct Metrics {
    registry: Registry,
    requests: Family<StatusLabel, Counter>,
    common: [Counter; COMMON.len()],
    pub heals: Counter,
    pub self_check_failures: Counter,
    pub rebinds: Counter,
    pub clock_drift_seconds: Gauge<f64, AtomicU64>,
    pub clock_drift_failures: Counter,
    pub content_drift_files: Gauge,
}

impl Metrics {
    pub fn new(version: &str) -> Self {
        let mut registry = Registry::with_prefix("ami_agent");
        let requests = Family::<StatusLabel, Counter>::default();
        let common = COMMON.map(|status| requests.get_or_create_owned(&StatusLabel { status }));
        let metrics = Metrics {
            common,
            heals: Counter::default(),
            self_check_failures: Counter::default(),
            rebinds: Counter::default(),
            clock_drift_seconds: Gauge::default(),
            clock_drift_failures: Counter::default(),
            content_drift_files: Gauge::default(),
            requests: requests.clone(),
            registry: Registry::default(),
        };
        registry.register("http_requests", "HTTP responses by status", requests);
        registry.register(
            "heals",
            "Files rewritten on disk from the pristine copy",
            metrics.heals.clone(),
        );
        registry.register(
            "self_check_failures",
            "Health-loop self-checks that did not pass",
            metrics.self_check_failures.clone(),
        );
        registry.register(
            "listener_rebinds",
            "Times the listener was bound again",
            metrics.rebinds.clone(),
        );
        registry.register(
            "clock_drift_seconds",
            "Last measured clock drift, local minus reference",
            metrics.clock_drift_seconds.clone(),
        );
        registry.register(
            "clock_drift_failures",
            "Clock drift measurements where no source answered",
            metrics.clock_drift_failures.clone(),
        );
        registry.register(
            "content_drift_files",
            "Files on disk that differed from the manifest at the last self-check",
            metrics.content_drift_files.clone(),
        );
        let release = Family::<ReleaseLabel, Gauge>::default();
        release
            .get_or_create(&ReleaseLabel {
                version: version.to_owned(),
            })
            .set(1);
        registry.register("release", "The release this agent serves", release);
        Metrics {
            registry,
            ..metrics
        }
    }

    pub fn request(&self, status: u16) {
        match COMMON.iter().position(|&s| s == status) {
            Some(i) => self.common[i].inc(),
            None => self.requests.get_or_create(&StatusLabel { status }).inc(),
        };
    }

    pub fn requests_with(&self, status: u16) -> u64 {
        self.requests.get_or_create(&StatusLabel { status }).get()
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_encodes() {
        let m = Metrics::new("v1");
        m.request(200);
        m.request(200);
        m.request(418);
        m.heals.inc();
        m.clock_drift_seconds.set(-4.0);
        let text = m.encode();
        assert!(
            text.contains("ami_agent_http_requests_total{status=\"200\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("ami_agent_http_requests_total{status=\"418\"} 1"),
            "{text}"
        );
        assert!(text.contains("ami_agent_heals_total 1"), "{text}");
        assert!(
            text.contains("ami_agent_clock_drift_seconds -4.0"),
            "{text}"
        );
        assert!(
            text.contains("ami_agent_release{version=\"v1\"} 1"),
            "{text}"
        );
        assert_eq!(m.requests_with(200), 2);
    }
}
