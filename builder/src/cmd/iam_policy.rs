//! `amictl iam-policy [--scope S]... [--prefix P] [--partition aws] [--account ID]
//! [--region R]...`: print the least-privilege IAM policy amictl needs, as JSON on stdout.
//! The decisions (which actions, on which resources, under which conditions) live in
//! [`crate::iam`].
//!
//! Exit codes: 0 printed, 2 invalid input (nothing printed).

use std::collections::BTreeSet;

use clap::ValueEnum;

use crate::iam::{self, Scope, Target, MANAGED_POLICY_LIMIT};

/// A `--scope`: one kind of command (an [`iam::Scope`], which names and documents the
/// values), or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeArg {
    One(Scope),
    /// `all`: every scope.
    All,
}

impl ScopeArg {
    /// Every value: each scope, then `all`.
    const VARIANTS: [ScopeArg; Scope::ALL.len() + 1] = {
        let mut v = [ScopeArg::All; Scope::ALL.len() + 1];
        let mut i = 0;
        while i < Scope::ALL.len() {
            v[i] = ScopeArg::One(Scope::ALL[i]);
            i += 1;
        }
        v
    };

    fn scopes(self) -> Vec<Scope> {
        match self {
            ScopeArg::One(scope) => vec![scope],
            ScopeArg::All => Scope::ALL.to_vec(),
        }
    }
}

impl ValueEnum for ScopeArg {
    fn value_variants<'a>() -> &'a [Self] {
        &Self::VARIANTS
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        match self {
            ScopeArg::One(scope) => scope.to_possible_value(),
            ScopeArg::All => Some(
                clap::builder::PossibleValue::new("all")
                    .help("Everything (`amictl up` needs stack, publish and rollout)"),
            ),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// What the policy is for; repeat for several (default: all).
    #[arg(long, value_enum)]
    pub scope: Vec<ScopeArg>,
    /// The resource name prefix (stacks, roles, load balancer, alarms, import bucket).
    #[arg(long, env = "AMICTL_PREFIX", default_value = "amictl-")]
    pub prefix: String,
    /// The ARNs' partition: aws, aws-cn, aws-us-gov.
    #[arg(long, default_value = "aws")]
    pub partition: String,
    /// Limit the ARNs to this account (12 digits); default any.
    #[arg(long, value_name = "ID")]
    pub account: Option<String>,
    /// Limit the ARNs to this region; repeat for several (`image publish
    /// --copy-to-regions` needs each copy's region); default any.
    #[arg(long, value_name = "REGION")]
    pub region: Vec<String>,
    /// Write the policy to DIR as managed policies of at most 6,144 characters each
    /// (`amictl-policy-1.json`, ...), to attach together to one role, instead of printing
    /// it.
    #[arg(long, value_name = "DIR")]
    pub split: Option<std::path::PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let target = match Target::new(
        &args.partition,
        args.account.as_deref(),
        &args.region,
        &args.prefix,
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(2);
        }
    };
    let mut scopes: BTreeSet<Scope> = args.scope.iter().flat_map(|s| s.scopes()).collect();
    if scopes.is_empty() {
        scopes = Scope::ALL.into_iter().collect();
    }
    let policy = iam::policy(&scopes, &target);
    if let Some(dir) = &args.split {
        return write_split(&policy, dir);
    }
    print!("{}", iam::render(&policy));
    let size = iam::size(&policy);
    if size > MANAGED_POLICY_LIMIT {
        eprintln!(
            "note: this policy is {size} characters (without whitespace), more than the {MANAGED_POLICY_LIMIT} a managed policy may have (and an inline one past {INLINE_POLICY_LIMIT} with the role's others): write it as several managed policies with --split DIR and attach them all to the role"
        );
    }
    Ok(0)
}

/// All inline policies of one role together.
const INLINE_POLICY_LIMIT: usize = 10_240;

/// `--split DIR`: one file per managed policy; their names and sizes on stdout.
fn write_split(policy: &iam::Policy, dir: &std::path::Path) -> anyhow::Result<i32> {
    let parts = match iam::split(policy, MANAGED_POLICY_LIMIT) {
        Ok(parts) => parts,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(1);
        }
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    for (i, part) in parts.iter().enumerate() {
        let path = dir.join(format!("amictl-policy-{}.json", i + 1));
        std::fs::write(&path, iam::render(part))
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        println!(
            "{}\t{} characters\t{} statements",
            path.display(),
            iam::size(part),
            part.statement.len()
        );
    }
    Ok(0)
}
