//! Acceptance: trees and streams go up and come back byte-identical with their mtimes, and a
//! second sync transfers nothing.

mod common;

use std::path::PathBuf;

use common::{Rng, objects, past, run, s3sync_run, snapshot, write_file};
use testkit::{PgCluster, ProcBuilder, S3Server, Scratch};

const SEGMENTS: [&str; 9] = [
    "a b",
    "plus+sign",
    "pct%20",
    "hash#tag",
    "ünïcødé",
    "日本語",
    "deep",
    "x",
    "emoji 🦀",
];

#[tokio::test(flavor = "multi_thread")]
async fn a_tree_of_2000_odd_files_round_trips_with_mtimes_and_resyncs_nothing() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("roundtrip").unwrap();
    let src = scratch.join("src");
    let mut rng = Rng::new(7);
    for i in 0..2000 {
        let mut path = src.clone();
        for _ in 0..rng.below(6) {
            path.push(format!("d-{}", SEGMENTS[rng.below(9) as usize]));
        }
        path.push(format!("f{i} {}", SEGMENTS[rng.below(9) as usize]));
        let len = match i {
            0..=99 => 0,
            100 => 11 * 1024 * 1024, // more than two 5 MiB parts: multipart up, ranged down
            _ => rng.below(20_000) as usize,
        };
        write_file(&path, &rng.bytes(len), past(&mut rng));
    }
    let dst = format!("s3://{bucket}/tree");
    let up = s3sync_run(
        &server,
        &[
            "sync",
            src.to_str().unwrap(),
            &dst,
            "--format",
            "json",
            "--part-size",
            "5M",
        ],
    );
    up.expect(0);
    assert_eq!(up.lines().len(), 2000);
    assert!(up.stderr.contains("2000 transferred"), "{}", up.stderr);
    let stored = objects(&server, &bucket).await;
    assert_eq!(stored.len(), 2000);

    let again = s3sync_run(
        &server,
        &["sync", src.to_str().unwrap(), &dst, "--format", "json"],
    );
    again.expect(0);
    assert!(again.lines().is_empty(), "{}", again.stdout);
    assert!(again.stderr.contains("0 transferred"), "{}", again.stderr);
    assert!(again.stderr.contains("2000 unchanged"), "{}", again.stderr);
    // No PUT: every object keeps its ETag and upload time.
    assert_eq!(objects(&server, &bucket).await, stored);

    let back = scratch.join("back");
    let down = s3sync_run(
        &server,
        &[
            "sync",
            &dst,
            back.to_str().unwrap(),
            "--format",
            "json",
            "--part-size",
            "5M",
        ],
    );
    down.expect(0);
    assert_eq!(down.lines().len(), 2000);
    assert_eq!(snapshot(&back), snapshot(&src));

    let again = s3sync_run(
        &server,
        &["sync", &dst, back.to_str().unwrap(), "--format", "json"],
    );
    again.expect(0);
    assert!(again.lines().is_empty(), "{}", again.stdout);
    // No temporary files were left behind.
    assert_eq!(snapshot(&back).len(), 2000);
}

#[tokio::test(flavor = "multi_thread")]
async fn cp_copies_single_files_empty_files_and_objects_inside_the_store() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("cp").unwrap();
    let mut rng = Rng::new(3);
    let file = scratch.join("hash#tag + ü.txt");
    write_file(&file, b"hello", past(&mut rng));
    let empty = scratch.join("empty");
    write_file(&empty, b"", past(&mut rng));
    s3sync_run(
        &server,
        &["cp", file.to_str().unwrap(), &format!("s3://{bucket}/in/")],
    )
    .expect(0);
    s3sync_run(
        &server,
        &["cp", empty.to_str().unwrap(), &format!("s3://{bucket}/e")],
    )
    .expect(0);
    s3sync_run(
        &server,
        &[
            "cp",
            &format!("s3://{bucket}/in/hash#tag + ü.txt"),
            &format!("s3://{bucket}/copy/"),
        ],
    )
    .expect(0);
    let out = scratch.join("out");
    std::fs::create_dir(&out).unwrap();
    s3sync_run(
        &server,
        &[
            "cp",
            &format!("s3://{bucket}/copy/hash#tag + ü.txt"),
            out.to_str().unwrap(),
        ],
    )
    .expect(0);
    s3sync_run(
        &server,
        &[
            "cp",
            &format!("s3://{bucket}/e"),
            out.join("e").to_str().unwrap(),
        ],
    )
    .expect(0);
    let got = snapshot(&out);
    assert_eq!(got[0].0, PathBuf::from("e"));
    assert_eq!(got[0].1, b"");
    assert_eq!(got[1].0, PathBuf::from("hash#tag + ü.txt"));
    assert_eq!(got[1].1, b"hello");
    // The server-side copy kept the mtime metadata.
    assert_eq!(
        got[1].2,
        std::fs::metadata(&file).unwrap().modified().unwrap()
    );
    let cat = s3sync_run(
        &server,
        &["cat", &format!("s3://{bucket}/in/hash#tag + ü.txt")],
    );
    cat.expect(0);
    assert_eq!(cat.stdout, "hello");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pg_dump_stream_larger_than_a_part_goes_up_and_restores_from_cat() {
    let pg = PgCluster::start().unwrap();
    pg.psql(
        "postgres",
        "create table readings as select g as id, md5(g::text) || md5((g * 7)::text) as v \
         from generate_series(1, 150000) g",
    )
    .unwrap();
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let bin = env!("CARGO_BIN_EXE_s3sync");
    let up = format!(
        "{} -Fc -Z0 readings-db | {bin} --part-size 5M cp - s3://{bucket}/dump",
        pg.bin("pg_dump").display()
    )
    .replace("readings-db", "-d postgres");
    run(ProcBuilder::new("bash")
        .args(["-o", "pipefail", "-c", &up])
        .envs(server.env())
        .envs(pg.env()))
    .expect(0);
    let head = server
        .client()
        .await
        .head_object()
        .bucket(&bucket)
        .key("dump")
        .send()
        .await
        .unwrap();
    assert!(head.content_length().unwrap() > 5 << 20, "{head:?}");
    // A multipart object: its ETag ends in -PARTS.
    assert!(head.e_tag().unwrap().contains('-'), "{head:?}");
    let down = format!(
        "{bin} cat s3://{bucket}/dump | {} --list",
        pg.bin("pg_restore").display()
    );
    let listed = run(ProcBuilder::new("bash")
        .args(["-o", "pipefail", "-c", &down])
        .envs(server.env()));
    listed.expect(0);
    assert!(
        listed.stdout.contains("TABLE DATA public readings"),
        "{}",
        listed.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn checksum_mode_catches_a_change_that_kept_size_and_mtime() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("checksum").unwrap();
    let src = scratch.join("src");
    let mut rng = Rng::new(31);
    let mtime = past(&mut rng);
    write_file(&src.join("doc"), b"version one", mtime);
    let dst = format!("s3://{bucket}/c");
    let s = src.to_str().unwrap();
    s3sync_run(&server, &["sync", "--checksum", s, &dst]).expect(0);
    // Same size, same mtime, other bytes: only a content comparison sees it.
    write_file(&src.join("doc"), b"version two", mtime);
    let plain = s3sync_run(&server, &["sync", "--format", "json", s, &dst]);
    plain.expect(0);
    assert!(plain.lines().is_empty(), "{}", plain.stdout);
    let checked = s3sync_run(
        &server,
        &["sync", "--checksum", "--format", "json", s, &dst],
    );
    checked.expect(0);
    assert_eq!(checked.lines().len(), 1, "{}", checked.stdout);
    let cat = s3sync_run(&server, &["cat", &format!("{dst}/doc")]);
    assert_eq!(cat.stdout, "version two");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prefix_syncs_to_another_inside_the_store_without_downloading() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let other = server.bucket().await.unwrap();
    let scratch = Scratch::new("s3s3").unwrap();
    let mut rng = Rng::new(33);
    for name in ["a", "b c/d", "ü/+%#"] {
        write_file(
            &scratch.join("src").join(name),
            &rng.bytes(3000),
            past(&mut rng),
        );
    }
    s3sync_run(
        &server,
        &[
            "cp",
            "-r",
            scratch.join("src").to_str().unwrap(),
            &format!("s3://{bucket}/p"),
        ],
    )
    .expect(0);
    let from = format!("s3://{bucket}/p");
    let to = format!("s3://{other}/q");
    let first = s3sync_run(&server, &["sync", "--format", "json", &from, &to]);
    first.expect(0);
    assert!(first.lines().iter().all(|l| l["action"] == "copy"));
    assert_eq!(first.lines().len(), 3);
    let again = s3sync_run(&server, &["sync", "--format", "json", &from, &to]);
    again.expect(0);
    assert!(again.lines().is_empty(), "{}", again.stdout);
    let back = scratch.join("back");
    s3sync_run(&server, &["sync", &to, back.to_str().unwrap()]).expect(0);
    assert_eq!(snapshot(&back), snapshot(&scratch.join("src")));
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_come_from_a_labkit_config_and_its_errors_point_at_the_line() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("config").unwrap();
    let secret = scratch.join("secret");
    std::fs::write(&secret, testkit::s3::SECRET_KEY).unwrap();
    let config = scratch.join("s3sync.toml");
    std::fs::write(
        &config,
        format!(
            "[s3]\nendpoint = \"{}\"\nregion = \"us-east-1\"\naccess_key_id = \"{}\"\nsecret_access_key_file = \"secret\"\n",
            server.endpoint(),
            testkit::s3::ACCESS_KEY
        ),
    )
    .unwrap();
    // No AWS_* variables at all: everything comes from the file.
    let out = run(ProcBuilder::new(env!("CARGO_BIN_EXE_s3sync"))
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .args([
            "--config",
            config.to_str().unwrap(),
            "ls",
            &format!("s3://{bucket}/"),
        ]));
    out.expect(0);
    std::fs::write(&config, "[s3]\nendpont = \"http://x\"\n").unwrap();
    let bad = s3sync_run(&server, &["--config", config.to_str().unwrap(), "ls"]);
    bad.expect(78);
    assert!(bad.stderr.contains("s3sync.toml:2:1"), "{}", bad.stderr);
}
