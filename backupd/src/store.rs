//! Targets: where backup objects are written, listed, read and deleted.
//!
//! An S3 target streams objects through labcore's multipart upload and checks the stored
//! size afterwards; a folder target writes to a hidden temporary file beside the final name,
//! fsyncs it and renames it into place, so a crash or a full disk never leaves a partial file
//! under a real name. Both report the size and SHA-256 of exactly what was stored.

use std::io;
use std::path::{Path, PathBuf};

use aws_sdk_s3::primitives::ByteStream;
use labcore::s3::upload::{UploadError, UploadOptions, upload};
use labcore::{Exit, ExitStatus};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::config::TargetUrl;
use crate::pipeline::hex;

/// What a write stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// Bytes.
    pub size: u64,
    /// SHA-256 (hex).
    pub sha256: String,
}

/// A target, opened.
#[derive(Clone, Debug)]
pub enum Store {
    /// A bucket and prefix.
    S3 {
        /// Client.
        client: aws_sdk_s3::Client,
        /// Bucket.
        bucket: String,
        /// Prefix (no leading or trailing slash; may be empty).
        prefix: String,
    },
    /// A local folder.
    Dir(PathBuf),
}

/// A target operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Uploading failed.
    #[error(transparent)]
    Upload(Box<UploadError>),
    /// Another S3 request failed.
    #[error("{operation} {location}: {detail}")]
    S3 {
        /// The operation.
        operation: &'static str,
        /// `s3://bucket/key`.
        location: String,
        /// The store's error.
        detail: String,
        /// The exit status it deserves.
        exit: Exit,
    },
    /// The stored object is not what was sent.
    #[error("{location}: stored {stored} bytes but sent {sent}")]
    SizeMismatch {
        /// Where.
        location: String,
        /// Bytes the store reports.
        stored: u64,
        /// Bytes sent.
        sent: u64,
    },
    /// A local file operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// Reading the data to store failed.
    #[error("reading the data for {location}")]
    Read {
        /// Where it was going.
        location: String,
        /// What the reader said.
        source: io::Error,
    },
    /// The object does not exist.
    #[error("{0} does not exist")]
    NotFound(String),
}

impl From<UploadError> for StoreError {
    fn from(err: UploadError) -> StoreError {
        StoreError::Upload(Box::new(err))
    }
}

impl ExitStatus for StoreError {
    fn exit(&self) -> Exit {
        match self {
            StoreError::Upload(e) => e.exit(),
            StoreError::S3 { exit, .. } => *exit,
            StoreError::SizeMismatch { .. } => Exit::IoErr,
            StoreError::Io { source, .. } => match source.kind() {
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => Exit::CantCreate,
                _ => Exit::from_io(source),
            },
            StoreError::Read { source, .. } => Exit::from_io(source),
            StoreError::NotFound(_) => Exit::NoInput,
        }
    }
}

fn s3_error<E, R>(
    operation: &'static str,
    location: String,
    err: &aws_sdk_s3::error::SdkError<E, R>,
) -> StoreError
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    StoreError::S3 {
        operation,
        location,
        detail: labcore::s3::upload::describe(err),
        exit: labcore::s3::exit_for(err),
    }
}

impl Store {
    /// Opens a target (S3 targets need a client).
    pub fn open(url: &TargetUrl, client: Option<&aws_sdk_s3::Client>) -> Store {
        match (url, client) {
            (TargetUrl::S3 { bucket, prefix }, Some(client)) => Store::S3 {
                client: client.clone(),
                bucket: bucket.clone(),
                prefix: prefix.clone(),
            },
            (TargetUrl::Dir(dir), _) => Store::Dir(dir.clone()),
            (TargetUrl::S3 { .. }, None) => {
                unreachable!("callers build an S3 client for S3 targets")
            }
        }
    }

    /// Where `key` lives, for messages.
    pub fn location(&self, key: &str) -> String {
        match self {
            Store::S3 { bucket, .. } => format!("s3://{bucket}/{}", self.s3_key(key)),
            Store::Dir(dir) => dir.join(key).display().to_string(),
        }
    }

    fn s3_key(&self, key: &str) -> String {
        match self {
            Store::S3 { prefix, .. } if !prefix.is_empty() => format!("{prefix}/{key}"),
            _ => key.to_owned(),
        }
    }

    /// Stores everything `reader` yields at `key`.
    pub async fn put_stream<R: AsyncRead + Unpin>(
        &self,
        key: &str,
        mut reader: R,
    ) -> Result<Stored, StoreError> {
        match self {
            Store::S3 { client, bucket, .. } => {
                let s3_key = self.s3_key(key);
                // Two parts in flight keep backupd's memory small; the pipeline feeds slower
                // than the store drains on a lab network anyway.
                let options = UploadOptions {
                    concurrency: 2,
                    ..UploadOptions::default()
                };
                let uploaded = upload(client, bucket, &s3_key, reader, &options).await?;
                let head = client
                    .head_object()
                    .bucket(bucket)
                    .key(&s3_key)
                    .send()
                    .await
                    .map_err(|e| s3_error("HeadObject", self.location(key), &e))?;
                let stored = head.content_length().unwrap_or(-1);
                if stored != uploaded.size as i64 {
                    return Err(StoreError::SizeMismatch {
                        location: self.location(key),
                        stored: stored.max(0) as u64,
                        sent: uploaded.size,
                    });
                }
                Ok(Stored {
                    size: uploaded.size,
                    sha256: uploaded.sha256_hex(),
                })
            }
            Store::Dir(dir) => {
                let path = dir.join(key);
                let io_err = |what, path: &Path| {
                    let path = path.to_owned();
                    move |source| StoreError::Io { what, path, source }
                };
                let parent = path.parent().unwrap_or(dir).to_owned();
                tokio::fs::create_dir_all(&parent)
                    .await
                    .map_err(io_err("creating folder", &parent))?;
                let temp = temp_name(&path);
                let mut file = tokio::fs::File::create(&temp)
                    .await
                    .map_err(io_err("creating", &temp))?;
                let written = async {
                    let mut hasher = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
                    let mut size = 0u64;
                    let mut buf = vec![0u8; 256 * 1024];
                    loop {
                        let n = reader
                            .read(&mut buf)
                            .await
                            .map_err(|source| StoreError::Read {
                                location: path.display().to_string(),
                                source,
                            })?;
                        if n == 0 {
                            break;
                        }
                        hasher.update(&buf[..n]);
                        file.write_all(&buf[..n])
                            .await
                            .map_err(io_err("writing", &temp))?;
                        size += n as u64;
                    }
                    file.sync_all().await.map_err(io_err("syncing", &temp))?;
                    Ok::<_, StoreError>(Stored {
                        size,
                        sha256: hex(hasher.finish().as_ref()),
                    })
                }
                .await;
                drop(file);
                match written {
                    Ok(stored) => {
                        tokio::fs::rename(&temp, &path)
                            .await
                            .map_err(io_err("renaming into place", &path))?;
                        sync_dir(&parent).await;
                        Ok(stored)
                    }
                    Err(err) => {
                        let _ = tokio::fs::remove_file(&temp).await;
                        Err(err)
                    }
                }
            }
        }
    }

    /// Stores a small object (a manifest) at `key`, atomically.
    pub async fn put_bytes(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        match self {
            Store::S3 { client, bucket, .. } => {
                client
                    .put_object()
                    .bucket(bucket)
                    .key(self.s3_key(key))
                    .content_type("application/json")
                    .content_length(bytes.len() as i64)
                    .body(ByteStream::from(bytes))
                    .send()
                    .await
                    .map_err(|e| s3_error("PutObject", self.location(key), &e))?;
                Ok(())
            }
            Store::Dir(_) => self.put_stream(key, &bytes[..]).await.map(|_| ()),
        }
    }

    /// Reads the object at `key` as a stream.
    pub async fn get_stream(
        &self,
        key: &str,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, StoreError> {
        match self {
            Store::S3 { client, bucket, .. } => {
                let object = client
                    .get_object()
                    .bucket(bucket)
                    .key(self.s3_key(key))
                    .send()
                    .await
                    .map_err(|e| match labcore::s3::exit_for(&e) {
                        Exit::NoInput => StoreError::NotFound(self.location(key)),
                        _ => s3_error("GetObject", self.location(key), &e),
                    })?;
                Ok(Box::new(object.body.into_async_read()))
            }
            Store::Dir(dir) => {
                let path = dir.join(key);
                match tokio::fs::File::open(&path).await {
                    Ok(file) => Ok(Box::new(file)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        Err(StoreError::NotFound(self.location(key)))
                    }
                    Err(source) => Err(StoreError::Io {
                        what: "opening",
                        path,
                        source,
                    }),
                }
            }
        }
    }

    /// When the object at `key` was stored (seconds since the epoch), or `None` if it does
    /// not exist.
    pub async fn modified(&self, key: &str) -> Result<Option<i64>, StoreError> {
        match self {
            Store::S3 { client, bucket, .. } => {
                let head = client
                    .head_object()
                    .bucket(bucket)
                    .key(self.s3_key(key))
                    .send()
                    .await;
                match head {
                    Ok(head) => Ok(head.last_modified().map(|t| t.secs())),
                    Err(e) if labcore::s3::exit_for(&e) == Exit::NoInput => Ok(None),
                    Err(e) => Err(s3_error("HeadObject", self.location(key), &e)),
                }
            }
            Store::Dir(dir) => {
                let path = dir.join(key);
                match tokio::fs::metadata(&path).await {
                    Ok(meta) => Ok(meta
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .and_then(|d| i64::try_from(d.as_secs()).ok())),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(source) => Err(StoreError::Io {
                        what: "inspecting",
                        path,
                        source,
                    }),
                }
            }
        }
    }

    /// Reads a small object, or `None` if it does not exist.
    pub async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut reader = match self.get_stream(key).await {
            Ok(reader) => reader,
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(err) => return Err(err),
        };
        let mut bytes = Vec::new();
        reader
            .read_to_end(&mut bytes)
            .await
            .map_err(|source| StoreError::Read {
                location: self.location(key),
                source,
            })?;
        Ok(Some(bytes))
    }

    /// Every object key under the target, relative to its root, sorted.
    pub async fn list(&self) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        match self {
            Store::S3 {
                client,
                bucket,
                prefix,
            } => {
                let mut pages = client
                    .list_objects_v2()
                    .bucket(bucket)
                    .set_prefix((!prefix.is_empty()).then(|| format!("{prefix}/")))
                    .into_paginator()
                    .send();
                while let Some(page) = pages.next().await {
                    let page =
                        page.map_err(|e| s3_error("ListObjectsV2", self.location(""), &e))?;
                    for object in page.contents() {
                        if let Some(key) = object.key() {
                            let relative = if prefix.is_empty() {
                                key
                            } else {
                                key.strip_prefix(prefix.as_str())
                                    .and_then(|k| k.strip_prefix('/'))
                                    .unwrap_or(key)
                            };
                            keys.push(relative.to_owned());
                        }
                    }
                }
            }
            Store::Dir(dir) => {
                if !dir.exists() {
                    return Ok(keys);
                }
                let mut pending = vec![dir.clone()];
                while let Some(folder) = pending.pop() {
                    let mut entries =
                        tokio::fs::read_dir(&folder)
                            .await
                            .map_err(|source| StoreError::Io {
                                what: "listing",
                                path: folder.clone(),
                                source,
                            })?;
                    while let Some(entry) =
                        entries
                            .next_entry()
                            .await
                            .map_err(|source| StoreError::Io {
                                what: "listing",
                                path: folder.clone(),
                                source,
                            })?
                    {
                        let path = entry.path();
                        let kind = entry.file_type().await.map_err(|source| StoreError::Io {
                            what: "inspecting",
                            path: path.clone(),
                            source,
                        })?;
                        if kind.is_dir() {
                            pending.push(path);
                        } else if let Ok(relative) = path.strip_prefix(dir) {
                            keys.push(relative.to_string_lossy().into_owned());
                        }
                    }
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Deletes objects (missing ones are fine); empty folders of a folder target go too.
    pub async fn delete(&self, keys: &[String]) -> Result<(), StoreError> {
        match self {
            Store::S3 { client, bucket, .. } => {
                for key in keys {
                    client
                        .delete_object()
                        .bucket(bucket)
                        .key(self.s3_key(key))
                        .send()
                        .await
                        .map_err(|e| s3_error("DeleteObject", self.location(key), &e))?;
                }
            }
            Store::Dir(dir) => {
                for key in keys {
                    let path = dir.join(key);
                    match tokio::fs::remove_file(&path).await {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(source) => {
                            return Err(StoreError::Io {
                                what: "deleting",
                                path,
                                source,
                            });
                        }
                    }
                    // Remove now-empty parents up to the target's root.
                    let mut parent = path.parent();
                    while let Some(folder) = parent {
                        if folder == dir.as_path() || tokio::fs::remove_dir(folder).await.is_err() {
                            break;
                        }
                        parent = folder.parent();
                    }
                }
            }
        }
        Ok(())
    }
}

/// `.NAME.partial-RANDOM` beside `path`.
fn temp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial-{:08x}", rand::random::<u32>()))
}

/// Makes a rename durable (best effort: some filesystems refuse to fsync folders).
async fn sync_dir(dir: &Path) {
    if let Ok(folder) = tokio::fs::File::open(dir).await {
        let _ = folder.sync_all().await;
    }
}
