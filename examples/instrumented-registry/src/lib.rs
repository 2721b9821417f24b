//! An example of a third-party `Registry`: a decorator that counts every operation of any
//! backend and traces it, proven with the same conformance suite the built-in backends pass
//! (see `tests/`, which use only the public API of `conformance-tests`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use registry_core::{
    Capabilities, Children, CreateMode, DeleteScope, Expected, Node, NodePath, RegisterOptions,
    Registration, Registry, Result, SessionStatus, WatchOptions, WatchStream,
};

const OPERATIONS: [&str; 10] = [
    "create",
    "get",
    "exists",
    "set",
    "set_owned",
    "delete",
    "delete_owned",
    "children",
    "watch",
    "register",
];

/// Wraps any registry; every call is counted (see [`InstrumentedRegistry::counts`]) and traced,
/// and otherwise passed through unchanged, so the wrapper keeps every guarantee of the inner
/// backend. Cheap to clone.
#[derive(Clone)]
pub struct InstrumentedRegistry {
    inner: Arc<dyn Registry>,
    counts: Arc<[AtomicU64; OPERATIONS.len()]>,
}

impl InstrumentedRegistry {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Registry>) -> Self {
        InstrumentedRegistry {
            inner,
            counts: Arc::new(Default::default()),
        }
    }

    fn count(&self, operation: &'static str) {
        if let Some(i) = OPERATIONS.iter().position(|o| *o == operation) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        tracing::trace!(operation, "registry call");
    }

    /// Calls so far, per operation name.
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        OPERATIONS
            .iter()
            .zip(self.counts.iter())
            .map(|(o, c)| (*o, c.load(Ordering::Relaxed)))
            .collect()
    }
}

#[async_trait]
impl Registry for InstrumentedRegistry {
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
        self.count("create");
        self.inner.create(path, value, mode).await
    }

    async fn get(&self, path: &NodePath) -> Result<Node> {
        self.count("get");
        self.inner.get(path).await
    }

    async fn exists(&self, path: &NodePath) -> Result<bool> {
        self.count("exists");
        self.inner.exists(path).await
    }

    async fn set(&self, path: &NodePath, value: Bytes, expected: Expected) -> Result<Node> {
        self.count("set");
        self.inner.set(path, value, expected).await
    }

    // Passed through, not left to the trait's read-then-write default: the inner backend
    // may compare the owner in the write itself (etcd, memory).
    async fn set_owned(&self, node: &Node, value: Bytes) -> Result<Option<Node>> {
        self.count("set_owned");
        self.inner.set_owned(node, value).await
    }

    async fn delete(&self, path: &NodePath, expected: Expected, scope: DeleteScope) -> Result<()> {
        self.count("delete");
        self.inner.delete(path, expected, scope).await
    }

    async fn delete_owned(&self, node: &Node) -> Result<bool> {
        self.count("delete_owned");
        self.inner.delete_owned(node).await
    }

    async fn children(&self, path: &NodePath) -> Result<Children> {
        self.count("children");
        self.inner.children(path).await
    }

    async fn watch(&self, path: &NodePath, options: WatchOptions) -> Result<WatchStream> {
        self.count("watch");
        self.inner.watch(path, options).await
    }

    // The contract's `register` span: the inner backend's `register` is not called, so the
    // wrapper opens it (every other operation's span comes from the inner backend).
    #[tracing::instrument(level = "debug", skip_all, fields(path = %path))]
    async fn register(
        &self,
        path: &NodePath,
        value: Bytes,
        options: RegisterOptions,
    ) -> Result<Registration> {
        self.count("register");
        // Through the wrapper, so the healing engine's calls are counted too.
        Registration::start(Arc::new(self.clone()), path, value, options).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
