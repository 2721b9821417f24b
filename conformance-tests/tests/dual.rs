//! The whole conformance suite on a `DualRegistry` over two in-memory stores: a registry made
//! of two is still a registry. Faults hit the primary, whose session the dual one reports.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use conformance_tests::{conformance_suite, Fault, Fixture, MemoryFixture};
use registry_core::{DualOptions, DualRegistry, Registry, Result, SessionId};

/// Primaries and secondaries live in separate memory fixtures, one store per namespace each.
struct DualFixture {
    primaries: MemoryFixture,
    secondaries: MemoryFixture,
}

#[async_trait]
impl Fixture for DualFixture {
    fn name(&self) -> &'static str {
        "dual-memory"
    }

    async fn open(&self, namespace: &str) -> Result<Arc<dyn Registry>> {
        let primary = self.primaries.open(namespace).await?;
        let secondary = self.secondaries.open(namespace).await?;
        Ok(Arc::new(DualRegistry::new(
            primary,
            secondary,
            DualOptions::new(),
        )))
    }

    fn supports(&self, fault: Fault) -> bool {
        self.primaries.supports(fault)
    }

    async fn expire_session(&self, session: SessionId) -> Result<()> {
        self.primaries.expire_session(session).await
    }

    async fn interrupt_connection(&self, session: SessionId, duration: Duration) -> Result<()> {
        self.primaries.interrupt_connection(session, duration).await
    }

    async fn active_watches(&self, namespace: &str) -> Option<usize> {
        self.primaries.active_watches(namespace).await
    }

    fn expiry_bound(&self) -> Duration {
        self.primaries.expiry_bound()
    }
}

fn fixture() -> Arc<dyn Fixture> {
    static FIXTURE: OnceLock<Arc<dyn Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            Arc::new(DualFixture {
                primaries: MemoryFixture::new(),
                secondaries: MemoryFixture::new(),
            })
        })
        .clone()
}

conformance_suite!(fixture);
