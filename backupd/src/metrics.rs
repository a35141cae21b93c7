//! Prometheus metrics: a textfile (`metrics_file`, for node_exporter's textfile collector)
//! written after every pass, and the same text served by `backupd daemon` on `metrics_addr`.
//!
//! The per-backup figures come from the targets themselves (the newest complete backup of
//! each subject on each target: its start time, duration, stored size, restore test), not
//! from memory, so they survive restarts and a source that keeps failing shows its last
//! success ageing. A target that cannot be listed is `backupd_target_up 0` and has no
//! per-backup lines. The file is replaced atomically (written beside it, then renamed), so
//! the collector never reads half of it.
//!
//! WAL archiving reports its lag through [`Snapshot::wal_lag`] (cluster name to seconds since
//! the newest archived segment), rendered as `backupd_wal_lag_seconds`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use jiff::Timestamp;
use labcore::Env;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Error;
use crate::catalog;
use crate::config::Config;
use crate::inventory::{self, Listed};
use crate::run::{self, PassReport};

/// The latest text, for `metrics_addr`.
static LATEST: Mutex<String> = Mutex::new(String::new());

/// How a pass went, for the pass-level lines.
#[derive(Clone, Debug, Default)]
pub(crate) struct Snapshot {
    /// When the pass ended.
    pub(crate) finished_at: Option<Timestamp>,
    /// How long it took.
    pub(crate) duration: Duration,
    /// Whether every backup succeeded (copies aside).
    pub(crate) success: bool,
    /// Failed backups and hooks.
    pub(crate) failures: usize,
    /// For each `copy_to`: from, to, whether it completed, objects still pending.
    pub(crate) copies: Vec<(String, String, bool, usize)>,
    /// Seconds since the newest archived WAL segment, by cluster.
    pub(crate) wal_lag: BTreeMap<String, f64>,
}

impl Snapshot {
    /// The pass-level figures of a pass's outcome.
    pub(crate) fn of(report: &Result<PassReport, Error>, duration: Duration) -> Snapshot {
        let mut snapshot = Snapshot {
            finished_at: Some(Timestamp::now()),
            duration,
            ..Snapshot::default()
        };
        match report {
            Ok(report) => {
                snapshot.success = report.failures.is_empty();
                snapshot.failures = report.failures.len();
                snapshot.copies = report
                    .copies
                    .iter()
                    .map(|c| {
                        (
                            c.from.clone(),
                            c.to.clone(),
                            c.report.complete(),
                            c.report.pending,
                        )
                    })
                    .collect();
            }
            Err(_) => snapshot.failures = 1,
        }
        snapshot
    }
}

/// Renders the metrics (listing every target) and writes `metrics_file` if configured.
/// Failures are logged: metrics never change a pass's outcome.
pub(crate) async fn publish(config: &Config, env: &Env, snapshot: &Snapshot) {
    if config.metrics_file.is_none() && config.metrics_addr.is_none() {
        return;
    }
    let mut newest: Vec<(String, Option<Vec<Listed>>)> = Vec::new();
    match run::open_stores(config, env).await {
        Ok(stores) => {
            for (name, store) in stores {
                let listed = match inventory::inventory(&store).await {
                    Ok(inventory) => {
                        // Oldest first: the last one seen of a subject is its newest.
                        let mut by_subject: BTreeMap<String, Listed> = BTreeMap::new();
                        for listed in inventory.complete {
                            let source = &listed.manifest.source;
                            let subject =
                                catalog::subject(&source.name, source.database.as_deref());
                            by_subject.insert(subject, listed);
                        }
                        Some(by_subject.into_values().collect())
                    }
                    Err(err) => {
                        tracing::warn!(target = %name, error = %labcore::exit::chain(&err), "metrics: the target cannot be listed");
                        None
                    }
                };
                newest.push((name, listed));
            }
        }
        Err(err) => {
            tracing::warn!(error = %labcore::exit::chain(&err), "metrics: the targets cannot be opened")
        }
    }
    let mut snapshot = snapshot.clone();
    for (cluster, lag) in wal_lags(config, env).await {
        snapshot.wal_lag.insert(cluster, lag);
    }
    let text = render(&newest, &snapshot);
    if let Ok(mut latest) = LATEST.lock() {
        latest.clone_from(&text);
    }
    if let Some(path) = &config.metrics_file
        && let Err(err) = write_atomically(path, &text)
    {
        tracing::warn!(file = %path.display(), error = %err, "metrics: writing the textfile failed");
    }
}

/// For each `[[cluster]]`, the seconds since its newest stored WAL segment reached its
/// target (a cluster whose target cannot be read, or holds no segment, has no line: an
/// absent series alerts as surely as a large one).
async fn wal_lags(config: &Config, env: &Env) -> Vec<(String, f64)> {
    let mut lags = Vec::new();
    if config.clusters.is_empty() {
        return lags;
    }
    let Ok(stores) = run::open_stores(config, env).await else {
        return lags;
    };
    let now = Timestamp::now().as_second();
    for cluster in &config.clusters {
        let Some((_, store)) = stores.iter().find(|(name, _)| *name == cluster.target) else {
            continue;
        };
        let newest = match crate::pitr::holdings(store, &cluster.name).await {
            Ok(held) => held
                .wal
                .iter()
                .filter(|n| n.kind() == crate::wal::WalKind::Segment)
                .max()
                .cloned(),
            Err(err) => {
                tracing::warn!(cluster = %cluster.name, error = %labcore::exit::chain(&err), "metrics: the WAL archive cannot be listed");
                None
            }
        };
        let Some(newest) = newest else {
            continue;
        };
        let key = crate::wal::object_key(&cluster.name, &newest);
        if let Ok(Some(stored_at)) = store.modified(&key).await {
            lags.push((cluster.name.clone(), (now - stored_at).max(0) as f64));
        }
    }
    lags
}

fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut temp = tempfile::Builder::new()
        .prefix(".backupd-metrics")
        .tempfile_in(dir)?;
    std::io::Write::write_all(&mut temp, text.as_bytes())?;
    std::fs::set_permissions(
        temp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    temp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// A label value, escaped as the text format wants.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn seconds(t: Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}

/// The exposition text.
fn render(targets: &[(String, Option<Vec<Listed>>)], pass: &Snapshot) -> String {
    let mut out = String::new();
    let mut family = |name: &str, help: &str, lines: Vec<(String, f64)>| {
        if lines.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, value) in lines {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let per_backup = |value: fn(&Listed) -> f64| -> Vec<(String, f64)> {
        let mut lines = Vec::new();
        for (target, listed) in targets {
            for backup in listed.iter().flatten() {
                let source = &backup.manifest.source;
                let subject = catalog::subject(&source.name, source.database.as_deref());
                lines.push((
                    format!(
                        "{{source=\"{}\",subject=\"{}\",target=\"{}\"}}",
                        label(&source.name),
                        label(&subject),
                        label(target)
                    ),
                    value(backup),
                ));
            }
        }
        lines
    };
    family(
        "backupd_last_success_timestamp_seconds",
        "Start of the newest complete backup of the subject on the target.",
        per_backup(|b| seconds(b.manifest.started_at)),
    );
    family(
        "backupd_last_duration_seconds",
        "How long the newest complete backup took.",
        per_backup(|b| {
            b.manifest
                .finished_at
                .duration_since(b.manifest.started_at)
                .as_secs_f64()
                .max(0.0)
        }),
    );
    family(
        "backupd_last_size_bytes",
        "Stored (compressed, encrypted) size of the newest complete backup.",
        per_backup(|b| b.manifest.data.size as f64),
    );
    family(
        "backupd_last_verified",
        "1 if the newest complete backup passed a restore test.",
        per_backup(|b| if b.verified() { 1.0 } else { 0.0 }),
    );
    family(
        "backupd_target_up",
        "1 if the target could be listed when the metrics were written.",
        targets
            .iter()
            .map(|(t, l)| {
                (
                    format!("{{target=\"{}\"}}", label(t)),
                    if l.is_some() { 1.0 } else { 0.0 },
                )
            })
            .collect(),
    );
    if let Some(at) = pass.finished_at {
        family(
            "backupd_pass_timestamp_seconds",
            "When the last pass ended.",
            vec![(String::new(), seconds(at))],
        );
        family(
            "backupd_pass_duration_seconds",
            "How long the last pass took.",
            vec![(String::new(), pass.duration.as_secs_f64())],
        );
        family(
            "backupd_pass_success",
            "1 if every backup and hook of the last pass succeeded.",
            vec![(String::new(), if pass.success { 1.0 } else { 0.0 })],
        );
        family(
            "backupd_pass_failures",
            "Backups and hooks that failed in the last pass.",
            vec![(String::new(), pass.failures as f64)],
        );
    }
    let copy_labels =
        |from: &str, to: &str| format!("{{from=\"{}\",to=\"{}\"}}", label(from), label(to));
    family(
        "backupd_copy_pending",
        "1 if the last pass left the copy to the target unfinished.",
        pass.copies
            .iter()
            .map(|(from, to, complete, _)| {
                (copy_labels(from, to), if *complete { 0.0 } else { 1.0 })
            })
            .collect(),
    );
    family(
        "backupd_copy_pending_objects",
        "Objects the last pass left to copy.",
        pass.copies
            .iter()
            .map(|(from, to, _, pending)| (copy_labels(from, to), *pending as f64))
            .collect(),
    );
    family(
        "backupd_wal_lag_seconds",
        "Seconds since the newest archived WAL segment of the cluster.",
        pass.wal_lag
            .iter()
            .map(|(cluster, lag)| (format!("{{cluster=\"{}\"}}", label(cluster)), *lag))
            .collect(),
    );
    out
}

/// Serves the latest text on `addr` until the task is dropped: `GET /metrics` gets it,
/// anything else 404. One short request per connection, as Prometheus scrapes.
pub(crate) async fn serve(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let line = String::from_utf8_lossy(&request);
            let target = line.split_whitespace().nth(1).unwrap_or("");
            let response = if line.starts_with("GET ") && target == "/metrics" {
                let body = LATEST.lock().map(|t| t.clone()).unwrap_or_default();
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into()
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped_and_empty_families_left_out() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let snapshot = Snapshot {
            finished_at: Some(Timestamp::from_second(1_700_000_000).unwrap()),
            duration: Duration::from_millis(1500),
            success: false,
            failures: 2,
            copies: vec![("home".into(), "offsite".into(), false, 7)],
            wal_lag: BTreeMap::from([("main".into(), 12.5)]),
        };
        let text = render(&[("home".into(), None)], &snapshot);
        assert!(
            text.contains("backupd_target_up{target=\"home\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("backupd_pass_failures 2\n"), "{text}");
        assert!(
            text.contains("backupd_pass_duration_seconds 1.5\n"),
            "{text}"
        );
        assert!(
            text.contains("backupd_copy_pending_objects{from=\"home\",to=\"offsite\"} 7\n"),
            "{text}"
        );
        assert!(
            text.contains("backupd_wal_lag_seconds{cluster=\"main\"} 12.5\n"),
            "{text}"
        );
        assert!(!text.contains("backupd_last_size_bytes"), "{text}");
    }
}
