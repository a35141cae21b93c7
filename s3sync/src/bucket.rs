//! Commands on buckets and their objects that move no file data: `ls`, `rm`, `mb`, and the
//! bucket check every write starts with.

use std::io::Write;

use aws_sdk_s3::Client;
use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
use aws_smithy_types::date_time::Format as DateFormat;
use labcore::{Exit, Format};
use serde_json::json;

use crate::error::Error;
use crate::location::S3Url;
use crate::report::{Action, Report};
use crate::sync::delete_objects;
use crate::transfer::Transfers;

/// Fails early, with the right exit status, when a bucket is missing or refused: before a
/// single byte of standard input is read or a file is opened.
pub(crate) async fn check_bucket(client: &Client, bucket: &str) -> Result<(), Error> {
    client
        .head_bucket()
        .bucket(bucket)
        .send()
        .await
        .map(|_| ())
        .map_err(|err| {
            let mut error = Error::s3("HeadBucket", format!("s3://{bucket}"), &err);
            // HEAD answers have no body, so the status code is all there is to go on.
            if let (Error::S3 { exit, detail, .. }, Some(status)) =
                (&mut error, err.raw_response().map(|r| r.status().as_u16()))
            {
                match status {
                    404 => {
                        *exit = Exit::NoInput;
                        *detail = "NoSuchBucket: the bucket does not exist".into();
                    }
                    403 => {
                        *exit = Exit::NoPerm;
                        *detail = "access denied: the credentials were refused or lack \
                                   permission for this bucket"
                            .into();
                    }
                    _ => {}
                }
            }
            error
        })
}

fn date(time: Option<&aws_smithy_types::DateTime>) -> String {
    time.and_then(|t| t.fmt(DateFormat::DateTime).ok())
        .unwrap_or_else(|| "-".into())
}

fn print(line: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes())
        .and_then(|()| out.write_all(b"\n"))
        .map_err(|source| Error::Stdio {
            action: "writing",
            stream: "output",
            source,
        })
}

/// `s3sync ls`: buckets, or one level (or all levels) of objects under a prefix.
pub(crate) async fn ls(
    client: &Client,
    url: Option<&S3Url>,
    recursive: bool,
    format: Format,
) -> Result<(), Error> {
    let Some(url) = url else {
        let out = client
            .list_buckets()
            .send()
            .await
            .map_err(|e| Error::s3("ListBuckets", "s3://", &e))?;
        for bucket in out.buckets() {
            let name = bucket.name().unwrap_or_default();
            let line = match format {
                Format::Json => {
                    json!({"bucket": name, "created": date(bucket.creation_date())}).to_string()
                }
                Format::Text => format!("{}  {name}", date(bucket.creation_date())),
            };
            print(&line)?;
        }
        return Ok(());
    };
    let prefix = if recursive || url.is_folder() {
        url.as_prefix()
    } else {
        url.key.clone()
    };
    let mut request = client.list_objects_v2().bucket(&url.bucket).prefix(&prefix);
    if !recursive {
        request = request.delimiter("/");
    }
    let mut pages = request.into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| Error::s3("ListObjectsV2", url.to_string(), &e))?;
        for common in page.common_prefixes() {
            let name = common.prefix().unwrap_or_default();
            let line = match format {
                Format::Json => json!({"prefix": name}).to_string(),
                Format::Text => format!("{:>20}  {:>12}  {name}", "", "PRE"),
            };
            print(&line)?;
        }
        for object in page.contents() {
            let key = object.key().unwrap_or_default();
            let size = object.size().unwrap_or(0);
            let line = match format {
                Format::Json => json!({
                    "key": key,
                    "size": size,
                    "last_modified": date(object.last_modified()),
                    "etag": object.e_tag(),
                })
                .to_string(),
                Format::Text => format!("{:>20}  {size:>12}  {key}", date(object.last_modified())),
            };
            print(&line)?;
        }
    }
    Ok(())
}

/// `s3sync rm`: one object (which must exist), or everything under a prefix.
pub(crate) async fn rm(
    t: &Transfers,
    report: &mut Report,
    url: &S3Url,
    recursive: bool,
    dry_run: bool,
) -> Result<(), Error> {
    let urls: Vec<S3Url> = if recursive {
        let prefix = url.as_prefix();
        let mut urls = Vec::new();
        let mut pages = t
            .client(url)
            .list_objects_v2()
            .bucket(&url.bucket)
            .prefix(&prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| Error::s3("ListObjectsV2", url.to_string(), &e))?;
            urls.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .map(|k| url.with_key(k)),
            );
        }
        if urls.is_empty() {
            return Err(Error::S3 {
                operation: "ListObjectsV2",
                target: url.with_key(prefix).to_string(),
                detail: "no objects under this prefix".into(),
                exit: Exit::NoInput,
            });
        }
        urls
    } else {
        if url.key.is_empty() || url.key.ends_with('/') {
            return Err(Error::Usage(format!(
                "{url} names a prefix: use rm -r to delete everything under it"
            )));
        }
        // DeleteObject succeeds for missing keys; a typo deserves an error instead.
        t.head(url).await?;
        vec![url.clone()]
    };
    if dry_run {
        for url in &urls {
            report.plan(Action::Delete, None, &url.to_string(), None);
        }
        return Ok(());
    }
    delete_objects(t, report, &urls).await?;
    if report.failed > 0 {
        return Err(Error::Partial {
            failed: report.failed,
            total: urls.len(),
            deletes_skipped: 0,
        });
    }
    Ok(())
}

/// `s3sync mb`: makes a bucket in the client's region; one already ours is fine.
pub(crate) async fn mb(client: &Client, url: &S3Url) -> Result<(), Error> {
    if !url.key.is_empty() {
        return Err(Error::Usage(format!(
            "{url}: mb takes a bucket, s3://BUCKET"
        )));
    }
    let mut request = client.create_bucket().bucket(&url.bucket);
    let region = client.config().region().map(|r| r.as_ref().to_owned());
    if let Some(region) = region.filter(|r| r != labcore::s3::DEFAULT_REGION) {
        request = request.create_bucket_configuration(
            CreateBucketConfiguration::builder()
                .location_constraint(BucketLocationConstraint::from(region.as_str()))
                .build(),
        );
    }
    match request.send().await {
        Ok(_) => {
            tracing::info!(bucket = %url.bucket, "bucket made");
            Ok(())
        }
        Err(err) => {
            let code = err
                .as_service_error()
                .and_then(|e| aws_sdk_s3::error::ProvideErrorMetadata::code(e).map(str::to_owned));
            match code.as_deref() {
                Some("BucketAlreadyOwnedByYou") => {
                    tracing::info!(bucket = %url.bucket, "bucket exists already and is yours");
                    Ok(())
                }
                Some("BucketAlreadyExists") => Err(Error::S3 {
                    operation: "CreateBucket",
                    target: url.to_string(),
                    detail: "BucketAlreadyExists: the name is taken by another account".into(),
                    exit: Exit::CantCreate,
                }),
                _ => Err(Error::s3("CreateBucket", url.to_string(), &err)),
            }
        }
    }
}
