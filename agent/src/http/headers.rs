//! Response header values and the header sets every answer starts from. Depends on
//! nothing else in the crate, so the release loader (`site`) and the request rules
//! (`response`) can both use it without importing each other.

use http::header::{self, HeaderMap, HeaderValue};

pub const NOINDEX: HeaderValue = HeaderValue::from_static("noindex, nofollow");
pub const NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");
pub const NO_CACHE: HeaderValue = HeaderValue::from_static("no-cache");
pub const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
pub const BYTES: HeaderValue = HeaderValue::from_static("bytes");
pub const TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
pub const JSON: HeaderValue = HeaderValue::from_static("application/json");
pub const PROMETHEUS: HeaderValue =
    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
pub const SERVER: HeaderValue = HeaderValue::from_static("ami-agent");
pub const GET_HEAD: HeaderValue = HeaderValue::from_static("GET, HEAD");
pub const CLOSE: HeaderValue = HeaderValue::from_static("close");

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

/// What every answer built by the service carries. Answers hyper writes itself (parse
/// errors, oversized heads) never reach the service and go without.
pub fn common_headers(h: &mut HeaderMap) {
    // The site must stay out of search engines, whatever a crawler makes of robots.txt.
    h.insert("x-robots-tag", NOINDEX);
    h.insert(header::X_CONTENT_TYPE_OPTIONS, NOSNIFF);
    h.insert(header::SERVER, SERVER);
}
