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
struct LimitLabel {
    limit: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReleaseLabel {
    version: String,
}

/// The connection time limits (the `limit` label of `connection_timeouts`).
pub const LIMITS: [&str; 3] = ["header", "keep_alive", "send"];

/// Statuses the agent itself answers with; anything else goes through the family.
const COMMON: [u16; 8] = [200, 206, 304, 400, 404, 405, 416, 500];

pub struct Metrics {
    registry: Registry,
    requests: Family<StatusLabel, Counter>,
    common: [Counter; COMMON.len()],
    pub heals: Counter,
    pub self_check_failures: Counter,
    pub rebinds: Counter,
    /// Idle connections closed because every slot was taken or descriptors ran out.
    pub evictions: Counter,
    pub accept_errors: Counter,
    /// Self-checks that could not fetch because the server was overloaded.
    pub self_checks_overloaded: Counter,
    timeouts: [Counter; 3],
    pub clock_drift_seconds: Gauge<f64, AtomicU64>,
    pub clock_drift_failures: Counter,
    pub content_drift_files: Gauge,
}

impl Metrics {
    pub fn new(version: &str) -> Self {
        let mut registry = Registry::with_prefix("ami_agent");
        let requests = Family::<StatusLabel, Counter>::default();
        let common = COMMON.map(|status| requests.get_or_create_owned(&StatusLabel { status }));
        let timeout_family = Family::<LimitLabel, Counter>::default();
        let timeouts =
            LIMITS.map(|limit| timeout_family.get_or_create_owned(&LimitLabel { limit }));
        let metrics = Metrics {
            common,
            heals: Counter::default(),
            self_check_failures: Counter::default(),
            rebinds: Counter::default(),
            evictions: Counter::default(),
            accept_errors: Counter::default(),
            self_checks_overloaded: Counter::default(),
            timeouts,
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
            "connection_evictions",
            "Idle connections closed to make room when every slot was taken or descriptors ran out",
            metrics.evictions.clone(),
        );
        registry.register(
            "accept_errors",
            "accept() failures for want of file descriptors or memory",
            metrics.accept_errors.clone(),
        );
        registry.register(
            "self_checks_overloaded",
            "Self-checks that could not fetch through the listener because the server was overloaded",
            metrics.self_checks_overloaded.clone(),
        );
        registry.register(
            "connection_timeouts",
            "Connections closed by a time limit: header, keep_alive or send",
            timeout_family,
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

    /// Counts a connection closed by `limit` (one of [`LIMITS`]).
    pub fn connection_timeout(&self, limit: &str) {
        if let Some(i) = LIMITS.iter().position(|&l| l == limit) {
            self.timeouts[i].inc();
        }
    }

    pub fn connection_timeouts(&self, limit: &str) -> u64 {
        LIMITS
            .iter()
            .position(|&l| l == limit)
            .map_or(0, |i| self.timeouts[i].get())
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
