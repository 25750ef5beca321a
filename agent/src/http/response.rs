//! The request-to-response rules, pure: no I/O, so every serving rule is unit-tested.
//!
//! Only paths listed in the manifest exist. A request path is decoded segment by segment
//! and looked up by exact string in that list, so traversal is impossible by construction:
//! there is no filesystem path to escape from.

use std::borrow::Cow;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::Full;

use crate::site::Asset;
use crate::state::AgentState;

pub type Body = Full<Bytes>;

const ROBOTS_TXT: &str = "User-agent: *\nDisallow: /\n";
const NOINDEX: HeaderValue = HeaderValue::from_static("noindex, nofollow");
const NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");
const NO_CACHE: HeaderValue = HeaderValue::from_static("no-cache");
const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
const BYTES: HeaderValue = HeaderValue::from_static("bytes");
const TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
const PROMETHEUS: HeaderValue =
    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
const SERVER: HeaderValue = HeaderValue::from_static("ami-agent");

pub fn respond(
    state: &AgentState,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Response<Body> {
    let response = route(state, method, path, headers);
    state.metrics.request(response.status().as_u16());
    response
}

fn route(state: &AgentState, method: &Method, path: &str, headers: &HeaderMap) -> Response<Body> {
    let head = match *method {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            let mut r = plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n",
                false,
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
    };
    let Some(name) = resolve(path) else {
        return plain(StatusCode::NOT_FOUND, "not found\n", head);
    };
    if let Some(asset) = state.site.get(&name) {
        return serve_asset(asset, headers, head);
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

/// The head of an asset's 200 answer (built once per asset when the release loads).
pub fn asset_headers(
    etag: &HeaderValue,
    content_type: &HeaderValue,
    content_length: &HeaderValue,
) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(8);
    common_headers(&mut h);
    h.insert(header::ETAG, etag.clone());
    h.insert(header::CACHE_CONTROL, NO_CACHE);
    h.insert(header::ACCEPT_RANGES, BYTES);
    h.insert(header::CONTENT_TYPE, content_type.clone());
    h.insert(header::CONTENT_LENGTH, content_length.clone());
    h
}

fn serve_asset(asset: &Asset, headers: &HeaderMap, head: bool) -> Response<Body> {
    let mut builder = Response::builder();
    let h = builder.headers_mut().expect("a fresh builder has headers");
    *h = asset.headers.clone();

    if let Some(inm) = headers.get(header::IF_NONE_MATCH) {
        if etag_list_matches(inm, &asset.etag) {
            h.remove(header::CONTENT_LENGTH);
            return builder
                .status(StatusCode::NOT_MODIFIED)
                .body(Body::default())
                .expect("valid response");
        }
    }
    let len = asset.body.len() as u64;
    // If-Range with another validator means "the whole thing": our copy changed.
    let range_applies = headers
        .get(header::IF_RANGE)
        .is_none_or(|v| v.as_bytes() == asset.etag.as_bytes());
    let range = match headers.get(header::RANGE) {
        Some(value) if range_applies => parse_range(value.as_bytes(), len),
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

/// Parses a `Range` header for a body of `len` bytes.
pub fn parse_range(value: &[u8], len: u64) -> RangeResult {
    let Ok(value) = std::str::from_utf8(value) else {
        return RangeResult::Full;
    };
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeResult::Full;
    };
    if spec.contains(',') {
        return RangeResult::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeResult::Full;
    };
    let parse = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok())?
    };
    match (first.trim(), last.trim()) {
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

/// `If-None-Match` uses weak comparison: `W/"x"` matches `"x"`; `*` matches anything.
pub fn etag_list_matches(value: &HeaderValue, etag: &HeaderValue) -> bool {
    let Ok(list) = value.to_str() else {
        return false;
    };
    let ours = etag.as_bytes();
    list.split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag).as_bytes() == ours)
}

fn common_headers(h: &mut HeaderMap) {
    // The site must stay out of search engines, whatever a crawler makes of robots.txt.
    h.insert("x-robots-tag", NOINDEX);
    h.insert(header::X_CONTENT_TYPE_OPTIONS, NOSNIFF);
    h.insert(header::SERVER, SERVER);
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
    fn etags() {
        let ours = HeaderValue::from_static("\"abc\"");
        let m = |v: &'static str| etag_list_matches(&HeaderValue::from_static(v), &ours);
        assert!(m("\"abc\""));
        assert!(m("W/\"abc\""));
        assert!(m("\"x\", \"abc\""));
        assert!(m("*"));
        assert!(!m("\"abd\""));
        assert!(!m("abc"));
    }
}
