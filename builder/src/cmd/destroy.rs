//! `amictl destroy --fleet NAME [--provider aws|local] [--yes]`: take a whole fleet down.
//!
//! On AWS: list the Auto Scaling groups and instances tagged `amictl:fleet=NAME`, show them,
//! ask (or take `--yes`), delete the groups (first: a group replaces an instance terminated
//! under it) and terminate the instances, wait until EC2 no longer lists them, and drop the fleet's rollout journal
//! entry. Every step is idempotent: a fleet with no instances is already destroyed (exit 0),
//! so an interrupted or timed-out destroy is finished by running it again.
//!
//! Exit codes: 0 destroyed (or nothing to destroy), 1 declined at the prompt or an error,
//! 2 no `--yes` and no terminal to ask on.
//!
//! Locally: stop the fleet's `ami-agent serve` processes (no question asked: nothing leaves
//! this machine).

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;

use crate::cmd::lock::{self, LockArgs};
use crate::cmd::Provider;
use crate::effects::aws::Aws;
use crate::effects::local::LocalFleet;
use crate::fleet::table::table;
use crate::fleet::{Compute, Groups, Instance, InstanceState};
use crate::lock::{Lease, LeaseStore};

/// Between two looks at whether the instances are gone: EC2 takes from seconds to a couple
/// of minutes to terminate, and DescribeInstances every 5 s stays far below its rate limit.
const POLL: Duration = Duration::from_secs(5);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The fleet: the instances tagged amictl:fleet=NAME (locally, the fleet of that name).
    #[arg(long)]
    pub fleet: String,
    /// Where the fleet lives.
    #[arg(long, value_enum, default_value_t = Provider::Aws)]
    pub provider: Provider,
    /// Terminate without asking (needed when stdin is not a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// AWS region (else the standard chain: AWS_REGION, the profile).
    #[arg(long)]
    pub region: Option<String>,
    /// Seconds to wait for the terminated instances to be gone.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub timeout: u64,
    /// AWS: the stack the fleet runs in, whose bucket holds the fleet's lock.
    #[arg(long, value_name = "NAME")]
    pub stack: Option<String>,
    #[command(flatten)]
    pub lock: LockArgs,
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    if args.fleet.trim().is_empty() {
        eprintln!("error: --fleet must name a fleet");
        return Ok(2);
    }
    match args.provider {
        Provider::Local => {
            // Not while another command changes the fleet. The lease goes with the fleet's
            // directory.
            let local = LocalFleet::open(&args.fleet)?;
            let _lease = if local.store.dir.exists() {
                match hold(local.lock(), &args).await? {
                    Ok(lease) => Some(lease),
                    Err(code) => return Ok(code),
                }
            } else {
                None
            };
            match local_destroy(&args.fleet).await? {
                Some(stopped) => eprintln!(
                    "fleet {} destroyed: {} stopped",
                    args.fleet,
                    count(stopped, "instance")
                ),
                None => eprintln!("there is no local fleet {}: nothing to stop", args.fleet),
            }
            Ok(0)
        }
        Provider::Aws => run_aws(args).await,
    }
}

/// The local provider's teardown: the number of instances stopped, None for no fleet.
async fn local_destroy(fleet: &str) -> anyhow::Result<Option<usize>> {
    crate::local::destroy(fleet)
        .await
        .with_context(|| format!("destroying the local fleet {fleet}"))
}

async fn run_aws(args: Args) -> anyhow::Result<i32> {
    let aws = Aws::connect(args.region.as_deref()).await?;
    let bucket = match (&args.lock.lock_bucket, &args.stack) {
        (Some(b), _) => Some(b.clone()),
        (None, Some(stack)) => {
            let stacks = aws.stacks();
            match crate::stack::read_outputs(&stacks, stack).await {
                Ok(outputs) => Some(outputs.import_bucket),
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(2);
                }
            }
        }
        (None, None) => {
            tracing::warn!(fleet = %args.fleet, "no lock bucket (--stack or --lock-bucket): nothing stops a rollout of this fleet meanwhile");
            None
        }
    };
    let lease = match bucket {
        Some(bucket) => match hold(aws.lock(&bucket, &args.fleet), &args).await? {
            Ok(lease) => Some(lease),
            Err(code) => return Ok(code),
        },
        None => None,
    };
    let code = destroy_aws(&args, &aws).await;
    lock::release(lease).await;
    code
}

/// The fleet's lock for this destroy, or the exit code to stop with.
async fn hold<S: LeaseStore>(store: S, args: &Args) -> anyhow::Result<Result<Lease<S>, i32>> {
    let operation = format!("destroy of fleet {}", args.fleet);
    lock::take(store, &args.fleet, operation, &args.lock, args.yes).await
}

async fn destroy_aws(args: &Args, aws: &Aws) -> anyhow::Result<i32> {
    let compute = aws.instances();
    let groups = aws.groups();
    let consent = consent(args.yes, std::io::stdin().is_terminal());
    let outcome = destroy(
        &compute,
        &groups,
        &args.fleet,
        consent,
        // The prompt blocks this thread, and nothing else runs meanwhile.
        ask_on_terminal,
        Duration::from_secs(args.timeout),
        POLL,
        &mut std::io::stderr(),
    )
    .await?;
    let code = match outcome {
        Outcome::Nothing => {
            eprintln!(
                "fleet {} has no instances: nothing to terminate",
                args.fleet
            );
            0
        }
        Outcome::Refused { count: n, groups } => {
            eprintln!(
                "error: destroying fleet {} terminates {}{}, and stdin is not a terminal to ask on: pass --yes to go ahead (nothing was changed)",
                args.fleet,
                count(n, "instance"),
                in_groups(groups)
            );
            return Ok(2);
        }
        Outcome::Declined => {
            eprintln!("nothing was changed");
            return Ok(1);
        }
        Outcome::Terminated { count: n, groups } => {
            eprintln!(
                "fleet {} destroyed: {} terminated{}",
                args.fleet,
                count(n, "instance"),
                match groups {
                    0 => String::new(),
                    g => format!(", {} deleted", count(g, "Auto Scaling group")),
                }
            );
            0
        }
    };
    // The fleet is gone: its rollout journal entry describes nothing any more. The journal
    // is a convenience (the tags carry the same facts), so failing to remove it is a warning.
    if let Err(err) = remove_journal_entry(&args.fleet) {
        tracing::warn!(error = %err, fleet = %args.fleet, "cannot remove the fleet's rollout journal entry");
    }
    Ok(code)
}

/// How the go-ahead to terminate is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consent {
    /// `--yes`.
    Given,
    /// Ask on the terminal.
    Ask,
    /// No `--yes` and no terminal: refuse.
    Refuse,
}

/// The go-ahead from `--yes` and whether stdin is a terminal (pure).
pub fn consent(yes: bool, stdin_is_terminal: bool) -> Consent {
    match (yes, stdin_is_terminal) {
        (true, _) => Consent::Given,
        (false, true) => Consent::Ask,
        (false, false) => Consent::Refuse,
    }
}

/// Whether an answer to `[y/N]` is a yes (pure): `y` or `yes`, any case; anything else,
/// the empty answer included, is a no.
pub fn accepts(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

/// `1 instance`, `3 instances` (pure).
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn state_name(state: InstanceState) -> &'static str {
    match state {
        InstanceState::Pending => "pending",
        InstanceState::Running => "running",
        InstanceState::Down => "down",
        InstanceState::Terminated => "terminated",
    }
}

/// What will be terminated, as a table (pure).
pub fn listing(instances: &[Instance]) -> String {
    let rows: Vec<Vec<String>> = instances
        .iter()
        .map(|i| {
            vec![
                i.id.clone(),
                i.az.clone(),
                i.image.clone(),
                state_name(i.state).to_owned(),
            ]
        })
        .collect();
    table(&["INSTANCE", "AZ", "IMAGE", "STATE"], &rows)
}

/// The prompt, on stderr; the answer, a line from stdin (end of input is a no).
pub fn ask_on_terminal(question: &str) -> std::io::Result<bool> {
    let mut err = std::io::stderr();
    write!(err, "{question} [y/N] ")?;
    err.flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(accepts(&answer))
}

/// How a destroy ended, short of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The fleet has no instances (already destroyed, or never there).
    Nothing,
    /// No go-ahead and no way to ask: nothing was changed.
    Refused { count: usize, groups: usize },
    /// The answer was no: nothing was changed.
    Declined,
    /// These many instances were terminated and are gone.
    Terminated { count: usize, groups: usize },
}

/// " in 2 Auto Scaling groups", or nothing.
fn in_groups(groups: usize) -> String {
    match groups {
        0 => String::new(),
        g => format!(" in {}", count(g, "Auto Scaling group")),
    }
}

/// Lists the fleet, shows it on `out`, gets the go-ahead, deletes every group, terminates
/// every instance and waits (until `timeout`, looking every `poll`) until none of them is
/// listed any more.
#[allow(clippy::too_many_arguments)]
pub async fn destroy<C: Compute, G: Groups>(
    compute: &C,
    groups: &G,
    fleet: &str,
    consent: Consent,
    ask: impl FnOnce(&str) -> std::io::Result<bool>,
    timeout: Duration,
    poll: Duration,
    out: &mut impl Write,
) -> anyhow::Result<Outcome> {
    let found = groups
        .groups(fleet)
        .await
        .with_context(|| format!("listing the Auto Scaling groups of fleet {fleet}"))?;
    let instances = compute
        .instances(fleet)
        .await
        .with_context(|| format!("listing the instances of fleet {fleet}"))?;
    if instances.is_empty() && found.is_empty() {
        return Ok(Outcome::Nothing);
    }
    let n = instances.len();
    let g = found.len();
    // The table ends in a newline.
    write!(
        out,
        "fleet {fleet}: {}{} to terminate\n{}",
        count(n, "instance"),
        in_groups(g),
        listing(&instances)
    )?;
    for group in &found {
        writeln!(
            out,
            "group {} ({}, {} of {}..{} instances)",
            group.name,
            group.az,
            group.instances.len(),
            group.capacity.min,
            group.capacity.max
        )?;
    }
    match consent {
        Consent::Given => {}
        Consent::Refuse => {
            return Ok(Outcome::Refused {
                count: n,
                groups: g,
            })
        }
        Consent::Ask => {
            let question = format!(
                "Terminate {}{} of fleet {fleet}?",
                count(n, "instance"),
                in_groups(g)
            );
            if !ask(&question).context("reading the answer")? {
                return Ok(Outcome::Declined);
            }
        }
    }
    // Groups first: each would replace an instance terminated under it. Deleting one
    // terminates its instances.
    for group in &found {
        tracing::info!(fleet, group = %group.name, "deleting the Auto Scaling group");
        groups.delete(&group.name).await.with_context(|| {
            format!(
                "deleting Auto Scaling group {} of fleet {fleet}",
                group.name
            )
        })?;
    }
    let ids: Vec<String> = instances.into_iter().map(|i| i.id).collect();
    tracing::info!(fleet, ?ids, "terminating");
    compute
        .terminate(&ids)
        .await
        .with_context(|| format!("terminating {} of fleet {fleet}", count(n, "instance")))?;
    let newcomers = wait_gone(compute, fleet, &ids, timeout, poll).await?;
    if !newcomers.is_empty() {
        let listed: Vec<&str> = newcomers.iter().map(|i| i.id.as_str()).collect();
        anyhow::bail!(
            "terminated {}, but fleet {fleet} has {} launched meanwhile ({}; is a rollout running?): run destroy again",
            count(n, "instance"),
            count(newcomers.len(), "instance"),
            listed.join(", ")
        );
    }
    Ok(Outcome::Terminated {
        count: n,
        groups: g,
    })
}

/// Waits until none of `ids` is listed in the fleet; answers the fleet's other instances
/// (any launched while it was being destroyed). Looks first, then sleeps: a cloud that
/// terminates at once costs no wait.
async fn wait_gone<C: Compute>(
    compute: &C,
    fleet: &str,
    ids: &[String],
    timeout: Duration,
    poll: Duration,
) -> anyhow::Result<Vec<Instance>> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = compute
            .instances(fleet)
            .await
            .with_context(|| format!("waiting for the instances of fleet {fleet} to terminate"))?;
        let (left, others): (Vec<Instance>, Vec<Instance>) =
            now.into_iter().partition(|i| ids.contains(&i.id));
        if left.is_empty() {
            return Ok(others);
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            let listed: Vec<String> = left
                .iter()
                .map(|i| format!("{} ({})", i.id, state_name(i.state)))
                .collect();
            anyhow::bail!(
                "{} of fleet {fleet} still not terminated after {} s: {}; run destroy again to keep waiting",
                count(left.len(), "instance"),
                timeout.as_secs(),
                listed.join(", ")
            );
        }
        tracing::debug!(left = left.len(), "waiting for termination");
        tokio::time::sleep(poll.min(remaining)).await;
    }
}

/// Where the rollout journal keeps `fleet`'s entry (pure): `<dir>/<fleet>.json` under
/// `$XDG_STATE_HOME/amictl/rollouts`, else `~/.local/state/amictl/rollouts`, as
/// `Journal::default_location` has it (the journal has no remover of its own; keep the two
/// in step). None when there is no such place, or when the fleet name is not a plain file
/// name (a `/` or `..` in it must not reach another file).
fn journal_file(
    state_home: Option<OsString>,
    home: Option<OsString>,
    fleet: &str,
) -> Option<PathBuf> {
    let name = format!("{fleet}.json");
    let mut parts = Path::new(&name).components();
    if !matches!(
        (parts.next(), parts.next()),
        (Some(Component::Normal(_)), None)
    ) {
        return None;
    }
    let base = state_home
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| home.map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(base.join("amictl/rollouts").join(name))
}

/// Removes `fleet`'s rollout journal entry; Ok(false) when there was none.
fn remove_journal_entry(fleet: &str) -> std::io::Result<bool> {
    let Some(path) = journal_file(
        std::env::var_os("XDG_STATE_HOME"),
        std::env::var_os("HOME"),
        fleet,
    ) else {
        return Ok(false);
    };
    match std::fs::remove_file(&path) {
        Ok(()) => {
            tracing::debug!(path = %path.display(), "removed the rollout journal entry");
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::fleet::{CloudError, Launch};

    /// A fleet whose instances disappear `polls_to_die` listings after TerminateInstances.
    struct Fake {
        instances: Mutex<Vec<Instance>>,
        terminated: Mutex<Vec<String>>,
        /// Listings left before the terminated instances stop being listed.
        polls_to_die: Mutex<usize>,
        /// Listed from the first listing after termination on (a concurrent launch).
        newcomer: Option<Instance>,
    }

    fn inst(id: &str, az: &str) -> Instance {
        Instance {
            id: id.into(),
            az: az.into(),
            image: "ami-1".into(),
            spec: "s".into(),
            state: InstanceState::Running,
            rollout: Some("r1".into()),
            retiring: None,
            address: None,
            group: None,
        }
    }

    impl Fake {
        fn new(ids: &[&str], polls_to_die: usize) -> Self {
            Fake {
                instances: Mutex::new(ids.iter().map(|id| inst(id, "us-east-1a")).collect()),
                terminated: Mutex::new(Vec::new()),
                polls_to_die: Mutex::new(polls_to_die),
                newcomer: None,
            }
        }

        fn terminated(&self) -> Vec<String> {
            self.terminated.lock().unwrap().clone()
        }
    }

    impl Compute for Fake {
        async fn instances(&self, _fleet: &str) -> Result<Vec<Instance>, CloudError> {
            let terminated = self.terminated.lock().unwrap().clone();
            let mut listed = self.instances.lock().unwrap().clone();
            if !terminated.is_empty() {
                let mut polls = self.polls_to_die.lock().unwrap();
                if *polls == 0 {
                    listed.retain(|i| !terminated.contains(&i.id));
                } else {
                    *polls -= 1;
                    for i in listed.iter_mut().filter(|i| terminated.contains(&i.id)) {
                        i.state = InstanceState::Down;
                    }
                }
                listed.extend(self.newcomer.clone());
            }
            Ok(listed)
        }

        async fn launch(&self, _launch: &Launch) -> Result<String, CloudError> {
            unreachable!("destroy launches nothing")
        }

        async fn terminate(&self, ids: &[String]) -> Result<(), CloudError> {
            self.terminated.lock().unwrap().extend(ids.iter().cloned());
            Ok(())
        }

        async fn set_retiring(
            &self,
            _ids: &[String],
            _rollout: Option<&str>,
        ) -> Result<(), CloudError> {
            unreachable!("destroy retires nothing")
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(600);

    fn never_asked(_: &str) -> std::io::Result<bool> {
        panic!("asked without need")
    }

    /// Destroys fleet `web` with the usual timeout and poll; answers the outcome and what
    /// was printed.
    async fn go(
        compute: &impl Compute,
        consent: Consent,
        ask: impl FnOnce(&str) -> std::io::Result<bool>,
    ) -> (anyhow::Result<Outcome>, String) {
        go_within(compute, consent, ask, TIMEOUT).await
    }

    /// [`go`] with another timeout.
    async fn go_within(
        compute: &impl Compute,
        consent: Consent,
        ask: impl FnOnce(&str) -> std::io::Result<bool>,
        timeout: Duration,
    ) -> (anyhow::Result<Outcome>, String) {
        let mut out = Vec::new();
        let outcome = destroy(
            compute,
            &crate::fleet::NoGroups,
            "web",
            consent,
            ask,
            timeout,
            POLL,
            &mut out,
        )
        .await;
        (outcome, String::from_utf8(out).unwrap())
    }

    #[test]
    fn consent_from_flags_and_terminal() {
        assert_eq!(consent(true, false), Consent::Given);
        assert_eq!(consent(true, true), Consent::Given);
        assert_eq!(consent(false, true), Consent::Ask);
        assert_eq!(consent(false, false), Consent::Refuse);
    }

    #[test]
    fn answers() {
        for yes in ["y", "Y", "yes", "YES", " yes\n", "y\n"] {
            assert!(accepts(yes), "{yes:?}");
        }
        for no in ["", "\n", "n", "no", "yess", "ye", "nope", "y e s"] {
            assert!(!accepts(no), "{no:?}");
        }
    }

    #[test]
    fn counts() {
        assert_eq!(count(1, "instance"), "1 instance");
        assert_eq!(count(0, "instance"), "0 instances");
        assert_eq!(count(3, "instance"), "3 instances");
    }

    #[test]
    fn listing_shows_id_az_image_state() {
        let mut b = inst("i-2", "us-east-1b");
        b.state = InstanceState::Pending;
        assert_eq!(
            listing(&[inst("i-1", "us-east-1a"), b]),
            "INSTANCE  AZ          IMAGE  STATE\n\
             i-1       us-east-1a  ami-1  running\n\
             i-2       us-east-1b  ami-1  pending\n"
        );
    }

    #[test]
    fn journal_file_location() {
        let file = journal_file(Some("/state".into()), Some("/home/u".into()), "web");
        assert_eq!(file, Some(PathBuf::from("/state/amictl/rollouts/web.json")));
        let file = journal_file(Some("".into()), Some("/home/u".into()), "web");
        assert_eq!(
            file,
            Some(PathBuf::from(
                "/home/u/.local/state/amictl/rollouts/web.json"
            ))
        );
        assert_eq!(journal_file(None, None, "web"), None);
        assert_eq!(journal_file(Some("/state".into()), None, "a/b"), None);
        assert_eq!(journal_file(Some("/state".into()), None, "../x"), None);
        assert_eq!(journal_file(Some("/state".into()), None, "/etc/x"), None);
    }

    #[test]
    fn journal_file_matches_the_journal() {
        // The journal writes `<dir>/<fleet>.json` under the directory `journal_file` names.
        let dir = tempfile::tempdir().unwrap();
        let path = journal_file(Some(dir.path().into()), None, "web").unwrap();
        let journal = crate::rollout::journal::Journal::at(path.parent().unwrap().into());
        let entry = crate::rollout::journal::Entry {
            rollout: "r1".into(),
            fleet: "web".into(),
            image: "ami-1".into(),
            started_unix: 1,
            state: crate::rollout::journal::State::Done,
        };
        journal.save(&entry).unwrap();
        assert!(path.exists());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(journal.load("web"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_to_destroy_asks_nothing() {
        let fake = Fake::new(&[], 0);
        let (outcome, _) = go(&fake, Consent::Ask, never_asked).await;
        assert_eq!(outcome.unwrap(), Outcome::Nothing);
        assert!(fake.terminated().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn refused_without_a_terminal() {
        let fake = Fake::new(&["i-1", "i-2"], 0);
        let (outcome, out) = go(&fake, Consent::Refuse, never_asked).await;
        assert_eq!(
            outcome.unwrap(),
            Outcome::Refused {
                count: 2,
                groups: 0
            }
        );
        assert!(fake.terminated().is_empty());
        assert!(out.contains("i-1") && out.contains("i-2"), "{out}");
    }

    #[tokio::test(start_paused = true)]
    async fn declined_changes_nothing() {
        let fake = Fake::new(&["i-1", "i-2", "i-3"], 0);
        let mut asked = None;
        let ask = |q: &str| {
            asked = Some(q.to_owned());
            Ok(false)
        };
        let (outcome, _) = go(&fake, Consent::Ask, ask).await;
        assert_eq!(outcome.unwrap(), Outcome::Declined);
        assert_eq!(
            asked.as_deref(),
            Some("Terminate 3 instances of fleet web?")
        );
        assert!(fake.terminated().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn accepted_terminates_and_waits() {
        let fake = Fake::new(&["i-1", "i-2"], 2);
        let start = Instant::now();
        let (outcome, _) = go(&fake, Consent::Ask, |_: &str| Ok(true)).await;
        assert_eq!(
            outcome.unwrap(),
            Outcome::Terminated {
                count: 2,
                groups: 0
            }
        );
        assert_eq!(fake.terminated(), vec!["i-1", "i-2"]);
        // Two listings still show them, the third does not: two polls waited.
        assert_eq!(start.elapsed(), 2 * POLL);
    }

    #[tokio::test(start_paused = true)]
    async fn gone_at_once_costs_no_wait() {
        let fake = Fake::new(&["i-1"], 0);
        let start = Instant::now();
        let (outcome, _) = go(&fake, Consent::Given, never_asked).await;
        assert_eq!(
            outcome.unwrap(),
            Outcome::Terminated {
                count: 1,
                groups: 0
            }
        );
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_has_a_deadline() {
        let fake = Fake::new(&["i-1"], usize::MAX);
        let start = Instant::now();
        let timeout = Duration::from_secs(12);
        let (outcome, _) = go_within(&fake, Consent::Given, never_asked, timeout).await;
        let msg = format!("{:#}", outcome.unwrap_err());
        assert!(msg.contains("i-1 (down)"), "{msg}");
        assert!(msg.contains("after 12 s"), "{msg}");
        assert_eq!(start.elapsed(), Duration::from_secs(12));
    }

    #[tokio::test(start_paused = true)]
    async fn instances_launched_meanwhile_are_reported() {
        let mut fake = Fake::new(&["i-1"], 0);
        fake.newcomer = Some(inst("i-9", "us-east-1b"));
        let (outcome, _) = go(&fake, Consent::Given, never_asked).await;
        let msg = format!("{:#}", outcome.unwrap_err());
        assert!(
            msg.contains("i-9") && msg.contains("run destroy again"),
            "{msg}"
        );
        assert_eq!(fake.terminated(), vec!["i-1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn cloud_errors_say_what_was_being_done() {
        struct Denied;
        impl Compute for Denied {
            async fn instances(&self, _fleet: &str) -> Result<Vec<Instance>, CloudError> {
                Err(CloudError::Denied {
                    action: "ec2:DescribeInstances",
                    message: "not authorized".into(),
                })
            }
            async fn launch(&self, _launch: &Launch) -> Result<String, CloudError> {
                unreachable!()
            }
            async fn terminate(&self, _ids: &[String]) -> Result<(), CloudError> {
                unreachable!()
            }
            async fn set_retiring(
                &self,
                _ids: &[String],
                _rollout: Option<&str>,
            ) -> Result<(), CloudError> {
                unreachable!()
            }
        }
        let (outcome, _) = go(&Denied, Consent::Given, never_asked).await;
        let msg = format!("{:#}", outcome.unwrap_err());
        assert!(msg.contains("listing the instances of fleet web"), "{msg}");
        assert!(msg.contains("ec2:DescribeInstances"), "{msg}");
    }
}
