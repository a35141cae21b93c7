//! Prometheus metrics in Caddy 2.6's names and labels, written as Prometheus' text
//! exposition (format 0.0.4) for the `metrics` directive and the admin endpoint's `/metrics`.
//!
//! - HTTP request metrics (`caddy_http_*`, labels `server`, `handler`, and `code`, `method`
//!   on the histograms) are counted only for chains built with `servers { metrics }`, as
//!   Caddy 2.6 does; without it no request touches anything here.
//! - `caddy_reverse_proxy_upstreams_healthy{upstream}` and
//!   `edge_tls_certificate_expiry_timestamp_seconds{name}` (the edge's own) are read when a
//!   scrape asks, from what proxies and the certificate store registered.
//!
//! Invariants: a request only does atomic adds on series made when the config loaded (a
//! histogram's cell for a method and status is made once, the first time that pair is
//! seen); the registry's lock is taken when a config builds and when a scrape renders,
//! never per request. Series outlive reloads (keyed by server and handler), so counters
//! only go up while the process lives, as Caddy's do.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use crate::health::Host;

/// Caddy's (Prometheus' default) duration buckets, in seconds, as Go prints them.
const DURATION_BUCKETS: [(f64, &str); 11] = [
    (0.005, "0.005"),
    (0.01, "0.01"),
    (0.025, "0.025"),
    (0.05, "0.05"),
    (0.1, "0.1"),
    (0.25, "0.25"),
    (0.5, "0.5"),
    (1.0, "1"),
    (2.5, "2.5"),
    (5.0, "5"),
    (10.0, "10"),
];

/// Caddy's size buckets (256 times powers of 4), in bytes, as Go prints them.
const SIZE_BUCKETS: [(f64, &str); 8] = [
    (256.0, "256"),
    (1024.0, "1024"),
    (4096.0, "4096"),
    (16384.0, "16384"),
    (65536.0, "65536"),
    (262144.0, "262144"),
    (1048576.0, "1.048576e+06"),
    (4194304.0, "4.194304e+06"),
];

/// The method label values Caddy keeps; anything else is `OTHER` (the last).
const METHODS: [&str; 10] = [
    "GET", "HEAD", "PUT", "POST", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "OTHER",
];

/// Status codes a histogram cell exists for: 100 to 599.
const CODES: usize = 500;

/// The content type of the text exposition.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The index in [`METHODS`] of a request method (Caddy's SanitizeMethod: the nine common
/// methods in upper or lower case).
pub(crate) fn method_index(method: &str) -> usize {
    METHODS[..9]
        .iter()
        .position(|m| method == *m || (method.eq_ignore_ascii_case(m) && is_lower(method)))
        .unwrap_or(9)
}

fn is_lower(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_lowercase())
}

/// A histogram: counts per bucket (not cumulative), total count, and the sum in units of
/// `1 / scale` (nanoseconds or bytes), so adding is one atomic add.
#[derive(Debug)]
struct Histogram<const N: usize> {
    buckets: [AtomicU64; N],
    count: AtomicU64,
    sum: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    fn new() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }

    /// Adds `raw` (in the sum's units) whose value is `value` (in the buckets' units).
    fn observe(&self, bounds: &[(f64, &str); N], value: f64, raw: u64) {
        if let Some(i) = bounds.iter().position(|(b, _)| value <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(raw, Ordering::Relaxed);
    }
}

/// The four histograms of one (server, handler, method, code).
#[derive(Debug)]
struct Cell {
    request_duration: Histogram<11>,
    response_duration: Histogram<11>,
    request_size: Histogram<8>,
    response_size: Histogram<8>,
}

/// Cells of one method, by status code - 100.
type ByCode = Box<[OnceLock<Box<Cell>>]>;

/// One (server, handler) pair's counters.
#[derive(Debug)]
pub(crate) struct Series {
    server: String,
    handler: &'static str,
    requests: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicI64,
    /// Set on the first request, so the series shows from then on (as Caddy's children
    /// appear on first use).
    used: AtomicU64,
    cells: [OnceLock<ByCode>; METHODS.len()],
}

/// What one request observed, for [`Series::finish`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Observed {
    /// Index in the method list ([`method_index`]).
    pub(crate) method: usize,
    /// The response's status.
    pub(crate) code: u16,
    /// Start to end of the response body.
    pub(crate) duration: Duration,
    /// Caddy's approximate request size.
    pub(crate) request_size: u64,
    /// Body bytes sent.
    pub(crate) response_size: u64,
}

impl Series {
    fn new(server: &str, handler: &'static str) -> Series {
        Series {
            server: server.to_owned(),
            handler,
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            used: AtomicU64::new(0),
            cells: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// A request entered the handler.
    pub(crate) fn enter(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        if self.used.load(Ordering::Relaxed) == 0 {
            self.used.store(1, Ordering::Relaxed);
        }
    }

    fn cell(&self, method: usize, code: u16) -> Option<&Cell> {
        let index = usize::from(code).checked_sub(100).filter(|i| *i < CODES)?;
        let by_code = self.cells.get(method)?.get_or_init(|| {
            (0..CODES)
                .map(|_| OnceLock::new())
                .collect::<Vec<_>>()
                .into_boxed_slice()
        });
        Some(by_code[index].get_or_init(|| {
            Box::new(Cell {
                request_duration: Histogram::new(),
                response_duration: Histogram::new(),
                request_size: Histogram::new(),
                response_size: Histogram::new(),
            })
        }))
    }

    /// The response head is ready after `ttfb`: Caddy's `response_duration_seconds`.
    pub(crate) fn first_byte(&self, method: usize, code: u16, ttfb: Duration) {
        if let Some(cell) = self.cell(method, code) {
            cell.response_duration.observe(
                &DURATION_BUCKETS,
                ttfb.as_secs_f64(),
                ttfb.as_nanos() as u64,
            );
        }
    }

    /// The handler failed (Caddy's handler error): counted, no histograms.
    pub(crate) fn failed(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// The response ended.
    pub(crate) fn finish(&self, o: &Observed) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(cell) = self.cell(o.method, o.code) {
            cell.request_duration.observe(
                &DURATION_BUCKETS,
                o.duration.as_secs_f64(),
                o.duration.as_nanos() as u64,
            );
            cell.request_size
                .observe(&SIZE_BUCKETS, o.request_size as f64, o.request_size);
            cell.response_size
                .observe(&SIZE_BUCKETS, o.response_size as f64, o.response_size);
        }
    }
}

/// Something that knows certificates' expiry times (the certificate store).
pub(crate) trait Expiries: Send + Sync {
    /// (name, not-after as Unix seconds) of each certificate served.
    fn expiries(&self) -> Vec<(String, i64)>;
}

/// Whether an upstream is healthy, by its health state.
pub(crate) type Healthy = Arc<dyn Fn(&Host) -> bool + Send + Sync>;

/// One reverse proxy's upstreams: their dial addresses and health state.
struct Upstreams {
    dials: Vec<String>,
    hosts: Weak<[Host]>,
    healthy: Healthy,
}

#[derive(Default)]
struct Registry {
    series: Vec<Arc<Series>>,
    upstreams: Vec<Upstreams>,
    certs: Option<Weak<dyn Expiries>>,
}

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The series of `handler` on `server`, made on first ask; a reload gets the same one.
pub(crate) fn series(server: &str, handler: &'static str) -> Arc<Series> {
    let mut r = registry();
    if let Some(s) = r
        .series
        .iter()
        .find(|s| s.server == server && s.handler == handler)
    {
        return s.clone();
    }
    let s = Arc::new(Series::new(server, handler));
    r.series.push(s.clone());
    s
}

/// Shows a proxy's upstreams in `caddy_reverse_proxy_upstreams_healthy` while `hosts`
/// lives; `healthy` says whether one is.
pub(crate) fn watch_upstreams(dials: Vec<String>, hosts: &Arc<[Host]>, healthy: Healthy) {
    let mut r = registry();
    r.upstreams.retain(|u| u.hosts.strong_count() > 0);
    r.upstreams.push(Upstreams {
        dials,
        hosts: Arc::downgrade(hosts),
        healthy,
    });
}

/// Shows the certificates of `certs` in `edge_tls_certificate_expiry_timestamp_seconds`.
pub(crate) fn watch_certs(certs: Weak<dyn Expiries>) {
    registry().certs = Some(certs);
}

/// Go's `%g`-like number: integers without a point, others as Rust prints them.
fn number(out: &mut String, v: f64) {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

/// Escapes a label value (backslash, quote, newline).
fn escape(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One histogram, cumulated, with its labels (code, handler, method, server: sorted as
/// Prometheus' Go client sorts them).
fn histogram<const N: usize>(
    out: &mut String,
    name: &str,
    labels: &str,
    h: &Histogram<N>,
    bounds: &[(f64, &str); N],
    scale: f64,
) {
    let mut total = 0;
    for (bucket, (_, le)) in h.buckets.iter().zip(bounds) {
        total += bucket.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {total}");
    }
    let count = h.count.load(Ordering::Relaxed);
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
    let _ = write!(out, "{name}_sum{{{labels}}} ");
    number(out, h.sum.load(Ordering::Relaxed) as f64 / scale);
    let _ = writeln!(out, "\n{name}_count{{{labels}}} {count}");
}

/// The exposition of everything registered.
pub(crate) fn render() -> String {
    let (mut series, upstreams, certs) = {
        let mut r = registry();
        r.upstreams.retain(|u| u.hosts.strong_count() > 0);
        let upstreams: Vec<(Vec<String>, Arc<[Host]>, Healthy)> = r
            .upstreams
            .iter()
            .filter_map(|u| Some((u.dials.clone(), u.hosts.upgrade()?, u.healthy.clone())))
            .collect();
        let certs = r.certs.as_ref().and_then(Weak::upgrade);
        (r.series.clone(), upstreams, certs)
    };
    series.retain(|s| s.used.load(Ordering::Relaxed) != 0);
    series.sort_by(|a, b| (a.handler, &a.server).cmp(&(b.handler, &b.server)));
    let mut out = String::new();
    fn cells(s: &Series) -> Vec<(String, &Cell)> {
        let mut found = Vec::new();
        for (m, by_code) in s.cells.iter().enumerate() {
            let Some(by_code) = by_code.get() else {
                continue;
            };
            for (c, cell) in by_code.iter().enumerate() {
                if let Some(cell) = cell.get() {
                    let mut labels = format!("code=\"{}\",handler=\"", c + 100);
                    escape(&mut labels, s.handler);
                    let _ = write!(labels, "\",method=\"{}\",server=\"", METHODS[m]);
                    escape(&mut labels, &s.server);
                    labels.push('"');
                    found.push((labels, &**cell));
                }
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }
    let basic = |s: &Series| {
        let mut labels = String::from("handler=\"");
        escape(&mut labels, s.handler);
        labels.push_str("\",server=\"");
        escape(&mut labels, &s.server);
        labels.push('"');
        labels
    };
    let all_cells: Vec<(String, &Cell)> = series.iter().flat_map(|s| cells(s)).collect();
    let histograms: [(&str, &str, usize); 2] = [
        (
            "caddy_http_request_duration_seconds",
            "Histogram of round-trip request durations.",
            0,
        ),
        (
            "caddy_http_request_size_bytes",
            "Total size of the request. Includes body",
            2,
        ),
    ];
    let emit_histogram = |out: &mut String, (name, help, which): (&str, &str, usize)| {
        if all_cells.is_empty() {
            return;
        }
        head(out, name, "histogram", help);
        for (labels, cell) in &all_cells {
            match which {
                0 => histogram(
                    out,
                    name,
                    labels,
                    &cell.request_duration,
                    &DURATION_BUCKETS,
                    1e9,
                ),
                1 => histogram(
                    out,
                    name,
                    labels,
                    &cell.response_duration,
                    &DURATION_BUCKETS,
                    1e9,
                ),
                2 => histogram(out, name, labels, &cell.request_size, &SIZE_BUCKETS, 1.0),
                _ => histogram(out, name, labels, &cell.response_size, &SIZE_BUCKETS, 1.0),
            }
        }
    };
    // Families in name order, as Caddy's exposition has them.
    emit_histogram(&mut out, histograms[0]);
    let failed: Vec<&Arc<Series>> = series
        .iter()
        .filter(|s| s.errors.load(Ordering::Relaxed) > 0)
        .collect();
    if !failed.is_empty() {
        let name = "caddy_http_request_errors_total";
        head(
            &mut out,
            name,
            "counter",
            "Number of requests resulting in middleware errors.",
        );
        for s in failed {
            let _ = writeln!(
                out,
                "{name}{{{}}} {}",
                basic(s),
                s.errors.load(Ordering::Relaxed)
            );
        }
    }
    emit_histogram(&mut out, histograms[1]);
    if !series.is_empty() {
        let name = "caddy_http_requests_in_flight";
        head(
            &mut out,
            name,
            "gauge",
            "Number of requests currently handled by this server.",
        );
        for s in &series {
            let _ = writeln!(
                out,
                "{name}{{{}}} {}",
                basic(s),
                s.in_flight.load(Ordering::Relaxed)
            );
        }
        let name = "caddy_http_requests_total";
        head(
            &mut out,
            name,
            "counter",
            "Counter of HTTP(S) requests made.",
        );
        // A series shows here once a request has ended in it, as Caddy's does.
        for s in series
            .iter()
            .filter(|s| s.requests.load(Ordering::Relaxed) > 0)
        {
            let _ = writeln!(
                out,
                "{name}{{{}}} {}",
                basic(s),
                s.requests.load(Ordering::Relaxed)
            );
        }
    }
    emit_histogram(
        &mut out,
        (
            "caddy_http_response_duration_seconds",
            "Histogram of times to first byte in response bodies.",
            1,
        ),
    );
    emit_histogram(
        &mut out,
        (
            "caddy_http_response_size_bytes",
            "Size of the returned response.",
            3,
        ),
    );
    let mut health: Vec<(String, bool)> = Vec::new();
    for (dials, hosts, healthy) in &upstreams {
        for (dial, host) in dials.iter().zip(hosts.iter()) {
            let ok = healthy(host);
            match health.iter_mut().find(|(d, _)| d == dial) {
                // One address in several proxies: healthy only if every one finds it so.
                Some((_, was)) => *was &= ok,
                None => health.push((dial.clone(), ok)),
            }
        }
    }
    if !health.is_empty() {
        health.sort();
        let name = "caddy_reverse_proxy_upstreams_healthy";
        head(
            &mut out,
            name,
            "gauge",
            "Health status of reverse proxy upstreams.",
        );
        for (dial, ok) in health {
            out.push_str(name);
            out.push_str("{upstream=\"");
            escape(&mut out, &dial);
            let _ = writeln!(out, "\"}} {}", u8::from(ok));
        }
    }
    let mut expiries = certs.map(|c| c.expiries()).unwrap_or_default();
    if !expiries.is_empty() {
        expiries.sort();
        let name = "edge_tls_certificate_expiry_timestamp_seconds";
        head(
            &mut out,
            name,
            "gauge",
            "When each served certificate expires (its notAfter), in Unix seconds.",
        );
        for (cert, not_after) in expiries {
            out.push_str(name);
            out.push_str("{name=\"");
            escape(&mut out, &cert);
            let _ = writeln!(out, "\"}} {not_after}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_sanitized_as_caddy_does() {
        assert_eq!(METHODS[method_index("GET")], "GET");
        assert_eq!(METHODS[method_index("patch")], "PATCH");
        assert_eq!(METHODS[method_index("Get")], "OTHER");
        assert_eq!(METHODS[method_index("PROPFIND")], "OTHER");
    }

    #[test]
    fn a_histogram_renders_cumulative_buckets_a_sum_and_a_count() {
        let series = Series::new("srv9", "static_response");
        series.enter();
        series.finish(&Observed {
            method: 0,
            code: 404,
            duration: Duration::from_millis(20),
            request_size: 300,
            response_size: 5000,
        });
        let cell = series.cell(0, 404).unwrap();
        let mut out = String::new();
        histogram(
            &mut out,
            "x",
            "a=\"b\"",
            &cell.response_size,
            &SIZE_BUCKETS,
            1.0,
        );
        assert!(out.contains("x_bucket{a=\"b\",le=\"4096\"} 0\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"16384\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 1\n"), "{out}");
        assert!(
            out.contains("x_sum{a=\"b\"} 5000\nx_count{a=\"b\"} 1\n"),
            "{out}"
        );
        assert_eq!(series.in_flight.load(Ordering::Relaxed), 0);
        assert!(series.cell(0, 99).is_none() && series.cell(0, 600).is_none());
    }
}
