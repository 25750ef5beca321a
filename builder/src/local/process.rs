//! Detached processes (instances, the load balancer) and how their liveness is known.
//!
//! A process is alive while it holds the exclusive flock on its `lock` file: amictl takes
//! the lock, hands the descriptor to the child across exec, and lets go of its own copy.
//! The kernel drops the lock when the process exits, however it exits, so there is no pid
//! to go stale and no zombie to mistake for a live process.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};

/// Whether some process holds the lock at `path`.
pub fn is_alive(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        // Nobody had it; closing `file` lets it go again.
        Ok(()) => false,
        Err(_) => true,
    }
}

/// Starts `cmd` in its own session (a Ctrl-C in amictl's terminal does not reach it),
/// stdin from /dev/null, stdout and stderr appended to `log`, holding the lock at `lock`
/// for its whole life. Returns its pid.
pub fn spawn_detached(mut cmd: Command, log: &Path, lock: &Path) -> std::io::Result<u32> {
    let lock_file = File::create(lock)?;
    flock(&lock_file, FlockOperation::NonBlockingLockExclusive).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} is held by a running process ({e})", lock.display()),
        )
    })?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    let fd = lock_file.as_fd().try_clone_to_owned()?;
    // SAFETY: setsid and fcntl are async-signal-safe system calls; nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::setsid()?;
            // Keep the locked descriptor open across exec: the child now holds the lock.
            rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::empty())?;
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    // Reap it if it exits while amictl still runs; after amictl exits, init does.
    std::thread::spawn(move || child.wait());
    drop(lock_file);
    Ok(pid)
}

/// Asks the process holding `lock` (pid `pid`) to stop with SIGTERM, waits up to `grace`
/// for it to exit, then kills it. True when it had to be killed.
pub async fn stop(pid: u32, lock: &Path, grace: Duration) -> bool {
    if !is_alive(lock) {
        return false;
    }
    signal(pid, rustix::process::Signal::TERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !is_alive(lock) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if is_alive(lock) {
        signal(pid, rustix::process::Signal::KILL);
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_alive(lock) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        return true;
    }
    false
}

/// Signals the process's whole group: it leads its own session, so anything it started
/// (and that inherited the lock) goes with it.
fn signal(pid: u32, sig: rustix::process::Signal) {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    // Already gone is fine.
    if rustix::process::kill_process_group(pid, sig).is_err() {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// The last `lines` lines of a log file, for error messages.
pub fn tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_detached_process_holds_its_lock_until_it_stops() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("lock");
        let log = dir.path().join("log");
        assert!(!is_alive(&lock));
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("echo started; exec sleep 30");
        let pid = spawn_detached(cmd, &log, &lock).unwrap();
        assert!(is_alive(&lock));
        let deadline = Instant::now() + Duration::from_secs(5);
        while tail(&log, 5).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(tail(&log, 5), "started");
        // A second process cannot take the same lock.
        let e = spawn_detached(Command::new("true"), &log, &lock).unwrap_err();
        assert!(e.to_string().contains("held by a running process"), "{e}");
        assert!(!stop(pid, &lock, Duration::from_secs(5)).await);
        assert!(!is_alive(&lock));
    }

    #[tokio::test]
    async fn a_process_ignoring_sigterm_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("lock");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("trap '' TERM; while true; do sleep 1; done");
        let pid = spawn_detached(cmd, &dir.path().join("log"), &lock).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(stop(pid, &lock, Duration::from_millis(300)).await);
        assert!(!is_alive(&lock));
    }
}
