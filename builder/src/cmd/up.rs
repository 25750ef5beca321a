//! `amictl up --name NAME [--image RESULT_DIR | --ami AMI]`: from nothing to a URL. Deploys
//! (or updates) the stack NAME, publishes the image if given, rolls the fleet NAME onto it
//! inside the stack, and prints the load balancer's URL last. Every step is idempotent, so
//! running it again after a failure picks up where it stopped; the exit code is the first
//! failing step's (the rollout's are 0 done, 3 rolled back, 4 needs attention).
//!
//! Credentials come only from the SDK's standard chain; nothing is written but the rollout
//! journal and the digest cache, neither of which holds a secret.

use std::path::PathBuf;

use clap::Parser;

use crate::cmd::image::publish::{publish_ami, Flags};
use crate::cmd::rollout;
use crate::cmd::stack::Waiting;
use crate::image::info::ImageSource;
use crate::stack::deploy::{deploy, Change, DeployRequest};
use crate::stack::names::{check_certificate_arn, check_prefix, check_stack_name};
use crate::stack::CloudFormation;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The stack and the fleet in it (one name for both; start it with the prefix so the
    /// `amictl iam-policy` scoping applies, e.g. amictl-web).
    #[arg(long)]
    pub name: String,
    /// The image to publish: the result of `nix build .#ami`.
    #[arg(long, value_name = "RESULT_DIR", required_unless_present = "ami")]
    pub image: Option<PathBuf>,
    /// An AMI already published, instead of --image.
    #[arg(long, conflicts_with = "image")]
    pub ami: Option<String>,
    /// Instances in each of the stack's two availability zones.
    #[arg(long, default_value_t = 2)]
    pub per_az: usize,
    /// EC2 instance type [default: the rollout's, t3.micro].
    #[arg(long)]
    pub instance_type: Option<String>,
    /// Consecutive passing health checks each new instance needs.
    #[arg(long, default_value_t = 3)]
    pub health_passes: u32,
    /// Fleet settings file ([fleets.NAME] tables); its values win over the stack's.
    #[arg(long, default_value = "amictl.toml")]
    pub config: PathBuf,
    /// How the image is published (`--prefix` and `--region` apply to every step).
    #[command(flatten)]
    pub publish: Flags,
    #[command(flatten)]
    pub https: crate::cmd::stack::Https,
    #[command(flatten)]
    pub waiting: Waiting,
}

/// Parses the rollout's own flags, so `up` runs exactly what `amictl rollout` would.
#[derive(Debug, Parser)]
#[command(name = "rollout")]
struct RolloutLine {
    #[command(flatten)]
    args: rollout::Args,
}

/// What `up` hands to `amictl rollout` besides the AMI.
#[derive(Debug, Clone)]
pub struct RolloutPlan {
    pub fleet: String,
    pub per_az: usize,
    pub config: PathBuf,
    pub instance_type: Option<String>,
    pub health_passes: u32,
    pub prefix: String,
    pub region: Option<String>,
}

impl RolloutPlan {
    fn of(args: &Args) -> Self {
        RolloutPlan {
            fleet: args.name.clone(),
            per_az: args.per_az,
            config: args.config.clone(),
            instance_type: args.instance_type.clone(),
            health_passes: args.health_passes,
            prefix: args.publish.prefix.clone(),
            region: args.publish.region.clone(),
        }
    }

    /// The `amictl rollout` command line (pure): the fleet is the stack's namesake.
    pub fn line(&self, ami: &str) -> Vec<String> {
        let mut line: Vec<String> = [
            "rollout",
            "--provider",
            "aws",
            "--fleet",
            &self.fleet,
            "--stack",
            &self.fleet,
            "--ami",
            ami,
            "--per-az",
            &self.per_az.to_string(),
            "--prefix",
            &self.prefix,
            "--health-passes",
            &self.health_passes.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        line.push("--config".into());
        line.push(self.config.display().to_string());
        if let Some(t) = &self.instance_type {
            line.extend(["--instance-type".into(), t.clone()]);
        }
        if let Some(r) = &self.region {
            line.extend(["--region".into(), r.clone()]);
        }
        line
    }
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    // Everything that can be refused is refused before anything is created.
    let checks = check_stack_name(&args.name)
        .and_then(|()| check_prefix(&args.publish.prefix))
        .and_then(|()| match &args.https.certificate_arn {
            Some(arn) => check_certificate_arn(arn, args.publish.region.as_deref()),
            None => Ok(()),
        });
    if let Err(e) = checks {
        eprintln!("error: {e}");
        return Ok(2);
    }
    if args.per_az == 0 {
        eprintln!("error: --per-az must be at least 1");
        return Ok(2);
    }
    if args.publish.omit_zero_blocks {
        eprintln!(
            "error: --omit-zero-blocks: `up` launches every instance with an encrypted root \
             volume, on which blocks left out of a sparse snapshot read back as random bytes; \
             drop --omit-zero-blocks"
        );
        return Ok(2);
    }
    let image = match &args.image {
        Some(dir) => match ImageSource::from_result_dir(dir, args.publish.boot_mode) {
            Ok(i) => Some(i),
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(2);
            }
        },
        None => None,
    };

    eprintln!("== stack {}", args.name);
    let config = crate::aws::load(args.publish.region.as_deref()).await?;
    if let (Some(arn), Some(region)) = (&args.https.certificate_arn, config.region()) {
        if let Err(e) = check_certificate_arn(arn, Some(region.as_ref())) {
            eprintln!("error: {e}");
            return Ok(2);
        }
    }
    let stacks = CloudFormation::new(&config);
    // A fleet another amictl is changing is refused before the stack or the image is
    // touched. Its lock lives in the stack's bucket: only a stack that exists can hold one.
    let fleet = RolloutPlan::of(&args).fleet;
    match crate::stack::read_outputs(&stacks, &args.name).await {
        Ok(outputs) => {
            let store = crate::lock::s3::S3Store::new(&config, &outputs.import_bucket, &fleet);
            match crate::lock::holder(&store, &fleet).await {
                Ok(None) => {}
                Ok(Some(held)) => {
                    eprintln!("error: {held}\n(nothing was changed: not the stack, not the image)");
                    return Ok(2);
                }
                // The rollout takes the lock itself and says what is wrong with it.
                Err(e) => tracing::warn!(error = %e, "cannot read the fleet's lock yet"),
            }
        }
        Err(crate::stack::StackError::NotFound(_)) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the stack's outputs yet"),
    }
    let request = DeployRequest {
        name: &args.name,
        prefix: Some(&args.publish.prefix),
        certificate_arn: args.https.certificate_arn.as_deref(),
        template: crate::stack::TEMPLATE,
    };
    match deploy(
        &stacks,
        &request,
        args.waiting.wait(),
        &mut std::io::stderr(),
    )
    .await
    {
        Ok(d) => eprintln!(
            "stack {} {}",
            args.name,
            match d.change {
                Change::Created => "created",
                Change::Updated => "updated",
                Change::UpToDate => "is up to date",
            }
        ),
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(if e.is_usage() { 2 } else { 1 });
        }
    }

    let plan = RolloutPlan::of(&args);
    let ami = match (image, args.ami) {
        (Some(image), _) => {
            eprintln!("== image {}", image.path.display());
            match publish_ami(image, args.publish).await? {
                Some(ami) => ami,
                None => return Ok(130),
            }
        }
        (None, Some(ami)) => ami,
        (None, None) => unreachable!("clap requires --image or --ami"),
    };

    eprintln!("== fleet {} onto {ami}", plan.fleet);
    let line = RolloutLine::try_parse_from(plan.line(&ami))
        .map_err(|e| anyhow::anyhow!("building the rollout's command line: {e}"))?;
    // The rollout prints the stack's URL as the last line of stdout.
    rollout::run(line.args).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    struct UpLine {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn the_rollout_line_parses_as_a_rollout_and_carries_the_shared_flags() {
        let up = UpLine::try_parse_from([
            "up",
            "--name",
            "amictl-web",
            "--ami",
            "ami-1",
            "--prefix",
            "amictl-",
            "--region",
            "eu-west-1",
            "--per-az",
            "3",
        ])
        .unwrap()
        .args;
        let line = RolloutPlan::of(&up).line("ami-1");
        let parsed = RolloutLine::try_parse_from(&line).unwrap().args;
        assert_eq!(parsed.fleet, "amictl-web");
        assert_eq!(parsed.stack.as_deref(), Some("amictl-web"));
        assert_eq!(parsed.ami.as_deref(), Some("ami-1"));
        assert_eq!(parsed.per_az, Some(3));
        assert_eq!(parsed.region.as_deref(), Some("eu-west-1"));
        assert_eq!(parsed.prefix.as_deref(), Some("amictl-"));
        assert_eq!(parsed.health_passes, 3);
        // --image or --ami, not both, not neither.
        assert!(UpLine::try_parse_from(["up", "--name", "amictl-web"]).is_err());
        assert!(UpLine::try_parse_from([
            "up", "--name", "x", "--ami", "ami-1", "--image", "result"
        ])
        .is_err());
    }
}
