//! An Application Load Balancer's target group as the rollout's `LoadBalancer`, and
//! CloudWatch alarms as its `Alarms`. Thin: the rollout engine decides.

use std::collections::BTreeMap;

use aws_sdk_elasticloadbalancingv2::types::{TargetDescription, TargetHealthStateEnum};

use super::{Alarms, CloudError, LoadBalancer, TargetState};
use crate::aws::{classify, error_code};

#[derive(Clone)]
pub struct TargetGroup {
    pub client: aws_sdk_elasticloadbalancingv2::Client,
    pub arn: String,
}

fn targets(ids: &[String]) -> Option<Vec<TargetDescription>> {
    Some(
        ids.iter()
            .map(|id| TargetDescription::builder().id(id).build())
            .collect(),
    )
}

/// The target group's view, in the rollout's words.
pub fn target_state(state: Option<&TargetHealthStateEnum>) -> TargetState {
    match state {
        Some(TargetHealthStateEnum::Healthy) => TargetState::Healthy,
        Some(TargetHealthStateEnum::Initial) => TargetState::Initial,
        Some(TargetHealthStateEnum::Draining) => TargetState::Draining,
        Some(TargetHealthStateEnum::Unused) | None => TargetState::Unused,
        // unhealthy, unhealthy.draining, unavailable, and anything newer.
        Some(_) => TargetState::Unhealthy,
    }
}

impl LoadBalancer for TargetGroup {
    async fn register(&self, ids: &[String]) -> Result<(), CloudError> {
        self.client
            .register_targets()
            .target_group_arn(&self.arn)
            .set_targets(targets(ids))
            .send()
            .await
            .map_err(|e| CloudError::from(classify("elasticloadbalancing:RegisterTargets", e)))?;
        Ok(())
    }

    async fn deregister(&self, ids: &[String]) -> Result<(), CloudError> {
        match self
            .client
            .deregister_targets()
            .target_group_arn(&self.arn)
            .set_targets(targets(ids))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // Already gone (terminated): nothing to deregister.
            Err(e) if error_code(&e) == Some("InvalidTarget") => Ok(()),
            Err(e) => Err(classify("elasticloadbalancing:DeregisterTargets", e).into()),
        }
    }

    async fn states(&self, ids: &[String]) -> Result<BTreeMap<String, TargetState>, CloudError> {
        let out = match self
            .client
            .describe_target_health()
            .target_group_arn(&self.arn)
            .set_targets(targets(ids))
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if error_code(&e) == Some("InvalidTarget") => {
                return Ok(ids
                    .iter()
                    .map(|id| (id.clone(), TargetState::Unused))
                    .collect())
            }
            Err(e) => return Err(classify("elasticloadbalancing:DescribeTargetHealth", e).into()),
        };
        let mut states: BTreeMap<String, TargetState> = ids
            .iter()
            .map(|id| (id.clone(), TargetState::Unused))
            .collect();
        for d in out.target_health_descriptions() {
            if let Some(id) = d.target().and_then(|t| t.id()) {
                states.insert(
                    id.to_owned(),
                    target_state(d.target_health().and_then(|h| h.state())),
                );
            }
        }
        Ok(states)
    }

    async fn url(&self) -> Result<Option<String>, CloudError> {
        let groups = self
            .client
            .describe_target_groups()
            .target_group_arns(&self.arn)
            .send()
            .await
            .map_err(|e| {
                CloudError::from(classify("elasticloadbalancing:DescribeTargetGroups", e))
            })?;
        let Some(lb_arn) = groups
            .target_groups()
            .first()
            .and_then(|g| g.load_balancer_arns().first())
            .cloned()
        else {
            return Ok(None);
        };
        let lbs = self
            .client
            .describe_load_balancers()
            .load_balancer_arns(lb_arn)
            .send()
            .await
            .map_err(|e| {
                CloudError::from(classify("elasticloadbalancing:DescribeLoadBalancers", e))
            })?;
        Ok(lbs
            .load_balancers()
            .first()
            .and_then(|lb| lb.dns_name())
            .map(|d| format!("http://{d}/")))
    }
}

#[derive(Clone)]
pub struct CloudWatchAlarms {
    pub client: aws_sdk_cloudwatch::Client,
}

impl Alarms for CloudWatchAlarms {
    async fn firing(&self, names: &[String]) -> Result<Vec<String>, CloudError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let out = self
            .client
            .describe_alarms()
            .set_alarm_names(Some(names.to_vec()))
            .send()
            .await
            .map_err(|e| CloudError::from(classify("cloudwatch:DescribeAlarms", e)))?;
        Ok(out
            .metric_alarms()
            .iter()
            .filter(|a| a.state_value() == Some(&aws_sdk_cloudwatch::types::StateValue::Alarm))
            .filter_map(|a| a.alarm_name().map(str::to_owned))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_states() {
        assert_eq!(
            target_state(Some(&TargetHealthStateEnum::Healthy)),
            TargetState::Healthy
        );
        assert_eq!(
            target_state(Some(&TargetHealthStateEnum::UnhealthyDraining)),
            TargetState::Unhealthy
        );
        assert_eq!(
            target_state(Some(&TargetHealthStateEnum::Unavailable)),
            TargetState::Unhealthy
        );
        assert_eq!(
            target_state(Some(&TargetHealthStateEnum::Draining)),
            TargetState::Draining
        );
        assert_eq!(target_state(None), TargetState::Unused);
    }
}
