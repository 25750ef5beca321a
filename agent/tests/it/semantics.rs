//! HTTP semantics (RFC 9110) and HTTP/1.1 message rules (RFC 9112) over real TCP: each case
//! writes raw bytes to an in-process server and checks the status line and headers.

use crate::common;

use ami_agent::http::first_line::MAX_LINE_BYTES;
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
    // A version with more than one digit is not an HTTP-version (RFC 9112 §2.3); nor is a
    // line that has no end within the length looked at for its version.
    let unended = format!(
        "GET /{} HTTP/1.2\r\nHost: t\r\n\r\n",
        "a".repeat(MAX_LINE_BYTES)
    );
    for request in [
        "GET / HTTP/1.10\r\nHost: t\r\n\r\n",
        "GET / HTTP/12.0\r\nHost: t\r\n\r\n",
        "GET / HTTP/0.9\r\nHost: t\r\n\r\n",
        "GET / HTTP/1.1 extra\r\nHost: t\r\n\r\n",
        "GET  HTTP/1.1\r\nHost: t\r\n\r\n",
        "GET /a b HTTP/1.1\r\nHost: t\r\n\r\n",
        "G(T / HTTP/1.1\r\nHost: t\r\n\r\n",
        &unended,
    ] {
        let r = send(&s, request).await;
        assert_eq!(r.status, 400, "{request:?}");
        assert!(r.header("x-content-type-options").is_none(), "{r:?}");
        assert_eq!(r.header("content-length"), Some("0"), "{request:?}");
    }
    assert_eq!(get(s.addr, "GET", "/", &[]).await.status, 200);
}

/// Writes `writes` one after another on a fresh connection (a moment apart, so each is a
/// read of its own), then reads until the server closes.
async fn exchange(addr: std::net::SocketAddr, writes: &[&[u8]]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    for (i, w) in writes.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        stream.write_all(w).await.unwrap();
    }
    let mut out = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut out),
    )
    .await;
    assert!(read.is_ok(), "the server kept the connection open");
    out
}

/// The responses in `bytes`, each with its status line.
fn responses(bytes: &[u8]) -> Vec<(String, RawResponse)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let r = parse_response(rest).unwrap_or_else(|| panic!("not a response: {rest:?}"));
        let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let line = String::from_utf8(rest[..line_end].to_vec()).unwrap();
        let head_end = rest.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let len: usize = r.header("content-length").unwrap().parse().unwrap();
        rest = &rest[head_end + len..];
        out.push((
            line,
            RawResponse {
                body: r.body[..len].to_vec(),
                ..r
            },
        ));
    }
    out
}

/// RFC 9110 §2.5, RFC 9112 §2.3: a later minor version of HTTP/1 is served as HTTP/1.1
/// (nginx does the same), and the connection closes after the answer.
#[tokio::test]
async fn later_http_1_minor_versions_are_served_as_1_1() {
    let (_site, s) = site();
    for version in ["HTTP/1.2", "HTTP/1.9"] {
        let request = format!("GET /version.txt {version}\r\nHost: t\r\n\r\n");
        let got = responses(&exchange(s.addr, &[request.as_bytes()]).await);
        assert_eq!(got.len(), 1, "{version}: {got:?}");
        let (line, r) = &got[0];
        assert_eq!(line, "HTTP/1.1 200 OK", "{version}");
        assert_eq!(r.body, VERSION.as_bytes(), "{version}");
        assert_eq!(r.header("connection"), Some("close"), "{version}");
        assert_security_headers(r);
    }
    // Served as 1.1, it needs Host like 1.1.
    let r = send(&s, "GET / HTTP/1.2\r\n\r\n").await;
    assert_eq!(r.status, 400);
    assert_security_headers(&r);
    // A second request on the connection is not read: the first answer closed it.
    let twice = "GET /version.txt HTTP/1.2\r\nHost: t\r\n\r\nGET / HTTP/1.2\r\nHost: t\r\n\r\n";
    let got = responses(&exchange(s.addr, &[twice.as_bytes()]).await);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1.status, 200);
}

/// RFC 9110 §15.6.6: a major version the server does not implement gets 505, whatever the
/// method and target (nginx answers 505 too), with the agent's headers, and the connection
/// closes.
#[tokio::test]
async fn other_major_versions_get_505_and_the_connection_closes() {
    let (_site, s) = site();
    for request in [
        "GET /version.txt HTTP/2.0\r\nHost: t\r\n\r\n",
        "GET /version.txt HTTP/3.0\r\nHost: t\r\n\r\n",
        "GET / HTTP/9.9\r\nHost: t\r\n\r\n",
        // Neither the missing Host nor the method matters.
        "DELETE /nope HTTP/2.0\r\n\r\n",
        // Nor what follows on the connection.
        "GET / HTTP/2.0\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n",
    ] {
        let got = responses(&exchange(s.addr, &[request.as_bytes()]).await);
        assert_eq!(got.len(), 1, "{request:?}: {got:?}");
        let (line, r) = &got[0];
        assert_eq!(
            line, "HTTP/1.1 505 HTTP Version Not Supported",
            "{request:?}"
        );
        assert_eq!(r.header("connection"), Some("close"), "{request:?}");
        assert_security_headers(r);
        assert_eq!(r.body, b"http version not supported\n");
    }
    let r = send(&s, "HEAD / HTTP/2.0\r\nHost: t\r\n\r\n").await;
    assert_eq!((r.status, r.body.len()), (505, 0));
}

/// The HTTP/2 connection preface from a client that assumed HTTP/2 without asking: nginx
/// without HTTP/2 on the listener answers 400 and closes (its parser refuses the `*`
/// target before it reaches the version), and so does the agent, with its headers.
#[tokio::test]
async fn the_http2_preface_gets_400_and_the_connection_closes() {
    let (_site, s) = site();
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let got = responses(&exchange(s.addr, &[preface]).await);
    assert_eq!(got.len(), 1, "{got:?}");
    let (line, r) = &got[0];
    assert_eq!(line, "HTTP/1.1 400 Bad Request");
    assert_eq!(r.header("connection"), Some("close"));
    assert_security_headers(r);
    // With the client's first HTTP/2 frame (an empty SETTINGS) right behind it.
    let mut with_settings = preface.to_vec();
    with_settings.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let got = responses(&exchange(s.addr, &[&with_settings]).await);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1.status, 400);
    // A byte at a time, up to the end of what HTTP/1 sees as a head (the answer comes
    // then, and the connection closes under whatever else the client writes).
    let bytes: Vec<&[u8]> = preface[..18].chunks(1).collect();
    let got = responses(&exchange(s.addr, &bytes).await);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1.status, 400);
}

#[tokio::test]
async fn a_request_line_sent_a_byte_at_a_time_is_read_whole() {
    let (_site, s) = site();
    for (request, connection) in [
        (
            "GET /version.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            None,
        ),
        (
            "GET /version.txt HTTP/1.2\r\nHost: t\r\n\r\n",
            Some("close"),
        ),
    ] {
        let bytes: Vec<&[u8]> = request.as_bytes().chunks(1).collect();
        let got = responses(&exchange(s.addr, &bytes).await);
        assert_eq!(got.len(), 1, "{request:?}: {got:?}");
        let (line, r) = &got[0];
        assert_eq!(line, "HTTP/1.1 200 OK", "{request:?}");
        assert_eq!(r.body, VERSION.as_bytes(), "{request:?}");
        if connection.is_some() {
            assert_eq!(r.header("connection"), connection, "{request:?}");
        }
    }
    let got = responses(&exchange(s.addr, &[b"GET / HT", b"TP/2.0\r\n\r\n"]).await);
    assert_eq!(got[0].1.status, 505);
}

#[tokio::test]
async fn pipelined_http_1_1_requests_are_all_answered() {
    let (_site, s) = site();
    let one = "GET /version.txt HTTP/1.1\r\nHost: t\r\n\r\n";
    let last = "GET /css/site.css HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    let all = format!("{one}{one}{last}");
    // In one write, and with the first line cut in two so the rest comes with its end.
    for writes in [
        vec![all.as_bytes()],
        vec![&all.as_bytes()[..10], &all.as_bytes()[10..]],
    ] {
        let got = responses(&exchange(s.addr, &writes).await);
        let statuses: Vec<u16> = got.iter().map(|(_, r)| r.status).collect();
        assert_eq!(statuses, [200, 200, 200]);
        assert_eq!(got[0].1.body, VERSION.as_bytes());
        assert_eq!(got[1].1.body, VERSION.as_bytes());
        assert_eq!(got[2].1.body, b"body { color: black }\n");
    }
}

#[tokio::test]
async fn a_first_line_longer_than_the_part_looked_at_still_gets_414() {
    let (_site, s) = site();
    let target = format!("/{}", "a".repeat(MAX_LINE_BYTES));
    let request = format!("GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let bytes = request.as_bytes();
    for writes in [vec![bytes], vec![&bytes[..100], &bytes[100..]]] {
        let got = responses(&exchange(s.addr, &writes).await);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].1.status, 414);
        assert_security_headers(&got[0].1);
    }
}
