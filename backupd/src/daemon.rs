//! `backupd daemon`: passes at the configured times of day, with systemd readiness, watchdog
//! and SIGHUP reload. A pass that fails is reported (hooks, healthcheck, log) and the daemon
//! waits for the next time; it never exits because a backup failed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};
use labcore::Env;
use labcore::notify::Notifier;
use labcore::signals::Signals;

use crate::config::{Config, Schedule};
use crate::{Error, run};

/// The first scheduled time strictly after `now`, in `tz`.
pub(crate) fn next_run(schedule: &Schedule, now: &Zoned) -> Zoned {
    let mut best: Option<Zoned> = None;
    for days in 0..=1 {
        let Ok(date) = now.date().checked_add(jiff::Span::new().days(days)) else {
            continue;
        };
        for &(hour, minute) in &schedule.at {
            let Ok(at) = date
                .at(hour as i8, minute as i8, 0, 0)
                .to_zoned(now.time_zone().clone())
            else {
                continue;
            };
            if at > *now && best.as_ref().is_none_or(|b| at < *b) {
                best = Some(at);
            }
        }
    }
    best.unwrap_or_else(|| {
        now.checked_add(jiff::Span::new().days(1))
            .unwrap_or_else(|_| now.clone())
    })
}

/// Stops the metrics server with the daemon.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs until SIGTERM.
pub(crate) async fn daemon(path: &Path, env: &Env) -> Result<(), Error> {
    let mut config = Config::load(path, env)?;
    let mut signals = Signals::install().map_err(|source| Error::Io {
        what: "installing signal handlers".into(),
        source,
    })?;
    let notifier = Arc::new(Notifier::from_env(env).map_err(|source| Error::Io {
        what: "reading NOTIFY_SOCKET".into(),
        source,
    })?);
    let shutdown = signals.shutdown();
    let watchdog = notifier.spawn_watchdog(shutdown.clone());
    let tz = TimeZone::system();
    let schedule = |config: &Config| {
        config.schedule.clone().ok_or_else(|| {
            Error::Config(config.file.invalid(
                "schedule",
                "the daemon needs a [schedule] with at = [\"HH:MM\", ...]",
            ))
        })
    };
    let mut plan = schedule(&config)?;
    // Bound before readiness, so a taken port fails the start; a reload keeps the address.
    let _metrics = match config.metrics_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Io {
                    what: format!("listening for metrics on {addr}"),
                    source,
                })?;
            // The bound address, so a configured port 0 shows which one it got.
            let bound = listener.local_addr().unwrap_or(addr);
            tracing::info!(addr = %bound, "serving metrics");
            crate::metrics::publish(&config, env, &crate::metrics::Snapshot::default()).await;
            Some(AbortOnDrop(tokio::spawn(crate::metrics::serve(listener))))
        }
        None => None,
    };
    notifier.ready();
    loop {
        let now = Timestamp::now().to_zoned(tz.clone());
        let next = next_run(&plan, &now);
        let jitter = if plan.randomized_delay.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_millis(
                rand::random::<u64>() % plan.randomized_delay.as_millis().max(1) as u64,
            )
        };
        let wait = Duration::try_from(next.timestamp() - now.timestamp()).unwrap_or(Duration::ZERO)
            + jitter;
        tracing::info!(next = %next, "waiting for the next backup pass");
        notifier.status(&format!("next pass at {next}"));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = signals.reload() => {
                notifier.reloading();
                match Config::load(path, env).map_err(Error::from).and_then(|c| schedule(&c).map(|s| (c, s))) {
                    Ok((new, new_plan)) => {
                        config = new;
                        plan = new_plan;
                        tracing::info!("configuration reloaded");
                    }
                    Err(err) => tracing::error!(error = %labcore::exit::chain(&err), "new configuration rejected; keeping the old one"),
                }
                notifier.ready();
            }
            _ = tokio::time::sleep(wait) => {
                notifier.status("backup pass running");
                let started = std::time::Instant::now();
                let pass = tokio::select! {
                    result = Box::pin(run::pass(&config, env, &[])) => Some(result),
                    _ = shutdown.cancelled() => None,
                };
                if let Some(result) = &pass {
                    let snapshot = crate::metrics::Snapshot::of(result, started.elapsed());
                    crate::metrics::publish(&config, env, &snapshot).await;
                }
                let pass = pass.map(|result| result.and_then(run::PassReport::into_result));
                match pass {
                    None => break,
                    Some(Ok(report)) => tracing::info!(made = report.made.len(), pruned = report.pruned.len(), "backup pass done"),
                    Some(Err(err)) => tracing::error!(error = %labcore::exit::chain(&err), "backup pass failed"),
                }
            }
        }
    }
    notifier.stopping();
    if let Some(watchdog) = watchdog {
        let _ = watchdog.await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_run_is_the_next_listed_time_today_or_tomorrow() {
        let schedule = Schedule {
            at: vec![(3, 15), (15, 0)],
            randomized_delay: Duration::ZERO,
        };
        let at = |s: &str| s.parse::<Timestamp>().unwrap().to_zoned(TimeZone::UTC);
        assert_eq!(
            next_run(&schedule, &at("2026-11-25T01:00:00Z")),
            at("2026-11-25T03:15:00Z")
        );
        assert_eq!(
            next_run(&schedule, &at("2026-11-25T03:15:00Z")),
            at("2026-11-25T15:00:00Z")
        );
        assert_eq!(
            next_run(&schedule, &at("2026-11-25T16:00:00Z")),
            at("2026-11-26T03:15:00Z")
        );
    }
}
