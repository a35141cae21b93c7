//! labcore end to end in a real process (the `labkit-fixture` daemon): config errors and exit
//! codes, secrets kept out of logs, sd_notify readiness, SIGHUP reload and SIGTERM shutdown.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use nix::sys::signal::Signal;
use testkit::{ProcBuilder, Scratch};

const FIXTURE: &str = env!("CARGO_BIN_EXE_labkit-fixture");
const WAIT: Duration = Duration::from_secs(20);
const SECRET: &str = "hunter2-fixture-token";

fn config(dir: &Scratch, text: &str) -> std::path::PathBuf {
    let path = dir.join("fixture.toml");
    fs::write(&path, text).unwrap();
    path
}

#[test]
fn unknown_key_exits_78_naming_file_line_column_and_key() {
    let dir = Scratch::new("fixture").unwrap();
    let path = config(
        &dir,
        "[server]\nbind_addr = \"127.0.0.1:0\"\n\n[server.services.ssh]\ntokn = \"x\"\n",
    );
    let proc = ProcBuilder::new(FIXTURE)
        .arg("check")
        .arg("-c")
        .arg(&path)
        .spawn()
        .unwrap();
    proc.expect_exit(78, WAIT).unwrap();
    let stderr = proc.stderr();
    let expected = format!("{}:5:1: key \"server.services.ssh.tokn\"", path.display());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.starts_with("labkit-fixture: error: "), "{stderr}");
}

#[test]
fn wrong_type_exits_78_naming_the_key() {
    let dir = Scratch::new("fixture").unwrap();
    let path = config(&dir, "[server]\nbind_addr = 7000\n");
    let proc = ProcBuilder::new(FIXTURE)
        .arg("check")
        .arg("-c")
        .arg(&path)
        .spawn()
        .unwrap();
    proc.expect_exit(78, WAIT).unwrap();
    let stderr = proc.stderr();
    assert!(
        stderr.contains(":2:13: key \"server.bind_addr\": invalid type"),
        "{stderr}"
    );
}

#[test]
fn missing_config_exits_66_and_bad_flags_exit_64() {
    let missing = ProcBuilder::new(FIXTURE)
        .args(["check", "-c", "/nonexistent/fixture.toml"])
        .spawn()
        .unwrap();
    missing.expect_exit(66, WAIT).unwrap();
    assert!(
        missing
            .stderr()
            .contains("reading config /nonexistent/fixture.toml")
    );
    let usage = ProcBuilder::new(FIXTURE)
        .arg("--no-such-flag")
        .spawn()
        .unwrap();
    usage.expect_exit(64, WAIT).unwrap();
    let bad_filter = ProcBuilder::new(FIXTURE)
        .args(["--log-level", "info,=[", "check", "-c", "/x"])
        .spawn()
        .unwrap();
    bad_filter.expect_exit(64, WAIT).unwrap();
}

#[test]
fn secrets_from_files_and_credentials_resolve_and_never_reach_the_log() {
    let dir = Scratch::new("fixture").unwrap();
    let token_file = dir.join("web.token");
    fs::write(&token_file, format!("{SECRET}-file\n")).unwrap();
    fs::set_permissions(&token_file, fs::Permissions::from_mode(0o644)).unwrap();
    let creds = dir.join("creds");
    fs::create_dir(&creds).unwrap();
    fs::write(
        creds.join("server.services.git.token"),
        format!("{SECRET}-cred"),
    )
    .unwrap();
    let path = config(
        &dir,
        &format!(
            "[server]\nbind_addr = \"127.0.0.1:0\"\n[server.services.ssh]\ntoken = \"{SECRET}\"\n\
             [server.services.web]\ntoken_file = \"web.token\"\n[server.services.git]\n"
        ),
    );
    let proc = ProcBuilder::new(FIXTURE)
        .args([
            "--log-level",
            "trace",
            "--log-format",
            "json",
            "serve",
            "-c",
        ])
        .arg(&path)
        .env("CREDENTIALS_DIRECTORY", &creds)
        .notify()
        .spawn()
        .unwrap();
    proc.wait_ready(WAIT).unwrap();
    proc.stop(WAIT).unwrap();
    let stderr = proc.stderr();
    assert!(stderr.contains("\"services\":3"), "{stderr}");
    assert!(
        stderr.contains("[redacted]"),
        "the debug line shows the config: {stderr}"
    );
    assert!(!stderr.contains("hunter2"), "a secret leaked: {stderr}");
    // The world-readable token file draws a warning that names it.
    assert!(stderr.contains("readable by group or others"), "{stderr}");
    assert!(stderr.contains("web.token"), "{stderr}");
    for line in stderr.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
}

#[test]
fn sighup_reloads_and_a_bad_new_config_keeps_the_old_one() {
    let dir = Scratch::new("fixture").unwrap();
    let path = config(
        &dir,
        "[server]\nbind_addr = \"127.0.0.1:0\"\n[server.services.a]\ntoken = \"t\"\n",
    );
    let proc = ProcBuilder::new(FIXTURE)
        .args(["serve", "-c"])
        .arg(&path)
        .notify()
        .spawn()
        .unwrap();
    proc.wait_ready(WAIT).unwrap();

    config(
        &dir,
        "[server]\nbind_addr = \"127.0.0.1:0\"\n[server.services.a]\ntoken = \"t\"\n[server.services.b]\ntoken = \"u\"\n",
    );
    proc.signal(Signal::SIGHUP).unwrap();
    let note = proc.wait_notification("RELOADING=1", WAIT).unwrap();
    assert!(note.contains("MONOTONIC_USEC="), "{note}");
    proc.wait_ready(WAIT).unwrap();
    proc.wait_stderr("reloaded", WAIT).unwrap();

    config(&dir, "[server]\nbind_addr = \"127.0.0.1:0\"\nbogus = 1\n");
    proc.signal(Signal::SIGHUP).unwrap();
    proc.wait_notification("RELOADING=1", WAIT).unwrap();
    proc.wait_ready(WAIT).unwrap();
    let line = proc.wait_stderr("keeping the old one", WAIT).unwrap();
    assert!(
        line.contains("key \\\"server.bogus\\\"") || line.contains("key \"server.bogus\""),
        "{line}"
    );

    proc.signal(Signal::SIGTERM).unwrap();
    proc.wait_notification("STOPPING=1", WAIT).unwrap();
    proc.expect_exit(0, WAIT).unwrap();
}
