//! The request-to-response rules, pure: no I/O, so every serving rule is unit-tested.
//!
//! Only paths listed in the manifest exist. A request path is decoded segment by segment
//! and looked up by exact string in that list, so traversal is impossible by construction:
//! there is no filesystem path to escape from.

mod conditional;
mod request;

use std::borrow::Cow;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;

use self::conditional::Precondition;
use self::request::MethodClass;
pub use self::request::MAX_TARGET_BYTES;
use super::first_line::LineVersion;
use super::headers::{common_headers, CLOSE, GET_HEAD, JSON, NO_CACHE, NO_STORE, PROMETHEUS, TEXT};
use crate::site::Asset;
use crate::state::AgentState;

pub type Body = Full<Bytes>;

const ROBOTS_TXT: &str = "User-agent: *\nDisallow: /\n";

/// Answers one request (its body, if any, is never read). Targets over
/// [`MAX_TARGET_BYTES`] get 414; heads over `ServerConfig::max_header_bytes` never get
/// here, hyper answers them 431 without these rules or their headers.
///
/// `line` is what the connection's first request line asked for: where hyper was shown
/// `HTTP/1.1` in its place (see `http::first_line`), a later minor version is served as
/// 1.1, another major version gets 505 and an HTTP/2 preface 400, whatever the method
/// and target; and the connection closes, since its next request would reach hyper's
/// parser as sent.
pub fn respond<B>(state: &AgentState, req: &Request<B>, line: LineVersion) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    let mut response = match line {
        LineVersion::Http1 | LineVersion::LaterMinor => route(state, req),
        LineVersion::OtherMajor => plain(
            StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            "http version not supported\n",
            head,
        ),
        LineVersion::H2Preface => plain(StatusCode::BAD_REQUEST, "bad request\n", head),
    };
    if line != LineVersion::Http1 {
        response.headers_mut().insert(header::CONNECTION, CLOSE);
    }
    state.metrics.request(response.status().as_u16());
    response
}

fn route<B>(state: &AgentState, req: &Request<B>) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    // In the order a request is read: its target, its fields, then what its method means.
    if request::target_len(req.uri()) > MAX_TARGET_BYTES {
        return plain(StatusCode::URI_TOO_LONG, "uri too long\n", head);
    }
    if !request::host_ok(req.version(), req.uri(), req.headers()) {
        return plain(StatusCode::BAD_REQUEST, "bad host\n", head);
    }
    match request::classify(req.method()) {
        MethodClass::Served => {}
        MethodClass::NotAllowed => {
            let mut r = plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n",
                false,
            );
            r.headers_mut().insert(header::ALLOW, GET_HEAD);
            return r;
        }
        MethodClass::Unknown => {
            return plain(StatusCode::NOT_IMPLEMENTED, "not implemented\n", false);
        }
    }
    let Some(name) = resolve(req.uri().path()) else {
        return plain(StatusCode::NOT_FOUND, "not found\n", head);
    };
    if let Some(asset) = state.site.get(&name) {
        return serve_asset(asset, req.headers(), head);
    }
    // Built-in endpoints, each only where the content does not have that path.
    match name.as_ref() {
        "robots.txt" => plain(StatusCode::OK, ROBOTS_TXT, head),
        "healthz" => {
            let health = state.health();
            let body = serde_json::to_vec(&health).expect("health always serializes");
            generated(StatusCode::OK, JSON, body.into(), head)
        }
        "metrics" => generated(
            StatusCode::OK,
            PROMETHEUS,
            state.metrics.encode().into(),
            head,
        ),
        "manifest.json" => generated(StatusCode::OK, JSON, state.site.manifest_json.clone(), head),
        _ => plain(StatusCode::NOT_FOUND, "not found\n", head),
    }
}

/// Maps a request path to a manifest path, or None when it cannot name one.
/// `/` and `dir/` mean their `index.html`; `%xx` is decoded within a segment, and a
/// segment that decodes to a separator, `.`, `..` or nothing is refused.
pub fn resolve(path: &str) -> Option<Cow<'_, str>> {
    let rest = path.strip_prefix('/')?;
    let (dir, needs_index) = match rest.strip_suffix('/') {
        Some("") => return None, // `//`
        Some(dir) => (dir, true),
        None if rest.is_empty() => ("", true),
        None => (rest, false),
    };
    if !needs_index && !rest.contains('%') {
        return valid_segments(rest.split('/')).then_some(Cow::Borrowed(rest));
    }
    let mut out = String::with_capacity(rest.len() + 10);
    if !dir.is_empty() {
        for segment in dir.split('/') {
            let decoded = percent_encoding::percent_decode_str(segment)
                .decode_utf8()
                .ok()?;
            if decoded.contains(['/', '\\', '\0'])
                || !valid_segments(std::iter::once(decoded.as_ref()))
            {
                return None;
            }
            out.push_str(&decoded);
            out.push('/');
        }
    }
    if needs_index {
        out.push_str("index.html");
    } else {
        out.pop();
    }
    Some(Cow::Owned(out))
}

fn valid_segments<'a>(mut segments: impl Iterator<Item = &'a str>) -> bool {
    segments.all(|s| !s.is_empty() && s != "." && s != ".." && !s.contains(['\\', '\0']))
}

fn serve_asset(asset: &Asset, headers: &HeaderMap, head: bool) -> Response<Body> {
    match conditional::evaluate(headers, &asset.etag) {
        Precondition::Passed => {}
        Precondition::Failed => {
            return plain(
                StatusCode::PRECONDITION_FAILED,
                "precondition failed\n",
                head,
            )
        }
        Precondition::NotModified => return not_modified(asset),
    }
    let mut builder = Response::builder();
    let h = builder.headers_mut().expect("a fresh builder has headers");
    *h = asset.headers.clone();

    let len = asset.body.len() as u64;
    // If-Range with another validator means "the whole thing": our copy changed. Only
    // a strong, byte-equal tag matches (RFC 9110 §13.1.5); we have no dates to compare.
    let range_applies = headers
        .get(header::IF_RANGE)
        .is_none_or(|v| v.as_bytes() == asset.etag.as_bytes());
    let range = match headers.get(header::RANGE) {
        // GET is the only method with range handling; a HEAD gets the 200 (RFC 9110 §14.2).
        Some(value) if range_applies && !head => parse_range(value.as_bytes(), len),
        _ => RangeResult::Full,
    };
    let h = builder.headers_mut().expect("a fresh builder has headers");
    match range {
        RangeResult::Full => {
            let body = if head {
                Bytes::new()
            } else {
                asset.body.clone()
            };
            builder
                .status(StatusCode::OK)
                .body(Full::new(body))
                .expect("valid response")
        }
        RangeResult::Partial { start, end } => {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start + 1));
            h.insert(
                header::CONTENT_RANGE,
                HeaderValue::try_from(format!("bytes {start}-{end}/{len}")).expect("ascii"),
            );
            let body = if head {
                Bytes::new()
            } else {
                asset.body.slice(start as usize..=end as usize)
            };
            builder
                .status(StatusCode::PARTIAL_CONTENT)
                .body(Full::new(body))
                .expect("valid response")
        }
        RangeResult::Unsatisfiable => {
            h.insert(
                header::CONTENT_RANGE,
                HeaderValue::try_from(format!("bytes */{len}")).expect("ascii"),
            );
            h.insert(header::CONTENT_TYPE, TEXT);
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
            builder
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .body(Body::default())
                .expect("valid response")
        }
    }
}

/// A 304 carries only what a cache needs to refresh its stored 200 (RFC 9110 §15.4.5):
/// ETag, Cache-Control and the fields that are not about the representation. Content-Type
/// is representation metadata the cache already has; Content-Length and Accept-Ranges
/// describe a body that is not sent (nginx drops the same three).
fn not_modified(asset: &Asset) -> Response<Body> {
    let mut builder = Response::builder().status(StatusCode::NOT_MODIFIED);
    let h = builder.headers_mut().expect("a fresh builder has headers");
    *h = asset.headers.clone();
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::ACCEPT_RANGES,
    ] {
        h.remove(name);
    }
    builder.body(Body::default()).expect("valid response")
}

#[derive(Debug, PartialEq, Eq)]
pub enum RangeResult {
    /// No usable range: serve everything (also for multiple ranges, which RFC 9110 lets
    /// a server ignore).
    Full,
    /// Inclusive byte positions.
    Partial {
        start: u64,
        end: u64,
    },
    Unsatisfiable,
}

/// Parses a `Range` header for a body of `len` bytes: `range-unit "=" range-set`
/// (RFC 9110 §14.1.1). The unit is case-insensitive; whitespace is allowed only around the
/// list's commas, not around `=` or `-`. Anything malformed is ignored (a 200), as §14.2
/// allows.
pub fn parse_range(value: &[u8], len: u64) -> RangeResult {
    let Ok(value) = std::str::from_utf8(value) else {
        return RangeResult::Full;
    };
    let Some((unit, set)) = value.split_once('=') else {
        return RangeResult::Full;
    };
    if !unit.eq_ignore_ascii_case("bytes") {
        return RangeResult::Full;
    }
    // `1#range-spec`: empty elements and OWS around them are allowed (§5.6.1).
    let mut specs = set
        .split(',')
        .map(|s| s.trim_matches([' ', '\t']))
        .filter(|s| !s.is_empty());
    let (Some(spec), None) = (specs.next(), specs.next()) else {
        return RangeResult::Full;
    };
    let Some((first, last)) = spec.split_once('-') else {
        return RangeResult::Full;
    };
    // `1*DIGIT`; a position beyond u64 is past any body, so it saturates.
    let parse = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().unwrap_or(u64::MAX))
    };
    match (first, last) {
        ("", suffix) => match parse(suffix) {
            Some(0) => RangeResult::Unsatisfiable,
            Some(_) if len == 0 => RangeResult::Unsatisfiable,
            Some(n) => RangeResult::Partial {
                start: len.saturating_sub(n),
                end: len - 1,
            },
            None => RangeResult::Full,
        },
        (start, "") => match parse(start) {
            Some(s) if s < len => RangeResult::Partial {
                start: s,
                end: len - 1,
            },
            Some(_) => RangeResult::Unsatisfiable,
            None => RangeResult::Full,
        },
        (start, end) => match (parse(start), parse(end)) {
            (Some(s), Some(e)) if s > e => RangeResult::Full,
            (Some(s), Some(_)) if s >= len => RangeResult::Unsatisfiable,
            (Some(s), Some(e)) => RangeResult::Partial {
                start: s,
                end: e.min(len - 1),
            },
            _ => RangeResult::Full,
        },
    }
}

fn plain(status: StatusCode, text: &'static str, head: bool) -> Response<Body> {
    let mut r = generated(status, TEXT, Bytes::from_static(text.as_bytes()), head);
    if status == StatusCode::OK {
        r.headers_mut().insert(header::CACHE_CONTROL, NO_CACHE);
    }
    r
}

fn generated(
    status: StatusCode,
    content_type: HeaderValue,
    body: Bytes,
    head: bool,
) -> Response<Body> {
    let mut builder = Response::builder().status(status);
    let h = builder.headers_mut().expect("a fresh builder has headers");
    common_headers(h);
    h.insert(header::CONTENT_TYPE, content_type);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    if status == StatusCode::OK && !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, NO_STORE);
    }
    let body = if head { Bytes::new() } else { body };
    builder.body(Full::new(body)).expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_paths() {
        let r = |p| resolve(p).map(|c| c.into_owned());
        assert_eq!(r("/").as_deref(), Some("index.html"));
        assert_eq!(r("/version.txt").as_deref(), Some("version.txt"));
        assert_eq!(r("/docs/").as_deref(), Some("docs/index.html"));
        assert_eq!(r("/a%20b.txt").as_deref(), Some("a b.txt"));
        assert_eq!(r("/sub/x.html").as_deref(), Some("sub/x.html"));
        for bad in [
            "",
            "x",
            "//",
            "//etc/passwd",
            "/../etc/passwd",
            "/a/../b",
            "/./a",
            "/%2e%2e/x",
            "/%2E%2E/etc/passwd",
            "/a%2fb",
            "/a%2Fb",
            "/a%5cb",
            "/a\\b",
            "/%00",
            "/a//b",
            "/%ff",
            "/.%2e/x",
        ] {
            assert_eq!(r(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn ranges() {
        use RangeResult::*;
        let p = |s: &str, len| parse_range(s.as_bytes(), len);
        assert_eq!(p("bytes=0-4", 10), Partial { start: 0, end: 4 });
        assert_eq!(p("bytes=5-", 10), Partial { start: 5, end: 9 });
        assert_eq!(p("bytes=-3", 10), Partial { start: 7, end: 9 });
        assert_eq!(p("bytes=-30", 10), Partial { start: 0, end: 9 });
        assert_eq!(p("bytes=8-100", 10), Partial { start: 8, end: 9 });
        assert_eq!(p("bytes=10-", 10), Unsatisfiable);
        assert_eq!(p("bytes=10-20", 10), Unsatisfiable);
        assert_eq!(p("bytes=-0", 10), Unsatisfiable);
        assert_eq!(p("bytes=0-0", 0), Unsatisfiable);
        assert_eq!(p("bytes=0-1,3-4", 10), Full);
        assert_eq!(p("bytes=5-2", 10), Full);
        assert_eq!(p("items=0-1", 10), Full);
        assert_eq!(p("bytes=a-b", 10), Full);
        assert_eq!(p("bytes=+1-2", 10), Full);
    }

    #[test]
    fn range_unit_is_case_insensitive() {
        use RangeResult::*;
        let p = |s: &str| parse_range(s.as_bytes(), 10);
        assert_eq!(p("Bytes=0-4"), Partial { start: 0, end: 4 });
        assert_eq!(p("BYTES=-3"), Partial { start: 7, end: 9 });
        assert_eq!(p("bYtEs=5-"), Partial { start: 5, end: 9 });
        assert_eq!(p("byte=0-4"), Full);
        assert_eq!(p("bytesx=0-4"), Full);
    }

    #[test]
    fn range_whitespace_only_around_commas() {
        use RangeResult::*;
        let p = |s: &str| parse_range(s.as_bytes(), 10);
        assert_eq!(p("bytes=0-4,"), Partial { start: 0, end: 4 });
        assert_eq!(p("bytes=0-4 , "), Partial { start: 0, end: 4 });
        assert_eq!(p("bytes=, \t0-4"), Partial { start: 0, end: 4 });
        assert_eq!(p("bytes=0-1 ,\t3-4"), Full);
        assert_eq!(p("bytes = 0-4"), Full);
        assert_eq!(p("bytes =0-4"), Full);
        assert_eq!(p("bytes=0 -4"), Full);
        assert_eq!(p("bytes=0- 4"), Full);
        assert_eq!(p("bytes=- 3"), Full);
        assert_eq!(p("bytes="), Full);
        assert_eq!(p("bytes=,"), Full);
    }

    #[test]
    fn range_positions_beyond_u64() {
        use RangeResult::*;
        let p = |s: &str| parse_range(s.as_bytes(), 10);
        assert_eq!(
            p("bytes=2-99999999999999999999999"),
            Partial { start: 2, end: 9 }
        );
        assert_eq!(p("bytes=99999999999999999999999-"), Unsatisfiable);
        assert_eq!(
            p("bytes=-99999999999999999999999"),
            Partial { start: 0, end: 9 }
        );
    }
}
