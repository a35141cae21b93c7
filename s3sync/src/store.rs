//! Named stores: the s3sync config file and one S3 client per store a command names.
//!
//! The config is `-c FILE`, else `$XDG_CONFIG_HOME/labkit/s3sync.toml` (`~/.config/...` without
//! it) when that file exists. Its `[s3]` table is the default store, as before; each
//! `[store.NAME]` table is a store that URLs name as `s3://NAME/bucket/key`:
//!
//! ```toml
//! [store.home]
//! endpoint = "http://minio.lan:9000"
//! access_key_id = "lab"
//! secret_access_key_file = "/etc/labkit/credentials/minio"
//!
//! [store.offsite]
//! region = "eu-central-1"
//! profile = "offsite"
//! storage_class = "STANDARD_IA"
//! ```
//!
//! Invariants: every value that can be wrong is checked while parsing, so the error names the
//! file, line and key (exit 78). A store's secret comes from `secret_access_key`, the file of
//! `secret_access_key_file`, or the systemd credential `store.NAME.secret_access_key` (in
//! `$CREDENTIALS_DIRECTORY`), and only when `access_key_id` is given; otherwise from the AWS
//! chain (`AWS_*` variables, then the store's `profile` or `AWS_PROFILE`). A store without an
//! endpoint is AWS: `AWS_ENDPOINT_URL` and the command-line S3 flags belong to the default store
//! only. Secrets are [`Secret`]s, redacted in every Debug and log line.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextMut;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::error::BoxError;
use labcore::Env;
use labcore::config::{self, ConfigFile};
use labcore::s3::{S3Args, S3Config, S3Settings};
use labcore::secret::Secret;
use serde::Deserialize;

use crate::error::Error;
use crate::location::{DEFAULT_STORE, S3Url};

/// The s3sync config: the default store's `[s3]` table and named `[store.NAME]` tables.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct S3syncToml {
    /// The default store.
    pub(crate) s3: Option<S3Config>,
    /// Named stores.
    #[serde(default)]
    pub(crate) store: BTreeMap<StoreName, StoreToml>,
}

/// A store's name: what URLs write before the bucket.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub(crate) struct StoreName(String);

impl TryFrom<String> for StoreName {
    type Error = String;

    fn try_from(name: String) -> Result<StoreName, String> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name != DEFAULT_STORE
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(StoreName(name))
        } else {
            Err(format!(
                "store name {name:?}: use 1 to 63 lower-case letters, digits and '-'"
            ))
        }
    }
}

/// An endpoint URL, checked when the config is read.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "String")]
pub(crate) struct Endpoint(String);

impl TryFrom<String> for Endpoint {
    type Error = String;

    fn try_from(url: String) -> Result<Endpoint, String> {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"));
        match rest {
            Some(rest) if !rest.is_empty() && !rest.starts_with('/') => Ok(Endpoint(url)),
            Some(_) => Err(format!("endpoint {url:?} names no host")),
            None => Err(format!(
                "endpoint {url:?} must start with http:// or https://"
            )),
        }
    }
}

/// An S3 storage class such as `STANDARD_IA`, sent with every object written to the store.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "String")]
pub(crate) struct StorageClass(String);

impl TryFrom<String> for StorageClass {
    type Error = String;

    fn try_from(class: String) -> Result<StorageClass, String> {
        if !class.is_empty()
            && class
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        {
            Ok(StorageClass(class))
        } else {
            Err(format!(
                "storage class {class:?}: write it as S3 does, e.g. STANDARD_IA or GLACIER_IR"
            ))
        }
    }
}

/// One `[store.NAME]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoreToml {
    /// Endpoint URL; none means AWS.
    pub(crate) endpoint: Option<Endpoint>,
    /// Region.
    pub(crate) region: Option<String>,
    /// Path-style (`true`) or virtual-hosted (`false`) addressing.
    pub(crate) path_style: Option<bool>,
    /// A profile of `~/.aws/config`.
    pub(crate) profile: Option<String>,
    /// Access key ID.
    pub(crate) access_key_id: Option<String>,
    /// Secret access key, inline.
    pub(crate) secret_access_key: Option<Secret>,
    /// Secret access key, from a file.
    pub(crate) secret_access_key_file: Option<PathBuf>,
    /// Extra PEM roots to trust.
    pub(crate) ca_bundle: Option<PathBuf>,
    /// Storage class of the objects written.
    pub(crate) storage_class: Option<StorageClass>,
}

/// The config file s3sync reads: `-c FILE`, else the default path if it exists.
pub(crate) fn config_path(given: Option<&Path>, env: &Env) -> Option<PathBuf> {
    if let Some(path) = given {
        return Some(path.to_owned());
    }
    let base = env
        .path("XDG_CONFIG_HOME")
        .filter(|p| p.is_absolute())
        .or_else(|| env.home().map(|h| h.join(".config")))?;
    let path = base.join("labkit").join("s3sync.toml");
    path.is_file().then_some(path)
}

/// Loads the config, if there is one.
pub(crate) fn load(
    given: Option<&Path>,
    env: &Env,
) -> Result<Option<(S3syncToml, ConfigFile)>, Error> {
    match config_path(given, env) {
        Some(path) => Ok(Some(config::load(&path)?)),
        None => Ok(None),
    }
}

/// The clients of one run: the default store's, and one per named store the command uses.
#[derive(Clone)]
pub(crate) struct Stores {
    default: Client,
    default_endpoint: String,
    named: Arc<HashMap<String, (Client, String)>>,
}

impl Stores {
    /// Builds the default client and those of the stores in `used`.
    pub(crate) async fn build(
        args: &S3Args,
        loaded: Option<&(S3syncToml, ConfigFile)>,
        used: &[String],
        env: &Env,
    ) -> Result<Stores, Error> {
        let table = loaded.and_then(|(toml, file)| toml.s3.as_ref().map(|t| (t, file)));
        let settings = S3Settings::resolve(args, table, env)?;
        let default = settings.client().await?;
        let default_endpoint = settings.endpoint_url().unwrap_or("aws").to_owned();
        let mut named = HashMap::new();
        if let Some((toml, file)) = loaded {
            for (name, store) in &toml.store {
                if !used.contains(&name.0) || named.contains_key(&name.0) {
                    continue;
                }
                let (settings, class) = store_settings(&name.0, store, file, env)?;
                let endpoint = settings.endpoint_url().unwrap_or("aws").to_owned();
                let mut config = settings.sdk_config().await?;
                if let Some(class) = class {
                    config = config.interceptor(WithStorageClass(class.0));
                }
                named.insert(
                    name.0.clone(),
                    (Client::from_conf(config.build()), endpoint),
                );
            }
        }
        Ok(Stores {
            default,
            default_endpoint,
            named: Arc::new(named),
        })
    }

    /// The client of the store `url` is on.
    pub(crate) fn client(&self, url: &S3Url) -> &Client {
        self.client_of(url.store.as_deref())
    }

    /// The client of store `name` (`None`: the default store).
    pub(crate) fn client_of(&self, name: Option<&str>) -> &Client {
        name.and_then(|n| self.named.get(n))
            .map_or(&self.default, |(client, _)| client)
    }

    /// The endpoint of the store `url` is on (`aws` without one), naming state cache files.
    pub(crate) fn endpoint(&self, url: &S3Url) -> &str {
        url.store
            .as_deref()
            .and_then(|n| self.named.get(n))
            .map_or(self.default_endpoint.as_str(), |(_, e)| e.as_str())
    }
}

/// The store names a config defines.
pub(crate) fn names(loaded: Option<&(S3syncToml, ConfigFile)>) -> Vec<String> {
    loaded
        .map(|(toml, _)| toml.store.keys().map(|n| n.0.clone()).collect())
        .unwrap_or_default()
}

/// Resolves one store table into settings (see the module's comment for the order).
fn store_settings(
    name: &str,
    store: &StoreToml,
    file: &ConfigFile,
    env: &Env,
) -> Result<(S3Settings, Option<StorageClass>), Error> {
    let args = S3Args {
        endpoint: store.endpoint.as_ref().map(|e| e.0.clone()),
        region: store.region.clone(),
        profile: store.profile.clone(),
        path_style: store.path_style == Some(true),
        virtual_hosted: store.path_style == Some(false),
        ca_bundle: store.ca_bundle.as_deref().map(|p| file.resolve_path(p)),
    };
    let key = format!("store.{name}.secret_access_key");
    let given = store.secret_access_key.is_some() || store.secret_access_key_file.is_some();
    let table = if store.access_key_id.is_some() || given {
        let secret = file.secret(
            env,
            &key,
            store.secret_access_key.clone(),
            store.secret_access_key_file.as_deref(),
        )?;
        if store.access_key_id.is_none() || secret.is_none() {
            return Err(file
                .invalid(
                    format!("store.{name}"),
                    "give both access_key_id and secret_access_key (or secret_access_key_file, \
                     or the credential store.NAME.secret_access_key), or neither",
                )
                .into());
        }
        Some(S3Config {
            access_key_id: store.access_key_id.clone(),
            secret_access_key: secret,
            ..S3Config::default()
        })
    } else {
        None
    };
    // The default store's endpoint variables must not redirect a named store.
    let mut env = env.clone();
    env.remove("AWS_ENDPOINT_URL");
    env.remove("AWS_ENDPOINT_URL_S3");
    let settings = S3Settings::resolve(&args, table.as_ref().map(|t| (t, file)), &env)?;
    Ok((settings, store.storage_class.clone()))
}

/// Adds `x-amz-storage-class` to the requests that create objects on a store with a class.
#[derive(Debug)]
struct WithStorageClass(String);

impl Intercept for WithStorageClass {
    fn name(&self) -> &'static str {
        "WithStorageClass"
    }

    fn modify_before_signing(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        _config: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let request = context.request_mut();
        let query = request.uri().split_once('?').map_or("", |(_, q)| q);
        // The SDK marks the operation in the query: `x-id=PutObject`, `x-id=CopyObject`, and
        // `uploads` for CreateMultipartUpload create objects; parts, buckets and the rest
        // (`x-id=UploadPart`, `uploadId=...`) do not.
        let creates = query
            .split('&')
            .any(|q| matches!(q, "x-id=PutObject" | "x-id=CopyObject" | "uploads"));
        if creates {
            request
                .headers_mut()
                .insert("x-amz-storage-class", self.0.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<S3syncToml, String> {
        config::parse_str::<S3syncToml>(Path::new("/etc/s3sync.toml"), text)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn bad_store_tables_name_the_line_and_key() {
        let err =
            parse("[store.home]\nendpoint = \"http://a:9000\"\nregoin = \"x\"\n").unwrap_err();
        assert!(err.starts_with("/etc/s3sync.toml:3:"), "{err}");
        assert!(err.contains("store.home"), "{err}");
        let err = parse("[store.home]\n\nendpoint = \"minio:9000\"\n").unwrap_err();
        assert!(err.starts_with("/etc/s3sync.toml:3:"), "{err}");
        assert!(err.contains("http://"), "{err}");
        let err = parse("[store.home]\nstorage_class = \"cold\"\n").unwrap_err();
        assert!(err.starts_with("/etc/s3sync.toml:2:"), "{err}");
        let err = parse("[store.Home]\n").unwrap_err();
        assert!(err.contains("store name"), "{err}");
    }

    #[test]
    fn store_secrets_never_show_in_debug() {
        let toml = parse(
            "[store.home]\nendpoint = \"http://a:9000\"\naccess_key_id = \"K\"\nsecret_access_key = \"hunter22-secret\"\n",
        )
        .unwrap();
        assert!(!format!("{toml:?}").contains("hunter22"));
        let file = ConfigFile::new(Path::new("/etc/s3sync.toml"));
        let store = &toml.store[&StoreName("home".into())];
        let (settings, _) = store_settings("home", store, &file, &Env::default()).unwrap();
        assert!(!format!("{settings:?}").contains("hunter22"));
        assert_eq!(settings.endpoint_url(), Some("http://a:9000"));
    }

    #[test]
    fn a_named_store_ignores_the_default_endpoint_variables() {
        let env = Env::from_pairs([("AWS_ENDPOINT_URL", "http://default:1")]);
        let file = ConfigFile::new(Path::new("/etc/s3sync.toml"));
        let (settings, _) = store_settings("aws", &StoreToml::default(), &file, &env).unwrap();
        assert_eq!(settings.endpoint_url(), None);
    }

    #[test]
    fn half_a_key_in_a_store_is_a_config_error() {
        let file = ConfigFile::new(Path::new("/etc/s3sync.toml"));
        let store = StoreToml {
            access_key_id: Some("K".into()),
            ..StoreToml::default()
        };
        let err = store_settings("home", &store, &file, &Env::default()).unwrap_err();
        assert_eq!(labcore::ExitStatus::exit(&err), labcore::Exit::Config);
        assert!(err.to_string().contains("store.home"), "{err}");
    }
}
