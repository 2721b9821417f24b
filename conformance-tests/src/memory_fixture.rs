//! `MemoryFixture`: the suite's fixture for the in-memory backend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use registry_core::memory::{MemoryOptions, MemoryRegistry, MemoryStore};
use registry_core::{Error, Registry, Result, SessionId};

use crate::fixture::{Fault, Fixture};

/// Runs the suite on the in-memory backend: one [`MemoryStore`] per namespace (so namespaces
/// are isolated), sessions with a 2 s TTL, faults through the store's hooks.
#[derive(Default)]
pub struct MemoryFixture {
    stores: Mutex<HashMap<String, MemoryStore>>,
}

impl MemoryFixture {
    /// A fixture with no namespaces yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn stores(&self) -> Vec<MemoryStore> {
        self.stores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn store_of(&self, session: SessionId) -> Result<MemoryStore> {
        self.stores()
            .into_iter()
            .find(|s| s.sessions().iter().any(|(id, _)| *id == session))
            .ok_or_else(|| Error::InvalidArgument(format!("no store holds session {session}")))
    }
}

#[async_trait]
impl Fixture for MemoryFixture {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn open(&self, namespace: &str) -> Result<Arc<dyn Registry>> {
        let store = self
            .stores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(namespace.to_owned())
            .or_default()
            .clone();
        let options = MemoryOptions::default().with_session_ttl(Duration::from_secs(2));
        Ok(Arc::new(MemoryRegistry::connect(&store, options).await?))
    }

    fn supports(&self, fault: Fault) -> bool {
        matches!(fault, Fault::ExpireSession | Fault::InterruptConnection)
    }

    async fn expire_session(&self, session: SessionId) -> Result<()> {
        self.store_of(session)?.expire_session(session)
    }

    async fn interrupt_connection(&self, session: SessionId, duration: Duration) -> Result<()> {
        self.store_of(session)?
            .interrupt_connection(session, duration)
    }

    async fn active_watches(&self, namespace: &str) -> Option<usize> {
        let stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
        stores.get(namespace).map(|s| s.watcher_count())
    }

    fn expiry_bound(&self) -> Duration {
        Duration::from_secs(3)
    }
}
