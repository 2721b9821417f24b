//! The whole conformance suite on the wrapper over a real etcd started by the public harness.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use conformance_tests::harness::EtcdServer;
use conformance_tests::{conformance_suite, Fault, Fixture};
use instrumented_registry::InstrumentedRegistry;
use registry_core::{Error, NodePath, Registry, Result, SessionId};
use registry_etcd::{EtcdOptions, EtcdRegistry};

struct WrappedEtcd {
    endpoint: String,
    _server: Mutex<EtcdServer>,
}

#[async_trait]
impl Fixture for WrappedEtcd {
    fn name(&self) -> &'static str {
        "instrumented-etcd"
    }
    async fn open(&self, namespace: &str) -> Result<Arc<dyn Registry>> {
        let options = EtcdOptions::new([self.endpoint.clone()])
            .with_namespace(NodePath::new(format!("/{namespace}"))?)
            .with_session_ttl(Duration::from_secs(2));
        let inner: Arc<dyn Registry> = Arc::new(EtcdRegistry::connect(options).await?);
        Ok(Arc::new(InstrumentedRegistry::new(inner)))
    }
    fn supports(&self, fault: Fault) -> bool {
        fault == Fault::ExpireSession
    }
    async fn expire_session(&self, session: SessionId) -> Result<()> {
        let mut client = etcd_client::Client::connect([self.endpoint.clone()], None)
            .await
            .map_err(|e| Error::unavailable(e.to_string()))?;
        client
            .lease_revoke(session.0)
            .await
            .map_err(|e| Error::unavailable(e.to_string()))?;
        Ok(())
    }
    fn expiry_bound(&self) -> Duration {
        Duration::from_secs(4)
    }
}

fn fixture() -> Arc<dyn Fixture> {
    static FIXTURE: OnceLock<Arc<dyn Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            let server = EtcdServer::start().unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
            Arc::new(WrappedEtcd {
                endpoint: server.endpoint(),
                _server: Mutex::new(server),
            })
        })
        .clone()
}

conformance_suite!(fixture);
