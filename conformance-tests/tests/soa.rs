//! The Dapeng layer on every backend: registration and discovery, churn, live config and
//! routes, master failover. Scenarios are written once and run on memory, etcd and ZooKeeper.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use conformance_tests::harness::{EtcdServer, TcpProxy, ZkConfig, ZkServer};
use conformance_tests::support::eventually;
use conformance_tests::{Fixture, MemoryFixture};
use registry_core::{Bytes, CreateMode, Expected, NodePath, Registry, SessionId};
use registry_etcd::{EtcdOptions, EtcdRegistry};
use registry_soa::master::watch_mastership;
use registry_soa::routes::CallContext;
use registry_soa::{Address, Provider, SelectOptions, ServiceView, SoaError};
use registry_zk::{ZkOptions, ZkRegistry};

type Opened = Pin<Box<dyn Future<Output = Arc<dyn Registry>> + Send>>;
type Expired = Pin<Box<dyn Future<Output = ()> + Send>>;
/// A ZooKeeper client's session and the proxy it connects through.
type ProxiedSession = (Option<SessionId>, Arc<TcpProxy>);

/// How a scenario reaches a backend: open a client (its own session), expire a session.
struct Backend {
    open: Box<dyn Fn() -> Opened + Send + Sync>,
    expire: Box<dyn Fn(Arc<dyn Registry>) -> Expired + Send + Sync>,
}

const SERVICE: &str = "com.today.service.goods.GoodsService";

fn addr(s: &str) -> Address {
    s.parse().unwrap()
}

fn call(method: &str) -> CallContext {
    CallContext {
        service: SERVICE.into(),
        method: method.into(),
        version: "1.0.0".into(),
        ..Default::default()
    }
}

async fn wait_for(
    view: &ServiceView,
    what: &str,
    pred: impl Fn(&registry_soa::ServiceSnapshot) -> bool,
) {
    let mut changes = view.changes();
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if pred(&view.snapshot()) {
                return;
            }
            if changes.changed().await.is_err() {
                panic!("view ended while waiting for {what}");
            }
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "{what}: not reached; view has {:?}",
        view.snapshot()
            .instances
            .iter()
            .map(|i| i.address.to_string())
            .collect::<Vec<_>>()
    );
}

async fn registration_discovery_and_churn(b: &Backend) {
    let consumer = (b.open)().await;
    let mut providers = Vec::new();
    for a in ["10.0.0.1:909", "10.0.0.1:9090", "10.0.0.2:9090"] {
        let client = (b.open)().await;
        providers.push(
            Provider::register(&client, SERVICE, addr(a), "1.0.0")
                .await
                .unwrap(),
        );
    }
    let view = ServiceView::open(consumer.clone(), SERVICE).await.unwrap();
    wait_for(&view, "three instances", |s| s.instances.len() == 3).await;
    let snap = view.snapshot();
    assert!(snap
        .instances
        .iter()
        .all(|i| i.version.as_deref() == Some("1.0.0") && i.sequence.is_some()));
    // Shutting down 10.0.0.1:909 must not touch 10.0.0.1:9090, whose name starts the same.
    let gone = providers.remove(0);
    gone.shutdown().await.unwrap();
    wait_for(&view, "the shut-down instance gone", |s| {
        s.instances.len() == 2
    })
    .await;
    let left: Vec<String> = view
        .snapshot()
        .instances
        .iter()
        .map(|i| i.address.to_string())
        .collect();
    assert_eq!(left, ["10.0.0.1:9090", "10.0.0.2:9090"]);
    for p in providers {
        p.shutdown().await.unwrap();
    }
    wait_for(&view, "no instance", |s| s.instances.is_empty()).await;
    assert!(matches!(
        view.select(&call("get"), &SelectOptions::default()),
        Err(SoaError::NoInstance { .. })
    ));
}

async fn config_and_routes_apply_live(b: &Backend) {
    let operator = (b.open)().await;
    let client_a = (b.open)().await;
    let client_b = (b.open)().await;
    let a = Provider::register(&client_a, SERVICE, addr("10.0.1.1:9090"), "1.0.0")
        .await
        .unwrap();
    let b2 = Provider::register(&client_b, SERVICE, addr("10.0.1.2:9090"), "1.1.0")
        .await
        .unwrap();
    let view = ServiceView::open(operator.clone(), SERVICE).await.unwrap();
    wait_for(&view, "two instances", |s| s.instances.len() == 2).await;

    let routes = NodePath::new(format!("/soa/config/routes/{SERVICE}")).unwrap();
    operator
        .set(
            &routes,
            Bytes::from("method match 'getFoo' => ip'10.0.1.2'"),
            Expected::Any,
        )
        .await
        .unwrap();
    wait_for(&view, "routes applied", |s| s.routes.len() == 1).await;
    for _ in 0..20 {
        assert_eq!(
            view.select(&call("getFoo"), &SelectOptions::default())
                .unwrap()
                .address,
            addr("10.0.1.2:9090")
        );
    }
    operator
        .set(
            &routes,
            Bytes::from("method match 'getFoo' => ~ip'10.0.1.0/24'"),
            Expected::Any,
        )
        .await
        .unwrap();
    wait_for(&view, "routes changed", |s| {
        s.routes.first().is_some_and(|r| {
            r.targets.len() == 1 && format!("{:?}", r.targets[0]).contains("negated: true")
        })
    })
    .await;
    assert!(matches!(
        view.select(&call("getFoo"), &SelectOptions::default()),
        Err(SoaError::RoutingExcludedAll { .. })
    ));
    // A caller built against 1.1 may only use 1.1+ instances.
    let mut newer = call("other");
    newer.version = "1.1.0".into();
    for _ in 0..20 {
        assert_eq!(
            view.select(&newer, &SelectOptions::default())
                .unwrap()
                .address,
            addr("10.0.1.2:9090")
        );
    }
    newer.version = "2.0.0".into();
    assert!(matches!(
        view.select(&newer, &SelectOptions::default()),
        Err(SoaError::VersionMismatch { .. })
    ));

    // Service config: weights (most specific wins) and the strategy, applied as written.
    let config = NodePath::new(format!("/soa/config/services/{SERVICE}")).unwrap();
    operator
        .set(
            &config,
            Bytes::from("loadBalance/roundRobin\nweight/0;weight/10.0.1.1/9090/100"),
            Expected::Any,
        )
        .await
        .unwrap();
    wait_for(&view, "config applied", |s| s.config.weights.len() == 2).await;
    for _ in 0..20 {
        assert_eq!(
            view.select(&call("other"), &SelectOptions::default())
                .unwrap()
                .address,
            addr("10.0.1.1:9090")
        );
    }
    // The global config node reaches the view too.
    let global = NodePath::new("/soa/config/services").unwrap();
    operator
        .set(&global, Bytes::from("timeout/3s"), Expected::Any)
        .await
        .unwrap();
    wait_for(&view, "global config applied", |s| {
        s.global.timeout.default == Some(Duration::from_secs(3))
    })
    .await;
    a.shutdown().await.unwrap();
    b2.shutdown().await.unwrap();
}

async fn master_fails_over(b: &Backend) {
    let consumer = (b.open)().await;
    let first_client = (b.open)().await;
    let first = Provider::register(&first_client, SERVICE, addr("10.0.2.1:9090"), "1.0.0")
        .await
        .unwrap();
    let second_client = (b.open)().await;
    let second = Provider::register(&second_client, SERVICE, addr("10.0.2.2:9090"), "1.0.0")
        .await
        .unwrap();
    let view = ServiceView::open(consumer, SERVICE).await.unwrap();
    wait_for(&view, "both instances", |s| s.instances.len() == 2).await;
    let mut first_master = watch_mastership(&view, &first);
    let mut second_master = watch_mastership(&view, &second);
    assert!(
        *first_master.borrow_and_update(),
        "the oldest instance must be master"
    );
    assert!(!*second_master.borrow_and_update());
    // The master's session dies (its process hangs or is killed): the other takes over and
    // the old master is told.
    (b.expire)(first_client.clone()).await;
    let moved = tokio::time::timeout(Duration::from_secs(20), second_master.wait_for(|m| *m)).await;
    assert!(moved.is_ok(), "no failover to the second instance");
    eventually(
        Duration::from_secs(20),
        "old master told it is not master",
        || {
            let first_master = first_master.clone();
            async move { !*first_master.borrow() }
        },
    )
    .await;
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}

/// A quick restart: the previous run's nodes of the address (its session not expired yet,
/// nothing healing them), whatever their version (a deploy), are removed by the new run's
/// registration, as Dapeng's provider does for its own version, so consumers see the
/// instance once. Other ports of the host, and the nodes of the registering session itself,
/// stay.
async fn a_restarted_instance_removes_its_previous_runs_node(b: &Backend) {
    let consumer = (b.open)().await;
    let view = ServiceView::open(consumer, SERVICE).await.unwrap();
    let previous_run = (b.open)().await;
    let runtime = NodePath::new(format!("/soa/runtime/services/{SERVICE}")).unwrap();
    let mut left = Vec::new();
    for name in [
        "10.0.3.1:9090:1.0.0:",
        "10.0.3.1:9090:1.0.1:",
        "10.0.3.1:9092:1.0.0:",
    ] {
        let node = runtime.join(name).unwrap();
        let created = previous_run
            .create(&node, Bytes::new(), CreateMode::EphemeralSequential)
            .await
            .unwrap();
        left.push(created.path);
    }
    wait_for(&view, "the previous run's three nodes", |s| {
        s.instances.len() == 3
    })
    .await;
    let client = (b.open)().await;
    let restarted = Provider::register(&client, SERVICE, addr("10.0.3.1:9090"), "1.0.0")
        .await
        .unwrap();
    for gone in &left[..2] {
        assert!(
            !previous_run.exists(gone).await.unwrap(),
            "{gone}, the previous run's node of the same address, is still there"
        );
    }
    assert!(
        previous_run.exists(&left[2]).await.unwrap(),
        "{} (another port) was removed",
        left[2]
    );
    // A second registration of the address in the same session takes the first's node (its
    // own session's), not removes it.
    let again = Provider::register(&client, SERVICE, addr("10.0.3.1:9090"), "1.0.0")
        .await
        .unwrap();
    assert!(restarted.is_registered() && again.is_registered());
    let count = |s: &registry_soa::ServiceSnapshot, a: &str, v: &str| {
        s.instances
            .iter()
            .filter(|i| i.address == addr(a) && i.version.as_deref() == Some(v))
            .count()
    };
    wait_for(
        &view,
        "the restarted instance once, beside the other nodes",
        |s| {
            s.instances
                .iter()
                .filter(|i| {
                    i.address == addr("10.0.3.1:9090") && i.version.as_deref() == Some("1.0.0")
                })
                .all(|i| restarted.path() == Some(i.path.clone()))
                && count(s, "10.0.3.1:9090", "1.0.0") == 1
                && count(s, "10.0.3.1:9090", "1.0.1") == 0
                && count(s, "10.0.3.1:9092", "1.0.0") == 1
                && s.instances.iter().all(|i| i.path != left[0])
        },
    )
    .await;
    again.shutdown().await.unwrap();
    restarted.shutdown().await.unwrap();
}

async fn all_scenarios(b: Backend) {
    registration_discovery_and_churn(&b).await;
    config_and_routes_apply_live(&b).await;
    master_fails_over(&b).await;
    a_restarted_instance_removes_its_previous_runs_node(&b).await;
}

fn memory_backend() -> Backend {
    let fx = Arc::new(MemoryFixture::new());
    let ns = format!("soa_{}", rand::random::<u32>());
    let fx2 = fx.clone();
    Backend {
        open: Box::new(move || {
            let (fx, ns) = (fx.clone(), ns.clone());
            Box::pin(async move { fx.open(&ns).await.unwrap() })
        }),
        expire: Box::new(move |client| {
            let fx = fx2.clone();
            Box::pin(async move {
                fx.expire_session(client.session().session_id.unwrap())
                    .await
                    .unwrap()
            })
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soa_on_memory() {
    all_scenarios(memory_backend()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soa_on_etcd() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let ep = server.endpoint();
    let ep2 = ep.clone();
    let backend = Backend {
        open: Box::new(move || {
            let ep = ep.clone();
            Box::pin(async move {
                let o = EtcdOptions::new([ep]).with_session_ttl(Duration::from_secs(2));
                Arc::new(EtcdRegistry::connect(o).await.unwrap()) as Arc<dyn Registry>
            })
        }),
        expire: Box::new(move |client| {
            let ep = ep2.clone();
            Box::pin(async move {
                let session = client.session().session_id.unwrap();
                let raw = etcd_client::Client::connect([ep], None).await.unwrap();
                let revoked = registry_etcd::revoke_session(&raw, session, Duration::from_secs(5))
                    .await
                    .unwrap();
                assert!(revoked > 0, "session {session:?} had no lease to revoke");
            })
        }),
    };
    all_scenarios(backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soa_on_zookeeper() {
    let server = ZkServer::start(ZkConfig {
        tick_time: Duration::from_millis(200),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let upstream = server.addr();
    // Every client goes through its own proxy so one session can be partitioned away.
    let proxies: Arc<std::sync::Mutex<Vec<ProxiedSession>>> = Arc::default();
    let (p1, p2) = (proxies.clone(), proxies.clone());
    let backend = Backend {
        open: Box::new(move || {
            let proxies = p1.clone();
            Box::pin(async move {
                let proxy = Arc::new(TcpProxy::start(upstream).unwrap());
                let o = ZkOptions::new([proxy.addr().to_string()])
                    .with_session_ttl(Duration::from_secs(2));
                let client = Arc::new(ZkRegistry::connect(o).await.unwrap()) as Arc<dyn Registry>;
                proxies
                    .lock()
                    .unwrap()
                    .push((client.session().session_id, proxy));
                client
            })
        }),
        expire: Box::new(move |client| {
            let proxies = p2.clone();
            Box::pin(async move {
                let session = client.session().session_id;
                let proxy = proxies
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(s, _)| *s == session)
                    .map(|(_, p)| p.clone())
                    .unwrap();
                proxy.blackhole();
                tokio::time::sleep(Duration::from_millis(2800)).await;
                proxy.forward();
            })
        }),
    };
    all_scenarios(backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_discover_follows_the_instances() {
    use futures::StreamExt;
    use tower::discover::{Change, Discover};

    let b = memory_backend();
    let consumer = (b.open)().await;
    let one = Provider::register(&(b.open)().await, SERVICE, addr("10.0.3.1:9090"), "1.0.0")
        .await
        .unwrap();
    let view = ServiceView::open(consumer, SERVICE).await.unwrap();
    let mut discover = registry_soa::tower::discover(&view, |i| i.address.to_string());
    let first = tokio::time::timeout(Duration::from_secs(10), discover.next())
        .await
        .expect("discover reported the first instance within 10 s")
        .expect("discover stream ended")
        .expect("discover stream error");
    assert!(
        matches!(first, Change::Insert(a, ref s) if a == addr("10.0.3.1:9090") && s == "10.0.3.1:9090")
    );
    let two = Provider::register(&(b.open)().await, SERVICE, addr("10.0.3.2:9090"), "1.0.0")
        .await
        .unwrap();
    let inserted = tokio::time::timeout(Duration::from_secs(10), discover.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(inserted, Change::Insert(a, _) if a == addr("10.0.3.2:9090")));
    one.shutdown().await.unwrap();
    let removed = tokio::time::timeout(Duration::from_secs(10), discover.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(removed, Change::Remove(a) if a == addr("10.0.3.1:9090")));
    // It is a tower Discover as it stands, and Unpin, as tower's balancers need it to be.
    fn is_discover<D: Discover + Unpin>(_: &D) {}
    is_discover(&discover);
    two.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_serves_the_last_state_while_cut_off_and_says_so() {
    let fx = Arc::new(MemoryFixture::new());
    let ns = "soa_stale";
    let consumer = fx.open(ns).await.unwrap();
    let provider_client = fx.open(ns).await.unwrap();
    let provider = Provider::register(&provider_client, SERVICE, addr("10.0.4.1:9090"), "1.0.0")
        .await
        .unwrap();
    let view = ServiceView::open(consumer.clone(), SERVICE).await.unwrap();
    wait_for(&view, "the instance", |s| {
        s.instances.len() == 1 && !s.stale
    })
    .await;
    fx.interrupt_connection(
        consumer.session().session_id.unwrap(),
        Duration::from_millis(800),
    )
    .await
    .unwrap();
    wait_for(&view, "stale while cut off", |s| s.stale).await;
    // Still serving the last known instances.
    assert_eq!(
        view.select(&call("get"), &SelectOptions::default())
            .unwrap()
            .address,
        addr("10.0.4.1:9090")
    );
    wait_for(&view, "fresh again after reconnect", |s| {
        !s.stale && s.instances.len() == 1
    })
    .await;
    provider.shutdown().await.unwrap();
}

/// The next change of a discover stream, within 10 s.
async fn next_change(
    discover: &mut (impl futures::Stream<
        Item = Result<tower::discover::Change<Address, String>, std::convert::Infallible>,
    > + Unpin),
) -> tower::discover::Change<Address, String> {
    use futures::StreamExt;
    match tokio::time::timeout(Duration::from_secs(10), discover.next()).await {
        Ok(Some(Ok(change))) => change,
        Ok(Some(Err(never))) => match never {},
        Ok(None) => panic!("discover stream ended"),
        Err(_) => panic!("no change within 10 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_discover_replaces_the_service_when_another_node_takes_an_address() {
    use tower::discover::Change;

    let b = memory_backend();
    let view = ServiceView::open((b.open)().await, SERVICE).await.unwrap();
    let old = Provider::register(&(b.open)().await, SERVICE, addr("10.0.6.1:9090"), "1.0.0")
        .await
        .unwrap();
    wait_for(&view, "the old instance", |s| s.instances.len() == 1).await;
    let mut discover =
        registry_soa::tower::discover(&view, |i| i.version.clone().unwrap_or_default());
    let first = next_change(&mut discover).await;
    assert!(
        matches!(first, Change::Insert(a, ref v) if a == addr("10.0.6.1:9090") && v == "1.0.0")
    );
    // The provider is upgraded in place while the balancer is not polling: the new version
    // registers on the same address and the old one leaves before discover looks again.
    let new = Provider::register(&(b.open)().await, SERVICE, addr("10.0.6.1:9090"), "1.1.0")
        .await
        .unwrap();
    old.shutdown().await.unwrap();
    wait_for(&view, "only the new instance", |s| {
        s.instances.len() == 1 && s.instances[0].version.as_deref() == Some("1.1.0")
    })
    .await;
    let replaced = next_change(&mut discover).await;
    assert!(
        matches!(replaced, Change::Insert(a, ref v) if a == addr("10.0.6.1:9090") && v == "1.1.0"),
        "the balancer kept the service made for the old node"
    );
    new.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tower_discover_replaces_the_service_when_a_weight_is_rewritten_in_place() {
    use tower::discover::Change;

    let b = memory_backend();
    let writer = (b.open)().await;
    let node =
        registry_core::NodePath::new(format!("/soa/runtime/services/{SERVICE}/10.0.7.1:9090"))
            .unwrap();
    writer
        .create(
            &node,
            Bytes::from("100"),
            registry_core::CreateMode::Persistent,
        )
        .await
        .unwrap();
    let view = ServiceView::open((b.open)().await, SERVICE).await.unwrap();
    let mut discover =
        registry_soa::tower::discover(&view, |i| i.weight.unwrap_or_default().to_string());
    let first = next_change(&mut discover).await;
    assert!(matches!(first, Change::Insert(_, ref w) if w == "100"));
    // The etcd write-up's keys carry the weight as their value: an operator rewrites it.
    writer
        .set(&node, Bytes::from("300"), Expected::Any)
        .await
        .unwrap();
    let replaced = next_change(&mut discover).await;
    assert!(
        matches!(replaced, Change::Insert(a, ref w) if a == addr("10.0.7.1:9090") && w == "300"),
        "the balancer kept the service made with the old weight"
    );
}

/// What changed while a consumer was cut off is in the first fresh view it publishes after:
/// a view used to turn fresh as soon as its session was live again, with the changes still
/// on their way (an etcd watch resuming, a ZooKeeper re-read).
async fn fresh_after_a_cut_holds_what_changed(
    consumer: Arc<dyn Registry>,
    proxy: &TcpProxy,
    provider_client: Arc<dyn Registry>,
) {
    let view = ServiceView::open(consumer, SERVICE).await.unwrap();
    wait_for(&view, "fresh", |s| !s.stale).await;
    let mut held = Vec::new();
    for round in 1..=3u8 {
        let instance = addr(&format!("10.0.9.{round}:9090"));
        proxy.cut();
        wait_for(&view, "stale while cut off", |s| s.stale).await;
        held.push(
            Provider::register(&provider_client, SERVICE, instance, "1.0.0")
                .await
                .unwrap(),
        );
        proxy.forward();
        let mut changes = view.changes();
        let fresh = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let now = view.snapshot();
                if !now.stale {
                    return now;
                }
                changes.changed().await.unwrap();
            }
        })
        .await
        .expect("not fresh again within 20 s");
        assert!(
            fresh.instances.iter().any(|i| i.address == instance),
            "round {round}: fresh after the cut without {instance}, registered during it"
        );
    }
    for provider in held {
        provider.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_fresh_after_a_cut_holds_what_changed_on_etcd() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let proxy = TcpProxy::start(server.addr()).unwrap();
    let through = |endpoint: String| async move {
        let options = EtcdOptions::new([endpoint]).with_session_ttl(Duration::from_secs(10));
        Arc::new(EtcdRegistry::connect(options).await.unwrap()) as Arc<dyn Registry>
    };
    let consumer = through(proxy.addr().to_string()).await;
    let provider_client = through(server.endpoint()).await;
    fresh_after_a_cut_holds_what_changed(consumer, &proxy, provider_client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_fresh_after_a_cut_holds_what_changed_on_zookeeper() {
    let server = ZkServer::start(ZkConfig {
        tick_time: Duration::from_millis(200),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let proxy = TcpProxy::start(server.addr()).unwrap();
    let through = |endpoint: String| async move {
        let options = ZkOptions::new([endpoint]).with_session_ttl(Duration::from_secs(4));
        Arc::new(ZkRegistry::connect(options).await.unwrap()) as Arc<dyn Registry>
    };
    let consumer = through(proxy.addr().to_string()).await;
    let provider_client = through(server.connect_string()).await;
    fresh_after_a_cut_holds_what_changed(consumer, &proxy, provider_client).await;
}
