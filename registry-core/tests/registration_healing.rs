//! A registration keeps healing whatever its own calls ran into: a value write that kept
//! losing to other writers, a sequential name that was taken.

mod support;

use std::sync::Arc;
use std::time::Duration;

use registry_core::memory::MemoryStore;
use registry_core::{
    Bytes, DeleteScope, Error, Expected, NodePath, RegisterOptions, Registration,
    RegistrationStatus, Registry,
};
use support::{client, Faulty};

/// A registration of `path` with value `v1` made through `faulty`, so its calls meet the
/// faults the test sets.
async fn register_through(
    faulty: &Arc<Faulty>,
    path: &NodePath,
    options: RegisterOptions,
) -> Registration {
    Registration::start(faulty.clone(), path, Bytes::from("v1"), options)
        .await
        .unwrap()
}

/// Another writer rewrites the node before each of `set_value`'s writes: the call says the
/// value could not be written, and the registration stays registered (it used to turn
/// `Recreating` with nothing left to re-create it, for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_write_that_keeps_losing_leaves_the_registration_registered() {
    let store = MemoryStore::new();
    let (ours, admin) = (client(&store).await, client(&store).await);
    let faulty = Faulty::new(ours.clone());
    let path = NodePath::new("/svc/10.0.0.1:9090").unwrap();
    let registration = register_through(&faulty, &path, RegisterOptions::new()).await;
    let writer = admin.clone();
    faulty.before_set(Some(Arc::new(move |path| {
        let writer = writer.clone();
        Box::pin(async move {
            writer
                .set(&path, Bytes::from("admin"), Expected::Any)
                .await
                .unwrap();
        })
    })));

    let outcome = registration.set_value(Bytes::from("v2")).await;
    assert!(
        matches!(outcome, Err(Error::VersionMismatch { .. })),
        "{outcome:?}"
    );
    assert!(
        matches!(registration.status(), RegistrationStatus::Registered(_)),
        "{:?}",
        registration.status()
    );

    // Once the other writer stops, the next write goes through.
    faulty.before_set(None);
    registration.set_value(Bytes::from("v3")).await.unwrap();
    assert_eq!(admin.get(&path).await.unwrap().value, Bytes::from("v3"));
    assert_eq!(
        registration.path().as_ref(),
        Some(&path),
        "{:?}",
        registration.status()
    );
}

/// A sequential re-creation whose generated name is taken (ZooKeeper answers `AlreadyExists`
/// when a migration wrote that name) is tried again; it used to wait for an event on the old
/// node's path that never came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_registration_whose_name_was_taken_tries_again() {
    let store = MemoryStore::new();
    let (ours, other) = (client(&store).await, client(&store).await);
    let faulty = Faulty::new(ours.clone());
    let prefix = NodePath::new("/svc/inst:").unwrap();
    let registration =
        register_through(&faulty, &prefix, RegisterOptions::new().sequential()).await;
    let first = registration.path().unwrap();
    // The next sequential create finds its name taken, once.
    let taken = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let inner = ours.clone();
    faulty.on_create(Arc::new(move |path, answer| {
        let (taken, inner) = (taken.clone(), inner.clone());
        Box::pin(async move {
            let node = answer?;
            if taken.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return Ok(node);
            }
            inner
                .delete(&node.path, Expected::Any, DeleteScope::Node)
                .await?;
            Err(Error::AlreadyExists { path })
        })
    }));

    other
        .delete(&first, Expected::Any, DeleteScope::Node)
        .await
        .unwrap();
    let mut status = registration.watch_status();
    let again = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let RegistrationStatus::Registered(node) = &*status.borrow_and_update() {
                if node.path != first {
                    return node.clone();
                }
            }
            status.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not re-registered: {:?}", registration.status()));
    let parent = prefix.parent().unwrap();
    let children = other.children(&parent).await.unwrap().nodes;
    assert_eq!(children.len(), 1, "{children:?}");
    assert_eq!(children[0].path, again.path);
}

/// Registering a path again in the same session (`reg = registry.register(..)`, which drops
/// the old handle after the new one adopted the node) keeps the node: the old handle's
/// removal used to delete it from under the new one, which then made another (watchers saw
/// the instance go and come back; a sequential one came back under a new name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_a_path_again_keeps_its_node_when_the_old_handle_goes() {
    let store = MemoryStore::new();
    let (ours, reader) = (client(&store).await, client(&store).await);
    for options in [RegisterOptions::new(), RegisterOptions::new().sequential()] {
        let requested = NodePath::new(if options.sequential {
            "/seq/inst:"
        } else {
            "/plain/10.0.0.1:9090"
        })
        .unwrap();
        let old = ours
            .register(&requested, Bytes::from("v1"), options.clone())
            .await
            .unwrap();
        let node = old.wait_registered(Duration::from_secs(5)).await.unwrap();
        let new = ours
            .register(&requested, Bytes::from("v2"), options.clone())
            .await
            .unwrap();
        assert_eq!(new.path().as_ref(), Some(&node.path), "the node is adopted");

        old.deregister().await.unwrap();
        let now = reader.get(&node.path).await.unwrap();
        assert_eq!(
            now.create_order, node.create_order,
            "{options:?}: the node was removed and made again"
        );
        assert_eq!(now.value, Bytes::from("v2"));

        // The adopter's own removal does remove it.
        new.deregister().await.unwrap();
        assert!(!reader.exists(&node.path).await.unwrap(), "{options:?}");
    }
}

/// A value write whose answer comes after the session was lost does not report the lost
/// session's node as registered (it used to, until the healer re-created the node).
// One thread: the healer runs only while the test awaits, so the status is read right as
// `set_value` returns, before the healer re-creates the node.
#[tokio::test(flavor = "current_thread")]
async fn a_value_written_as_the_session_goes_does_not_report_the_lost_node() {
    let store = MemoryStore::new();
    let ours = client(&store).await;
    let faulty = Faulty::new(ours.clone());
    let path = NodePath::new("/svc/10.0.0.1:9090").unwrap();
    let registration = register_through(&faulty, &path, RegisterOptions::new()).await;
    let lost_session = ours.session().session_id.unwrap();
    let expiring = store.clone();
    faulty.on_set(Arc::new(move |_, answer| {
        let expiring = expiring.clone();
        Box::pin(async move {
            // The write is made; the session goes before its answer arrives.
            expiring.expire_session(lost_session).unwrap();
            answer
        })
    }));

    registration.set_value(Bytes::from("v2")).await.unwrap();
    if let RegistrationStatus::Registered(node) = registration.status() {
        assert_ne!(
            node.ephemeral_owner,
            Some(lost_session),
            "the lost session's node reported as registered"
        );
    }
    // It is re-created in the new session, with the new value.
    let again = registration
        .wait_registered(Duration::from_secs(5))
        .await
        .unwrap();
    assert_ne!(again.ephemeral_owner, Some(lost_session));
    assert_eq!(again.value, Bytes::from("v2"));
}

/// A registration dropped on a thread with no tokio runtime still removes its node, on the
/// runtime it was made on: the session lives on, and the node with it otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_dropped_outside_the_runtime_removes_its_node() {
    let store = MemoryStore::new();
    let owner = client(&store).await;
    let reader = client(&store).await;
    let path = NodePath::new("/svc/10.0.0.9:9090").unwrap();
    let registration = owner
        .register(&path, Bytes::from("v1"), RegisterOptions::new())
        .await
        .unwrap();
    std::thread::spawn(move || drop(registration))
        .join()
        .unwrap();
    let gone = tokio::time::timeout(Duration::from_secs(5), async {
        while reader.get(&path).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        gone.is_ok(),
        "{path} stayed after its registration was dropped"
    );
    owner.close().await.unwrap();
}

/// Registering a path again with a new value adopts this session's node and writes the
/// value, owner-checked. When that write lands on a node another session put there since (a
/// check that reads before it writes, as on ZooKeeper), the other session's node is neither
/// reported as the registration's nor removed when it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_write_that_lands_on_another_sessions_node_is_not_adopted() {
    let store = MemoryStore::new();
    let (ours, theirs) = (client(&store).await, client(&store).await);
    let faulty = Faulty::new(ours.clone());
    let path = NodePath::new("/svc/10.0.0.1:9090").unwrap();
    let first = register_through(&faulty, &path, RegisterOptions::new()).await;
    let other = theirs.clone();
    faulty.on_set(Arc::new(move |path, answer| {
        let other = other.clone();
        Box::pin(async move {
            // The write went to a node of theirs created between the owner's read and it.
            let written = answer?;
            other
                .delete(&path, Expected::Any, DeleteScope::Node)
                .await?;
            other
                .create(&path, written.value, registry_core::CreateMode::Ephemeral)
                .await
        })
    }));

    let again = Registration::start(
        faulty.clone(),
        &path,
        Bytes::from("v2"),
        RegisterOptions::new(),
    )
    .await;
    let their_session = theirs.session().session_id;
    // The path is another live session's now: refused as such, not registered.
    match again {
        Err(Error::AlreadyExists { .. }) => {}
        Err(other) => panic!("{other:?}"),
        Ok(again) => panic!(
            "registered over another session's node: {:?}",
            again.status()
        ),
    }
    let _ = first.deregister().await;
    let left = theirs.get(&path).await;
    assert!(
        left.as_ref()
            .is_ok_and(|n| n.ephemeral_owner == their_session),
        "their node removed by our registrations: {left:?}"
    );
}

/// While the session is suspended its own node looks like any other session's: a
/// registration made then does not remove this session's node as stale (it used to delete
/// it and create another, so consumers saw the instance go and come back). It fails for
/// now, retryably, and nothing is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_made_while_suspended_leaves_the_sessions_node_alone() {
    let store = MemoryStore::new();
    let ours = client(&store).await;
    let faulty = Faulty::new(ours.clone());
    let path = NodePath::new("/svc/10.0.0.1:9090").unwrap();
    let first = register_through(&faulty, &path, RegisterOptions::new()).await;
    let before = ours.get(&path).await.unwrap();
    let mut suspended = ours.session();
    suspended.state = registry_core::SessionState::Suspended;
    faulty.report_session(Some(suspended));

    let again = Registration::start(
        faulty.clone(),
        &path,
        Bytes::from("v2"),
        RegisterOptions::new(),
    )
    .await;
    match &again {
        Err(error) => assert!(error.is_retryable(), "{error:?}"),
        Ok(again) => panic!("registered while suspended: {:?}", again.status()),
    }
    let after = ours.get(&path).await.unwrap();
    assert_eq!(
        (after.create_order, after.value),
        (before.create_order, before.value),
        "the session's node was replaced"
    );
    faulty.report_session(None);
    first.deregister().await.unwrap();
}

/// A path registered again (the new handle replacing the old) is held by the newer handle,
/// also after both re-create or adopt the node in a new session, in whichever order: the
/// older one's removal then leaves the node in place (it used to take the node back when it
/// adopted it last, and its removal deleted the node the newer one reported registered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newer_of_two_registrations_of_a_path_keeps_it_across_a_session_loss() {
    let store = MemoryStore::new();
    let ours = client(&store).await;
    let path = NodePath::new("/svc/10.0.0.1:9090").unwrap();
    for round in 0..10 {
        let older = ours
            .register(&path, Bytes::from("v1"), RegisterOptions::new())
            .await
            .unwrap();
        let newer = ours
            .register(&path, Bytes::from("v1"), RegisterOptions::new())
            .await
            .unwrap();
        let lost = ours.session().session_id.unwrap();
        store.expire_session(lost).unwrap();
        let session = ours.session().session_id;
        for registration in [&older, &newer] {
            let mut status = registration.watch_status();
            tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    if let RegistrationStatus::Registered(node) = &*status.borrow_and_update() {
                        if node.ephemeral_owner == session {
                            return;
                        }
                    }
                    status.changed().await.unwrap();
                }
            })
            .await
            .unwrap_or_else(|_| panic!("round {round}: not registered again"));
        }
        let held = ours.get(&path).await.unwrap();
        older.deregister().await.unwrap();
        let left = ours.get(&path).await;
        assert_eq!(
            left.as_ref().ok(),
            Some(&held),
            "round {round}: the older registration removed the newer one's node"
        );
        newer.deregister().await.unwrap();
    }
}
