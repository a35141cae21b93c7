//! Bad input and faults: malformed URLs, missing buckets, refused credentials, unreadable
//! files, symbolic links, and a store that goes away mid-transfer.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{
    FaultProxy, Rng, objects, past, run, s3sync, s3sync_as_nobody, s3sync_run, snapshot, write_file,
};
use testkit::s3::Backend;
use testkit::{S3Server, Scratch};

#[tokio::test(flavor = "multi_thread")]
async fn malformed_urls_and_arguments_are_usage_errors_naming_the_culprit() {
    let server = S3Server::start().unwrap();
    let scratch = Scratch::new("usage").unwrap();
    let dir = scratch.path().to_str().unwrap();
    for (args, needle) in [
        (vec!["ls", "s3://"], "no bucket"),
        (vec!["ls", "s3://Bad_Bucket/x"], "lower-case"),
        (vec!["cp", dir, "gs://lab/x"], "only s3://"),
        (vec!["cp", dir, "s3:/lab/x"], "s3://bucket/key"),
        (vec!["cat", "s3://lab/"], "not an object"),
        (vec!["cp", dir, "s3://lab/x"], "use cp -r"),
        (vec!["sync", dir, dir], "both locations are local"),
        (vec!["cp", "-", "-"], "pairs with an s3://"),
        (
            vec!["sync", "--part-size", "1M", dir, "s3://lab/"],
            "--part-size",
        ),
    ] {
        let out = s3sync_run(&server, &args);
        out.expect(64);
        assert!(out.stderr.contains(needle), "{args:?}: {}", out.stderr);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_bucket_exits_66_on_any_store() {
    for backend in [Backend::S3sFs, Backend::Moto] {
        let server = S3Server::start_backend(backend).unwrap();
        let scratch = Scratch::new("nobucket").unwrap();
        let file = scratch.join("f");
        std::fs::write(&file, b"x").unwrap();
        let f = file.to_str().unwrap();
        let dir = scratch.path().to_str().unwrap();
        for args in [
            vec!["cp", f, "s3://no-such-bucket/f"],
            vec!["sync", dir, "s3://no-such-bucket/p"],
            vec!["sync", "s3://no-such-bucket/p", dir],
            vec!["ls", "s3://no-such-bucket/"],
        ] {
            let out = s3sync_run(&server, &args);
            out.expect(66);
            assert!(
                out.stderr.contains("no-such-bucket"),
                "{backend:?} {args:?}: {}",
                out.stderr
            );
        }
        let bucket = server.bucket().await.unwrap();
        let out = s3sync_run(&server, &["cat", &format!("s3://{bucket}/missing")]);
        out.expect(66);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_credentials_exit_77_without_showing_the_secret() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("creds").unwrap();
    let file = scratch.join("f");
    std::fs::write(&file, b"x").unwrap();
    for args in [
        vec!["ls".to_owned(), format!("s3://{bucket}/")],
        vec![
            "cp".to_owned(),
            file.display().to_string(),
            format!("s3://{bucket}/f"),
        ],
        vec![
            "sync".to_owned(),
            format!("s3://{bucket}/"),
            scratch.join("d").display().to_string(),
        ],
    ] {
        let out = run(s3sync(&server)
            .env("AWS_SECRET_ACCESS_KEY", "the-wrong-secret")
            .args(&args));
        out.expect(77);
        assert!(!out.stderr.contains("the-wrong-secret"), "{}", out.stderr);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_file_is_reported_and_the_rest_goes_up_with_exit_1() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("unreadable").unwrap();
    let src = scratch.join("src");
    let mut rng = Rng::new(5);
    for name in ["a", "b", "secret", "c/d"] {
        write_file(&src.join(name), name.as_bytes(), past(&mut rng));
    }
    std::fs::set_permissions(src.join("secret"), std::fs::Permissions::from_mode(0o000)).unwrap();
    // Root reads anything; run as nobody so the file is really unreadable.
    let out = run(s3sync_as_nobody(&server).args([
        "sync",
        "--delete",
        src.to_str().unwrap(),
        &format!("s3://{bucket}/p"),
        "--format",
        "json",
    ]));
    out.expect(1);
    assert!(out.stderr.contains("secret"), "{}", out.stderr);
    assert!(out.stderr.contains("1 failed"), "{}", out.stderr);
    let keys: Vec<String> = objects(&server, &bucket)
        .await
        .into_iter()
        .map(|o| o.0)
        .collect();
    assert_eq!(keys, ["p/a", "p/b", "p/c/d"]);
    let failed: Vec<_> = out
        .lines()
        .into_iter()
        .filter(|l| l["status"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1, "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn symbolic_links_are_followed_only_with_dash_l() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("links").unwrap();
    let src = scratch.join("src");
    let outside = scratch.join("outside");
    let mut rng = Rng::new(9);
    write_file(&src.join("real"), b"real", past(&mut rng));
    write_file(&outside.join("secret"), b"linked", past(&mut rng));
    std::os::unix::fs::symlink(outside.join("secret"), src.join("link")).unwrap();
    std::os::unix::fs::symlink(&outside, src.join("dirlink")).unwrap();
    let plain = format!("s3://{bucket}/plain");
    let out = s3sync_run(&server, &["cp", "-r", src.to_str().unwrap(), &plain]);
    out.expect(0);
    let keys: Vec<String> = objects(&server, &bucket)
        .await
        .into_iter()
        .map(|o| o.0)
        .collect();
    assert_eq!(keys, ["plain/real"]);
    let followed = format!("s3://{bucket}/followed");
    s3sync_run(
        &server,
        &["cp", "-r", "-L", src.to_str().unwrap(), &followed],
    )
    .expect(0);
    let back = scratch.join("back");
    s3sync_run(&server, &["cp", "-r", &followed, back.to_str().unwrap()]).expect(0);
    let got: Vec<(String, Vec<u8>)> = snapshot(&back)
        .into_iter()
        .map(|f| (f.0.display().to_string(), f.1))
        .collect();
    assert_eq!(
        got,
        [
            ("dirlink/secret".to_owned(), b"linked".to_vec()),
            ("link".to_owned(), b"linked".to_vec()),
            ("real".to_owned(), b"real".to_vec()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_gone_mid_upload_retries_fails_clearly_and_leaves_no_upload_open() {
    let server = S3Server::start_moto().unwrap();
    let bucket = server.bucket().await.unwrap();
    // The store vanishes once 7 MiB went through: during the second 5 MiB part.
    let proxy = FaultProxy::start(server.port(), 7 << 20).await;
    let body = Rng::new(11).bytes(16 << 20);
    let out = run(s3sync(&server)
        .env("AWS_ENDPOINT_URL", proxy.endpoint())
        .args([
            "--part-size",
            "5M",
            "--part-concurrency",
            "1",
            "cp",
            "-",
            &format!("s3://{bucket}/stream"),
        ])
        .stdin(body));
    out.expect(69);
    assert!(
        out.stderr.contains(&format!("s3://{bucket}/stream")),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("still open"), "{}", out.stderr);
    // The SDK tried again before giving up.
    assert!(proxy.refused.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    assert!(
        server
            .open_multipart_uploads(&bucket)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(objects(&server, &bucket).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_gone_mid_download_leaves_no_file_under_the_final_name() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let scratch = Scratch::new("cut").unwrap();
    let mut rng = Rng::new(13);
    write_file(
        &scratch.join("src/big"),
        &rng.bytes(24 << 20),
        past(&mut rng),
    );
    write_file(&scratch.join("src/small"), b"small", past(&mut rng));
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
    let proxy = FaultProxy::start(server.port(), 9 << 20).await;
    let dest = scratch.join("dest");
    let out = run(s3sync(&server)
        .env("AWS_ENDPOINT_URL", proxy.endpoint())
        .args([
            "--part-size",
            "5M",
            "--transfers",
            "1",
            "sync",
            &format!("s3://{bucket}/p"),
            dest.to_str().unwrap(),
        ]));
    out.expect(69);
    assert!(
        out.stderr.contains(&format!("s3://{bucket}/p/")),
        "{}",
        out.stderr
    );
    // Whatever finished is complete; nothing half-written, no temporary file.
    for file in snapshot(&dest) {
        assert_eq!(file.0.display().to_string(), "small", "{:?}", file.0);
    }
    assert!(!dest.join("big").exists());
}
