//! A config property that does not parse falls back to the global setting or the default: the
//! view says so in its log, once per new error, not on every rebuild.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use registry_core::{Bytes, CreateMode, MemoryOptions, MemoryRegistry, MemoryStore, Registry};
use registry_soa::{Address, Provider, ServiceView};

const SERVICE: &str = "test.ConfigErrorService";

/// Everything the log says, as text.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn count(&self, needle: &str) -> usize {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .matches(needle)
            .count()
    }
}

// One thread: the view's task logs through this thread's subscriber.
#[tokio::test(flavor = "current_thread")]
async fn a_config_typo_is_logged_once() {
    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let store = MemoryStore::new();
    let registry: Arc<dyn Registry> = Arc::new(
        MemoryRegistry::connect(&store, MemoryOptions::default())
            .await
            .unwrap(),
    );
    let paths = registry_soa::layout::ServicePaths::new(SERVICE).unwrap();
    registry
        .create(
            &paths.config,
            Bytes::from("timeout/8OOms;loadBalance/leastActive"),
            CreateMode::Persistent,
        )
        .await
        .unwrap();
    let view = ServiceView::open(registry.clone(), SERVICE).await.unwrap();
    let mut changes = view.changes();
    let mut providers = Vec::new();
    // Each registration rebuilds the snapshot; the error is said once all the same.
    for last in 1..=3u8 {
        let address = Address {
            ip: [10, 0, 0, last].into(),
            port: 9090,
        };
        providers.push(
            Provider::register(&registry, SERVICE, address, "1.0.0")
                .await
                .unwrap(),
        );
        tokio::time::timeout(Duration::from_secs(5), async {
            while view.snapshot().instances.len() < usize::from(last) {
                changes.changed().await.unwrap();
            }
        })
        .await
        .expect("the instance never reached the view");
    }
    assert!(
        !view.snapshot().errors.is_empty(),
        "no config error recorded"
    );
    assert_eq!(
        log.count("config property does not parse"),
        1,
        "{}",
        String::from_utf8_lossy(&log.0.lock().unwrap())
    );
    assert!(log.count(paths.config.as_str()) >= 1);
    for p in providers {
        p.shutdown().await.unwrap();
    }
}
