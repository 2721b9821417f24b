//! Self-test of the etcd harness: real members start, serve, crash and come back with data.

use conformance_tests::harness::etcd::http_get;
use conformance_tests::harness::{EtcdCluster, EtcdServer};
use conformance_tests::support::etcdctl;

#[test]
fn single_server_restarts_on_its_data() {
    let mut server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    assert!(http_get(server.addr(), "/health")
        .unwrap_or_default()
        .contains("true"));
    let pid_dir = server.watcher_total();
    assert!(pid_dir.is_some(), "metrics not readable");
    // Health alone would pass on an empty data dir; the key proves the data survived.
    etcdctl(&server.endpoint(), &["put", "/harness/restart", "kept"]);
    server.kill().unwrap();
    assert!(
        http_get(server.addr(), "/health").is_none(),
        "killed server still answers"
    );
    server.restart().unwrap_or_else(|e| panic!("{e}"));
    assert!(http_get(server.addr(), "/health")
        .unwrap_or_default()
        .contains("true"));
    let value = etcdctl(
        &server.endpoint(),
        &["get", "/harness/restart", "--print-value-only"],
    );
    assert_eq!(
        value.trim(),
        "kept",
        "key written before the kill lost on restart"
    );
}

#[test]
fn three_member_cluster_elects_a_leader() {
    let cluster = EtcdCluster::start(3).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cluster.endpoints().len(), 3);
    let ok = conformance_tests::harness::wait_until(std::time::Duration::from_secs(10), || {
        cluster.leader().is_some()
    });
    assert!(ok, "no leader elected");
}
