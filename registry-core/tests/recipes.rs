//! Smoke tests of the recipes on the in-memory backend; the full cases (`lock_*`,
//! `election_*`) run on every backend in the conformance suite.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use registry_core::memory::{MemoryOptions, MemoryRegistry, MemoryStore};
use registry_core::recipes::{Election, Leader, Mutex};
use registry_core::{Bytes, NodePath, Registry};

async fn client(store: &MemoryStore) -> Arc<dyn Registry> {
    Arc::new(
        MemoryRegistry::connect(store, MemoryOptions::default())
            .await
            .unwrap(),
    )
}

/// Waits (up to 5 s) until some client of `store` watches a node: the guard's monitor.
async fn until_watching(store: &MemoryStore) {
    let watching = tokio::time::timeout(Duration::from_secs(5), async {
        while store.watcher_count() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(watching.is_ok(), "the guard never watched its node");
}

/// Waits (up to 5 s) until `events` report `session` connected again.
async fn until_resumed(
    events: &mut BoxStream<'static, registry_core::SessionStatus>,
    session: registry_core::SessionId,
) {
    let resumed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(status) = events.next().await {
            if status.state == registry_core::SessionState::Connected
                && status.session_id == Some(session)
            {
                return;
            }
        }
    })
    .await;
    assert!(resumed.is_ok(), "the session did not resume");
}

/// Whether `guard` is held again within `bound`, with `lost()` waiting again.
async fn held_again_within(guard: &registry_core::recipes::MutexGuard, bound: Duration) -> bool {
    tokio::time::timeout(bound, async {
        while !guard.is_held() || futures::FutureExt::now_or_never(guard.lost()).is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_hands_over_in_order_with_growing_tokens() {
    let store = MemoryStore::new();
    let path = NodePath::new("/locks/a").unwrap();
    let reader = client(&store).await;
    let first = Mutex::new(client(&store).await, path.clone());
    let second = Mutex::new(client(&store).await, path.clone());
    let held = first.lock().await.unwrap();
    assert!(held.is_held());
    assert!(second.try_lock().await.unwrap().is_none());
    let waiter = tokio::spawn(async move {
        second
            .lock()
            .await
            .map(|g| (g.fencing_token(), second.wake_ups()))
    });
    // The waiter's node queued first, so the window below tests waiting, not a slow create.
    let queued = tokio::time::timeout(Duration::from_secs(5), async {
        while reader.children(&path).await.unwrap().nodes.len() != 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(queued.is_ok(), "second's node never appeared in {path}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !waiter.is_finished(),
        "second got the lock while the first held it"
    );
    let token = held.fencing_token();
    held.unlock().await.unwrap();
    let (next_token, wake_ups) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(next_token > token);
    assert_eq!(wake_ups, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_session_is_reported_and_cancelled_lock_leaves_nothing() {
    let store = MemoryStore::new();
    let path = NodePath::new("/locks/b").unwrap();
    let owner_client = client(&store).await;
    let owner = Mutex::new(owner_client.clone(), path.clone());
    let guard = owner.lock().await.unwrap();
    let other_client = client(&store).await;
    let other = Mutex::new(other_client.clone(), path.clone());
    assert!(other
        .lock_timeout(Duration::from_millis(100))
        .await
        .is_err());
    // The timed-out attempt's node is removed in the background: wait for it, bounded.
    let cleaned = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if other_client.children(&path).await.unwrap().nodes.len() == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(cleaned.is_ok(), "cancelled lock() left its node behind");
    store
        .expire_session(owner_client.session().session_id.unwrap())
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), guard.lost())
        .await
        .unwrap();
    assert!(!guard.is_held());
}

/// The observer's next report, within 5 s.
async fn next_leader(
    leaders: &mut BoxStream<'static, registry_core::Result<Option<Leader>>>,
) -> Option<Leader> {
    tokio::time::timeout(Duration::from_secs(5), leaders.next())
        .await
        .expect("observer reported nothing within 5 s")
        .expect("observer stream ended")
        .expect("observer stream error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_observers_see_each_leader() {
    let store = MemoryStore::new();
    let path = NodePath::new("/election/e").unwrap();
    let observer = Election::new(client(&store).await, path.clone());
    let mut leaders = observer.observe().await.unwrap();
    assert_eq!(next_leader(&mut leaders).await, None);
    let a = Election::new(client(&store).await, path.clone())
        .campaign(Bytes::from("a"))
        .await
        .unwrap();
    let seen = next_leader(&mut leaders)
        .await
        .expect("no leader after a's campaign");
    assert_eq!(seen.value, Bytes::from("a"));
    let b_election = Election::new(client(&store).await, path.clone());
    let b = tokio::spawn(async move { b_election.campaign(Bytes::from("b")).await });
    a.resign().await.unwrap();
    let b = tokio::time::timeout(Duration::from_secs(5), b)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(b.is_leader());
    // Bounded overall, not only per item: a stream of other leaders must not spin forever.
    let observed_b = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(leader) = next_leader(&mut leaders).await {
                if leader.value == "b" {
                    return leader;
                }
            }
        }
    })
    .await
    .expect("observer did not report b as leader within 10 s");
    assert_eq!(observed_b.token, b.token());
    assert!(observed_b.token > seen.token);
}

/// A `lock()` dropped after its node was created but before it read the create's reply (a
/// caller cancelled at that instant) leaves no node: the reply, unread, removes it.
/// One thread: on two, the create's task could finish within the first poll, which then
/// read the reply (a flake, 1 run in 34).
#[tokio::test(flavor = "current_thread")]
async fn lock_dropped_before_reading_its_created_node_leaves_nothing() {
    let store = MemoryStore::new();
    let path = NodePath::new("/locks/unread").unwrap();
    let reader = client(&store).await;
    let mutex = Mutex::new(client(&store).await, path.clone());
    let nodes = |reader: Arc<dyn Registry>, path: NodePath| async move {
        reader
            .children(&path)
            .await
            .map(|c| c.nodes.len())
            .unwrap_or(0)
    };
    let mut lock = Box::pin(mutex.lock());
    // One poll sends the create; the future is not polled again, so it never reads the reply.
    assert!(futures::poll!(lock.as_mut()).is_pending());
    let created = tokio::time::timeout(Duration::from_secs(5), async {
        while nodes(reader.clone(), path.clone()).await != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(created.is_ok(), "the lock's node never appeared");
    // The create's task hands its reply over right after the node exists; no event tells
    // when, so give it ample time before dropping the unread reply.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(lock);
    let removed = tokio::time::timeout(Duration::from_secs(5), async {
        while nodes(reader.clone(), path.clone()).await != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(removed.is_ok(), "the dropped lock's node stayed");
}

/// An `unlock()` or `resign()` dropped before its delete was answered (a caller's timeout
/// while the server is slow) still frees the lock and the leadership: the guard, dropped with
/// it, removes the node in the background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlock_and_resign_dropped_midway_still_remove_their_nodes() {
    let store = MemoryStore::new();
    let reader = client(&store).await;
    let faulty = support::Faulty::new(client(&store).await);
    let registry: Arc<dyn Registry> = faulty.clone();
    let lock_path = NodePath::new("/locks/slow").unwrap();
    let election_path = NodePath::new("/election/slow").unwrap();
    let guard = Mutex::new(registry.clone(), lock_path.clone())
        .lock()
        .await
        .unwrap();
    let leadership = Election::new(registry.clone(), election_path.clone())
        .campaign(Bytes::from("a"))
        .await
        .unwrap();
    faulty.hold_deletes(true);
    let mut unlock = Box::pin(guard.unlock());
    assert!(futures::poll!(unlock.as_mut()).is_pending());
    drop(unlock);
    let mut resign = Box::pin(leadership.resign());
    assert!(futures::poll!(resign.as_mut()).is_pending());
    drop(resign);
    faulty.hold_deletes(false);
    for path in [lock_path, election_path] {
        let removed = tokio::time::timeout(Duration::from_secs(5), async {
            while !reader.children(&path).await.unwrap().nodes.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            removed.is_ok(),
            "{path} kept its node after a dropped release"
        );
    }
}

/// A guard or a leadership dropped on a thread with no tokio runtime still removes its node
/// (on the runtime it was taken on): left behind, it would block every later contender for
/// as long as its session lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holders_dropped_outside_the_runtime_still_free_their_place() {
    let store = MemoryStore::new();
    // The holders' client stays open: its session (and an undeleted node) lives on.
    let holder = client(&store).await;
    let lock_path = NodePath::new("/locks/threads").unwrap();
    let held = Mutex::new(holder.clone(), lock_path.clone())
        .lock()
        .await
        .unwrap();
    std::thread::spawn(move || drop(held)).join().unwrap();
    let next = Mutex::new(client(&store).await, lock_path)
        .lock_timeout(Duration::from_secs(5))
        .await;
    assert!(next.is_ok(), "the lock stayed taken: {next:?}");

    let election_path = NodePath::new("/election/threads").unwrap();
    let leading = Election::new(holder.clone(), election_path.clone())
        .campaign(Bytes::from_static(b"a"))
        .await
        .unwrap();
    std::thread::spawn(move || drop(leading)).join().unwrap();
    let next = tokio::time::timeout(
        Duration::from_secs(5),
        Election::new(client(&store).await, election_path).campaign(Bytes::from_static(b"b")),
    )
    .await;
    assert!(
        matches!(next, Ok(Ok(_))),
        "leadership stayed taken: {next:?}"
    );
    holder.close().await.unwrap();
}

/// A lock whose create timed out, though the server applies it later (an etcd Txn still in
/// the leader's log, read around), fails; its late node is found and removed in the
/// background: left, it would stand first in the queue for as long as the session lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_create_applied_after_its_timeout_leaves_no_node_in_the_queue() {
    let store = MemoryStore::new();
    let faulty = support::Faulty::new(client(&store).await);
    faulty.commit_creates_late(Duration::from_millis(300));
    let path = NodePath::new("/locks/late").unwrap();
    let failed = Mutex::new(faulty.clone(), path.clone()).lock().await;
    assert!(failed.is_err(), "a lock whose create timed out: {failed:?}");
    // The late node shows up in the queue (and is removed from it, once the fix finds it).
    let reader = client(&store).await;
    let appeared = tokio::time::timeout(Duration::from_secs(5), async {
        while reader
            .children(&path)
            .await
            .map_or(true, |c| c.nodes.is_empty())
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(appeared.is_ok(), "the late create never happened");
    let next = Mutex::new(client(&store).await, path)
        .lock_timeout(Duration::from_secs(10))
        .await;
    assert!(next.is_ok(), "the late node kept the lock taken: {next:?}");
}

/// A suspension that ends with the same session: `lost()` resolves while it lasts (the lock
/// is at risk), and once the session is back the lock is held again and `lost()` waits anew,
/// so a holder that goes on after checking `is_held()` does not spin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_at_risk_during_a_suspension_is_held_again_after_it() {
    let store = MemoryStore::new();
    let holder = client(&store).await;
    let guard = Mutex::new(holder.clone(), NodePath::new("/locks/risk").unwrap())
        .lock()
        .await
        .unwrap();
    let session = holder.session().session_id.unwrap();
    let mut events = holder.session_events();
    // Cut once the guard watches its node, so the session's return alone makes it held
    // again (a cut before that is the next test's).
    until_watching(&store).await;
    store
        .interrupt_connection(session, Duration::from_millis(300))
        .unwrap();
    let at_risk = tokio::time::timeout(Duration::from_secs(5), guard.lost()).await;
    assert!(at_risk.is_ok(), "not told of the suspension");
    assert!(!guard.is_held());
    until_resumed(&mut events, session).await;
    let held_again = held_again_within(&guard, Duration::from_secs(5)).await;
    assert!(
        held_again,
        "not held again, or lost() still resolved, after resuming"
    );
    guard.unlock().await.unwrap();
}

/// A suspension that ends with the same session, on a backend whose watches resume without
/// a `Resync` (etcd), while the read that would show the node fails: the guard watches its
/// node anew and is held again once reads work, instead of staying at risk for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_whose_read_fails_after_a_suspension_is_held_again_once_reads_work() {
    let store = MemoryStore::new();
    let faulty = support::Faulty::new(client(&store).await);
    let holder: Arc<dyn Registry> = faulty.clone();
    let guard = Mutex::new(holder.clone(), NodePath::new("/locks/reread").unwrap())
        .lock()
        .await
        .unwrap();
    let session = holder.session().session_id.unwrap();
    let mut events = holder.session_events();
    until_watching(&store).await;
    faulty.drop_resyncs(true);
    faulty.fail_gets(true);
    store
        .interrupt_connection(session, Duration::from_millis(300))
        .unwrap();
    let at_risk = tokio::time::timeout(Duration::from_secs(5), guard.lost()).await;
    assert!(at_risk.is_ok(), "not told of the suspension");
    until_resumed(&mut events, session).await;
    let read_failed = tokio::time::timeout(Duration::from_secs(5), async {
        while faulty.gets_failed() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        read_failed.is_ok(),
        "the guard never read its node after resuming"
    );
    faulty.fail_gets(false);
    let held_again = held_again_within(&guard, Duration::from_secs(10)).await;
    assert!(
        held_again,
        "still at risk after the session resumed and reads work"
    );
    guard.unlock().await.unwrap();
}

/// The connection drops right after the lock is taken, before the guard's watch on its node
/// is open: the watch opens once the connection is back, and the lock is held again (the
/// failed open used to count the lock as lost for good, with the same session still
/// holding the node).
#[tokio::test(flavor = "current_thread")]
async fn a_lock_cut_off_before_its_watch_opens_is_held_again_after_it() {
    let store = MemoryStore::new();
    let holder = client(&store).await;
    let guard = Mutex::new(holder.clone(), NodePath::new("/locks/early").unwrap())
        .lock()
        .await
        .unwrap();
    let session = holder.session().session_id.unwrap();
    // One thread, not yielded to since the lock was taken: the guard's task has not run.
    assert_eq!(
        store.watcher_count(),
        0,
        "the guard already watches its node"
    );
    store
        .interrupt_connection(session, Duration::from_millis(300))
        .unwrap();
    let at_risk = tokio::time::timeout(Duration::from_secs(5), guard.lost()).await;
    assert!(at_risk.is_ok(), "not told of the suspension");
    let held_again = held_again_within(&guard, Duration::from_secs(10)).await;
    assert!(held_again, "not held again after the connection came back");
    assert_eq!(holder.session().session_id, Some(session));
    assert!(
        store.watcher_count() > 0,
        "the guard does not watch its node"
    );
    guard.unlock().await.unwrap();
}

/// A lock whose node watch breaks while the session lives is at risk until a watch opens
/// again and reads the node (unwatched, a delete by someone else would go unseen); then it is
/// held again. Opens that fail meanwhile are tried again after a delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_whose_watch_breaks_is_at_risk_until_its_node_is_read_again() {
    let store = MemoryStore::new();
    let faulty = support::Faulty::new(client(&store).await);
    let guard = Mutex::new(faulty.clone(), NodePath::new("/locks/unwatched").unwrap())
        .lock()
        .await
        .unwrap();
    let watching = tokio::time::timeout(Duration::from_secs(5), async {
        while faulty.watches_opened() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(watching.is_ok(), "the guard never watched its node");
    faulty.fail_watch_opens(2);
    faulty.break_watches();
    let at_risk = tokio::time::timeout(Duration::from_secs(5), guard.lost()).await;
    assert!(at_risk.is_ok(), "not told that its node went unwatched");
    let held_again = held_again_within(&guard, Duration::from_secs(10)).await;
    assert!(held_again, "not held again once watched again");
    assert_eq!(faulty.watches_opened(), 2, "the watch was not opened again");
    guard.unlock().await.unwrap();
}
