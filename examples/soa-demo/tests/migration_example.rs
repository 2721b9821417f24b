//! The `migration` example runs the README's runbook end to end: on in-memory stores, and
//! from a real ZooKeeper to a real etcd.

use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use conformance_tests::harness::{EtcdServer, ZkConfig, ZkServer};

/// Runs the example with `args`, killed if it takes longer than `bound`.
fn migration(args: &[&str], bound: Duration) -> (Output, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_migration"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(bound) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("migration {args:?} did not finish within {bound:?}");
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output, stdout)
}

fn assert_moved(output: &Output, stdout: &str, instances: usize) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{:?}\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains(" 0 found no instance"), "{stdout}");
    assert!(
        stdout.contains("differences under /soa/config: 0"),
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("registered on both").count(),
        instances,
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("done: ")),
        "{stdout}"
    );
}

#[test]
fn runbook_on_in_memory_stores() {
    let (output, stdout) = migration(&[], Duration::from_secs(60));
    assert_moved(&output, &stdout, 2);
}

#[test]
fn runbook_from_a_real_zookeeper_to_a_real_etcd() {
    let zk = ZkServer::start(ZkConfig {
        tick_time: Duration::from_millis(200),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let etcd = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let from = format!("zk://{}?session_ttl=4s", zk.connect_string());
    let to = format!("etcd://{}?session_ttl=2s", etcd.endpoint());
    let (output, stdout) = migration(
        &[
            "--from",
            &from,
            "--to",
            &to,
            "--instances",
            "10.0.3.1:9090,10.0.3.2:9090,10.0.3.3:9090",
        ],
        Duration::from_secs(180),
    );
    assert_moved(&output, &stdout, 3);
}
