//! A local fleet's state: `fleet.json` in the fleet's directory, changed only under an
//! exclusive lock on `fleet.lock`, written atomically, so concurrent amictl commands (a
//! rollout and a `health --heal`, say) never lose each other's changes.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What `fleet.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetState {
    pub fleet: String,
    /// The load balancer's address: the fleet's URL.
    pub listen: SocketAddr,
    /// The `ami-agent` the instances run.
    pub agent: PathBuf,
    /// The release the last rollout asked for, and its settings: what `health --heal`
    /// restores.
    pub image: Option<String>,
    pub per_az: usize,
    pub health_command: String,
    /// Bumped on every change of `targets`.
    pub generation: u64,
    /// Instances registered with the load balancer.
    pub targets: Vec<String>,
    pub instances: BTreeMap<String, InstanceRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: String,
    pub az: String,
    pub image: String,
    pub spec: String,
    pub rollout: String,
    pub retiring: Option<String>,
    /// The launch token: a repeated launch returns this instance.
    pub token: String,
    pub name: String,
    pub port: u16,
    pub pid: Option<u32>,
    pub launched_unix: u64,
    /// Kept after termination so a repeated launch token still finds its instance.
    pub terminated: bool,
}

impl InstanceRecord {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is damaged ({message}); `amictl destroy --provider local --fleet {fleet}` stops whatever it still runs")]
    Damaged {
        path: PathBuf,
        fleet: String,
        message: String,
    },
    #[error("no local fleet {0}: create it with `amictl rollout --provider local --fleet {0} --content DIR`")]
    NoFleet(String),
    #[error("fleet name {0:?} is not usable here: use 1-40 letters, digits, `-` or `_`")]
    BadName(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `$XDG_STATE_HOME/amictl/local`, else `~/.local/state/amictl/local`.
pub fn root() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(base.join("amictl/local"))
}

/// Fleet names become directory names: keep them plain.
pub fn valid_name(name: &str) -> bool {
    (1..=40).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One fleet's directory and its locked state file.
#[derive(Debug, Clone)]
pub struct Store {
    pub fleet: String,
    pub dir: PathBuf,
}

impl Store {
    pub fn new(root: &Path, fleet: &str) -> Result<Self, StateError> {
        if !valid_name(fleet) {
            return Err(StateError::BadName(fleet.to_owned()));
        }
        Ok(Store {
            fleet: fleet.to_owned(),
            dir: root.join(fleet),
        })
    }

    /// The fleet in the default location.
    pub fn open(fleet: &str) -> Result<Self, StateError> {
        let root = root().ok_or_else(|| StateError::Io {
            path: PathBuf::from("$XDG_STATE_HOME"),
            source: std::io::Error::other("neither XDG_STATE_HOME nor HOME is set"),
        })?;
        Self::new(&root, fleet)
    }

    fn file(&self) -> PathBuf {
        self.dir.join("fleet.json")
    }
    pub fn instance_dir(&self, id: &str) -> PathBuf {
        self.dir.join("instances").join(id)
    }
    pub fn balancer_dir(&self) -> PathBuf {
        self.dir.join("balancer")
    }
    pub fn releases_dir(&self) -> PathBuf {
        self.dir.join("releases")
    }
    /// The fleet's lock ([`crate::lock::file`]): held by whatever is changing the fleet.
    pub fn lease_path(&self) -> PathBuf {
        self.dir.join("lease.json")
    }

    pub fn exists(&self) -> bool {
        self.file().exists()
    }

    /// The state as it is now (no lock: the file is replaced atomically).
    pub fn load(&self) -> Result<FleetState, StateError> {
        let path = self.file();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NoFleet(self.fleet.clone()))
            }
            Err(e) => return Err(io(&path)(e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| StateError::Damaged {
            path,
            fleet: self.fleet.clone(),
            message: e.to_string(),
        })
    }

    /// Creates the fleet if it does not exist yet.
    pub fn create(&self, initial: FleetState) -> Result<FleetState, StateError> {
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let _lock = self.lock()?;
        match self.load() {
            Ok(existing) => Ok(existing),
            Err(StateError::NoFleet(_)) => {
                self.save(&initial)?;
                Ok(initial)
            }
            Err(e) => Err(e),
        }
    }

    /// Changes the state under the lock; nothing is written when `f` fails.
    pub fn update<T, E: From<StateError>>(
        &self,
        f: impl FnOnce(&mut FleetState) -> Result<T, E>,
    ) -> Result<T, E> {
        let _lock = self.lock()?;
        let mut state = self.load()?;
        let out = f(&mut state)?;
        self.save(&state)?;
        Ok(out)
    }

    fn lock(&self) -> Result<File, StateError> {
        let path = self.dir.join("fleet.lock");
        let file = File::create(&path).map_err(io(&path))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io(&path)(e.into()))?;
        Ok(file)
    }

    fn save(&self, state: &FleetState) -> Result<(), StateError> {
        let path = self.file();
        write_atomic(
            &path,
            &serde_json::to_vec_pretty(state).expect("state serializes"),
        )
        .map_err(io(&path))
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(fleet: &str) -> FleetState {
        FleetState {
            fleet: fleet.into(),
            listen: "127.0.0.1:8080".parse().unwrap(),
            agent: "/bin/true".into(),
            image: None,
            per_az: 2,
            health_command: "true".into(),
            generation: 0,
            targets: vec![],
            instances: BTreeMap::new(),
        }
    }

    #[test]
    fn names_are_checked_and_updates_are_kept_or_dropped_whole() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Store::new(dir.path(), "../x"),
            Err(StateError::BadName(_))
        ));
        let store = Store::new(dir.path(), "web").unwrap();
        assert!(matches!(store.load(), Err(StateError::NoFleet(_))));
        store.create(state("web")).unwrap();
        // A second create keeps what is there.
        let mut other = state("web");
        other.per_az = 5;
        assert_eq!(store.create(other).unwrap().per_az, 2);
        store
            .update(|s| {
                s.generation += 1;
                Ok::<_, StateError>(())
            })
            .unwrap();
        let failed: Result<(), StateError> = store.update(|s| {
            s.generation += 10;
            Err(StateError::NoFleet("boom".into()))
        });
        assert!(failed.is_err());
        assert_eq!(store.load().unwrap().generation, 1);
        std::fs::write(store.dir.join("fleet.json"), "{").unwrap();
        let e = store.load().unwrap_err().to_string();
        assert!(
            e.contains("amictl destroy --provider local --fleet web"),
            "{e}"
        );
    }
}
