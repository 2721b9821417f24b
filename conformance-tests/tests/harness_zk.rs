//! Self-test of the ZooKeeper harness: real servers start, answer, crash and come back.

use std::time::Duration;

use conformance_tests::harness::{wait_until, ZkConfig, ZkEnsemble, ZkServer};

#[test]
fn standalone_server_restarts() {
    let mut server = ZkServer::start(ZkConfig {
        tick_time: Duration::from_millis(200),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(server.four_letter("ruok").as_deref(), Some("imok"));
    server.kill().unwrap();
    assert!(
        server.four_letter("ruok").is_none(),
        "killed server still answers"
    );
    server.restart().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(server.four_letter("ruok").as_deref(), Some("imok"));
}

#[test]
fn three_server_ensemble_elects_a_leader() {
    let ensemble = ZkEnsemble::start(3, ZkConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ensemble.connect_string().split(',').count(), 3);
    assert!(
        wait_until(Duration::from_secs(30), || ensemble.leader().is_some()),
        "no leader"
    );
}
