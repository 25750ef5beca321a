//! `amictl image publish` end to end against moto, through the real SDK clients.

use crate::common;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;

use common::moto::{sparse_image, Moto};

const BLOCK: u64 = 524_288;

fn publish(moto: &Moto, image: &std::path::Path, extra: &[&str]) -> (i32, String, String) {
    moto.publish_bare(image, "test-", extra)
}

/// ListSnapshotBlocks over plain HTTP: moto answers BlockIndex as a JSON string, which
/// the SDK's strict deserializer refuses (AWS answers a number).
async fn list_snapshot_blocks(moto: &Moto, snapshot_id: &str) -> Vec<(i32, String)> {
    let url = format!("{}/snapshots/{snapshot_id}/blocks", moto.endpoint);
    let text = reqwest::Client::new()
        .get(url)
        .header(
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/ebs/aws4_request",
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    body["Blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let index = match &b["BlockIndex"] {
                serde_json::Value::String(s) => s.parse().unwrap(),
                v => v.as_i64().unwrap() as i32,
            };
            (
                index,
                b["BlockToken"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Each listed block of the snapshot equals the image's block (the last one padded with
/// zeros); a block not listed must be all zeros in the image.
async fn assert_blocks_equal_image(
    moto: &Moto,
    snapshot_id: &str,
    image: &std::path::Path,
    size: u64,
    listed: &[(i32, String)],
) {
    let config = moto.sdk_config().await;
    let ebs = aws_sdk_ebs::Client::new(&config);
    let file = std::fs::File::open(image).unwrap();
    for index in 0..size.div_ceil(BLOCK) {
        let mut expected = vec![0u8; BLOCK as usize];
        let len = (size - index * BLOCK).min(BLOCK) as usize;
        file.read_exact_at(&mut expected[..len], index * BLOCK)
            .unwrap();
        match listed.iter().find(|(i, _)| *i == index as i32) {
            Some((_, token)) => {
                let got = ebs
                    .get_snapshot_block()
                    .snapshot_id(snapshot_id)
                    .block_index(index as i32)
                    .block_token(token)
                    .send()
                    .await
                    .unwrap();
                let data = got.block_data.collect().await.unwrap().into_bytes();
                assert_eq!(data.len(), BLOCK as usize, "block {index}");
                assert!(data == expected, "block {index} differs");
            }
            None => assert!(
                expected.iter().all(|&b| b == 0),
                "block {index} has data but was not uploaded"
            ),
        }
    }
}

async fn own_snapshots(ec2: &aws_sdk_ec2::Client) -> Vec<aws_sdk_ec2::types::Snapshot> {
    ec2.describe_snapshots()
        .owner_ids("self")
        .send()
        .await
        .unwrap()
        .snapshots()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn publishes_every_block_of_a_sparse_image_and_only_once() {
    let Some(moto) = Moto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    // 40 MiB with data in three places (one across a block boundary, one in the last,
    // short block), holes elsewhere, and a written all-zero block.
    let size = 80 * BLOCK + 1000;
    sparse_image(
        &image,
        size,
        &[(4096, 10_000), (7 * BLOCK - 100, 300), (80 * BLOCK, 1000)],
    );
    std::fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .write_all_at(&vec![0u8; BLOCK as usize], 20 * BLOCK)
        .unwrap();

    let (code, stdout, stderr) = publish(&moto, &image, &[]);
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "stdout must hold only the AMI id: {stdout:?}"
    );
    let ami_id = lines[0].to_owned();
    assert!(ami_id.starts_with("ami-"), "{stdout}");

    let config = moto.sdk_config().await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let images = ec2
        .describe_images()
        .image_ids(&ami_id)
        .send()
        .await
        .unwrap();
    let ami = &images.images()[0];
    let tags: BTreeMap<_, _> = ami
        .tags()
        .iter()
        .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
        .collect();
    let digest = amictl::image::digest::digest_file(&image).unwrap();
    assert_eq!(
        tags["amictl:image-digest"],
        format!("sha256-blocks-512k:{digest}")
    );
    assert_eq!(tags["amictl:managed-by"], "amictl");
    assert!(ami.name().unwrap().starts_with("test-nixos-x86_64-linux-"));
    assert!(ami.name().unwrap().ends_with(&digest[..12]));
    let snapshot_id = tags["amictl:snapshot-id"].clone();

    // Every block of the image is in the snapshot, holes and zero blocks as zeros, so a
    // volume made from it reads back the image whether or not it is encrypted.
    let listed = list_snapshot_blocks(&moto, &snapshot_id).await;
    assert_blocks_equal_image(&moto, &snapshot_id, &image, size, &listed).await;
    // (moto lists blocks in the order they arrived; AWS in index order.)
    let mut indices: Vec<i32> = listed.iter().map(|(i, _)| *i).collect();
    indices.sort();
    assert_eq!(indices, (0..=80).collect::<Vec<_>>());
    assert!(!tags.contains_key("amictl:sparse"));
    let snapshots_after_first = own_snapshots(&ec2).await.len();

    // Again: the same AMI, nothing uploaded (the digest is remembered), nothing created.
    let (code, stdout, stderr) = publish(&moto, &image, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), ami_id);
    assert!(stderr.contains("nothing uploaded"), "{stderr}");
    assert_eq!(own_snapshots(&ec2).await.len(), snapshots_after_first);

    // Without the local memory it uploads, finds the twin by digest, and deletes its copy.
    let (code, stdout, stderr) = publish(&moto, &image, &["--no-cache"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), ami_id);
    assert_eq!(own_snapshots(&ec2).await.len(), snapshots_after_first);

    // A different image never reuses the old AMI.
    std::fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .write_all_at(b"changed", 30 * BLOCK)
        .unwrap();
    let (code, stdout, stderr) = publish(&moto, &image, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_ne!(stdout.trim(), ami_id);
}

/// `--omit-zero-blocks`: a sparse snapshot with only the data blocks, tagged so on the
/// snapshot and the AMI; refused with --encrypted, and where the account encrypts new
/// volumes by default, before anything is created.
#[tokio::test(flavor = "multi_thread")]
async fn omit_zero_blocks_is_opt_in_tagged_and_refused_where_volumes_are_encrypted() {
    let Some(moto) = Moto::start() else { return };
    let config = moto.sdk_config().await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let size = 24 * BLOCK;
    sparse_image(&image, size, &[(100, 1000), (10 * BLOCK, 10)]);
    let snapshots_before = own_snapshots(&ec2).await.len();

    let (code, _, stderr) = publish(&moto, &image, &["--omit-zero-blocks", "--encrypted"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("drop --omit-zero-blocks"), "{stderr}");

    ec2.enable_ebs_encryption_by_default().send().await.unwrap();
    let (code, _, stderr) = publish(&moto, &image, &["--omit-zero-blocks"]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("encrypts new EBS volumes by default")
            && stderr.contains("without --omit-zero-blocks"),
        "{stderr}"
    );
    assert_eq!(own_snapshots(&ec2).await.len(), snapshots_before);
    ec2.disable_ebs_encryption_by_default()
        .send()
        .await
        .unwrap();

    let (code, stdout, stderr) = publish(&moto, &image, &["--omit-zero-blocks"]);
    assert_eq!(code, 0, "{stderr}");
    let ami_id = stdout.trim().to_owned();
    let ami = ec2
        .describe_images()
        .image_ids(&ami_id)
        .send()
        .await
        .unwrap();
    let ami = &ami.images()[0];
    let tags: BTreeMap<_, _> = ami
        .tags()
        .iter()
        .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
        .collect();
    assert_eq!(tags.get("amictl:sparse").map(String::as_str), Some("true"));
    assert!(ami.name().unwrap().ends_with("-sparse"), "{:?}", ami.name());
    let snapshot_id = tags["amictl:snapshot-id"].clone();
    let snapshot = ec2
        .describe_snapshots()
        .snapshot_ids(&snapshot_id)
        .send()
        .await
        .unwrap();
    assert!(snapshot.snapshots()[0]
        .tags()
        .iter()
        .any(|t| t.key() == Some("amictl:sparse") && t.value() == Some("true")));
    let listed = list_snapshot_blocks(&moto, &snapshot_id).await;
    let mut indices: Vec<i32> = listed.iter().map(|(i, _)| *i).collect();
    indices.sort();
    assert_eq!(indices, [0, 10]);
    assert_blocks_equal_image(&moto, &snapshot_id, &image, size, &listed).await;

    // The default publish of the same image does not take the sparse AMI for its own.
    let (code, stdout, stderr) = publish(&moto, &image, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_ne!(stdout.trim(), ami_id);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_creates_nothing() {
    let Some(moto) = Moto::start() else { return };
    let config = moto.sdk_config().await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let snapshots_before = own_snapshots(&ec2).await.len();
    let images_before = ec2
        .describe_images()
        .owners("self")
        .send()
        .await
        .unwrap()
        .images()
        .len();
    let dir = tempfile::tempdir().unwrap();
    let qcow = dir.path().join("disk.qcow2");
    std::fs::write(&qcow, b"QFI\xfb\0\0\0\x03 rest of a qcow2 header").unwrap();
    let (code, _, stderr) = publish(&moto, &qcow, &[]);
    assert_ne!(code, 0);
    assert!(stderr.contains("amazonImage.format = \"raw\""), "{stderr}");

    let out = moto
        .amictl()
        .args(["image", "publish"])
        .arg(dir.path().join("result"))
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));

    let result = dir.path().join("res");
    std::fs::create_dir_all(result.join("nix-support")).unwrap();
    std::fs::write(
        result.join("nix-support/image-info.json"),
        r#"{"boot_mode":"uefi","system":"x86_64-linux","disks":{"boot":{"file":"/b"}}}"#,
    )
    .unwrap();
    let out = moto
        .amictl()
        .args(["image", "publish"])
        .arg(&result)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no root disk"));

    // No credentials: the standard chain is named, nothing is created.
    let raw = dir.path().join("disk.raw");
    sparse_image(&raw, 4 * BLOCK, &[(0, 100)]);
    let out = moto
        .amictl()
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .args(["image", "publish", "--image"])
        .arg(&raw)
        .args(["--boot-mode", "uefi", "--arch", "x86_64"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no AWS credentials") && err.contains("standard chain"),
        "{err}"
    );

    assert_eq!(own_snapshots(&ec2).await.len(), snapshots_before);
    assert_eq!(
        ec2.describe_images()
            .owners("self")
            .send()
            .await
            .unwrap()
            .images()
            .len(),
        images_before
    );
}

/// A proxy in front of moto that stops answering block uploads after `allow` of them, the
/// way a network or an endpoint dies mid-upload; everything else passes through.
async fn dying_proxy(upstream: String, allow: usize) -> String {
    use http_body_util::{BodyExt, Full};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let puts = std::sync::Arc::new(AtomicUsize::new(0));
    let client = reqwest::Client::new();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (upstream, puts, client) = (upstream.clone(), puts.clone(), client.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (upstream, puts, client) =
                            (upstream.clone(), puts.clone(), client.clone());
                        async move {
                            let is_put = req.method() == hyper::Method::PUT
                                && req.uri().path().contains("/blocks/");
                            if is_put && puts.fetch_add(1, Ordering::SeqCst) >= allow {
                                return Err("endpoint gone");
                            }
                            let url = format!(
                                "{upstream}{}",
                                req.uri()
                                    .path_and_query()
                                    .map(|p| p.as_str())
                                    .unwrap_or("/")
                            );
                            let mut forward = client.request(req.method().clone(), url);
                            for (k, v) in req.headers() {
                                if k != hyper::header::HOST {
                                    forward = forward.header(k, v);
                                }
                            }
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map_err(|_| "body")?
                                .to_bytes();
                            let answer = forward.body(body).send().await.map_err(|_| "upstream")?;
                            let mut out =
                                hyper::Response::builder().status(answer.status().as_u16());
                            for (k, v) in answer.headers() {
                                out = out.header(k.as_str(), v.as_bytes());
                            }
                            let bytes = answer.bytes().await.map_err(|_| "upstream body")?;
                            Ok(out.body(Full::new(bytes)).unwrap())
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_dying_mid_upload_leaves_nothing_behind() {
    let Some(moto) = Moto::start() else { return };
    let config = moto.sdk_config().await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let snapshots_before = own_snapshots(&ec2).await.len();
    let images_before = ec2
        .describe_images()
        .owners("self")
        .send()
        .await
        .unwrap()
        .images()
        .len();

    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    sparse_image(&image, 64 * BLOCK, &[(0, 64 * BLOCK as usize)]);
    let proxy = dying_proxy(moto.endpoint.clone(), 10).await;
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = moto.amictl();
        cmd.env("AWS_ENDPOINT_URL", proxy)
            .args(["image", "publish", "--image"])
            .arg(&image)
            .args([
                "--boot-mode",
                "uefi",
                "--arch",
                "x86_64",
                "--concurrency",
                "4",
            ]);
        (cmd.output().unwrap(), moto)
    })
    .await
    .unwrap();
    let (out, _moto) = out;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty(), "no AMI id may be printed");
    assert!(
        stderr.contains("uploading block") && stderr.contains("deleted snapshot snap-"),
        "{stderr}"
    );
    assert_eq!(
        own_snapshots(&ec2).await.len(),
        snapshots_before,
        "a snapshot was left behind"
    );
    assert_eq!(
        ec2.describe_images()
            .owners("self")
            .send()
            .await
            .unwrap()
            .images()
            .len(),
        images_before
    );
}
