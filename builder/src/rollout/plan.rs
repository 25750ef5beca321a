//! The rollout plan, pure: from the fleet as it is and as it should be, the waves that get
//! it there. Replacements are launched before anything old is touched (surge first), AZ by
//! AZ unless asked to do both at once. Instances already on the desired image and launch
//! settings are kept, so a repeated rollout plans nothing.

use std::collections::BTreeMap;

use crate::fleet::{Instance, InstanceState, Placement};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub image: String,
    /// One placement per AZ, in rollout order.
    pub placements: Vec<Placement>,
    /// Launch-settings digest per AZ.
    pub specs: BTreeMap<String, String>,
    pub per_az: usize,
    /// New instances launched (and gated) at a time in one AZ.
    pub max_surge: usize,
    pub parallel_azs: bool,
}

impl Desired {
    /// The launch-settings digest wanted in `az` (empty for an AZ without one).
    pub fn spec(&self, az: &str) -> &str {
        self.specs.get(az).map(String::as_str).unwrap_or_default()
    }
}

/// One step in one AZ: launch `launch` replacements, gate them, then take `retire` out of
/// service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub az: String,
    pub launch: usize,
    pub retire: Vec<String>,
}

/// Steps that run together (one AZ, or every AZ with `parallel_azs`). Within a wave, the
/// steps of one AZ run in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wave {
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub waves: Vec<Wave>,
    /// Instances outside every desired AZ: retired at the end.
    pub strays: Vec<String>,
    /// Instances a previous, interrupted rollout took out of service: terminated at the end.
    pub retiring: Vec<String>,
}

impl Plan {
    pub fn is_noop(&self) -> bool {
        self.waves.is_empty() && self.strays.is_empty() && self.retiring.is_empty()
    }

    pub fn launches(&self) -> usize {
        self.waves
            .iter()
            .flat_map(|w| &w.steps)
            .map(|s| s.launch)
            .sum()
    }
}

/// Instances that count: not terminated, not down.
fn live(i: &Instance) -> bool {
    matches!(i.state, InstanceState::Pending | InstanceState::Running)
}

pub fn plan(current: &[Instance], desired: &Desired) -> Plan {
    let surge = desired.max_surge.max(1);
    let mut per_az_steps = Vec::new();
    let azs: Vec<&str> = desired.placements.iter().map(|p| p.az.as_str()).collect();
    let retiring: Vec<String> = current
        .iter()
        .filter(|i| i.retiring.is_some() && i.state != InstanceState::Terminated)
        .map(|i| i.id.clone())
        .collect();
    let strays: Vec<String> = current
        .iter()
        .filter(|i| {
            i.retiring.is_none()
                && i.state != InstanceState::Terminated
                && !azs.contains(&i.az.as_str())
        })
        .map(|i| i.id.clone())
        .collect();

    for placement in &desired.placements {
        let az = placement.az.as_str();
        let spec = desired.spec(az);
        let in_az: Vec<&Instance> = current
            .iter()
            .filter(|i| i.az == az && i.retiring.is_none() && i.state != InstanceState::Terminated)
            .collect();
        let mut keep: Vec<&Instance> = in_az
            .iter()
            .copied()
            .filter(|i| live(i) && i.matches(&desired.image, spec))
            .collect();
        // Oldest ids first is arbitrary but stable; surplus matching instances go too.
        keep.sort_by(|a, b| a.id.cmp(&b.id));
        let surplus: Vec<String> = keep
            .iter()
            .skip(desired.per_az)
            .map(|i| i.id.clone())
            .collect();
        keep.truncate(desired.per_az);
        let mut old: Vec<String> = in_az
            .iter()
            .filter(|i| !keep.iter().any(|k| k.id == i.id) && !surplus.contains(&i.id))
            .map(|i| i.id.clone())
            .collect();
        old.sort();
        // Down instances first: retiring them costs no capacity.
        old.sort_by_key(|id| in_az.iter().find(|i| &i.id == id).is_some_and(|i| live(i)));
        old.extend(surplus);

        let mut need = desired.per_az - keep.len();
        let mut steps = Vec::new();
        while need > 0 {
            let launch = need.min(surge);
            let take = launch.min(old.len());
            steps.push(Step {
                az: az.to_owned(),
                launch,
                retire: old.drain(..take).collect(),
            });
            need -= launch;
        }
        if !old.is_empty() {
            // Nothing (more) to launch here: the remaining old instances are beyond the
            // desired count; they leave once everything else is in place.
            steps.push(Step {
                az: az.to_owned(),
                launch: 0,
                retire: std::mem::take(&mut old),
            });
        }
        if !steps.is_empty() {
            per_az_steps.push(steps);
        }
    }

    let waves = if desired.parallel_azs {
        if per_az_steps.is_empty() {
            Vec::new()
        } else {
            vec![Wave {
                steps: per_az_steps.into_iter().flatten().collect(),
            }]
        }
    } else {
        per_az_steps
            .into_iter()
            .map(|steps| Wave { steps })
            .collect()
    };
    Plan {
        waves,
        strays,
        retiring,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, az: &str, image: &str) -> Instance {
        Instance {
            id: id.into(),
            az: az.into(),
            image: image.into(),
            spec: "s".into(),
            state: InstanceState::Running,
            rollout: None,
            retiring: None,
            address: None,
            group: None,
        }
    }

    fn desired(per_az: usize, surge: usize, parallel: bool) -> Desired {
        Desired {
            image: "new".into(),
            placements: vec![
                Placement {
                    az: "a".into(),
                    subnet: "sa".into(),
                },
                Placement {
                    az: "b".into(),
                    subnet: "sb".into(),
                },
            ],
            specs: [
                ("a".to_owned(), "s".to_owned()),
                ("b".to_owned(), "s".to_owned()),
            ]
            .into(),
            per_az,
            max_surge: surge,
            parallel_azs: parallel,
        }
    }

    #[test]
    fn a_new_fleet_is_launched_az_by_az() {
        let p = plan(&[], &desired(2, 2, false));
        assert_eq!(p.waves.len(), 2);
        assert_eq!(
            p.waves[0].steps,
            vec![Step {
                az: "a".into(),
                launch: 2,
                retire: vec![]
            }]
        );
        assert_eq!(p.launches(), 4);
    }

    #[test]
    fn replacement_surges_first_in_chunks() {
        let cur = vec![
            inst("1", "a", "old"),
            inst("2", "a", "old"),
            inst("3", "b", "old"),
            inst("4", "b", "old"),
        ];
        let p = plan(&cur, &desired(2, 1, false));
        assert_eq!(
            p.waves[0].steps,
            vec![
                Step {
                    az: "a".into(),
                    launch: 1,
                    retire: vec!["1".into()]
                },
                Step {
                    az: "a".into(),
                    launch: 1,
                    retire: vec!["2".into()]
                },
            ]
        );
        assert_eq!(p.waves[1].steps.len(), 2);
        let p = plan(&cur, &desired(2, 2, true));
        assert_eq!(p.waves.len(), 1);
        assert_eq!(p.waves[0].steps.len(), 2);
    }

    #[test]
    fn matching_instances_are_kept_and_a_repeat_is_a_noop() {
        let cur = vec![
            inst("1", "a", "new"),
            inst("2", "a", "new"),
            inst("3", "b", "new"),
            inst("4", "b", "new"),
        ];
        assert!(plan(&cur, &desired(2, 1, false)).is_noop());
        // Another launch spec (say an instance type change) is a replacement too.
        let mut changed = cur.clone();
        changed[0].spec = "other".into();
        let p = plan(&changed, &desired(2, 1, false));
        assert_eq!(
            p.waves[0].steps,
            vec![Step {
                az: "a".into(),
                launch: 1,
                retire: vec!["1".into()]
            }]
        );
    }

    #[test]
    fn scaling_down_and_up() {
        let cur = vec![
            inst("1", "a", "new"),
            inst("2", "a", "new"),
            inst("3", "a", "new"),
            inst("4", "b", "new"),
        ];
        let p = plan(&cur, &desired(1, 1, false));
        assert_eq!(
            p.waves[0].steps,
            vec![Step {
                az: "a".into(),
                launch: 0,
                retire: vec!["2".into(), "3".into()]
            }]
        );
        let p = plan(&cur, &desired(3, 2, false));
        assert_eq!(p.waves.len(), 1);
        assert_eq!(
            p.waves[0].steps,
            vec![Step {
                az: "b".into(),
                launch: 2,
                retire: vec![]
            }]
        );
    }

    #[test]
    fn down_instances_go_first_strays_and_retiring_are_listed() {
        let mut down = inst("1", "a", "old");
        down.state = InstanceState::Down;
        let mut retiring = inst("9", "b", "old");
        retiring.retiring = Some("r1".into());
        let cur = vec![inst("0", "a", "old"), down, inst("5", "c", "new"), retiring];
        let p = plan(&cur, &desired(1, 1, false));
        assert_eq!(p.waves[0].steps[0].retire, vec!["1".to_owned()]);
        assert_eq!(
            p.waves[0].steps[1],
            Step {
                az: "a".into(),
                launch: 0,
                retire: vec!["0".into()]
            }
        );
        assert_eq!(p.strays, vec!["5".to_owned()]);
        assert_eq!(p.retiring, vec!["9".to_owned()]);
    }
}
