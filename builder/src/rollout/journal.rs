//! The local journal of a fleet's rollout: which rollout id is in progress, to which image.
//! The fleet's tags carry the same facts (`amictl:rollout`, `amictl:retiring`), so a lost
//! journal costs nothing but convenience; `resolve` reads both.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::fleet::{Group, Instance};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    InProgress,
    Done,
    RolledBack,
    NeedsAttention,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub rollout: String,
    pub fleet: String,
    pub image: String,
    pub started_unix: u64,
    pub state: State,
}

#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    pub fn at(dir: PathBuf) -> Self {
        Journal { dir }
    }

    /// `$XDG_STATE_HOME/amictl/rollouts`, else `~/.local/state/amictl/rollouts`.
    pub fn default_location() -> Option<Self> {
        let base = std::env::var_os("XDG_STATE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
        Some(Self::at(base.join("amictl/rollouts")))
    }

    fn path(&self, fleet: &str) -> PathBuf {
        self.dir.join(format!("{fleet}.json"))
    }

    pub fn load(&self, fleet: &str) -> Option<Entry> {
        serde_json::from_slice(&std::fs::read(self.path(fleet)).ok()?).ok()
    }

    pub fn save(&self, entry: &Entry) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        serde_json::to_writer_pretty(&tmp, entry)?;
        tmp.persist(self.path(&entry.fleet)).map_err(|e| e.error)?;
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Nothing unfinished: start a new rollout.
    New,
    /// Continue (or abort) this unfinished rollout.
    Resume(String),
    /// An unfinished rollout to another image is in the way.
    Conflict { rollout: String, image: String },
}

/// Which rollout a run continues, from the journal and the fleet's tags (pure): a group
/// or an instance taken out of service names an unfinished rollout, and what that rollout
/// made names its image.
pub fn resolve(
    journal: Option<&Entry>,
    instances: &[Instance],
    groups: &[Group],
    image: &str,
) -> Resolution {
    let unfinished = match journal {
        Some(e) if e.state == State::InProgress => Some((e.rollout.clone(), Some(e.image.clone()))),
        _ => groups
            .iter()
            .find_map(|g| g.retiring.clone())
            .or_else(|| instances.iter().find_map(|i| i.retiring.clone()))
            .map(|r| {
                let target = groups
                    .iter()
                    .find(|g| g.rollout.as_deref() == Some(&r))
                    .map(|g| g.image.clone())
                    .or_else(|| {
                        instances
                            .iter()
                            .find(|i| i.rollout.as_deref() == Some(&r))
                            .map(|i| i.image.clone())
                    });
                (r, target)
            }),
    };
    match unfinished {
        None => Resolution::New,
        Some((r, None)) => Resolution::Resume(r),
        Some((r, Some(target))) if target == image => Resolution::Resume(r),
        Some((rollout, Some(image))) => Resolution::Conflict { rollout, image },
    }
}

/// A new rollout id: time-ordered, unique enough, short.
pub fn new_id(now_unix: u64) -> String {
    format!("r-{now_unix:x}-{:04x}", fastrand::u16(..))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::InstanceState;

    fn inst(id: &str, image: &str, rollout: Option<&str>, retiring: Option<&str>) -> Instance {
        Instance {
            id: id.into(),
            az: "a".into(),
            image: image.into(),
            spec: "s".into(),
            state: InstanceState::Running,
            rollout: rollout.map(Into::into),
            retiring: retiring.map(Into::into),
            address: None,
            group: None,
        }
    }

    #[test]
    fn resolution() {
        assert_eq!(
            resolve(None, &[inst("1", "old", None, None)], &[], "new"),
            Resolution::New
        );
        let fleet = [
            inst("1", "old", None, Some("r1")),
            inst("2", "new", Some("r1"), None),
        ];
        assert_eq!(
            resolve(None, &fleet, &[], "new"),
            Resolution::Resume("r1".into())
        );
        assert_eq!(
            resolve(None, &fleet, &[], "newer"),
            Resolution::Conflict {
                rollout: "r1".into(),
                image: "new".into()
            }
        );
        let entry = Entry {
            rollout: "r2".into(),
            fleet: "f".into(),
            image: "new".into(),
            started_unix: 0,
            state: State::InProgress,
        };
        assert_eq!(
            resolve(Some(&entry), &[], &[], "new"),
            Resolution::Resume("r2".into())
        );
        let done = Entry {
            state: State::Done,
            ..entry
        };
        assert_eq!(resolve(Some(&done), &[], &[], "new"), Resolution::New);
    }

    #[test]
    fn journal_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::at(dir.path().join("r"));
        assert_eq!(j.load("web"), None);
        let e = Entry {
            rollout: new_id(1),
            fleet: "web".into(),
            image: "ami-1".into(),
            started_unix: 1,
            state: State::InProgress,
        };
        j.save(&e).unwrap();
        assert_eq!(j.load("web"), Some(e));
    }
}
