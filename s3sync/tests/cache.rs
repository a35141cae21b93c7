//! The state cache: a re-sync decides "unchanged" from the listing and a local stat when the
//! cache proves it, and falls back to HeadObject for everything it cannot prove. Requests are
//! counted by a proxy in front of the store.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use common::{CountingProxy, Rng, Run, objects, past, run, s3sync, write_file};
use testkit::{S3Server, Scratch};

/// A store behind a counting proxy, a tree of files and a cache folder.
struct Setup {
    server: S3Server,
    proxy: CountingProxy,
    bucket: String,
    src: PathBuf,
    cache: PathBuf,
    scratch: Scratch,
}

impl Setup {
    async fn new(server: S3Server, files: usize) -> Setup {
        let bucket = server.bucket().await.unwrap();
        let proxy = CountingProxy::start(server.port()).await;
        let scratch = Scratch::new("cache").unwrap();
        let src = scratch.join("src");
        let mut rng = Rng::new(5);
        for i in 0..files {
            let path = src.join(format!("d{}", i % 7)).join(format!("f {i}.bin"));
            let len = 1 + rng.below(3000) as usize;
            write_file(&path, &rng.bytes(len), past(&mut rng));
        }
        let cache = scratch.join("xdg-cache");
        Setup {
            server,
            proxy,
            bucket,
            src,
            cache,
            scratch,
        }
    }

    fn url(&self) -> String {
        format!("s3://{}/tree", self.bucket)
    }

    fn run(&self, args: &[&str]) -> Run {
        self.proxy.reset();
        run(s3sync(&self.server)
            .env("AWS_ENDPOINT_URL", self.proxy.endpoint())
            .env("XDG_CACHE_HOME", &self.cache)
            .args(args))
    }

    fn up(&self, extra: &[&str]) -> Run {
        let url = self.url();
        let mut args = vec!["sync", self.src.to_str().unwrap(), &url];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    fn cache_files(&self) -> Vec<PathBuf> {
        let folder = self.cache.join("labkit/s3sync");
        let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        files.retain(|p| p.extension().is_some_and(|e| e == "json"));
        files
    }

    fn heads(&self) -> usize {
        self.proxy.object_requests("HEAD")
    }

    fn puts(&self) -> usize {
        self.proxy.object_requests("PUT")
    }
}

fn expect_unchanged(run: &Run, count: usize) {
    run.expect(0);
    assert!(run.stderr.contains("0 transferred"), "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!("{count} unchanged")),
        "{}",
        run.stderr
    );
}

async fn warm_resyncs_send_no_head_and_no_put(server: S3Server) {
    let s = Setup::new(server, 300).await;
    let url = s.url();
    s.run(&["cp", "-r", s.src.to_str().unwrap(), &url])
        .expect(0);
    assert_eq!(s.puts(), 300);
    assert_eq!(s.cache_files().len(), 1, "cp -r writes the cache");
    let stored = objects(&s.server, &s.bucket).await;

    let again = s.up(&[]);
    expect_unchanged(&again, 300);
    assert_eq!((s.heads(), s.puts()), (0, 0), "{:#?}", s.proxy.lines());
    // And again, now that the records hold the listed LastModified.
    let again = s.up(&[]);
    expect_unchanged(&again, 300);
    assert_eq!((s.heads(), s.puts()), (0, 0), "{:#?}", s.proxy.lines());
    assert_eq!(objects(&s.server, &s.bucket).await, stored);

    // Without the cache, every same-sized file costs its HeadObject, as before.
    let cold = s.up(&["--no-cache"]);
    expect_unchanged(&cold, 300);
    assert_eq!((s.heads(), s.puts()), (300, 0));

    // The other way: a download records what it wrote, so its re-sync needs no request per
    // object either.
    let back = s.scratch.join("back");
    let back = back.to_str().unwrap();
    s.run(&["sync", &url, back]).expect(0);
    let again = s.run(&["sync", &url, back]);
    expect_unchanged(&again, 300);
    assert_eq!(
        (s.heads(), s.proxy.object_requests("GET")),
        (0, 0),
        "{:#?}",
        s.proxy.lines()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_warm_resync_sends_no_head_and_no_put_on_a_store_listing_no_etags() {
    warm_resyncs_send_no_head_and_no_put(S3Server::start().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_warm_resync_sends_no_head_and_no_put_on_a_store_listing_etags() {
    warm_resyncs_send_no_head_and_no_put(S3Server::start_moto().unwrap()).await;
}

/// Replaces `tree/d0/f 0.bin` behind s3sync's back: other bytes of the same length, no
/// metadata (another tool).
async fn rewrite_first_object(s: &Setup) {
    let path = s.src.join("d0/f 0.bin");
    let mut other = std::fs::read(&path).unwrap();
    for byte in &mut other {
        *byte = !*byte;
    }
    s.server
        .client()
        .await
        .put_object()
        .bucket(&s.bucket)
        .key("tree/d0/f 0.bin")
        .body(ByteStream::from(other))
        .send()
        .await
        .unwrap();
}

async fn object_bytes(s: &Setup, key: &str) -> Vec<u8> {
    let out = s
        .server
        .client()
        .await
        .get_object()
        .bucket(&s.bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    out.body.collect().await.unwrap().into_bytes().to_vec()
}

fn expect_one_upload(run: &Run, rest: usize) {
    run.expect(0);
    assert!(run.stderr.contains("1 transferred"), "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!("{rest} unchanged")),
        "{}",
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_object_rewritten_right_after_the_upload_is_found_by_its_listed_etag() {
    let s = Setup::new(S3Server::start_moto().unwrap(), 20).await;
    s.up(&[]).expect(0);
    // Within the same second as s3sync's own PUT: only the ETag tells the versions apart.
    rewrite_first_object(&s).await;
    let again = s.up(&[]);
    expect_one_upload(&again, 19);
    assert_eq!(
        object_bytes(&s, "tree/d0/f 0.bin").await,
        std::fs::read(s.src.join("d0/f 0.bin")).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_object_rewritten_after_a_resync_is_found_by_its_last_modified() {
    // s3s-fs lists no ETags: the record of the first re-sync pins the exact LastModified.
    let s = Setup::new(S3Server::start().unwrap(), 20).await;
    s.up(&[]).expect(0);
    expect_unchanged(&s.up(&[]), 20);
    rewrite_first_object(&s).await;
    let again = s.up(&[]);
    expect_one_upload(&again, 19);
    assert_eq!(s.heads(), 1, "only the rewritten object is asked about");
    assert_eq!(
        object_bytes(&s, "tree/d0/f 0.bin").await,
        std::fs::read(s.src.join("d0/f 0.bin")).unwrap()
    );
}

fn set_mtime(path: &Path, mtime: std::time::SystemTime) {
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_times(std::fs::FileTimes::new().set_modified(mtime))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn local_changes_are_uploaded_with_a_warm_cache_and_an_edit_keeping_size_and_mtime_needs_checksum()
 {
    let s = Setup::new(S3Server::start().unwrap(), 20).await;
    s.up(&[]).expect(0);
    // A new mtime, older than the upload (restored from a backup, say): only the record can
    // tell it from the object's without a HeadObject, and it does not match.
    let touched = s.src.join("d1/f 1.bin");
    let old = std::fs::metadata(&touched).unwrap().modified().unwrap();
    set_mtime(&touched, old - Duration::from_secs(3600));
    let again = s.up(&[]);
    expect_one_upload(&again, 19);
    assert_eq!(s.heads(), 1, "{:#?}", s.proxy.lines());

    // An edit that keeps size and mtime (`touch -r`) looks unchanged to size and mtime, with
    // or without the cache, as to rclone; --checksum compares content.
    let edited = s.src.join("d2/f 2.bin");
    let meta = std::fs::metadata(&edited).unwrap();
    let mut bytes = std::fs::read(&edited).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&edited, &bytes).unwrap();
    set_mtime(&edited, meta.modified().unwrap());
    expect_unchanged(&s.up(&[]), 20);
    expect_unchanged(&s.up(&["--no-cache"]), 20);
    expect_one_upload(&s.up(&["--checksum"]), 19);
    assert_eq!(object_bytes(&s, "tree/d2/f 2.bin").await, bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_cache_file_is_ignored_with_a_warning_and_rewritten() {
    let s = Setup::new(S3Server::start().unwrap(), 20).await;
    s.up(&[]).expect(0);
    let files = s.cache_files();
    assert_eq!(files.len(), 1);
    std::fs::write(&files[0], b"{\"format\":\"labkit-s3sync-state\",\"vers").unwrap();
    let again = s.up(&[]);
    expect_unchanged(&again, 20);
    assert!(
        again.stderr.contains("ignoring the state cache"),
        "{}",
        again.stderr
    );
    assert_eq!(s.heads(), 20, "a cache it cannot read proves nothing");
    let again = s.up(&[]);
    expect_unchanged(&again, 20);
    assert!(!again.stderr.contains("ignoring"), "{}", again.stderr);
    assert_eq!(s.heads(), 0);
}
