//! The service manager, behind a trait so the health loop can be tested without systemd.

use std::time::Duration;

use tracing::debug;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Ready,
    Watchdog,
    Status(String),
    Stopping,
}

pub trait Notifier: Send + Sync + 'static {
    fn notify(&self, notices: &[Notice]);
    /// The watchdog period the manager expects, if it set one.
    fn watchdog(&self) -> Option<Duration>;
}

/// systemd's sd_notify protocol; silent when `NOTIFY_SOCKET` is unset (not under systemd).
#[derive(Debug, Default, Clone, Copy)]
pub struct Systemd;

impl Notifier for Systemd {
    fn notify(&self, notices: &[Notice]) {
        use sd_notify::NotifyState;
        let states: Vec<NotifyState<'_>> = notices
            .iter()
            .map(|n| match n {
                Notice::Ready => NotifyState::Ready,
                Notice::Watchdog => NotifyState::Watchdog,
                Notice::Status(s) => NotifyState::Status(s),
                Notice::Stopping => NotifyState::Stopping,
            })
            .collect();
        if let Err(e) = sd_notify::notify(&states) {
            debug!(error = %e, "sd_notify failed");
        }
    }

    fn watchdog(&self) -> Option<Duration> {
        sd_notify::watchdog_enabled()
    }
}

/// How often the health loop must run: the configured interval, or under half the
/// watchdog period so one slow check never lets the watchdog fire on a healthy agent.
pub fn check_interval(configured: Duration, watchdog: Option<Duration>) -> Duration {
    match watchdog {
        Some(w) if !w.is_zero() => configured.min(w * 2 / 5),
        _ => configured,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_stays_under_half_the_watchdog() {
        let s = Duration::from_secs;
        assert_eq!(check_interval(s(10), None), s(10));
        assert_eq!(check_interval(s(10), Some(s(30))), s(10));
        assert_eq!(check_interval(s(10), Some(s(10))), s(4));
        assert!(check_interval(s(60), Some(s(3))) < s(3) / 2);
    }
}
