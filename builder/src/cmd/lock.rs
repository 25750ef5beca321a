//! The fleet lock as the commands that change a fleet take it (`rollout`, `destroy`, and
//! `up` through its rollout): flags, the prompt before breaking a live lock, and the exit
//! code 2 with the holder's name when the fleet is busy.

use std::io::IsTerminal;
use std::sync::Arc;

use crate::lock::{acquire, Holder, Lease, LeaseStore, LockError, Takeover, DEFAULT_TTL};

#[derive(Debug, Clone, Default, clap::Args)]
pub struct LockArgs {
    /// Take over the fleet's lock from a run that died: at once once its lease has expired
    /// (5 minutes without renewal); a live lease only when confirmed at the prompt or with
    /// --yes.
    #[arg(long)]
    pub break_lock: bool,
    /// AWS: the S3 bucket that holds the fleet's lock [default: the stack's, with --stack].
    /// Without one, nothing stops two commands changing the fleet at once.
    #[arg(long, env = "AMICTL_LOCK_BUCKET", value_name = "BUCKET")]
    pub lock_bucket: Option<String>,
}

/// How long a command waits for a local fleet's supervisor to give the lease back: it keeps
/// a replacement under 10 s ([`crate::local::supervisor::Settings`]), plus slack.
const SUPERVISOR_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// [`acquire`], but a lease a local fleet's supervisor holds for the seconds a replacement
/// takes is waited for rather than refused.
pub async fn patient_acquire<S: LeaseStore>(
    store: Arc<S>,
    fleet: &str,
    me: Holder,
    takeover: Takeover,
) -> Result<Lease<S>, LockError> {
    let patience = tokio::time::Instant::now() + SUPERVISOR_WAIT;
    let mut waited = false;
    loop {
        match acquire(store.clone(), fleet, me.clone(), takeover).await {
            Err(LockError::Held { holder, .. })
                if crate::local::supervisor::holds(&holder)
                    && tokio::time::Instant::now() < patience =>
            {
                if !std::mem::replace(&mut waited, true) {
                    tracing::info!(holder = %holder.operation, "waiting for the fleet's supervisor");
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

/// The fleet's lease for `operation`, or the exit code to stop with (2: held by someone
/// else, or not confirmed).
pub async fn take<S: LeaseStore>(
    store: S,
    fleet: &str,
    operation: String,
    args: &LockArgs,
    yes: bool,
) -> anyhow::Result<Result<Lease<S>, i32>> {
    let store = Arc::new(store);
    let me = Holder::here(operation, DEFAULT_TTL);
    let first = if args.break_lock {
        Takeover::IfExpired
    } else {
        Takeover::Never
    };
    let held = match patient_acquire(store.clone(), fleet, me.clone(), first).await {
        Ok(lease) => return Ok(Ok(lease)),
        Err(LockError::Held {
            fleet: f,
            holder,
            location,
            now_unix,
        }) => (f, holder, location, now_unix),
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(Err(2));
        }
    };
    let (f, holder, location, now_unix) = held;
    let busy = LockError::Held {
        fleet: f,
        holder: holder.clone(),
        location,
        now_unix,
    };
    if !args.break_lock {
        eprintln!("error: {busy}");
        return Ok(Err(2));
    }
    let confirmed = yes
        || (std::io::stdin().is_terminal()
            && crate::cmd::destroy::ask_on_terminal(&format!(
                "{busy}\nTake the lock over now? Only if that run is dead: two runs changing one fleet can leave it half-changed."
            ))?);
    if !confirmed {
        eprintln!("error: {busy}\n(--break-lock takes over a live lease only when confirmed at the prompt or with --yes; nothing was changed)");
        return Ok(Err(2));
    }
    match acquire(store, fleet, me, Takeover::Now).await {
        Ok(lease) => Ok(Ok(lease)),
        Err(e) => {
            eprintln!("error: {e}");
            Ok(Err(2))
        }
    }
}

/// Releases `lease`, warning (not failing) when that does not work: it expires anyway.
pub async fn release<S: LeaseStore>(lease: Option<Lease<S>>) {
    if let Some(lease) = lease {
        if let Err(e) = lease.release().await {
            tracing::warn!(error = %e, "the fleet's lock was not released; it expires by itself");
        }
    }
}
