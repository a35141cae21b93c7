//! Acceptance: `--bwlimit` holds a transfer to its rate within 5% in each direction, and the
//! progress display shows on a terminal and nowhere else.

mod common;

use std::time::{Duration, Instant};

use common::{Rng, run, s3sync, s3sync_run};
use testkit::{ProcBuilder, S3Server, Scratch};

/// Runs s3sync and returns its wall time, which includes starting up and the last requests:
/// both are small against the seconds the limit imposes.
fn timed(builder: ProcBuilder) -> Duration {
    let started = Instant::now();
    run(builder).expect(0);
    started.elapsed()
}

fn within_5_percent(got: Duration, want: Duration) {
    let ratio = got.as_secs_f64() / want.as_secs_f64();
    assert!(
        (0.95..=1.05).contains(&ratio),
        "took {got:?} where the limit allows {want:?} ({ratio:.3})"
    );
}

/// The issue asks for 5% over a 60 s transfer; the suite checks the same within 5% over 6 s
/// up and 3 s down (a virtual-time token bucket has no burst to average out, so a shorter
/// transfer is as strict). `bwlimit_8m_holds_within_5_percent_over_a_60_second_transfer`
/// below does the full minute (ignored: run it with --run-ignored).
#[tokio::test(flavor = "multi_thread")]
async fn bwlimit_holds_uploads_and_downloads_to_their_own_rates_within_5_percent() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("bwlimit").unwrap();
    let file = scratch.join("twelve.bin");
    std::fs::write(&file, Rng::new(5).bytes(12 << 20)).unwrap();
    let url = format!("s3://{bucket}/twelve.bin");
    let up = timed(
        s3sync(&server)
            .args(["--bwlimit", "2M:off", "--part-size", "5M", "cp"])
            .arg(&file)
            .arg(&url),
    );
    within_5_percent(up, Duration::from_secs(6));
    let back = scratch.join("back.bin");
    let down = timed(
        s3sync(&server)
            .args(["--bwlimit", "off:4M", "--part-size", "5M", "cp", &url])
            .arg(&back),
    );
    within_5_percent(down, Duration::from_secs(3));
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&file).unwrap());
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs for a minute: cargo nextest run --run-ignored only -E 'test(60_second)'"]
async fn bwlimit_8m_holds_within_5_percent_over_a_60_second_transfer() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("bwlimit-60").unwrap();
    let file = scratch.join("480m.bin");
    std::fs::write(&file, Rng::new(8).bytes(480 << 20)).unwrap();
    let up = timed(
        s3sync(&server)
            .args(["--bwlimit", "8M", "cp"])
            .arg(&file)
            .arg(format!("s3://{bucket}/480m.bin")),
    );
    within_5_percent(up, Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_sees_the_live_progress_and_a_pipe_sees_only_the_summary() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("progress").unwrap();
    let file = scratch.join("four.bin");
    std::fs::write(&file, Rng::new(6).bytes(4 << 20)).unwrap();
    // Paced to about 2 s so the display refreshes several times.
    let command = format!(
        "{} --bwlimit 2M cp {} s3://{bucket}/tty.bin",
        env!("CARGO_BIN_EXE_s3sync"),
        file.display()
    );
    let tty = run(ProcBuilder::new("script")
        .envs(server.env())
        .env("TERM", "xterm")
        .args(["-q", "-e", "-c", &command, "/dev/null"]));
    tty.expect(0);
    assert!(tty.stdout.contains("/1 files"), "{:?}", tty.stdout);
    assert!(tty.stdout.contains("ETA"), "{:?}", tty.stdout);
    assert!(tty.stdout.contains("MiB/s"), "{:?}", tty.stdout);
    assert!(tty.stdout.contains("1 transferred"), "{:?}", tty.stdout);

    let url = format!("s3://{bucket}/pipe.bin");
    let file_arg = file.to_str().unwrap();
    let pipe = s3sync_run(&server, &["--bwlimit", "2M", "cp", file_arg, &url]);
    pipe.expect(0);
    assert!(!pipe.stderr.contains("ETA"), "{}", pipe.stderr);
    assert!(!pipe.stderr.contains("files"), "{}", pipe.stderr);
    assert!(pipe.stderr.contains("1 transferred"), "{}", pipe.stderr);

    let json = s3sync_run(
        &server,
        &[
            "--bwlimit",
            "2M",
            "--progress",
            "json",
            "cp",
            file_arg,
            &url,
        ],
    );
    json.expect(0);
    let lines: Vec<serde_json::Value> = json
        .stderr
        .lines()
        .filter(|l| l.starts_with("{\"progress\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 2, "{}", json.stderr);
    let last = &lines[lines.len() - 1]["progress"];
    assert_eq!(last["done"], true);
    assert_eq!(last["files_done"], 1);
    assert_eq!(last["bytes_done"], 4 << 20);
    assert!(json.stderr.contains("1 transferred"), "{}", json.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn tpslimit_spaces_the_requests_of_a_run() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("tpslimit").unwrap();
    for i in 0..20 {
        std::fs::write(scratch.join(format!("src/f{i}")), b"x").unwrap_or_else(|_| {
            std::fs::create_dir_all(scratch.join("src")).unwrap();
            std::fs::write(scratch.join(format!("src/f{i}")), b"x").unwrap();
        });
    }
    let src = scratch.join("src");
    // 20 PUTs and 2 listings at 10 a second: at least 2.1 s; unlimited it takes a fraction.
    let took = timed(
        s3sync(&server)
            .args(["--tpslimit", "10", "sync"])
            .arg(&src)
            .arg(format!("s3://{bucket}/t")),
    );
    assert!(took >= Duration::from_millis(2100), "{took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
}
