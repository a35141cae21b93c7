//! PgCluster is a real PostgreSQL: SQL round trips over TCP with SCRAM and over the socket,
//! a readable server log, wrong passwords refused, settings applied.

use labcore::Exit;
use labcore::pg::PgSettings;
use testkit::PgCluster;

#[tokio::test]
async fn sql_round_trip_over_tcp_and_socket() {
    let cluster = PgCluster::builder()
        .setting("log_statement", "all")
        .start()
        .unwrap();
    let tcp = cluster.settings().connect().await.unwrap();
    tcp.batch_execute("create table t (x int); insert into t values (41), (1)")
        .await
        .unwrap();
    let row = tcp
        .query_one("select sum(x)::int from t", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);

    let socket = cluster.connect("postgres").await.unwrap();
    let row = socket
        .query_one("select count(*) from t", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 2);
    let version = socket
        .query_one("show server_version_num", &[])
        .await
        .unwrap();
    assert!(version.get::<_, String>(0).parse::<u32>().unwrap() >= 150000);

    assert_eq!(
        cluster.psql("postgres", "select 6 * 7").unwrap().trim(),
        "42"
    );
    assert!(
        cluster.log().contains("create table t (x int)"),
        "{}",
        cluster.log()
    );
}

#[tokio::test]
async fn a_wrong_password_is_refused_with_exit_77() {
    let cluster = PgCluster::start().unwrap();
    let wrong = cluster
        .settings()
        .with_user("postgres", Some("wrong".into()));
    let err = wrong.connect().await.unwrap_err();
    assert_eq!(labcore::ExitStatus::exit(&err), Exit::NoPerm, "{err}");
}

#[tokio::test]
async fn libpq_environment_reaches_the_cluster() {
    let cluster = PgCluster::start().unwrap();
    let env = labcore::Env::from_pairs(cluster.env());
    let settings = PgSettings::from_env(&env).unwrap();
    let client = settings.connect().await.unwrap();
    let row = client
        .query_one("select current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "postgres");
}

#[tokio::test]
async fn a_stopped_server_is_unavailable_69_and_restarts() {
    let mut cluster = PgCluster::start().unwrap();
    cluster.stop().unwrap();
    let err = cluster.settings().connect().await.unwrap_err();
    assert_eq!(labcore::ExitStatus::exit(&err), Exit::Unavailable, "{err}");
    cluster.restart().unwrap();
    let client = cluster.settings().connect().await.unwrap();
    client.simple_query("select 1").await.unwrap();
}
