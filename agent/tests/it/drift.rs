//! `ami-agent drift` against reference servers started here, on 127.0.0.1.
//!
//! The servers encode their replies by hand (not with the crate's own code), so an
//! encoding mistake in the client cannot cancel out against the same mistake here.

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Seconds from the NTP epoch (1900) to the Unix epoch (1970).
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

/// Real now, shifted by `offset_secs`.
fn shifted_now(offset_secs: i64) -> SystemTime {
    let now = SystemTime::now();
    let shift = Duration::from_secs(offset_secs.unsigned_abs());
    if offset_secs >= 0 {
        now + shift
    } else {
        now - shift
    }
}

fn ntp_timestamp(time: SystemTime) -> [u8; 8] {
    let since_unix = time.duration_since(UNIX_EPOCH).unwrap();
    let seconds = (since_unix.as_secs() + NTP_UNIX_OFFSET) as u32;
    let fraction = ((u64::from(since_unix.subsec_nanos()) << 32) / 1_000_000_000) as u32;
    ((u64::from(seconds) << 32) | u64::from(fraction)).to_be_bytes()
}

#[derive(Clone, Copy)]
enum Reply {
    /// A synchronised stratum-2 server whose clock is real now + this many seconds.
    Offset(i64),
    /// A kiss-o'-death with this code.
    Kiss(&'static [u8; 4]),
}

/// Starts an SNTP server on 127.0.0.1 and returns its port.
fn sntp_server(reply: Reply) -> u16 {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    thread::spawn(move || loop {
        let mut request = [0; 512];
        let (len, peer) = socket.recv_from(&mut request).unwrap();
        assert_eq!(len, 48, "an SNTP request is a bare 48-byte header");
        assert_eq!(request[0] & 0b111, 3, "client mode");
        assert_eq!((request[0] >> 3) & 0b111, 4, "version 4");
        let mut packet = [0; 48];
        packet[24..32].copy_from_slice(&request[40..48]); // originate = client's transmit
        match reply {
            Reply::Offset(offset) => {
                packet[0] = 0b00_100_100; // LI 0, version 4, mode 4 (server)
                packet[1] = 2;
                packet[12..16].copy_from_slice(&[127, 0, 0, 1]);
                packet[16..24].copy_from_slice(&ntp_timestamp(shifted_now(offset)));
                packet[32..40].copy_from_slice(&ntp_timestamp(shifted_now(offset)));
                packet[40..48].copy_from_slice(&ntp_timestamp(shifted_now(offset)));
            }
            Reply::Kiss(code) => {
                packet[0] = 0b11_100_100; // LI 3 (unsynchronised), version 4, mode 4
                packet[12..16].copy_from_slice(code);
            }
        }
        socket.send_to(&packet, peer).unwrap();
    });
    port
}

/// A UDP port that is bound but never answers: a dead NTP server, reached only by the
/// timeout (a closed port would fail fast with "connection refused" instead).
fn silent_port() -> (UdpSocket, u16) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

/// Starts an HTTP/1.1 server whose `Date` header is real now + `offset_secs`.
fn http_server(offset_secs: i64) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut request = Vec::new();
            let mut buf = [0; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let date = httpdate::fmt_http_date(shifted_now(offset_secs));
            let response = format!(
                "HTTP/1.1 200 OK\r\nDate: {date}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.write_all(response.as_bytes());
        }
    });
    port
}

fn drift(args: &[&str]) -> Output {
    drift_with_env(args, &[])
}

fn drift_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ami-agent"));
    command.arg("drift").args(args);
    for var in [
        "AMI_AGENT_DRIFT_SOURCES",
        "AMI_AGENT_DRIFT_TIMEOUT",
        "AMI_AGENT_LOG",
    ] {
        command.env_remove(var);
    }
    command.envs(env.iter().copied());
    command.output().unwrap()
}

fn stdout(output: &Output) -> &str {
    std::str::from_utf8(&output.stdout).unwrap()
}

fn stderr(output: &Output) -> &str {
    std::str::from_utf8(&output.stderr).unwrap()
}

fn assert_prints(output: &Output, expected: &str) {
    assert!(
        output.status.success(),
        "status {:?}, stderr: {}",
        output.status,
        stderr(output)
    );
    assert_eq!(stdout(output), expected, "stderr: {}", stderr(output));
}

#[test]
fn ntp_reference_ahead_gives_negative_drift() {
    let port = sntp_server(Reply::Offset(4));
    assert_prints(
        &drift(&["--source", &format!("ntp://127.0.0.1:{port}")]),
        "-4\n",
    );
}

#[test]
fn ntp_reference_behind_gives_positive_drift() {
    let port = sntp_server(Reply::Offset(-7));
    assert_prints(
        &drift(&["--source", &format!("ntp://127.0.0.1:{port}")]),
        "7\n",
    );
}

#[test]
fn http_date_reference_ahead_gives_negative_drift() {
    // The estimate is Date + 0.5 s, so the result sits near -4.5 + (the second's fraction
    // at the request): request mid-second, far from both rounding edges.
    loop {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_millis();
        if (150..350).contains(&millis) {
            break;
        }
        thread::sleep(Duration::from_millis(u64::from((1250 - millis) % 1000)));
    }
    let port = http_server(4);
    // A proxy in the environment must be ignored: it would answer with its own clock.
    let output = drift_with_env(
        &["--source", &format!("http://127.0.0.1:{port}/")],
        &[
            ("HTTP_PROXY", "http://127.0.0.1:9"),
            ("http_proxy", "http://127.0.0.1:9"),
        ],
    );
    assert_prints(&output, "-4\n");
}

#[test]
fn dead_first_source_falls_through_to_the_next() {
    let (_dead, dead_port) = silent_port();
    let port = sntp_server(Reply::Offset(4));
    let dead = format!("ntp://127.0.0.1:{dead_port}");
    let live = format!("ntp://127.0.0.1:{port}");
    let output = drift(&["--timeout", "0.3", "--source", &dead, "--source", &live]);
    assert_prints(&output, "-4\n");
}

#[test]
fn sources_and_timeout_from_the_environment() {
    let (_dead, dead_port) = silent_port();
    let port = sntp_server(Reply::Offset(-7));
    let sources = format!("ntp://127.0.0.1:{dead_port},ntp://127.0.0.1:{port}");
    let output = drift_with_env(
        &[],
        &[
            ("AMI_AGENT_DRIFT_SOURCES", &sources),
            ("AMI_AGENT_DRIFT_TIMEOUT", "0.3"),
        ],
    );
    assert_prints(&output, "7\n");
}

#[test]
fn all_sources_dead_prints_nothing_and_fails_within_the_timeouts() {
    let (_first, first_port) = silent_port();
    let (_second, second_port) = silent_port();
    let first = format!("ntp://127.0.0.1:{first_port}");
    let second = format!("ntp://127.0.0.1:{second_port}");
    let started = Instant::now();
    let output = drift(&["--timeout", "0.3", "--source", &first, "--source", &second]);
    let elapsed = started.elapsed();
    assert_eq!(output.status.code(), Some(1), "stderr: {}", stderr(&output));
    assert_eq!(stdout(&output), "");
    let message = stderr(&output);
    assert!(
        message.contains(&format!("{first}: timed out after 300ms")),
        "{message}"
    );
    assert!(
        message.contains(&format!("{second}: timed out after 300ms")),
        "{message}"
    );
    assert!(
        elapsed >= Duration::from_millis(600),
        "gave up too early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "not bounded by the timeouts: {elapsed:?}"
    );
}

#[test]
fn kiss_of_death_is_rejected() {
    let port = sntp_server(Reply::Kiss(b"RATE"));
    let source = format!("ntp://127.0.0.1:{port}");
    let output = drift(&["--source", &source]);
    assert_eq!(output.status.code(), Some(1), "stderr: {}", stderr(&output));
    assert_eq!(stdout(&output), "");
    let message = stderr(&output);
    assert!(
        message.contains(&source) && message.contains("kiss-o'-death"),
        "{message}"
    );
    assert!(message.contains("RATE"), "{message}");
}

#[test]
fn kiss_of_death_falls_through_to_the_next_source() {
    let kiss = sntp_server(Reply::Kiss(b"DENY"));
    let live = sntp_server(Reply::Offset(4));
    let output = drift(&[
        "--source",
        &format!("ntp://127.0.0.1:{kiss},ntp://127.0.0.1:{live}"),
    ]);
    assert_prints(&output, "-4\n");
}

#[test]
fn bad_source_is_a_usage_error() {
    for bad in ["foo://x", "ntp://", "time.aws.com"] {
        let output = drift(&["--source", bad]);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{bad}: stderr: {}",
            stderr(&output)
        );
        assert_eq!(stdout(&output), "");
        let message = stderr(&output);
        assert!(message.contains(bad), "{message}");
        assert!(
            message.contains("ntp://HOST[:PORT], http://HOST[/PATH] or https://HOST[/PATH]"),
            "{message}"
        );
    }
}

#[test]
fn json_output_has_the_fields() {
    let port = sntp_server(Reply::Offset(4));
    let source = format!("ntp://127.0.0.1:{port}");
    let output = drift(&["--json", "--source", &source]);
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    let text = stdout(&output);
    assert_eq!(text.lines().count(), 1, "{text}");
    let json: serde_json::Value = serde_json::from_str(text).unwrap();
    let offset_ms = json["offset_ms"].as_i64().unwrap();
    assert!((-4100..=-3900).contains(&offset_ms), "{json}");
    assert_eq!(json["offset_seconds"].as_i64(), Some(-4), "{json}");
    let round_trip_ms = json["round_trip_ms"].as_f64().unwrap();
    assert!((0.0..1000.0).contains(&round_trip_ms), "{json}");
    assert_eq!(json["source"].as_str(), Some(source.as_str()), "{json}");
    assert_eq!(json["stratum"].as_u64(), Some(2), "{json}");
}
