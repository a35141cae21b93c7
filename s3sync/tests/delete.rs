//! Acceptance: deletions are planned in dry runs, refused past the limits, and never made
//! on the strength of a failed transfer.

mod common;

use common::{Rng, objects, past, s3sync_run, write_file};
use testkit::{S3Server, Scratch};

async fn keys(server: &S3Server, bucket: &str) -> Vec<String> {
    objects(server, bucket)
        .await
        .into_iter()
        .map(|o| o.0)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_dry_run_lists_deletions_and_deletes_nothing() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("dry").unwrap();
    let src = scratch.join("src");
    let mut rng = Rng::new(1);
    for name in ["a", "b", "c", "gone one"] {
        write_file(&src.join(name), name.as_bytes(), past(&mut rng));
    }
    let dst = format!("s3://{bucket}/p");
    s3sync_run(&server, &["sync", src.to_str().unwrap(), &dst]).expect(0);
    std::fs::remove_file(src.join("gone one")).unwrap();
    write_file(&src.join("new"), b"new", past(&mut rng));
    let out = s3sync_run(
        &server,
        &["sync", "--delete", "--dry-run", src.to_str().unwrap(), &dst],
    );
    out.expect(0);
    assert!(
        out.stdout
            .contains(&format!("would delete s3://{bucket}/p/gone one")),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("would upload"), "{}", out.stdout);
    assert_eq!(
        keys(&server, &bucket).await,
        ["p/a", "p/b", "p/c", "p/gone one"]
    );
    let json = s3sync_run(
        &server,
        &[
            "sync",
            "--delete",
            "--dry-run",
            "--format",
            "json",
            src.to_str().unwrap(),
            &dst,
        ],
    );
    let planned: Vec<_> = json
        .lines()
        .into_iter()
        .map(|l| (l["action"].clone(), l["status"].clone()))
        .collect();
    assert_eq!(planned.len(), 2, "{}", json.stdout);
    assert!(planned.iter().all(|p| p.1 == "planned"));
    // The real run does it.
    s3sync_run(&server, &["sync", "--delete", src.to_str().unwrap(), &dst]).expect(0);
    assert_eq!(keys(&server, &bucket).await, ["p/a", "p/b", "p/c", "p/new"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn max_delete_and_the_default_share_stop_a_sync_that_would_empty_the_destination() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("guard").unwrap();
    let src = scratch.join("src");
    let mut rng = Rng::new(2);
    for name in ["a", "b", "c", "d"] {
        write_file(&src.join(name), name.as_bytes(), past(&mut rng));
    }
    let dst = format!("s3://{bucket}/p");
    s3sync_run(&server, &["sync", src.to_str().unwrap(), &dst]).expect(0);
    // The source "disappears" (an unmounted disk looks like an empty folder).
    std::fs::remove_dir_all(&src).unwrap();
    std::fs::create_dir(&src).unwrap();
    write_file(&src.join("new"), b"new", past(&mut rng));
    let s = src.to_str().unwrap();
    let out = s3sync_run(&server, &["sync", "--delete", s, &dst]);
    out.expect(65);
    assert!(
        out.stderr.contains("refusing to delete 4 of 4"),
        "{}",
        out.stderr
    );
    let out = s3sync_run(&server, &["sync", "--delete", "--max-delete", "3", s, &dst]);
    out.expect(65);
    assert!(out.stderr.contains("--max-delete"), "{}", out.stderr);
    // Nothing changed, not even the new upload.
    assert_eq!(keys(&server, &bucket).await, ["p/a", "p/b", "p/c", "p/d"]);
    s3sync_run(&server, &["sync", "--delete", "--max-delete", "4", s, &dst]).expect(0);
    assert_eq!(keys(&server, &bucket).await, ["p/new"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn excluded_files_are_neither_copied_nor_deleted() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("filters").unwrap();
    let src = scratch.join("src");
    let mut rng = Rng::new(4);
    for name in ["keep.txt", "skip.log", "cache/x", "sub/important.log"] {
        write_file(&src.join(name), name.as_bytes(), past(&mut rng));
    }
    let patterns = scratch.join("patterns");
    std::fs::write(&patterns, "# folders\ncache/\n").unwrap();
    let dst = format!("s3://{bucket}/p");
    let args = |extra: &[&str]| {
        let mut v = vec![
            "sync",
            "--delete",
            "--exclude",
            "*.log",
            "--include",
            "important.log",
        ];
        v.extend_from_slice(&["--exclude-from", patterns.to_str().unwrap()]);
        v.extend_from_slice(extra);
        v.extend_from_slice(&[src.to_str().unwrap(), &dst]);
        v.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run_args = args(&[]);
    let refs: Vec<&str> = run_args.iter().map(String::as_str).collect();
    s3sync_run(&server, &refs).expect(0);
    assert_eq!(
        keys(&server, &bucket).await,
        ["p/keep.txt", "p/sub/important.log"]
    );
    // An excluded object in the destination survives --delete.
    s3sync_run(
        &server,
        &[
            "cp",
            src.join("skip.log").to_str().unwrap(),
            &format!("s3://{bucket}/p/other.log"),
        ],
    )
    .expect(0);
    s3sync_run(&server, &refs).expect(0);
    assert!(
        keys(&server, &bucket)
            .await
            .contains(&"p/other.log".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_listing_that_failed_deletes_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("listfail").unwrap();
    let src = scratch.join("src");
    let mut rng = Rng::new(6);
    for name in ["a", "locked/x", "extra"] {
        write_file(&src.join(name), name.as_bytes(), past(&mut rng));
    }
    let dst = format!("s3://{bucket}/p");
    s3sync_run(&server, &["sync", src.to_str().unwrap(), &dst]).expect(0);
    std::fs::remove_file(src.join("extra")).unwrap();
    write_file(&src.join("new"), b"new", past(&mut rng));
    // A folder nobody may read: its files are missing from the listing, not gone.
    std::fs::set_permissions(src.join("locked"), std::fs::Permissions::from_mode(0o000)).unwrap();
    let out = common::run(common::s3sync_as_nobody(&server).args([
        "sync",
        "--delete",
        "--force",
        src.to_str().unwrap(),
        &dst,
    ]));
    out.expect(1);
    assert!(out.stderr.contains("locked"), "{}", out.stderr);
    assert!(out.stderr.contains("not deleting"), "{}", out.stderr);
    // The new file went up; neither the unlisted folder's object nor the removed file's went.
    assert_eq!(
        keys(&server, &bucket).await,
        ["p/a", "p/extra", "p/locked/x", "p/new"]
    );
}
