//! `s3sync watch`: a full sync first, then changes as they happen, with deletions.

mod common;

use std::time::Duration;

use common::{Rng, objects, past, s3sync, write_file};
use testkit::{S3Server, Scratch};

#[tokio::test(flavor = "multi_thread")]
async fn watch_syncs_first_then_uploads_changes_and_deletes_removed_files() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("watch").unwrap();
    let src = scratch.join("src");
    let mut rng = Rng::new(21);
    write_file(&src.join("first"), b"first", past(&mut rng));
    write_file(&src.join("old"), b"old", past(&mut rng));
    let proc = s3sync(&server)
        .notify()
        .args([
            "watch",
            "--delete",
            "--debounce",
            "100ms",
            "--format",
            "json",
        ])
        .args([src.to_str().unwrap(), &format!("s3://{bucket}/w")])
        .spawn()
        .unwrap();
    proc.wait_ready(Duration::from_secs(60)).unwrap();
    let keys = || async {
        objects(&server, &bucket)
            .await
            .into_iter()
            .map(|o| o.0)
            .collect::<Vec<_>>()
    };
    assert_eq!(keys().await, ["w/first", "w/old"]);
    write_file(&src.join("new dir/added"), b"added", past(&mut rng));
    proc.wait_stdout("w/new dir/added", Duration::from_secs(60))
        .unwrap();
    std::fs::remove_file(src.join("old")).unwrap();
    proc.wait_stdout("\"delete\"", Duration::from_secs(60))
        .unwrap();
    assert_eq!(keys().await, ["w/first", "w/new dir/added"]);
    proc.stop(Duration::from_secs(30)).unwrap();
    assert!(
        proc.notifications()
            .iter()
            .any(|n| n.contains("STOPPING=1"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_overflow_falls_back_to_a_full_sync() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("overflow").unwrap();
    let src = scratch.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let proc = s3sync(&server)
        .notify()
        .args([
            "watch",
            "--max-pending",
            "1",
            "--debounce",
            "200ms",
            "--format",
            "json",
        ])
        .args([src.to_str().unwrap(), &format!("s3://{bucket}/w")])
        .spawn()
        .unwrap();
    proc.wait_ready(Duration::from_secs(60)).unwrap();
    let mut rng = Rng::new(22);
    for i in 0..50 {
        write_file(&src.join(format!("f{i}")), b"x", past(&mut rng));
    }
    proc.wait_stderr("running a full sync", Duration::from_secs(60))
        .unwrap();
    proc.wait_stdout("w/f49", Duration::from_secs(60)).unwrap();
    proc.stop(Duration::from_secs(30)).unwrap();
    assert_eq!(objects(&server, &bucket).await.len(), 50);
}
