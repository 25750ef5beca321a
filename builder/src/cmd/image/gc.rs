//! `amictl image gc --keep N`: deregister a project's AMIs beyond the newest N that no
//! instance uses, and delete their snapshots. The plan goes to stdout; nothing is deleted
//! without `--yes` or a person answering at a terminal.

use std::io::{BufRead, IsTerminal, Write};

use crate::image::aws::AwsImages;
use crate::image::gc::{plan, GcPlan};
use crate::image::lifecycle::{short_digest, ImageLifecycle};
use crate::image::publish::ImageRegistry;
use crate::image::register::TAG_DIGEST;
use crate::image::upload::SnapshotStore;

use super::list::project_tags;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How many of the newest available AMIs to keep (AMIs instances use are kept too).
    #[arg(long, value_name = "N")]
    pub keep: usize,
    /// Only AMIs published with this prefix.
    #[arg(long, env = "AMICTL_PREFIX")]
    pub prefix: Option<String>,
    /// Print the plan, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Delete without asking (needed when stdin is not a terminal).
    #[arg(long)]
    pub yes: bool,
    /// AWS region (else the standard chain: AWS_REGION, the profile).
    #[arg(long)]
    pub region: Option<String>,
}

/// The plan as a person reads it (pure).
pub fn render(plan: &GcPlan, region: &str) -> String {
    let mut out = String::new();
    let digest = |a: &crate::image::publish::AmiRecord| {
        a.tag(TAG_DIGEST)
            .map(|d| short_digest(d, 12))
            .unwrap_or_else(|| "-".into())
    };
    for k in &plan.keep {
        out.push_str(&format!(
            "keep    {}  {}  {}  {}  ({})\n",
            k.ami.id,
            k.ami.created,
            digest(&k.ami),
            k.ami.name,
            k.why
        ));
    }
    for d in &plan.delete {
        let snapshots = if d.snapshots.is_empty() {
            "no snapshots".to_owned()
        } else {
            d.snapshots.join(", ")
        };
        out.push_str(&format!(
            "delete  {}  {}  {}  {}  ({}; {snapshots})\n",
            d.ami.id,
            d.ami.created,
            digest(&d.ami),
            d.ami.name,
            d.ami.state
        ));
    }
    let snapshots: usize = plan.delete.iter().map(|d| d.snapshots.len()).sum();
    out.push_str(&format!(
        "{region}: keep {}, deregister {} AMI(s) and delete {snapshots} snapshot(s). \"In use\" counts this account's instances in {region} only.\n",
        plan.keep.len(),
        plan.delete.len(),
    ));
    out
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let config = crate::aws::load(args.region.as_deref()).await?;
    let aws = AwsImages::new(&config);
    let region = aws.region();
    let amis: Vec<_> = aws
        .list(&project_tags(args.prefix.as_deref()))
        .await?
        .into_iter()
        .map(|a| a.record)
        .collect();
    let ids: Vec<String> = amis.iter().map(|a| a.id.clone()).collect();
    let in_use = aws.instances_using(&ids).await?;
    let plan = plan(amis, &in_use, args.keep);
    print!("{}", render(&plan, &region));
    if plan.delete.is_empty() || args.dry_run {
        return Ok(0);
    }
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            eprintln!("nothing deleted: pass --yes to delete (stdin is not a terminal, so amictl does not ask)");
            return Ok(2);
        }
        eprint!(
            "deregister {} AMI(s) and delete their snapshots? [y/N] ",
            plan.delete.len()
        );
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("nothing deleted");
            return Ok(2);
        }
    }

    let mut failures = Vec::new();
    for doomed in &plan.delete {
        let id = &doomed.ami.id;
        if let Err(e) = aws.deregister(id).await {
            failures.push(format!("{id}: {e}"));
            continue;
        }
        eprintln!("deregistered {id}");
        // After the AMI: EC2 refuses to delete a snapshot a registered AMI uses.
        for snapshot in &doomed.snapshots {
            match aws.delete(snapshot).await {
                Ok(()) => eprintln!("deleted {snapshot}"),
                Err(e) => failures.push(format!(
                    "{snapshot} (of {id}): {e}; delete it with `aws ec2 delete-snapshot --snapshot-id {snapshot}`"
                )),
            }
        }
    }
    if failures.is_empty() {
        Ok(0)
    } else {
        anyhow::bail!(
            "{} deletion(s) failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::gc::{Doomed, Keep, Kept};
    use crate::image::publish::AmiRecord;

    fn ami(id: &str) -> AmiRecord {
        AmiRecord {
            id: id.into(),
            name: format!("p-{id}"),
            state: "available".into(),
            tags: vec![],
            snapshot_ids: vec![],
            created: "2026-08-01T00:00:00.000Z".into(),
            public: false,
        }
    }

    #[test]
    fn the_plan_names_every_ami_and_why() {
        let plan = GcPlan {
            keep: vec![
                Kept {
                    ami: ami("ami-new"),
                    why: Keep::Newest(1),
                },
                Kept {
                    ami: ami("ami-used"),
                    why: Keep::InUse(vec!["i-1".into()]),
                },
            ],
            delete: vec![Doomed {
                ami: ami("ami-old"),
                snapshots: vec!["snap-1".into(), "snap-2".into()],
            }],
        };
        let text = render(&plan, "us-east-1");
        assert!(
            text.contains("keep    ami-new") && text.contains("(newest)"),
            "{text}"
        );
        assert!(text.contains("(in use by i-1)"), "{text}");
        assert!(
            text.contains("delete  ami-old") && text.contains("snap-1, snap-2"),
            "{text}"
        );
        assert!(
            text.contains("keep 2, deregister 1 AMI(s) and delete 2 snapshot(s)"),
            "{text}"
        );
    }
}
