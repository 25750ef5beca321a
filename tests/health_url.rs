//! `amictl health --url`: the agent's own check from outside, against an in-process agent.

use std::path::Path;

use ami_agent::http::{bind, Server, ServerConfig};
use ami_agent::manifest::Manifest;
use ami_agent::site::Site;
use ami_agent::state::AgentState;

async fn health(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(tests::amictl())
        .arg("health")
        .args(args)
        .env("AMICTL_LOG", "warn")
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn site(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("www");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.html"), "<h1>hello</h1>\n").unwrap();
    std::fs::write(root.join("version.txt"), "v1\n").unwrap();
    let manifest = Manifest::from_dir(&root, "v1").unwrap();
    let path = dir.join("manifest.json");
    std::fs::write(&path, manifest.to_json()).unwrap();
    root
}

#[tokio::test(flavor = "multi_thread")]
async fn checks_an_endpoint_from_outside() {
    let dir = tempfile::tempdir().unwrap();
    let root = site(dir.path());
    let manifest = dir.path().join("manifest.json");
    let state = std::sync::Arc::new(AgentState::new(Site::load(&root, None).unwrap()));
    let server = Server::new(state, &ServerConfig::default());
    let acceptor = server
        .spawn_acceptor(bind("127.0.0.1:0".parse().unwrap(), false).unwrap())
        .unwrap();
    let url = format!("http://{}/", acceptor.local_addr());
    let m = manifest.to_str().unwrap();

    let (code, stdout, stderr) = health(&["--url", &url, "--manifest", m]).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let row = stdout.lines().nth(1).unwrap();
    assert!(row.starts_with(&url), "{stdout}");
    assert!(
        row.contains("healthy") && row.contains("v1") && row.contains("2/2 ok"),
        "{stdout}"
    );

    // Content that differs from the manifest is unhealthy (2), with the file named.
    let other = tempfile::tempdir().unwrap();
    let other_root = site(other.path());
    std::fs::write(other_root.join("version.txt"), "v2\n").unwrap();
    let wanted = other.path().join("manifest.json");
    std::fs::write(
        &wanted,
        Manifest::from_dir(&other_root, "v1").unwrap().to_json(),
    )
    .unwrap();
    let w = wanted.to_str().unwrap();
    let (code, stdout, _) = health(&["--url", &url, "--manifest", w, "--json"]).await;
    assert_eq!(code, 2, "{stdout}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["status"], "unhealthy");
    assert_eq!(json["instances"][0]["report"]["files_ok"], 1);
    assert!(json["instances"][0]["detail"]
        .as_str()
        .unwrap()
        .contains("/version.txt"));

    // Nothing listening: unhealthy.
    drop(acceptor);
    let dead = format!("http://127.0.0.1:{}/", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    });
    let (code, stdout, _) = health(&["--url", &dead, "--timeout", "2"]).await;
    assert_eq!(code, 2, "{stdout}");
    assert!(stdout.contains("does not answer"), "{stdout}");

    // --fleet and --url do not mix; one of them is needed. A usage error is "unknown" (3):
    // 2 would tell a monitoring job the service is unhealthy.
    assert_eq!(health(&["--url", &url, "--fleet", "web"]).await.0, 3);
    assert_eq!(health(&[]).await.0, 3);
}
