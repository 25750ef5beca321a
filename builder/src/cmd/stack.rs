//! `amictl stack`: the CloudFormation stack a fleet runs in.
//!
//! - `template` prints the template amictl deploys;
//! - `check [TEMPLATE]` checks a template (the embedded one by default) against the
//!   security policy;
//! - `deploy --name NAME` creates or updates the stack through a change set, prints its
//!   events on stderr and its outputs on stdout, the URL last;
//! - `delete --name NAME` deletes it (asks first, or `--yes`);
//! - `outputs --name NAME [--json]` prints its outputs.
//!
//! Exit codes: 0 done (an up-to-date stack, or deleting one that does not exist, included),
//! 1 failed or declined, 2 a command line that cannot work (a bad name or prefix, a prefix
//! change, no `--yes` and no terminal to ask on).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use crate::cmd::destroy::{ask_on_terminal, consent, Consent};
use crate::stack::delete::Prepared;
use crate::stack::deploy::{Change, DeployRequest};
use crate::stack::names::check_stack_name;
use crate::stack::outputs::render;
use crate::stack::{CloudFormation, Ec2Occupants, StackError, Stacks, Wait};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: StackCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum StackCommand {
    /// Print the CloudFormation template amictl deploys.
    Template,
    /// Check a template against the security policy: exit 0 clean, 1 violations, 2
    /// unreadable input.
    Check {
        /// The template [default: the one amictl deploys].
        template: Option<PathBuf>,
    },
    /// Create or update the stack; print its outputs, the URL last.
    Deploy(DeployArgs),
    /// Delete the stack and everything in it.
    Delete(DeleteArgs),
    /// Print the stack's outputs.
    Outputs(OutputsArgs),
}

/// Flags every AWS subcommand takes.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// The stack's name (letters, digits and hyphens, starting with a letter).
    #[arg(long)]
    pub name: String,
    /// AWS region (else the standard chain: AWS_REGION, the profile).
    #[arg(long)]
    pub region: Option<String>,
}

/// How long deploy and delete wait, and how often they look.
#[derive(Debug, clap::Args)]
pub struct Waiting {
    /// Seconds to wait for CloudFormation to finish.
    #[arg(long, value_name = "SECS", default_value_t = 1800)]
    pub timeout: u64,
    /// Milliseconds between looks at the stack (for tests against a local endpoint; on
    /// AWS keep the default).
    #[arg(
        long,
        value_name = "MS",
        env = "AMICTL_POLL_MS",
        default_value_t = 5000,
        hide_short_help = true
    )]
    pub poll_ms: u64,
}

impl Waiting {
    pub fn wait(&self) -> Wait {
        Wait {
            timeout: Duration::from_secs(self.timeout),
            poll: Duration::from_millis(self.poll_ms.max(1)),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    #[command(flatten)]
    pub common: Common,
    /// Start of every resource name [default: the stack's own on an update, else amictl-].
    #[arg(long)]
    pub prefix: Option<String>,
    #[command(flatten)]
    pub https: Https,
    #[command(flatten)]
    pub waiting: Waiting,
}

/// HTTPS on the load balancer.
#[derive(Debug, clap::Args)]
pub struct Https {
    /// An ACM certificate in the stack's region: the load balancer then serves HTTPS on 443
    /// (TLS 1.3, and 1.2 with forward-secret ciphers) and port 80 only redirects there.
    /// An empty value turns HTTPS off again [default: what the stack has; HTTP only for a
    /// new stack].
    #[arg(long, value_name = "ARN")]
    pub certificate_arn: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub common: Common,
    /// Delete without asking (needed when stdin is not a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
    #[command(flatten)]
    pub waiting: Waiting,
}

#[derive(Debug, clap::Args)]
pub struct OutputsArgs {
    #[command(flatten)]
    pub common: Common,
    /// One JSON object (subnets and alarms as lists) instead of lines.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let result = match args.command {
        StackCommand::Template => {
            print!("{}", crate::stack::TEMPLATE);
            return Ok(0);
        }
        StackCommand::Check { template } => return crate::policy::run_check(template.as_deref()),
        StackCommand::Deploy(a) => deploy(a).await,
        StackCommand::Delete(a) => delete(a).await,
        StackCommand::Outputs(a) => outputs(a).await,
    };
    match result {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("error: {e}");
            Ok(if e.is_usage() { 2 } else { 1 })
        }
    }
}

async fn deploy(args: DeployArgs) -> Result<i32, StackError> {
    let name = args.common.name.as_str();
    // Before any call (loading the configuration asks for credentials).
    check_stack_name(name)?;
    if let Some(p) = &args.prefix {
        crate::stack::names::check_prefix(p)?;
    }
    if let Some(arn) = &args.https.certificate_arn {
        crate::stack::names::check_certificate_arn(arn, args.common.region.as_deref())?;
    }
    let config = crate::aws::load(args.common.region.as_deref()).await?;
    if let (Some(arn), Some(region)) = (&args.https.certificate_arn, config.region()) {
        crate::stack::names::check_certificate_arn(arn, Some(region.as_ref()))?;
    }
    let stacks = CloudFormation::new(&config);
    let request = DeployRequest {
        name,
        prefix: args.prefix.as_deref(),
        certificate_arn: args.https.certificate_arn.as_deref(),
        template: crate::stack::TEMPLATE,
    };
    let deployed = crate::stack::deploy::deploy(
        &stacks,
        &request,
        args.waiting.wait(),
        &mut std::io::stderr(),
    )
    .await?;
    match deployed.change {
        Change::Created => eprintln!("stack {name} created"),
        Change::Updated => eprintln!("stack {name} updated"),
        Change::UpToDate => eprintln!("stack {name} is up to date"),
    }
    print!("{}", render(&deployed.stack.outputs));
    Ok(0)
}

async fn delete(args: DeleteArgs) -> Result<i32, StackError> {
    let name = args.common.name.as_str();
    check_stack_name(name)?;
    let config = crate::aws::load(args.common.region.as_deref()).await?;
    let stacks = CloudFormation::new(&config);
    let occupants = Ec2Occupants::new(&config);
    let stack = match crate::stack::delete::prepare(&stacks, &occupants, name).await? {
        Prepared::Nothing => {
            eprintln!("stack {name} does not exist: nothing to delete");
            return Ok(0);
        }
        Prepared::Ready(stack) => stack,
    };
    let mut err = std::io::stderr();
    write!(
        err,
        "stack {name} ({}) and everything in it will be deleted:\n{}",
        stack.status,
        render(&stack.outputs)
    )?;
    match consent(args.yes, std::io::stdin().is_terminal()) {
        Consent::Given => {}
        Consent::Refuse => {
            eprintln!("error: deleting stack {name} deletes its VPC, load balancer and bucket, and stdin is not a terminal to ask on: pass --yes to go ahead (nothing was changed)");
            return Ok(2);
        }
        Consent::Ask => {
            if !ask_on_terminal(&format!("Delete stack {name}?"))? {
                eprintln!("nothing was changed");
                return Ok(1);
            }
        }
    }
    crate::stack::delete::delete(&stacks, &stack, args.waiting.wait(), &mut err).await?;
    eprintln!("stack {name} deleted");
    Ok(0)
}

async fn outputs(args: OutputsArgs) -> Result<i32, StackError> {
    let name = args.common.name.as_str();
    check_stack_name(name)?;
    let config = crate::aws::load(args.common.region.as_deref()).await?;
    let stacks = CloudFormation::new(&config);
    if args.json {
        let parsed = crate::stack::read_outputs(&stacks, name).await?;
        println!(
            "{}",
            serde_json::to_string_pretty(&parsed).expect("outputs serialize")
        );
    } else {
        let stack = stacks
            .describe(name)
            .await?
            .ok_or_else(|| StackError::NotFound(name.to_owned()))?;
        if stack.outputs.is_empty() {
            eprintln!("stack {name} ({}) has no outputs", stack.status);
        }
        print!("{}", render(&stack.outputs));
    }
    Ok(0)
}
