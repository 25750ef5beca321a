//! A moto server on a free loopback port, for tests that drive the real AWS SDK clients.
//!
//! Without `moto_server` on PATH the tests that need it skip themselves (the Nix sandbox
//! has none), unless `AMICTL_REQUIRE_MOTO=1`, which CI sets so a missing moto fails loudly.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Moto {
    child: Child,
    pub endpoint: String,
    /// An empty XDG cache for the amictl processes of this test.
    pub cache: tempfile::TempDir,
}

impl Moto {
    /// Starts moto, or returns None when the test should be skipped.
    pub fn start() -> Option<Moto> {
        let available = Command::new("moto_server")
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !available {
            if std::env::var_os("AMICTL_REQUIRE_MOTO").is_some_and(|v| v == "1") {
                panic!("moto_server is not installed (pip install 'moto[server]') and AMICTL_REQUIRE_MOTO=1");
            }
            eprintln!("skipped: moto_server is not installed (pip install 'moto[server]')");
            return None;
        }
        // moto binds its port itself, so the port is chosen below the kernel's ephemeral
        // range, where no outgoing connection of a parallel test can be given it meanwhile;
        // and a moto that exits before it answers (the port was taken) is started again on
        // the next one.
        let (child, port) = (0..8)
            .find_map(|_| {
                let port = next_port();
                let mut child = Command::new("moto_server")
                    .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start moto_server");
                let deadline = Instant::now() + Duration::from_secs(30);
                while TcpStream::connect(("127.0.0.1", port)).is_err() {
                    if child.try_wait().unwrap().is_some() {
                        return None;
                    }
                    assert!(Instant::now() < deadline, "moto_server did not start");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Some((child, port))
            })
            .expect("moto_server could not bind any of 8 ports");
        Some(Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            cache: tempfile::tempdir().unwrap(),
        })
    }

    /// The environment an amictl process (or an SDK client) needs to reach this moto.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_CONFIG_FILE", "/dev/null".into()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
            ("XDG_CACHE_HOME", self.cache.path().display().to_string()),
        ]
    }

    /// The amictl binary, pointed at this moto.
    pub fn amictl(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_amictl"));
        cmd.envs(self.env()).env("AMICTL_LOG", "info");
        cmd
    }

    /// `amictl image publish --image FILE` of a bare UEFI x86_64 image, its AMI named
    /// `{prefix}…`: exit code, stdout, stderr.
    pub fn publish_bare(
        &self,
        image: &Path,
        prefix: &str,
        extra: &[&str],
    ) -> (i32, String, String) {
        output(
            self.amictl()
                .args(["image", "publish", "--image"])
                .arg(image)
                .args([
                    "--boot-mode",
                    "uefi",
                    "--arch",
                    "x86_64",
                    "--prefix",
                    prefix,
                ])
                .args(extra),
        )
    }

    /// SDK configuration for checking what amictl did.
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_credential_types::Credentials::new(
                "testing", "testing", None, None, "moto",
            ))
            .load()
            .await
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cmd` with stdin closed: its exit code (-1 for a signal), stdout and stderr.
pub fn output(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A sparse raw image: `size` bytes, pseudo-random data at the given (offset, len) spans,
/// holes elsewhere.
pub fn sparse_image(path: &Path, size: u64, spans: &[(u64, usize)]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::create(path).unwrap();
    file.set_len(size).unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for &(offset, len) in spans {
        let data: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect();
        file.write_all_at(&data, offset).unwrap();
    }
}

/// A VPC `10.{net}.0.0/16` with a subnet `10.{net}.{i}.0/24` in each of us-east-1a and
/// us-east-1b; answers the VPC and the (AZ, subnet) pairs.
pub async fn vpc_with_two_azs(
    ec2: &aws_sdk_ec2::Client,
    net: u8,
) -> (String, Vec<(String, String)>) {
    let vpc = ec2
        .create_vpc()
        .cidr_block(format!("10.{net}.0.0/16"))
        .send()
        .await
        .unwrap()
        .vpc
        .unwrap()
        .vpc_id
        .unwrap();
    let mut subnets = Vec::new();
    for (i, az) in ["us-east-1a", "us-east-1b"].into_iter().enumerate() {
        let subnet = ec2
            .create_subnet()
            .vpc_id(&vpc)
            .availability_zone(az)
            .cidr_block(format!("10.{net}.{i}.0/24"))
            .send()
            .await
            .unwrap()
            .subnet
            .unwrap()
            .subnet_id
            .unwrap();
        subnets.push((az.to_owned(), subnet));
    }
    (vpc, subnets)
}

/// An EC2 filter: `name` is any of `values`.
pub fn ec2_filter<S: Into<String>>(
    name: &str,
    values: impl IntoIterator<Item = S>,
) -> aws_sdk_ec2::types::Filter {
    aws_sdk_ec2::types::Filter::builder()
        .name(name)
        .set_values(Some(values.into_iter().map(Into::into).collect()))
        .build()
}

/// The instances EC2 lists for these filters (each must match).
pub async fn instances(
    ec2: &aws_sdk_ec2::Client,
    filters: Vec<aws_sdk_ec2::types::Filter>,
) -> Vec<aws_sdk_ec2::types::Instance> {
    let out = ec2
        .describe_instances()
        .set_filters(Some(filters))
        .send()
        .await
        .unwrap();
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .cloned()
        .collect()
}

/// The instances EC2 lists for a fleet (tag `amictl:fleet`) in any of `states`
/// (`instance-state-name`: pending, running, ...).
pub async fn fleet_instances(
    ec2: &aws_sdk_ec2::Client,
    fleet: &str,
    states: &[&str],
) -> Vec<aws_sdk_ec2::types::Instance> {
    instances(
        ec2,
        vec![
            ec2_filter("tag:amictl:fleet", [fleet]),
            ec2_filter("instance-state-name", states.iter().copied()),
        ],
    )
    .await
}

/// A stack's outputs, key to value.
pub async fn stack_outputs(
    cf: &aws_sdk_cloudformation::Client,
    name: &str,
) -> BTreeMap<String, String> {
    let out = cf.describe_stacks().stack_name(name).send().await.unwrap();
    out.stacks()[0]
        .outputs()
        .iter()
        .map(|o| {
            (
                o.output_key().unwrap().to_owned(),
                o.output_value().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// moto: a stack made or changed through a change set has no outputs (ExecuteChangeSet
/// never builds them; CreateStack and UpdateStack do). An UpdateStack with the same
/// template makes moto build them; AWS has them as soon as the stack is complete.
pub async fn moto_rebuild_outputs(cf: &aws_sdk_cloudformation::Client, name: &str, template: &str) {
    cf.update_stack()
        .stack_name(name)
        .template_body(template)
        .capabilities(aws_sdk_cloudformation::types::Capability::CapabilityNamedIam)
        .send()
        .await
        .unwrap();
}

/// [`moto_rebuild_outputs`] for a stack deployed with parameters: moto's UpdateStack
/// would otherwise fall back to the template's defaults.
pub async fn moto_rebuild_outputs_with(
    cf: &aws_sdk_cloudformation::Client,
    name: &str,
    template: &str,
    parameters: &[(&str, &str)],
) {
    let parameters = parameters.iter().map(|(k, v)| {
        aws_sdk_cloudformation::types::Parameter::builder()
            .parameter_key(*k)
            .parameter_value(*v)
            .build()
    });
    cf.update_stack()
        .stack_name(name)
        .template_body(template)
        .set_parameters(Some(parameters.collect()))
        .capabilities(aws_sdk_cloudformation::types::Capability::CapabilityNamedIam)
        .send()
        .await
        .unwrap();
}

/// A port free a moment ago, between 10000 and the kernel's ephemeral range; each call in
/// this process moves on, starting from an offset of its own.
fn next_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let base = 10_000u16.min(low / 2);
    let span = low - base;
    let start = (std::process::id() % u32::from(span)) as u16 + 1;
    let _ = NEXT.compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst);
    (0..span)
        .map(|_| base + NEXT.fetch_add(1, Ordering::SeqCst) % span)
        .find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("a free port below the ephemeral range")
}
