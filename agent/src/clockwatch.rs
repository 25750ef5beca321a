//! Measures clock drift every interval and records it for `/healthz` and `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::clock::{measure, Source};
use crate::state::{now_unix, AgentState, ClockDrift};

pub async fn run(
    state: Arc<AgentState>,
    sources: Vec<Source>,
    interval: Duration,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let drift = match measure(&sources, timeout).await {
            Ok(m) => {
                debug!(offset = m.offset, source = %m.source, "clock drift measured");
                state.metrics.clock_drift_seconds.set(m.offset);
                ClockDrift {
                    seconds: Some(m.whole_seconds()),
                    offset_ms: Some((m.offset * 1000.0).round() as i64),
                    source: Some(m.source.clone()),
                    measured_at_unix: now_unix(),
                    error: None,
                }
            }
            Err(e) => {
                warn!(error = %e, "no clock drift source answered");
                state.metrics.clock_drift_failures.inc();
                ClockDrift {
                    seconds: None,
                    offset_ms: None,
                    source: None,
                    measured_at_unix: now_unix(),
                    error: Some(e.to_string()),
                }
            }
        };
        state.update(|s| s.clock_drift = Some(drift));
    }
}
