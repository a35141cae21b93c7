//! `rate_limit [matcher] { zone NAME { key K; events N; window D; max_keys M; match {...} }
//! log_key }`: the caddy-ratelimit plugin's directive, built in. Each zone allows `events`
//! requests per `window` per key (the key a placeholder template: `{remote_host}`,
//! `{client_ip}`, `{header.X}`, a static word...); a request over the limit of any zone fails
//! with 429 (to `handle_errors`) and a `Retry-After` of the whole seconds, rounded up, until
//! its key's next slot frees.
//!
//! The window slides, as the plugin's ring of timestamps does, but a key keeps at most
//! [`SPANS`] spans instead of `events` timestamps: requests of a key that fall in the same
//! grid cell of `window / (SPANS - 1)` share a span (their count and the time of the latest).
//! A span leaves the window when its latest request does, so a request is counted at least as
//! long as the plugin counts it and at most one cell longer: the limit is never exceeded in
//! any window, and a slot frees at most `window / 7` late (a burst shares one span and frees
//! exactly a window after its last request). Requests spaced more than a cell apart are
//! counted exactly.
//!
//! Memory: a zone's keys live in a fixed table of `max_keys` slots (rounded up to a multiple
//! of [`WAYS`]), 8-way set-associative: a key's 64-bit keyed hash picks its bucket, and a new
//! key takes a free slot there or evicts the bucket's least recently seen key. The table
//! never grows, whatever the number of distinct keys; a bucket's memory is allocated the
//! first time a key falls in it. Each bucket has its own lock, so requests of different keys
//! almost never meet on one, and a request allocates nothing unless its key is a template
//! other than one address or one header.
//!
//! Reload: a zone is identified by its site's addresses and its whole definition; a reload
//! that keeps both keeps the zone's counters, any change starts it afresh.
//!
//! A request is in the window while it is younger than the window (the plugin keeps it a
//! nanosecond longer), so retrying after `Retry-After` always finds the slot free.
//!
//! Invariants: a slot's spans are in time order and every span of a slot that was touched
//! within the window lies within two windows of now (so 32-bit millisecond times never alias:
//! windows are at most [`MAX_WINDOW`]); a key that is over its limit consumes nothing.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use hyper::http::{HeaderName, HeaderValue, Request, Response, StatusCode, header};
use serde::{Deserialize, Serialize};

use super::{At, Build, BuildFail, Carry, Dir, Handler, Scope, Step, at};
use crate::body::{Body, ReqBody};
use crate::context::{Cx, Req};
use crate::matchers::{MatcherSet, MatcherToml};
use crate::placeholders::{Lone, Template};

/// Slots per bucket: a key's possible places.
pub(crate) const WAYS: usize = 8;
/// Spans a key keeps.
pub(crate) const SPANS: usize = 8;
/// The longest window: twice it must fit 32-bit milliseconds.
const MAX_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
/// `max_keys` when not given.
const DEFAULT_MAX_KEYS: usize = 100_000;
/// The most `max_keys` may be (about 700 MB of table).
const MOST_KEYS: usize = 10_000_000;
/// The variable `{http.rate_limit.exceeded.name}` reads: the zone that refused.
pub(crate) const EXCEEDED: &str = "http.rate_limit.exceeded.name";

/// `rate_limit` as TOML.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Toml {
    /// The zones, each checked on every request the directive sees.
    #[serde(rename = "zone")]
    pub(crate) zones: Vec<ZoneToml>,
    /// Log the key of a refused request (keys may be personal data: off by default).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) log_key: bool,
}

/// One zone: a limit and what it counts by.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ZoneToml {
    /// The zone's name (for logs and `{http.rate_limit.exceeded.name}`).
    pub(crate) name: String,
    /// What tells requests apart: a placeholder template ("{remote_host}") or static text.
    pub(crate) key: String,
    /// Requests allowed per window and key (at least 1).
    pub(crate) events: u32,
    /// The sliding window ("1m", "10s"), at most 7 days.
    pub(crate) window: String,
    /// Keys remembered at once; beyond it the least recently seen are forgotten.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_keys: Option<usize>,
    /// Only requests matching this set count in the zone.
    #[serde(rename = "match", default, skip_serializing_if = "Option::is_none")]
    pub(crate) matcher: Option<MatcherToml>,
}

pub(crate) fn parse(d: &Dir<'_>, _s: &mut Scope, _key: &str) -> Result<Toml, At> {
    if !d.args.is_empty() {
        return Err(d.err("takes a matcher and a block only: rate_limit [matcher] { zone ... }"));
    }
    let Some(block) = d.block else {
        return Err(d.err("needs a block with at least one zone"));
    };
    let mut t = Toml::default();
    for sub in block {
        let words: Vec<&str> = sub.words.iter().map(String::as_str).collect();
        if sub.block.is_some() && words.first() != Some(&"zone") {
            return Err(at(
                sub.line,
                format!("rate_limit: {} takes no block", words.join(" ")),
            ));
        }
        match words.as_slice() {
            ["zone", name] => {
                if t.zones.iter().any(|z| z.name == *name) {
                    return Err(at(
                        sub.line,
                        format!("rate_limit: zone {name:?} given twice"),
                    ));
                }
                t.zones.push(zone(name, sub.line, sub.block.as_deref())?);
            }
            ["zone", ..] => return Err(at(sub.line, "rate_limit: zone NAME { ... }")),
            ["log_key"] => t.log_key = true,
            // The table reuses slots whose window has passed: there is nothing to sweep.
            ["sweep_interval", d] => {
                crate::site::parse_duration(d).ok_or_else(|| {
                    at(
                        sub.line,
                        format!("rate_limit: sweep_interval {d:?} is not a duration"),
                    )
                })?;
            }
            // The edge has no rate limit metrics to disable.
            ["disable_metrics"] => {}
            [other @ ("distributed" | "storage" | "jitter"), ..] => {
                return Err(at(
                    sub.line,
                    format!("rate_limit: {other} is not supported (one edge's own counters only)"),
                ));
            }
            [other, ..] => {
                return Err(at(
                    sub.line,
                    format!("rate_limit: unknown subdirective {other:?} (zone, log_key)"),
                ));
            }
            [] => return Err(at(sub.line, "rate_limit: empty line")),
        }
    }
    if t.zones.is_empty() {
        return Err(d.err("needs at least one zone NAME { key ...; events N; window D }"));
    }
    Ok(t)
}

/// One `zone NAME { ... }` block.
fn zone(name: &str, line: usize, block: Option<&[super::Line]>) -> Result<ZoneToml, At> {
    let Some(block) = block else {
        return Err(at(line, format!("rate_limit: zone {name} needs a block")));
    };
    let mut z = ZoneToml {
        name: name.to_owned(),
        ..ZoneToml::default()
    };
    let (mut key, mut events, mut window) = (false, false, false);
    for sub in block {
        let err = |m: String| at(sub.line, format!("rate_limit: zone {name}: {m}"));
        let words: Vec<&str> = sub.words.iter().map(String::as_str).collect();
        if sub.block.is_some() && words != ["match"] {
            return Err(err(format!("{} takes no block", words.join(" "))));
        }
        match words.as_slice() {
            ["key", k] => {
                if std::mem::replace(&mut key, true) {
                    return Err(err("key given twice".into()));
                }
                z.key = (*k).to_owned();
            }
            ["events", n] => {
                if std::mem::replace(&mut events, true) {
                    return Err(err("events given twice".into()));
                }
                z.events = n
                    .parse()
                    .map_err(|_| err(format!("events {n:?} is not a whole number")))?;
                if z.events == 0 {
                    return Err(err("events must be at least 1".into()));
                }
            }
            ["window", w] => {
                if std::mem::replace(&mut window, true) {
                    return Err(err("window given twice".into()));
                }
                window_of(w).map_err(err)?;
                z.window = (*w).to_owned();
            }
            ["max_keys", n] => {
                let n: usize = n
                    .parse()
                    .map_err(|_| err(format!("max_keys {n:?} is not a whole number")))?;
                max_keys_of(n).map_err(err)?;
                z.max_keys = Some(n);
            }
            ["match"] => {
                let mut m = MatcherToml::default();
                for l in sub.block.as_deref().unwrap_or_default() {
                    let inner: Option<Vec<Vec<String>>> = l
                        .block
                        .as_ref()
                        .map(|b| b.iter().map(|l| l.words.clone()).collect());
                    m.add_line(&l.words, inner.as_deref())
                        .map_err(|e| at(l.line, format!("rate_limit: zone {name}: match: {e}")))?;
                }
                z.matcher = Some(m);
            }
            [other @ ("ipv4_prefix" | "ipv6_prefix"), ..] => {
                return Err(err(format!("{other} is not supported")));
            }
            [other, ..] => {
                return Err(err(format!(
                    "unknown subdirective {other:?} (key, events, window, max_keys, match)"
                )));
            }
            [] => return Err(err("empty line".into())),
        }
    }
    for (given, what) in [(key, "key"), (events, "events"), (window, "window")] {
        if !given {
            return Err(at(line, format!("rate_limit: zone {name} needs {what}")));
        }
    }
    Ok(z)
}

fn window_of(text: &str) -> Result<Duration, String> {
    let w = crate::site::parse_duration(text)
        .ok_or_else(|| format!("window {text:?} is not a duration"))?;
    if w < Duration::from_millis(1) || w > MAX_WINDOW {
        return Err(format!("window {text:?} must be from 1ms to 168h"));
    }
    Ok(w)
}

fn max_keys_of(n: usize) -> Result<usize, String> {
    if n == 0 || n > MOST_KEYS {
        return Err(format!("max_keys {n} must be from 1 to {MOST_KEYS}"));
    }
    Ok(n)
}

pub(crate) fn build(
    t: &Toml,
    b: &mut Build<'_>,
    _key: &str,
) -> Result<Box<dyn Handler>, BuildFail> {
    if t.zones.is_empty() {
        return Err("names no zone".to_owned().into());
    }
    let mut zones = Vec::new();
    for z in &t.zones {
        let fail = |m: String| format!("zone {}: {m}", z.name);
        if z.events == 0 {
            return Err(fail("events must be at least 1".into()).into());
        }
        if z.key.is_empty() {
            return Err(fail("needs a key".into()).into());
        }
        let window = window_of(&z.window).map_err(fail)?;
        let max_keys = max_keys_of(z.max_keys.unwrap_or(DEFAULT_MAX_KEYS)).map_err(fail)?;
        let template = Template::parse(&z.key, b.env).map_err(fail)?;
        let matcher = match &z.matcher {
            Some(m) => Some(MatcherSet::build(m, "").map_err(fail)?),
            None => None,
        };
        let state = zone_state(&b.site, z, || Zone::new(window, z.events, max_keys));
        zones.push(ZoneRun {
            name: z.name.clone(),
            matcher,
            key: Key::of(&template, &state.hasher),
            template,
            state,
        });
    }
    // The tightest limit first, as the plugin orders them: a request refused by it consumes
    // nothing in the looser ones.
    zones.sort_by(|a, b| {
        let rate = |z: &ZoneRun| z.state.events as f64 / z.state.window_ms as f64;
        rate(a).total_cmp(&rate(b))
    });
    Ok(Box::new(RateLimit {
        zones,
        log_key: t.log_key,
    }))
}

/// Live zones by site and definition, so a reload finds the one it keeps.
type Known = Vec<(String, ZoneToml, Weak<Zone>)>;

/// The zone `site` defines as `z`: the running one when a config still holds it (a reload
/// keeping the definition), else a new one from `make`.
fn zone_state(site: &str, z: &ZoneToml, make: impl FnOnce() -> Zone) -> Arc<Zone> {
    static KNOWN: OnceLock<Mutex<Known>> = OnceLock::new();
    let mut known = KNOWN
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    known.retain(|(_, _, w)| w.strong_count() > 0);
    if let Some(zone) = known
        .iter()
        .find(|(s, d, _)| s == site && d == z)
        .and_then(|(_, _, w)| w.upgrade())
    {
        return zone;
    }
    let zone = Arc::new(make());
    known.push((site.to_owned(), z.clone(), Arc::downgrade(&zone)));
    zone
}

/// How a zone's key is found for a request; the common ones are hashed without rendering.
#[derive(Debug)]
enum Key {
    /// No placeholder: one counter for the zone.
    Static(u64),
    /// `{remote_host}`.
    RemoteHost,
    /// `{client_ip}`.
    ClientIp,
    /// `{header.NAME}`: its values, as the template joins them.
    Header(HeaderName),
    /// Anything else: rendered, then hashed.
    Rendered,
}

impl Key {
    fn of(template: &Template, hasher: &RandomState) -> Key {
        if let Some(text) = template.literal() {
            return Key::Static(hasher.hash_one(text));
        }
        match template.lone() {
            Some(Lone::RemoteHost) => Key::RemoteHost,
            Some(Lone::ClientIp) => Key::ClientIp,
            Some(Lone::Header(name)) => Key::Header(name),
            None => Key::Rendered,
        }
    }
}

#[derive(Debug)]
struct ZoneRun {
    name: String,
    matcher: Option<MatcherSet>,
    key: Key,
    template: Template,
    state: Arc<Zone>,
}

impl ZoneRun {
    /// The key's hash for this request.
    fn hash(&self, req: Req<'_>, cx: &Cx) -> u64 {
        let hasher = &self.state.hasher;
        match &self.key {
            Key::Static(h) => *h,
            Key::RemoteHost => hasher.hash_one(cx.remote.ip()),
            Key::ClientIp => hasher.hash_one(cx.client),
            Key::Header(name) => {
                let mut h = hasher.build_hasher();
                for (i, v) in req.headers.get_all(name).iter().enumerate() {
                    if i > 0 {
                        h.write_u8(b',');
                    }
                    h.write(v.as_bytes());
                }
                h.finish()
            }
            Key::Rendered => hasher.hash_one(self.template.render(req, cx)),
        }
    }
}

#[derive(Debug)]
struct RateLimit {
    zones: Vec<ZoneRun>,
    log_key: bool,
}

impl Handler for RateLimit {
    fn enter<'s>(&'s self, req: &mut Request<ReqBody>, cx: &mut Cx) -> Step<'s> {
        for z in &self.zones {
            if let Some(m) = &z.matcher
                && !m.matches(Req::of(req), cx)
            {
                continue;
            }
            let hash = z.hash(Req::of(req), cx);
            let now = z.state.now_ms();
            let Refused { wait_ms, first } = match z.state.hit(hash, now) {
                Ok(()) => continue,
                Err(refused) => refused,
            };
            let seconds = wait_ms.div_ceil(1000).max(1);
            // One line per key and refused stretch: a client hammering on does not flood
            // the log (the access log has every 429).
            if first {
                let key = self.log_key.then(|| z.template.render(Req::of(req), cx));
                tracing::info!(
                    zone = %z.name,
                    wait = seconds,
                    remote_ip = %cx.remote.ip(),
                    key = key.as_deref().unwrap_or("[not logged]"),
                    "rate limit exceeded"
                );
            }
            cx.set_var(EXCEEDED, z.name.clone());
            return Step::Fail(
                StatusCode::TOO_MANY_REQUESTS,
                String::new(),
                Carry::Values(vec![HeaderValue::from(seconds)]),
            );
        }
        Step::Next
    }

    fn leave(&self, carry: Carry, _cx: &Cx, response: &mut Response<Body>) {
        if let Carry::Values(values) = carry
            && let Some(v) = values.into_iter().next()
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }

    fn describe(&self) -> String {
        let zones: Vec<String> = self
            .zones
            .iter()
            .map(|z| {
                format!(
                    "{} ({} per {}ms, {} keys)",
                    z.name,
                    z.state.events,
                    z.state.window_ms,
                    z.state.table.capacity()
                )
            })
            .collect();
        format!("rate_limit {}", zones.join(", "))
    }
}

/// A refusal: how long until a slot frees, and whether it is the key's first since it was
/// last let through.
#[derive(Debug, PartialEq)]
pub(crate) struct Refused {
    /// Milliseconds until the next request of the key would pass.
    pub(crate) wait_ms: u64,
    /// The first refusal since the key last passed.
    pub(crate) first: bool,
}

/// A zone's state: its limit, clock and table; kept across reloads that keep its definition.
#[derive(Debug)]
pub(crate) struct Zone {
    window_ms: u64,
    events: u32,
    /// The grid requests share spans on.
    cell_ms: u64,
    epoch: Instant,
    hasher: RandomState,
    table: Table,
}

impl Zone {
    /// A zone allowing `events` per `window`, remembering `max_keys` keys.
    pub(crate) fn new(window: Duration, events: u32, max_keys: usize) -> Zone {
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
        Zone {
            window_ms,
            events,
            cell_ms: window_ms.div_ceil(SPANS as u64 - 1).max(1),
            epoch: Instant::now(),
            hasher: RandomState::new(),
            table: Table::new(max_keys),
        }
    }

    /// Milliseconds since the zone began.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Counts a request of key `hash` at `now` (ms since the zone began), or refuses it.
    pub(crate) fn hit(&self, hash: u64, now: u64) -> Result<(), Refused> {
        let tag = hash.max(1);
        let bucket = self.table.bucket(hash);
        let mut slots = bucket.lock().unwrap_or_else(|p| p.into_inner());
        let slot = match slots.iter().position(|s| s.tag == tag) {
            Some(i) => &mut slots[i],
            None => {
                // A free slot, else the least recently seen key gives way.
                let i = slots
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| (s.tag != 0, s.seen))
                    .map_or(0, |(i, _)| i);
                slots[i] = Slot {
                    tag,
                    seen: now,
                    ..Slot::default()
                };
                &mut slots[i]
            }
        };
        slot.hit(now, self)
    }

    /// Keys held now (for tests and `edge check`'s view of memory).
    #[cfg(test)]
    pub(crate) fn keys(&self) -> usize {
        self.table.keys()
    }
}

/// A group of requests of one key within one grid cell.
#[derive(Clone, Copy, Debug, Default)]
struct Span {
    /// The latest request's time, ms since the zone began, modulo 2^32.
    last: u32,
    count: u32,
}

/// One key's counters.
#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    /// The key's hash; 0 for a free slot.
    tag: u64,
    /// When the key was last seen (let through or refused), ms since the zone began.
    seen: u64,
    spans: [Span; SPANS],
    /// The oldest span's index.
    head: u8,
    /// Spans in use.
    len: u8,
    /// A refusal was logged since the key last passed.
    logged: bool,
}

impl Slot {
    fn span(&self, i: usize) -> &Span {
        &self.spans[(self.head as usize + i) % SPANS]
    }

    fn hit(&mut self, now: u64, zone: &Zone) -> Result<(), Refused> {
        let w = zone.window_ms;
        if now.saturating_sub(self.seen) >= w {
            // Nothing of the key is in the window: start afresh (and never compare times
            // more than two windows apart).
            self.len = 0;
            self.head = 0;
        }
        self.seen = self.seen.max(now);
        let now32 = now as u32;
        // A span leaves once its latest request is a window old (the plugin waits a
        // nanosecond more): so a client retrying after Retry-After's seconds gets in.
        while self.len > 0 && u64::from(now32.wrapping_sub(self.span(0).last)) >= w {
            self.head = ((self.head as usize + 1) % SPANS) as u8;
            self.len -= 1;
        }
        let total: u64 = (0..self.len as usize)
            .map(|i| u64::from(self.span(i).count))
            .sum();
        if total >= u64::from(zone.events) {
            // Enough spans must leave for one more to fit.
            let need = total + 1 - u64::from(zone.events);
            let mut freed = 0;
            let mut wait_ms = w;
            for i in 0..self.len as usize {
                let s = self.span(i);
                freed += u64::from(s.count);
                if freed >= need {
                    let age = u64::from(now32.wrapping_sub(s.last));
                    wait_ms = w - age.min(w);
                    break;
                }
            }
            let first = !std::mem::replace(&mut self.logged, true);
            return Err(Refused { wait_ms, first });
        }
        self.logged = false;
        let cell = now / zone.cell_ms;
        if self.len > 0 {
            let newest = (self.head as usize + self.len as usize - 1) % SPANS;
            let age = u64::from(now32.wrapping_sub(self.spans[newest].last));
            let newest_cell = now.saturating_sub(age) / zone.cell_ms;
            // A full ring cannot happen (live spans sit in distinct cells of the last
            // window, at most SPANS of them), but if it did the newest span takes the
            // request: counted late, never lost.
            if newest_cell == cell || self.len as usize == SPANS {
                let s = &mut self.spans[newest];
                s.count = s.count.saturating_add(1);
                s.last = now32;
                return Ok(());
            }
        }
        let i = (self.head as usize + self.len as usize) % SPANS;
        self.spans[i] = Span {
            last: now32,
            count: 1,
        };
        self.len += 1;
        Ok(())
    }
}

type Bucket = Mutex<[Slot; WAYS]>;

/// A fixed number of buckets of [`WAYS`] slots, each allocated on first use.
#[derive(Debug)]
struct Table {
    buckets: Box<[OnceLock<Box<Bucket>>]>,
}

impl Table {
    fn new(max_keys: usize) -> Table {
        let n = max_keys.div_ceil(WAYS).max(1);
        Table {
            buckets: (0..n).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Slots in all: `max_keys` rounded up to a multiple of [`WAYS`].
    fn capacity(&self) -> usize {
        self.buckets.len() * WAYS
    }

    fn bucket(&self, hash: u64) -> &Bucket {
        // Multiply-shift maps the hash onto any bucket count evenly.
        let i = ((u128::from(hash) * self.buckets.len() as u128) >> 64) as usize;
        self.buckets[i].get_or_init(|| Box::new(Mutex::new([Slot::default(); WAYS])))
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        self.buckets
            .iter()
            .filter_map(OnceLock::get)
            .map(|b| {
                let slots = b.lock().unwrap_or_else(|p| p.into_inner());
                slots.iter().filter(|s| s.tag != 0).count()
            })
            .sum()
    }

    #[cfg(test)]
    fn allocated(&self) -> usize {
        self.buckets.iter().filter_map(OnceLock::get).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn the_eleventh_of_ten_a_minute_is_refused_until_a_minute_after_the_first() {
        let z = Zone::new(MINUTE, 10, 100);
        for i in 0..10 {
            assert_eq!(z.hit(7, 1000 + i * 100), Ok(()), "request {i}");
        }
        let refused = z.hit(7, 2000).unwrap_err();
        // The burst shares one span, whose last request was at 1900: it leaves at 61900.
        assert_eq!(refused.wait_ms, 61_900 - 2000);
        assert!(refused.first);
        assert!(!z.hit(7, 3000).unwrap_err().first);
        assert!(z.hit(7, 61_899).is_err());
        assert_eq!(z.hit(7, 61_900), Ok(()));
        // Another key was never limited.
        assert_eq!(z.hit(8, 3000), Ok(()));
    }

    #[test]
    fn requests_a_cell_apart_are_counted_exactly_as_the_plugins_ring() {
        // 3 per 70 s: cells of 10 s. Requests at 0, 20 s, 40 s; the 4th waits for the first.
        let z = Zone::new(Duration::from_secs(70), 3, 100);
        for t in [0, 20_000, 40_000] {
            assert_eq!(z.hit(1, t), Ok(()));
        }
        assert_eq!(z.hit(1, 50_000).unwrap_err().wait_ms, 70_000 - 50_000);
        assert!(z.hit(1, 69_999).is_err());
        assert_eq!(z.hit(1, 70_000), Ok(()));
        assert_eq!(z.hit(1, 80_000).unwrap_err().wait_ms, 90_000 - 80_000);
    }

    #[test]
    fn a_sliding_window_never_lets_more_than_events_through_in_any_window() {
        // A request every 250 ms against 20 per 10 s for 60 s: whatever passes, no 10 s
        // stretch holds more than 20, and the limit is reached (no more than a cell late).
        let z = Zone::new(Duration::from_secs(10), 20, 100);
        let passed: Vec<u64> = (0..240)
            .map(|i| i * 250)
            .filter(|&t| z.hit(3, t).is_ok())
            .collect();
        for (i, &t) in passed.iter().enumerate() {
            let within = passed[i..].iter().take_while(|&&u| u - t < 10_000).count();
            assert!(within <= 20, "{within} passed in the window from {t}");
        }
        // The exact ring lets 20 pass in every 10 s after the first: 120 in 60 s. Spans free
        // at most a cell (10 s / 7) late.
        assert!(passed.len() >= 100, "only {} passed", passed.len());
    }

    #[test]
    fn a_million_distinct_keys_never_grow_the_table_past_max_keys() {
        let z = Zone::new(MINUTE, 5, 100_000);
        let capacity = z.table.capacity();
        assert_eq!(capacity, 100_000);
        for k in 0..1_000_000u64 {
            let hash = z.hasher.hash_one(k);
            assert_eq!(z.hit(hash, k / 1000), Ok(()));
        }
        assert_eq!(z.table.capacity(), capacity);
        assert_eq!(z.table.allocated(), z.table.buckets.len());
        assert!(z.keys() <= 100_000, "{} keys", z.keys());
        assert!(z.keys() > 99_000, "{} keys", z.keys());
    }

    #[test]
    fn a_full_bucket_forgets_its_least_recently_seen_key() {
        // One bucket: 8 slots.
        let z = Zone::new(MINUTE, 1, 8);
        for k in 1..=8u64 {
            assert_eq!(z.hit(k, k), Ok(()));
        }
        // Key 1 is seen again (refused), so key 2 is the oldest when key 9 arrives.
        assert!(z.hit(1, 100).is_err());
        assert_eq!(z.hit(9, 101), Ok(()));
        assert!(z.hit(1, 102).is_err(), "key 1 was kept");
        assert_eq!(z.hit(2, 103), Ok(()), "key 2 was forgotten");
    }

    #[test]
    fn times_far_apart_do_not_alias() {
        let z = Zone::new(Duration::from_secs(1), 1, 8);
        assert_eq!(z.hit(5, 10), Ok(()));
        // 2^32 ms later the low bits are the same again.
        assert_eq!(z.hit(5, (1u64 << 32) + 10), Ok(()));
        assert!(z.hit(5, (1u64 << 32) + 11).is_err());
    }
}
