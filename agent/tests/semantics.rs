//! HTTP semantics (RFC 9110) and HTTP/1.1 message rules (RFC 9112) over real TCP: each case
//! writes raw bytes to an in-process server and checks the status line and headers.

mod common;

use ami_agent::http::response::MAX_TARGET_BYTES;
use ami_agent::http::ServerConfig;
use common::*;

fn site() -> (TestSite, InProcess) {
    let site = test_site();
    let server = start_in_process(&site.root, ServerConfig::default());
    (site, server)
}

fn etag_of(site: &TestSite, path: &str) -> String {
    let entry = site.manifest.files.iter().find(|f| f.path == path).unwrap();
    format!("\"{}\"", entry.sha256)
}

async fn send(s: &InProcess, request: &str) -> RawResponse {
    raw(s.addr, request.as_bytes())
        .await
        .unwrap_or_else(|| panic!("no response to {request:?}"))
}

/// The headers the service puts on every answer it builds.
fn assert_security_headers(r: &RawResponse) {
    assert_eq!(r.header("x-robots-tag"), Some("noindex, nofollow"), "{r:?}");
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "{r:?}");
}

#[tokio::test]
async fn if_match_uses_strong_comparison_and_fails_with_412() {
    let (site, s) = site();
    let etag = etag_of(&site, "version.txt");
    let r = get(s.addr, "GET", "/version.txt", &["If-Match: \"zzz\""]).await;
    assert_eq!(r.status, 412);
    assert_security_headers(&r);
    let r = get(s.addr, "HEAD", "/version.txt", &["If-Match: \"zzz\""]).await;
    assert_eq!((r.status, r.body.len()), (412, 0));
    // A weak tag never matches strongly, even with our tag inside.
    let weak = format!("If-Match: W/{etag}");
    assert_eq!(
        get(s.addr, "GET", "/version.txt", &[&weak]).await.status,
        412
    );

    let listed = format!("If-Match: \"a\", {etag}");
    let r = get(s.addr, "GET", "/version.txt", &[&listed]).await;
    assert_eq!((r.status, r.body.as_slice()), (200, VERSION.as_bytes()));
    let r = get(s.addr, "GET", "/version.txt", &["If-Match: *"]).await;
    assert_eq!(r.status, 200);
    // Over two field lines, the lists join.
    let second = format!("If-Match: {etag}");
    let r = get(s.addr, "GET", "/version.txt", &["If-Match: \"a\"", &second]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn preconditions_are_evaluated_in_rfc_order() {
    let (site, s) = site();
    let etag = etag_of(&site, "big.bin");
    let inm = format!("If-None-Match: {etag}");
    let im = format!("If-Match: {etag}");
    // If-Match first: its failure wins over a matching If-None-Match.
    let r = get(s.addr, "GET", "/big.bin", &["If-Match: \"zzz\"", &inm]).await;
    assert_eq!(r.status, 412);
    let r = get(s.addr, "GET", "/big.bin", &[&im, &inm]).await;
    assert_eq!(r.status, 304);
    // A passing If-Match, then Range.
    let r = get(s.addr, "GET", "/big.bin", &[&im, "Range: bytes=0-9"]).await;
    assert_eq!((r.status, r.body.len()), (206, 10));
    // A failing If-Match stops before Range.
    let r = get(
        s.addr,
        "GET",
        "/big.bin",
        &["If-Match: \"x\"", "Range: bytes=0-9"],
    )
    .await;
    assert_eq!(r.status, 412);
    // Preconditions are ignored where the answer would not be 2xx anyway.
    let r = get(s.addr, "GET", "/nope", &["If-Match: \"zzz\""]).await;
    assert_eq!(r.status, 404);
    // The assets have no Last-Modified, so the date conditions are ignored.
    let r = get(
        s.addr,
        "GET",
        "/big.bin",
        &["If-Unmodified-Since: Thu, 01 Jan 1970 00:00:00 GMT"],
    )
    .await;
    assert_eq!(r.status, 200);
    let r = get(
        s.addr,
        "GET",
        "/big.bin",
        &["If-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT"],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.header("last-modified").is_none());
}

#[tokio::test]
async fn not_modified_carries_only_what_a_cache_needs() {
    let (site, s) = site();
    let etag = etag_of(&site, "index.html");
    let inm = format!("If-None-Match: W/{etag}");
    for method in ["GET", "HEAD"] {
        let r = get(s.addr, method, "/", &[&inm]).await;
        assert_eq!(r.status, 304, "{method}");
        assert!(r.body.is_empty());
        assert_eq!(r.header("etag"), Some(etag.as_str()));
        assert_eq!(r.header("cache-control"), Some("no-cache"));
        assert!(r.header("date").is_some());
        assert_security_headers(&r);
        for dropped in ["content-type", "content-length", "accept-ranges"] {
            assert!(r.header(dropped).is_none(), "{method} {dropped}: {r:?}");
        }
    }
}

#[tokio::test]
async fn host_is_required_once_and_must_be_valid() {
    let (_site, s) = site();
    let cases = [
        // HTTP/1.1 without Host.
        ("GET / HTTP/1.1\r\nConnection: close\r\n\r\n", 400),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\nConnection: close\r\n\r\n",
            400,
        ),
        (
            "GET / HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",
            400,
        ),
        (
            "GET / HTTP/1.1\r\nHost: a/b\r\nConnection: close\r\n\r\n",
            400,
        ),
        (
            "GET / HTTP/1.1\r\nHost: example.com:8x\r\nConnection: close\r\n\r\n",
            400,
        ),
        (
            "GET / HTTP/1.1\r\nHost: user@example.com\r\nConnection: close\r\n\r\n",
            400,
        ),
        // Two Host lines are refused whatever the version.
        ("GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        ("GET / HTTP/1.0\r\n\r\n", 200),
        (
            "GET / HTTP/1.1\r\nHost: example.com:8080\r\nConnection: close\r\n\r\n",
            200,
        ),
        (
            "GET / HTTP/1.1\r\nHost: [::1]:80\r\nConnection: close\r\n\r\n",
            200,
        ),
        // Absolute-form: the target's authority wins, the field's value is ignored...
        (
            "GET http://example.com/ HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",
            200,
        ),
        // ...but HTTP/1.1 still needs the field.
        (
            "GET http://example.com/ HTTP/1.1\r\nConnection: close\r\n\r\n",
            400,
        ),
    ];
    for (request, status) in cases {
        let r = send(&s, request).await;
        assert_eq!(r.status, status, "{request:?}");
        assert_security_headers(&r);
    }
}

#[tokio::test]
async fn unknown_methods_get_501_and_unsupported_ones_405() {
    let (_site, s) = site();
    for method in ["FOO", "PROPFIND", "get"] {
        let r = get(s.addr, method, "/", &[]).await;
        assert_eq!(r.status, 501, "{method}");
        assert!(r.header("allow").is_none(), "{method}");
        assert_security_headers(&r);
    }
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"] {
        let r = get(s.addr, method, "/", &["Content-Length: 0"]).await;
        assert_eq!(r.status, 405, "{method}");
        assert_eq!(r.header("allow"), Some("GET, HEAD"), "{method}");
    }
    let r = send(
        &s,
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let r = send(
        &s,
        "OPTIONS * HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 405);
}

#[tokio::test]
async fn range_unit_is_case_insensitive_and_whitespace_follows_the_grammar() {
    let (_site, s) = site();
    let data = big_bytes(200 * 1024);
    for range in [
        "Range: Bytes=0-9",
        "Range: BYTES=0-9",
        "Range: bytes=0-9",
        "Range: bytes=0-9 ,",
        "Range: bytes=, 0-9",
    ] {
        let r = get(s.addr, "GET", "/big.bin", &[range]).await;
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(r.header("content-range"), Some("bytes 0-9/204800"));
        assert_eq!(r.body, &data[..10]);
    }
    // Whitespace inside a range-spec or around `=` makes it invalid: ignored, a 200.
    for range in [
        "Range: bytes = 0-9",
        "Range: bytes=0 - 9",
        "Range: bytes=0- 9",
    ] {
        let r = get(s.addr, "GET", "/big.bin", &[range]).await;
        assert_eq!((r.status, r.body.len()), (200, data.len()), "{range}");
    }
    // Range is defined for GET only: a HEAD gets the 200 head.
    let r = get(s.addr, "HEAD", "/big.bin", &["Range: bytes=0-9"]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("204800"));
    assert!(r.header("content-range").is_none());
}

#[tokio::test]
async fn long_targets_get_414_and_oversized_heads_hyper_s_431() {
    let (_site, s) = site();
    let at_limit = format!("/{}", "a".repeat(MAX_TARGET_BYTES - 1));
    assert_eq!(get(s.addr, "GET", &at_limit, &[]).await.status, 404);
    let over = format!("/{}", "a".repeat(MAX_TARGET_BYTES));
    let r = get(s.addr, "GET", &over, &[]).await;
    assert_eq!(r.status, 414);
    assert_security_headers(&r);
    let r = get(
        s.addr,
        "GET",
        &format!("/?q={}", "a".repeat(MAX_TARGET_BYTES)),
        &[],
    )
    .await;
    assert_eq!(r.status, 414);
    // A head over the header limit (16 KiB by default) is answered by hyper itself,
    // before the service runs: no security headers there.
    let huge = format!("/{}", "a".repeat(20 * 1024));
    let r = get(s.addr, "GET", &huge, &[]).await;
    assert_eq!(r.status, 431);
    assert!(r.header("x-content-type-options").is_none(), "{r:?}");
}

/// What hyper answers on its own for request lines it cannot parse: these pin hyper's
/// behaviour (documented in the README) so that an upgrade that changes it shows up here.
#[tokio::test]
async fn request_lines_hyper_refuses_before_the_service() {
    let (_site, s) = site();
    for request in [
        "GET / HTTP/1.2\r\nHost: t\r\n\r\n",
        "GET / HTTP/2.0\r\nHost: t\r\n\r\n",
        "GET / HTTP/1.1 extra\r\nHost: t\r\n\r\n",
        "GET  HTTP/1.1\r\nHost: t\r\n\r\n",
        "GET /a b HTTP/1.1\r\nHost: t\r\n\r\n",
        "G(T / HTTP/1.1\r\nHost: t\r\n\r\n",
    ] {
        let r = send(&s, request).await;
        assert_eq!(r.status, 400, "{request:?}");
        assert!(r.header("x-content-type-options").is_none(), "{r:?}");
        assert_eq!(r.header("content-length"), Some("0"), "{request:?}");
    }
    // The HTTP/2 connection preface is not answered at all: the connection just closes.
    let r = raw(s.addr, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    assert!(r.is_none(), "{r:?}");
    assert_eq!(get(s.addr, "GET", "/", &[]).await.status, 200);
}
