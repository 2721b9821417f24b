//! A recipe waiter whose session is lost stops waiting: its queued node went with the
//! session, while the node ahead of it that it watches may stay for good.

use std::sync::Arc;
use std::time::Duration;

use registry_core::memory::{MemoryOptions, MemoryRegistry, MemoryStore};
use registry_core::recipes::Mutex;
use registry_core::{Error, NodePath, Registry};

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
