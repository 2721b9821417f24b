//! `TreeCache` on the memory backend, whose fault hooks make a cut connection last exactly as
//! long as the test says (the conformance suite runs its other cases on every backend).

use std::time::Duration;

use registry_core::memory::MemoryStore;
mod support;

use registry_core::{Bytes, CachedTree, CreateMode, Error, Registry, TreeCache, WatchScope};
use support::{client, p, Faulty};

/// Waits until `done` holds (10 s at most).
async fn until(cache: &TreeCache, what: &str, done: impl Fn(&CachedTree) -> bool) {
    let waited = cache.wait_for(Duration::from_secs(10), done).await;
    assert!(waited.is_ok(), "{what}: {waited:?}, {cache:?}");
}

/// While its client is cut off, the cache says it is stale and keeps the last copy; once the
/// client is back, it is fresh and holds what was written meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_makes_the_copy_stale_until_it_is_read_again() {
    let store = MemoryStore::new();
    let (c, writer) = (client(&store).await, client(&store).await);
    writer
        .create(&p("/s/kept"), Bytes::from("1"), CreateMode::Persistent)
        .await
        .unwrap();
    let cache = TreeCache::open(c.clone(), &p("/s"), WatchScope::Subtree)
        .await
        .unwrap();
    let session = c.session().session_id.unwrap();
    // Long enough to be seen, well inside the session TTL (the session stays).
    store
        .interrupt_connection(session, Duration::from_secs(2))
        .unwrap();
    until(&cache, "stale while cut off", |tree| tree.is_stale()).await;
    writer
        .create(&p("/s/during"), Bytes::from("1"), CreateMode::Persistent)
        .await
        .unwrap();
    {
        // Written while cut off (2 s is ample), so only a new read can bring it.
        let tree = cache.borrow();
        assert!(tree.is_stale(), "the cut ended before the write");
        assert!(tree.get(&p("/s/kept")).is_some(), "the last copy is kept");
        assert!(
            tree.get(&p("/s/during")).is_none(),
            "a cut-off watch delivered"
        );
    }
    until(&cache, "fresh with the write made meanwhile", |tree| {
        !tree.is_stale() && tree.get(&p("/s/during")).is_some()
    })
    .await;
    assert_eq!(c.session().session_id, Some(session), "the session stayed");
}

/// Dropping the cache releases its watch; a closed registry cannot open one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_cache_releases_its_watch() {
    let store = MemoryStore::new();
    let c = client(&store).await;
    let before = store.watcher_count();
    let cache = TreeCache::open(c.clone(), &p("/d"), WatchScope::Children)
        .await
        .unwrap();
    assert_eq!(store.watcher_count(), before + 1);
    drop(cache);
    let released = tokio::time::timeout(Duration::from_secs(10), async {
        while store.watcher_count() > before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(released.is_ok(), "watch still open 10 s after the drop");
    c.close().await.unwrap();
    let refused = TreeCache::open(c.clone(), &p("/d"), WatchScope::Children).await;
    assert!(matches!(refused, Err(Error::Closed)), "{refused:?}");
}

/// `wait_for` says why it gave up: its bound ran out, or the registry closed under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_ends_in_a_timeout_or_on_close() {
    let store = MemoryStore::new();
    let c = client(&store).await;
    let cache = TreeCache::open(c.clone(), &p("/w"), WatchScope::Subtree)
        .await
        .unwrap();
    let never = |tree: &CachedTree| tree.get(&p("/w/never")).is_some();
    let waited = cache.wait_for(Duration::from_millis(50), never).await;
    assert!(matches!(waited, Err(Error::Timeout { .. })), "{waited:?}");
    c.close().await.unwrap();
    let waited = cache.wait_for(Duration::from_secs(10), never).await;
    assert!(matches!(waited, Err(Error::Closed)), "{waited:?}");
    assert!(cache.is_stale(), "a closed registry's copy is stale");
}

/// A broken watch that cannot be opened again at first is retried until it opens; one that
/// is refused for good ends the following, stale, with the refusal as the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_watch_is_reopened_unless_refused_for_good() {
    let store = MemoryStore::new();
    let faulty = Faulty::new(client(&store).await);
    let writer = client(&store).await;
    let cache = TreeCache::open(faulty.clone(), &p("/b"), WatchScope::Subtree)
        .await
        .unwrap();
    faulty.fail_watch_opens(2);
    faulty.break_watches();
    writer
        .create(&p("/b/after"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    until(&cache, "reopened and fresh", |tree| {
        !tree.is_stale() && tree.get(&p("/b/after")).is_some()
    })
    .await;
    assert!(faulty.watches_opened() >= 2, "never reopened");
    faulty.refuse_watch_opens(true);
    faulty.break_watches();
    let waited = cache
        .wait_for(Duration::from_secs(10), |tree| tree.failure().is_some())
        .await;
    assert!(waited.is_ok(), "{waited:?}");
    let tree = cache.borrow();
    assert!(tree.is_stale());
    assert!(
        matches!(tree.failure(), Some(Error::PermissionDenied { .. })),
        "{:?}",
        tree.failure()
    );
}
