//! Registrations whose create happened on the server although the client heard only an
//! error (a lost reply): neither a failed `register` nor a `deregister` may leave that node
//! behind. Driven through a decorator of the in-memory backend that loses replies on demand
//! (`support::Faulty`).

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use registry_core::memory::{MemoryOptions, MemoryRegistry, MemoryStore};
use registry_core::{
    Bytes, CreateMode, DeleteScope, Error, Expected, NodePath, RegisterOptions, Registration,
    RegistrationStatus, Registry, WatchEvent, WatchOptions, WatchStream,
};
use support::Faulty;

const WAIT: Duration = Duration::from_secs(5);

async fn setup() -> (Arc<Faulty>, MemoryRegistry, NodePath) {
    let store = MemoryStore::new();
    let options = MemoryOptions::default();
    let owner = Faulty::new(Arc::new(
        MemoryRegistry::connect(&store, options.clone())
            .await
            .unwrap(),
    ));
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
    owner.lose_create_replies();
    owner.fail_gets(true);
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
    owner.lose_create_replies();
    owner.fail_gets(true);
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

#[tokio::test]
async fn deregister_waits_to_list_a_sequential_node_it_cannot_see_yet() {
    let (owner, observer, path) = setup().await;
    let registration = Registration::start(
        owner.clone(),
        &path,
        Bytes::from("v"),
        RegisterOptions::new().sequential(),
    )
    .await
    .unwrap();
    let parent = path.parent().unwrap();
    let first = registration.path().unwrap();
    // The healer's re-create happens but it cannot learn so, nor find the node by listing.
    let faulty = owner.clone();
    owner.on_create(Arc::new(move |_, answer| {
        faulty.fail_children(true);
        Box::pin(async move {
            answer?;
            Err(Error::unavailable("reply lost by the test"))
        })
    }));
    owner.fail_gets(true);
    let mut children = observer
        .watch(&parent, WatchOptions::children())
        .await
        .unwrap();
    assert!(matches!(next(&mut children).await, WatchEvent::Snapshot(_)));
    observer
        .delete(&first, Expected::Any, DeleteScope::Node)
        .await
        .unwrap();
    assert!(matches!(next(&mut children).await, WatchEvent::Deleted(_)));
    assert!(matches!(next(&mut children).await, WatchEvent::Created(_)));
    assert!(matches!(
        registration.status(),
        RegistrationStatus::Recreating { .. }
    ));
    let deregistering = tokio::spawn(registration.deregister());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !deregistering.is_finished(),
        "deregister ended without knowing its nodes"
    );
    owner.fail_children(false);
    tokio::time::timeout(WAIT, deregistering)
        .await
        .expect("deregister never ended")
        .unwrap()
        .unwrap();
    let left = observer.children(&parent).await.unwrap().nodes;
    assert!(left.is_empty(), "deregister left {left:?} behind");
}
