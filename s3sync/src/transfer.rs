//! Moving one object: upload a file or a stream, download to a file or a stream, copy inside
//! the store.
//!
//! Uploads go through labcore's streaming upload (parallel parts, aborted on failure) with the
//! file's mtime and mode in the object's metadata. Downloads land in a temporary file beside
//! the destination (`.NAME.RANDOM.s3sync-part`), are checked against the object's size and,
//! where the object has one, its MD5 (a plain ETag or an `md5chksum` value) or its `x-amz-checksum`,
//! get their mtime and mode back, and only then are renamed into place: an interrupted or
//! failed download never leaves a file under the final name. Large objects download as
//! parallel ranged GETs pinned to the ETag seen first (`If-Match`): into a file, each range is
//! written at its offset as it arrives (memory stays small whatever the size); to standard
//! output, ranges are put back in order.

use std::collections::BTreeMap;
use std::fs::{File, FileTimes, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextRef;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::error::BoxError;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumMode, CompletedPart, MetadataDirective};
use aws_smithy_types::date_time::Format as DateTimeFormat;
use bytes::{Bytes, BytesMut};
use indicatif::ProgressBar;
use labcore::Exit;
use labcore::s3::upload::{
    AbortOutcome, UploadOptions, Uploaded, abort_multipart, complete_multipart, upload,
};
use md5::{Digest, Md5};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::limit::{CHUNK, Limits};
use crate::location::S3Url;
use crate::meta;
use crate::report::Files;
use crate::resume;
use crate::store::Stores;

/// Objects up to this size (known from a listing) download with one GET held in memory and
/// one blocking write; larger ones go through [`RangeWrite`] and take a `large` permit.
const WHOLE_LIMIT: u64 = 1 << 20;

/// The largest range one GET of a file download asks for.
const MAX_RANGE: u64 = 64 << 20;

/// The range size of a copy between two stores: `part_concurrency` of them are buffered.
const RELAY_RANGE: u64 = 2 << 20;

/// The largest object one `CopyObject` may copy.
const MAX_COPY: u64 = 5 * 1024 * 1024 * 1024;

/// How transfers run, shared by every transfer of a command.
#[derive(Clone)]
pub(crate) struct Transfers {
    /// The clients of the stores the command uses.
    pub(crate) stores: Stores,
    /// Bandwidth and request-rate limits shared by every transfer.
    pub(crate) limits: Limits,
    /// First part size of uploads and range size of downloads.
    pub(crate) part_size: usize,
    /// Parts or ranges in flight per object.
    pub(crate) part_concurrency: usize,
    /// Large objects moving at once: each holds `part_concurrency + 1` part buffers.
    pub(crate) large: Arc<Semaphore>,
    /// Bytes moved, for the progress bar.
    pub(crate) progress: ProgressBar,
    /// Files queued and done, for the progress display.
    pub(crate) files: Arc<Files>,
    /// Cancelled by a stop signal.
    pub(crate) cancel: CancellationToken,
    /// Flush downloaded files to disk before renaming them into place.
    pub(crate) fsync: bool,
    /// Where the state of resumable uploads is kept (`None`: uploads cannot resume).
    pub(crate) resume_folder: Option<PathBuf>,
}

/// What an object holds, from `HeadObject` or `GetObject`.
#[derive(Clone, Debug, Default)]
pub(crate) struct ObjectInfo {
    /// Size in bytes.
    pub(crate) size: u64,
    /// ETag.
    pub(crate) etag: Option<String>,
    /// The file's mtime from metadata.
    pub(crate) mtime: Option<SystemTime>,
    /// Upload time.
    pub(crate) uploaded: Option<SystemTime>,
    /// The file's mode from metadata.
    pub(crate) mode: Option<u32>,
    /// MD5 of the content, where the store or metadata tells it.
    pub(crate) md5: Option<[u8; 16]>,
}

impl ObjectInfo {
    fn new(
        size: Option<i64>,
        etag: Option<&str>,
        metadata: Option<&std::collections::HashMap<String, String>>,
        uploaded: Option<&aws_smithy_types::DateTime>,
        encrypted_with_kms: bool,
    ) -> ObjectInfo {
        let get = |name: &str| metadata.and_then(|m| m.get(name)).map(String::as_str);
        // Under SSE-KMS and SSE-C the ETag is not the content's MD5.
        let etag_md5 = etag
            .filter(|_| !encrypted_with_kms)
            .and_then(meta::etag_md5);
        ObjectInfo {
            size: size.unwrap_or(0).max(0) as u64,
            etag: etag.map(str::to_owned),
            mtime: get(meta::MTIME).and_then(meta::parse_mtime),
            uploaded: uploaded.and_then(|t| SystemTime::try_from(*t).ok()),
            mode: get(meta::MODE).and_then(meta::parse_mode),
            md5: etag_md5.or_else(|| get(meta::MD5).and_then(meta::meta_md5)),
        }
    }

    /// The time a downloaded file gets: the original mtime, else the upload time.
    pub(crate) fn file_time(&self) -> Option<SystemTime> {
        self.mtime.or(self.uploaded)
    }
}

/// What an upload of a file stored.
#[derive(Clone, Debug)]
pub(crate) struct FileUpload {
    /// Bytes stored.
    pub(crate) size: u64,
    /// The file's mtime, sent as metadata; `None` when the file changed while it was read.
    pub(crate) mtime: Option<SystemTime>,
    /// The object's ETag, as the store answered.
    pub(crate) etag: Option<String>,
    /// The second of the server's `Date` answering a single `PutObject`.
    pub(crate) date: Option<i64>,
}

impl FileUpload {
    fn new(
        path: &Path,
        stat_size: u64,
        stored: u64,
        mtime: Option<SystemTime>,
        etag: Option<String>,
        date: Option<i64>,
    ) -> FileUpload {
        if stored != stat_size {
            tracing::warn!(path = %path.display(), "the file changed size while it was uploaded; the next sync uploads it again");
        }
        FileUpload {
            size: stored,
            mtime: mtime.filter(|_| stored == stat_size),
            etag,
            date,
        }
    }
}

/// What a copy between two stores wrote.
#[derive(Clone, Debug)]
pub(crate) struct Relayed {
    /// Bytes stored.
    pub(crate) size: u64,
    /// The copy's ETag, as the store answered.
    pub(crate) etag: Option<String>,
    /// The second of the server's `Date` answering a single `PutObject`.
    pub(crate) date: Option<i64>,
}

/// What a download into a file wrote.
#[derive(Clone, Debug)]
pub(crate) struct FileDownload {
    /// Bytes written.
    pub(crate) size: u64,
    /// The file's mtime once in place.
    pub(crate) mtime: Option<SystemTime>,
    /// The object, as the answers described it.
    pub(crate) info: ObjectInfo,
}

/// Reads the server's `Date` off the answer to one request (the SDK's outputs do not carry it).
#[derive(Clone, Debug, Default)]
struct ServerDate(Arc<std::sync::Mutex<Option<i64>>>);

impl ServerDate {
    fn seconds(&self) -> Option<i64> {
        *self.0.lock().expect("the date lock is never poisoned")
    }
}

impl Intercept for ServerDate {
    fn name(&self) -> &'static str {
        "ServerDate"
    }

    fn read_before_deserialization(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _config: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let date = context
            .response()
            .headers()
            .get("date")
            .and_then(|d| aws_smithy_types::DateTime::from_str(d, DateTimeFormat::HttpDate).ok())
            .map(|d| d.secs());
        // Every attempt overwrites it: the one whose answer is used comes last.
        *self.0.lock().expect("the date lock is never poisoned") = date;
        Ok(())
    }
}

/// Whether an object's encryption makes its ETag something other than its MD5 (SSE-C and
/// SSE-KMS).
fn etag_is_not_md5(
    customer_algorithm: Option<&str>,
    sse: Option<&aws_sdk_s3::types::ServerSideEncryption>,
) -> bool {
    customer_algorithm.is_some() || sse.is_some_and(|s| s.as_str().starts_with("aws:kms"))
}

/// Counts bytes read for the progress bar and fails reads once a stop signal came, so an
/// upload in progress aborts its multipart upload instead of being dropped half-way.
///
/// Under `--bwlimit` it hands out at most [`CHUNK`] bytes per read, and before each read waits
/// for the slot of the bytes the previous read handed out: the stream then runs at the rate,
/// at most two chunks ahead.
struct Metered<R> {
    inner: R,
    progress: ProgressBar,
    cancel: CancellationToken,
    limits: Limits,
    /// Bytes handed out whose slot was not waited for yet.
    owed: usize,
    /// The wait for them, once started.
    wait: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    scratch: Vec<u8>,
}

impl<R> Metered<R> {
    fn new(inner: R, t: &Transfers) -> Metered<R> {
        Metered {
            inner,
            progress: t.progress.clone(),
            cancel: t.cancel.clone(),
            limits: t.limits.clone(),
            owed: 0,
            wait: None,
            scratch: Vec::new(),
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Metered<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.cancel.is_cancelled() {
            return Poll::Ready(Err(io::Error::other("stopped by a signal")));
        }
        if self.owed > 0 && self.wait.is_none() {
            let (limits, owed) = (self.limits.clone(), self.owed);
            self.wait = Some(Box::pin(async move { limits.up(owed).await }));
        }
        if let Some(wait) = self.wait.as_mut() {
            std::task::ready!(wait.as_mut().poll(cx));
            self.wait = None;
            self.owed = 0;
        }
        let limited = self.limits.limits_up();
        let read = if limited && buf.remaining() > CHUNK {
            // Read through a chunk-sized scratch buffer (only under a limit).
            let mut scratch = std::mem::take(&mut self.scratch);
            scratch.resize(CHUNK, 0);
            let mut part = ReadBuf::new(&mut scratch);
            let polled = Pin::new(&mut self.inner).poll_read(cx, &mut part);
            let read = part.filled().len();
            buf.put_slice(part.filled());
            self.scratch = scratch;
            std::task::ready!(polled)?;
            read
        } else {
            let before = buf.filled().len();
            std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
            buf.filled().len() - before
        };
        if read > 0 {
            self.progress.inc(read as u64);
            if limited {
                self.owed = read;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Transfers {
    /// The client of the store `url` is on.
    pub(crate) fn client(&self, url: &S3Url) -> &Client {
        self.stores.client(url)
    }

    /// Counts one more file of `size` bytes about to move, for the progress display.
    pub(crate) fn queue(&self, size: u64) {
        self.progress.inc_length(size);
        self.files
            .total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn upload_options(
        &self,
        size_hint: Option<u64>,
        metadata: Vec<(String, String)>,
    ) -> UploadOptions {
        UploadOptions {
            part_size: self.part_size,
            concurrency: self.part_concurrency,
            size_hint,
            content_type: None,
            metadata,
        }
    }

    /// Uploads the local file at `path` to `dst`; says what was stored.
    pub(crate) async fn upload_file(
        &self,
        path: &Path,
        dst: &S3Url,
        md5: Option<[u8; 16]>,
    ) -> Result<FileUpload, Error> {
        let limit = self.part_size as u64;
        let owned = path.to_owned();
        // Small files are read whole in one blocking call: one open, one fstat, one read.
        let (file, size, mtime, mode, data) = tokio::task::spawn_blocking(move || {
            let mut file = File::open(&owned).map_err(|e| Error::local("opening", &owned, e))?;
            let stat = file
                .metadata()
                .map_err(|e| Error::local("reading metadata of", &owned, e))?;
            let mtime = stat.modified().ok();
            let mode = stat.mode();
            if stat.len() <= limit {
                let mut data = Vec::with_capacity(stat.len() as usize + 1);
                io::Read::read_to_end(&mut file, &mut data)
                    .map_err(|e| Error::local("reading", &owned, e))?;
                Ok::<_, Error>((None, stat.len(), mtime, mode, data))
            } else {
                Ok((Some(file), stat.len(), mtime, mode, Vec::new()))
            }
        })
        .await
        .map_err(|e| Error::Runtime {
            what: "file reader thread failed",
            source: io::Error::other(e),
        })??;
        let mut metadata = vec![(meta::MODE.to_owned(), meta::format_mode(mode))];
        if let Some(mtime) = mtime {
            metadata.push((meta::MTIME.to_owned(), meta::format_mtime(mtime)));
        }
        if let Some(md5) = md5 {
            metadata.push((meta::MD5.to_owned(), meta::encode_md5(&md5)));
        }
        let Some(file) = file else {
            if self.cancel.is_cancelled() {
                return Err(Error::Interrupted);
            }
            let read = data.len() as u64;
            let (etag, date) = self.put_small(dst, Bytes::from(data), metadata).await?;
            return Ok(FileUpload::new(path, size, read, mtime, etag, date));
        };
        let _permit = self.large.acquire().await.map_err(|_| Error::Interrupted)?;
        let uploader = resume::Uploader {
            client: self.client(dst).clone(),
            endpoint: self.stores.endpoint(dst).to_owned(),
            state_folder: self.resume_folder.clone(),
            part_size: self.part_size,
            part_concurrency: self.part_concurrency,
            limits: self.limits.clone(),
            progress: self.progress.clone(),
            cancel: self.cancel.clone(),
            resumed_parts: self.files.clone_resumed(),
        };
        let stored = resume::upload_file(&uploader, path, file, dst, size, mtime, metadata)
            .await
            .map_err(|e| self.interrupted_or(e))?;
        Ok(FileUpload::new(
            path,
            size,
            stored.size,
            mtime,
            stored.etag,
            None,
        ))
    }

    /// One `PutObject` of a small file held in memory; returns the ETag and the second of the
    /// server's `Date` on the answer (for the state cache: [`crate::cache`]).
    async fn put_small(
        &self,
        dst: &S3Url,
        data: Bytes,
        metadata: Vec<(String, String)>,
    ) -> Result<(Option<String>, Option<i64>), Error> {
        // Paced chunk by chunk, so the progress display moves while a limit holds it back.
        let mut left = data.len();
        while left > 0 {
            let step = left.min(CHUNK);
            self.limits.up(step).await;
            self.progress.inc(step as u64);
            left -= step;
        }
        self.limits.request().await;
        let date = ServerDate::default();
        let mut request = self
            .client(dst)
            .put_object()
            .bucket(&dst.bucket)
            .key(&dst.key)
            .content_length(data.len() as i64)
            .body(ByteStream::from(data));
        for (name, value) in metadata {
            request = request.metadata(name, value);
        }
        let out = request
            .customize()
            .interceptor(date.clone())
            .send()
            .await
            .map_err(|e| self.interrupted_or(Error::s3("PutObject", dst.to_string(), &e)))?;
        Ok((out.e_tag().map(str::to_owned), date.seconds()))
    }

    /// Uploads a stream of unknown length (standard input) to `dst`.
    pub(crate) async fn upload_stream<R: AsyncRead + Unpin>(
        &self,
        reader: R,
        dst: &S3Url,
    ) -> Result<Uploaded, Error> {
        let reader = Metered::new(reader, self);
        let options = self.upload_options(None, Vec::new());
        upload(self.client(dst), &dst.bucket, &dst.key, reader, &options)
            .await
            .map_err(|e| self.interrupted_or(e.into()))
    }

    fn interrupted_or(&self, err: Error) -> Error {
        if self.cancel.is_cancelled() {
            Error::Interrupted
        } else {
            err
        }
    }

    /// Reads an object's size and metadata.
    pub(crate) async fn head(&self, url: &S3Url) -> Result<ObjectInfo, Error> {
        self.limits.request().await;
        let out = self
            .client(url)
            .head_object()
            .bucket(&url.bucket)
            .key(&url.key)
            .send()
            .await
            .map_err(|e| Error::s3("HeadObject", url.to_string(), &e))?;
        let kms = etag_is_not_md5(out.sse_customer_algorithm(), out.server_side_encryption());
        Ok(ObjectInfo::new(
            out.content_length(),
            out.e_tag(),
            out.metadata(),
            out.last_modified(),
            kms,
        ))
    }

    /// Downloads `src` into the file `dest`, through a temporary file in its folder. `known`
    /// is what a listing said about the object, saving a `HeadObject` for large ones.
    pub(crate) async fn download_file(
        &self,
        src: &S3Url,
        dest: &Path,
        known: Option<u64>,
    ) -> Result<FileDownload, Error> {
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = parent.join(format!(".{name}.{:08x}.s3sync-part", rand::random::<u32>()));
        let ranged = known.is_none_or(|size| size > WHOLE_LIMIT);
        if !ranged {
            let (info, body) = self.get_whole(src).await?;
            let dest = dest.to_owned();
            let fsync = self.fsync;
            let size = body.len() as u64;
            let (info, mtime) = blocking(move || {
                std::fs::create_dir_all(&parent)
                    .map_err(|e| Error::local("creating folder", &parent, e))?;
                let mut guard = TempFile::create(temp)?;
                guard
                    .file
                    .write_all(&body)
                    .map_err(|e| Error::local("writing", &guard.path, e))?;
                let mtime = guard.finish(&info, &dest, fsync)?;
                Ok((info, mtime))
            })
            .await?;
            self.progress.inc(size);
            return Ok(FileDownload { size, mtime, info });
        }
        let info = self.head(src).await?;
        let _permit = self.large.acquire().await.map_err(|_| Error::Interrupted)?;
        let guard = blocking(move || {
            std::fs::create_dir_all(&parent)
                .map_err(|e| Error::local("creating folder", &parent, e))?;
            TempFile::create(temp)
        })
        .await?;
        let file = Arc::new(
            guard
                .file
                .try_clone()
                .map_err(|e| Error::local("opening", &guard.path, e))?,
        );
        let path = Arc::new(guard.path.clone());
        let size = self.get_ranges_into(src, &info, &file, &path).await?;
        drop(file);
        let dest = dest.to_owned();
        let fsync = self.fsync;
        blocking(move || {
            // Ranges land out of order, so the MD5 (where the object has one) is taken from
            // the finished file, still in the page cache.
            if let Some(want) = info.md5
                && md5_of_file(&guard.path)? != want
            {
                return Err(Error::Verify {
                    target: guard.path.display().to_string(),
                    reason: "the MD5 of the bytes received does not match the object's".into(),
                });
            }
            let mtime = guard.finish(&info, &dest, fsync)?;
            Ok(FileDownload { size, mtime, info })
        })
        .await
    }

    /// Fetches `info.size` bytes of `src` as ranged GETs, `part_concurrency` at a time, each
    /// written at its offset in `file` as it arrives: memory stays at one write buffer per
    /// range in flight, whatever the object's size. Returns the bytes written.
    async fn get_ranges_into(
        &self,
        src: &S3Url,
        info: &ObjectInfo,
        file: &Arc<File>,
        path: &Arc<PathBuf>,
    ) -> Result<u64, Error> {
        let window = self.part_concurrency.max(1);
        // Ranges stream to disk, so their size costs no memory: large ones mean fewer
        // requests, while every range in flight still gets two turns.
        let chunk = (info.size / (2 * window as u64)).clamp(self.part_size as u64, MAX_RANGE);
        let mut in_flight: JoinSet<Result<u64, Error>> = JoinSet::new();
        let mut next_fetch = 0u64;
        let mut written = 0u64;
        while next_fetch < info.size || !in_flight.is_empty() {
            if self.cancel.is_cancelled() {
                return Err(Error::Interrupted);
            }
            while next_fetch < info.size && in_flight.len() < window {
                let start = next_fetch;
                let end = (start + chunk).min(info.size);
                next_fetch = end;
                let range = RangeWrite {
                    client: self.client(src).clone(),
                    limits: self.limits.clone(),
                    src: src.clone(),
                    etag: info.etag.clone(),
                    file: file.clone(),
                    path: path.clone(),
                    progress: self.progress.clone(),
                };
                in_flight.spawn(async move { range.run(start, end).await });
            }
            if let Some(joined) = in_flight.join_next().await {
                written += joined.map_err(|e| Error::Runtime {
                    what: "a download task failed",
                    source: io::Error::other(e),
                })??;
            }
        }
        if written != info.size {
            return Err(Error::Verify {
                target: src.to_string(),
                reason: format!("the store announced {} bytes and sent {written}", info.size),
            });
        }
        Ok(written)
    }

    /// Writes `src` to `out` (standard output), verified like a file download; a mismatch is
    /// found only after the bytes went out, and then fails the command.
    pub(crate) async fn download_stream<W: AsyncWrite + Unpin + Send + 'static>(
        &self,
        src: &S3Url,
        out: W,
    ) -> Result<u64, Error> {
        let info = self.head(src).await?;
        let out = Arc::new(tokio::sync::Mutex::new(out));
        let sink = out.clone();
        let fetched = self
            .get_ranges(src, &info, self.part_size as u64, move |chunk: Bytes| {
                let sink = sink.clone();
                async move {
                    sink.lock()
                        .await
                        .write_all(&chunk)
                        .await
                        .map_err(|source| Error::Stdio {
                            action: "writing",
                            stream: "output",
                            source,
                        })
                }
            })
            .await;
        let size = match fetched {
            // The reader has all it wants (`| head`, `pg_restore --list`): a normal end.
            Err(Error::Stdio { source, .. }) if source.kind() == io::ErrorKind::BrokenPipe => {
                tracing::debug!("standard output closed early by its reader");
                return Ok(0);
            }
            other => other?,
        };
        out.lock()
            .await
            .flush()
            .await
            .map_err(|source| Error::Stdio {
                action: "writing",
                stream: "output",
                source,
            })?;
        Ok(size)
    }

    /// One `GetObject` of a whole (small) object, verified.
    async fn get_whole(&self, src: &S3Url) -> Result<(ObjectInfo, Bytes), Error> {
        self.limits.request().await;
        let out = self
            .client(src)
            .get_object()
            .bucket(&src.bucket)
            .key(&src.key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
            .map_err(|e| Error::s3("GetObject", src.to_string(), &e))?;
        let kms = etag_is_not_md5(out.sse_customer_algorithm(), out.server_side_encryption());
        let info = ObjectInfo::new(
            out.content_length(),
            out.e_tag(),
            out.metadata(),
            out.last_modified(),
            kms,
        );
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| body_error(src, &e))?
            .into_bytes();
        self.limits.down(body.len()).await;
        verify(
            src,
            &info,
            body.len() as u64,
            info.md5.map(|_| md5_of(&body)),
        )?;
        Ok((info, body))
    }

    /// Fetches `info.size` bytes of `src` as ranged GETs, `part_concurrency` at a time, and
    /// hands them to `sink` in order. Returns the bytes delivered, after verifying them.
    async fn get_ranges<F, Fut>(
        &self,
        src: &S3Url,
        info: &ObjectInfo,
        chunk: u64,
        mut sink: F,
    ) -> Result<u64, Error>
    where
        F: FnMut(Bytes) -> Fut,
        Fut: Future<Output = Result<(), Error>>,
    {
        let window = self.part_concurrency.max(1) as u64;
        let mut in_flight: JoinSet<Result<(u64, Bytes), Error>> = JoinSet::new();
        let mut ready: BTreeMap<u64, Bytes> = BTreeMap::new();
        let mut next_fetch = 0u64;
        let mut next_write = 0u64;
        let mut hasher = info.md5.map(|_| Md5::new());
        // An empty object still takes one request so missing keys and refused keys surface.
        if info.size == 0 {
            let (got, body) = self.get_whole(src).await?;
            if got.size != 0 || !body.is_empty() {
                return Err(Error::Verify {
                    target: src.to_string(),
                    reason: "the object changed while it was read".into(),
                });
            }
            return Ok(0);
        }
        while next_write < info.size {
            if self.cancel.is_cancelled() {
                return Err(Error::Interrupted);
            }
            while next_fetch < info.size && next_fetch < next_write + window * chunk {
                let start = next_fetch;
                let end = (start + chunk).min(info.size);
                next_fetch = end;
                let client = self.client(src).clone();
                let limits = self.limits.clone();
                let src = src.clone();
                let etag = info.etag.clone();
                in_flight.spawn(async move {
                    get_range(&client, &limits, &src, etag.as_deref(), start, end)
                        .await
                        .map(|b| (start, b))
                });
            }
            let joined = in_flight
                .join_next()
                .await
                .expect("a range is in flight while bytes are missing");
            let (start, bytes) = joined.map_err(|e| Error::Runtime {
                what: "a download task failed",
                source: io::Error::other(e),
            })??;
            ready.insert(start, bytes);
            while let Some(bytes) = ready.remove(&next_write) {
                next_write += bytes.len() as u64;
                if let Some(hasher) = hasher.as_mut() {
                    hasher.update(&bytes);
                }
                self.progress.inc(bytes.len() as u64);
                sink(bytes).await?;
            }
        }
        verify(src, info, next_write, hasher.map(|h| h.finalize().into()))?;
        Ok(next_write)
    }

    /// Copies `src` on one store to `dst` on another through this process, keeping the mtime
    /// and mode metadata: a small object (up to one part) in one GET and one PUT, a larger one
    /// as parallel 2 MiB ranged GETs (pinned to the ETag seen first) put back in order into a
    /// multipart upload, so memory stays at the upload's part buffers and a few ranges
    /// whatever the size.
    pub(crate) async fn relay(
        &self,
        src: &S3Url,
        dst: &S3Url,
        size: u64,
    ) -> Result<Relayed, Error> {
        let metadata = |info: &ObjectInfo, multipart: bool| {
            let mut metadata = Vec::new();
            if let Some(mtime) = info.mtime {
                metadata.push((meta::MTIME.to_owned(), meta::format_mtime(mtime)));
            }
            if let Some(mode) = info.mode {
                metadata.push((meta::MODE.to_owned(), meta::format_mode(mode)));
            }
            // A multipart ETag is no MD5: keep the content's for --checksum.
            if let (true, Some(md5)) = (multipart, info.md5) {
                metadata.push((meta::MD5.to_owned(), meta::encode_md5(&md5)));
            }
            metadata
        };
        if size <= self.part_size as u64 {
            if self.cancel.is_cancelled() {
                return Err(Error::Interrupted);
            }
            let (info, body) = self.get_whole(src).await?;
            if body.len() <= self.part_size {
                let len = body.len() as u64;
                let (etag, date) = self.put_small(dst, body, metadata(&info, false)).await?;
                return Ok(Relayed {
                    size: len,
                    etag,
                    date,
                });
            }
            // It grew since the listing: stream it below.
        }
        let info = self.head(src).await?;
        let _permit = self.large.acquire().await.map_err(|_| Error::Interrupted)?;
        let (writer, reader) = tokio::io::duplex(4 * CHUNK);
        let mut reader = Metered::new(reader, self);
        // The download side counts the bytes for the progress bar.
        reader.progress = ProgressBar::hidden();
        // A failed download must fail the upload, not end its stream early and complete it.
        let failed = self.cancel.child_token();
        reader.cancel = failed.clone();
        let options = self.upload_options(Some(info.size), metadata(&info, true));
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        // Small ranges, so the few in flight (and those waiting for their turn) cost little
        // memory beside the upload's parts, while parallel GETs keep a single stream's pace
        // from limiting the copy.
        let download = async {
            let fetched = self
                .get_ranges(src, &info, RELAY_RANGE, |chunk: Bytes| {
                    let writer = writer.clone();
                    async move {
                        writer
                            .lock()
                            .await
                            .write_all(&chunk)
                            .await
                            .map_err(|e| Error::Verify {
                                target: src.to_string(),
                                reason: format!("the upload stopped taking bytes: {e}"),
                            })
                    }
                })
                .await;
            if fetched.is_err() {
                failed.cancel();
            }
            // The end of the stream tells the upload the object is complete.
            let _ = writer.lock().await.shutdown().await;
            fetched
        };
        let upload = async {
            upload(self.client(dst), &dst.bucket, &dst.key, reader, &options)
                .await
                .map_err(|e| self.interrupted_or(e.into()))
        };
        let (fetched, stored) = tokio::join!(Box::pin(download), Box::pin(upload));
        let fetched = match (fetched, stored.is_err()) {
            // The upload failed first; the download only lost its reader.
            (Err(Error::Verify { .. }), true) => 0,
            (fetched, _) => fetched?,
        };
        let stored = stored?;
        if stored.size != fetched || fetched != info.size {
            return Err(Error::Verify {
                target: dst.to_string(),
                reason: format!(
                    "{src} holds {} bytes, {fetched} were read and {} stored",
                    info.size, stored.size
                ),
            });
        }
        Ok(Relayed {
            size: stored.size,
            etag: stored.etag,
            date: None,
        })
    }

    /// Copies `src` to `dst` inside the store, keeping metadata; multipart above 5 GiB.
    pub(crate) async fn copy_object(
        &self,
        src: &S3Url,
        dst: &S3Url,
        size: u64,
    ) -> Result<u64, Error> {
        let source = copy_source(src);
        if size <= MAX_COPY {
            self.limits.request().await;
            self.client(dst)
                .copy_object()
                .copy_source(&source)
                .bucket(&dst.bucket)
                .key(&dst.key)
                .metadata_directive(MetadataDirective::Copy)
                .send()
                .await
                .map_err(|e| Error::s3("CopyObject", format!("{src} to {dst}"), &e))?;
            self.progress.inc(size);
            return Ok(size);
        }
        let info = self.head(src).await?;
        let mut create = self
            .client(dst)
            .create_multipart_upload()
            .bucket(&dst.bucket)
            .key(&dst.key);
        if let Some(mtime) = info.mtime {
            create = create.metadata(meta::MTIME, meta::format_mtime(mtime));
        }
        if let Some(mode) = info.mode {
            create = create.metadata(meta::MODE, meta::format_mode(mode));
        }
        let upload_id = create
            .send()
            .await
            .map_err(|e| Error::s3("CreateMultipartUpload", dst.to_string(), &e))?
            .upload_id()
            .map(str::to_owned)
            .ok_or_else(|| Error::S3 {
                operation: "CreateMultipartUpload",
                target: dst.to_string(),
                detail: "the store returned no upload ID".into(),
                exit: Exit::Unavailable,
            })?;
        let result = self.copy_parts(&source, src, dst, &upload_id, size).await;
        if result.is_err()
            && let AbortOutcome::Failed(id) =
                abort_multipart(self.client(dst), &dst.bucket, &dst.key, &upload_id).await
        {
            tracing::warn!(%dst, upload_id = %id, "aborting the multipart copy failed; it is still open");
        }
        result
    }

    async fn copy_parts(
        &self,
        source: &str,
        src: &S3Url,
        dst: &S3Url,
        upload_id: &str,
        size: u64,
    ) -> Result<u64, Error> {
        // 10,000 parts of at most 5 GiB; start at 512 MiB to keep the request count low.
        let part = (512u64 << 20).max(size.div_ceil(10_000));
        let mut tasks: JoinSet<Result<CompletedPart, Error>> = JoinSet::new();
        let mut parts = Vec::new();
        let mut start = 0u64;
        let mut number = 1i32;
        while start < size || !tasks.is_empty() {
            while start < size && tasks.len() < self.part_concurrency.max(1) {
                let end = (start + part).min(size);
                let request = self
                    .client(dst)
                    .upload_part_copy()
                    .copy_source(source)
                    .copy_source_range(format!("bytes={start}-{}", end - 1))
                    .bucket(&dst.bucket)
                    .key(&dst.key)
                    .upload_id(upload_id)
                    .part_number(number);
                let target = format!("{src} to {dst}");
                let progress = self.progress.clone();
                tasks.spawn(async move {
                    let out = request
                        .send()
                        .await
                        .map_err(|e| Error::s3("UploadPartCopy", target, &e))?;
                    progress.inc(end - start);
                    Ok(CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(
                            out.copy_part_result()
                                .and_then(|r| r.e_tag())
                                .map(str::to_owned),
                        )
                        .build())
                });
                start = end;
                number += 1;
            }
            if let Some(joined) = tasks.join_next().await {
                parts.push(joined.map_err(|e| Error::Runtime {
                    what: "a copy task failed",
                    source: io::Error::other(e),
                })??);
            }
        }
        complete_multipart(self.client(dst), &dst.bucket, &dst.key, upload_id, parts).await?;
        Ok(size)
    }
}

/// Sends a GET for bytes `start..end` of `src`, pinned to `etag`; returns the body.
async fn get_range_body(
    client: &Client,
    limits: &Limits,
    src: &S3Url,
    etag: Option<&str>,
    start: u64,
    end: u64,
) -> Result<ByteStream, Error> {
    limits.request().await;
    let mut request = client
        .get_object()
        .bucket(&src.bucket)
        .key(&src.key)
        .range(format!("bytes={start}-{}", end - 1));
    if let Some(etag) = etag {
        request = request.if_match(etag);
    }
    Ok(request
        .send()
        .await
        .map_err(|e| Error::s3("GetObject", src.to_string(), &e))?
        .body)
}

fn short_range(src: &S3Url, start: u64, end: u64, got: u64) -> Error {
    Error::Verify {
        target: src.to_string(),
        reason: format!("asked for bytes {start}-{} and got {got} bytes", end - 1),
    }
}

/// Bytes `start..end` of `src` in one buffer, filled as the body arrives (no second copy).
async fn get_range(
    client: &Client,
    limits: &Limits,
    src: &S3Url,
    etag: Option<&str>,
    start: u64,
    end: u64,
) -> Result<Bytes, Error> {
    let mut body = get_range_body(client, limits, src, etag, start, end).await?;
    let want = (end - start) as usize;
    let mut buffer = BytesMut::with_capacity(want);
    while let Some(chunk) = body.try_next().await.map_err(|e| body_error(src, &e))? {
        if buffer.len() + chunk.len() > want {
            return Err(short_range(
                src,
                start,
                end,
                (buffer.len() + chunk.len()) as u64,
            ));
        }
        limits.down(chunk.len()).await;
        buffer.extend_from_slice(&chunk);
    }
    if buffer.len() != want {
        return Err(short_range(src, start, end, buffer.len() as u64));
    }
    Ok(buffer.freeze())
}

/// Bytes gathered before one positional write of a ranged download.
const WRITE_BUFFER: usize = 1 << 20;

/// One ranged GET of a file download, written at its offset as the body arrives.
struct RangeWrite {
    client: Client,
    limits: Limits,
    src: S3Url,
    etag: Option<String>,
    file: Arc<File>,
    path: Arc<PathBuf>,
    progress: ProgressBar,
}

impl RangeWrite {
    /// Fetches bytes `start..end` and writes them at `start`; returns the count written.
    async fn run(self, start: u64, end: u64) -> Result<u64, Error> {
        let mut body = get_range_body(
            &self.client,
            &self.limits,
            &self.src,
            self.etag.as_deref(),
            start,
            end,
        )
        .await?;
        let want = (end - start) as usize;
        // One buffer per range, reused for every write: no allocation per chunk.
        let mut buffer = Vec::with_capacity(want.min(WRITE_BUFFER) + 64 * 1024);
        let mut offset = start;
        loop {
            let chunk = body
                .try_next()
                .await
                .map_err(|e| body_error(&self.src, &e))?;
            if let Some(chunk) = &chunk {
                self.limits.down(chunk.len()).await;
                buffer.extend_from_slice(chunk);
            }
            let last = chunk.is_none();
            if buffer.len() >= WRITE_BUFFER || (last && !buffer.is_empty()) {
                let len = buffer.len() as u64;
                if offset + len > end {
                    break;
                }
                let (file, path) = (self.file.clone(), self.path.clone());
                buffer = blocking(move || {
                    file.write_all_at(&buffer, offset)
                        .map_err(|e| Error::local("writing", &*path, e))?;
                    buffer.clear();
                    Ok(buffer)
                })
                .await?;
                offset += len;
                self.progress.inc(len);
            }
            if last {
                break;
            }
        }
        let got = offset - start + buffer.len() as u64;
        if got != end - start {
            return Err(short_range(&self.src, start, end, got));
        }
        Ok(got)
    }
}

fn body_error(src: &S3Url, err: &dyn std::error::Error) -> Error {
    Error::S3 {
        operation: "GetObject",
        target: src.to_string(),
        detail: format!("reading the body: {}", labcore::exit::chain(err)),
        exit: Exit::Unavailable,
    }
}

fn verify(src: &S3Url, info: &ObjectInfo, got: u64, md5: Option<[u8; 16]>) -> Result<(), Error> {
    if got != info.size {
        return Err(Error::Verify {
            target: src.to_string(),
            reason: format!("the store announced {} bytes and sent {got}", info.size),
        });
    }
    if let (Some(want), Some(got)) = (info.md5, md5)
        && want != got
    {
        return Err(Error::Verify {
            target: src.to_string(),
            reason: "the MD5 of the bytes received does not match the object's".into(),
        });
    }
    Ok(())
}

/// MD5 of a buffer.
pub(crate) fn md5_of(bytes: &[u8]) -> [u8; 16] {
    Md5::digest(bytes).into()
}

/// MD5 of a local file (blocking).
pub(crate) fn md5_of_file(path: &Path) -> Result<[u8; 16], Error> {
    let mut file = File::open(path).map_err(|e| Error::local("opening", path, e))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match io::Read::read(&mut file, &mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::local("reading", path, e)),
        }
    }
    Ok(hasher.finalize().into())
}

/// `bucket/key` for `x-amz-copy-source`, percent-encoded except `/` and unreserved bytes.
pub(crate) fn copy_source(url: &S3Url) -> String {
    let mut out = String::with_capacity(url.bucket.len() + url.key.len() + 1);
    out.push_str(&url.bucket);
    out.push('/');
    for byte in url.key.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~/".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A download's temporary file; removed on drop unless renamed into place.
struct TempFile {
    path: PathBuf,
    file: File,
    done: bool,
}

impl TempFile {
    fn create(path: PathBuf) -> Result<TempFile, Error> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o666)
            .open(&path)
            .map_err(|e| Error::local("creating", &path, e))?;
        Ok(TempFile {
            path,
            file,
            done: false,
        })
    }

    /// Restores mtime and mode, optionally flushes, and renames to `dest`; returns the mtime
    /// the file ended up with.
    fn finish(
        mut self,
        info: &ObjectInfo,
        dest: &Path,
        fsync: bool,
    ) -> Result<Option<SystemTime>, Error> {
        if let Some(mtime) = info.file_time() {
            self.file
                .set_times(FileTimes::new().set_modified(mtime))
                .map_err(|e| Error::local("setting the mtime of", &self.path, e))?;
        }
        if let Some(mode) = info.mode {
            self.file
                .set_permissions(Permissions::from_mode(mode))
                .map_err(|e| Error::local("setting the mode of", &self.path, e))?;
        }
        if fsync {
            self.file
                .sync_all()
                .map_err(|e| Error::local("flushing", &self.path, e))?;
        }
        // What the filesystem kept (it may round), read before the rename while the
        // file is surely this one.
        let mtime = self.file.metadata().ok().and_then(|m| m.modified().ok());
        std::fs::rename(&self.path, dest)
            .map_err(|e| Error::local("renaming into place", dest, e))?;
        self.done = true;
        Ok(mtime)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Runs blocking file work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Runtime {
            what: "a file task failed",
            source: io::Error::other(e),
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_sources_are_percent_encoded() {
        let url = S3Url {
            store: None,
            bucket: "lab".into(),
            key: "a b/+%#/ü.txt".into(),
        };
        assert_eq!(copy_source(&url), "lab/a%20b/%2B%25%23/%C3%BC.txt");
    }
}
