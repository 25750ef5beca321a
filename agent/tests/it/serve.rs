//! Serving rules over real TCP against an in-process server on 127.0.0.1:0.

use crate::common;

use std::time::Duration;

use ami_agent::http::ServerConfig;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn site() -> (TestSite, InProcess) {
    let site = test_site();
    let server = start_in_process(&site.root, ServerConfig::default());
    (site, server)
}

#[tokio::test]
async fn serves_index_and_files_with_the_right_headers() {
    let (_site, s) = site();
    let r = get(s.addr, "GET", "/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, INDEX.as_bytes());
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(
        r.header("content-length"),
        Some(INDEX.len().to_string().as_str())
    );
    assert_eq!(r.header("x-robots-tag"), Some("noindex, nofollow"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    let etag = format!("\"{}\"", ami_agent::manifest::sha256_hex(INDEX.as_bytes()));
    assert_eq!(r.header("etag"), Some(etag.as_str()));

    let r = get(s.addr, "GET", "/version.txt", &[]).await;
    assert_eq!((r.status, r.body.as_slice()), (200, VERSION.as_bytes()));
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    let r = get(s.addr, "GET", "/css/site.css?v=3", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/css; charset=utf-8"));
    let r = get(s.addr, "GET", "/big.bin", &[]).await;
    assert_eq!(r.body, big_bytes(200 * 1024));
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
}

#[tokio::test]
async fn head_has_the_headers_and_no_body() {
    let (_site, s) = site();
    let r = get(s.addr, "HEAD", "/big.bin", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("204800"));
    assert!(r.body.is_empty());
}

#[tokio::test]
async fn only_get_and_head() {
    let (_site, s) = site();
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"] {
        let r = get(s.addr, method, "/index.html", &["Content-Length: 0"]).await;
        assert_eq!(r.status, 405, "{method}");
        assert_eq!(r.header("allow"), Some("GET, HEAD"));
        assert_eq!(r.header("x-robots-tag"), Some("noindex, nofollow"));
    }
}

#[tokio::test]
async fn unknown_paths_are_404_and_traversal_never_escapes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("www");
    write_site(&root);
    // A secret next to the root and a file inside it that the manifest does not list.
    std::fs::write(dir.path().join("secret.txt"), "TOP-SECRET").unwrap();
    let s = start_in_process(&root, ServerConfig::default());
    std::fs::write(root.join("dropped.txt"), "TOP-SECRET").unwrap();

    let attempts = [
        "/secret.txt",
        "/dropped.txt",
        "/../secret.txt",
        "/../../../../etc/passwd",
        "/%2e%2e/secret.txt",
        "/%2E%2E/%2E%2E/etc/passwd",
        "/..%2fsecret.txt",
        "/%2e%2e%2fsecret.txt",
        "/css/..%2f..%2fsecret.txt",
        "/css/../../secret.txt",
        "//secret.txt",
        "//etc/passwd",
        "/css//site.css",
        "/css%2fsite.css",
        "/css%5c..%5c..%5csecret.txt",
        "/./index.html",
        "/index.html%00.txt",
        "/%ff%fe",
        "/css/",
        "/nope",
    ];
    for path in attempts {
        let r = get(s.addr, "GET", path, &[]).await;
        assert!(matches!(r.status, 400 | 404), "{path}: {}", r.status);
        assert!(
            !String::from_utf8_lossy(&r.body).contains("TOP-SECRET"),
            "{path}"
        );
        assert!(
            !String::from_utf8_lossy(&r.body).contains("root:"),
            "{path}"
        );
    }
    // Absolute-form request targets are resolved the same way.
    let r = raw(
        s.addr,
        b"GET http://test/../secret.txt HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(matches!(r.status, 400 | 404));
    // Percent-encoded names of real files still work.
    let r = get(s.addr, "GET", "/css/site%2Ecss", &[]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn etag_revalidation_and_ranges() {
    let (site, s) = site();
    let sha = &site
        .manifest
        .files
        .iter()
        .find(|f| f.path == "big.bin")
        .unwrap()
        .sha256;
    let inm = format!("If-None-Match: \"{sha}\"");
    let r = get(s.addr, "GET", "/big.bin", &[&inm]).await;
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    let r = get(s.addr, "GET", "/big.bin", &["If-None-Match: \"other\""]).await;
    assert_eq!(r.status, 200);

    let data = big_bytes(200 * 1024);
    let r = get(s.addr, "GET", "/big.bin", &["Range: bytes=10-19"]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 10-19/204800"));
    assert_eq!(r.body, &data[10..20]);
    let r = get(s.addr, "GET", "/big.bin", &["Range: bytes=-5"]).await;
    assert_eq!(
        (r.status, r.body.as_slice()),
        (206, &data[data.len() - 5..])
    );
    let r = get(s.addr, "GET", "/big.bin", &["Range: bytes=204800-"]).await;
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */204800"));
    let r = get(s.addr, "GET", "/big.bin", &["Range: bytes=0-1,5-6"]).await;
    assert_eq!((r.status, r.body.len()), (200, data.len()));
    // If-Range with a stale validator: the whole file.
    let r = get(
        s.addr,
        "GET",
        "/big.bin",
        &["Range: bytes=0-1", "If-Range: \"stale\""],
    )
    .await;
    assert_eq!((r.status, r.body.len()), (200, data.len()));
}

#[tokio::test]
async fn builtin_endpoints_unless_the_content_has_them() {
    let (_site, s) = site();
    let r = get(s.addr, "GET", "/robots.txt", &[]).await;
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, b"User-agent: *\nDisallow: /\n".as_slice())
    );
    let r = get(s.addr, "GET", "/healthz", &[]).await;
    let health: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(health["version"], "v1-test 26.05");
    assert_eq!(health["status"], "starting");
    assert!(health["uptime_seconds"].is_u64());
    let r = get(s.addr, "GET", "/manifest.json", &[]).await;
    let manifest: ami_agent::manifest::Manifest = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(manifest.files.len(), 4);
    let r = get(s.addr, "GET", "/metrics", &[]).await;
    let text = String::from_utf8(r.body).unwrap();
    // The four requests before this one were all 200s.
    assert!(
        text.contains("ami_agent_http_requests_total{status=\"200\"} 3"),
        "{text}"
    );
    assert!(text.contains("ami_agent_heals_total 0"), "{text}");

    // A site with its own robots.txt and healthz: the content wins.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("robots.txt"), "User-agent: *\nAllow: /\n").unwrap();
    std::fs::write(dir.path().join("healthz"), "mine").unwrap();
    let s = start_in_process(dir.path(), ServerConfig::default());
    assert_eq!(
        get(s.addr, "GET", "/robots.txt", &[]).await.body,
        b"User-agent: *\nAllow: /\n"
    );
    assert_eq!(get(s.addr, "GET", "/healthz", &[]).await.body, b"mine");
}

#[tokio::test]
async fn keep_alive_serves_several_requests_on_one_connection() {
    let (_site, s) = site();
    let mut stream = TcpStream::connect(s.addr).await.unwrap();
    stream
        .write_all(b"GET /version.txt HTTP/1.1\r\nHost: t\r\n\r\nGET /version.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
}

#[tokio::test]
async fn garbage_and_oversized_requests_close_the_connection_and_serving_goes_on() {
    let (_site, s) = site();
    let r = raw(s.addr, b"\x00\x01\x02garbage\xff\r\n\r\n").await;
    assert!(r.as_ref().is_none_or(|r| r.status == 400), "{r:?}");
    let r = raw(s.addr, b"GET / HTTP/9.9\r\n\r\n").await;
    assert!(r.as_ref().is_none_or(|r| r.status >= 400), "{r:?}");
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let r = raw(s.addr, huge.as_bytes()).await;
    assert!(
        r.as_ref()
            .is_none_or(|r| r.status == 431 || r.status == 400),
        "{r:?}"
    );
    let many: String = (0..500).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = raw(
        s.addr,
        format!("GET / HTTP/1.1\r\nHost: t\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(r.as_ref().is_none_or(|r| r.status >= 400), "{r:?}");
    assert_eq!(get(s.addr, "GET", "/", &[]).await.status, 200);
}

#[tokio::test]
async fn slowloris_is_cut_off_by_the_header_timeout() {
    let site = test_site();
    let s = start_in_process(
        &site.root,
        ServerConfig {
            header_read_timeout: Duration::from_millis(500),
            ..ServerConfig::default()
        },
    );
    let mut slow = TcpStream::connect(s.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    // Dribble a header byte now and then: the deadline is for the whole head.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            tokio::select! {
                n = slow.read(&mut buf) => return n,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if slow.write_all(b"X").await.is_err() { return Ok(0); }
                }
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the slow client was never cut off");
    assert!(started.elapsed() < Duration::from_secs(3));
    // An idle kept-alive connection is closed too.
    let mut idle = TcpStream::connect(s.addr).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "{n:?}");
    assert_eq!(get(s.addr, "GET", "/", &[]).await.status, 200);
}

#[tokio::test]
async fn connection_limit_queues_the_next_client_behind_busy_ones() {
    let site = test_site();
    // Larger than loopback's socket buffers: a client that does not read keeps its
    // connection busy. (Idle connections would be closed to make room: see hostile.rs.)
    std::fs::write(site.root.join("huge.bin"), big_bytes(16 << 20)).unwrap();
    let s = start_in_process(
        &site.root,
        ServerConfig {
            max_connections: 2,
            ..ServerConfig::default()
        },
    );
    let mut hold1 = TcpStream::connect(s.addr).await.unwrap();
    let mut hold2 = TcpStream::connect(s.addr).await.unwrap();
    for hold in [&mut hold1, &mut hold2] {
        hold.write_all(b"GET /huge.bin HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = tokio::spawn(get(s.addr, "GET", "/version.txt", &[]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !third.is_finished(),
        "a third connection was served beyond the limit"
    );
    drop(hold1);
    let r = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight_and_refuses_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let big = big_bytes(16 << 20);
    std::fs::write(dir.path().join("huge.bin"), &big).unwrap();
    let s = start_in_process(dir.path(), ServerConfig::default());
    let mut client = TcpStream::connect(s.addr).await.unwrap();
    client
        .write_all(b"GET /huge.bin HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    // Read a little so the response is under way, then shut down while most is unsent.
    let mut first = vec![0u8; 4096];
    client.read_exact(&mut first).await.unwrap();
    let server = s.server.clone();
    let shutdown = tokio::spawn(async move { server.shutdown(Duration::from_secs(10)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        TcpStream::connect(s.addr).await.is_err(),
        "still accepting after shutdown"
    );
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    let mut all = first;
    all.extend_from_slice(&rest);
    let r = parse_response(&all).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), big.len());
    assert!(r.body == big);
    assert!(shutdown.await.unwrap(), "connections were not drained");
}
