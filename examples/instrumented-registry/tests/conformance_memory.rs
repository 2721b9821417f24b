//! The whole conformance suite on the wrapper over the in-memory backend, using only the
//! public API of `conformance-tests`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use conformance_tests::{conformance_suite, Fault, Fixture, MemoryFixture};
use instrumented_registry::InstrumentedRegistry;
use registry_core::{Registry, Result, SessionId};

/// Any fixture, with every client it opens wrapped.
struct Wrapped(MemoryFixture);

#[async_trait]
impl Fixture for Wrapped {
    fn name(&self) -> &'static str {
        "instrumented-memory"
    }
    async fn open(&self, namespace: &str) -> Result<Arc<dyn Registry>> {
        Ok(Arc::new(InstrumentedRegistry::new(
            self.0.open(namespace).await?,
        )))
    }
    fn supports(&self, fault: Fault) -> bool {
        self.0.supports(fault)
    }
    async fn expire_session(&self, session: SessionId) -> Result<()> {
        self.0.expire_session(session).await
    }
    async fn interrupt_connection(&self, session: SessionId, duration: Duration) -> Result<()> {
        self.0.interrupt_connection(session, duration).await
    }
    async fn active_watches(&self, namespace: &str) -> Option<usize> {
        self.0.active_watches(namespace).await
    }
    fn expiry_bound(&self) -> Duration {
        self.0.expiry_bound()
    }
}

fn fixture() -> Arc<dyn Fixture> {
    static FIXTURE: OnceLock<Arc<dyn Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| Arc::new(Wrapped(MemoryFixture::new())))
        .clone()
}

conformance_suite!(fixture);

#[tokio::test]
async fn the_wrapper_counts_what_passes_through() {
    let inner = fixture().open("counting").await.unwrap();
    let reg = InstrumentedRegistry::new(inner);
    let path = registry_core::NodePath::new("/a").unwrap();
    let node = reg
        .create(
            &path,
            registry_core::Bytes::new(),
            registry_core::CreateMode::Persistent,
        )
        .await
        .unwrap();
    reg.get(&path).await.unwrap();
    reg.get(&path).await.unwrap();
    let counts = reg.counts();
    assert_eq!((counts["create"], counts["get"], counts["set"]), (1, 2, 0));
    // The owner-checked calls reach the inner backend as such, not as a read and a write.
    reg.set_owned(&node, registry_core::Bytes::from("v"))
        .await
        .unwrap();
    assert!(reg.delete_owned(&node).await.unwrap());
    let counts = reg.counts();
    assert_eq!(
        (
            counts["get"],
            counts["set"],
            counts["set_owned"],
            counts["delete_owned"]
        ),
        (2, 0, 1, 1)
    );
}
