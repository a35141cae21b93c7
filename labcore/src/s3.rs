//! S3 connection settings and the client every labkit tool builds from them.
//!
//! Settings come, first match wins, from command-line flags ([`S3Args`]), a `[s3]` table in
//! the tool's config ([`S3Config`]), the `AWS_*` environment, then `~/.aws/config` profiles.
//! The client is built for any S3 store (MinIO, Garage, Ceph RGW, AWS):
//!
//! - Path-style addressing (`ENDPOINT/BUCKET/KEY`) for every custom endpoint except
//!   `*.amazonaws.com`: self-hosted stores rarely have wildcard DNS for virtual hosts.
//! - Checksums only where the S3 API requires them (`WhenRequired`). aws-sdk-s3's default since
//!   1.69 sends streamed uploads as `aws-chunked` bodies with trailing CRC checksums, which some
//!   S3-compatible stores reject ("Invalid payload signature"). The tools check integrity
//!   themselves: object sizes after every transfer, and sha256 sums where they keep manifests.
//! - Up to 5 attempts per request with the SDK's backoff; 10 s to connect, 300 s to answer.
//! - Extra trusted roots from `ca_bundle` / `--ca-bundle` / `AWS_CA_BUNDLE`, beside the system's.

pub mod upload;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_http_client::tls;
use serde::Deserialize;

use crate::config::{ConfigError, ConfigFile};
use crate::env::Env;
use crate::exit::{Exit, ExitStatus};
use crate::secret::Secret;

/// The region used when nothing names one: what MinIO and most self-hosted stores expect.
pub const DEFAULT_REGION: &str = "us-east-1";

/// The `[s3]` table of a labkit config.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL, such as `http://127.0.0.1:9000`.
    pub endpoint: Option<String>,
    /// Region name.
    pub region: Option<String>,
    /// Force path-style (`true`) or virtual-hosted (`false`) addressing.
    pub path_style: Option<bool>,
    /// A profile from `~/.aws/config`.
    pub profile: Option<String>,
    /// Access key ID.
    pub access_key_id: Option<String>,
    /// Secret access key, inline.
    pub secret_access_key: Option<Secret>,
    /// Secret access key, from a file.
    pub secret_access_key_file: Option<PathBuf>,
    /// Extra PEM roots to trust (a private CA in front of the store).
    pub ca_bundle: Option<PathBuf>,
}

/// The S3 flags of a tool that talks to S3. Credentials are never flags: argv is public.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct S3Args {
    /// S3 endpoint URL, e.g. http://127.0.0.1:9000 for a local MinIO
    /// [env: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL]
    #[arg(long, value_name = "URL", global = true)]
    pub endpoint: Option<String>,

    /// S3 region [env: AWS_REGION, AWS_DEFAULT_REGION] [default: from the profile, else us-east-1]
    #[arg(long, value_name = "NAME", global = true)]
    pub region: Option<String>,

    /// Profile in ~/.aws/config and ~/.aws/credentials [env: AWS_PROFILE]
    #[arg(long, value_name = "NAME", global = true)]
    pub profile: Option<String>,

    /// Address buckets as ENDPOINT/BUCKET (the default for endpoints outside amazonaws.com)
    #[arg(long, global = true, conflicts_with = "virtual_hosted")]
    pub path_style: bool,

    /// Address buckets as BUCKET.ENDPOINT (the default for amazonaws.com)
    #[arg(long, global = true)]
    pub virtual_hosted: bool,

    /// Extra CA certificates (PEM) to trust for the endpoint [env: AWS_CA_BUNDLE]
    #[arg(long, value_name = "FILE", global = true)]
    pub ca_bundle: Option<PathBuf>,
}

/// A fixed access key.
#[derive(Clone, Debug)]
pub struct StaticCredentials {
    /// Access key ID (not secret: it shows in server logs).
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: Secret,
    /// Session token for temporary credentials.
    pub session_token: Option<Secret>,
}

/// Resolved S3 settings, ready to build a client.
#[derive(Clone, Debug, Default)]
pub struct S3Settings {
    endpoint: Option<String>,
    region: Option<String>,
    path_style: Option<bool>,
    profile: Option<String>,
    credentials: Option<StaticCredentials>,
    ca_bundle: Option<PathBuf>,
}

/// Why S3 settings or a client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum S3SettingsError {
    /// The endpoint is not an http(s) URL.
    #[error("invalid S3 endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// What was given.
        endpoint: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Only half of an access key was given.
    #[error("{0}: both an access key ID and a secret access key are needed")]
    HalfCredentials(&'static str),
    /// The CA bundle could not be read or used.
    #[error("reading CA bundle {}", path.display())]
    CaBundle {
        /// The bundle file.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// The `[s3]` table of the config is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl ExitStatus for S3SettingsError {
    fn exit(&self) -> Exit {
        match self {
            S3SettingsError::Endpoint { .. } | S3SettingsError::HalfCredentials(_) => Exit::Config,
            S3SettingsError::CaBundle { source, .. } => Exit::from_io(source),
            S3SettingsError::Config(err) => err.exit(),
        }
    }
}

impl S3Settings {
    /// Settings with nothing chosen: everything comes from the environment and profiles.
    pub fn new() -> S3Settings {
        S3Settings::default()
    }

    /// Resolves flags, then the config's `[s3]` table, then the environment.
    pub fn resolve(
        args: &S3Args,
        config: Option<(&S3Config, &ConfigFile)>,
        env: &Env,
    ) -> Result<S3Settings, S3SettingsError> {
        let table = config.map(|(table, _)| table);
        let pick = |flag: &Option<String>, key: fn(&S3Config) -> &Option<String>| {
            flag.clone().or_else(|| table.and_then(|t| key(t).clone()))
        };
        let endpoint = pick(&args.endpoint, |t| &t.endpoint).or_else(|| {
            env.get("AWS_ENDPOINT_URL_S3")
                .or_else(|| env.get("AWS_ENDPOINT_URL"))
                .map(str::to_owned)
        });
        let region = pick(&args.region, |t| &t.region).or_else(|| {
            env.get("AWS_REGION")
                .or_else(|| env.get("AWS_DEFAULT_REGION"))
                .map(str::to_owned)
        });
        let profile = pick(&args.profile, |t| &t.profile)
            .or_else(|| env.get("AWS_PROFILE").map(str::to_owned));
        let path_style = match (args.path_style, args.virtual_hosted) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => table.and_then(|t| t.path_style),
        };
        let ca_bundle = args
            .ca_bundle
            .clone()
            .or_else(|| {
                config.and_then(|(t, file)| t.ca_bundle.as_deref().map(|p| file.resolve_path(p)))
            })
            .or_else(|| env.path("AWS_CA_BUNDLE"));

        let mut credentials = None;
        if let Some((table, file)) = config {
            let secret = file.secret(
                env,
                "s3.secret_access_key",
                table.secret_access_key.clone(),
                table.secret_access_key_file.as_deref(),
            )?;
            credentials = match (&table.access_key_id, secret) {
                (Some(id), Some(secret)) => Some(StaticCredentials {
                    access_key_id: id.clone(),
                    secret_access_key: secret,
                    session_token: None,
                }),
                (None, None) => None,
                _ => return Err(S3SettingsError::HalfCredentials("the [s3] table")),
            };
        }
        if credentials.is_none() {
            credentials = match (
                env.get("AWS_ACCESS_KEY_ID"),
                env.get("AWS_SECRET_ACCESS_KEY"),
            ) {
                (Some(id), Some(secret)) => Some(StaticCredentials {
                    access_key_id: id.to_owned(),
                    secret_access_key: Secret::from(secret),
                    session_token: env.get("AWS_SESSION_TOKEN").map(Secret::from),
                }),
                (None, None) => None,
                _ => return Err(S3SettingsError::HalfCredentials("the AWS_* environment")),
            };
        }

        let settings = S3Settings {
            endpoint,
            region,
            path_style,
            profile,
            credentials,
            ca_bundle,
        };
        settings.check_endpoint()?;
        Ok(settings)
    }

    /// Sets the endpoint URL.
    pub fn endpoint(mut self, url: impl Into<String>) -> S3Settings {
        self.endpoint = Some(url.into());
        self
    }

    /// Sets the region.
    pub fn region(mut self, region: impl Into<String>) -> S3Settings {
        self.region = Some(region.into());
        self
    }

    /// Sets a fixed access key.
    pub fn credentials(mut self, access_key_id: impl Into<String>, secret: Secret) -> S3Settings {
        self.credentials = Some(StaticCredentials {
            access_key_id: access_key_id.into(),
            secret_access_key: secret,
            session_token: None,
        });
        self
    }

    /// Forces path-style (`true`) or virtual-hosted (`false`) addressing.
    pub fn force_path_style(mut self, path_style: bool) -> S3Settings {
        self.path_style = Some(path_style);
        self
    }

    /// The endpoint URL, if one was set.
    pub fn endpoint_url(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// Whether buckets are addressed path-style.
    pub fn path_style(&self) -> bool {
        self.path_style.unwrap_or_else(|| match &self.endpoint {
            None => false,
            Some(url) => !endpoint_host(url).is_some_and(|h| h.ends_with(".amazonaws.com")),
        })
    }

    fn check_endpoint(&self) -> Result<(), S3SettingsError> {
        let Some(url) = &self.endpoint else {
            return Ok(());
        };
        let bad = |reason| {
            Err(S3SettingsError::Endpoint {
                endpoint: url.clone(),
                reason,
            })
        };
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return bad("it must start with http:// or https://");
        }
        match endpoint_host(url) {
            Some(host) if !host.is_empty() => Ok(()),
            _ => bad("it names no host"),
        }
    }

    /// The SDK configuration builder, for callers that tune retries or timeouts further.
    pub async fn sdk_config(&self) -> Result<aws_sdk_s3::config::Builder, S3SettingsError> {
        self.check_endpoint()?;
        let mut builder = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .force_path_style(self.path_style())
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            // Self-hosted stores restart and throttle; parts are worth retrying a few times.
            .retry_config(RetryConfig::standard().with_max_attempts(5))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .read_timeout(Duration::from_secs(300))
                    .build(),
            );
        if let Some(endpoint) = &self.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        let region = match &self.region {
            Some(region) => Region::new(region.clone()),
            None => {
                let mut chain = aws_config::profile::region::ProfileFileRegionProvider::builder();
                if let Some(profile) = &self.profile {
                    chain = chain.profile_name(profile);
                }
                use aws_config::meta::region::ProvideRegion;
                chain
                    .build()
                    .region()
                    .await
                    .unwrap_or_else(|| Region::new(DEFAULT_REGION))
            }
        };
        builder = builder.region(region.clone());
        match &self.credentials {
            Some(creds) => {
                builder = builder.credentials_provider(Credentials::new(
                    &creds.access_key_id,
                    creds.secret_access_key.expose(),
                    creds.session_token.as_ref().map(|t| t.expose().to_owned()),
                    None,
                    "labkit",
                ));
            }
            None => {
                let mut chain =
                    aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
                        .region(region);
                if let Some(profile) = &self.profile {
                    chain = chain.profile_name(profile);
                }
                builder = builder.credentials_provider(chain.build().await);
            }
        }
        if let Some(path) = &self.ca_bundle {
            builder = builder.http_client(https_client_trusting(path)?);
        }
        Ok(builder)
    }

    /// A ready S3 client.
    pub async fn client(&self) -> Result<aws_sdk_s3::Client, S3SettingsError> {
        Ok(aws_sdk_s3::Client::from_conf(
            self.sdk_config().await?.build(),
        ))
    }
}

fn https_client_trusting(
    path: &Path,
) -> Result<aws_smithy_runtime_api::client::http::SharedHttpClient, S3SettingsError> {
    let ca_error = |source| S3SettingsError::CaBundle {
        path: path.to_owned(),
        source,
    };
    let pem = fs::read(path).map_err(ca_error)?;
    let context = tls::TlsContext::builder()
        .with_trust_store(tls::TrustStore::default().with_pem_certificate(pem))
        .build()
        .map_err(|e| ca_error(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    Ok(aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::AwsLc,
        ))
        .tls_context(context)
        .build_https())
}

/// The host part of an endpoint URL.
fn endpoint_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(v6) = host_port.strip_prefix('[') {
        return v6.split_once(']').map(|(h, _)| h);
    }
    Some(host_port.split(':').next().unwrap_or(host_port))
}

/// The exit status an S3 request failure deserves: a missing bucket or key is 66, refused
/// credentials 77, an unreachable or failing store 69, throttling 75.
pub fn exit_for<E, R>(err: &SdkError<E, R>) -> Exit
where
    E: ProvideErrorMetadata,
{
    match err {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => Exit::Unavailable,
        SdkError::ConstructionFailure(_) => Exit::Software,
        SdkError::ResponseError(_) => Exit::Unavailable,
        SdkError::ServiceError(service) => exit_for_code(service.err().code()),
        _ => Exit::Unavailable,
    }
}

/// The exit status for an S3 error code such as `NoSuchBucket` or `AccessDenied`.
pub fn exit_for_code(code: Option<&str>) -> Exit {
    match code.unwrap_or("") {
        "NoSuchBucket" | "NoSuchKey" | "NotFound" | "NoSuchUpload" => Exit::NoInput,
        "AccessDenied"
        | "InvalidAccessKeyId"
        | "SignatureDoesNotMatch"
        | "Forbidden"
        | "ExpiredToken"
        | "InvalidToken"
        | "AllAccessDisabled" => Exit::NoPerm,
        "SlowDown"
        | "Throttling"
        | "ThrottlingException"
        | "RequestTimeout"
        | "ServiceUnavailable"
        | "InternalError" => Exit::TempFail,
        "InvalidBucketName" | "KeyTooLongError" | "InvalidArgument" => Exit::DataErr,
        _ => Exit::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_endpoints_default_to_path_style() {
        let local = S3Settings::new().endpoint("http://127.0.0.1:9000");
        assert!(local.path_style());
        assert!(
            S3Settings::new()
                .endpoint("http://minio.lan:9000")
                .path_style()
        );
        assert!(S3Settings::new().endpoint("http://[::1]:9000").path_style());
        assert!(
            !S3Settings::new()
                .endpoint("https://s3.eu-west-1.amazonaws.com")
                .path_style()
        );
        assert!(!S3Settings::new().path_style());
        assert!(!local.force_path_style(false).path_style());
    }

    #[test]
    fn flags_beat_config_beats_environment() {
        let env = Env::from_pairs([
            ("AWS_ENDPOINT_URL", "http://from-env:1"),
            ("AWS_REGION", "env-region"),
            ("AWS_ACCESS_KEY_ID", "ENVKEY"),
            ("AWS_SECRET_ACCESS_KEY", "envsecret"),
        ]);
        let table = S3Config {
            endpoint: Some("http://from-config:2".into()),
            access_key_id: Some("CFGKEY".into()),
            secret_access_key: Some("cfgsecret".into()),
            ..S3Config::default()
        };
        let file = ConfigFile::new(Path::new("/etc/labkit/backupd.toml"));
        let args = S3Args {
            endpoint: Some("http://from-flag:3".into()),
            ..S3Args::default()
        };
        let s = S3Settings::resolve(&args, Some((&table, &file)), &env).unwrap();
        assert_eq!(s.endpoint_url(), Some("http://from-flag:3"));
        assert_eq!(s.region.as_deref(), Some("env-region"));
        assert_eq!(s.credentials.as_ref().unwrap().access_key_id, "CFGKEY");
        let s = S3Settings::resolve(&S3Args::default(), None, &env).unwrap();
        assert_eq!(s.endpoint_url(), Some("http://from-env:1"));
        assert_eq!(s.credentials.as_ref().unwrap().access_key_id, "ENVKEY");
        assert!(!format!("{s:?}").contains("envsecret"));
    }

    #[test]
    fn specific_endpoint_variable_beats_the_generic_one() {
        let env = Env::from_pairs([
            ("AWS_ENDPOINT_URL", "http://generic:1"),
            ("AWS_ENDPOINT_URL_S3", "http://s3-only:2"),
        ]);
        let s = S3Settings::resolve(&S3Args::default(), None, &env).unwrap();
        assert_eq!(s.endpoint_url(), Some("http://s3-only:2"));
    }

    #[test]
    fn bad_endpoints_and_half_keys_are_config_errors() {
        let args = S3Args {
            endpoint: Some("127.0.0.1:9000".into()),
            ..S3Args::default()
        };
        let err = S3Settings::resolve(&args, None, &Env::default()).unwrap_err();
        assert!(err.to_string().contains("http://"), "{err}");
        assert_eq!(err.exit(), Exit::Config);
        let env = Env::from_pairs([("AWS_ACCESS_KEY_ID", "K")]);
        let err = S3Settings::resolve(&S3Args::default(), None, &env).unwrap_err();
        assert!(err.to_string().contains("AWS_"), "{err}");
    }

    #[test]
    fn error_codes_map_to_sysexits() {
        assert_eq!(exit_for_code(Some("NoSuchBucket")), Exit::NoInput);
        assert_eq!(exit_for_code(Some("InvalidAccessKeyId")), Exit::NoPerm);
        assert_eq!(exit_for_code(Some("SlowDown")), Exit::TempFail);
    }

    #[test]
    fn endpoint_host_strips_scheme_port_and_path() {
        assert_eq!(endpoint_host("http://h:9000/x"), Some("h"));
        assert_eq!(endpoint_host("https://u:p@h"), Some("h"));
        assert_eq!(endpoint_host("http://[::1]:9000"), Some("::1"));
    }
}
