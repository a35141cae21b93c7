//! Bandwidth and request-rate limits (`--bwlimit`, `--tpslimit`), shared by every transfer of
//! a run.
//!
//! `--bwlimit` takes rclone's syntax: a rate (`512k`, `8M`, `1G`, a bare number of KiB/s, or
//! `off`), an `UP:DOWN` pair (`8M:off`), or a timetable of `HH:MM,RATE` entries separated by
//! spaces (`"08:00,512k 23:00,off"`): each entry holds from its time until the next one, and
//! the last one of the day also holds from midnight until the first (weekday entries are not
//! supported). Rates are bytes per second with binary units.
//!
//! Each limit is a virtual-time token bucket: a caller asking for `n` bytes takes the next
//! `n / rate` seconds of the limit's time line and waits until they have passed, so the bytes
//! of all transfers together never run ahead of the rate, not even the first ones, and a
//! transfer takes what its size allows to within the last request's latency. Up to
//! [`CATCH_UP`] of idle time is saved for byte limits: a transfer that stalled for a moment
//! (a part's request round trip, a busy CPU) makes the time up afterwards instead of losing
//! it for good, which held a 60 s upload 7% under its rate on a loaded machine; the bytes of
//! any stretch of time stay within one second's worth of the rate. Request limits save
//! nothing (`--tpslimit` has no burst). The rate is looked up in the timetable at
//! every request, through a [`Clock`] that tests replace, so a switch at a boundary applies
//! from the first request after it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes per second, or `None` for no limit.
pub(crate) type Rate = Option<u64>;

/// The largest piece of data one reservation covers: callers split larger reads.
pub(crate) const CHUNK: usize = 64 * 1024;

/// The idle time a byte limit saves up, at most.
const CATCH_UP: Duration = Duration::from_secs(1);

/// Upload and download rates of one timetable entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rates {
    /// Bytes per second sent to a store.
    pub(crate) up: Rate,
    /// Bytes per second received from a store.
    pub(crate) down: Rate,
}

/// A `--bwlimit` value: rates by minute of the day.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Timetable {
    /// `(minute of the day, rates)`, sorted by minute, never empty.
    entries: Vec<(u32, Rates)>,
}

impl Timetable {
    /// Parses a `--bwlimit` value.
    pub(crate) fn parse(text: &str) -> Result<Timetable, String> {
        let text = text.trim();
        if !text.contains(',') {
            return Ok(Timetable {
                entries: vec![(0, parse_rates(text)?)],
            });
        }
        let mut entries = Vec::new();
        for item in text.split_whitespace() {
            let (time, rates) = item
                .split_once(',')
                .ok_or_else(|| format!("{item:?}: a timetable entry is HH:MM,RATE"))?;
            let minute = parse_time(time)?;
            if entries.iter().any(|(m, _)| *m == minute) {
                return Err(format!("{time:?} appears twice in the timetable"));
            }
            entries.push((minute, parse_rates(rates)?));
        }
        entries.sort_by_key(|(m, _)| *m);
        Ok(Timetable { entries })
    }

    /// The rates in force at `minute` of the day (0..1440).
    pub(crate) fn at(&self, minute: u32) -> Rates {
        self.entries
            .iter()
            .rev()
            .find(|(m, _)| *m <= minute)
            .or_else(|| self.entries.last())
            .map_or(
                Rates {
                    up: None,
                    down: None,
                },
                |(_, r)| *r,
            )
    }

    /// Whether every entry is `off` in one direction.
    fn never(&self, pick: fn(&Rates) -> Rate) -> bool {
        self.entries.iter().all(|(_, r)| pick(r).is_none())
    }
}

fn parse_time(time: &str) -> Result<u32, String> {
    let bad = || format!("{time:?}: a time is HH:MM, 00:00 to 23:59");
    let (h, m) = time.split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 || time.len() != 5 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

fn parse_rates(text: &str) -> Result<Rates, String> {
    match text.split_once(':') {
        Some((up, down)) => Ok(Rates {
            up: parse_rate(up)?,
            down: parse_rate(down)?,
        }),
        None => {
            let rate = parse_rate(text)?;
            Ok(Rates {
                up: rate,
                down: rate,
            })
        }
    }
}

/// `off`, or a rate: a number with `B`, `K`, `M`, `G` (binary); a bare number is KiB/s as in
/// rclone.
fn parse_rate(text: &str) -> Result<Rate, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a rate such as 512k, 8M or off"))?;
    let scale = match unit.to_ascii_lowercase().as_str() {
        "b" => 1.0,
        "" | "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("{text:?}: unknown unit (use B, K, M or G)")),
    };
    let rate = (number * scale).round();
    if !(1.0..=1e15).contains(&rate) {
        return Err(format!("{text:?}: a rate is at least 1 byte per second"));
    }
    Ok(Some(rate as u64))
}

/// Where the limits read the time: monotonic time for waiting, the minute of the day for the
/// timetable.
pub(crate) trait Clock: Send + Sync {
    /// Now, monotonic.
    fn now(&self) -> Instant;
    /// The local minute of the day, 0..1440.
    fn minute_of_day(&self) -> u32;
}

/// The system clock in the local time zone.
struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn minute_of_day(&self) -> u32 {
        let now = jiff::Zoned::now();
        u32::try_from(now.hour()).unwrap_or(0) * 60 + u32::try_from(now.minute()).unwrap_or(0)
    }
}

/// One token bucket whose rate comes from a timetable.
struct Bucket {
    timetable: Timetable,
    pick: fn(&Rates) -> Rate,
    /// How far behind `now` the next slot may start: idle time saved up.
    catch_up: Duration,
    /// The start of the next free slot.
    next: Mutex<Option<Instant>>,
}

impl Bucket {
    /// Reserves `amount` units at `now`; returns when the caller may go (the end of its
    /// slot), `None` for at once.
    fn reserve(&self, amount: u64, now: Instant, minute: u32) -> Option<Instant> {
        let rate = (self.pick)(&self.timetable.at(minute))?;
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let earliest = now.checked_sub(self.catch_up).unwrap_or(now);
        let start = next.map_or(now, |n| n.max(earliest));
        let end = start + Duration::from_secs_f64(amount as f64 / rate as f64);
        *next = Some(end);
        (end > now).then_some(end)
    }
}

/// The limits of one run; cheap to clone, shared by every transfer.
#[derive(Clone, Default)]
pub(crate) struct Limits {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    clock: Arc<dyn Clock>,
    up: Option<Bucket>,
    down: Option<Bucket>,
    requests: Option<Bucket>,
}

impl Limits {
    /// Limits from `--bwlimit` and `--tpslimit` (requests per second, 0 for none).
    pub(crate) fn new(bwlimit: Option<&Timetable>, tpslimit: f64) -> Limits {
        Limits::with_clock(bwlimit, tpslimit, Arc::new(SystemClock))
    }

    /// [`Limits::new`] reading time from `clock`.
    pub(crate) fn with_clock(
        bwlimit: Option<&Timetable>,
        tpslimit: f64,
        clock: Arc<dyn Clock>,
    ) -> Limits {
        let bucket = |pick: fn(&Rates) -> Rate| {
            bwlimit.filter(|t| !t.never(pick)).map(|t| Bucket {
                timetable: t.clone(),
                pick,
                catch_up: CATCH_UP,
                next: Mutex::new(None),
            })
        };
        let up = bucket(|r| r.up);
        let down = bucket(|r| r.down);
        // One request is a million units, so fractional rates such as 0.5/s work.
        let requests = (tpslimit > 0.0).then(|| Bucket {
            timetable: Timetable {
                entries: vec![(
                    0,
                    Rates {
                        up: Some((tpslimit * 1_000_000.0).round().max(1.0) as u64),
                        down: None,
                    },
                )],
            },
            pick: |r| r.up,
            catch_up: Duration::ZERO,
            next: Mutex::new(None),
        });
        if up.is_none() && down.is_none() && requests.is_none() {
            return Limits { inner: None };
        }
        Limits {
            inner: Some(Arc::new(Inner {
                clock,
                up,
                down,
                requests,
            })),
        }
    }

    async fn wait(&self, pick: fn(&Inner) -> Option<&Bucket>, amount: u64) {
        let Some(inner) = &self.inner else { return };
        let Some(bucket) = pick(inner) else { return };
        let deadline = bucket.reserve(amount, inner.clock.now(), inner.clock.minute_of_day());
        if let Some(deadline) = deadline {
            tokio::time::sleep_until(deadline.into()).await;
        }
    }

    /// Waits until `bytes` may be sent to a store.
    pub(crate) async fn up(&self, bytes: usize) {
        self.wait(|i| i.up.as_ref(), bytes as u64).await;
    }

    /// Waits until `bytes` more may be received from a store.
    pub(crate) async fn down(&self, bytes: usize) {
        self.wait(|i| i.down.as_ref(), bytes as u64).await;
    }

    /// Waits until one more request may be sent.
    pub(crate) async fn request(&self) {
        self.wait(|i| i.requests.as_ref(), 1_000_000).await;
    }

    /// Whether uploads are limited (readers then hand out at most [`CHUNK`] at a time).
    pub(crate) fn limits_up(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.up.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeClock {
        start: Instant,
        state: Mutex<(Duration, u32)>,
    }

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            self.start + self.state.lock().unwrap().0
        }
        fn minute_of_day(&self) -> u32 {
            self.state.lock().unwrap().1
        }
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn rclone_rates_and_timetables_parse() {
        let t = Timetable::parse("8M").unwrap();
        assert_eq!(
            t.at(0),
            Rates {
                up: Some(8 * MIB),
                down: Some(8 * MIB)
            }
        );
        let t = Timetable::parse("10M:off").unwrap();
        assert_eq!(
            t.at(600),
            Rates {
                up: Some(10 * MIB),
                down: None
            }
        );
        assert_eq!(Timetable::parse("512").unwrap().at(0).up, Some(512 * 1024));
        let t = Timetable::parse("08:00,512k 23:00,off").unwrap();
        assert_eq!(t.at(8 * 60).up, Some(512 * 1024));
        assert_eq!(t.at(22 * 60 + 59).up, Some(512 * 1024));
        assert_eq!(t.at(23 * 60).up, None);
        // Before the first entry, the day's last one still holds.
        assert_eq!(t.at(7 * 60 + 59).up, None);
        let t = Timetable::parse("09:00,1M:2M 18:30,4M").unwrap();
        assert_eq!(t.at(0).down, Some(4 * MIB));
        assert_eq!(t.at(9 * 60).down, Some(2 * MIB));
        for bad in [
            "8X",
            "25:00,1M",
            "08:00",
            "08:00,1M 08:00,2M",
            "0",
            "8:0,1M",
            "-1M",
        ] {
            assert!(Timetable::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_timetable_switches_rate_at_its_boundary() {
        let clock = Arc::new(FakeClock {
            start: Instant::now(),
            state: Mutex::new((Duration::ZERO, 7 * 60 + 59)),
        });
        let table = Timetable::parse("08:00,1M 23:00,off").unwrap();
        let limits = Limits::with_clock(Some(&table), 0.0, clock.clone());
        let inner = limits.inner.as_ref().unwrap();
        let up = inner.up.as_ref().unwrap();
        let at = |clock: &FakeClock| (clock.now(), clock.minute_of_day());
        // 07:59: the 23:00 entry (off) still holds: nothing waits, however much.
        let (now, minute) = at(&clock);
        assert_eq!(up.reserve(100 * MIB, now, minute), None);
        // 08:00: 1 MiB/s from the first request after the boundary.
        clock.state.lock().unwrap().1 = 8 * 60;
        let (now, minute) = at(&clock);
        assert_eq!(
            up.reserve(MIB, now, minute),
            Some(now + Duration::from_secs(1))
        );
        assert_eq!(
            up.reserve(MIB / 2, now, minute),
            Some(now + Duration::from_millis(1500))
        );
        // 23:00: off again, at once.
        clock.state.lock().unwrap().1 = 23 * 60;
        let (now, minute) = at(&clock);
        assert_eq!(up.reserve(100 * MIB, now, minute), None);
    }

    #[test]
    fn reservations_add_up_to_the_rate_and_idle_time_is_saved_up_to_one_second() {
        let clock = Arc::new(FakeClock {
            start: Instant::now(),
            state: Mutex::new((Duration::ZERO, 0)),
        });
        let table = Timetable::parse("1M").unwrap();
        let limits = Limits::with_clock(Some(&table), 2.0, clock.clone());
        let inner = limits.inner.as_ref().unwrap();
        let down = inner.down.as_ref().unwrap();
        let now = clock.now();
        let mut last = None;
        for _ in 0..(60 * MIB / CHUNK as u64) {
            last = down.reserve(CHUNK as u64, now, 0);
        }
        // 60 MiB at 1 MiB/s: the last chunk may go at 60 s.
        let want = Duration::from_secs(60);
        let got = last.unwrap() - now;
        assert!(
            (got.as_secs_f64() - want.as_secs_f64()).abs() < 1e-6,
            "{got:?}"
        );
        // After a long idle stretch one second was saved up: the next MiB goes at once, the
        // one after takes its second.
        let later = now + Duration::from_secs(3600);
        assert_eq!(down.reserve(MIB, later, 0), None);
        assert_eq!(
            down.reserve(MIB, later, 0),
            Some(later + Duration::from_secs(1))
        );
        // A stall shorter than that is made up in full: 60 MiB reserved over 60 s, then
        // 0.25 s lost, and the next quarter MiB may go at once.
        let stalled = later + Duration::from_secs(1) + Duration::from_millis(250);
        assert_eq!(down.reserve(MIB / 4, stalled, 0), None);
        assert_eq!(
            down.reserve(MIB / 4, stalled, 0),
            Some(stalled + Duration::from_millis(250))
        );
        // Two requests per second, and no saving up for requests.
        let requests = inner.requests.as_ref().unwrap();
        assert_eq!(
            requests.reserve(1_000_000, now, 0),
            Some(now + Duration::from_millis(500))
        );
        assert_eq!(
            requests.reserve(1_000_000, now, 0),
            Some(now + Duration::from_millis(1000))
        );
    }
}
