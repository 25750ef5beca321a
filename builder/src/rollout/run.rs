//! A rollout carried out to its end, whatever the provider: resume or start, run or
//! abort, keep the journal, stop where it is on Ctrl-C or when the fleet's lock is lost, and
//! print the outcome and, last on stdout, the fleet's URL. The exit code is the command's:
//! 0 done, 3 rolled back, 4 needs attention, 2 usage error, 130 interrupted.

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::fleet::{Alarms, Compute, Groups, LoadBalancer, RunCommand};
use crate::rollout::engine::{Effects, Engine, Outcome, RolloutError, Settings};
use crate::rollout::journal::{new_id, resolve, Entry, Journal, Resolution, State};

/// What the operator asked of the rollout.
pub struct Request<'a> {
    pub fleet: &'a str,
    /// Roll the unfinished rollout back instead.
    pub abort: bool,
    /// Only print the plan.
    pub dry_run: bool,
    /// How to say "resume it with ..." for an image: `--ami ami-…` on AWS.
    pub resume_hint: &'a dyn Fn(&str) -> String,
}

/// The rollout of `settings` through `fx`, whatever the provider: resume or start, run or
/// abort, keep the journal, and print the fleet's URL last on stdout.
pub async fn drive<C: Compute, R: RunCommand, L: LoadBalancer, A: Alarms, G: Groups>(
    args: &Request<'_>,
    fx: Effects<'_, C, R, L, A, G>,
    settings: &Settings,
    journal: Option<Journal>,
    lost: Option<CancellationToken>,
) -> anyhow::Result<i32> {
    let image = settings.desired.image.clone();
    let compute = fx.compute;
    let lb = fx.lb;
    let current = compute.instances(args.fleet).await?;
    let groups = match fx.groups {
        Some(g) => g.groups(args.fleet).await?,
        None => Vec::new(),
    };
    let entry = journal.as_ref().and_then(|j| j.load(args.fleet));
    let rollout = match resolve(entry.as_ref(), &current, &groups, &image) {
        Resolution::Resume(id) => {
            info!(rollout = %id, "resuming the unfinished rollout");
            id
        }
        Resolution::Conflict {
            rollout,
            image: other,
        } if !args.abort => {
            let again = (args.resume_hint)(&other);
            eprintln!(
                "error: rollout {rollout} of fleet {} to {other} is unfinished: resume it with {again}, or roll it back with --abort",
                args.fleet
            );
            return Ok(2);
        }
        Resolution::Conflict { rollout, .. } => rollout,
        Resolution::New if args.abort => {
            eprintln!(
                "fleet {} has no unfinished rollout; nothing to abort",
                args.fleet
            );
            return Ok(0);
        }
        Resolution::New => new_id(crate::rollout::now_unix()),
    };
    let engine = Engine::new(fx, settings, &rollout);
    if args.dry_run {
        eprintln!("{}", engine.describe_plan().await?);
        return Ok(0);
    }
    let save = |state: State| {
        if let Some(j) = &journal {
            let e = Entry {
                rollout: rollout.clone(),
                fleet: args.fleet.to_owned(),
                image: image.clone(),
                started_unix: entry
                    .as_ref()
                    .map(|e| e.started_unix)
                    .unwrap_or_else(crate::rollout::now_unix),
                state,
            };
            if let Err(err) = j.save(&e) {
                warn!(error = %err, "cannot write the rollout journal (the fleet's tags still record the rollout)");
            }
        }
    };
    save(State::InProgress);
    let work = async {
        if args.abort {
            engine.rollback("aborted by request").await
        } else {
            engine.run().await
        }
    };
    let lost = async {
        match &lost {
            Some(token) => token.cancelled().await,
            None => std::future::pending().await,
        }
    };
    // The fleet's tags record every step, so stopping at any await point is safe: say how
    // to go on rather than try to clean up half-way.
    let result = tokio::select! {
        r = work => r,
        () = lost => {
            save(State::NeedsAttention);
            eprintln!(
                "NEEDS ATTENTION: rollout {rollout} of fleet {} lost the fleet's lock (another amictl took it over) and stopped where it was; once that run is done, run this command again to resume, or add --abort to roll back",
                args.fleet
            );
            return Ok(4);
        }
        _ = tokio::signal::ctrl_c() => {
            eprintln!(
                "interrupted: rollout {rollout} of fleet {} stopped where it was; run the same command again to resume it, or add --abort to roll it back",
                args.fleet
            );
            return Ok(130);
        }
    };
    let code = match result {
        Ok(Outcome::Done {
            launched,
            retired,
            unchanged,
        }) => {
            save(State::Done);
            if unchanged {
                eprintln!("fleet {} is already on {image}: nothing to do", args.fleet);
            } else {
                eprintln!(
                    "fleet {} is on {image}: {launched} launched, {retired} retired",
                    args.fleet
                );
            }
            0
        }
        Ok(Outcome::RolledBack { reason }) => {
            save(State::RolledBack);
            eprintln!("rolled back ({reason}): fleet {} is as it was", args.fleet);
            3
        }
        Err(RolloutError::Before(e)) => return Err(e).context("nothing was changed"),
        Err(e @ RolloutError::NeedsAttention { .. }) => {
            save(State::NeedsAttention);
            eprintln!("NEEDS ATTENTION: {e}");
            return Ok(4);
        }
    };
    // The URL, last on stdout: the load balancer's, else the instances' addresses.
    let url = match lb {
        Some(lb) => lb.url().await.ok().flatten(),
        None => None,
    };
    match url {
        Some(url) => println!("{url}"),
        None => {
            let addrs: Vec<String> = compute
                .instances(args.fleet)
                .await?
                .into_iter()
                .filter(|i| i.retiring.is_none())
                .filter_map(|i| i.address.map(|a| format!("http://{a}/")))
                .collect();
            println!("{}", addrs.join(" "));
        }
    }
    Ok(code)
}
