//! The whole conformance suite against a real ZooKeeper started by the harness.
//!
//! Each client connects through its own harness proxy, so the fixture can partition one
//! client: a blackhole longer than the session timeout makes the server expire the session
//! for real; a shorter one is a connection blip.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use conformance_tests::harness::{four_letter, Cluster, TcpProxy, ZkConfig, ZkEnsemble, ZkServer};
use conformance_tests::{conformance_suite, Fault, Fixture};
use registry_core::{Error, NodePath, Registry, Result, SessionId};
use registry_zk::{ZkOptions, ZkRegistry};

const SESSION_TIMEOUT: Duration = Duration::from_secs(2);

struct Client {
    registry: Weak<ZkRegistry>,
    proxy: Arc<TcpProxy>,
}

/// The shared server starts with the first case that needs it (owner processes, which only
/// call `connect_to`, never start one).
struct ZkFixture {
    server: OnceLock<Mutex<ZkServer>>,
    clients: Mutex<Vec<Client>>,
}

/// Short ticks so sessions of 2 s are allowed and expire promptly.
fn config() -> ZkConfig {
    ZkConfig {
        tick_time: Duration::from_millis(200),
    }
}

impl ZkFixture {
    fn proxy_of(&self, session: SessionId) -> Result<Arc<TcpProxy>> {
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .iter()
            .find(|c| {
                c.registry
                    .upgrade()
                    .is_some_and(|r| r.session().session_id == Some(session))
            })
            .map(|c| c.proxy.clone())
            .ok_or_else(|| {
                Error::InvalidArgument(format!("no open client holds session {session}"))
            })
    }
}

#[async_trait]
impl Fixture for ZkFixture {
    fn name(&self) -> &'static str {
        "zookeeper"
    }

    async fn open(&self, namespace: &str) -> Result<Arc<dyn Registry>> {
        // Starting the shared server blocks, once.
        let upstream = tokio::task::block_in_place(|| {
            self.server
                .get_or_init(|| {
                    Mutex::new(
                        ZkServer::start(config())
                            .unwrap_or_else(|e| panic!("cannot start ZooKeeper: {e}")),
                    )
                })
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .addr()
        });
        let proxy = Arc::new(TcpProxy::start(upstream).map_err(Error::unavailable)?);
        let options = ZkOptions::new([proxy.addr().to_string()])
            .with_namespace(NodePath::new(format!("/{namespace}"))?)
            .with_session_ttl(SESSION_TIMEOUT);
        let registry = Arc::new(ZkRegistry::connect(options).await?);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients.retain(|c| c.registry.strong_count() > 0);
        clients.push(Client {
            registry: Arc::downgrade(&registry),
            proxy,
        });
        Ok(registry)
    }

    fn supports(&self, fault: Fault) -> bool {
        matches!(
            fault,
            Fault::ExpireSession | Fault::InterruptConnection | Fault::Servers
        )
    }

    async fn start_cluster(&self, size: usize) -> Result<Box<dyn Cluster>> {
        let ensemble = tokio::task::spawn_blocking(move || ZkEnsemble::start(size, config()))
            .await
            .map_err(|e| Error::unavailable(e.to_string()))?
            .map_err(Error::unavailable)?;
        Ok(Box::new(ensemble))
    }

    async fn connect_to(&self, members: &[SocketAddr]) -> Result<Arc<dyn Registry>> {
        let hosts: Vec<String> = members.iter().map(|m| m.to_string()).collect();
        let options = ZkOptions::new([hosts.join(",")]).with_session_ttl(SESSION_TIMEOUT);
        Ok(Arc::new(ZkRegistry::connect(options).await?))
    }

    fn session_ttl(&self) -> Duration {
        SESSION_TIMEOUT
    }

    /// Partitions the client until the server has expired the session: at expiry it closes
    /// the session's connection, which `cons` then no longer lists.
    async fn expire_session(&self, session: SessionId) -> Result<()> {
        let proxy = self.proxy_of(session)?;
        proxy.blackhole();
        let server = proxy.upstream();
        // With its comma: no longer session ID that starts with the same digits matches.
        let sid = format!("sid=0x{:x},", session.0 as u64);
        let bound = SESSION_TIMEOUT * 2 + Duration::from_secs(5);
        let deadline = tokio::time::Instant::now() + bound;
        let mut seen = false;
        let expired = loop {
            let cons = tokio::task::spawn_blocking(move || four_letter(server, "cons"))
                .await
                .ok()
                .flatten();
            if let Some(cons) = cons {
                // Listed first: the check below cannot pass on a misspelt session ID.
                if cons.contains(&sid) {
                    seen = true;
                } else if seen {
                    break true;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        proxy.forward();
        if !expired {
            return Err(Error::unavailable(format!(
                "the server did not expire session {sid} within {bound:?} of the partition \
                 (listed by cons at all: {seen})"
            )));
        }
        Ok(())
    }

    async fn interrupt_connection(&self, session: SessionId, duration: Duration) -> Result<()> {
        let proxy = self.proxy_of(session)?;
        proxy.cut();
        tokio::time::sleep(duration).await;
        proxy.forward();
        Ok(())
    }

    fn expiry_bound(&self) -> Duration {
        Duration::from_secs(6)
    }
}

fn fixture() -> Arc<dyn Fixture> {
    static FIXTURE: OnceLock<Arc<dyn Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            Arc::new(ZkFixture {
                server: OnceLock::new(),
                clients: Mutex::new(Vec::new()),
            })
        })
        .clone()
}

conformance_suite!(fixture);
