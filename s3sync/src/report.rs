//! What a run tells its user: a progress bar on a terminal, one JSON line per transfer with
//! `--format json`, error lines and a closing summary on stderr.
//!
//! JSON lines (stdout) look like
//! `{"action":"upload","source":"dir/a.txt","destination":"s3://b/p/a.txt","size":12,"status":"ok"}`
//! with `action` one of `upload`, `download`, `copy`, `delete`, and `status` one of `ok`,
//! `failed` (with an `error` field) or `planned` (`--dry-run`).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use labcore::Format;
use serde::Serialize;

use crate::error::Error;

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
    /// A report; the progress bar shows only on a terminal and in text format.
    pub(crate) fn new(format: Format, show_progress: bool) -> Report {
        let progress = if show_progress && format == Format::Text && std::io::stderr().is_terminal()
        {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{bytes}/{total_bytes} {binary_bytes_per_sec} {wide_msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        } else {
            ProgressBar::hidden()
        };
        Report {
            format,
            progress,
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
        }
        self.progress
            .set_message(format!("{} done", self.copied + self.deleted));
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
    pub(crate) fn summary(&self) {
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
        text.push_str(&format!(" in {:.2}s", elapsed.as_secs_f64()));
        eprintln!("{text}");
    }
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
