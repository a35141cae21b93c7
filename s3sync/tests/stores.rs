//! Acceptance: named stores from the config, two S3 servers in one run: trees and large objects
//! go from one store to the other and back byte-identical, a second sync moves nothing, and
//! `check` finds what differs.

mod common;

use std::path::Path;

use common::{CountingProxy, Rng, Run, past, run, snapshot, write_file};
use testkit::{ProcBuilder, S3Server, Scratch};

/// A config naming `servers` as stores `a`, `b`, ... with the test credentials, the secret
/// of the second one from a file.
fn config(scratch: &Scratch, servers: &[&S3Server]) -> std::path::PathBuf {
    let endpoints: Vec<String> = servers.iter().map(|s| s.endpoint()).collect();
    config_at(scratch, &endpoints)
}

/// [`config`] with the stores at these endpoints (proxies in front of the servers).
fn config_at(scratch: &Scratch, endpoints: &[String]) -> std::path::PathBuf {
    let mut text = String::new();
    for (i, endpoint) in endpoints.iter().enumerate() {
        let name = (b'a' + i as u8) as char;
        text.push_str(&format!(
            "[store.{name}]\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\n",
            endpoint,
            testkit::s3::REGION,
            testkit::s3::ACCESS_KEY
        ));
        if i == 1 {
            let secret = scratch.join("b.secret");
            std::fs::write(&secret, format!("{}\n", testkit::s3::SECRET_KEY)).unwrap();
            text.push_str("secret_access_key_file = \"b.secret\"\n\n");
        } else {
            text.push_str(&format!(
                "secret_access_key = \"{}\"\n\n",
                testkit::s3::SECRET_KEY
            ));
        }
    }
    let path = scratch.join("s3sync.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// s3sync with only the config: no `AWS_*` store in the environment.
fn s3sync_with(config: &Path, args: &[&str]) -> Run {
    run(ProcBuilder::new(env!("CARGO_BIN_EXE_s3sync"))
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        // The state cache lives beside the config, one per test.
        .env("XDG_CACHE_HOME", config.with_file_name("cache"))
        .arg("-c")
        .arg(config)
        .args(args))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tree_and_a_large_file_go_store_to_store_and_back_identical_and_resync_nothing() {
    let (one, two) = (S3Server::start().unwrap(), S3Server::start().unwrap());
    let (b1, b2, b3) = (
        one.bucket().await.unwrap(),
        two.bucket().await.unwrap(),
        one.bucket().await.unwrap(),
    );
    let scratch = Scratch::new("stores").unwrap();
    // Through request logs, to count what the re-syncs ask.
    let (log1, log2) = (
        CountingProxy::start(one.port()).await,
        CountingProxy::start(two.port()).await,
    );
    let config = config_at(&scratch, &[log1.endpoint(), log2.endpoint()]);
    let src = scratch.join("src");
    let mut rng = Rng::new(24);
    for i in 0..2000 {
        let path = src.join(format!("d{}", i % 37)).join(format!("f {i}"));
        let len = rng.below(4_000) as usize;
        let body = rng.bytes(len);
        write_file(&path, &body, past(&mut rng));
    }
    // The 600 MB file, scaled to 64 MiB so a debug build moves it in seconds: with
    // 5 MiB parts it still takes 13 parts, streamed through ranged GETs into a multipart upload.
    // `S3SYNC_TEST_BIG_MIB=600` runs the full size on demand.
    let big_mib: usize = std::env::var("S3SYNC_TEST_BIG_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let large = rng.bytes(big_mib << 20);
    write_file(&src.join("large.bin"), &large, past(&mut rng));

    let a1 = format!("s3://a/{b1}/tree");
    let b2 = format!("s3://b/{b2}/tree");
    let a3 = format!("s3://a/{b3}/tree");
    let part = ["--part-size", "5M"];
    let up = s3sync_with(
        &config,
        &[&["sync", src.to_str().unwrap(), &a1], &part[..]].concat(),
    );
    up.expect(0);
    assert!(up.stderr.contains("2001 transferred"), "{}", up.stderr);

    let across = s3sync_with(
        &config,
        &[&["sync", &a1, &b2, "--format", "json"], &part[..]].concat(),
    );
    across.expect(0);
    assert_eq!(across.lines().len(), 2001, "{}", across.stderr);
    assert!(
        across
            .lines()
            .iter()
            .all(|l| l["action"] == "copy" && l["status"] == "ok")
    );
    let back = s3sync_with(&config, &[&["sync", &b2, &a3], &part[..]].concat());
    back.expect(0);
    assert!(back.stderr.contains("2001 transferred"), "{}", back.stderr);

    let local = scratch.join("back");
    s3sync_with(&config, &["sync", &a3, local.to_str().unwrap()]).expect(0);
    let (want, got) = (snapshot(&src), snapshot(&local));
    assert_eq!(want.len(), 2001);
    assert!(want == got, "the tree changed on its way a -> b -> a");

    // No-change re-syncs: the state cache proves the small objects from the two listings
    // (their copies were dated by the PutObject answers; one whose LastModified a loaded
    // store set more than a second before that date costs its two HeadObjects once), and the
    // large one, copied by a multipart upload, costs its two HeadObjects once; from then on,
    // the listings alone prove every object.
    for first in [true, false] {
        log1.reset();
        log2.reset();
        let again = s3sync_with(&config, &["sync", &a1, &b2, "--format", "json"]);
        again.expect(0);
        assert!(again.lines().is_empty(), "{}", again.stdout);
        assert!(again.stderr.contains("0 transferred"), "{}", again.stderr);
        assert!(again.stderr.contains("2001 unchanged"), "{}", again.stderr);
        let sent = log1.object_requests("HEAD") + log2.object_requests("HEAD");
        if first {
            assert!((2..2 * 2001).contains(&sent), "{sent} HeadObjects");
        } else {
            assert_eq!(sent, 0, "HeadObjects sent by a second no-change re-sync");
        }
        assert_eq!(log2.object_requests("PUT"), 0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cp_ls_cat_and_rm_work_on_named_stores_and_a_bad_config_names_its_line() {
    let (one, two) = (S3Server::start().unwrap(), S3Server::start().unwrap());
    let (b1, b2) = (one.bucket().await.unwrap(), two.bucket().await.unwrap());
    let scratch = Scratch::new("stores-cp").unwrap();
    let config = config(&scratch, &[&one, &two]);
    let file = scratch.join("notes.txt");
    std::fs::write(&file, b"hello from a").unwrap();
    let a = format!("s3://a/{b1}/notes.txt");
    let b = format!("s3://b/{b2}/copy.txt");
    s3sync_with(&config, &["cp", file.to_str().unwrap(), &a]).expect(0);
    s3sync_with(&config, &["cp", &a, &b]).expect(0);
    let cat = s3sync_with(&config, &["cat", &b]);
    cat.expect(0);
    assert_eq!(cat.stdout, "hello from a");
    let ls = s3sync_with(&config, &["ls", &format!("s3://b/{b2}/")]);
    ls.expect(0);
    assert!(ls.stdout.contains("copy.txt"), "{}", ls.stdout);
    let buckets = s3sync_with(&config, &["ls", "s3://b"]);
    buckets.expect(0);
    assert!(buckets.stdout.contains(&b2), "{}", buckets.stdout);
    assert!(!buckets.stdout.contains(&b1), "{}", buckets.stdout);
    s3sync_with(&config, &["rm", &b]).expect(0);
    s3sync_with(&config, &["cat", &b]).expect(66);

    let bad = scratch.join("bad.toml");
    std::fs::write(
        &bad,
        "[store.a]\nendpoint = \"http://127.0.0.1:1\"\nsecret_access_key = \"do-not-print-me\"\nacess_key_id = \"K\"\n",
    )
    .unwrap();
    let out = s3sync_with(&bad, &["ls", "s3://a/x-bucket/"]);
    out.expect(78);
    assert!(
        out.stderr.contains(&format!("{}:4:", bad.display())),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("acess_key_id"), "{}", out.stderr);
    assert!(!out.stderr.contains("do-not-print-me"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn check_lists_a_changed_and_a_missing_object_and_exits_1() {
    let (one, two) = (S3Server::start().unwrap(), S3Server::start().unwrap());
    let (b1, b2) = (one.bucket().await.unwrap(), two.bucket().await.unwrap());
    let scratch = Scratch::new("stores-check").unwrap();
    let config = config(&scratch, &[&one, &two]);
    let src = scratch.join("src");
    for (name, body) in [
        ("same.txt", "same"),
        ("changed.txt", "before"),
        ("gone.txt", "x"),
    ] {
        write_file(&src.join(name), body.as_bytes(), past(&mut Rng::new(3)));
    }
    let (a, b) = (format!("s3://a/{b1}/t"), format!("s3://b/{b2}/t"));
    s3sync_with(&config, &["sync", src.to_str().unwrap(), &a]).expect(0);
    s3sync_with(&config, &["sync", &a, &b]).expect(0);
    s3sync_with(&config, &["check", &a, &b]).expect(0);
    s3sync_with(&config, &["check", "--checksum", &a, &b]).expect(0);

    // Same size, other bytes; and one object gone.
    let client = two.client().await;
    client
        .put_object()
        .bucket(&b2)
        .key("t/changed.txt")
        .body(b"BEFORE".to_vec().into())
        .send()
        .await
        .unwrap();
    client
        .delete_object()
        .bucket(&b2)
        .key("t/gone.txt")
        .send()
        .await
        .unwrap();
    let sizes = s3sync_with(&config, &["check", &a, &b]);
    sizes.expect(1);
    assert_eq!(sizes.stdout, "missing-in-destination gone.txt\n");
    let content = s3sync_with(&config, &["check", "--checksum", &a, &b]);
    content.expect(1);
    assert_eq!(
        content.stdout,
        "content-differs changed.txt\nmissing-in-destination gone.txt\n"
    );
    assert!(
        content.stderr.contains("2 differences"),
        "{}",
        content.stderr
    );
    // A local folder against a store, the other way round.
    let local = s3sync_with(&config, &["check", "--checksum", &b, src.to_str().unwrap()]);
    local.expect(1);
    assert_eq!(
        local.stdout,
        "content-differs changed.txt\nmissing-in-source gone.txt\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stores_storage_class_goes_with_every_object_it_writes() {
    let (one, two) = (S3Server::start().unwrap(), S3Server::start_moto().unwrap());
    let (b1, b2) = (one.bucket().await.unwrap(), two.bucket().await.unwrap());
    let scratch = Scratch::new("stores-class").unwrap();
    let config = config(&scratch, &[&one, &two]);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("storage_class = \"STANDARD_IA\"\n");
    std::fs::write(&config, text).unwrap();
    let (small, large) = (scratch.join("small.txt"), scratch.join("large.bin"));
    std::fs::write(&small, b"small").unwrap();
    std::fs::write(&large, Rng::new(9).bytes(11 << 20)).unwrap();
    let part = ["--part-size", "5M"];
    for file in [&small, &large] {
        let name = file.file_name().unwrap().to_str().unwrap();
        let (a, b) = (format!("s3://a/{b1}/{name}"), format!("s3://b/{b2}/{name}"));
        let up = format!("s3://b/{b2}/up-{name}");
        s3sync_with(
            &config,
            &[&["cp", file.to_str().unwrap(), &a], &part[..]].concat(),
        )
        .expect(0);
        // Streamed from store a, and uploaded from the file (multipart above 5 MiB).
        s3sync_with(&config, &[&["cp", &a, &b], &part[..]].concat()).expect(0);
        s3sync_with(
            &config,
            &[&["cp", file.to_str().unwrap(), &up], &part[..]].concat(),
        )
        .expect(0);
    }
    let client = two.client().await;
    for key in ["small.txt", "large.bin", "up-small.txt", "up-large.bin"] {
        let head = client
            .head_object()
            .bucket(&b2)
            .key(key)
            .send()
            .await
            .unwrap();
        assert_eq!(
            head.storage_class().map(|c| c.as_str()),
            Some("STANDARD_IA"),
            "{key}"
        );
    }
}
