//! Real provider processes against a real etcd: a killed master is gone within TTL + 1 s and
//! mastership moves; a gracefully stopped provider is gone within 1 s.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use conformance_tests::harness::EtcdServer;
use registry_soa::master::master_of;
use registry_soa::{Address, ServiceView};

const SERVICE: &str = "com.today.service.goods.GoodsService";
const TTL: Duration = Duration::from_secs(2);

/// A provider process and its stdout lines (read by a thread, so waits can be bounded).
struct Running(
    Child,
    // Kept so the reader thread keeps draining the pipe until the child is gone.
    #[allow(dead_code)] mpsc::Receiver<String>,
);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a provider and waits (at most 30 s) for its "registered" line.
fn provider(url: &str, address: &str) -> Running {
    let mut child = Command::new(env!("CARGO_BIN_EXE_provider"))
        .args(["--url", url, "--service", SERVICE, "--address", address])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let running = Running(child, lines);
    match running.1.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => assert!(line.starts_with("registered "), "provider said {line:?}"),
        Err(e) => panic!("provider {address} did not report registration within 30 s: {e}"),
    }
    running
}

async fn wait_until(
    view: &ServiceView,
    bound: Duration,
    what: &str,
    pred: impl Fn(&registry_soa::ServiceSnapshot) -> bool,
) -> Duration {
    let started = Instant::now();
    let mut changes = view.changes();
    let reached = tokio::time::timeout(bound, async {
        while !pred(&view.snapshot()) {
            if changes.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        reached.is_ok() && pred(&view.snapshot()),
        "{what}: not within {bound:?}"
    );
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_master_fails_over_and_graceful_stop_is_prompt() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let url = format!("etcd://{}?session_ttl=2s", server.endpoint());
    let first = provider(&url, "10.0.5.1:9090");
    let second = provider(&url, "10.0.5.2:9090");
    let consumer = registry::connect(&url).await.unwrap();
    let view = ServiceView::open(consumer, SERVICE).await.unwrap();
    wait_until(&view, Duration::from_secs(10), "both instances", |s| {
        s.instances.len() == 2
    })
    .await;
    let master = |s: &registry_soa::ServiceSnapshot| master_of(&s.instances).map(|m| m.address);
    let first_addr: Address = "10.0.5.1:9090".parse().unwrap();
    let second_addr: Address = "10.0.5.2:9090".parse().unwrap();
    assert_eq!(master(&view.snapshot()), Some(first_addr));

    // SIGKILL: no deregistration; the lease runs out.
    let mut first = first;
    first.0.kill().unwrap();
    let took = wait_until(
        &view,
        TTL + Duration::from_secs(1) + Duration::from_millis(500),
        "killed instance gone",
        |s| s.instances.len() == 1,
    )
    .await;
    eprintln!("killed provider gone after {took:?} (TTL {TTL:?})");
    assert_eq!(
        master(&view.snapshot()),
        Some(second_addr),
        "mastership did not move"
    );

    // SIGTERM: the provider deregisters before exiting.
    let mut second = second;
    let pid = second.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let took = wait_until(
        &view,
        Duration::from_secs(1),
        "gracefully stopped instance gone",
        |s| s.instances.is_empty(),
    )
    .await;
    eprintln!("graceful stop seen after {took:?}");
    // Bounded: a provider that never exits must fail the test, not hang it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = second.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "provider did not exit within 10 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "provider exited with {status}");
}
