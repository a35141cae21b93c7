//! The streaming upload against real S3 servers: one PutObject for small streams, parallel
//! parts for large ones, the same bytes back, and no multipart upload left open when the reader
//! or the store fails.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use aws_lc_rs::digest;
use labcore::s3::upload::{
    AbortOutcome, UploadError, UploadOptions, abort_multipart, complete_multipart, upload,
};
use labcore::{Exit, ExitStatus};
use testkit::S3Server;
use testkit::s3::Backend;
use tokio::io::{AsyncRead, ReadBuf};

const MIB: usize = 1024 * 1024;

/// Deterministic, poorly compressible bytes.
fn data(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

/// Yields `good` bytes in small reads, then fails.
struct FailingReader {
    data: Vec<u8>,
    at: usize,
}

impl AsyncRead for FailingReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at >= self.data.len() {
            return Poll::Ready(Err(io::Error::other("pg_dump died")));
        }
        let n = buf
            .remaining()
            .min(64 * 1024)
            .min(self.data.len() - self.at);
        let at = self.at;
        buf.put_slice(&self.data[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

async fn get(server: &S3Server, bucket: &str, key: &str) -> Vec<u8> {
    let object = server
        .client()
        .await
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    object.body.collect().await.unwrap().into_bytes().to_vec()
}

#[tokio::test]
async fn a_small_stream_is_one_put_with_its_metadata() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let body = data(100_000);
    let options = UploadOptions {
        metadata: vec![("mtime".into(), "1700000000".into())],
        ..UploadOptions::default()
    };
    let stored = upload(
        &server.client().await,
        &bucket,
        "small",
        &body[..],
        &options,
    )
    .await
    .unwrap();
    assert_eq!(stored.parts, 0);
    assert_eq!(stored.size, body.len() as u64);
    assert_eq!(stored.sha256, sha256(&body));
    assert_eq!(get(&server, &bucket, "small").await, body);
    let head = server
        .client()
        .await
        .head_object()
        .bucket(&bucket)
        .key("small")
        .send()
        .await
        .unwrap();
    assert_eq!(head.metadata().unwrap()["mtime"], "1700000000");
}

#[tokio::test]
async fn an_empty_stream_makes_an_empty_object() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let stored = upload(
        &server.client().await,
        &bucket,
        "empty",
        &b""[..],
        &UploadOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!((stored.size, stored.parts), (0, 0));
    assert!(get(&server, &bucket, "empty").await.is_empty());
}

#[tokio::test]
async fn a_large_stream_goes_up_in_parallel_parts_byte_identical() {
    for backend in [Backend::S3sFs, Backend::Moto] {
        let server = S3Server::start_backend(backend).unwrap();
        let bucket = server.bucket().await.unwrap();
        // 3.5 parts of 5 MiB: the last part is short.
        let body = data(17 * MIB + MIB / 2);
        let options = UploadOptions {
            part_size: 5 * MIB,
            concurrency: 3,
            ..UploadOptions::default()
        };
        let stored = upload(
            &server.client().await,
            &bucket,
            "dump/large",
            &body[..],
            &options,
        )
        .await
        .unwrap();
        assert_eq!(stored.parts, 4, "{backend:?}");
        assert_eq!(stored.size, body.len() as u64);
        assert_eq!(stored.sha256, sha256(&body));
        assert_eq!(
            get(&server, &bucket, "dump/large").await,
            body,
            "{backend:?}"
        );
        if backend == Backend::Moto {
            assert!(
                server
                    .open_multipart_uploads(&bucket)
                    .await
                    .unwrap()
                    .is_empty()
            );
        }
    }
}

#[tokio::test]
async fn a_stream_ending_on_a_part_boundary_completes() {
    let server = S3Server::start_moto().unwrap();
    let bucket = server.bucket().await.unwrap();
    let body = data(10 * MIB);
    let options = UploadOptions {
        part_size: 5 * MIB,
        ..UploadOptions::default()
    };
    let stored = upload(&server.client().await, &bucket, "even", &body[..], &options)
        .await
        .unwrap();
    assert_eq!(stored.parts, 2);
    assert_eq!(get(&server, &bucket, "even").await, body);
}

#[tokio::test]
async fn a_reader_failure_aborts_the_upload_and_leaves_no_object() {
    let server = S3Server::start_moto().unwrap();
    let bucket = server.bucket().await.unwrap();
    let reader = FailingReader {
        data: data(12 * MIB),
        at: 0,
    };
    let options = UploadOptions {
        part_size: 5 * MIB,
        ..UploadOptions::default()
    };
    let err = upload(&server.client().await, &bucket, "broken", reader, &options)
        .await
        .unwrap_err();
    assert!(matches!(err, UploadError::Read { .. }), "{err}");
    assert!(labcore::exit::chain(&err).contains("pg_dump died"), "{err}");
    assert_eq!(err.exit(), Exit::IoErr);
    assert!(
        server
            .open_multipart_uploads(&bucket)
            .await
            .unwrap()
            .is_empty()
    );
    let listed = server
        .client()
        .await
        .list_objects_v2()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.key_count(), Some(0));
}

#[tokio::test]
async fn a_missing_bucket_is_no_input() {
    // s3s-fs creates a bucket's folder on PutObject, so this runs against moto.
    let server = S3Server::start_moto().unwrap();
    let err = upload(
        &server.client().await,
        "no-such-bucket",
        "k",
        &b"x"[..],
        &UploadOptions::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.exit(), Exit::NoInput, "{err}");
    assert!(
        err.to_string()
            .contains("PutObject s3://no-such-bucket/k: NoSuchBucket"),
        "{err}"
    );
}

#[tokio::test]
async fn a_store_that_dies_mid_upload_is_a_clear_unavailable_error() {
    let mut server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let client = server.client().await;
    // The reader kills the store after the first part was read.
    let body = data(12 * MIB);
    let (mut writer, reader) = tokio::io::duplex(MIB);
    let options = UploadOptions {
        part_size: 5 * MIB,
        concurrency: 1,
        ..UploadOptions::default()
    };
    let uploading = upload(&client, &bucket, "cut", reader, &options);
    let feeding = async {
        use tokio::io::AsyncWriteExt;
        writer.write_all(&body[..6 * MIB]).await.unwrap();
        server.kill().unwrap();
        // The upload may already have failed and dropped its reader.
        let _ = writer.write_all(&body[6 * MIB..]).await;
        drop(writer);
    };
    let (result, ()) = tokio::join!(uploading, feeding);
    let err = result.unwrap_err();
    assert_eq!(err.exit(), Exit::Unavailable, "{err}");
    assert!(err.to_string().contains("s3://"), "{err}");
}

#[tokio::test]
async fn a_wrong_size_hint_still_stores_every_byte() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let client = server.client().await;
    // Hints below and above the real size, across the single-put and multipart paths.
    for (len, hint) in [(10_000, 100), (100, 10_000), (6 * MIB, 1_000)] {
        let body = data(len);
        let options = UploadOptions {
            part_size: 5 * MIB,
            size_hint: Some(hint),
            ..UploadOptions::default()
        };
        let key = format!("hinted-{len}-{hint}");
        let stored = upload(&client, &bucket, &key, &body[..], &options)
            .await
            .unwrap();
        assert_eq!(stored.size, len as u64);
        assert_eq!(stored.sha256, sha256(&body));
        assert_eq!(get(&server, &bucket, &key).await, body, "{key}");
    }
}

#[tokio::test]
async fn a_multipart_upload_driven_by_the_caller_completes_or_aborts_through_the_helpers() {
    use aws_sdk_s3::primitives::ByteStream;
    use aws_sdk_s3::types::CompletedPart;
    let server = S3Server::start_moto().unwrap();
    let bucket = server.bucket().await.unwrap();
    let client = server.client().await;
    let body = data(6 * MIB);
    let start = |key: &'static str| {
        let (client, bucket) = (client.clone(), bucket.clone());
        async move {
            let created = client
                .create_multipart_upload()
                .bucket(&bucket)
                .key(key)
                .send()
                .await
                .unwrap();
            created.upload_id().unwrap().to_owned()
        }
    };
    // Parts handed over out of order: the helper sorts them.
    let id = start("whole").await;
    let mut parts = Vec::new();
    for (number, range) in [(2, 5 * MIB..6 * MIB), (1, 0..5 * MIB)] {
        let out = client
            .upload_part()
            .bucket(&bucket)
            .key("whole")
            .upload_id(&id)
            .part_number(number)
            .body(ByteStream::from(body[range].to_vec()))
            .send()
            .await
            .unwrap();
        parts.push(
            CompletedPart::builder()
                .part_number(number)
                .e_tag(out.e_tag().unwrap())
                .build(),
        );
    }
    let etag = complete_multipart(&client, &bucket, "whole", &id, parts)
        .await
        .unwrap();
    assert!(etag.unwrap().contains("-2"));
    assert_eq!(get(&server, &bucket, "whole").await, body);

    let id = start("dropped").await;
    assert_eq!(
        server.open_multipart_uploads(&bucket).await.unwrap().len(),
        1
    );
    let outcome = abort_multipart(&client, &bucket, "dropped", &id).await;
    assert_eq!(outcome, AbortOutcome::Clean);
    assert!(
        server
            .open_multipart_uploads(&bucket)
            .await
            .unwrap()
            .is_empty()
    );
    // Aborting what the store no longer knows is not a failure.
    let again = abort_multipart(&client, &bucket, "dropped", &id).await;
    assert_eq!(again, AbortOutcome::Clean);
}
