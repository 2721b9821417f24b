//! `TreeCache` on the memory backend, whose fault hooks make a cut connection last exactly as
//! long as the test says (the conformance suite runs its other cases on every backend).

use std::time::Duration;

use registry_core::memory::MemoryStore;
mod support;

use futures::StreamExt;
use registry_core::cache::EVENTS_BUFFER;
use registry_core::{
    Bytes, CacheEvent, CachedTree, CreateMode, DeleteScope, Error, Expected, Registry, TreeCache,
    WatchScope,
};
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

/// The next `n` events of `events` (10 s at most for all).
async fn next_events(
    events: &mut futures::stream::BoxStream<'static, CacheEvent>,
    n: usize,
) -> Vec<CacheEvent> {
    let taken =
        tokio::time::timeout(Duration::from_secs(10), events.take(n).collect::<Vec<_>>()).await;
    taken.unwrap_or_else(|_| panic!("fewer than {n} events within 10 s"))
}

/// (kind, path) of each event, for comparing with what was written.
fn kinds(events: &[CacheEvent]) -> Vec<(&'static str, String)> {
    events
        .iter()
        .map(|e| match e {
            CacheEvent::Created(n) => ("created", n.path.to_string()),
            CacheEvent::Updated { new, .. } => ("updated", new.path.to_string()),
            CacheEvent::Deleted(n) => ("deleted", n.path.to_string()),
            CacheEvent::Missed { count } => ("missed", count.to_string()),
        })
        .collect()
}

/// A listener hears each change node by node, in order, after the copy holds it: an update
/// with the node before and after, a deletion with the node as the copy held it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_hears_every_change_node_by_node() {
    let store = MemoryStore::new();
    let (c, writer) = (client(&store).await, client(&store).await);
    writer
        .create(&p("/ev/a"), Bytes::from("1"), CreateMode::Persistent)
        .await
        .unwrap();
    let cache = TreeCache::open(c.clone(), &p("/ev"), WatchScope::Subtree)
        .await
        .unwrap();
    let mut events = cache.events();
    writer
        .create(&p("/ev/b"), Bytes::from("b"), CreateMode::Persistent)
        .await
        .unwrap();
    writer
        .set(&p("/ev/a"), Bytes::from("2"), Expected::Any)
        .await
        .unwrap();
    writer
        .delete(&p("/ev/b"), Expected::Any, DeleteScope::Node)
        .await
        .unwrap();
    let heard = next_events(&mut events, 3).await;
    assert_eq!(
        kinds(&heard),
        [
            ("created", "/ev/b".to_owned()),
            ("updated", "/ev/a".to_owned()),
            ("deleted", "/ev/b".to_owned()),
        ]
    );
    match &heard[1] {
        CacheEvent::Updated { old, new } => {
            assert_eq!(
                (old.value.as_ref(), new.value.as_ref()),
                (&b"1"[..], &b"2"[..])
            );
        }
        other => panic!("{other:?}"),
    }
    match &heard[2] {
        CacheEvent::Deleted(gone) => assert_eq!(gone.value.as_ref(), b"b", "the copy's node"),
        other => panic!("{other:?}"),
    }
}

/// What changed while the client was cut off comes, once the copy is read again, as changes
/// against the copy it replaces (no snapshot): deletions children first, then creations and
/// updates in path order; what did not change is not told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_read_is_told_as_the_changes_it_brings() {
    let store = MemoryStore::new();
    let (c, writer) = (client(&store).await, client(&store).await);
    for path in ["/rr/old", "/rr/old/kid", "/rr/kept", "/rr/same"] {
        writer
            .create(&p(path), Bytes::from("1"), CreateMode::Persistent)
            .await
            .unwrap();
    }
    let cache = TreeCache::open(c.clone(), &p("/rr"), WatchScope::Subtree)
        .await
        .unwrap();
    let mut events = cache.events();
    let session = c.session().session_id.unwrap();
    store
        .interrupt_connection(session, Duration::from_secs(2))
        .unwrap();
    until(&cache, "stale while cut off", |tree| tree.is_stale()).await;
    // Written in the reverse of the order a re-read tells them in: events passed on as they
    // came would show it.
    writer
        .create(&p("/rr/new"), Bytes::from("1"), CreateMode::Persistent)
        .await
        .unwrap();
    writer
        .set(&p("/rr/kept"), Bytes::from("2"), Expected::Any)
        .await
        .unwrap();
    writer
        .delete(&p("/rr/old"), Expected::Any, DeleteScope::Recursive)
        .await
        .unwrap();
    let heard = next_events(&mut events, 4).await;
    assert_eq!(
        kinds(&heard),
        [
            ("deleted", "/rr/old/kid".to_owned()),
            ("deleted", "/rr/old".to_owned()),
            ("updated", "/rr/kept".to_owned()),
            ("created", "/rr/new".to_owned()),
        ]
    );
    until(&cache, "fresh", |tree| !tree.is_stale()).await;
}

/// A listener that falls behind is told how many changes it missed, then hears the rest; the
/// stream ends once the registry is closed, and a listener that comes later hears nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_behind_is_told_what_it_missed() {
    let store = MemoryStore::new();
    let (c, writer) = (client(&store).await, client(&store).await);
    let cache = TreeCache::open(c.clone(), &p("/m"), WatchScope::Children)
        .await
        .unwrap();
    let mut events = cache.events();
    let written = EVENTS_BUFFER + 76;
    writer
        .create(&p("/m"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    for i in 0..written {
        writer
            .create(
                &p(&format!("/m/n{i}")),
                Bytes::new(),
                CreateMode::Persistent,
            )
            .await
            .unwrap();
    }
    cache
        .wait_for(Duration::from_secs(10), |tree| {
            tree.children(&p("/m")).len() == written
        })
        .await
        .unwrap();
    let first = next_events(&mut events, 1).await;
    assert_eq!(first, [CacheEvent::Missed { count: 76 }]);
    let rest = next_events(&mut events, EVENTS_BUFFER).await;
    assert!(
        matches!(rest.last(), Some(CacheEvent::Created(n)) if n.path == p(&format!("/m/n{}", written - 1)))
    );
    c.close().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), events.next()).await;
    assert!(matches!(end, Ok(None)), "{end:?}");
    let late = tokio::time::timeout(Duration::from_secs(10), cache.events().next()).await;
    assert!(
        matches!(late, Ok(None)),
        "a stopped cache's new listener: {late:?}"
    );
}

/// `listen` while nodes are being created: every node is in the copy it returns or told as
/// created after it, never both and never neither (20 rounds, subscribing mid-burst).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_starts_exactly_where_its_copy_ends() {
    let store = MemoryStore::new();
    let (c, writer) = (client(&store).await, client(&store).await);
    const NODES: usize = 200;
    for round in 0..20 {
        let root = p(&format!("/l{round}"));
        writer
            .create(&root, Bytes::new(), CreateMode::Persistent)
            .await
            .unwrap();
        let cache = TreeCache::open(c.clone(), &root, WatchScope::Children)
            .await
            .unwrap();
        let burst = {
            let (writer, root) = (writer.clone(), root.clone());
            tokio::spawn(async move {
                for i in 0..NODES {
                    let path = p(&format!("{root}/n{i:04}"));
                    writer
                        .create(&path, Bytes::new(), CreateMode::Persistent)
                        .await
                        .unwrap();
                }
            })
        };
        // Mid-burst, as far as the round's timing goes.
        cache
            .wait_for(Duration::from_secs(10), |tree| {
                tree.children(&root).len() >= round * NODES / 20
            })
            .await
            .unwrap();
        let (copy, mut events) = cache.listen();
        let mut seen: std::collections::BTreeSet<String> = copy
            .children(&root)
            .iter()
            .map(|n| n.path.to_string())
            .collect();
        let collected = tokio::time::timeout(Duration::from_secs(10), async {
            while seen.len() < NODES {
                match events.next().await {
                    Some(CacheEvent::Created(node)) => {
                        let path = node.path.to_string();
                        assert!(
                            seen.insert(path.clone()),
                            "round {round}: {path} in the copy and told"
                        );
                    }
                    other => panic!("round {round}: {other:?}"),
                }
            }
        })
        .await;
        assert!(
            collected.is_ok(),
            "round {round}: {} of {NODES} nodes seen",
            seen.len()
        );
        burst.await.unwrap();
    }
}
