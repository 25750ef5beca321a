//! `image gc`, the decision (pure): of a project's AMIs, which to deregister (with which
//! snapshots) and why each other one stays.

use std::collections::BTreeMap;
use std::fmt;

use super::publish::AmiRecord;
use super::register::TAG_SNAPSHOT;

/// Why an AMI stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keep {
    /// Among the newest `--keep` available AMIs (1 is the newest).
    Newest(usize),
    /// Instances (pending, running, stopping or stopped) were launched from it.
    InUse(Vec<String>),
    /// Still `pending`: a publish or copy is under way.
    Pending,
}

impl fmt::Display for Keep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Keep::Newest(1) => f.write_str("newest"),
            Keep::Newest(n) => write!(f, "newest #{n}"),
            Keep::InUse(ids) => write!(f, "in use by {}", ids.join(", ")),
            Keep::Pending => f.write_str("pending"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub ami: AmiRecord,
    pub why: Keep,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doomed {
    pub ami: AmiRecord,
    /// Deleted once the AMI is deregistered.
    pub snapshots: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcPlan {
    /// Newest first, like `delete`.
    pub keep: Vec<Kept>,
    pub delete: Vec<Doomed>,
}

/// Newest first; equal creation times (EC2 reports whole seconds) by id, so the order is
/// the same every time.
pub fn newest_first(amis: &mut [AmiRecord]) {
    amis.sort_by(|a, b| (&b.created, &b.id).cmp(&(&a.created, &a.id)));
}

/// The AMI's snapshots: those of its block device mapping and the one its
/// `amictl:snapshot-id` tag names, each once.
pub fn snapshots_of(ami: &AmiRecord) -> Vec<String> {
    let mut out = ami.snapshot_ids.clone();
    if let Some(tagged) = ami.tag(TAG_SNAPSHOT) {
        out.push(tagged.to_owned());
    }
    let mut seen = std::collections::BTreeSet::new();
    out.retain(|s| !s.is_empty() && seen.insert(s.clone()));
    out
}

/// Keeps the newest `keep` available AMIs, every AMI an instance uses and every pending one;
/// the rest (older available ones, failed ones) go.
pub fn plan(
    mut amis: Vec<AmiRecord>,
    in_use: &BTreeMap<String, Vec<String>>,
    keep: usize,
) -> GcPlan {
    newest_first(&mut amis);
    let mut out = GcPlan::default();
    let mut newest = 0;
    for ami in amis {
        let why = if ami.state == "pending" {
            Some(Keep::Pending)
        } else if ami.state == "available" && newest < keep {
            newest += 1;
            Some(Keep::Newest(newest))
        } else {
            in_use
                .get(&ami.id)
                .filter(|ids| !ids.is_empty())
                .map(|ids| Keep::InUse(ids.clone()))
        };
        match why {
            Some(why) => out.keep.push(Kept { ami, why }),
            None => out.delete.push(Doomed {
                snapshots: snapshots_of(&ami),
                ami,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ami(id: &str, created: &str, state: &str) -> AmiRecord {
        AmiRecord {
            id: id.into(),
            name: format!("p-{id}"),
            state: state.into(),
            tags: vec![(TAG_SNAPSHOT.into(), format!("snap-{id}"))],
            snapshot_ids: vec![format!("snap-bdm-{id}")],
            created: format!("2026-08-{created}T00:00:00.000Z"),
            public: false,
        }
    }

    fn ids<T>(v: &[T], f: impl Fn(&T) -> &AmiRecord) -> Vec<String> {
        v.iter().map(|x| f(x).id.clone()).collect()
    }

    #[test]
    fn keeps_the_newest_and_what_instances_use() {
        let amis = vec![
            ami("a", "01", "available"),
            ami("d", "04", "available"),
            ami("b", "02", "available"),
            ami("c", "03", "available"),
        ];
        let in_use = BTreeMap::from([("a".to_owned(), vec!["i-1".to_owned()])]);
        let p = plan(amis, &in_use, 2);
        assert_eq!(ids(&p.keep, |k| &k.ami), ["d", "c", "a"]);
        assert_eq!(
            p.keep.iter().map(|k| k.why.clone()).collect::<Vec<_>>(),
            [
                Keep::Newest(1),
                Keep::Newest(2),
                Keep::InUse(vec!["i-1".into()])
            ]
        );
        assert_eq!(ids(&p.delete, |d| &d.ami), ["b"]);
        assert_eq!(p.delete[0].snapshots, ["snap-bdm-b", "snap-b"]);
    }

    #[test]
    fn pending_stays_and_does_not_take_a_slot_failed_goes() {
        let amis = vec![
            ami("new", "05", "pending"),
            ami("broken", "04", "failed"),
            ami("good", "03", "available"),
            ami("old", "01", "available"),
        ];
        let p = plan(amis, &BTreeMap::new(), 1);
        assert_eq!(ids(&p.keep, |k| &k.ami), ["new", "good"]);
        assert_eq!(p.keep[0].why, Keep::Pending);
        assert_eq!(p.keep[1].why, Keep::Newest(1));
        assert_eq!(ids(&p.delete, |d| &d.ami), ["broken", "old"]);
    }

    #[test]
    fn keep_zero_deletes_every_unused_one_and_empty_is_empty() {
        let p = plan(
            vec![ami("a", "01", "available"), ami("b", "02", "available")],
            &BTreeMap::from([("b".to_owned(), vec!["i-9".to_owned()])]),
            0,
        );
        assert_eq!(ids(&p.keep, |k| &k.ami), ["b"]);
        assert_eq!(ids(&p.delete, |d| &d.ami), ["a"]);
        assert_eq!(plan(vec![], &BTreeMap::new(), 3), GcPlan::default());
        // Keeping more than there are deletes nothing.
        let p = plan(vec![ami("a", "01", "available")], &BTreeMap::new(), 5);
        assert!(p.delete.is_empty());
    }

    #[test]
    fn same_second_ties_are_broken_by_id_and_snapshots_are_deduplicated() {
        let mut a = ami("a", "01", "available");
        a.snapshot_ids = vec!["snap-a".into()];
        let p = plan(vec![a, ami("b", "01", "available")], &BTreeMap::new(), 1);
        assert_eq!(ids(&p.keep, |k| &k.ami), ["b"]);
        assert_eq!(p.delete[0].snapshots, ["snap-a"]);
    }
}
