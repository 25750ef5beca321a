//! What the cross-crate tests share: where the binaries under test are, and whether a
//! process of the local fleet is alive.
//!
//! The binaries come from `AMICTL` and `AMI_AGENT` when set (the flake's check points them
//! at the built packages), else from the cargo target directory these tests were built
//! into. Cargo builds them there for `cargo test --workspace`; `cargo test -p tests` alone
//! does not, and [`bin`] says so.

use std::fs::File;
use std::path::{Path, PathBuf};

/// The `amictl` binary under test.
pub fn amictl() -> PathBuf {
    bin("AMICTL", "amictl", "builder")
}

/// The `ami-agent` binary under test.
pub fn ami_agent() -> PathBuf {
    bin("AMI_AGENT", "ami-agent", "agent")
}

fn bin(var: &str, name: &str, package: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(var) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{var}={} is not a file: point it at the {name} binary, or unset it",
            path.display()
        );
        return path;
    }
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/<name>
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("a test binary inside a cargo target directory");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first (cargo build -p {package} with this profile, or \
         cargo test --workspace), or set {var} to the binary",
        path.display()
    );
    path
}

/// Whether the process that holds the lock at `path` is alive: the local fleet's
/// processes hold an exclusive flock on their directory's `lock` file for their whole
/// life, so a lock nobody holds means nobody is there.
pub fn is_alive(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err()
}
