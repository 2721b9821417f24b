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

/// A member cut off from its peers loses its leader while the others keep one and serve
/// writes; healed, it catches up.
#[test]
fn a_member_cut_off_loses_its_leader_while_the_others_serve() {
    use std::time::Duration;
    let cluster = EtcdCluster::start_partitionable(3).unwrap_or_else(|e| panic!("{e}"));
    let wait = |probe: &dyn Fn() -> bool| {
        conformance_tests::harness::wait_until(Duration::from_secs(15), probe)
    };
    let healthy = |i: usize| {
        http_get(cluster.client_addr(i).unwrap(), "/health")
            .is_some_and(|b| b.contains("\"health\":\"true\""))
    };
    let leader = cluster.leader().expect("no leader");
    let victim = (leader + 1) % 3;
    let ids: Vec<String> = (0..3).map(|i| cluster.member_id(i).unwrap()).collect();
    assert!(
        ids.iter().all(|id| !id.is_empty()) && ids[0] != ids[1] && ids[1] != ids[2],
        "{ids:?}"
    );
    cluster.cut_off(victim).unwrap();
    assert!(
        wait(&|| !healthy(victim)),
        "the cut-off member still has a leader"
    );
    let others: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    assert!(
        others.iter().all(|&i| healthy(i)),
        "the majority lost its leader"
    );
    let majority = cluster.client_addr(others[0]).unwrap().to_string();
    etcdctl(&majority, &["put", "/harness/partition", "written"]);
    cluster.heal();
    assert!(wait(&|| healthy(victim)), "the healed member has no leader");
    let victim_endpoint = cluster.client_addr(victim).unwrap().to_string();
    let caught_up = wait(&|| {
        etcdctl(
            &victim_endpoint,
            &["get", "/harness/partition", "--print-value-only"],
        )
        .trim()
            == "written"
    });
    assert!(caught_up, "the healed member did not catch up");
}
