//! PutSnapshotBlock as amictl sends it (image/blocks.rs), against a scripted EBS endpoint:
//! moto ignores signatures, retries nothing and keeps no clock, so this is where the
//! signature (checked with botocore's signer), the retries, the errors and the clock skew
//! are checked.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use amictl::aws::AwsError;
use amictl::image::aws::AwsImages;
use amictl::image::upload::{SnapshotStore, StartSpec};
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::provider::{future, ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use bytes::Bytes;

const SNAPSHOT: &str = "snap-0123456789abcdef0";

/// One request as the endpoint read it.
#[derive(Debug, Clone)]
struct Seen {
    /// Which TCP connection it came on, in the order they were accepted.
    connection: usize,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An answer to a block put: status, error type (header), message, and how far the
/// endpoint's clock (its Date header) is ahead of ours.
#[derive(Debug, Clone, Copy)]
struct Reply {
    status: u16,
    error: &'static str,
    message: &'static str,
}

const CREATED: Reply = Reply {
    status: 201,
    error: "",
    message: "",
};

/// The endpoint: StartSnapshot answers a snapshot; block puts take the scripted replies
/// in turn, then 201. With `clock_ahead`, its clock runs that far ahead (for StartSnapshot's
/// answer too if `start_ahead`), and a put signed more than five minutes away from it is
/// refused the way AWS refuses it.
#[derive(Clone)]
struct Endpoint {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<VecDeque<Reply>>>,
}

impl Endpoint {
    fn start(script: &[Reply], clock_ahead: Duration) -> Endpoint {
        Self::start_with(script, clock_ahead, true)
    }

    fn start_with(script: &[Reply], clock_ahead: Duration, start_ahead: bool) -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let endpoint = Endpoint {
            url,
            seen: Arc::default(),
            script: Arc::new(Mutex::new(script.iter().copied().collect())),
        };
        let shared = endpoint.clone();
        std::thread::spawn(move || {
            for (connection, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { return };
                let shared = shared.clone();
                std::thread::spawn(move || {
                    shared.serve(stream, connection, clock_ahead, start_ahead)
                });
            }
        });
        endpoint
    }

    fn serve(
        &self,
        stream: TcpStream,
        connection: usize,
        clock_ahead: Duration,
        start_ahead: bool,
    ) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut stream = stream;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let mut parts = line.split_whitespace();
            let (method, path) = (
                parts.next().unwrap_or_default().to_owned(),
                parts.next().unwrap_or_default().to_owned(),
            );
            let mut headers = Vec::new();
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                let (n, v) = h.split_once(':').unwrap();
                headers.push((n.trim().to_owned(), v.trim().to_owned()));
            }
            let mut seen = Seen {
                connection,
                method,
                path,
                headers,
                body: Vec::new(),
            };
            let length: usize = seen
                .header("content-length")
                .map_or(0, |v| v.parse().unwrap());
            seen.body = vec![0; length];
            reader.read_exact(&mut seen.body).unwrap();
            let starting = seen.method == "POST";
            let clock = SystemTime::now()
                + if starting && !start_ahead {
                    Duration::ZERO
                } else {
                    clock_ahead
                };
            let (status, error, body) = if starting {
                let body = format!(
                    r#"{{"SnapshotId":"{SNAPSHOT}","BlockSize":524288,"Status":"pending","VolumeSize":1}}"#
                );
                (201, "", body)
            } else if !signed_within_five_minutes(&seen, clock) {
                (
                    403,
                    "InvalidSignatureException",
                    r#"{"message":"Signature expired"}"#.to_owned(),
                )
            } else {
                let reply = self.script.lock().unwrap().pop_front().unwrap_or(CREATED);
                let body = if reply.message.is_empty() {
                    String::new()
                } else {
                    format!(r#"{{"message":"{}"}}"#, reply.message)
                };
                (reply.status, reply.error, body)
            };
            self.seen.lock().unwrap().push(seen);
            let mut head = format!(
                "HTTP/1.1 {status} X\r\nDate: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
                httpdate::fmt_http_date(clock),
                body.len()
            );
            if !error.is_empty() {
                head.push_str(&format!(
                    "x-amzn-ErrorType: {error}:http://internal.amazon.com/\r\n"
                ));
            }
            if stream
                .write_all(format!("{head}\r\n{body}").as_bytes())
                .is_err()
            {
                return;
            }
        }
    }

    fn puts(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.method == "PUT")
            .cloned()
            .collect()
    }
}

fn signed_within_five_minutes(seen: &Seen, clock: SystemTime) -> bool {
    let Some(date) = seen.header("x-amz-date") else {
        return false;
    };
    let Ok(signed) = time_of_amz_date(date) else {
        return false;
    };
    let apart = clock
        .duration_since(signed)
        .unwrap_or_else(|e| e.duration());
    apart < Duration::from_secs(300)
}

/// `20261204T125000Z` as a time.
fn time_of_amz_date(d: &str) -> Result<SystemTime, String> {
    let n = |r: std::ops::Range<usize>| {
        d.get(r)
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or("bad date")
    };
    let (y, mo, day) = (n(0..4)?, n(4..6)?, n(6..8)?);
    let (h, mi, s) = (n(9..11)?, n(11..13)?, n(13..15)?);
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let text = format!(
        "Mon, {day:02} {} {y} {h:02}:{mi:02}:{s:02} GMT",
        months[(mo - 1) as usize]
    );
    // httpdate checks the weekday too; try each.
    ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
        .iter()
        .find_map(|w| httpdate::parse_http_date(&text.replacen("Mon", w, 1)).ok())
        .ok_or_else(|| format!("bad date {d}"))
}

fn images(url: &str, credentials: SharedCredentialsProvider) -> AwsImages {
    let config = aws_config::SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("eu-west-1"))
        .credentials_provider(credentials)
        .endpoint_url(url)
        .build();
    AwsImages::new(&config)
}

fn static_credentials() -> SharedCredentialsProvider {
    SharedCredentialsProvider::new(Credentials::new(
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        Some("session/token+with=odd chars".into()),
        None,
        "test",
    ))
}

fn spec() -> StartSpec {
    StartSpec {
        volume_size_gib: 1,
        description: "d".into(),
        tags: Vec::new(),
        client_token: "t".into(),
        encrypted: false,
        kms_key_arn: None,
        timeout_minutes: 60,
    }
}

const CHECKSUM: &str = "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=";

async fn started(endpoint: &Endpoint, credentials: SharedCredentialsProvider) -> AwsImages {
    let images = images(&endpoint.url, credentials);
    assert_eq!(images.start(&spec()).await.unwrap(), SNAPSHOT);
    images
}

/// Starts a snapshot at `endpoint` and puts block `index` of it.
async fn start_and_put(endpoint: &Endpoint, index: i32) -> Result<(), AwsError> {
    started(endpoint, static_credentials())
        .await
        .put_block(SNAPSHOT, index, block(), CHECKSUM.into())
        .await
}

fn block() -> Bytes {
    Bytes::from(vec![7u8; 512 * 1024])
}

#[tokio::test]
async fn a_block_is_signed_as_botocore_signs_it() {
    let endpoint = Endpoint::start(&[], Duration::ZERO);
    start_and_put(&endpoint, 17).await.unwrap();
    let puts = endpoint.puts();
    assert_eq!(puts.len(), 1);
    let put = &puts[0];
    assert_eq!(put.path, format!("/snapshots/{SNAPSHOT}/blocks/17"));
    assert_eq!(put.body, block().to_vec());
    assert_eq!(put.header("x-amz-checksum"), Some(CHECKSUM));
    assert_eq!(put.header("x-amz-checksum-algorithm"), Some("SHA256"));
    assert_eq!(put.header("x-amz-data-length"), Some("524288"));
    assert_eq!(put.header("content-length"), Some("524288"));
    // Set once: the HTTP client must not add a second one to the one that was signed.
    let lengths = put
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"));
    assert_eq!(lengths.count(), 1, "{put:?}");
    // Without this signed header EBS hashes the body to check the signature, and refuses
    // every block (awslabs/aws-sdk-rust #930).
    assert_eq!(put.header("x-amz-content-sha256"), Some("UNSIGNED-PAYLOAD"));
    assert_eq!(
        put.header("x-amz-security-token"),
        Some("session/token+with=odd chars")
    );
    assert!(
        put.header("user-agent")
            .is_some_and(|u| u.starts_with("amictl/")),
        "sent by the block writer, not the SDK client: {put:?}"
    );
    // The host that was signed (the URL's, port included) is the one the request carried.
    assert_eq!(put.header("host"), endpoint.url.strip_prefix("http://"));
    let authorization = put.header("authorization").unwrap();
    assert!(
        authorization.contains("/eu-west-1/ebs/aws4_request"),
        "{authorization}"
    );

    // botocore signs the same operation: given only the operation's own headers, the time
    // and an unsigned payload, it adds the headers signing needs (date, token, payload) and
    // signs; headers and signature must come out the same.
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let has_botocore = Command::new(&python)
        .args(["-c", "import botocore"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_botocore {
        assert!(
            std::env::var_os("AMICTL_REQUIRE_MOTO").is_none_or(|v| v != "1"),
            "botocore is needed to check the signature (it comes with moto)"
        );
        eprintln!("skipped the signature check: no botocore");
        return;
    }
    let signed_headers: Vec<&str> = authorization
        .split("SignedHeaders=")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .split(';')
        .collect();
    let added_by_signing = [
        "host",
        "x-amz-date",
        "x-amz-security-token",
        "x-amz-content-sha256",
    ];
    let operation_headers: Vec<(String, String)> = signed_headers
        .iter()
        .filter(|h| !added_by_signing.contains(h))
        .map(|h| (h.to_string(), put.header(h).unwrap().to_owned()))
        .collect();
    let script = r#"
import json, sys
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
args = json.loads(sys.argv[1])
request = AWSRequest(method="PUT", url=args["url"], headers=dict(args["headers"]))
request.context["timestamp"] = args["amz_date"]
request.context["payload_signing_enabled"] = False
auth = SigV4Auth(Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", args["token"]), "ebs", "eu-west-1")
auth._modify_request_before_signing(request)
canonical = auth.canonical_request(request)
print(auth.signed_headers(auth.headers_to_sign(request)))
print(auth.signature(auth.string_to_sign(request, canonical), request))
print(json.dumps({k.lower(): v for k, v in request.headers.items()}))
"#;
    let args = serde_json::json!({
        "url": format!("{}{}", endpoint.url, put.path),
        "headers": operation_headers,
        "amz_date": put.header("x-amz-date").unwrap(),
        "token": "session/token+with=odd chars",
    });
    let out = Command::new(&python)
        .args(["-c", script, &args.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = String::from_utf8(out.stdout).unwrap();
    let mut lines = out.lines();
    assert_eq!(lines.next().unwrap(), signed_headers.join(";"));
    let expected = lines.next().unwrap();
    assert!(
        authorization.ends_with(&format!("Signature={expected}")),
        "botocore signs {expected}, amictl sent {authorization}"
    );
    let botocore: std::collections::BTreeMap<String, String> =
        serde_json::from_str(lines.next().unwrap()).unwrap();
    for (name, value) in &botocore {
        assert_eq!(put.header(name), Some(value.as_str()), "{name}");
    }
}

#[tokio::test]
async fn throttling_and_server_faults_are_retried_until_the_block_lands() {
    let endpoint = Endpoint::start(
        &[
            Reply {
                status: 503,
                error: "",
                message: "",
            },
            Reply {
                status: 400,
                error: "RequestThrottledException",
                message: "slow down",
            },
            Reply {
                status: 500,
                error: "InternalServerException",
                message: "oops",
            },
        ],
        Duration::ZERO,
    );
    start_and_put(&endpoint, 3).await.unwrap();
    let puts = endpoint.puts();
    assert_eq!(puts.len(), 4, "three failures, then the block");
    // A transient error closes its connection, so the retry can reach another host (the
    // SDK's connection poisoning); a throttled one keeps it.
    let connections: Vec<usize> = puts.iter().map(|p| p.connection).collect();
    assert_ne!(connections[0], connections[1], "{connections:?}");
    assert_eq!(connections[1], connections[2], "{connections:?}");
    assert_ne!(connections[2], connections[3], "{connections:?}");
    assert!(puts.iter().all(|p| p.body == block().to_vec()
        && p.path.ends_with("/blocks/3")
        && p.header("x-amz-checksum") == Some(CHECKSUM)));
}

#[tokio::test]
async fn a_fault_that_persists_fails_after_the_last_attempt() {
    let fault = Reply {
        status: 503,
        error: "ServiceUnavailable",
        message: "down",
    };
    let endpoint = Endpoint::start(&[fault; 10], Duration::ZERO);
    let err = start_and_put(&endpoint, 0).await.unwrap_err();
    assert_eq!(endpoint.puts().len(), amictl::aws::MAX_ATTEMPTS as usize);
    let text = err.to_string();
    assert!(
        text.contains("ebs:PutSnapshotBlock") && text.contains("down"),
        "{text}"
    );
}

#[tokio::test]
async fn client_faults_fail_at_once_and_say_what_the_service_said() {
    let cases = [
        (400, "ValidationException", "Invalid checksum"),
        (403, "AccessDeniedException", "not allowed"),
        (404, "ResourceNotFoundException", "no such snapshot"),
    ];
    for (status, error, message) in cases {
        let endpoint = Endpoint::start(
            &[Reply {
                status,
                error,
                message,
            }],
            Duration::ZERO,
        );
        let err = start_and_put(&endpoint, 0).await.unwrap_err();
        assert_eq!(endpoint.puts().len(), 1, "{error} is not retried");
        match (error, &err) {
            ("ValidationException", AwsError::Other { action, message: m }) => {
                assert_eq!(*action, "ebs:PutSnapshotBlock");
                assert_eq!(m, "ValidationException: Invalid checksum");
            }
            ("AccessDeniedException", AwsError::Denied { action, message: m }) => {
                assert_eq!(*action, "ebs:PutSnapshotBlock");
                assert_eq!(m, "not allowed");
            }
            // NotFound is what the upload's grace for a fresh snapshot waits out.
            ("ResourceNotFoundException", AwsError::NotFound(m)) => {
                assert!(m.contains("no such snapshot"), "{m}")
            }
            _ => panic!("{error} became {err:?}"),
        }
    }
}

#[tokio::test]
async fn a_clock_an_hour_off_is_corrected_from_the_date_header() {
    // The endpoint's clock is an hour ahead from the start: StartSnapshot's answer says by
    // how much, and the first put is signed on the endpoint's time.
    let endpoint = Endpoint::start(&[], Duration::from_secs(3600));
    start_and_put(&endpoint, 1).await.unwrap();
    let puts = endpoint.puts();
    assert_eq!(puts.len(), 1, "{puts:?}");
    let signed = time_of_amz_date(puts[0].header("x-amz-date").unwrap()).unwrap();
    let ahead = signed.duration_since(SystemTime::now()).unwrap();
    assert!(ahead > Duration::from_secs(3500), "{ahead:?}");

    // It jumps an hour after StartSnapshot: the first put is refused as expired, its Date
    // header tells the new skew, and the retry is accepted.
    let endpoint = Endpoint::start_with(&[], Duration::from_secs(3600), false);
    start_and_put(&endpoint, 1).await.unwrap();
    let puts = endpoint.puts();
    assert_eq!(puts.len(), 2, "refused once, then accepted: {puts:?}");
}

/// Credentials that expire at once, each time with a new key id.
#[derive(Debug, Default)]
struct Rotating {
    issued: Mutex<u32>,
}

impl ProvideCredentials for Rotating {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        let mut issued = self.issued.lock().unwrap();
        *issued += 1;
        future::ProvideCredentials::ready(Ok(Credentials::new(
            format!("AKID{}", *issued),
            "secret",
            None,
            Some(SystemTime::now() + Duration::from_secs(1)),
            "rotating",
        )))
    }
}

#[tokio::test]
async fn expiring_credentials_are_renewed_through_the_sdk_identity_cache() {
    let endpoint = Endpoint::start(&[], Duration::ZERO);
    let rotating = Arc::new(Rotating::default());
    let provider = SharedCredentialsProvider::new(RotatingHandle(rotating.clone()));
    let images = started(&endpoint, provider).await;
    let after_start = *rotating.issued.lock().unwrap();
    for index in 0..2 {
        images
            .put_block(SNAPSHOT, index, block(), CHECKSUM.into())
            .await
            .unwrap();
    }
    let keys: Vec<String> = endpoint
        .puts()
        .iter()
        .map(|p| {
            let a = p.header("authorization").unwrap();
            a.split("Credential=")
                .nth(1)
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    let issued = *rotating.issued.lock().unwrap();
    assert!(
        issued >= after_start + 2,
        "issued {issued}, {after_start} at start"
    );
    assert_eq!(keys.len(), 2);
    assert_ne!(
        keys[0], keys[1],
        "each put asked for fresh credentials: {keys:?}"
    );
    assert_eq!(keys[1], format!("AKID{issued}"));
}

#[derive(Debug)]
struct RotatingHandle(Arc<Rotating>);

impl ProvideCredentials for RotatingHandle {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        self.0.provide_credentials()
    }
}

#[tokio::test]
async fn without_start_a_block_goes_through_the_sdk_client() {
    let endpoint = Endpoint::start(&[], Duration::ZERO);
    let images = images(&endpoint.url, static_credentials());
    images
        .put_block(SNAPSHOT, 2, block(), CHECKSUM.into())
        .await
        .unwrap();
    let puts = endpoint.puts();
    assert_eq!(puts.len(), 1);
    assert!(
        puts[0]
            .header("user-agent")
            .is_some_and(|u| u.contains("aws-sdk-rust")),
        "{:?}",
        puts[0]
    );
    assert_eq!(puts[0].body, block().to_vec());
}
