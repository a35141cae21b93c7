//! What happens around a pass: hook commands and a healthcheck ping.
//!
//! `on_success` and `on_failure` run after the pass with `BACKUPD_STATUS` (`success` or
//! `failure`), `BACKUPD_REASON` (the first failure) and `BACKUPD_BACKUPS` (IDs made, space
//! separated) in their environment. A string runs through `/bin/sh -c`; a list runs directly.
//! The healthcheck URL follows healthchecks.io's convention: `URL/start` when a pass starts,
//! `URL` when it succeeds, `URL/fail` (with the reason as the body) when it fails. Hooks and
//! pings that fail are logged; they never change the pass's outcome.
//!
//! A source's `pre_hook` and `post_hook` ([`source_hook`]) run the same way, with
//! `BACKUPD_SOURCE` in their environment; unlike the pass hooks, their failure is the source's
//! failure. Logs and errors name the hook and the source, never the command line, which may
//! hold a token.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use labcore::Env;
use tokio::process::Command as Process;

use crate::Error;
use crate::config::{Command, Hooks};

const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// How a pass ended, for hooks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Whether every backup succeeded.
    pub(crate) success: bool,
    /// The first failure's message.
    pub(crate) reason: Option<String>,
    /// IDs of the backups made.
    pub(crate) backups: Vec<String>,
}

/// Which ping to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ping {
    /// The pass started.
    Start,
    /// The pass succeeded.
    Success,
    /// The pass failed.
    Fail,
}

/// Runs the hook for `outcome`, if one is configured.
pub(crate) async fn run_hook(hooks: &Hooks, outcome: &Outcome, env: &Env) {
    let (name, command) = if outcome.success {
        ("on_success", &hooks.on_success)
    } else {
        ("on_failure", &hooks.on_failure)
    };
    let Some(command) = command else {
        return;
    };
    let mut process = process(command, env);
    process
        .env(
            "BACKUPD_STATUS",
            if outcome.success {
                "success"
            } else {
                "failure"
            },
        )
        .env("BACKUPD_REASON", outcome.reason.as_deref().unwrap_or(""))
        .env("BACKUPD_BACKUPS", outcome.backups.join(" "))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let result = tokio::time::timeout(hooks.timeout, process.output()).await;
    match result {
        Ok(Ok(output)) if output.status.success() => tracing::info!(hook = name, "hook ran"),
        Ok(Ok(output)) => tracing::warn!(
            hook = name,
            status = %output.status,
            stderr = %String::from_utf8_lossy(&output.stderr).trim(),
            "hook failed"
        ),
        Ok(Err(err)) => tracing::warn!(hook = name, error = %err, "hook could not be started"),
        Err(_) => {
            tracing::warn!(hook = name, timeout = ?hooks.timeout, "hook timed out and was killed")
        }
    }
}

/// The process for a hook command, with the tool's environment minus the systemd socket.
fn process(command: &Command, env: &Env) -> Process {
    let mut process = match command {
        Command::Shell(line) => {
            let mut p = Process::new("/bin/sh");
            p.arg("-c").arg(line);
            p
        }
        Command::Argv(argv) => {
            let mut p = Process::new(&argv[0]);
            p.args(&argv[1..]);
            p
        }
    };
    process.env_clear();
    for (key, value) in env.iter() {
        if key != "NOTIFY_SOCKET" {
            process.env(key, value);
        }
    }
    process
}

/// Runs a source's `pre_hook` or `post_hook` (`which`) within the hooks' timeout.
pub(crate) async fn source_hook(
    which: &str,
    source: &str,
    command: &Command,
    hooks: &Hooks,
    env: &Env,
) -> Result<(), Error> {
    let program = format!("the {which} of source {source}");
    let mut process = process(command, env);
    process
        .env("BACKUPD_SOURCE", source)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(hooks.timeout, process.output()).await {
        Ok(Ok(output)) if output.status.success() => {
            tracing::info!(hook = which, source, "hook ran");
            Ok(())
        }
        Ok(Ok(output)) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            // The end of its stderr is what says why; a chatty hook must not flood the log.
            let tail: String = stderr.trim().chars().rev().take(2000).collect();
            Err(Error::Child {
                program,
                status: output.status.to_string(),
                stderr: tail.chars().rev().collect(),
            })
        }
        Ok(Err(source)) => Err(Error::Spawn { program, source }),
        Err(_) => Err(Error::Child {
            program,
            status: format!("killed after the timeout of {:?}", hooks.timeout),
            stderr: String::new(),
        }),
    }
}

/// Sends a healthcheck ping, if a URL is configured. Logs name the check by its scheme and
/// host only: the rest of the URL is a secret.
pub(crate) async fn ping(hooks: &Hooks, ping: Ping, body: &str) {
    let Some(check) = &hooks.healthcheck_url else {
        return;
    };
    let (name, suffix) = match ping {
        Ping::Start => ("start", "/start"),
        Ping::Success => ("success", ""),
        Ping::Fail => ("fail", "/fail"),
    };
    let url = check.ping_url(suffix);
    match tokio::time::timeout(PING_TIMEOUT, post(&url, body)).await {
        Ok(Ok(status)) if (200..300).contains(&status) => {
            tracing::debug!(%check, ping = name, status, "healthcheck pinged")
        }
        Ok(Ok(status)) => tracing::warn!(%check, ping = name, status, "healthcheck ping refused"),
        Ok(Err(err)) => {
            tracing::warn!(%check, ping = name, error = %err, "healthcheck ping failed")
        }
        Err(_) => tracing::warn!(%check, ping = name, "healthcheck ping timed out"),
    }
}

async fn post(url: &str, body: &str) -> Result<u16, Box<dyn std::error::Error + Send + Sync>> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()?
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let request = hyper::Request::post(url)
        .header("content-type", "text/plain; charset=utf-8")
        .header("user-agent", concat!("backupd/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(Bytes::from(body.to_owned())))?;
    let response = client.request(request).await?;
    let status = response.status().as_u16();
    // Drain the (small) body so the connection closes cleanly.
    let _ = response.into_body().collect().await;
    Ok(status)
}
