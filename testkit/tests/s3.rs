//! S3Server is a real S3 protocol server reached through labcore's client: PUT, GET, LIST,
//! fresh buckets per test, and S3 errors mapped to exit codes.

use aws_sdk_s3::primitives::ByteStream;
use labcore::Exit;
use labcore::s3::{S3Args, S3Settings, exit_for};
use testkit::S3Server;

#[tokio::test]
async fn put_get_list_through_the_s3_api() {
    let server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let client = server.client().await;
    for key in ["a/one.txt", "a/two.txt", "b/three with space+plus.txt"] {
        client
            .put_object()
            .bucket(&bucket)
            .key(key)
            .body(ByteStream::from(format!("body of {key}").into_bytes()))
            .send()
            .await
            .unwrap();
    }
    let object = client
        .get_object()
        .bucket(&bucket)
        .key("a/two.txt")
        .send()
        .await
        .unwrap();
    let body = object.body.collect().await.unwrap().into_bytes();
    assert_eq!(&body[..], b"body of a/two.txt");
    let listed = client
        .list_objects_v2()
        .bucket(&bucket)
        .prefix("a/")
        .send()
        .await
        .unwrap();
    let keys: Vec<_> = listed.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys, ["a/one.txt", "a/two.txt"]);
    let all = client
        .list_objects_v2()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert_eq!(all.key_count(), Some(3));
}

#[tokio::test]
async fn each_bucket_is_fresh_and_the_environment_reaches_the_server() {
    let server = S3Server::start().unwrap();
    let first = server.bucket().await.unwrap();
    let second = server.bucket().await.unwrap();
    assert_ne!(first, second);
    let env = labcore::Env::from_pairs(server.env());
    let client = S3Settings::resolve(&S3Args::default(), None, &env)
        .unwrap()
        .client()
        .await
        .unwrap();
    let listed = client
        .list_objects_v2()
        .bucket(&second)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.key_count(), Some(0));
}

#[tokio::test]
async fn missing_buckets_and_wrong_keys_map_to_66_and_77() {
    let server = S3Server::start().unwrap();
    let client = server.client().await;
    let err = client
        .list_objects_v2()
        .bucket("no-such-bucket")
        .send()
        .await
        .unwrap_err();
    assert_eq!(exit_for(&err), Exit::NoInput, "{err:?}");
    let bucket = server.bucket().await.unwrap();
    let wrong = server
        .settings()
        .credentials(testkit::s3::ACCESS_KEY, "not-the-secret".into())
        .client()
        .await
        .unwrap();
    let err = wrong
        .list_objects_v2()
        .bucket(&bucket)
        .send()
        .await
        .unwrap_err();
    assert_eq!(exit_for(&err), Exit::NoPerm, "{err:?}");
}

#[tokio::test]
async fn a_killed_server_is_unavailable_and_restarts_with_its_objects() {
    let mut server = S3Server::start().unwrap();
    let bucket = server.bucket().await.unwrap();
    let client = server.client().await;
    client
        .put_object()
        .bucket(&bucket)
        .key("k")
        .body(ByteStream::from_static(b"v"))
        .send()
        .await
        .unwrap();
    server.kill().unwrap();
    let err = client
        .get_object()
        .bucket(&bucket)
        .key("k")
        .send()
        .await
        .unwrap_err();
    assert_eq!(exit_for(&err), Exit::Unavailable, "{err:?}");
    server.restart().unwrap();
    let client = server.client().await;
    let object = client
        .get_object()
        .bucket(&bucket)
        .key("k")
        .send()
        .await
        .unwrap();
    assert_eq!(&object.body.collect().await.unwrap().into_bytes()[..], b"v");
}
