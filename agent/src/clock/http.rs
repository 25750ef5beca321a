//! A web server's `Date` header as the reference: one-second resolution, for hosts that
//! cannot reach any NTP server.

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, DATE};

use super::{seconds_between, Sample, SourceError, Stopwatch};

/// One HEAD request to `url`; any status will do, as long as the response carries `Date`.
pub(super) async fn query(url: &str, timeout: Duration) -> Result<Sample, SourceError> {
    let client = reqwest::Client::builder()
        // The Date must come from the server itself: a proxy would stamp its own clock.
        .no_proxy()
        // A redirect would add round trips after the server stamped its Date.
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .build()
        .map_err(SourceError::Http)?;
    let clock = Stopwatch::start();
    let response = client.head(url).send().await.map_err(SourceError::Http)?;
    let (received, round_trip) = clock.stop();
    let date = date_header(response.headers())?;
    Ok(Sample {
        offset: estimate_offset(date, received, round_trip),
        round_trip,
        stratum: None,
    })
}

fn date_header(headers: &HeaderMap) -> Result<SystemTime, SourceError> {
    let value = headers.get(DATE).ok_or(SourceError::MissingDate)?;
    let bad = || SourceError::BadDate(String::from_utf8_lossy(value.as_bytes()).into_owned());
    let text = value.to_str().map_err(|_| bad())?;
    httpdate::parse_http_date(text).map_err(|_| bad())
}

/// Local minus reference, in seconds, at the moment the response arrived.
///
/// `Date` is truncated to the whole second, so the server's clock read on average
/// `Date + 0.5 s` when it stamped the response; that was about half a round trip before
/// the response reached us.
fn estimate_offset(date: SystemTime, received: SystemTime, round_trip: Duration) -> f64 {
    let reference =
        seconds_between(date, SystemTime::UNIX_EPOCH) + 0.5 + round_trip.as_secs_f64() / 2.0;
    seconds_between(received, SystemTime::UNIX_EPOCH) - reference
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn at(secs: f64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs)
    }

    fn close(actual: f64, expected: f64) -> bool {
        (actual - expected).abs() < 1e-6
    }

    #[test]
    fn estimate_adds_half_a_second_and_half_the_round_trip() {
        // In sync: the server stamped at 1000.4 (Date says 1000), the response took 0.1 s.
        let offset = estimate_offset(at(1000.0), at(1000.5), Duration::from_millis(200));
        assert!(close(offset, -0.1), "{offset}");
    }

    #[test]
    fn estimate_for_a_reference_ahead_and_behind() {
        // Reference 4 s ahead: received locally at 1000.3, server read 1004.3 -> Date 1004.
        let offset = estimate_offset(at(1004.0), at(1000.3), Duration::ZERO);
        assert!(close(offset, -4.2), "{offset}");
        // Reference 7 s behind: received at 1000.3, server read 993.3 -> Date 993.
        let offset = estimate_offset(at(993.0), at(1000.3), Duration::from_millis(400));
        assert!(close(offset, 6.6), "{offset}");
    }

    #[test]
    fn reads_the_date_header() {
        let mut headers = HeaderMap::new();
        assert!(matches!(
            date_header(&headers),
            Err(SourceError::MissingDate)
        ));
        headers.insert(
            DATE,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        assert_eq!(date_header(&headers).unwrap(), at(784_111_777.0));
        headers.insert(DATE, HeaderValue::from_static("yesterday"));
        assert!(
            matches!(date_header(&headers), Err(SourceError::BadDate(text)) if text == "yesterday")
        );
    }
}
