//! `registry::connect(url)` opens each real backend from its URL.

use std::time::Duration;

use conformance_tests::harness::{EtcdServer, ZkConfig, ZkServer};
use registry::{connect, Bytes, CreateMode, NodePath};

async fn round_trip(url: &str) {
    let reg = connect(url).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let path = NodePath::new("/soa/config/services").unwrap();
    reg.create(&path, Bytes::from("timeout/800ms"), CreateMode::Persistent)
        .await
        .unwrap();
    let other = connect(url).await.unwrap();
    assert_eq!(
        other.get(&path).await.unwrap().value,
        "timeout/800ms",
        "{url}"
    );
    reg.close().await.unwrap();
    other.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_url_with_namespace_and_ttl() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    round_trip(&format!(
        "etcd://{}/facade?session_ttl=3s&timeout=2s",
        server.endpoint()
    ))
    .await;
    // The namespace is a key prefix operators can see with etcdctl.
    let raw = connect(&format!("etcd://{}", server.endpoint()))
        .await
        .unwrap();
    assert!(raw
        .exists(&NodePath::new("/facade/soa/config/services").unwrap())
        .await
        .unwrap());
    raw.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zk_url_with_namespace_and_session_ttl() {
    let server = ZkServer::start(ZkConfig {
        tick_time: Duration::from_millis(200),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    round_trip(&format!(
        "zk://{}/facade?session_ttl=3s",
        server.connect_string()
    ))
    .await;
    let raw = connect(&format!("zk://{}", server.connect_string()))
        .await
        .unwrap();
    assert!(raw
        .exists(&NodePath::new("/facade/soa/config/services").unwrap())
        .await
        .unwrap());
    raw.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_retryable_error_not_a_hang() {
    let port = conformance_tests::harness::free_port().unwrap();
    let started = std::time::Instant::now();
    let err = connect(&format!("etcd://127.0.0.1:{port}?timeout=1s"))
        .await
        .err()
        .unwrap_or_else(|| panic!("connected to nothing"));
    assert!(err.is_retryable(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}
