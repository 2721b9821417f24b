//! `ServiceView` when one of its watches fails: it keeps serving the last state marked stale,
//! watches every source again (retrying while that fails), and never publishes a state that
//! is both fresh and missing what it knew. (Its faulty registry also serves a provider test:
//! config nodes an ACL keeps from providers.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};
use registry_core::{
    Bytes, Capabilities, Children, CreateMode, DeleteScope, Error, Expected, MemoryOptions,
    MemoryRegistry, MemoryStore, Node, NodePath, RegisterOptions, Registration, Registry, Result,
    SessionStatus, WatchOptions, WatchStream,
};
use registry_soa::{Address, Provider, ServiceSnapshot, ServiceView};

const SERVICE: &str = "test.RewatchService";

/// A registry whose watches of one path the test can make fail, and whose next `watch` calls
/// it can refuse; everything else goes to `inner`.
struct FaultyWatches {
    inner: Arc<dyn Registry>,
    /// Open watches of these paths yield an error and end when they are sent.
    fail: tokio::sync::watch::Sender<Vec<NodePath>>,
    /// `watch` calls still to refuse.
    refuse: AtomicUsize,
    /// While set, persistent creates under `/soa/config` are refused for want of permission,
    /// existing node or not (ZooKeeper checks the parent's ACL first).
    deny_config_creates: std::sync::atomic::AtomicBool,
    /// While set, persistent creates under `/soa/config` fail as if the server were out of
    /// reach.
    fail_config_creates: std::sync::atomic::AtomicBool,
}

impl FaultyWatches {
    /// A client of `store` that fails nothing until told to.
    async fn on(store: &MemoryStore) -> FaultyWatches {
        FaultyWatches {
            inner: Arc::new(
                MemoryRegistry::connect(store, MemoryOptions::default())
                    .await
                    .unwrap(),
            ),
            fail: tokio::sync::watch::channel(Vec::new()).0,
            refuse: AtomicUsize::new(0),
            deny_config_creates: Default::default(),
            fail_config_creates: Default::default(),
        }
    }
}

#[async_trait]
impl Registry for FaultyWatches {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn session(&self) -> SessionStatus {
        self.inner.session()
    }
    fn session_events(&self) -> BoxStream<'static, SessionStatus> {
        self.inner.session_events()
    }
    async fn create(&self, path: &NodePath, value: Bytes, mode: CreateMode) -> Result<Node> {
        let config = path.as_str().starts_with("/soa/config/") && !mode.is_ephemeral();
        if config && self.deny_config_creates.load(Ordering::SeqCst) {
            return Err(Error::PermissionDenied { path: path.clone() });
        }
        if config && self.fail_config_creates.load(Ordering::SeqCst) {
            return Err(Error::unavailable("config create failed by the test"));
        }
        self.inner.create(path, value, mode).await
    }
    async fn get(&self, path: &NodePath) -> Result<Node> {
        self.inner.get(path).await
    }
    async fn exists(&self, path: &NodePath) -> Result<bool> {
        self.inner.exists(path).await
    }
    async fn set(&self, path: &NodePath, value: Bytes, expected: Expected) -> Result<Node> {
        self.inner.set(path, value, expected).await
    }
    async fn delete(&self, path: &NodePath, expected: Expected, scope: DeleteScope) -> Result<()> {
        self.inner.delete(path, expected, scope).await
    }
    async fn children(&self, path: &NodePath) -> Result<Children> {
        self.inner.children(path).await
    }
    async fn watch(&self, path: &NodePath, options: WatchOptions) -> Result<WatchStream> {
        let refused = self
            .refuse
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refused {
            return Err(Error::unavailable("watch refused by the test"));
        }
        let inner = self.inner.watch(path, options).await?;
        let mut failing = self.fail.subscribe();
        let path = path.clone();
        let failed = async move {
            while failing.changed().await.is_ok() {
                if failing.borrow().contains(&path) {
                    return;
                }
            }
            std::future::pending::<()>().await
        };
        Ok(inner
            .take_until(failed)
            .chain(stream::once(async {
                Err(Error::unavailable("watch failed by the test"))
            }))
            .boxed())
    }
    async fn register(
        &self,
        path: &NodePath,
        value: Bytes,
        options: RegisterOptions,
    ) -> Result<Registration> {
        self.inner.register(path, value, options).await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

fn address(last: u8) -> Address {
    Address {
        ip: [10, 0, 0, last].into(),
        port: 9090,
    }
}

/// Collects every snapshot the view publishes until `done` holds (bounded).
async fn follow(
    view: &ServiceView,
    what: &str,
    done: impl Fn(&ServiceSnapshot) -> bool,
) -> Vec<Arc<ServiceSnapshot>> {
    let mut changes = view.changes();
    let mut seen = Vec::new();
    let reached = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let now = view.snapshot();
            seen.push(now.clone());
            if done(&now) {
                return true;
            }
            if changes.changed().await.is_err() {
                return false;
            }
        }
    })
    .await;
    assert_eq!(reached, Ok(true), "the view never reached: {what}");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_watch_is_watched_again_and_the_view_is_never_fresh_and_emptied() {
    let store = MemoryStore::new();
    let providers: Arc<dyn Registry> = Arc::new(
        MemoryRegistry::connect(&store, MemoryOptions::default())
            .await
            .unwrap(),
    );
    let consumer = Arc::new(FaultyWatches::on(&store).await);
    let mut held = Vec::new();
    for last in [1, 2] {
        held.push(
            Provider::register(&providers, SERVICE, address(last), "1.0.0")
                .await
                .unwrap(),
        );
    }
    let config = NodePath::new(format!("/soa/config/services/{SERVICE}")).unwrap();
    providers
        .set(
            &config,
            Bytes::from("weight/0;weight/10.0.0.1/9090/100"),
            Expected::Any,
        )
        .await
        .unwrap();
    let view = ServiceView::open(consumer.clone(), SERVICE).await.unwrap();
    let whole = |s: &ServiceSnapshot, instances: usize| {
        s.instances.len() == instances && s.config.weights.len() == 2
    };
    follow(&view, "both instances and the config", |s| {
        !s.stale && whole(s, 2)
    })
    .await;

    // Every watch fails at once, and the first two attempts to watch again are refused.
    consumer.refuse.store(2, Ordering::SeqCst);
    let runtime = NodePath::new(format!("/soa/runtime/services/{SERVICE}")).unwrap();
    consumer
        .fail
        .send_replace(vec![runtime.clone(), config.clone()]);
    let seen = follow(&view, "stale after the failure", |s| s.stale).await;
    let seen_after = follow(&view, "fresh again", |s| !s.stale).await;
    for s in seen.iter().chain(&seen_after) {
        assert!(
            s.stale || whole(s, 2),
            "a fresh view lost what it knew: {} instances, {} weight rules",
            s.instances.len(),
            s.config.weights.len()
        );
    }

    // Only the instances' watch fails, and watching again is refused once: the view must
    // still follow new instances afterwards.
    consumer.refuse.store(1, Ordering::SeqCst);
    consumer.fail.send_replace(vec![runtime]);
    held.push(
        Provider::register(&providers, SERVICE, address(3), "1.0.0")
            .await
            .unwrap(),
    );
    follow(&view, "the third instance, fresh", |s| {
        !s.stale && whole(s, 3)
    })
    .await;
    drop(view);
    for provider in held {
        provider.shutdown().await.unwrap();
    }
}

/// A view whose registry was closed used to stay fresh, although nothing could update it.
#[tokio::test]
async fn a_view_of_a_closed_registry_is_stale() {
    let store = MemoryStore::new();
    let consumer: Arc<dyn Registry> = Arc::new(
        MemoryRegistry::connect(&store, MemoryOptions::default())
            .await
            .unwrap(),
    );
    let view = ServiceView::open(consumer.clone(), SERVICE).await.unwrap();
    let mut changes = view.changes();
    assert!(!view.snapshot().stale, "a fresh view starts stale");
    consumer.close().await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        changes.wait_for(|_| view.snapshot().stale),
    )
    .await
    .expect("the view of a closed registry is not stale within 5 s")
    .expect("the view's task ended without marking it stale");
}

/// After a connection cut, a view used to turn fresh as soon as the session was live again,
/// while what changed during the cut was still on its way: a fresh view must already hold
/// it. 20 rounds: before the fix, runs failed within the first dozen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_is_not_fresh_after_a_reconnect_until_it_has_caught_up() {
    let store = MemoryStore::new();
    let providers: Arc<dyn Registry> = Arc::new(
        MemoryRegistry::connect(&store, MemoryOptions::default())
            .await
            .unwrap(),
    );
    let consumer = Arc::new(
        MemoryRegistry::connect(&store, MemoryOptions::default())
            .await
            .unwrap(),
    );
    let view = ServiceView::open(consumer.clone() as Arc<dyn Registry>, SERVICE)
        .await
        .unwrap();
    let mut held = Vec::new();
    let mut checked = 0;
    for round in 0..20u8 {
        follow(&view, "fresh with every instance", |s| {
            !s.stale && s.instances.len() == held.len()
        })
        .await;
        let session = consumer.session().session_id.unwrap();
        store
            .interrupt_connection(session, Duration::from_millis(200))
            .unwrap();
        follow(&view, "stale during the cut", |s| s.stale).await;
        held.push(
            Provider::register(&providers, SERVICE, address(round + 1), "1.0.0")
                .await
                .unwrap(),
        );
        // A slow machine may register after the cut: that round proves nothing.
        let during_cut = !consumer.session().state.is_live();
        let seen = follow(&view, "fresh after the cut", |s| !s.stale).await;
        if !during_cut {
            continue;
        }
        checked += 1;
        let fresh = seen.last().unwrap();
        assert_eq!(
            fresh.instances.len(),
            held.len(),
            "round {round}: fresh after the reconnect without the instance registered during the cut: {:?}",
            seen.iter().map(|s| (s.stale, s.instances.len(), s.generation)).collect::<Vec<_>>()
        );
    }
    assert!(
        checked >= 10,
        "only {checked} of 20 registrations came during the cut"
    );
    drop(view);
    for provider in held {
        provider.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_registers_where_config_nodes_refuse_its_creates() {
    // An ACL keeps /soa/config for the admin console: a provider's create there is refused,
    // whether the node exists (ZooKeeper checks the parent's permission first) or not.
    let store = MemoryStore::new();
    let admin: Arc<dyn Registry> = Arc::new(
        MemoryRegistry::connect(&store, MemoryOptions::default())
            .await
            .unwrap(),
    );
    let paths = registry_soa::layout::ServicePaths::new(SERVICE).unwrap();
    admin
        .create(
            &paths.config,
            Bytes::from("timeout/800ms"),
            CreateMode::Persistent,
        )
        .await
        .unwrap();
    let denying = FaultyWatches::on(&store).await;
    denying.deny_config_creates.store(true, Ordering::SeqCst);
    let provider: Arc<dyn Registry> = Arc::new(denying);
    let registered = Provider::register(&provider, SERVICE, address(1), "1.0.0")
        .await
        .unwrap_or_else(|e| panic!("a refused config create failed the registration: {e}"));
    assert!(registered.is_registered());
    assert_eq!(
        admin.children(&paths.runtime).await.unwrap().nodes.len(),
        1,
        "the instance node is missing"
    );
    // The routes node, missing and refused, is simply not there.
    assert!(!admin.exists(&paths.routes).await.unwrap());
    registered.shutdown().await.unwrap();

    // Any other failure is the caller's to hear, as before.
    let failing = FaultyWatches::on(&store).await;
    failing.fail_config_creates.store(true, Ordering::SeqCst);
    let failing: Arc<dyn Registry> = Arc::new(failing);
    match Provider::register(&failing, SERVICE, address(2), "1.0.0").await {
        Err(registry_soa::SoaError::Registry(Error::Unavailable { .. })) => {}
        other => panic!(
            "expected the outage to fail the registration, got {:?}",
            other.map(|p| p.path())
        ),
    }
}
