//! The health loop in-process, with a recording notifier: listener rebinding and the
//! READY/WATCHDOG protocol decided by self-check outcomes.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use ami_agent::health::{HealthConfig, HealthLoop, Listener, ServerListener};
use ami_agent::http::{bind, Server, ServerConfig};
use ami_agent::notify::Notice;
use ami_agent::site::Site;
use ami_agent::state::AgentState;
use common::*;

fn start(
    site: &TestSite,
) -> (
    HealthLoop<Recorder, ServerListener>,
    Recorder,
    Arc<AgentState>,
) {
    let state = Arc::new(AgentState::new(
        Site::load(&site.root, Some(site.manifest.clone())).unwrap(),
    ));
    let server = Server::new(state.clone(), &ServerConfig::default());
    let listener = ServerListener::new(
        server,
        bind("127.0.0.1:0".parse().unwrap(), false).unwrap(),
        false,
    )
    .unwrap();
    let recorder = Recorder::default();
    let health = HealthLoop::new(
        state.clone(),
        site.root.clone(),
        recorder.clone(),
        listener,
        HealthConfig::default(),
    )
    .unwrap();
    (health, recorder, state)
}

#[tokio::test]
async fn ready_once_then_watchdog_after_each_passing_check() {
    let site = test_site();
    let (mut health, recorder, state) = start(&site);
    assert!(health.tick().await.ok);
    let notices = recorder.take();
    assert_eq!(notices[0], Notice::Ready);
    assert!(notices.contains(&Notice::Watchdog));
    assert!(health.tick().await.ok);
    let notices = recorder.take();
    assert!(!notices.contains(&Notice::Ready));
    assert!(notices.contains(&Notice::Watchdog));
    assert_eq!(state.health().status, ami_agent::state::HealthStatus::Ok);
}

#[tokio::test]
async fn a_dead_listener_is_bound_again() {
    let site = test_site();
    let (mut health, recorder, state) = start(&site);
    let addr = health.listener().local_addr();
    assert!(health.tick().await.ok);
    recorder.take();

    // The accept loop dies: nothing answers on the port any more.
    health.listener().acceptor().stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());

    let check = health.tick().await;
    assert!(check.ok, "{check:?}");
    assert!(recorder.take().contains(&Notice::Watchdog));
    assert_eq!(health.listener().local_addr(), addr);
    assert!(health.listener().is_alive());
    assert_eq!(
        get(addr, "GET", "/version.txt", &[]).await.body,
        VERSION.as_bytes()
    );
    assert!(state
        .metrics
        .encode()
        .contains("ami_agent_listener_rebinds_total 1"));
}

#[tokio::test]
async fn an_unhealable_root_withholds_the_watchdog() {
    let site = test_site();
    let (mut health, recorder, state) = start(&site);
    assert!(health.tick().await.ok);
    recorder.take();
    std::fs::remove_file(site.root.join("index.html")).unwrap();
    std::fs::create_dir(site.root.join("index.html")).unwrap();
    let check = health.tick().await;
    assert!(!check.ok);
    assert!(check.error.unwrap().contains("cannot heal index.html"));
    let notices = recorder.take();
    assert!(!notices.contains(&Notice::Watchdog), "{notices:?}");
    assert!(matches!(&notices[..], [Notice::Status(s)] if s.contains("failing")));
    assert_eq!(
        state.health().status,
        ami_agent::state::HealthStatus::Failing
    );
    assert!(state
        .metrics
        .encode()
        .contains("ami_agent_self_check_failures_total 1"));

    std::fs::remove_dir(site.root.join("index.html")).unwrap();
    let check = health.tick().await;
    assert!(check.ok);
    assert_eq!(
        std::fs::read(site.root.join("index.html")).unwrap(),
        INDEX.as_bytes()
    );
    assert_eq!(
        state.health().status,
        ami_agent::state::HealthStatus::Degraded
    );
}
