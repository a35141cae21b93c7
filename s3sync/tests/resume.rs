//! Acceptance: a large upload killed with SIGKILL half-way resumes in the next run from the
//! parts the store holds (the store's request log proves only the missing parts went up), an
//! upload whose file changed is aborted and started over, and `cleanup` aborts stale uploads.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{CountingProxy, Rng, run, s3sync};
use testkit::{Proc, S3Server, Scratch};

/// The big file's size in MiB: 64 in the suite (13 parts of 5 MiB, seconds in a debug build);
/// `S3SYNC_TEST_BIG_MIB=600` runs the full 600 MB case (121 parts) on demand.
fn big_mib() -> usize {
    std::env::var("S3SYNC_TEST_BIG_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

/// Parts of 5 MiB in the big file.
fn part_count() -> usize {
    big_mib().div_ceil(5)
}

/// Starts an upload of `file` paced at a quarter of its size per second (about 4 s; 16 MiB/s
/// for 64 MiB in 13 parts of 5 MiB) and
/// kills it with SIGKILL once the store lists at least half of its parts; returns the upload ID
/// and the parts stored after the kill.
async fn upload_killed_half_way(
    server: &S3Server,
    endpoint: &str,
    bucket: &str,
    file: &Path,
    state: &Path,
) -> (String, usize) {
    let proc: Proc = s3sync(server)
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("XDG_STATE_HOME", state)
        .args(["--part-size", "5M", "--part-concurrency", "2"])
        .args(["--bwlimit", &format!("{}M", (big_mib() / 4).max(16)), "cp"])
        .arg(file)
        .arg(format!("s3://{bucket}/big.bin"))
        .spawn()
        .unwrap();
    let client = server.client().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let upload_id = loop {
        assert!(
            Instant::now() < deadline,
            "no parts seen: {}",
            proc.stderr()
        );
        assert!(
            proc.try_status().is_none(),
            "finished too early: {}",
            proc.stderr()
        );
        let uploads = server.open_multipart_uploads(bucket).await.unwrap();
        if let Some((_, id)) = uploads.first() {
            let parts = client
                .list_parts()
                .bucket(bucket)
                .key("big.bin")
                .upload_id(id)
                .send()
                .await
                .unwrap();
            if parts.parts().len() >= part_count() / 2 {
                proc.kill().unwrap();
                break id.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let parts = client
        .list_parts()
        .bucket(bucket)
        .key("big.bin")
        .upload_id(&upload_id)
        .send()
        .await
        .unwrap()
        .parts()
        .len();
    (upload_id, parts)
}

async fn object(server: &S3Server, bucket: &str, key: &str) -> Vec<u8> {
    let out = server
        .client()
        .await
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    out.body.collect().await.unwrap().into_bytes().to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_killed_half_way_resumes_with_only_the_missing_parts() {
    let server = S3Server::start_moto().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("resume").unwrap();
    let (file, state) = (scratch.join("big.bin"), scratch.join("state"));
    // The 600 MB, scaled to 64 MiB by default to keep the suite to seconds.
    let body = Rng::new(600).bytes(big_mib() << 20);
    std::fs::write(&file, &body).unwrap();

    // Both runs go through the request log (the state file is kept per endpoint).
    let proxy = CountingProxy::start(server.port()).await;
    let (upload_id, stored) =
        upload_killed_half_way(&server, &proxy.endpoint(), &bucket, &file, &state).await;
    assert!(
        (part_count() / 2..part_count()).contains(&stored),
        "{stored} parts stored"
    );

    proxy.reset();
    let out = run(s3sync(&server)
        .env("AWS_ENDPOINT_URL", proxy.endpoint())
        .env("XDG_STATE_HOME", &state)
        .args(["--log-level", "info", "--part-size", "5M", "cp"])
        .arg(&file)
        .arg(format!("s3://{bucket}/big.bin")));
    out.expect(0);
    assert!(
        out.stderr
            .contains(&format!("{} parts already stored were kept", stored)),
        "{}",
        out.stderr
    );
    let lines = proxy.lines();
    let parts_sent = lines.iter().filter(|l| l.contains("partNumber=")).count();
    assert_eq!(parts_sent, part_count() - stored, "{lines:#?}");
    // The same upload was completed: no new one was begun.
    assert!(!lines.iter().any(|l| l.contains("?uploads")), "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("POST") && l.contains(&upload_id)),
        "{lines:#?}"
    );
    assert!(object(&server, &bucket, "big.bin").await == body);
    assert!(
        server
            .open_multipart_uploads(&bucket)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        std::fs::read_dir(state.join("labkit/s3sync/uploads"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_upload_whose_file_changed_is_aborted_and_started_over() {
    let server = S3Server::start_moto().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("resume-changed").unwrap();
    let (file, state) = (scratch.join("big.bin"), scratch.join("state"));
    std::fs::write(&file, Rng::new(1).bytes(64 << 20)).unwrap();
    let (upload_id, _) =
        upload_killed_half_way(&server, &server.endpoint(), &bucket, &file, &state).await;

    // Same size, other bytes, another mtime.
    let changed = Rng::new(2).bytes(64 << 20);
    std::fs::write(&file, &changed).unwrap();
    let out = run(s3sync(&server)
        .env("XDG_STATE_HOME", &state)
        .args(["--part-size", "5M", "cp"])
        .arg(&file)
        .arg(format!("s3://{bucket}/big.bin")));
    out.expect(0);
    assert!(!out.stderr.contains("already stored"), "{}", out.stderr);
    assert!(object(&server, &bucket, "big.bin").await == changed);
    let open = server.open_multipart_uploads(&bucket).await.unwrap();
    assert!(open.iter().all(|(_, id)| *id != upload_id), "{open:?}");
    assert!(open.is_empty(), "{open:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cleanup_lists_and_aborts_left_over_uploads() {
    let server = S3Server::start_moto().unwrap();
    let bucket = server.bucket().await.unwrap();
    let client = server.client().await;
    let id = client
        .create_multipart_upload()
        .bucket(&bucket)
        .key("left/over.bin")
        .send()
        .await
        .unwrap()
        .upload_id()
        .unwrap()
        .to_owned();
    // moto dates every upload in 2010, so only a zero age can be tried against it.
    let dry = run(s3sync(&server).args([
        "cleanup",
        "--older-than",
        "0s",
        "--dry-run",
        &format!("s3://{bucket}/left/"),
    ]));
    dry.expect(0);
    assert!(dry.stdout.contains("would abort"), "{}", dry.stdout);
    assert_eq!(
        server.open_multipart_uploads(&bucket).await.unwrap().len(),
        1
    );

    let out =
        run(s3sync(&server).args(["cleanup", "--older-than", "0s", &format!("s3://{bucket}")]));
    out.expect(0);
    assert!(
        out.stdout
            .contains(&format!("aborted s3://{bucket}/left/over.bin (upload {id}")),
        "{}",
        out.stdout
    );
    assert!(
        server
            .open_multipart_uploads(&bucket)
            .await
            .unwrap()
            .is_empty()
    );
}
