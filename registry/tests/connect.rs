//! `connect(url)`: memory URLs work, and backends not compiled in say which feature to enable.

use registry::{connect, Bytes, CreateMode, Error, NodePath};

#[tokio::test]
async fn named_memory_stores_are_shared_and_anonymous_ones_are_private() {
    let a = connect("mem://shared_test").await.unwrap();
    let b = connect("mem://shared_test").await.unwrap();
    let private = connect("mem://").await.unwrap();
    let path = NodePath::new("/soa/config/services").unwrap();
    a.create(&path, Bytes::from("timeout/1s"), CreateMode::Persistent)
        .await
        .unwrap();
    assert_eq!(b.get(&path).await.unwrap().value, Bytes::from("timeout/1s"));
    assert!(!private.exists(&path).await.unwrap());
}

#[tokio::test]
async fn malformed_urls_fail_before_any_io() {
    for url in ["", "etcd:/h:1", "zk://h:notaport", "redis://h:1"] {
        assert!(
            matches!(connect(url).await, Err(Error::InvalidArgument(_))),
            "{url}"
        );
    }
}
