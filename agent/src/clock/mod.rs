//! Clock drift against a reference: an SNTP server (sub-millisecond) or any web server's
//! `Date` header (one-second resolution).
//!
//! [`measure`] tries the sources in order and returns the first answer. Every network wait
//! is bounded by the caller's timeout, so a periodic caller can never hang on a dead
//! reference: the worst case is `sources.len() * timeout`.

mod http;
mod sntp;

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

pub use sntp::SntpError;

/// The well-known NTP port, used when an `ntp://` source names none.
pub const NTP_PORT: u16 = 123;

const ACCEPTED_FORMS: &str = "ntp://HOST[:PORT], http://HOST[/PATH] or https://HOST[/PATH]";

/// A time reference.
///
/// Parses from and displays as a URL; a parsed value displays as a string that parses
/// back to the same value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An NTP/SNTP server: `ntp://HOST[:PORT]`, port 123 by default.
    Ntp { host: String, port: u16 },
    /// A web server whose `Date` header is the reference: `http(s)://HOST[/PATH]`.
    Http { url: String },
}

/// The AWS Time Sync Service: link-local on every EC2 instance (no internet route
/// needed), then its public name for hosts outside EC2.
pub fn default_sources() -> Vec<Source> {
    vec![
        Source::Ntp {
            host: "169.254.169.123".to_owned(),
            port: NTP_PORT,
        },
        Source::Ntp {
            host: "time.aws.com".to_owned(),
            port: NTP_PORT,
        },
    ]
}

/// A source string that is not one of the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid time source `{value}`: {reason} (accepted: {})",
    ACCEPTED_FORMS
)]
pub struct ParseSourceError {
    pub value: String,
    pub reason: String,
}

impl FromStr for Source {
    type Err = ParseSourceError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| ParseSourceError {
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        let Some((scheme, rest)) = value.split_once("://") else {
            return Err(fail("missing scheme"));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "ntp" => parse_ntp(rest)
                .map(|(host, port)| Source::Ntp { host, port })
                .map_err(fail),
            "http" | "https" => {
                let url = reqwest::Url::parse(value).map_err(|err| fail(&err.to_string()))?;
                if url.host_str().unwrap_or_default().is_empty() {
                    return Err(fail("missing host"));
                }
                Ok(Source::Http { url: url.into() })
            }
            _ => Err(fail(&format!("unknown scheme `{scheme}`"))),
        }
    }
}

/// Splits `HOST[:PORT]` (IPv6 in brackets) after `ntp://`.
fn parse_ntp(rest: &str) -> Result<(String, u16), &'static str> {
    // A bare trailing slash is what people paste; anything more is a typo worth reporting.
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@']) {
        return Err("an ntp:// source takes no user, path or query");
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => {
            let (host, after) = bracketed.split_once(']').ok_or("unclosed `[`")?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err("only an IPv6 address goes in brackets");
            }
            let port = match after {
                "" => None,
                after => Some(after.strip_prefix(':').ok_or("unexpected text after `]`")?),
            };
            (host, port)
        }
        None => match authority.split_once(':') {
            Some((_, port)) if port.contains(':') => {
                return Err("an IPv6 address must be in brackets, e.g. ntp://[::1]:123")
            }
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err("missing host");
    }
    let port = match port {
        None => NTP_PORT,
        Some(port) => port
            .parse()
            .ok()
            .filter(|&port| port != 0)
            .ok_or("the port must be a number from 1 to 65535")?,
    };
    Ok((host.to_owned(), port))
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Ntp { host, port } => {
                if host.contains(':') {
                    write!(f, "ntp://[{host}]")?;
                } else {
                    write!(f, "ntp://{host}")?;
                }
                if *port != NTP_PORT {
                    write!(f, ":{port}")?;
                }
                Ok(())
            }
            Source::Http { url } => f.write_str(url),
        }
    }
}

/// One successful reading of the local clock against a reference.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measurement {
    /// Local clock minus reference, in seconds: positive when the local clock is ahead.
    pub offset: f64,
    /// Network round trip of the exchange (server processing time excluded for NTP).
    pub round_trip: Duration,
    /// The source that answered, as a URL.
    pub source: String,
    /// The reference's NTP stratum; `None` for HTTP sources.
    pub stratum: Option<u8>,
}

impl Measurement {
    /// The offset rounded to the nearest second (halves away from zero).
    pub fn whole_seconds(&self) -> i64 {
        self.offset.round() as i64
    }
}

/// Why no measurement could be made.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("no time source configured")]
    NoSources,
    #[error("no time source answered: {}", list_failures(.0))]
    AllFailed(Vec<SourceFailure>),
}

/// One source's failure within [`ClockError::AllFailed`].
#[derive(Debug)]
pub struct SourceFailure {
    /// The source, as a URL.
    pub source: String,
    pub error: SourceError,
}

impl fmt::Display for SourceFailure {
    // The whole cause chain on one line: this is what an operator reads, and the chain is
    // where reqwest and io keep the useful part ("connection refused", ...).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.source, self.error)?;
        let mut cause = std::error::Error::source(&self.error);
        while let Some(err) = cause {
            write!(f, ": {err}")?;
            cause = err.source();
        }
        Ok(())
    }
}

fn list_failures(failures: &[SourceFailure]) -> String {
    failures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why one source gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("cannot resolve {host}")]
    Resolve {
        host: String,
        #[source]
        error: std::io::Error,
    },
    #[error("{host} resolved to no address")]
    NoAddress { host: String },
    #[error("UDP exchange with {addr} failed")]
    Io {
        addr: std::net::SocketAddr,
        #[source]
        error: std::io::Error,
    },
    #[error("bad SNTP reply")]
    Sntp(#[from] SntpError),
    #[error("HTTP request failed")]
    Http(#[source] reqwest::Error),
    #[error("the response has no Date header")]
    MissingDate,
    #[error("unparsable Date header {0:?}")]
    BadDate(String),
}

/// Asks each source in turn, each bounded by `timeout`, and returns the first answer.
pub async fn measure(sources: &[Source], timeout: Duration) -> Result<Measurement, ClockError> {
    if sources.is_empty() {
        return Err(ClockError::NoSources);
    }
    let mut failures = Vec::new();
    for source in sources {
        let attempt = async {
            match source {
                Source::Ntp { host, port } => sntp::query(host, *port).await,
                Source::Http { url } => http::query(url, timeout).await,
            }
        };
        let result = tokio::time::timeout(timeout, attempt)
            .await
            .unwrap_or(Err(SourceError::Timeout(timeout)));
        match result {
            Ok(sample) => {
                tracing::debug!(%source, offset = sample.offset, round_trip = ?sample.round_trip, "clock measured");
                return Ok(Measurement {
                    offset: sample.offset,
                    round_trip: sample.round_trip,
                    source: source.to_string(),
                    stratum: sample.stratum,
                });
            }
            Err(error) => {
                let failure = SourceFailure {
                    source: source.to_string(),
                    error,
                };
                tracing::debug!(%failure, "time source failed");
                failures.push(failure);
            }
        }
    }
    Err(ClockError::AllFailed(failures))
}

/// What a protocol module measures; [`measure`] adds which source it was.
struct Sample {
    offset: f64,
    round_trip: Duration,
    stratum: Option<u8>,
}

/// Local time for one exchange: the wall clock read once at the start and advanced by the
/// monotonic clock, so a clock step mid-exchange cannot distort the round trip.
struct Stopwatch {
    wall: SystemTime,
    mono: Instant,
}

impl Stopwatch {
    fn start() -> Self {
        Stopwatch {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }

    /// The local wall-clock time now, and the time elapsed since the start.
    fn stop(&self) -> (SystemTime, Duration) {
        let elapsed = self.mono.elapsed();
        (self.wall + elapsed, elapsed)
    }
}

/// `later - earlier` in seconds, negative when `later` is in fact earlier.
fn seconds_between(later: SystemTime, earlier: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(ahead) => ahead.as_secs_f64(),
        Err(behind) => -behind.duration().as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_offset(offset: f64) -> Measurement {
        Measurement {
            offset,
            round_trip: Duration::ZERO,
            source: String::new(),
            stratum: None,
        }
    }

    #[test]
    fn whole_seconds_rounds_to_nearest() {
        assert_eq!(with_offset(-4.4).whole_seconds(), -4);
        assert_eq!(with_offset(-4.6).whole_seconds(), -5);
        assert_eq!(with_offset(0.49).whole_seconds(), 0);
        assert_eq!(with_offset(-0.49).whole_seconds(), 0);
        assert_eq!(with_offset(6.5).whole_seconds(), 7);
        assert_eq!(with_offset(-3.5).whole_seconds(), -4);
    }

    fn ntp(host: &str, port: u16) -> Source {
        Source::Ntp {
            host: host.to_owned(),
            port,
        }
    }

    #[test]
    fn parses_ntp_sources() {
        assert_eq!(
            "ntp://169.254.169.123".parse(),
            Ok(ntp("169.254.169.123", 123))
        );
        assert_eq!(
            "ntp://time.aws.com:1234".parse(),
            Ok(ntp("time.aws.com", 1234))
        );
        assert_eq!("NTP://time.aws.com/".parse(), Ok(ntp("time.aws.com", 123)));
        assert_eq!("ntp://[::1]".parse(), Ok(ntp("::1", 123)));
        assert_eq!("ntp://[fe80::1]:5123".parse(), Ok(ntp("fe80::1", 5123)));
    }

    #[test]
    fn parses_http_sources() {
        let https = Source::Http {
            url: "https://example.com/".to_owned(),
        };
        assert_eq!("https://example.com".parse(), Ok(https));
        let http = Source::Http {
            url: "http://127.0.0.1:8080/health".to_owned(),
        };
        assert_eq!("http://127.0.0.1:8080/health".parse(), Ok(http));
    }

    #[test]
    fn rejects_bad_sources_naming_the_value_and_the_accepted_forms() {
        for bad in [
            "foo://x",
            "time.aws.com",
            "ntp://",
            "ntp://:123",
            "ntp://host:",
            "ntp://host:0",
            "ntp://host:65536",
            "ntp://host:abc",
            "ntp://::1",
            "ntp://[::1",
            "ntp://[host]",
            "ntp://host/path",
            "http://",
            "https:///",
        ] {
            let err = bad.parse::<Source>().expect_err(bad);
            assert_eq!(err.value, bad);
            let message = err.to_string();
            assert!(message.contains(&format!("`{bad}`")), "{message}");
            assert!(message.contains("ntp://HOST[:PORT]"), "{message}");
        }
        assert!("foo://x"
            .parse::<Source>()
            .unwrap_err()
            .reason
            .contains("unknown scheme `foo`"));
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "ntp://169.254.169.123",
            "ntp://time.aws.com:1234",
            "ntp://[::1]",
            "ntp://[::1]:9",
            "http://example.com/",
            "https://example.com:8443/x?y=1",
        ] {
            let source: Source = text.parse().unwrap();
            assert_eq!(source.to_string(), text);
            assert_eq!(source.to_string().parse(), Ok(source));
        }
        for source in default_sources() {
            assert_eq!(source.to_string().parse(), Ok(source));
        }
    }

    #[test]
    fn defaults_are_the_aws_time_sync_service() {
        let defaults: Vec<String> = default_sources().iter().map(ToString::to_string).collect();
        assert_eq!(defaults, ["ntp://169.254.169.123", "ntp://time.aws.com"]);
    }

    #[tokio::test]
    async fn no_sources_is_an_error_not_a_zero() {
        let err = measure(&[], Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, ClockError::NoSources));
    }

    #[test]
    fn failure_list_names_every_source_and_cause() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let err = ClockError::AllFailed(vec![
            SourceFailure {
                source: "ntp://a".into(),
                error: SourceError::Timeout(Duration::from_millis(300)),
            },
            SourceFailure {
                source: "ntp://b".into(),
                error: SourceError::Io {
                    addr: "127.0.0.1:9".parse().unwrap(),
                    error: refused,
                },
            },
            SourceFailure {
                source: "ntp://c".into(),
                error: SntpError::KissOfDeath("RATE".into()).into(),
            },
        ]);
        let message = err.to_string();
        assert!(
            message.contains("ntp://a: timed out after 300ms"),
            "{message}"
        );
        assert!(
            message.contains("ntp://b: UDP exchange with 127.0.0.1:9 failed: connection refused"),
            "{message}"
        );
        assert!(
            message.contains("ntp://c: bad SNTP reply: kiss-o'-death"),
            "{message}"
        );
        assert!(message.contains("RATE"), "{message}");
    }

    #[test]
    fn seconds_between_is_signed() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(seconds_between(t + Duration::from_millis(1500), t), 1.5);
        assert_eq!(seconds_between(t, t + Duration::from_millis(1500)), -1.5);
    }
}
