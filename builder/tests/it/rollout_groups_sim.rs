//! The rollout where each release is one Auto Scaling group per AZ, against the simulated
//! cloud (which keeps each group's capacity as EC2 Auto Scaling does): a group replaces a
//! lost instance with no rollout running, a rollout gates the new group before attaching
//! it, holds and detaches the old one, deletes it only at the commit, and a rollback puts
//! the very same old instances back. Plain instances of earlier amictl are adopted as the
//! old release. Capacity never dips, at any call; a crash anywhere resumes or aborts.

use std::collections::BTreeMap;
use std::time::Duration;

use amictl::fleet::sim::{Faults, SimCloud, BOOT, TARGET_HEALTHY_AFTER};
use amictl::fleet::{Instance, Scaling, TargetState};
use amictl::rollout::engine::{Outcome, RolloutError, Settings};

use super::rollout_sim::{assert_serving_all, crash_anywhere, engine, faults, Fleet, AZS, PER_AZ};

/// The plain-instance rollout's settings: groups are made at their full size (no surge).
fn settings(image: &str, parallel: bool) -> Settings {
    super::rollout_sim::settings(image, PER_AZ, parallel)
}

async fn run(cloud: &SimCloud, s: &Settings, rollout: &str) -> Result<Outcome, RolloutError> {
    engine(cloud, s, rollout, true).run().await
}

/// Plain instances, as amictl made them before releases were groups.
async fn run_plain(cloud: &SimCloud, s: &Settings, rollout: &str) -> Outcome {
    engine(cloud, s, rollout, false).run().await.unwrap()
}

/// The fleet is whole on one image: `per_az[az]` running instances in each AZ, each in
/// the one attached, unheld group of its AZ on that image, registered and healthy, and
/// nothing else registered or left over.
fn assert_whole_in_groups(cloud: &SimCloud, image: &str, per_az: &[usize; 2], ctx: &str) {
    let (live, targets): (Vec<Instance>, BTreeMap<String, TargetState>) = cloud.snapshot();
    let groups = cloud.groups();
    for (az, want) in AZS.iter().zip(per_az) {
        let here: Vec<&Instance> = live.iter().filter(|i| i.az == *az).collect();
        assert_eq!(here.len(), *want, "{ctx}: {az} has {here:?}");
        let in_az: Vec<_> = groups.iter().filter(|(_, g)| g.0 == *az).collect();
        assert_eq!(in_az.len(), 1, "{ctx}: groups in {az}: {in_az:?}");
        let (name, (_, gimage, desired, attached, held)) = in_az[0];
        assert_eq!(gimage, image, "{ctx}: {name}");
        assert_eq!(desired, want, "{ctx}: {name}");
        assert!(
            *attached && !*held,
            "{ctx}: {name} attached {attached} held {held}"
        );
        for i in &here {
            assert_eq!(i.image, image, "{ctx}: mixed images in {az}: {here:?}");
            assert_eq!(i.group.as_deref(), Some(name.as_str()), "{ctx}: {i:?}");
            assert!(i.retiring.is_none(), "{ctx}: retiring left in {az}");
        }
    }
    assert_serving_all(cloud, &live, &targets, ctx);
}

fn ids(cloud: &SimCloud) -> Vec<String> {
    cloud.snapshot().0.into_iter().map(|i| i.id).collect()
}

/// A healthy v1 fleet in groups, established.
async fn v1_fleet(seed: u64) -> SimCloud {
    let cloud = SimCloud::new(seed, Faults::default());
    let out = run(&cloud, &settings("ami-v1", true), "r-v1")
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Done { launched: 4, .. }), "{out:?}");
    assert_whole_in_groups(&cloud, "ami-v1", &[PER_AZ; 2], "v1");
    cloud.establish(PER_AZ, AZS.iter().map(|s| s.to_string()).collect());
    cloud
}

#[tokio::test(start_paused = true)]
async fn a_release_is_a_group_per_az_replaced_by_the_gated_rollout() {
    let cloud = v1_fleet(1).await;
    let s = settings("ami-v2", false);
    let out = run(&cloud, &s, "r-v2").await.unwrap();
    assert_eq!(
        out,
        Outcome::Done {
            launched: 4,
            retired: 2,
            unchanged: false
        }
    );
    assert_whole_in_groups(&cloud, "ami-v2", &[PER_AZ; 2], "v2");
    let names: Vec<String> = cloud.groups().into_keys().collect();
    assert_eq!(names, vec!["t-web-az-a-r-v2", "t-web-az-b-r-v2"]);
    let launches = cloud.launches();
    let out = run(&cloud, &s, "r-v2b").await.unwrap();
    assert_eq!(
        out,
        Outcome::Done {
            launched: 0,
            retired: 0,
            unchanged: true
        }
    );
    assert_eq!(cloud.launches(), launches);
}

#[tokio::test(start_paused = true)]
async fn a_lost_instance_is_replaced_by_its_group_with_no_rollout_running() {
    let cloud = v1_fleet(2).await;
    let before = ids(&cloud);
    let calls = cloud.calls();
    cloud.kill(&before[0]);
    // Only time passes: no API call of amictl's.
    tokio::time::sleep(BOOT + TARGET_HEALTHY_AFTER + Duration::from_secs(1)).await;
    let after = ids(&cloud);
    assert_eq!(cloud.calls(), calls, "no amictl call was made");
    assert!(!after.contains(&before[0]));
    assert_eq!(after.len(), before.len(), "{after:?}");
    // The loss itself is a dip (nothing can prevent that); only that one.
    let v = cloud.violations();
    assert!(v.len() <= 1, "{v:?}");
    let (live, targets) = cloud.snapshot();
    assert!(targets.values().all(|s| *s == TargetState::Healthy));
    assert_eq!(live.len(), 4);
}

#[tokio::test(start_paused = true)]
async fn each_fault_rolls_back_to_exactly_the_old_groups() {
    let faults = faults();
    for (what, f) in faults {
        let cloud = v1_fleet(3).await;
        let before = ids(&cloud);
        let groups_before: Vec<String> = cloud.groups().into_keys().collect();
        cloud.set_faults(f);
        let out = run(&cloud, &settings("ami-v2", false), "r-v2")
            .await
            .unwrap();
        assert!(matches!(out, Outcome::RolledBack { .. }), "{what}: {out:?}");
        cloud.set_faults(Faults::default());
        assert_whole_in_groups(&cloud, "ami-v1", &[PER_AZ; 2], what);
        assert_eq!(
            before,
            ids(&cloud),
            "{what}: the very same instances are back"
        );
        let groups_after: Vec<String> = cloud.groups().into_keys().collect();
        assert_eq!(groups_before, groups_after, "{what}");
    }
}

#[tokio::test(start_paused = true)]
async fn plain_instances_of_earlier_amictl_are_the_old_release() {
    // v1 as earlier amictl made it: plain instances, no groups.
    let cloud = SimCloud::new(5, Faults::default());
    run_plain(&cloud, &settings("ami-v1", true), "r-v1").await;
    assert!(cloud.groups().is_empty());
    cloud.establish(PER_AZ, AZS.iter().map(|s| s.to_string()).collect());
    let plain = ids(&cloud);

    // A failed first rollout in groups puts the same plain instances back.
    cloud.set_faults(Faults {
        bad_image: Some("ami-v2".into()),
        ..Faults::default()
    });
    let out = run(&cloud, &settings("ami-v2", false), "r-v2")
        .await
        .unwrap();
    assert!(matches!(out, Outcome::RolledBack { .. }), "{out:?}");
    cloud.set_faults(Faults::default());
    assert_eq!(ids(&cloud), plain);
    assert!(cloud.groups().is_empty(), "{:?}", cloud.groups());
    let (live, _) = cloud.snapshot();
    assert!(live
        .iter()
        .all(|i| i.retiring.is_none() && i.group.is_none()));

    // A good one replaces them with one group per AZ and terminates them at the commit.
    let out = run(&cloud, &settings("ami-v3", false), "r-v3")
        .await
        .unwrap();
    assert!(
        matches!(
            out,
            Outcome::Done {
                launched: 4,
                retired: 4,
                ..
            }
        ),
        "{out:?}"
    );
    assert_whole_in_groups(&cloud, "ami-v3", &[PER_AZ; 2], "adopted");
    assert!(ids(&cloud).iter().all(|id| !plain.contains(id)));
}

#[tokio::test(start_paused = true)]
async fn a_fleet_that_scaled_out_is_not_shrunk_and_the_bounds_hold() {
    let cloud = SimCloud::new(6, Faults::default());
    let mut s = settings("ami-v1", true);
    s.scaling = Some(Scaling {
        min: 2,
        max: 4,
        target_requests_per_instance: Some(500.0),
    });
    run(&cloud, &s, "r-v1").await.unwrap();
    // Target tracking scaled az-a out to 3.
    cloud.scale("t-web-az-a-r-v1", 3);
    tokio::time::sleep(BOOT + TARGET_HEALTHY_AFTER + Duration::from_secs(1)).await;
    assert_whole_in_groups(&cloud, "ami-v1", &[3, 2], "scaled out");
    cloud.establish(2, AZS.iter().map(|s| s.to_string()).collect());

    s.desired.image = "ami-v2".into();
    run(&cloud, &s, "r-v2").await.unwrap();
    assert_whole_in_groups(&cloud, "ami-v2", &[3, 2], "v2 keeps the scaled-out size");

    // New bounds on the same release change the groups in place: 3 is above a maximum of 2.
    s.scaling = Some(Scaling {
        min: 1,
        max: 2,
        target_requests_per_instance: None,
    });
    let launches = cloud.launches();
    let out = run(&cloud, &s, "r-v2c").await.unwrap();
    assert!(matches!(out, Outcome::Done { launched: 0, .. }), "{out:?}");
    assert_eq!(cloud.launches(), launches);
    assert_whole_in_groups(&cloud, "ami-v2", &[2, 2], "resized");
}

struct InGroups;

impl Fleet for InGroups {
    const GROUPS: bool = true;

    async fn v1(seed: u64) -> SimCloud {
        v1_fleet(seed).await
    }

    fn longest() -> Settings {
        settings("ami-v2", false)
    }

    fn draw(rng: &mut fastrand::Rng) -> (Settings, String) {
        let parallel = rng.bool();
        (settings("ami-v2", parallel), format!("parallel {parallel}"))
    }

    fn assert_whole(cloud: &SimCloud, image: &str, ctx: &str) {
        assert_whole_in_groups(cloud, image, &[PER_AZ; 2], ctx);
    }
}

/// A crash at every call of a clean rollout, then resume or abort, under many seeds; the
/// groups keep working while the rollout's process is dead.
#[tokio::test(start_paused = true)]
async fn crash_anywhere_then_resume_or_abort() {
    crash_anywhere::<InGroups>().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_rollback_needs_attention_and_names_the_groups() {
    let cloud = v1_fleet(4).await;
    cloud.set_faults(Faults {
        bad_image: Some("ami-v2".into()),
        fail_terminate: true,
        ..Faults::default()
    });
    let err = run(&cloud, &settings("ami-v2", false), "r-v2")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, RolloutError::NeedsAttention { .. }), "{text}");
    assert!(
        text.contains("autoscaling:DeleteAutoScalingGroup"),
        "{text}"
    );
    assert!(
        text.contains("group t-web-az-a-r-v2") && text.contains("made by this rollout"),
        "{text}"
    );
    assert!(text.contains("group t-web-az-a-r-v1"), "{text}");
    assert_eq!(cloud.violations(), Vec::<String>::new());
}

#[tokio::test(start_paused = true)]
async fn a_rollout_resumed_after_its_waves_bakes_again_before_it_commits() {
    // Where a clean rollout's bake is: its alarm reads come just before the commit's last
    // few calls (list the groups and instances, delete the two old groups).
    let probe = v1_fleet(7).await;
    let start = probe.calls();
    run(&probe, &settings("ami-v2", false), "r-v2")
        .await
        .unwrap();
    let total = probe.calls() - start;

    let cloud = v1_fleet(7).await;
    let before = ids(&cloud);
    let base = cloud.calls();
    cloud.set_faults(Faults {
        crash_at_call: Some(base + total - 6),
        ..Faults::default()
    });
    let _ = run(&cloud, &settings("ami-v2", false), "r-v2").await;
    assert!(cloud.crashed());
    let held: Vec<bool> = cloud.groups().values().map(|g| g.4).collect();
    assert_eq!(
        held.iter().filter(|h| **h).count(),
        2,
        "crashed in the bake"
    );
    // Resumed, the bake runs again: an alarm now rolls back to the old groups.
    cloud.set_faults(Faults {
        alarm_from_call: Some(0),
        ..Faults::default()
    });
    let out = run(&cloud, &settings("ami-v2", false), "r-v2")
        .await
        .unwrap();
    assert!(matches!(out, Outcome::RolledBack { .. }), "{out:?}");
    cloud.set_faults(Faults::default());
    assert_whole_in_groups(&cloud, "ami-v1", &[PER_AZ; 2], "rolled back in the bake");
    assert_eq!(ids(&cloud), before);
}

#[tokio::test(start_paused = true)]
async fn a_group_not_listed_at_once_is_waited_for() {
    let cloud = v1_fleet(8).await;
    cloud.set_faults(Faults {
        groups_listed_after: Duration::from_secs(30),
        ..Faults::default()
    });
    let out = run(&cloud, &settings("ami-v2", false), "r-v2")
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Done { launched: 4, .. }), "{out:?}");
    cloud.set_faults(Faults::default());
    assert_whole_in_groups(&cloud, "ami-v2", &[PER_AZ; 2], "listed late");
}
