//! Rollout cost against fleet size, on the simulated cloud's clock: simulated wall time
//! and API calls to roll 2 AZs x N instances onto a new image. A benchmark that prints
//! figures (`bench/rollout.sh`), not a test.

use std::time::Duration;

use amictl::fleet::sim::{Faults, SimCloud};
use amictl::fleet::Placement;
use amictl::rollout::engine::{Effects, Engine, Settings};
use amictl::rollout::plan::Desired;

fn settings(image: &str, per_az: usize, surge: usize) -> Settings {
    let azs = ["az-a", "az-b"];
    Settings {
        fleet: "web".into(),
        desired: Desired {
            image: image.into(),
            placements: azs
                .iter()
                .map(|az| Placement {
                    az: (*az).into(),
                    subnet: format!("subnet-{az}"),
                })
                .collect(),
            specs: azs
                .iter()
                .map(|az| ((*az).to_owned(), "spec".to_owned()))
                .collect(),
            per_az,
            max_surge: surge,
            parallel_azs: false,
        },
        prefix: "b-".into(),
        health: amictl::fleet::Command::Health,
        health_passes: 3,
        health_interval: Duration::from_secs(10),
        step_timeout: Duration::from_secs(900),
        command_timeout: Duration::from_secs(60),
        bake: Duration::ZERO,
        alarms: vec!["web-5xx".into()],
        poll: Duration::from_secs(5),
        scaling: None,
    }
}

/// Rolls a new fleet onto v1, then onto v2 `surge` instances at a time per AZ, and returns
/// the second rollout's simulated seconds and API calls; with `groups`, through the
/// simulated cloud's Auto Scaling groups.
async fn second_rollout(per_az: usize, surge: usize, groups: bool) -> (u64, u64) {
    let cloud = SimCloud::new(1, Faults::default());
    let fx = || Effects {
        compute: &cloud,
        run: &cloud,
        lb: Some(&cloud),
        alarms: &cloud,
        groups: groups.then_some(&cloud),
    };
    Engine::new(fx(), &settings("v1", per_az, per_az), "r1")
        .run()
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    let calls = cloud.calls();
    Engine::new(fx(), &settings("v2", per_az, surge), "r2")
        .run()
        .await
        .unwrap();
    (start.elapsed().as_secs(), cloud.calls() - calls)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    println!("rollout of 2 AZs x N instances on the simulated cloud (boot 20 s, target healthy 15 s, drain 10 s)");
    println!(
        "{:>6} {:>8} {:>12} {:>10}   calls per instance",
        "N/AZ", "surge", "sim time s", "API calls"
    );
    for per_az in [2usize, 10, 50] {
        let surges: std::collections::BTreeSet<usize> = [1, per_az.div_ceil(2), per_az].into();
        for surge in surges {
            let (secs, calls) = rt.block_on(second_rollout(per_az, surge, false));
            println!(
                "{per_az:>6} {surge:>8} {secs:>12} {calls:>10}   {:.1}",
                calls as f64 / (2 * per_az) as f64
            );
        }
    }
    println!();
    println!("the same with Auto Scaling groups (AWS): one group per AZ and release, each made at");
    println!("its full size, gated, attached; the old group held, detached, deleted at the commit");
    println!(
        "{:>6} {:>8} {:>12} {:>10}   calls per instance",
        "N/AZ", "", "sim time s", "API calls"
    );
    for per_az in [2usize, 10, 50] {
        let (secs, calls) = rt.block_on(second_rollout(per_az, per_az, true));
        println!(
            "{per_az:>6} {:>8} {secs:>12} {calls:>10}   {:.1}",
            "groups",
            calls as f64 / (2 * per_az) as f64
        );
    }
    println!();
    println!("surge = instances launched and gated at a time in one AZ: with surge = N, the time");
    println!("barely grows with the fleet (one gate per AZ); the API calls grow linearly. The");
    println!("simulated cloud counts one call per batched operation (a Run Command over 50 ids is");
    println!("one call here; on AWS, polling its results adds one call per instance per poll).");
}
