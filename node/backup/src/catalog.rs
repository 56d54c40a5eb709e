//! Backup object names, listing, and retention.
//!
//! A backup of cluster `demo` taken at 2026-12-02 06:15:00 UTC at revision 1234 is the object
//! `demo-20261202T061500Z-r1234.rkvsnap` in its destination. The name alone carries the
//! cluster, time and revision, so listing and retention never read an object's contents or
//! trust a store's modification times, and a name that does not parse is never touched.

use futures::TryStreamExt;
use jiff::{SignedDuration, Timestamp};
use object_store::ObjectStoreExt;

use crate::{Destination, Result};

/// The suffix of every backup object.
pub const SUFFIX: &str = ".rkvsnap";

/// One backup object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupObject {
    /// The object's name inside its destination.
    pub name: String,
    /// The cluster it was taken from.
    pub cluster: String,
    /// When it was taken (second precision).
    pub time: Timestamp,
    /// The revision of the snapshot.
    pub revision: u64,
    /// Its size in bytes, when known from a listing.
    pub size: Option<u64>,
}

/// The object name of a backup of `cluster` taken at `time` at `revision`.
pub fn object_name(cluster: &str, time: Timestamp, revision: u64) -> String {
    format!("{cluster}-{}-r{revision}{SUFFIX}", time.strftime("%Y%m%dT%H%M%SZ"))
}

/// Parses a name made by [`object_name`] for `cluster`; `None` for any other name, including
/// another cluster's whose name starts with this one's (`demo-2-...` is not `demo`'s).
pub fn parse_object_name(cluster: &str, name: &str) -> Option<BackupObject> {
    let rest = name.strip_prefix(cluster)?.strip_prefix('-')?.strip_suffix(SUFFIX)?;
    let (time, revision) = rest.split_once("-r")?;
    if time.len() != 16 || !revision.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let time = jiff::civil::DateTime::strptime("%Y%m%dT%H%M%SZ", time).ok()?;
    Some(BackupObject {
        name: name.to_string(),
        cluster: cluster.to_string(),
        time: time.to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp(),
        revision: revision.parse().ok()?,
        size: None,
    })
}

/// Backups of `cluster` in `dest`, newest first. Objects of other clusters and anything else
/// in the folder are left out.
pub async fn list_backups(dest: &Destination, cluster: &str) -> Result<Vec<BackupObject>> {
    let mut found = Vec::new();
    let mut listing = dest.store().list(Some(dest.prefix()));
    while let Some(meta) = listing.try_next().await? {
        // Only objects directly in the folder: a name below a deeper folder is not ours.
        let Some(name) = meta.location.as_ref().strip_prefix(dest.prefix().as_ref()) else {
            continue;
        };
        let name = name.trim_start_matches('/');
        if name.contains('/') {
            continue;
        }
        if let Some(mut b) = parse_object_name(cluster, name) {
            b.size = Some(meta.size);
            found.push(b);
        }
    }
    sort_newest_first(&mut found);
    Ok(found)
}

fn sort_newest_first(backups: &mut [BackupObject]) {
    backups.sort_by(|a, b| (b.time, b.revision, &b.name).cmp(&(a.time, a.revision, &a.name)));
}

/// How many backups to keep. An object is kept when either rule keeps it, and the newest
/// backup is always kept, so retention never deletes the only way back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep the newest N backups.
    pub keep_last: Option<u32>,
    /// Keep every backup younger than D days.
    pub keep_days: Option<u32>,
}

/// The backups `retention` lets go of at `now`, oldest first. With no rule set nothing is
/// pruned.
pub fn to_prune(backups: &[BackupObject], retention: Retention, now: Timestamp) -> Vec<BackupObject> {
    if retention.keep_last.is_none() && retention.keep_days.is_none() {
        return Vec::new();
    }
    let mut sorted = backups.to_vec();
    sort_newest_first(&mut sorted);
    let mut prune: Vec<BackupObject> = sorted
        .into_iter()
        .enumerate()
        .filter(|(i, b)| {
            let kept_by_count = retention.keep_last.is_some_and(|n| (*i as u64) < u64::from(n.max(1)));
            let kept_by_age = retention
                .keep_days
                .is_some_and(|d| now.duration_since(b.time) < SignedDuration::from_hours(24 * i64::from(d)));
            *i > 0 && !kept_by_count && !kept_by_age
        })
        .map(|(_, b)| b)
        .collect();
    prune.reverse();
    prune
}

/// Deletes the backups of `cluster` that `retention` lets go of; returns their names.
pub async fn prune(dest: &Destination, cluster: &str, retention: Retention, now: Timestamp) -> Result<Vec<String>> {
    let backups = list_backups(dest, cluster).await?;
    let mut deleted = Vec::new();
    for b in to_prune(&backups, retention, now) {
        dest.store().delete(&dest.path_of(&b.name)).await?;
        tracing::info!(object = %b.name, revision = b.revision, "pruned backup");
        deleted.push(b.name);
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn backup(time: &str, revision: u64) -> BackupObject {
        let time = at(time);
        BackupObject {
            name: object_name("demo", time, revision),
            cluster: "demo".into(),
            time,
            revision,
            size: None,
        }
    }

    fn names(v: &[BackupObject]) -> Vec<u64> {
        v.iter().map(|b| b.revision).collect()
    }

    #[test]
    fn names_round_trip_and_other_clusters_names_do_not_parse() {
        let t = at("2026-12-02T06:15:00Z");
        let name = object_name("demo", t, 1234);
        assert_eq!(name, "demo-20261202T061500Z-r1234.rkvsnap");
        let b = parse_object_name("demo", &name).unwrap();
        assert_eq!((b.time, b.revision), (t, 1234));
        assert!(parse_object_name("demo", &object_name("demo-2", t, 1)).is_none());
        assert!(parse_object_name("demo-2", &name).is_none());
        for bad in [
            "demo-20261202T061500Z-r12.snap",
            "demo-2026-r1.rkvsnap",
            "demo-20261202T061500Z-rx.rkvsnap",
            "demo.rkvsnap",
        ] {
            assert!(parse_object_name("demo", bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn keep_last_keeps_the_newest_n() {
        let all = [
            backup("2026-12-01T00:00:00Z", 1),
            backup("2026-12-03T00:00:00Z", 3),
            backup("2026-12-02T00:00:00Z", 2),
            backup("2026-12-04T00:00:00Z", 4),
        ];
        let r = Retention {
            keep_last: Some(2),
            keep_days: None,
        };
        assert_eq!(names(&to_prune(&all, r, at("2026-12-05T00:00:00Z"))), vec![1, 2]);
    }

    #[test]
    fn keep_days_keeps_what_is_younger_than_d_days() {
        let all = [
            backup("2026-11-20T00:00:00Z", 1),
            backup("2026-11-28T00:00:01Z", 2),
            backup("2026-12-04T00:00:00Z", 3),
        ];
        let r = Retention {
            keep_last: None,
            keep_days: Some(7),
        };
        assert_eq!(names(&to_prune(&all, r, at("2026-12-05T00:00:00Z"))), vec![1]);
    }

    #[test]
    fn either_rule_keeps_a_backup_and_the_newest_is_always_kept() {
        let all = [
            backup("2026-10-01T00:00:00Z", 1),
            backup("2026-10-02T00:00:00Z", 2),
            backup("2026-10-03T00:00:00Z", 3),
        ];
        let now = at("2026-12-05T00:00:00Z");
        // Every backup is older than 7 days; keep_last still keeps two.
        let r = Retention {
            keep_last: Some(2),
            keep_days: Some(7),
        };
        assert_eq!(names(&to_prune(&all, r, now)), vec![1]);
        // Age alone would drop all three; the newest stays.
        let r = Retention {
            keep_last: None,
            keep_days: Some(7),
        };
        assert_eq!(names(&to_prune(&all, r, now)), vec![1, 2]);
    }

    #[test]
    fn without_rules_nothing_is_pruned() {
        let all = [backup("2026-10-01T00:00:00Z", 1), backup("2026-10-02T00:00:00Z", 2)];
        assert!(to_prune(&all, Retention::default(), at("2027-01-01T00:00:00Z")).is_empty());
    }
}
