//! `ami-agent drift`: one integer on stdout, local clock minus reference, in seconds.
//!
//! Monitoring records whatever this prints, so on failure it prints nothing on stdout and
//! exits non-zero: a dead reference must never look like a perfect clock.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;

use crate::clock::{self, Measurement, Source};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Time reference, tried in order until one answers: ntp://HOST[:PORT],
    /// http://HOST[/PATH] or https://HOST[/PATH]. Repeat the flag or separate with commas.
    #[arg(
        long = "source",
        value_name = "URL",
        env = "AMI_AGENT_DRIFT_SOURCES",
        value_delimiter = ',',
        default_values_t = clock::default_sources()
    )]
    pub sources: Vec<Source>,

    /// Print a JSON object (offset_ms, offset_seconds, round_trip_ms, source, stratum)
    /// instead of the bare integer.
    #[arg(long)]
    pub json: bool,

    /// Seconds to wait for each source; fractions allowed.
    #[arg(long, value_name = "SECS", env = "AMI_AGENT_DRIFT_TIMEOUT", default_value = "2", value_parser = parse_timeout)]
    pub timeout: Duration,
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|secs| *secs > 0.0)
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .ok_or_else(|| format!("`{text}` is not a positive number of seconds"))
}

/// The `--json` output.
#[derive(Debug, serde::Serialize)]
struct Report<'a> {
    offset_ms: i64,
    offset_seconds: i64,
    round_trip_ms: f64,
    source: &'a str,
    stratum: Option<u8>,
}

impl<'a> From<&'a Measurement> for Report<'a> {
    fn from(m: &'a Measurement) -> Self {
        Report {
            offset_ms: (m.offset * 1000.0).round() as i64,
            offset_seconds: m.whole_seconds(),
            round_trip_ms: m.round_trip.as_secs_f64() * 1000.0,
            source: &m.source,
            stratum: m.stratum,
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let measurement = clock::measure(&args.sources, args.timeout)
        .await
        .context("cannot measure clock drift")?;
    tracing::debug!(?measurement);
    let line = if args.json {
        serde_json::to_string(&Report::from(&measurement))?
    } else {
        measurement.whole_seconds().to_string()
    };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_accepts_positive_seconds_only() {
        assert_eq!(parse_timeout("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_timeout("0.25"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_timeout("0.3"), Ok(Duration::from_millis(300)));
        for bad in ["0", "-1", "NaN", "inf", "soon", ""] {
            assert!(
                parse_timeout(bad)
                    .unwrap_err()
                    .contains(&format!("`{bad}`")),
                "{bad}"
            );
        }
    }

    #[test]
    fn json_report_fields() {
        let measurement = Measurement {
            offset: -4.2346,
            round_trip: Duration::from_micros(1500),
            source: "ntp://time.aws.com".into(),
            stratum: Some(3),
        };
        let json = serde_json::to_value(Report::from(&measurement)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "offset_ms": -4235,
                "offset_seconds": -4,
                "round_trip_ms": 1.5,
                "source": "ntp://time.aws.com",
                "stratum": 3,
            })
        );
    }
}
