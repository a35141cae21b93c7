//! `s3sync watch`: a full sync first, then changes as they happen, with deletions that never
//! empty the prefix on their own.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Rng, objects, past, s3sync, write_file};
use testkit::{Proc, S3Server, Scratch};

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

/// The object keys under `bucket`, sorted.
async fn keys(server: &S3Server, bucket: &str) -> Vec<String> {
    objects(server, bucket)
        .await
        .into_iter()
        .map(|o| o.0)
        .collect()
}

/// Starts `watch --delete` with `flags` from `src` to `s3://bucket/w` and waits for its first sync.
fn start_watch(server: &S3Server, bucket: &str, src: &Path, flags: &[&str]) -> Proc {
    let proc = s3sync(server)
        .notify()
        .args(["watch", "--delete", "--format", "json"])
        .args(flags)
        .args([src.to_str().unwrap(), &format!("s3://{bucket}/w")])
        .spawn()
        .unwrap();
    proc.wait_ready(Duration::from_secs(60)).unwrap();
    proc
}

/// Waits for the watch to end on its own and returns its exit code.
fn exit_code(proc: &Proc) -> Option<i32> {
    let status = proc.wait_exit(Duration::from_secs(60));
    let status = status.unwrap_or_else(|err| panic!("the watch kept running: {err}"));
    status.code()
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_stops_instead_of_deleting_the_prefix_when_the_source_root_is_emptied() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("emptied").unwrap();
    let src = scratch.join("src");
    let mut rng = Rng::new(23);
    for name in ["site/a", "site/b", "site/c/d"] {
        write_file(&src.join(name), name.as_bytes(), past(&mut rng));
    }
    // --force lifts the share limit: only the emptiness check stands between the folder and
    // the prefix.
    let proc = start_watch(&server, &bucket, &src, &["--force", "--debounce", "100ms"]);
    assert_eq!(
        keys(&server, &bucket).await,
        ["w/site/a", "w/site/b", "w/site/c/d"]
    );
    // Everything leaves in one step, as when the disk behind the folder goes away.
    std::fs::rename(src.join("site"), scratch.join("elsewhere")).unwrap();
    assert_eq!(exit_code(&proc), Some(66), "{}", proc.stderr());
    assert!(proc.stderr().contains("lists nothing"), "{}", proc.stderr());
    assert_eq!(
        keys(&server, &bucket).await,
        ["w/site/a", "w/site/b", "w/site/c/d"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_stops_instead_of_syncing_a_folder_that_replaced_the_source_root() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("replaced").unwrap();
    let src = scratch.join("src");
    let mut rng = Rng::new(24);
    for name in ["a", "b"] {
        write_file(&src.join(name), name.as_bytes(), past(&mut rng));
    }
    let proc = start_watch(&server, &bucket, &src, &["--force", "--debounce", "100ms"]);
    // Another folder takes the path; the watch still follows the old one.
    let other = scratch.join("other");
    write_file(&other.join("stranger"), b"stranger", past(&mut rng));
    std::fs::rename(&src, scratch.join("old")).unwrap();
    std::fs::rename(&other, &src).unwrap();
    assert_eq!(exit_code(&proc), Some(66), "{}", proc.stderr());
    let stderr = proc.stderr();
    assert!(stderr.contains("the watched folder"), "{stderr}");
    assert_eq!(keys(&server, &bucket).await, ["w/a", "w/b"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_from_an_empty_mount_point_stops_instead_of_deleting_the_prefix() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("mountpoint").unwrap();
    let disk = scratch.join("disk");
    let mut rng = Rng::new(25);
    for name in ["a", "b", "c"] {
        write_file(&disk.join(name), name.as_bytes(), past(&mut rng));
    }
    let dst = format!("s3://{bucket}/w");
    common::s3sync_run(&server, &["sync", disk.to_str().unwrap(), &dst]).expect(0);
    // The service starts before the disk is mounted: its mount point is an empty folder.
    let mount_point = scratch.join("mnt");
    std::fs::create_dir(&mount_point).unwrap();
    let proc = s3sync(&server)
        .args([
            "watch",
            "--delete",
            "--force",
            mount_point.to_str().unwrap(),
            &dst,
        ])
        .spawn()
        .unwrap();
    assert_eq!(exit_code(&proc), Some(66), "{}", proc.stderr());
    assert!(proc.stderr().contains("lists nothing"), "{}", proc.stderr());
    assert_eq!(keys(&server, &bucket).await, ["w/a", "w/b", "w/c"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_changes_obeys_max_delete() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("batchlimit").unwrap();
    let src = scratch.join("src");
    let mut rng = Rng::new(26);
    for name in ["keep", "old/a", "old/b", "old/c"] {
        write_file(&src.join(name), name.as_bytes(), past(&mut rng));
    }
    let proc = start_watch(
        &server,
        &bucket,
        &src,
        &["--max-delete", "2", "--debounce", "100ms"],
    );
    std::fs::rename(src.join("old"), scratch.join("away")).unwrap();
    assert_eq!(exit_code(&proc), Some(65), "{}", proc.stderr());
    assert!(
        proc.stderr().contains("refusing to delete 3"),
        "{}",
        proc.stderr()
    );
    assert_eq!(keys(&server, &bucket).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_overflow_rescan_obeys_max_delete() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("rescanlimit").unwrap();
    let src = scratch.join("src");
    let mut rng = Rng::new(27);
    for i in 0..40 {
        write_file(&src.join(format!("f{i}")), b"x", past(&mut rng));
    }
    let proc = start_watch(
        &server,
        &bucket,
        &src,
        &[
            "--max-delete",
            "5",
            "--max-pending",
            "1",
            "--debounce",
            "200ms",
        ],
    );
    for i in 0..20 {
        std::fs::remove_file(src.join(format!("f{i}"))).unwrap();
    }
    assert_eq!(exit_code(&proc), Some(65), "{}", proc.stderr());
    let stderr = proc.stderr();
    assert!(stderr.contains("running a full sync"), "{stderr}");
    assert!(stderr.contains("refusing to delete 20 of 40"), "{stderr}");
    assert_eq!(keys(&server, &bucket).await.len(), 40);
}
