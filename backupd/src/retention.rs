//! Which backups to keep: the newest N, the newest of each of the last N days, ISO weeks,
//! months and years that have backups, every backup within a span of the newest one
//! (`keep_within`, restic's meaning: measured from the newest backup, not from now, so backups
//! that stopped coming are not all aged out), and always the newest verified one.
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
    /// Likewise for years.
    #[serde(default)]
    pub(crate) keep_yearly: u32,
    /// Keep every backup taken within this span before the newest one, such as `"14d"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) keep_within: Option<Within>,
}

impl Policy {
    /// Whether this policy ever deletes anything.
    pub(crate) fn prunes(&self) -> bool {
        self.keep_last + self.keep_daily + self.keep_weekly + self.keep_monthly + self.keep_yearly
            > 0
            || self.keep_within.is_some()
    }
}

/// A calendar span such as `1y6m`, `14d` or `36h`: years (`y`), months (`m`), weeks (`w`),
/// days (`d`) and hours (`h`), each at most once, in that order. Years and months are
/// calendar ones (UTC), as restic counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Within {
    years: u16,
    months: u16,
    weeks: u16,
    days: u16,
    hours: u32,
}

impl Within {
    /// The earliest time kept when the newest backup is at `newest`.
    fn cutoff(&self, newest: Timestamp) -> Option<Timestamp> {
        let span = jiff::Span::new()
            .try_years(i64::from(self.years))
            .ok()?
            .try_months(i64::from(self.months))
            .ok()?
            .try_weeks(i64::from(self.weeks))
            .ok()?
            .try_days(i64::from(self.days))
            .ok()?
            .try_hours(i64::from(self.hours))
            .ok()?;
        newest
            .to_zoned(TimeZone::UTC)
            .checked_sub(span)
            .ok()
            .map(|z| z.timestamp())
    }
}

impl std::str::FromStr for Within {
    type Err = String;

    fn from_str(text: &str) -> Result<Within, String> {
        let bad =
            || format!("{text:?} is not a span like \"14d\", \"6m\" or \"1y6m\" (y, m, w, d, h)");
        let mut within = Within::default();
        let mut rest = text.trim();
        let mut order = 0;
        if rest.is_empty() {
            return Err(bad());
        }
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            let unit = rest[digits..].chars().next().ok_or_else(bad)?;
            let number: u32 = rest[..digits].parse().map_err(|_| bad())?;
            let rank = match unit {
                'y' => 1,
                'm' => 2,
                'w' => 3,
                'd' => 4,
                'h' => 5,
                _ => return Err(bad()),
            };
            // Each unit once, largest first, so "1d2d" or "3h1d" are mistakes, not sums.
            if rank <= order {
                return Err(bad());
            }
            let small = || u16::try_from(number).map_err(|_| bad());
            match unit {
                'y' => within.years = small()?,
                'm' => within.months = small()?,
                'w' => within.weeks = small()?,
                'd' => within.days = small()?,
                _ => within.hours = number,
            }
            order = rank;
            rest = &rest[digits + 1..];
        }
        Ok(within)
    }
}

impl std::fmt::Display for Within {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts = [
            (u32::from(self.years), 'y'),
            (u32::from(self.months), 'm'),
            (u32::from(self.weeks), 'w'),
            (u32::from(self.days), 'd'),
            (self.hours, 'h'),
        ];
        let mut any = false;
        for (n, unit) in parts.into_iter().filter(|(n, _)| *n > 0) {
            write!(f, "{n}{unit}")?;
            any = true;
        }
        if !any {
            write!(f, "0h")?;
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Within {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Within, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Within {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
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
    /// Newest of its year.
    Yearly,
    /// Within `keep_within` of the newest backup.
    Within,
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
    if let Some(within) = policy.keep_within
        && let Some(newest) = sorted.get(future)
        && let Some(cutoff) = within.cutoff(newest.time)
    {
        for (i, backup) in sorted.iter().enumerate().skip(future) {
            if backup.time < cutoff {
                break;
            }
            mark(i, Reason::Within);
        }
    }
    let buckets: [(u32, Reason, BucketOf); 4] = [
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
        (policy.keep_yearly, Reason::Yearly, |t| {
            (i32::from(t.to_zoned(TimeZone::UTC).date().year()), 0, 0)
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
            ..Policy::default()
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
    fn keep_yearly_keeps_the_newest_of_each_recent_year() {
        // One backup on the 1st of every month, 2021-01 to 2025-12.
        let backups: Vec<Candidate> = (2021..=2025)
            .flat_map(|year| (1..=12).map(move |month| (year, month)))
            .map(|(year, month)| {
                let time: Timestamp = format!("{year}-{month:02}-01T03:00:00Z").parse().unwrap();
                Candidate {
                    id: format!("{year}-{month:02}"),
                    time,
                    verified: false,
                }
            })
            .collect();
        let policy = Policy {
            keep_monthly: 2,
            keep_yearly: 3,
            ..Policy::default()
        };
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let decision = plan(&backups, &policy, now);
        let kept: Vec<&str> = decision.keep.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(kept, ["2025-12", "2025-11", "2024-12", "2023-12"]);
        assert_eq!(decision.delete.len(), 60 - 4);
        assert_eq!(
            decision.keep[0].1,
            BTreeSet::from([Reason::Monthly, Reason::Yearly])
        );
    }

    #[test]
    fn keep_within_counts_from_the_newest_backup_not_from_now() {
        // Daily backups for 30 days, then none for a month (the source went away).
        let backups: Vec<Candidate> = (0..30)
            .map(|n| Candidate {
                id: format!("d{n:02}"),
                time: day(n, 3),
                verified: false,
            })
            .collect();
        let policy = Policy {
            keep_within: Some("1w".parse().unwrap()),
            ..Policy::default()
        };
        assert!(policy.prunes());
        let decision = plan(&backups, &policy, day(60, 0));
        let kept: Vec<&str> = decision.keep.iter().map(|(id, _)| id.as_str()).collect();
        // d29 minus a week is d22 03:00, which is kept too.
        assert_eq!(
            kept,
            ["d29", "d28", "d27", "d26", "d25", "d24", "d23", "d22"]
        );
        let months = Policy {
            keep_within: Some("1m".parse().unwrap()),
            ..Policy::default()
        };
        // From 2025-01-30 03:00 a calendar month back is 2024-12-30 03:00: all 30 stay.
        assert!(plan(&backups, &months, day(60, 0)).delete.is_empty());
    }

    #[test]
    fn keep_within_spans_parse_strictly_and_print_back() {
        for (text, shown) in [
            ("14d", "14d"),
            ("1y6m", "1y6m"),
            ("2w3d12h", "2w3d12h"),
            ("36h", "36h"),
        ] {
            let within: Within = text.parse().unwrap();
            assert_eq!(within.to_string(), shown);
        }
        for bad in [
            "", "14", "d", "6m1y", "1d2d", "2 weeks", "3x", "-1d", "70000d",
        ] {
            assert!(bad.parse::<Within>().is_err(), "{bad}");
        }
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
