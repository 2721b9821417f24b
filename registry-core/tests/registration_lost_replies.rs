//! Registrations whose create happened on the server although the client heard only an
//! error (a lost reply): neither a failed `register` nor a `deregister` may leave that node
//! behind. Driven through a decorator of the in-memory backend that loses replies on demand.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use registry_core::memory::{MemoryOptions, MemoryRegistry, MemoryStore};
use registry_core::{
    Bytes, Capabilities, Children, CreateMode, DeleteScope, Error, Expected, Node, NodePath,
    RegisterOptions, Registration, RegistrationStatus, Registry, Result, SessionStatus, WatchEvent,
    WatchOptions, WatchStream,
};

const WAIT: Duration = Duration::from_secs(5);

/// The in-memory backend, except that while `lose_creates` a create happens but reports
/// `Unavailable`, and while `fail_gets` every get fails.
struct LostReplies {
    inner: MemoryRegistry,
    lose_creates: AtomicBool,
    fail_gets: AtomicBool,
}

#[async_trait]
impl Registry for LostReplies {
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
        let created = self.inner.create(path, value, mode).await?;
        if self.lose_creates.load(Ordering::SeqCst) {
            return Err(Error::unavailable("reply lost by the test"));
        }
        Ok(created)
    }
    async fn get(&self, path: &NodePath) -> Result<Node> {
        if self.fail_gets.load(Ordering::SeqCst) {
            return Err(Error::unavailable("get failed by the test"));
        }
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
    async fn delete_owned(&self, node: &Node) -> Result<bool> {
        self.inner.delete_owned(node).await
    }
    async fn children(&self, path: &NodePath) -> Result<Children> {
        self.inner.children(path).await
    }
    async fn watch(&self, path: &NodePath, options: WatchOptions) -> Result<WatchStream> {
        self.inner.watch(path, options).await
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

async fn setup() -> (Arc<LostReplies>, MemoryRegistry, NodePath) {
    let store = MemoryStore::new();
    let options = MemoryOptions::default();
    let owner = Arc::new(LostReplies {
        inner: MemoryRegistry::connect(&store, options.clone())
            .await
            .unwrap(),
        lose_creates: AtomicBool::new(false),
        fail_gets: AtomicBool::new(false),
    });
    let observer = MemoryRegistry::connect(&store, options).await.unwrap();
    let path = NodePath::new("/svc/10.0.0.1:9090").unwrap();
    observer
        .create(
            &path.parent().unwrap(),
            Bytes::new(),
            CreateMode::Persistent,
        )
        .await
        .unwrap();
    (owner, observer, path)
}

async fn next(node: &mut WatchStream) -> WatchEvent {
    let event = tokio::time::timeout(WAIT, node.next()).await;
    event.expect("no event within 5 s").unwrap().unwrap()
}

#[tokio::test]
async fn a_register_that_failed_after_its_create_leaves_nothing_behind() {
    let (owner, observer, path) = setup().await;
    owner.lose_creates.store(true, Ordering::SeqCst);
    owner.fail_gets.store(true, Ordering::SeqCst);
    let registered = Registration::start(
        owner.clone(),
        &path,
        Bytes::from("v"),
        RegisterOptions::new(),
    )
    .await;
    assert!(
        matches!(registered, Err(Error::Unavailable { .. })),
        "{registered:?}"
    );
    assert!(
        !observer.exists(&path).await.unwrap(),
        "the failed register left its node behind"
    );
}

#[tokio::test]
async fn deregister_while_recreating_removes_a_node_whose_create_reply_was_lost() {
    let (owner, observer, path) = setup().await;
    let registration = Registration::start(
        owner.clone(),
        &path,
        Bytes::from("v"),
        RegisterOptions::new(),
    )
    .await
    .unwrap();
    // From now on the healer's re-create happens but it cannot learn so.
    owner.lose_creates.store(true, Ordering::SeqCst);
    owner.fail_gets.store(true, Ordering::SeqCst);
    let mut node = observer.watch(&path, WatchOptions::node()).await.unwrap();
    assert!(matches!(next(&mut node).await, WatchEvent::Snapshot(_)));
    observer
        .delete(&path, Expected::Any, DeleteScope::Node)
        .await
        .unwrap();
    assert!(matches!(next(&mut node).await, WatchEvent::Deleted(_)));
    assert!(matches!(next(&mut node).await, WatchEvent::Created(_)));
    assert!(matches!(
        registration.status(),
        RegistrationStatus::Recreating { .. }
    ));
    registration.deregister().await.unwrap();
    assert!(
        !observer.exists(&path).await.unwrap(),
        "deregister left the re-created node behind"
    );
}
