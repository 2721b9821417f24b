//! The bench is not a test; CI only proves it still works: `--quick` against harness-started
//! servers exits 0, in well under a minute or two, with rows for both backends in its JSON.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use conformance_tests::harness::{EtcdServer, ZkConfig, ZkServer};

/// Longest the smoke run may take before it counts as hung (it normally needs under 60 s).
const LIMIT: Duration = Duration::from_secs(180);

#[test]
fn quick_run_writes_rows_for_both_backends() {
    let etcd = EtcdServer::start().unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
    let zk = ZkServer::start(ZkConfig {
        tick_time: Duration::from_millis(200),
    })
    .unwrap_or_else(|e| panic!("cannot start ZooKeeper: {e}"));
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("bench.json");
    let stderr_path = dir.path().join("stderr.txt");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");

    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_registry-bench"))
        .arg("--quick")
        .arg("--json")
        .arg(&json)
        .arg("--etcd")
        .arg(etcd.endpoint())
        .arg("--zk")
        .arg(zk.connect_string())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("run registry-bench");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for registry-bench") {
            break status;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "registry-bench --quick still running after {LIMIT:?}; stderr:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let took = started.elapsed();
    let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(
        status.success(),
        "registry-bench --quick failed ({status}):\n{log}"
    );
    eprintln!("registry-bench --quick took {took:?}");

    let text = std::fs::read_to_string(&json).expect("the JSON was written");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let rows = doc["rows"].as_array().expect("a rows array");
    for backend in ["etcd", "zookeeper"] {
        let of: Vec<&serde_json::Value> = rows.iter().filter(|r| r["backend"] == backend).collect();
        assert!(
            of.len() >= 20,
            "only {} rows for {backend}:\n{text}",
            of.len()
        );
        for scenario in [
            "ephemeral create latency p50",
            "register latency p50",
            "delete latency p50",
            "deregister latency p50",
            "deregister latency (raw: same owner check) p50",
            "write throughput, 64 writers",
            "write throughput, 64 writers (control: raw as ours)",
            "watch event latency p50",
            "watch burst lost",
            "client memory per registration",
        ] {
            let row = of
                .iter()
                .find(|r| r["scenario"] == scenario)
                .unwrap_or_else(|| panic!("no {scenario:?} row for {backend}:\n{text}"));
            assert!(
                row["raw"].is_number() && row["ours"].is_number(),
                "{scenario:?} on {backend} lacks a value: {row}"
            );
        }
        // Throughput is judged by the ratio within back-to-back slices.
        for row in of.iter().filter(|r| {
            r["scenario"]
                .as_str()
                .is_some_and(|s| s.starts_with("write throughput"))
        }) {
            assert!(
                row["paired_ratio"].is_number() && row["ratio"] == row["paired_ratio"],
                "throughput row without its paired ratio: {row}"
            );
        }
        // No raw equivalent: ours alone.
        for scenario in [
            "cached lookup+pick (10 instances)",
            "cached lookup+pick with routes and cookies",
        ] {
            let row = of.iter().find(|r| r["scenario"] == scenario);
            assert!(
                row.is_some_and(|r| r["ours"].is_number()),
                "{scenario:?} on {backend}: {row:?}"
            );
        }
        assert!(
            of.iter().any(|r| r["scenario"]
                .as_str()
                .is_some_and(|s| s.starts_with("failure detection"))),
            "no failure detection row for {backend}"
        );
        assert!(
            of.iter().any(|r| r["scenario"]
                .as_str()
                .is_some_and(|s| s.starts_with("recovery of"))),
            "no recovery row for {backend}"
        );
    }
}
