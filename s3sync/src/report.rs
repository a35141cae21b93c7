//! What a run tells its user: a live progress display on a terminal (files, bytes, rate, ETA;
//! nothing when stderr is not a terminal), or with `--progress json` a JSON line a second on
//! stderr; one JSON line per transfer with `--format json`, error lines, and a closing summary
//! on stderr that every run prints.
//!
//! Progress lines look like
//! `{"progress":{"files_done":3,"files_total":9,"bytes_done":123,"bytes_total":456,
//! "bytes_per_second":789.0,"eta_seconds":1.2}}`, and a last one with `"done":true`.
//!
//! JSON lines (stdout) look like
//! `{"action":"upload","source":"dir/a.txt","destination":"s3://b/p/a.txt","size":12,"status":"ok"}`
//! with `action` one of `upload`, `download`, `copy`, `delete`, and `status` one of `ok`,
//! `failed` (with an `error` field) or `planned` (`--dry-run`).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use labcore::Format;
use serde::Serialize;

use crate::cli::ProgressMode;
use crate::error::Error;

/// Files queued and finished, shared with the transfers.
#[derive(Debug, Default)]
pub(crate) struct Files {
    /// Files (and objects) whose transfer was started.
    pub(crate) total: AtomicU64,
    /// Files whose transfer finished.
    pub(crate) done: AtomicU64,
    /// Parts of interrupted uploads found on the store and not sent again.
    resumed_parts: Arc<AtomicU64>,
}

impl Files {
    /// The count of resumed parts, for the uploads to add to.
    pub(crate) fn clone_resumed(&self) -> Arc<AtomicU64> {
        self.resumed_parts.clone()
    }
}

/// What was done to one file or object.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Action {
    /// Local to S3.
    Upload,
    /// S3 to local.
    Download,
    /// S3 to S3.
    Copy,
    /// Removed from the destination.
    Delete,
}

#[derive(Serialize)]
struct Line<'a> {
    action: Action,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a str>,
    destination: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    status: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Counts and prints the outcome of every transfer of one run.
pub(crate) struct Report {
    format: Format,
    progress: ProgressBar,
    files: Arc<Files>,
    json_progress: bool,
    ticker: Option<tokio::task::JoinHandle<()>>,
    started: Instant,
    /// Transfers that succeeded.
    pub(crate) copied: usize,
    /// Bytes they moved.
    pub(crate) bytes: u64,
    /// Entries left alone because they were already up to date.
    pub(crate) unchanged: usize,
    /// Objects or files deleted.
    pub(crate) deleted: usize,
    /// Transfers or deletions planned by a dry run.
    pub(crate) planned: usize,
    /// Failures (transfers, deletions and unreadable entries).
    pub(crate) failed: usize,
}

impl Report {
    /// A report; the live display shows only when stderr is a terminal (`auto`), JSON progress
    /// lines only with `json`. Call it inside the runtime: a task refreshes the display.
    pub(crate) fn new(format: Format, mode: ProgressMode) -> Report {
        let files = Arc::new(Files::default());
        let display = mode == ProgressMode::Auto && std::io::stderr().is_terminal();
        let json_progress = mode == ProgressMode::Json;
        let progress = if display {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_message("0/0 files");
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        } else if json_progress {
            // Drawn nowhere, but it keeps the counts and the rate estimate.
            ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden())
        } else {
            ProgressBar::hidden()
        };
        let ticker = (display || json_progress).then(|| {
            let (bar, files) = (progress.clone(), files.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(if json_progress {
                    Duration::from_secs(1)
                } else {
                    Duration::from_millis(200)
                });
                tick.tick().await;
                loop {
                    tick.tick().await;
                    if json_progress {
                        progress_line(&bar, &files, false);
                    } else {
                        bar.set_message(format!(
                            "{}/{} files",
                            files.done.load(Ordering::Relaxed),
                            files.total.load(Ordering::Relaxed)
                        ));
                    }
                }
            })
        });
        Report {
            format,
            progress,
            files,
            json_progress,
            ticker,
            started: Instant::now(),
            copied: 0,
            bytes: 0,
            unchanged: 0,
            deleted: 0,
            planned: 0,
            failed: 0,
        }
    }

    /// The progress bar, for transfers to advance.
    pub(crate) fn progress(&self) -> ProgressBar {
        self.progress.clone()
    }

    /// The file counts, for transfers to add to.
    pub(crate) fn files(&self) -> Arc<Files> {
        self.files.clone()
    }

    /// Records a finished transfer or deletion.
    pub(crate) fn done(
        &mut self,
        action: Action,
        source: Option<&str>,
        destination: &str,
        size: Option<u64>,
    ) {
        if action == Action::Delete {
            self.deleted += 1;
        } else {
            self.copied += 1;
            self.bytes += size.unwrap_or(0);
            self.files.done.fetch_add(1, Ordering::Relaxed);
        }
        self.line(action, source, destination, size, "ok", None);
    }

    /// Records a transfer or deletion a dry run would do; printed in every format.
    pub(crate) fn plan(
        &mut self,
        action: Action,
        source: Option<&str>,
        destination: &str,
        size: Option<u64>,
    ) {
        self.planned += 1;
        match self.format {
            Format::Json => self.line(action, source, destination, size, "planned", None),
            Format::Text => {
                let verb = match action {
                    Action::Upload => "upload",
                    Action::Download => "download",
                    Action::Copy => "copy",
                    Action::Delete => "delete",
                };
                let text = match source {
                    Some(source) => format!("would {verb} {source} -> {destination}\n"),
                    None => format!("would {verb} {destination}\n"),
                };
                self.progress.suspend(|| {
                    let _ = std::io::stdout().lock().write_all(text.as_bytes());
                });
            }
        }
    }

    /// Records a failure, printing it on stderr.
    pub(crate) fn failed(
        &mut self,
        action: Option<Action>,
        source: Option<&str>,
        destination: &str,
        err: &Error,
    ) {
        self.failed += 1;
        let message = labcore::exit::chain(err);
        self.progress.suspend(|| tracing::error!("{message}"));
        if let Some(action) = action {
            self.line(action, source, destination, None, "failed", Some(message));
        }
    }

    fn line(
        &self,
        action: Action,
        source: Option<&str>,
        destination: &str,
        size: Option<u64>,
        status: &str,
        error: Option<String>,
    ) {
        if self.format != Format::Json {
            return;
        }
        let line = Line {
            action,
            source,
            destination,
            size,
            status,
            error,
        };
        if let Ok(mut text) = serde_json::to_string(&line) {
            text.push('\n');
            // A closed stdout (`| head`) must not stop the transfers.
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
        }
    }

    /// Prints the summary on stderr.
    pub(crate) fn summary(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
        }
        if self.json_progress {
            progress_line(&self.progress, &self.files, true);
        }
        self.progress.finish_and_clear();
        let elapsed = self.started.elapsed();
        let rate = self.bytes as f64 / elapsed.as_secs_f64().max(1e-3);
        let mut text = format!(
            "s3sync: {} transferred ({}, {}/s), {} unchanged, {} deleted, {} failed",
            self.copied,
            human_bytes(self.bytes as f64),
            human_bytes(rate),
            self.unchanged,
            self.deleted,
            self.failed,
        );
        if self.planned > 0 {
            text.push_str(&format!(", {} planned (dry run)", self.planned));
        }
        let resumed = self.files.resumed_parts.load(Ordering::Relaxed);
        if resumed > 0 {
            text.push_str(&format!(
                ", {resumed} parts already stored were kept (resumed uploads)"
            ));
        }
        text.push_str(&format!(" in {:.2}s", elapsed.as_secs_f64()));
        eprintln!("{text}");
    }
}

/// One `--progress json` line on stderr.
fn progress_line(bar: &ProgressBar, files: &Files, done: bool) {
    let (position, length) = (bar.position(), bar.length().unwrap_or(0));
    let rate = bar.per_sec();
    let eta = if rate > 0.0 && length > position {
        (length - position) as f64 / rate
    } else {
        0.0
    };
    let mut line = serde_json::json!({
        "progress": {
            "files_done": files.done.load(Ordering::Relaxed),
            "files_total": files.total.load(Ordering::Relaxed),
            "bytes_done": position,
            "bytes_total": length,
            "bytes_per_second": (rate * 10.0).round() / 10.0,
            "eta_seconds": (eta * 10.0).round() / 10.0,
        }
    });
    if done {
        line["progress"]["done"] = true.into();
    }
    let mut text = line.to_string();
    text.push('\n');
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// `1.5 MiB` and the like.
pub(crate) fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
