//! A recipe waiter whose session is lost stops waiting: its queued node went with the
//! session, while the node ahead of it that it watches may stay for good.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use registry_core::memory::{MemoryOptions, MemoryRegistry, MemoryStore};
use registry_core::recipes::Mutex;
use registry_core::{
    DeleteScope, Error, Expected, NodePath, Registry, SessionState, SessionStatus,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_lock_ends_when_its_session_is_lost() {
    let store = MemoryStore::new();
    let path = NodePath::new("/locks/session-loss").unwrap();
    let connect = || async {
        Arc::new(
            MemoryRegistry::connect(&store, MemoryOptions::default())
                .await
                .unwrap(),
        )
    };
    let (holder_client, waiter_client) = (connect().await, connect().await);
    let holder = Mutex::new(holder_client.clone(), path.clone());
    let held = holder.lock().await.unwrap();
    let waiter = Mutex::new(waiter_client.clone(), path.clone());
    let waiting = tokio::spawn(async move { waiter.lock().await.map(|_| ()) });
    let queued = tokio::time::timeout(Duration::from_secs(5), async {
        while holder_client.children(&path).await.unwrap().nodes.len() != 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(queued.is_ok(), "the waiter never queued");

    let session = waiter_client.session().session_id.unwrap();
    store.expire_session(session).unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiter kept waiting after its session was lost")
        .unwrap();
    assert!(
        matches!(outcome, Err(Error::SessionExpired)),
        "expected SessionExpired, got {outcome:?}"
    );
    assert!(held.is_held(), "the holder lost the lock meanwhile");
    held.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlock_that_fails_while_cut_off_still_frees_the_lock() {
    let store = MemoryStore::new();
    let path = NodePath::new("/locks/cut-unlock").unwrap();
    let connect = || async {
        Arc::new(
            MemoryRegistry::connect(
                &store,
                MemoryOptions::default().with_session_ttl(Duration::from_secs(30)),
            )
            .await
            .unwrap(),
        )
    };
    let (holder_client, next_client) = (connect().await, connect().await);
    let held = Mutex::new(holder_client.clone(), path.clone())
        .lock()
        .await
        .unwrap();
    // Cut off well within the TTL: the session, and so the node, outlive the cut.
    let session = holder_client.session().session_id.unwrap();
    store
        .interrupt_connection(session, Duration::from_millis(300))
        .unwrap();
    let unlocked = held.unlock().await;
    assert!(
        matches!(unlocked, Err(Error::Unavailable { .. })),
        "{unlocked:?}"
    );
    // The removal goes on once the connection is back, long before the session would end.
    let next = Mutex::new(next_client, path.clone());
    let took = next.lock_timeout(Duration::from_secs(5)).await;
    assert!(took.is_ok(), "the lock stayed taken: {took:?}");
    assert_eq!(holder_client.session().session_id, Some(session));
}

/// A holder cut off while its lock node is deleted is not told it holds the lock again when
/// the same session comes back before its watch has caught up (a ZooKeeper watch re-reads
/// after the reconnection, so its deletion comes after the `Connected`): it used to be, from
/// the reconnection until the watch's deletion arrived, while another client could hold the
/// lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_is_not_told_held_again_before_its_node_is_read_after_a_cut() {
    let store = MemoryStore::new();
    let path = NodePath::new("/locks/cut-delete").unwrap();
    let options = MemoryOptions::default().with_session_ttl(Duration::from_secs(30));
    let holder_client = Arc::new(
        MemoryRegistry::connect(&store, options.clone())
            .await
            .unwrap(),
    );
    let other = Arc::new(MemoryRegistry::connect(&store, options).await.unwrap());
    let faulty = support::Faulty::new(holder_client.clone());
    let held = Mutex::new(faulty.clone(), path.clone())
        .lock()
        .await
        .unwrap();
    assert!(held.is_held());
    let node = other.children(&path).await.unwrap().nodes.remove(0);

    let mut sessions = holder_client.session_events();
    faulty.hold_watch_items(true);
    let session = holder_client.session().session_id.unwrap();
    store
        .interrupt_connection(session, Duration::from_millis(200))
        .unwrap();
    other
        .delete(&node.path, Expected::Any, DeleteScope::Node)
        .await
        .unwrap();
    let taken = Mutex::new(other.clone(), path.clone())
        .lock()
        .await
        .unwrap();
    let back = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(status) = sessions.next().await {
            if status.state == SessionState::Connected {
                return;
            }
        }
    })
    .await;
    assert!(back.is_ok(), "the holder never reconnected");
    // The hold monitor hears the same Connected: within this window it used to say held.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
    while tokio::time::Instant::now() < deadline {
        assert!(
            !held.is_held(),
            "told it holds the lock while another client does"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    faulty.hold_watch_items(false);
    tokio::time::timeout(Duration::from_secs(5), held.lost())
        .await
        .expect("the hold was never reported lost");
    assert!(!held.is_held());
    assert!(taken.is_held());
    taken.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_lock_is_granted_to_a_session_known_to_be_over() {
    // The client has given its session up (Lost, or already a new one) while a read still
    // lists its node first: lock and try_lock must not hand out a guard for it.
    let store = MemoryStore::new();
    let client: Arc<dyn Registry> = Arc::new(
        MemoryRegistry::connect(&store, MemoryOptions::default())
            .await
            .unwrap(),
    );
    let live = client.session();
    let over = [
        SessionStatus {
            state: SessionState::Lost,
            ..live
        },
        SessionStatus {
            state: SessionState::Reestablished,
            epoch: live.epoch + 1,
            session_id: Some(registry_core::SessionId(live.session_id.unwrap().0 + 1000)),
        },
    ];
    for (round, status) in over.into_iter().enumerate() {
        let faulty = support::Faulty::new(client.clone());
        let reported = faulty.clone();
        faulty.on_create(Arc::new(move |_, answer| {
            reported.report_session(Some(status));
            Box::pin(async move { answer })
        }));
        let path = NodePath::new(format!("/locks/over-{round}")).unwrap();
        let lock = Mutex::new(faulty.clone(), path.clone());
        let outcome = lock.lock().await.map(|g| g.is_held());
        assert!(
            matches!(outcome, Err(Error::SessionExpired)),
            "lock, {status:?}: {outcome:?}"
        );
        faulty.report_session(None);
        let faulty = support::Faulty::new(client.clone());
        let reported = faulty.clone();
        faulty.on_create(Arc::new(move |_, answer| {
            reported.report_session(Some(status));
            Box::pin(async move { answer })
        }));
        // A queue of its own: the node lock() left is removed in the background.
        let path = NodePath::new(format!("/locks/over-try-{round}")).unwrap();
        let lock = Mutex::new(faulty, path);
        let outcome = lock.try_lock().await.map(|g| g.map(|g| g.is_held()));
        assert!(
            matches!(outcome, Err(Error::SessionExpired)),
            "try_lock, {status:?}: {outcome:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_keeps_its_place_through_failures_that_pass() {
    // A read that fails while the connection is suspended must not send the waiter to the
    // back of the queue (its node removed, the lock failed), as Curator's waiters ride out
    // SUSPENDED.
    let store = MemoryStore::new();
    let path = NodePath::new("/locks/suspended-wait").unwrap();
    let connect = || async {
        Arc::new(
            MemoryRegistry::connect(&store, MemoryOptions::default())
                .await
                .unwrap(),
        ) as Arc<dyn Registry>
    };
    let (holder_client, waiter_client) = (connect().await, connect().await);
    let held = Mutex::new(holder_client.clone(), path.clone())
        .lock()
        .await
        .unwrap();
    let faulty = support::Faulty::new(waiter_client);
    faulty.fail_children(true);
    let waiter = Mutex::new(faulty.clone(), path.clone());
    let waiting = tokio::spawn(async move {
        waiter
            .lock()
            .await
            .map(|g| (g.fencing_token(), g.is_held(), g))
    });
    let failed = tokio::time::timeout(Duration::from_secs(5), async {
        while faulty.children_failed() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(failed.is_ok(), "the waiter never read the queue");
    assert!(
        !waiting.is_finished(),
        "the waiter gave up on a failure that passes"
    );
    let queued: Vec<u64> = holder_client
        .children(&path)
        .await
        .unwrap()
        .nodes
        .iter()
        .map(|n| n.create_order)
        .collect();
    assert_eq!(queued.len(), 2, "the waiter's node is gone: {queued:?}");
    faulty.fail_children(false);
    held.unlock().await.unwrap();
    let (token, is_held, guard) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter never got the lock")
        .unwrap()
        .unwrap();
    assert!(is_held);
    assert_eq!(
        token, queued[1],
        "the waiter lost its place and queued again"
    );
    guard.unlock().await.unwrap();
}
