//! The S3 client of each target: the target's own keys over the `[s3]` table over `AWS_*`,
//! so a local store and an off-site one can differ in endpoint, region, credentials,
//! addressing and storage class.
//!
//! A storage class is set by an interceptor on the two requests that create objects
//! (`PutObject`, `CreateMultipartUpload`), before signing, so labcore's upload needs no option
//! for it and the header is covered by the signature. Parts and other requests never carry it:
//! S3 rejects it on `UploadPart`.

use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextMut;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use labcore::Env;
use labcore::s3::S3Settings;

use crate::Error;
use crate::config::{Config, Target};

/// Builds the client for an S3 target.
pub(crate) async fn client(
    config: &Config,
    target: &Target,
    env: &Env,
) -> Result<aws_sdk_s3::Client, Error> {
    let table = config.s3.as_ref().map(|t| (t, &config.file));
    let mut settings = S3Settings::resolve(&target.s3.args, table, env)?;
    if let Some((id, secret)) = &target.s3.credentials {
        settings = settings.credentials(id.clone(), secret.clone());
    }
    let mut builder = settings.sdk_config().await?;
    if let Some(class) = &target.s3.storage_class {
        builder = builder.interceptor(StorageClass(class.clone()));
    }
    Ok(aws_sdk_s3::Client::from_conf(builder.build()))
}

/// Adds `x-amz-storage-class` to the requests that create an object.
#[derive(Debug)]
struct StorageClass(String);

impl Intercept for StorageClass {
    fn name(&self) -> &'static str {
        "backupd storage class"
    }

    fn modify_before_signing(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let request = context.request_mut();
        if creates_object(request.method(), request.uri()) {
            request
                .headers_mut()
                .insert("x-amz-storage-class", self.0.clone());
        }
        Ok(())
    }
}

/// `PutObject` is a PUT without `partNumber` (that is `UploadPart`);
/// `CreateMultipartUpload` is a POST with `uploads` and no `uploadId` (that is the completion).
fn creates_object(method: &str, uri: &str) -> bool {
    let query = uri.split_once('?').map_or("", |(_, q)| q);
    let has = |name: &str| {
        query
            .split('&')
            .any(|pair| pair.split('=').next() == Some(name))
    };
    match method {
        "PUT" => !has("partNumber"),
        "POST" => has("uploads") && !has("uploadId"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_object_creating_requests_get_the_storage_class() {
        assert!(creates_object("PUT", "http://s3/b/k"));
        assert!(creates_object("POST", "http://s3/b/k?uploads"));
        assert!(creates_object("POST", "http://s3/b/k?uploads="));
        assert!(!creates_object(
            "PUT",
            "http://s3/b/k?partNumber=1&uploadId=x"
        ));
        assert!(!creates_object("POST", "http://s3/b/k?uploadId=x"));
        assert!(!creates_object("POST", "http://s3/b?delete"));
        assert!(!creates_object("GET", "http://s3/b/k"));
        assert!(!creates_object("DELETE", "http://s3/b/k"));
    }
}
