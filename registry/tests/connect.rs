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

#[cfg(not(feature = "etcd"))]
#[tokio::test]
async fn etcd_without_the_feature_names_it() {
    match connect("etcd://root:pw@127.0.0.1:2379").await {
        Err(Error::InvalidArgument(message)) => {
            assert!(message.contains("`etcd` feature"), "{message}");
            assert!(!message.contains("pw@"), "password leaked: {message}");
        }
        other => panic!("expected InvalidArgument, got {:?}", other.map(|_| ())),
    }
}

#[cfg(not(feature = "zk"))]
#[tokio::test]
async fn zookeeper_without_the_feature_names_it() {
    match connect("zk://127.0.0.1:2181/chroot").await {
        Err(Error::InvalidArgument(message)) => {
            assert!(message.contains("`zk` feature"), "{message}")
        }
        other => panic!("expected InvalidArgument, got {:?}", other.map(|_| ())),
    }
}
