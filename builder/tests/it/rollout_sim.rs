//! The rollout engine against the simulated cloud, over many seeds: injected faults, a
//! crash at any call followed by a resume or an abort. After every run: capacity never
//! dipped, nothing is orphaned, and the fleet is all-new or all-old.

use std::collections::BTreeMap;
use std::time::Duration;

use amictl::fleet::sim::{Faults, SimCloud};
use amictl::fleet::{Instance, Placement, TargetState};
use amictl::rollout::engine::{Effects, Engine, Outcome, RolloutError, Settings};
use amictl::rollout::journal::{resolve, Resolution};
use amictl::rollout::plan::Desired;

pub(crate) const AZS: [&str; 2] = ["az-a", "az-b"];
pub(crate) const PER_AZ: usize = 2;

pub(crate) fn settings(image: &str, surge: usize, parallel: bool) -> Settings {
    Settings {
        fleet: "web".into(),
        desired: Desired {
            image: image.into(),
            placements: AZS
                .iter()
                .map(|az| Placement {
                    az: (*az).into(),
                    subnet: format!("subnet-{az}"),
                })
                .collect(),
            specs: AZS
                .iter()
                .map(|az| ((*az).to_owned(), "spec-1".to_owned()))
                .collect(),
            per_az: PER_AZ,
            max_surge: surge,
            parallel_azs: parallel,
        },
        prefix: "t-".into(),
        health: amictl::fleet::Command::Health,
        health_passes: 2,
        health_interval: Duration::from_secs(5),
        step_timeout: Duration::from_secs(300),
        command_timeout: Duration::from_secs(30),
        bake: Duration::from_secs(60),
        alarms: vec!["web-5xx".into()],
        poll: Duration::from_secs(5),
        scaling: None,
    }
}

/// The simulated cloud as every effect of the engine; with `groups`, releases are Auto
/// Scaling groups.
pub(crate) fn engine<'a>(
    cloud: &'a SimCloud,
    s: &'a Settings,
    rollout: &str,
    groups: bool,
) -> Engine<'a, SimCloud, SimCloud, SimCloud, SimCloud, SimCloud> {
    let fx = Effects {
        compute: cloud,
        run: cloud,
        lb: Some(cloud),
        alarms: cloud,
        groups: groups.then_some(cloud),
    };
    Engine::new(fx, s, rollout)
}

async fn run(cloud: &SimCloud, s: &Settings, rollout: &str) -> Result<Outcome, RolloutError> {
    engine(cloud, s, rollout, false).run().await
}

/// The fleet is whole on one image: PER_AZ running instances per AZ, none retiring, each
/// registered and healthy, nothing else registered.
fn assert_whole(cloud: &SimCloud, image: &str, ctx: &str) {
    let (live, targets): (Vec<Instance>, BTreeMap<String, TargetState>) = cloud.snapshot();
    for az in AZS {
        let here: Vec<&Instance> = live.iter().filter(|i| i.az == az).collect();
        assert_eq!(here.len(), PER_AZ, "{ctx}: {az} has {here:?}");
        assert!(
            here.iter().all(|i| i.image == image),
            "{ctx}: mixed images in {az}: {here:?}"
        );
        assert!(
            here.iter().all(|i| i.retiring.is_none()),
            "{ctx}: retiring left in {az}"
        );
    }
    assert_serving_all(cloud, &live, &targets, ctx);
}

/// Every live instance, and nothing else, registered and healthy; capacity never dipped.
pub(crate) fn assert_serving_all(
    cloud: &SimCloud,
    live: &[Instance],
    targets: &BTreeMap<String, TargetState>,
    ctx: &str,
) {
    let ids: Vec<&String> = live.iter().map(|i| &i.id).collect();
    assert_eq!(
        targets.keys().collect::<Vec<_>>(),
        ids,
        "{ctx}: target group and fleet differ"
    );
    assert!(
        targets.values().all(|s| *s == TargetState::Healthy),
        "{ctx}: {targets:?}"
    );
    assert_eq!(
        cloud.violations(),
        Vec::<String>::new(),
        "{ctx}: capacity dipped"
    );
}

/// A healthy v1 fleet, established.
async fn v1_fleet(seed: u64) -> SimCloud {
    let cloud = SimCloud::new(seed, Faults::default());
    let out = run(&cloud, &settings("ami-v1", 2, true), "r-v1")
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Done { launched: 4, .. }), "{out:?}");
    assert_whole(&cloud, "ami-v1", "v1");
    cloud.establish(PER_AZ, AZS.iter().map(|s| s.to_string()).collect());
    cloud
}

#[tokio::test(start_paused = true)]
async fn a_clean_rollout_replaces_everything_and_a_repeat_is_a_noop() {
    let cloud = v1_fleet(1).await;
    let s = settings("ami-v2", 1, false);
    let out = run(&cloud, &s, "r-v2").await.unwrap();
    assert_eq!(
        out,
        Outcome::Done {
            launched: 4,
            retired: 4,
            unchanged: false
        }
    );
    assert_whole(&cloud, "ami-v2", "v2");
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

/// What can go wrong during a rollout to `ami-v2`, each of which must roll it back.
pub(crate) fn faults() -> Vec<(&'static str, Faults)> {
    vec![
        (
            "never healthy",
            Faults {
                bad_image: Some("ami-v2".into()),
                ..Faults::default()
            },
        ),
        (
            "a sparse AMI on encrypted root volumes",
            Faults {
                sparse_images: vec!["ami-v2".into()],
                ..Faults::default()
            },
        ),
        (
            "no capacity in the second AZ",
            Faults {
                no_capacity_az: Some("az-b".into()),
                ..Faults::default()
            },
        ),
        (
            "alarm during the rollout",
            Faults {
                alarm_from_call: Some(40),
                ..Faults::default()
            },
        ),
        (
            "never reachable by Run Command",
            Faults {
                unreachable_for: Duration::from_secs(3600),
                ..Faults::default()
            },
        ),
    ]
}

#[tokio::test(start_paused = true)]
async fn each_fault_rolls_back_to_exactly_the_old_fleet() {
    let faults = faults();
    for (what, f) in faults {
        let cloud = v1_fleet(2).await;
        let before: Vec<String> = cloud.snapshot().0.into_iter().map(|i| i.id).collect();
        cloud.set_faults(f);
        let out = run(&cloud, &settings("ami-v2", 1, false), "r-v2")
            .await
            .unwrap();
        assert!(matches!(out, Outcome::RolledBack { .. }), "{what}: {out:?}");
        cloud.set_faults(Faults::default());
        assert_whole(&cloud, "ami-v1", what);
        let after: Vec<String> = cloud.snapshot().0.into_iter().map(|i| i.id).collect();
        assert_eq!(before, after, "{what}: the very same instances are back");
    }
}

#[tokio::test(start_paused = true)]
async fn slow_ssm_and_throttling_are_ridden_out() {
    let cloud = v1_fleet(3).await;
    cloud.set_faults(Faults {
        unreachable_for: Duration::from_secs(90),
        throttle: 0.3,
        ..Faults::default()
    });
    let out = run(&cloud, &settings("ami-v2", 2, true), "r-v2")
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Done { .. }), "{out:?}");
    assert_whole(&cloud, "ami-v2", "throttled");
}

/// One kind of fleet for [`crash_anywhere`]: plain instances, or a group per AZ.
pub(crate) trait Fleet {
    /// Whether releases are Auto Scaling groups.
    const GROUPS: bool;
    /// A healthy fleet on ami-v1, established.
    async fn v1(seed: u64) -> SimCloud;
    /// The rollout to ami-v2 that makes the most calls: one crash run per call.
    fn longest() -> Settings;
    /// A rollout to ami-v2 drawn with `rng`, and how to name it in a failure.
    fn draw(rng: &mut fastrand::Rng) -> (Settings, String);
    /// The whole fleet is on `image`, as this kind of fleet keeps it.
    fn assert_whole(cloud: &SimCloud, image: &str, ctx: &str);
    /// Checks after a resume with its journal, given the launches made before it.
    fn after_resume(_cloud: &SimCloud, _launched_before: u64, _ctx: &str) {}
}

/// What the operator does after the crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Comeback {
    /// Runs the rollout again with its journal.
    Resume,
    /// The journal was lost too: the rollout to resume is found from the tags.
    ResumeWithoutJournal,
    /// Rolls back.
    Abort,
}

/// A crash at every call of a clean rollout, then a resume (with its journal, or from the
/// tags alone when the journal was lost too) or an abort, under many seeds. Whatever the
/// dead process returned, nothing more happened; the fleet must end whole on one image.
pub(crate) async fn crash_anywhere<K: Fleet>() {
    let probe = K::v1(0).await;
    let start = probe.calls();
    engine(&probe, &K::longest(), "r-v2", K::GROUPS)
        .run()
        .await
        .unwrap();
    let total = probe.calls() - start;
    assert!(total > 20, "{total}");

    let mut runs = 0;
    for seed in 0..3u64 {
        for k in 1..=total {
            let mut rng = fastrand::Rng::with_seed(seed * 1000 + k);
            let (s, variant) = K::draw(&mut rng);
            let cloud = K::v1(seed).await;
            let base = cloud.calls();
            cloud.set_faults(Faults {
                crash_at_call: Some(base + k),
                throttle: if rng.bool() { 0.2 } else { 0.0 },
                ..Faults::default()
            });
            let first = engine(&cloud, &s, "r-v2", K::GROUPS).run().await;
            let ctx = format!("seed {seed}, crash at call {k}, {variant}");
            if !cloud.crashed() {
                // The crash point was past this variant's last call: it finished.
                assert!(
                    matches!(first, Ok(Outcome::Done { .. })),
                    "{ctx}: {first:?}"
                );
                K::assert_whole(&cloud, "ami-v2", &ctx);
                continue;
            }
            cloud.set_faults(Faults::default());
            let launched_before = cloud.launches();
            let comeback = if rng.usize(0..3) == 0 {
                Comeback::ResumeWithoutJournal
            } else if rng.bool() {
                Comeback::Resume
            } else {
                Comeback::Abort
            };
            let id = if comeback == Comeback::ResumeWithoutJournal {
                // The journal was lost too (a fresh CI runner): the tags alone decide.
                let (live, _) = cloud.snapshot();
                let groups = amictl::fleet::Groups::groups(&cloud, "web").await.unwrap();
                match resolve(None, &live, &groups, "ami-v2") {
                    Resolution::Resume(id) => id,
                    Resolution::New => "r-v2-again".into(),
                    other => panic!("{ctx}: {other:?}"),
                }
            } else {
                "r-v2".to_owned()
            };
            let ctx = format!("{ctx}, {comeback:?}");
            let rollout = engine(&cloud, &s, &id, K::GROUPS);
            if comeback == Comeback::Abort {
                let out = rollout.rollback("aborted").await;
                let out = out.unwrap_or_else(|e| panic!("{ctx}: {e}"));
                assert!(matches!(out, Outcome::RolledBack { .. }), "{ctx}: {out:?}");
                K::assert_whole(&cloud, "ami-v1", &ctx);
            } else {
                let out = rollout.run().await;
                let out = out.unwrap_or_else(|e| panic!("{ctx}: {e}"));
                assert!(matches!(out, Outcome::Done { .. }), "{ctx}: {out:?}");
                K::assert_whole(&cloud, "ami-v2", &ctx);
            }
            if comeback == Comeback::Resume {
                K::after_resume(&cloud, launched_before, &ctx);
            }
            runs += 1;
        }
    }
    assert!(runs > 30, "only {runs} crash runs");
}

struct Plain;

impl Fleet for Plain {
    const GROUPS: bool = false;

    async fn v1(seed: u64) -> SimCloud {
        v1_fleet(seed).await
    }

    fn longest() -> Settings {
        settings("ami-v2", 1, false)
    }

    fn draw(rng: &mut fastrand::Rng) -> (Settings, String) {
        let parallel = rng.bool();
        let surge = rng.usize(1..=2);
        (
            settings("ami-v2", surge, parallel),
            format!("parallel {parallel}, surge {surge}"),
        )
    }

    fn assert_whole(cloud: &SimCloud, image: &str, ctx: &str) {
        assert_whole(cloud, image, ctx);
    }

    fn after_resume(cloud: &SimCloud, launched_before: u64, ctx: &str) {
        // No double launches: at most the replacements still missing were launched.
        assert!(
            cloud.launches() - launched_before <= (PER_AZ * AZS.len()) as u64,
            "{ctx}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn crash_anywhere_then_resume_or_abort() {
    crash_anywhere::<Plain>().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_rollback_needs_attention_and_says_what_is_where() {
    let cloud = v1_fleet(4).await;
    cloud.set_faults(Faults {
        bad_image: Some("ami-v2".into()),
        fail_terminate: true,
        ..Faults::default()
    });
    let err = run(&cloud, &settings("ami-v2", 1, false), "r-v2")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            amictl::rollout::engine::RolloutError::NeedsAttention { .. }
        ),
        "{text}"
    );
    assert!(text.contains("ec2:TerminateInstances"), "{text}");
    // Every instance is listed with its role: the old ones are back in service.
    assert!(
        text.contains("launched by this rollout") && text.contains("in service"),
        "{text}"
    );
    assert_eq!(cloud.violations(), Vec::<String>::new());
}
