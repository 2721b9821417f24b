//! The whole conformance suite against a real etcd started by the harness.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use conformance_tests::harness::{Cluster, EtcdCluster, EtcdServer};
use conformance_tests::{conformance_suite, Fault, Fixture};
use registry_core::{Error, NodePath, Registry, Result, SessionId};
use registry_etcd::{EtcdOptions, EtcdRegistry};

const TTL: Duration = Duration::from_secs(2);

/// The shared server starts with the first case that needs it (owner processes, which only
/// call `connect_to`, never start one).
struct EtcdFixture {
    server: OnceLock<(String, Mutex<EtcdServer>)>,
}

impl EtcdFixture {
    fn endpoint(&self) -> String {
        self.server
            .get_or_init(|| {
                let server =
                    EtcdServer::start().unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
                (server.endpoint(), Mutex::new(server))
            })
            .0
            .clone()
    }
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::unavailable(e.to_string())
}

#[async_trait]
impl Fixture for EtcdFixture {
    fn name(&self) -> &'static str {
        "etcd"
    }

    async fn open(&self, namespace: &str) -> Result<Arc<dyn Registry>> {
        // Starting the shared server blocks, once.
        let endpoint = tokio::task::block_in_place(|| self.endpoint());
        let options = EtcdOptions::new([endpoint])
            .with_namespace(NodePath::new(format!("/{namespace}"))?)
            .with_session_ttl(TTL);
        Ok(Arc::new(EtcdRegistry::connect(options).await?))
    }

    fn supports(&self, fault: Fault) -> bool {
        matches!(
            fault,
            Fault::ExpireSession | Fault::Servers | Fault::Compaction
        )
    }

    async fn expire_session(&self, session: SessionId) -> Result<()> {
        let client = etcd_client::Client::connect([self.endpoint()], None)
            .await
            .map_err(unavailable)?;
        registry_etcd::revoke_session(&client, session, TTL)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn start_cluster(&self, size: usize) -> Result<Box<dyn Cluster>> {
        let cluster = tokio::task::spawn_blocking(move || EtcdCluster::start(size))
            .await
            .map_err(unavailable)?
            .map_err(unavailable)?;
        Ok(Box::new(cluster))
    }

    async fn connect_to(&self, members: &[SocketAddr]) -> Result<Arc<dyn Registry>> {
        let endpoints: Vec<String> = members.iter().map(|m| m.to_string()).collect();
        let options = EtcdOptions::new(endpoints).with_session_ttl(TTL);
        Ok(Arc::new(EtcdRegistry::connect(options).await?))
    }

    async fn compact(&self, members: &[SocketAddr]) -> Result<()> {
        let endpoints: Vec<String> = members.iter().map(|m| m.to_string()).collect();
        let mut client = etcd_client::Client::connect(endpoints, None)
            .await
            .map_err(unavailable)?;
        let revision = client
            .get("/", None)
            .await
            .map_err(unavailable)?
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| unavailable("no header in a get response"))?;
        client
            .compact(
                revision,
                Some(etcd_client::CompactionOptions::new().with_physical()),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn session_ttl(&self) -> Duration {
        TTL
    }

    fn expiry_bound(&self) -> Duration {
        Duration::from_secs(4)
    }
}

fn fixture() -> Arc<dyn Fixture> {
    static FIXTURE: OnceLock<Arc<dyn Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            Arc::new(EtcdFixture {
                server: OnceLock::new(),
            })
        })
        .clone()
}

conformance_suite!(fixture);
