//! Streaming upload of one object from a byte stream of any length, in bounded memory.
//!
//! The stream is cut into parts read one after another while earlier parts upload in parallel
//! (`concurrency` in flight, each a reused buffer), so memory stays near
//! `(concurrency + 1) × part size` however large the object. A stream that fits in the first
//! part goes up as one `PutObject`; anything larger as a multipart upload. S3 allows at most
//! 10,000 parts, so the part size starts at [`UploadOptions::part_size`] (or more, when a size
//! hint says the object is large) and doubles every 1,000 parts: 10,000 parts of a stream of
//! unknown length then cover more than S3's 5 TiB object limit.
//!
//! Every failure, a reader error included, aborts the multipart upload before returning, so no
//! half-uploaded parts are left on the store; a dropped (cancelled) upload aborts it from a
//! cleanup task. The SHA-256 and length of exactly the bytes stored are returned, for callers
//! that record what they wrote (backupd's manifests).

use std::fmt;
use std::time::Duration;

use aws_lc_rs::digest;
use aws_sdk_s3::Client;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinSet;

use crate::exit::{Exit, ExitStatus};

/// The smallest part S3 accepts (except the last).
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
/// The largest part S3 accepts.
pub const MAX_PART_SIZE: usize = 5 * 1024 * 1024 * 1024;
/// The most parts one object may have.
pub const MAX_PARTS: u32 = 10_000;
const PARTS_PER_DOUBLING: u32 = 1_000;

/// How to upload.
#[derive(Clone, Debug)]
pub struct UploadOptions {
    /// Size of the first part in bytes (at least 5 MiB); later parts may be larger.
    pub part_size: usize,
    /// Parts uploading at once.
    pub concurrency: usize,
    /// The expected size, if known: raises the part size so the object fits 10,000 parts, and
    /// sizes the first buffer to fit a small object. A wrong hint is harmless.
    pub size_hint: Option<u64>,
    /// `Content-Type` of the object.
    pub content_type: Option<String>,
    /// User metadata (`x-amz-meta-NAME`), such as a file's mtime.
    pub metadata: Vec<(String, String)>,
}

impl Default for UploadOptions {
    fn default() -> UploadOptions {
        UploadOptions {
            part_size: 8 * 1024 * 1024,
            concurrency: 4,
            size_hint: None,
            content_type: None,
            metadata: Vec::new(),
        }
    }
}

/// What was stored.
#[derive(Clone, PartialEq, Eq)]
pub struct Uploaded {
    /// Bytes stored.
    pub size: u64,
    /// The object's ETag as the store reported it.
    pub etag: Option<String>,
    /// SHA-256 of the bytes stored.
    pub sha256: [u8; 32],
    /// Parts used (0 for a single `PutObject`).
    pub parts: u32,
}

impl Uploaded {
    /// The SHA-256 in lower-case hex.
    pub fn sha256_hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for Uploaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Uploaded")
            .field("size", &self.size)
            .field("etag", &self.etag)
            .field("sha256", &self.sha256_hex())
            .field("parts", &self.parts)
            .finish()
    }
}

/// An upload failed; nothing is left behind on the store unless the abort itself failed (then
/// the message says so and names the upload ID).
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// Reading the data to upload failed.
    #[error("reading the data for s3://{bucket}/{key}")]
    Read {
        /// Target bucket.
        bucket: String,
        /// Target key.
        key: String,
        /// What the reader said.
        source: std::io::Error,
    },
    /// The store refused or failed a request.
    #[error("{operation} s3://{bucket}/{key}: {detail}{}", abort_note(aborted))]
    S3 {
        /// Target bucket.
        bucket: String,
        /// Target key.
        key: String,
        /// The S3 operation, such as `UploadPart 3`.
        operation: String,
        /// The store's error code and message, or the transport error.
        detail: String,
        /// The exit status it deserves.
        exit: Exit,
        /// Whether a multipart upload was left open because aborting it failed too.
        aborted: AbortOutcome,
    },
    /// The stream is larger than 10,000 parts can hold.
    #[error("s3://{bucket}/{key}: the data is larger than {MAX_PARTS} parts can hold")]
    TooLarge {
        /// Target bucket.
        bucket: String,
        /// Target key.
        key: String,
    },
}

/// What happened to the multipart upload after a failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AbortOutcome {
    /// There was none, or it was aborted.
    Clean,
    /// Aborting failed: the upload with this ID is still open on the store.
    Failed(String),
}

fn abort_note(outcome: &AbortOutcome) -> String {
    match outcome {
        AbortOutcome::Clean => String::new(),
        AbortOutcome::Failed(id) => format!(
            " (aborting multipart upload {id} failed too: remove it later, or let a bucket \
             lifecycle rule for incomplete multipart uploads do it)"
        ),
    }
}

impl ExitStatus for UploadError {
    fn exit(&self) -> Exit {
        match self {
            UploadError::Read { source, .. } => Exit::from_io(source),
            UploadError::S3 { exit, .. } => *exit,
            UploadError::TooLarge { .. } => Exit::DataErr,
        }
    }
}

/// The store's error code and message, or the whole transport error chain.
pub fn describe<E, R>(err: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug,
{
    match err {
        SdkError::ServiceError(service) => {
            let meta = service.err();
            match (meta.code(), meta.message()) {
                (Some(code), Some(message)) => format!("{code}: {message}"),
                (Some(code), None) => code.to_owned(),
                _ => crate::exit::chain(service.err()),
            }
        }
        other => crate::exit::chain(other),
    }
}

/// The size of part `number` (1-based) for a first part of `base` bytes.
pub fn part_size(number: u32, base: usize) -> usize {
    let doublings = number.saturating_sub(1) / PARTS_PER_DOUBLING;
    base.checked_shl(doublings)
        .unwrap_or(MAX_PART_SIZE)
        .min(MAX_PART_SIZE)
}

/// The first part's size: the option, at least 5 MiB, raised so a hinted size fits.
fn base_part_size(options: &UploadOptions) -> usize {
    let mut base = options.part_size.clamp(MIN_PART_SIZE, MAX_PART_SIZE);
    if let Some(hint) = options.size_hint {
        let needed = hint.div_ceil(u64::from(MAX_PARTS));
        // Round up to a whole MiB.
        let needed = needed.div_ceil(1 << 20) << 20;
        base = base
            .max(usize::try_from(needed).unwrap_or(MAX_PART_SIZE))
            .min(MAX_PART_SIZE);
    }
    base
}

/// The first buffer's capacity: a whole part, or just the hinted size (and one byte to see the
/// end) when that is smaller, so uploading many small files allocates per file only what it
/// holds. A wrong hint costs a reallocation, never bytes.
fn first_capacity(options: &UploadOptions, base: usize) -> usize {
    options.size_hint.map_or(base, |hint| {
        usize::try_from(hint).map_or(base, |hint| hint.saturating_add(1).min(base))
    })
}

/// Uploads everything `reader` yields to `s3://bucket/key`.
pub async fn upload<R>(
    client: &Client,
    bucket: &str,
    key: &str,
    mut reader: R,
    options: &UploadOptions,
) -> Result<Uploaded, UploadError>
where
    R: AsyncRead + Unpin,
{
    let target = Target::new(client, bucket, key);
    let base = base_part_size(options);
    let mut hasher = digest::Context::new(&digest::SHA256);
    let mut first = BytesMut::with_capacity(first_capacity(options, base));
    let more = fill(&mut reader, &mut first, base)
        .await
        .map_err(|e| target.read_error(e))?;
    hasher.update(&first);
    if !more {
        let size = first.len() as u64;
        let etag = target.put(first.freeze(), options).await?;
        return Ok(Uploaded {
            size,
            etag,
            sha256: finish(hasher),
            parts: 0,
        });
    }

    let upload_id = target.create(options).await?;
    let mut guard = AbortGuard {
        target: target.clone(),
        upload_id: Some(upload_id.clone()),
    };
    let result = upload_parts(
        &target,
        &upload_id,
        &mut reader,
        first,
        base,
        options,
        &mut hasher,
    )
    .await;
    match result {
        Ok((size, parts, etag)) => {
            guard.upload_id = None;
            Ok(Uploaded {
                size,
                etag,
                sha256: finish(hasher),
                parts,
            })
        }
        Err(mut err) => {
            guard.upload_id = None;
            let outcome = target.abort(&upload_id).await;
            if let UploadError::S3 { aborted, .. } = &mut err {
                *aborted = outcome;
            } else if let AbortOutcome::Failed(id) = outcome {
                tracing::warn!(bucket, key, upload_id = %id, "aborting the multipart upload failed; it is still open");
            }
            Err(err)
        }
    }
}

/// Reads parts, uploads them `concurrency` at a time, and completes the upload. Returns the
/// size, part count and ETag.
async fn upload_parts<R: AsyncRead + Unpin>(
    target: &Target,
    upload_id: &str,
    reader: &mut R,
    first: BytesMut,
    base: usize,
    options: &UploadOptions,
    hasher: &mut digest::Context,
) -> Result<(u64, u32, Option<String>), UploadError> {
    let concurrency = options.concurrency.max(1);
    let mut in_flight: JoinSet<Result<(CompletedPart, Bytes), UploadError>> = JoinSet::new();
    let mut completed = Vec::new();
    let mut spare: Vec<BytesMut> = Vec::new();
    let mut size = first.len() as u64;
    let mut number = 1u32;
    let mut current = first;
    loop {
        let part = current.freeze();
        let task_target = target.clone();
        let task_upload_id = upload_id.to_owned();
        in_flight
            .spawn(async move { task_target.upload_part(&task_upload_id, number, part).await });
        while in_flight.len() >= concurrency {
            collect(&mut in_flight, &mut completed, &mut spare).await?;
        }
        let next_size = part_size(number + 1, base);
        let mut next = spare.pop().unwrap_or_default();
        next.clear();
        next.reserve(next_size);
        let more = fill(reader, &mut next, next_size)
            .await
            .map_err(|e| target.read_error(e))?;
        if next.is_empty() {
            break;
        }
        number += 1;
        if number > MAX_PARTS {
            return Err(UploadError::TooLarge {
                bucket: target.bucket.clone(),
                key: target.key.clone(),
            });
        }
        hasher.update(&next);
        size += next.len() as u64;
        current = next;
        if !more {
            let part = current.freeze();
            let task_target = target.clone();
            let task_upload_id = upload_id.to_owned();
            in_flight
                .spawn(async move { task_target.upload_part(&task_upload_id, number, part).await });
            break;
        }
    }
    while !in_flight.is_empty() {
        collect(&mut in_flight, &mut completed, &mut spare).await?;
    }
    completed.sort_by_key(|p: &CompletedPart| p.part_number());
    let etag = target.complete(upload_id, completed).await?;
    Ok((size, number, etag))
}

/// Waits for one part; keeps its buffer for reuse.
async fn collect(
    in_flight: &mut JoinSet<Result<(CompletedPart, Bytes), UploadError>>,
    completed: &mut Vec<CompletedPart>,
    spare: &mut Vec<BytesMut>,
) -> Result<(), UploadError> {
    let Some(joined) = in_flight.join_next().await else {
        return Ok(());
    };
    let (part, bytes) =
        joined.expect("part upload tasks do not panic and are not cancelled while joined")?;
    completed.push(part);
    // The SDK has dropped its copy once the request finished, so the buffer is ours again.
    if let Ok(buffer) = bytes.try_into_mut() {
        spare.push(buffer);
    }
    Ok(())
}

/// Reads into `buf` until it holds `size` bytes; returns whether more data may follow
/// (false at end of stream).
async fn fill<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    size: usize,
) -> std::io::Result<bool> {
    while buf.len() < size {
        let room = size - buf.len();
        let n = reader.read_buf(&mut (&mut *buf).limit(room)).await?;
        if n == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

fn finish(hasher: digest::Context) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(hasher.finish().as_ref());
    out
}

/// Completes multipart upload `upload_id` of `bucket/key` from its parts (in any order);
/// returns the object's ETag. For callers that drive a multipart upload of their own, such as
/// a server-side copy with `UploadPartCopy`; they abort with [`abort_multipart`] on failure.
pub async fn complete_multipart(
    client: &Client,
    bucket: &str,
    key: &str,
    upload_id: &str,
    mut parts: Vec<CompletedPart>,
) -> Result<Option<String>, UploadError> {
    parts.sort_by_key(|p| p.part_number());
    Target::new(client, bucket, key)
        .complete(upload_id, parts)
        .await
}

/// Aborts multipart upload `upload_id` of `bucket/key`, trying three times; an upload the
/// store no longer knows counts as aborted.
pub async fn abort_multipart(
    client: &Client,
    bucket: &str,
    key: &str,
    upload_id: &str,
) -> AbortOutcome {
    Target::new(client, bucket, key).abort(upload_id).await
}

/// Where the object goes.
#[derive(Clone)]
struct Target {
    client: Client,
    bucket: String,
    key: String,
}

impl Target {
    fn new(client: &Client, bucket: &str, key: &str) -> Target {
        Target {
            client: client.clone(),
            bucket: bucket.to_owned(),
            key: key.to_owned(),
        }
    }

    fn read_error(&self, source: std::io::Error) -> UploadError {
        UploadError::Read {
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            source,
        }
    }

    fn s3_error<E, R>(&self, operation: impl Into<String>, err: &SdkError<E, R>) -> UploadError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: fmt::Debug,
    {
        UploadError::S3 {
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            operation: operation.into(),
            detail: describe(err),
            exit: super::exit_for(err),
            aborted: AbortOutcome::Clean,
        }
    }

    async fn put(
        &self,
        body: Bytes,
        options: &UploadOptions,
    ) -> Result<Option<String>, UploadError> {
        let mut request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&self.key)
            .content_length(body.len() as i64)
            .body(ByteStream::from(body));
        if let Some(content_type) = &options.content_type {
            request = request.content_type(content_type);
        }
        for (name, value) in &options.metadata {
            request = request.metadata(name, value);
        }
        let output = request
            .send()
            .await
            .map_err(|e| self.s3_error("PutObject", &e))?;
        Ok(output.e_tag().map(str::to_owned))
    }

    async fn create(&self, options: &UploadOptions) -> Result<String, UploadError> {
        let mut request = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key);
        if let Some(content_type) = &options.content_type {
            request = request.content_type(content_type);
        }
        for (name, value) in &options.metadata {
            request = request.metadata(name, value);
        }
        let output = request
            .send()
            .await
            .map_err(|e| self.s3_error("CreateMultipartUpload", &e))?;
        output
            .upload_id()
            .map(str::to_owned)
            .ok_or_else(|| UploadError::S3 {
                bucket: self.bucket.clone(),
                key: self.key.clone(),
                operation: "CreateMultipartUpload".into(),
                detail: "the store returned no upload ID".into(),
                exit: Exit::Unavailable,
                aborted: AbortOutcome::Clean,
            })
    }

    async fn upload_part(
        &self,
        upload_id: &str,
        number: u32,
        body: Bytes,
    ) -> Result<(CompletedPart, Bytes), UploadError> {
        let output = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(upload_id)
            .part_number(number as i32)
            .content_length(body.len() as i64)
            .body(ByteStream::from(body.clone()))
            .send()
            .await
            .map_err(|e| self.s3_error(format!("UploadPart {number}"), &e))?;
        let part = CompletedPart::builder()
            .part_number(number as i32)
            .set_e_tag(output.e_tag().map(str::to_owned))
            .build();
        Ok((part, body))
    }

    async fn complete(
        &self,
        upload_id: &str,
        parts: Vec<CompletedPart>,
    ) -> Result<Option<String>, UploadError> {
        let output = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.s3_error("CompleteMultipartUpload", &e))?;
        Ok(output.e_tag().map(str::to_owned))
    }

    /// Aborts, retrying a few times: a store that just came back should not keep the parts.
    async fn abort(&self, upload_id: &str) -> AbortOutcome {
        let mut pause = Duration::from_millis(200);
        for attempt in 1..=3 {
            let sent = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(upload_id)
                .send()
                .await;
            match sent {
                Ok(_) => return AbortOutcome::Clean,
                Err(err) if super::exit_for(&err) == Exit::NoInput => return AbortOutcome::Clean,
                Err(err) => {
                    tracing::debug!(attempt, error = %describe(&err), "aborting multipart upload failed");
                    if attempt < 3 {
                        tokio::time::sleep(pause).await;
                        pause *= 4;
                    }
                }
            }
        }
        AbortOutcome::Failed(upload_id.to_owned())
    }
}

/// Aborts the multipart upload if the upload future is dropped before it finished.
struct AbortGuard {
    target: Target,
    upload_id: Option<String>,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        // The only task labkit spawns without an owner: cleanup after a cancelled upload, which
        // must outlive the future that was dropped. It ends after at most three requests.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let target = self.target.clone();
                drop(runtime.spawn(async move {
                    if let AbortOutcome::Failed(id) = target.abort(&upload_id).await {
                        tracing::warn!(bucket = %target.bucket, key = %target.key, upload_id = %id,
                            "cancelled multipart upload could not be aborted; it is still open");
                    }
                }));
            }
            Err(_) => {
                tracing::warn!(bucket = %self.target.bucket, key = %self.target.key, %upload_id,
                "cancelled multipart upload left open: no runtime to abort it")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_thousand_parts_of_unknown_length_cover_five_tebibytes() {
        let base = UploadOptions::default().part_size;
        let total: u64 = (1..=MAX_PARTS).map(|n| part_size(n, base) as u64).sum();
        assert!(total >= 5 << 40, "{total}");
        assert_eq!(part_size(1, base), base);
        assert_eq!(part_size(1000, base), base);
        assert_eq!(part_size(1001, base), 2 * base);
        assert!(part_size(MAX_PARTS, base) <= MAX_PART_SIZE);
    }

    #[test]
    fn a_small_size_hint_shrinks_only_the_first_buffer() {
        let hinted = UploadOptions {
            size_hint: Some(4096),
            ..UploadOptions::default()
        };
        let base = base_part_size(&hinted);
        assert_eq!(base, UploadOptions::default().part_size);
        assert_eq!(first_capacity(&hinted, base), 4097);
        assert_eq!(first_capacity(&UploadOptions::default(), base), base);
        let large = UploadOptions {
            size_hint: Some(1 << 40),
            ..UploadOptions::default()
        };
        assert_eq!(
            first_capacity(&large, base_part_size(&large)),
            base_part_size(&large)
        );
    }

    #[test]
    fn a_size_hint_raises_the_part_size_to_fit() {
        let options = UploadOptions {
            size_hint: Some(200 << 30),
            ..UploadOptions::default()
        };
        let base = base_part_size(&options);
        assert!(base as u64 * u64::from(MAX_PARTS) >= 200 << 30, "{base}");
        assert_eq!(base % (1 << 20), 0);
        let small = UploadOptions {
            part_size: 1,
            ..UploadOptions::default()
        };
        assert_eq!(base_part_size(&small), MIN_PART_SIZE);
    }
}
