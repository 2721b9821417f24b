//! A registration writes only its own node: after its node was replaced by another session's,
//! `set_value` must not take that node over (nor report it as its own).

use std::sync::Arc;

use registry_core::memory::{MemoryOptions, MemoryRegistry, MemoryStore};
use registry_core::{
    Bytes, CreateMode, DeleteScope, Expected, NodePath, RegisterOptions, RegistrationStatus,
    Registry,
};

async fn client(store: &MemoryStore) -> Arc<MemoryRegistry> {
    Arc::new(
        MemoryRegistry::connect(store, MemoryOptions::default())
            .await
            .unwrap(),
    )
}

// One thread: the healer runs only when the test awaits something pending, and the in-memory
// backend answers at once, so the steps below happen before it sees the deletion.
#[tokio::test(flavor = "current_thread")]
async fn set_value_never_writes_another_sessions_node() {
    let store = MemoryStore::new();
    let (ours, theirs) = (client(&store).await, client(&store).await);
    let path = NodePath::new("/svc/10.0.0.1:9090").unwrap();
    let registration = ours
        .register(&path, Bytes::from("ours"), RegisterOptions::new())
        .await
        .unwrap();
    // Another process takes the path over (as after our session's loss).
    theirs
        .delete(&path, Expected::Any, DeleteScope::Node)
        .await
        .unwrap();
    let their_node = theirs
        .create(&path, Bytes::from("theirs"), CreateMode::Ephemeral)
        .await
        .unwrap();

    registration.set_value(Bytes::from("new")).await.unwrap();
    let now = theirs.get(&path).await.unwrap();
    assert_eq!(now.value, Bytes::from("theirs"), "their node was written");
    assert_eq!(now.ephemeral_owner, their_node.ephemeral_owner);
    match registration.status() {
        RegistrationStatus::Registered(node) => assert_ne!(
            node.ephemeral_owner, their_node.ephemeral_owner,
            "their node reported as ours"
        ),
        RegistrationStatus::Recreating { .. } => {}
        other => panic!("{other:?}"),
    }
}

/// A `deregister` dropped before it finished (a caller's timeout) still removes the node: the
/// registration, dropped with it, takes the removal over in the background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deregister_dropped_midway_still_removes_the_node() {
    let store = MemoryStore::new();
    let (ours, reader) = (client(&store).await, client(&store).await);
    let path = NodePath::new("/svc/10.0.0.2:9090").unwrap();
    let registration = ours
        .register(&path, Bytes::from("ours"), RegisterOptions::new())
        .await
        .unwrap();
    // Cut off (well within the TTL): the removal keeps failing and retrying meanwhile.
    store
        .interrupt_connection(
            ours.session().session_id.unwrap(),
            std::time::Duration::from_millis(500),
        )
        .unwrap();
    let mut deregister = Box::pin(registration.deregister());
    assert!(futures::poll!(deregister.as_mut()).is_pending());
    drop(deregister);
    let removed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while reader.exists(&path).await.unwrap() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        removed.is_ok(),
        "the node stayed after a dropped deregister"
    );
    assert!(
        ours.session().state.is_live(),
        "the session must outlive the cut"
    );
}
