//! Pebble is a real ACME CA: its directory is served over HTTPS with the listener CA testkit
//! made, and it hands out the root that signs what it issues.

use testkit::Pebble;
use testkit::http::https_get;

#[tokio::test]
async fn directory_is_fetched_over_https() {
    let pebble = Pebble::builder()
        .http_port(5002)
        .tls_port(5001)
        .start()
        .unwrap();
    let response = https_get(&pebble.directory_url(), pebble.api_ca_pem())
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    let directory: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    for key in ["newAccount", "newNonce", "newOrder", "revokeCert"] {
        let url = directory[key]
            .as_str()
            .unwrap_or_else(|| panic!("no {key}: {directory}"));
        assert!(url.starts_with("https://localhost:"), "{url}");
    }
    let root = pebble.issuing_root_pem().await.unwrap();
    assert!(root.starts_with("-----BEGIN CERTIFICATE-----"), "{root}");
}

#[tokio::test]
async fn the_api_is_refused_without_trusting_its_ca() {
    let pebble = Pebble::builder().start().unwrap();
    let other = Pebble::builder().start().unwrap();
    let err = https_get(&pebble.directory_url(), other.api_ca_pem())
        .await
        .unwrap_err();
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
}
