//! `amictl image list`: this account's amictl AMIs in the region, newest first, as a table
//! or JSON on stdout.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::image::aws::AwsImages;
use crate::image::gc::newest_first;
use crate::image::lifecycle::{short_digest, AmiDetails, ImageLifecycle};
use crate::image::register::{TAG_DIGEST, TAG_MANAGED_BY, TAG_PREFIX};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only AMIs published with this prefix.
    #[arg(long, env = "AMICTL_PREFIX")]
    pub prefix: Option<String>,
    /// JSON (an array, newest first) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// AWS region (else the standard chain: AWS_REGION, the profile).
    #[arg(long)]
    pub region: Option<String>,
}

/// One AMI as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub id: String,
    pub name: String,
    pub state: String,
    pub created: String,
    /// The full `amictl:image-digest` tag value.
    pub digest: Option<String>,
    pub prefix: Option<String>,
    pub public: bool,
    pub deprecation_time: Option<String>,
    /// Instances launched from it (pending, running, stopping or stopped).
    pub instances: Vec<String>,
}

/// The tag filters of a project's AMIs.
pub fn project_tags(prefix: Option<&str>) -> Vec<(&'static str, &str)> {
    let mut tags = vec![(TAG_MANAGED_BY, "amictl")];
    if let Some(p) = prefix {
        tags.push((TAG_PREFIX, p));
    }
    tags
}

/// Rows, newest first (pure).
pub fn rows(amis: Vec<AmiDetails>, in_use: &BTreeMap<String, Vec<String>>) -> Vec<Row> {
    let mut deprecation: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut records = Vec::with_capacity(amis.len());
    for a in amis {
        deprecation.insert(a.record.id.clone(), a.deprecation_time);
        records.push(a.record);
    }
    newest_first(&mut records);
    records
        .into_iter()
        .map(|r| Row {
            digest: r.tag(TAG_DIGEST).map(str::to_owned),
            prefix: r.tag(TAG_PREFIX).map(str::to_owned),
            deprecation_time: deprecation.remove(&r.id).flatten(),
            instances: in_use.get(&r.id).cloned().unwrap_or_default(),
            id: r.id,
            name: r.name,
            state: r.state,
            created: r.created,
            public: r.public,
        })
        .collect()
}

/// A plain table, columns padded to their widest cell (pure).
pub fn table(rows: &[Row]) -> String {
    let header = [
        "ID",
        "NAME",
        "STATE",
        "CREATED",
        "DIGEST",
        "PUBLIC",
        "DEPRECATION",
        "INSTANCES",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.id.clone(),
                r.name.clone(),
                r.state.clone(),
                r.created.clone(),
                r.digest
                    .as_deref()
                    .map(|d| short_digest(d, 12))
                    .unwrap_or_else(|| "-".into()),
                if r.public { "yes" } else { "no" }.into(),
                r.deprecation_time.clone().unwrap_or_else(|| "-".into()),
                if r.instances.is_empty() {
                    "-".into()
                } else {
                    r.instances.len().to_string()
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |row: &[&str]| {
        let mut s = String::new();
        for (i, (c, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(&header);
    for row in &cells {
        out.push_str(&line(&row.each_ref().map(String::as_str)));
    }
    out
}

pub async fn run(args: Args) -> anyhow::Result<i32> {
    let config = crate::aws::load(args.region.as_deref()).await?;
    let aws = AwsImages::new(&config);
    let amis = aws.list(&project_tags(args.prefix.as_deref())).await?;
    let ids: Vec<String> = amis.iter().map(|a| a.record.id.clone()).collect();
    let in_use = aws.instances_using(&ids).await?;
    let rows = rows(amis, &in_use);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if rows.is_empty() {
        eprintln!("no amictl AMIs in {}", aws.region());
    } else {
        print!("{}", table(&rows));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::publish::AmiRecord;

    fn details(id: &str, created: &str, deprecation: Option<&str>) -> AmiDetails {
        AmiDetails {
            record: AmiRecord {
                id: id.into(),
                name: format!("p-{id}"),
                state: "available".into(),
                tags: vec![(
                    TAG_DIGEST.into(),
                    "sha256-blocks-512k:0123456789abcdef0".into(),
                )],
                snapshot_ids: vec![],
                created: created.into(),
                public: id == "ami-b",
            },
            deprecation_time: deprecation.map(str::to_owned),
        }
    }

    #[test]
    fn rows_are_newest_first_with_their_own_details() {
        let rows = rows(
            vec![
                details(
                    "ami-a",
                    "2026-08-01T00:00:00.000Z",
                    Some("2026-09-01T00:00:00.000Z"),
                ),
                details("ami-b", "2026-08-03T00:00:00.000Z", None),
            ],
            &BTreeMap::from([("ami-a".to_owned(), vec!["i-1".to_owned()])]),
        );
        assert_eq!(rows[0].id, "ami-b");
        assert!(
            rows[0].public && rows[0].instances.is_empty() && rows[0].deprecation_time.is_none()
        );
        assert_eq!(rows[1].instances, ["i-1"]);
        assert_eq!(
            rows[1].deprecation_time.as_deref(),
            Some("2026-09-01T00:00:00.000Z")
        );
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("ID "), "{t}");
        assert!(lines[1].starts_with("ami-b  p-ami-b  available"), "{t}");
        assert!(lines[1].contains(" 0123456789ab "), "{t}");
        assert!(lines[2].ends_with(" 1"), "{t}");
    }
}
