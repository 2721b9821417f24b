//! A decorator of a registry for tests that need an answer to go wrong at a chosen moment.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use registry_core::memory::{MemoryOptions, MemoryRegistry, MemoryStore};
use registry_core::{
    Bytes, Capabilities, Children, CreateMode, DeleteScope, Error, Expected, Node, NodePath,
    RegisterOptions, Registration, Registry, Result, SessionStatus, WatchOptions, WatchStream,
};

/// `path` as a `NodePath`; tests write only valid ones.
#[allow(dead_code)] // Each test binary uses a part.
pub fn p(path: &str) -> NodePath {
    NodePath::new(path).unwrap()
}

/// A memory client of `store` with default options.
#[allow(dead_code)]
pub async fn client(store: &MemoryStore) -> Arc<MemoryRegistry> {
    Arc::new(
        MemoryRegistry::connect(store, MemoryOptions::default())
            .await
            .unwrap(),
    )
}

/// Turns the answer to a create or a set (already made on the inner registry) into what the
/// caller hears; it may act on other registries first.
pub type CreateHook =
    Arc<dyn Fn(NodePath, Result<Node>) -> BoxFuture<'static, Result<Node>> + Send + Sync>;

/// Runs before a set reaches the inner registry (it may act on other registries first).
pub type SetHook = Arc<dyn Fn(NodePath) -> BoxFuture<'static, ()> + Send + Sync>;

/// Passes every call to `inner`, except that a create's answer goes through `on_create` when
/// one is set, a set waits for `before_set` when one is set, while `fail_gets` every get (while `fail_children`, every children read)
/// fails with `Unavailable`, and while deletes are held they wait (a server that does not
/// answer yet).
pub struct Faulty {
    pub inner: Arc<dyn Registry>,
    on_create: Mutex<Option<CreateHook>>,
    before_set: Mutex<Option<SetHook>>,
    on_set: Mutex<Option<CreateHook>>,
    fail_gets: AtomicBool,
    /// Gets failed so far by `fail_gets`.
    gets_failed: AtomicUsize,
    fail_children: AtomicBool,
    /// Children reads failed so far by `fail_children`.
    children_failed: AtomicUsize,
    hold_deletes: tokio::sync::watch::Sender<bool>,
    /// While true, watch streams deliver nothing (their items wait, in order).
    hold_watch_items: tokio::sync::watch::Sender<bool>,
    late_creates: Mutex<Option<std::time::Duration>>,
    watches_opened: AtomicUsize,
    failing_watch_opens: AtomicUsize,
    refusing_watch_opens: AtomicBool,
    watch_breaks: tokio::sync::watch::Sender<u64>,
    /// Open watches of this path end, without an error, when it is sent.
    watch_ends: tokio::sync::watch::Sender<Option<NodePath>>,
    /// Watches opened while set lose their first item (a backend that skipped a snapshot).
    skip_first_items: AtomicBool,
    /// While set, watch streams drop their `Resync` items (a backend whose watches resume
    /// where they broke without one, as etcd's do).
    drop_resyncs: Arc<AtomicBool>,
    /// While set, `session()` reports this instead of the inner registry's status (a client
    /// that has given its session up while reads still show its nodes).
    reported_session: Mutex<Option<SessionStatus>>,
    /// Statuses sent to every `session_events` subscriber after the inner registry's.
    injected_sessions: tokio::sync::broadcast::Sender<SessionStatus>,
}

#[allow(dead_code)] // Each test binary uses a part.
impl Faulty {
    pub fn new(inner: Arc<dyn Registry>) -> Arc<Faulty> {
        Arc::new(Faulty {
            inner,
            on_create: Mutex::new(None),
            before_set: Mutex::new(None),
            on_set: Mutex::new(None),
            fail_gets: AtomicBool::new(false),
            gets_failed: AtomicUsize::new(0),
            fail_children: AtomicBool::new(false),
            children_failed: AtomicUsize::new(0),
            hold_deletes: tokio::sync::watch::channel(false).0,
            hold_watch_items: tokio::sync::watch::channel(false).0,
            late_creates: Mutex::new(None),
            watches_opened: AtomicUsize::new(0),
            failing_watch_opens: AtomicUsize::new(0),
            refusing_watch_opens: AtomicBool::new(false),
            watch_breaks: tokio::sync::watch::channel(0).0,
            watch_ends: tokio::sync::watch::channel(None).0,
            skip_first_items: AtomicBool::new(false),
            drop_resyncs: Arc::new(AtomicBool::new(false)),
            reported_session: Mutex::new(None),
            injected_sessions: tokio::sync::broadcast::channel(16).0,
        })
    }

    /// Hands `status` to every `session_events` subscriber (a transition the inner registry
    /// did not make, or one a lagging subscriber is told in place of those it missed).
    pub fn inject_session(&self, status: SessionStatus) {
        let _ = self.injected_sessions.send(status);
    }

    /// From now on `session()` reports `status` (`None`: the inner registry's again).
    pub fn report_session(&self, status: Option<SessionStatus>) {
        *self.reported_session.lock().unwrap() = status;
    }

    /// Whether watch streams drop their `Resync` items from now on.
    pub fn drop_resyncs(&self, drop: bool) {
        self.drop_resyncs.store(drop, Ordering::SeqCst);
    }

    /// How many watch streams were opened through this registry.
    pub fn watches_opened(&self) -> usize {
        self.watches_opened.load(Ordering::SeqCst)
    }

    /// The next `count` watch opens fail with `Unavailable`.
    pub fn fail_watch_opens(&self, count: usize) {
        self.failing_watch_opens.store(count, Ordering::SeqCst);
    }

    /// Whether watch opens are refused with `PermissionDenied` (not retryable) from now on.
    pub fn refuse_watch_opens(&self, refuse: bool) {
        self.refusing_watch_opens.store(refuse, Ordering::SeqCst);
    }

    /// Every watch stream open now yields `Unavailable` next, and ends.
    pub fn break_watches(&self) {
        self.watch_breaks.send_modify(|n| *n += 1);
    }

    /// Every watch stream of `path` open now ends, without an error.
    pub fn end_watches_of(&self, path: &NodePath) {
        self.watch_ends.send_replace(Some(path.clone()));
    }
    /// Whether watches opened from now on lose their first item (their snapshot).
    pub fn skip_first_items(&self, skip: bool) {
        self.skip_first_items.store(skip, Ordering::SeqCst);
    }
    /// Whether deletes (plain and by owner) wait before reaching `inner` from now on.
    pub fn hold_deletes(&self, hold: bool) {
        self.hold_deletes.send_replace(hold);
    }

    /// Whether watch streams hold their items back from now on (a watch that lags behind
    /// the session's events, as a ZooKeeper re-read after a reconnection does).
    pub fn hold_watch_items(&self, hold: bool) {
        self.hold_watch_items.send_replace(hold);
    }

    async fn until_deletes_pass(&self) {
        let mut held = self.hold_deletes.subscribe();
        let _ = held.wait_for(|hold| !*hold).await;
    }

    /// From now on, creates go through `hook`.
    pub fn on_create(&self, hook: CreateHook) {
        *self.on_create.lock().unwrap() = Some(hook);
    }

    /// From now on, sets first run `hook` (`None`: no more).
    pub fn before_set(&self, hook: Option<SetHook>) {
        *self.before_set.lock().unwrap() = hook;
    }

    /// From now on, a set's answer (the set already made on the inner registry) goes
    /// through `hook`.
    pub fn on_set(&self, hook: CreateHook) {
        *self.on_set.lock().unwrap() = Some(hook);
    }

    /// From now on, creates happen but report `Unavailable` (a lost reply).
    pub fn lose_create_replies(&self) {
        self.on_create(Arc::new(|_, answer| {
            Box::pin(async move {
                answer?;
                Err(Error::unavailable("reply lost by the test"))
            })
        }));
    }

    /// From now on, creates report a timeout at once and happen `after` that (a request
    /// still in the server's pipeline when its caller gave up).
    pub fn commit_creates_late(&self, after: std::time::Duration) {
        *self.late_creates.lock().unwrap() = Some(after);
    }

    /// Whether every get fails from now on.
    pub fn fail_gets(&self, fail: bool) {
        self.fail_gets.store(fail, Ordering::SeqCst);
    }

    /// How many gets `fail_gets` has failed.
    pub fn gets_failed(&self) -> usize {
        self.gets_failed.load(Ordering::SeqCst)
    }

    /// Whether children reads fail from now on.
    pub fn fail_children(&self, fail: bool) {
        self.fail_children.store(fail, Ordering::SeqCst);
    }

    /// How many children reads `fail_children` has failed.
    pub fn children_failed(&self) -> usize {
        self.children_failed.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Registry for Faulty {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn session(&self) -> SessionStatus {
        if let Some(status) = *self.reported_session.lock().unwrap() {
            return status;
        }
        self.inner.session()
    }
    fn session_events(&self) -> BoxStream<'static, SessionStatus> {
        let injected =
            futures::stream::unfold(self.injected_sessions.subscribe(), |mut rx| async move {
                // A lag skips what was missed (at most the channel's 16), as the trackers do.
                loop {
                    match rx.recv().await {
                        Ok(status) => return Some((status, rx)),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                }
            });
        Box::pin(futures::stream::select(
            self.inner.session_events(),
            injected,
        ))
    }
    async fn create(&self, path: &NodePath, value: Bytes, mode: CreateMode) -> Result<Node> {
        let late = *self.late_creates.lock().unwrap();
        if let Some(after) = late {
            let (inner, late_path) = (self.inner.clone(), path.clone());
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = inner.create(&late_path, value, mode).await;
            });
            return Err(Error::Timeout {
                operation: format!("create {path}"),
                after: std::time::Duration::ZERO,
            });
        }
        let answer = self.inner.create(path, value, mode).await;
        let hook = self.on_create.lock().unwrap().clone();
        match hook {
            Some(hook) => hook(path.clone(), answer).await,
            None => answer,
        }
    }
    async fn get(&self, path: &NodePath) -> Result<Node> {
        if self.fail_gets.load(Ordering::SeqCst) {
            self.gets_failed.fetch_add(1, Ordering::SeqCst);
            return Err(Error::unavailable("get failed by the test"));
        }
        self.inner.get(path).await
    }
    async fn exists(&self, path: &NodePath) -> Result<bool> {
        self.inner.exists(path).await
    }
    async fn set(&self, path: &NodePath, value: Bytes, expected: Expected) -> Result<Node> {
        let hook = self.before_set.lock().unwrap().clone();
        if let Some(hook) = hook {
            hook(path.clone()).await;
        }
        let answer = self.inner.set(path, value, expected).await;
        let hook = self.on_set.lock().unwrap().clone();
        match hook {
            Some(hook) => hook(path.clone(), answer).await,
            None => answer,
        }
    }
    async fn delete(&self, path: &NodePath, expected: Expected, scope: DeleteScope) -> Result<()> {
        self.until_deletes_pass().await;
        self.inner.delete(path, expected, scope).await
    }
    async fn delete_owned(&self, node: &Node) -> Result<bool> {
        self.until_deletes_pass().await;
        self.inner.delete_owned(node).await
    }
    async fn children(&self, path: &NodePath) -> Result<Children> {
        if self.fail_children.load(Ordering::SeqCst) {
            self.children_failed.fetch_add(1, Ordering::SeqCst);
            return Err(Error::unavailable("children failed by the test"));
        }
        self.inner.children(path).await
    }
    async fn watch(&self, path: &NodePath, options: WatchOptions) -> Result<WatchStream> {
        let failing =
            self.failing_watch_opens
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(Error::unavailable("watch open failed by the test"));
        }
        if self.refusing_watch_opens.load(Ordering::SeqCst) {
            return Err(Error::PermissionDenied { path: path.clone() });
        }
        let mut breaks = self.watch_breaks.subscribe();
        breaks.borrow_and_update();
        let mut ends = self.watch_ends.subscribe();
        ends.borrow_and_update();
        let inner = self.inner.watch(path, options).await?;
        self.watches_opened.fetch_add(1, Ordering::SeqCst);
        let path = path.clone();
        let ended = async move {
            while ends.changed().await.is_ok() {
                if ends.borrow().as_ref() == Some(&path) {
                    return;
                }
            }
            std::future::pending::<()>().await
        };
        let skip = usize::from(self.skip_first_items.load(Ordering::SeqCst));
        let inner = futures::StreamExt::skip(futures::StreamExt::take_until(inner, ended), skip);
        let broken = futures::stream::unfold(
            (Box::pin(inner), breaks, false),
            |(mut inner, mut breaks, done)| async move {
                if done {
                    return None;
                }
                // A break the test made comes before any item still waiting: the test
                // decides what the stream misses, not the order the two got ready in.
                tokio::select! {
                    biased;
                    // A dropped sender is no break.
                    Ok(()) = breaks.changed() => Some((
                        Err(Error::unavailable("watch broken by the test")),
                        (inner, breaks, true),
                    )),
                    item = futures::StreamExt::next(&mut inner) => {
                        item.map(|item| (item, (inner, breaks, false)))
                    }
                }
            },
        );
        let drop_resyncs = self.drop_resyncs.clone();
        let broken = futures::StreamExt::filter(broken, move |item| {
            let resync = matches!(item, Ok(registry_core::WatchEvent::Resync { .. }));
            std::future::ready(!(resync && drop_resyncs.load(Ordering::SeqCst)))
        });
        let held = self.hold_watch_items.subscribe();
        let held = futures::StreamExt::then(broken, move |item| {
            let mut held = held.clone();
            async move {
                let _ = held.wait_for(|hold| !*hold).await;
                item
            }
        });
        Ok(Box::pin(held))
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
