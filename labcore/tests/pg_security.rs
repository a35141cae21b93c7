//! libpq's TLS and authentication rules against a real PostgreSQL: a verifying `sslmode`
//! without a root certificate fails instead of trusting the system's roots, `verify-full`
//! checks the host name and `verify-ca` does not, and a request for the password in cleartext
//! is refused unless `require_auth` allows it.

use labcore::exit::chain;
use labcore::pg::{PgError, PgHost, PgSettings, RequireAuth, SslMode};
use labcore::{Env, Exit, ExitStatus, Secret};
use testkit::pg::PgCluster;

fn as_superuser(cluster: &PgCluster, host: &str) -> PgSettings {
    PgSettings::new(PgHost::Tcp(host.to_owned()), cluster.port(), "postgres")
        .with_user(
            "postgres",
            Some(Secret::new(cluster.superuser_password().to_owned())),
        )
        .with_dbname("postgres")
}

/// Whether the session the client holds runs over TLS, as the server sees it.
async fn uses_tls(settings: &PgSettings) -> bool {
    let client = settings.connect().await.unwrap();
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test]
async fn verify_ca_without_a_root_certificate_is_an_error_not_the_system_roots() {
    let cluster = PgCluster::builder().tls().start().unwrap();
    let home = tempfile::tempdir().unwrap();
    let port = cluster.port().to_string();
    let env = |extra: &[(&str, &str)]| {
        let mut pairs = vec![
            ("HOME", home.path().to_str().unwrap()),
            ("PGHOST", "localhost"),
            ("PGPORT", port.as_str()),
            ("PGUSER", "postgres"),
            ("PGPASSWORD", cluster.superuser_password()),
            ("PGDATABASE", "postgres"),
            ("PGSSLMODE", "verify-ca"),
        ];
        pairs.extend_from_slice(extra);
        Env::from_pairs(pairs)
    };

    // libpq looks for ~/.postgresql/root.crt and fails when it is missing.
    let settings = PgSettings::from_env(&env(&[])).unwrap();
    let err = settings.connect().await.unwrap_err();
    assert!(matches!(err, PgError::NoRootCert { .. }), "{}", chain(&err));
    assert!(
        err.to_string()
            .contains(".postgresql/root.crt does not exist"),
        "{err}"
    );
    assert_eq!(err.exit(), Exit::Config);

    let ca = cluster.ca_file().unwrap().to_str().unwrap();
    let settings = PgSettings::from_env(&env(&[("PGSSLROOTCERT", ca)])).unwrap();
    assert!(uses_tls(&settings).await);
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_for_another_name_and_verify_ca_accepts_it() {
    let cluster = PgCluster::builder().tls().start().unwrap();
    let ca = cluster.ca_file().unwrap();
    // The certificate names localhost; 127.0.0.1 reaches the same server under another name.
    let by_address = as_superuser(&cluster, "127.0.0.1").with_sslrootcert(ca);

    let err = by_address
        .clone()
        .with_sslmode(SslMode::VerifyFull)
        .connect()
        .await
        .unwrap_err();
    assert!(
        chain(&err).contains("certificate not valid for name"),
        "{}",
        chain(&err)
    );

    assert!(uses_tls(&by_address.clone().with_sslmode(SslMode::VerifyCa)).await);
    let by_name = as_superuser(&cluster, "localhost").with_sslrootcert(ca);
    assert!(uses_tls(&by_name.with_sslmode(SslMode::VerifyFull)).await);
}

#[tokio::test]
async fn a_server_asking_for_the_password_in_cleartext_is_refused_unless_require_auth_allows_it() {
    let cluster = PgCluster::builder()
        .hba("local all all trust\nhost all all 127.0.0.1/32 password\n")
        .start()
        .unwrap();
    let settings = as_superuser(&cluster, "127.0.0.1").with_sslmode(SslMode::Disable);

    let err = settings.connect().await.unwrap_err();
    let text = chain(&err);
    assert!(text.contains("password in cleartext"), "{text}");
    assert!(!text.contains(cluster.superuser_password()), "{text}");
    assert_eq!(err.exit(), Exit::NoPerm);

    let allowed = settings.with_require_auth(RequireAuth::parse("password").unwrap());
    let client = allowed.connect().await.unwrap();
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}
