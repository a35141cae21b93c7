//! Which backups to keep: the newest N, the newest of each of the last N days, ISO weeks and
//! months that have backups, and always the newest verified one.
//! The counts apply to backups dated up to "now"; a backup dated in the future (a clock that
//! jumped back) is kept and takes no one's place.
//!
//! [`plan`] is a pure function of the backups, the policy and "now", so it is tested over
//! hundreds of simulated days without waiting. Calendar buckets are UTC days, ISO weeks and
//! months. A policy that keeps nothing (every count 0) deletes nothing: pruning is opt-in. A
//! backup's ID breaks ties between equal times.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

/// The `[retention]` table.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Policy {
    /// Keep this many newest backups.
    #[serde(default)]
    pub(crate) keep_last: u32,
    /// Keep the newest backup of each of this many most recent days that have one.
    #[serde(default)]
    pub(crate) keep_daily: u32,
    /// Likewise for ISO weeks.
    #[serde(default)]
    pub(crate) keep_weekly: u32,
    /// Likewise for months.
    #[serde(default)]
    pub(crate) keep_monthly: u32,
}

impl Policy {
    /// Whether this policy ever deletes anything.
    pub(crate) fn prunes(&self) -> bool {
        self.keep_last + self.keep_daily + self.keep_weekly + self.keep_monthly > 0
    }
}

/// One complete backup of one subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// Its ID.
    pub(crate) id: String,
    /// When it was taken.
    pub(crate) time: Timestamp,
    /// Whether a restore test of it succeeded.
    pub(crate) verified: bool,
}

/// Why a backup is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Reason {
    /// Among the newest `keep_last`.
    Last,
    /// Newest of its day.
    Daily,
    /// Newest of its ISO week.
    Weekly,
    /// Newest of its month.
    Monthly,
    /// The newest verified backup.
    NewestVerified,
    /// Dated after "now".
    Future,
    /// The policy keeps everything.
    NoPolicy,
}

/// The decision for a subject's backups.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Kept, with why, newest first.
    pub(crate) keep: Vec<(String, BTreeSet<Reason>)>,
    /// To delete, newest first.
    pub(crate) delete: Vec<String>,
}

/// The calendar bucket (day, ISO week or month) a time falls in.
type BucketOf = fn(Timestamp) -> (i32, i32, i32);

/// Decides what to keep among one subject's backups.
pub(crate) fn plan(backups: &[Candidate], policy: &Policy, now: Timestamp) -> Plan {
    let mut sorted: Vec<&Candidate> = backups.iter().collect();
    sorted.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id)));
    let mut reasons: BTreeMap<usize, BTreeSet<Reason>> = BTreeMap::new();
    let mut mark = |index: usize, reason: Reason| {
        reasons.entry(index).or_default().insert(reason);
    };

    if !policy.prunes() {
        for i in 0..sorted.len() {
            mark(i, Reason::NoPolicy);
        }
    }
    // Future-dated backups sort first; the counts start after them.
    let future = sorted.iter().take_while(|b| b.time > now).count();
    for i in 0..future {
        mark(i, Reason::Future);
    }
    for i in future..sorted.len().min(future + policy.keep_last as usize) {
        mark(i, Reason::Last);
    }
    let buckets: [(u32, Reason, BucketOf); 3] = [
        (policy.keep_daily, Reason::Daily, |t| {
            let d = t.to_zoned(TimeZone::UTC).date();
            (
                i32::from(d.year()),
                i32::from(d.month()),
                i32::from(d.day()),
            )
        }),
        (policy.keep_weekly, Reason::Weekly, |t| {
            let w = t.to_zoned(TimeZone::UTC).date().iso_week_date();
            (i32::from(w.year()), i32::from(w.week()), 0)
        }),
        (policy.keep_monthly, Reason::Monthly, |t| {
            let d = t.to_zoned(TimeZone::UTC).date();
            (i32::from(d.year()), i32::from(d.month()), 0)
        }),
    ];
    for (count, reason, bucket_of) in buckets {
        let mut seen = BTreeSet::new();
        for (i, backup) in sorted.iter().enumerate().skip(future) {
            if seen.len() >= count as usize {
                break;
            }
            if seen.insert(bucket_of(backup.time)) {
                mark(i, reason);
            }
        }
    }
    if let Some(i) = sorted.iter().position(|b| b.verified) {
        mark(i, Reason::NewestVerified);
    }

    let mut result = Plan::default();
    for (i, backup) in sorted.iter().enumerate() {
        match reasons.remove(&i) {
            Some(why) => result.keep.push((backup.id.clone(), why)),
            None => result.delete.push(backup.id.clone()),
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use jiff::SignedDuration;

    use super::*;

    fn day(n: i64, hour: i64) -> Timestamp {
        let start: Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
        start + SignedDuration::from_hours(24 * n + hour)
    }

    #[test]
    fn four_hundred_simulated_days_keep_exactly_the_expected_set() {
        let policy = Policy {
            keep_last: 3,
            keep_daily: 7,
            keep_weekly: 4,
            keep_monthly: 6,
        };
        // Two backups a day (03:00 and 15:00) for 400 days, pruned after every run, as a
        // daemon would; every 10th day's morning backup is verified.
        let mut stored: Vec<Candidate> = Vec::new();
        for n in 0..400 {
            for hour in [3, 15] {
                let time = day(n, hour);
                stored.push(Candidate {
                    id: time.to_string(),
                    time,
                    verified: n % 10 == 0 && hour == 3,
                });
                let decision = plan(&stored, &policy, time);
                stored.retain(|c| !decision.delete.contains(&c.id));
            }
        }
        let now = day(399, 15);
        // Expected, computed directly from the calendar rather than by the algorithm:
        let mut expected: BTreeSet<Timestamp> = BTreeSet::new();
        // last 3: day 399 15:00, day 399 03:00, day 398 15:00
        expected.extend([day(399, 15), day(399, 3), day(398, 15)]);
        // daily 7: the 15:00 backup of days 393..=399
        expected.extend((393..=399).map(|n| day(n, 15)));
        // weekly 4: the newest backup of the last 4 ISO weeks: the last Sunday 15:00 of each
        // complete week and the newest of the current one.
        let tz = TimeZone::UTC;
        let mut weeks = BTreeSet::new();
        let mut monthly = BTreeSet::new();
        for n in (0..400).rev() {
            let t = day(n, 15);
            let date = t.to_zoned(tz.clone()).date();
            let w = date.iso_week_date();
            if weeks.len() < 4 && weeks.insert((w.year(), w.week())) {
                expected.insert(t);
            }
            if monthly.len() < 6 && monthly.insert((date.year(), date.month())) {
                expected.insert(t);
            }
        }
        // newest verified: day 390 03:00
        expected.insert(day(390, 3));
        let kept: BTreeSet<Timestamp> = stored.iter().map(|c| c.time).collect();
        assert_eq!(kept, expected, "kept {} backups", kept.len());
        let final_plan = plan(&stored, &policy, now);
        assert!(final_plan.delete.is_empty(), "a settled set stays settled");
    }

    #[test]
    fn the_newest_verified_backup_survives_any_policy() {
        let backups: Vec<Candidate> = (0..10)
            .map(|n| Candidate {
                id: format!("b{n}"),
                time: day(n, 0),
                verified: n == 2,
            })
            .collect();
        let policy = Policy {
            keep_last: 1,
            ..Policy::default()
        };
        let decision = plan(&backups, &policy, day(20, 0));
        let kept: Vec<&str> = decision.keep.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(kept, ["b9", "b2"]);
        assert_eq!(decision.delete.len(), 8);
    }

    #[test]
    fn an_empty_policy_deletes_nothing_and_future_backups_take_no_place() {
        let at = |id: &str, n| Candidate {
            id: id.into(),
            time: day(n, 0),
            verified: false,
        };
        let backups = vec![at("old", 0), at("recent", 5), at("future", 50)];
        assert!(
            plan(&backups, &Policy::default(), day(10, 0))
                .delete
                .is_empty()
        );
        let policy = Policy {
            keep_last: 1,
            ..Policy::default()
        };
        let decision = plan(&backups, &policy, day(10, 0));
        let kept: Vec<&str> = decision.keep.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(kept, ["future", "recent"]);
        assert_eq!(decision.delete, ["old"]);
    }
}
