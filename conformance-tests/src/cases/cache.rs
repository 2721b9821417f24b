//! Cases on [`TreeCache`], the live copy of a subtree built only on the trait, and on the
//! [`PersistentWatch`] under it.

use std::time::Duration;

use registry_core::{
    Bytes, CacheEvent, CachedTree, CreateMode, DeleteScope, Expected, PersistentItem,
    PersistentWatch, TreeCache, WatchScope,
};

use crate::fixture::{Fault, Fixture};
use crate::support::{p, read_scope, session_of, summary, CaseEnv, NodeSummary, Outcome};

/// Waits until the cache's copy satisfies `done`, within `bound`.
async fn cache_until(
    cache: &TreeCache,
    bound: Duration,
    what: &str,
    done: impl Fn(&CachedTree) -> bool,
) {
    if let Err(error) = cache.wait_for(bound, done).await {
        let tree = cache.borrow();
        panic!(
            "{what}: {error}; stale {}, copy {:?}",
            tree.is_stale(),
            summary(tree.nodes())
        );
    }
}

/// What a fresh read of `root`'s subtree through `reader` finds.
async fn fresh(
    reader: &std::sync::Arc<dyn registry_core::Registry>,
    root: &str,
) -> Vec<NodeSummary> {
    let nodes = read_scope(reader, &p(root), WatchScope::Subtree)
        .await
        .unwrap_or_else(|e| panic!("read {root}: {e}"));
    summary(nodes.iter())
}

/// The cache opens with the tree as it is, then follows every write: its copy ends equal to
/// a fresh read, children in creation order, and a listener hears each write once, node by
/// node.
pub async fn tree_cache_follows_writes(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "tree_cache_follows_writes");
    let c = env.client().await;
    let writer = env.client().await;
    let at = env.at();
    for path in ["/tc/a", "/tc/a/x", "/tc/b"] {
        c.create(&p(path), Bytes::from("1"), CreateMode::Persistent)
            .await
            .unwrap_or_else(|e| panic!("{at} create {path}: {e}"));
    }
    let cache = TreeCache::open(c.clone(), &p("/tc"), WatchScope::Subtree)
        .await
        .unwrap_or_else(|e| panic!("{at} open: {e}"));
    {
        let tree = cache.borrow();
        assert!(!tree.is_stale(), "{at} stale right after open");
        let names: Vec<&str> = tree
            .children(&p("/tc"))
            .iter()
            .map(|n| n.path.as_str())
            .collect();
        assert_eq!(names, ["/tc/a", "/tc/b"], "{at} children at open");
        assert!(tree.get(&p("/tc/a/x")).is_some(), "{at} grandchild at open");
    }
    let mut events = cache.events();
    writer
        .set(&p("/tc/a"), Bytes::from("2"), Expected::Any)
        .await
        .unwrap_or_else(|e| panic!("{at} set: {e}"));
    for (path, mode) in [
        ("/tc/c", CreateMode::Persistent),
        ("/tc/a/y", CreateMode::Ephemeral),
    ] {
        writer
            .create(&p(path), Bytes::from("1"), mode)
            .await
            .unwrap_or_else(|e| panic!("{at} create {path}: {e}"));
    }
    writer
        .delete(&p("/tc/b"), Expected::Any, DeleteScope::Node)
        .await
        .unwrap_or_else(|e| panic!("{at} delete: {e}"));
    let expected = fresh(&writer, "/tc").await;
    cache_until(
        &cache,
        Duration::from_secs(10),
        &format!("{at} copy equals a read"),
        |tree| summary(tree.nodes()) == expected,
    )
    .await;
    let names: Vec<String> = cache
        .children(&p("/tc"))
        .iter()
        .map(|n| n.path.to_string())
        .collect();
    assert_eq!(names, ["/tc/a", "/tc/c"], "{at} children after the writes");
    assert_eq!(
        cache.get(&p("/tc/a")).map(|n| n.value),
        Some(Bytes::from("2")),
        "{at} value after the write"
    );
    // Each path was written once: one change each, in any order across paths (ZooKeeper
    // reports net changes per read).
    let heard = tokio::time::timeout(
        Duration::from_secs(10),
        futures::StreamExt::collect::<Vec<_>>(futures::StreamExt::take(&mut events, 4)),
    )
    .await
    .unwrap_or_else(|_| panic!("{at} fewer than 4 cache events"));
    let mut kinds: Vec<(&str, String)> = heard
        .iter()
        .map(|e| match e {
            CacheEvent::Created(n) => ("created", n.path.to_string()),
            CacheEvent::Updated { old, new } => {
                assert_eq!(
                    (&old.value[..], &new.value[..]),
                    (&b"1"[..], &b"2"[..]),
                    "{at} update"
                );
                ("updated", new.path.to_string())
            }
            CacheEvent::Deleted(n) => ("deleted", n.path.to_string()),
            CacheEvent::Missed { count } => panic!("{at} missed {count}"),
        })
        .collect();
    kinds.sort();
    let expected = [
        ("created", "/tc/a/y"),
        ("created", "/tc/c"),
        ("deleted", "/tc/b"),
        ("updated", "/tc/a"),
    ];
    assert_eq!(
        kinds,
        expected.map(|(k, path)| (k, path.to_owned())),
        "{at} cache events"
    );
    // Nothing else changed: after one more write, its creation is the next event (an event
    // the writes above still owed would come before it).
    writer
        .create(&p("/tc/end"), Bytes::from("1"), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create /tc/end: {e}"));
    let next = tokio::time::timeout(
        Duration::from_secs(10),
        futures::StreamExt::next(&mut events),
    )
    .await;
    assert!(
        matches!(&next, Ok(Some(CacheEvent::Created(n))) if n.path.as_str() == "/tc/end"),
        "{at} an event beyond the writes, or none for the last one: {next:?}"
    );
    env.finish().await
}

/// After its client's session is lost, the cache keeps serving and comes back fresh with
/// every change made meanwhile, the lost session's ephemeral node gone.
pub async fn tree_cache_recovers_after_session_loss(fx: &dyn Fixture) -> Outcome {
    if !fx.supports(Fault::ExpireSession) {
        return Outcome::Skipped("fixture cannot expire sessions".into());
    }
    let mut env = CaseEnv::new(fx, "tree_cache_recovers_after_session_loss");
    let c = env.client().await;
    let writer = env.client().await;
    let at = env.at();
    writer
        .create(&p("/tr/kept"), Bytes::from("1"), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create: {e}"));
    c.create(&p("/tr/mine"), Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap_or_else(|e| panic!("{at} create ephemeral: {e}"));
    let cache = TreeCache::open(c.clone(), &p("/tr"), WatchScope::Subtree)
        .await
        .unwrap_or_else(|e| panic!("{at} open: {e}"));
    assert!(
        cache.get(&p("/tr/mine")).is_some(),
        "{at} ephemeral at open"
    );
    fx.expire_session(session_of(&c))
        .await
        .unwrap_or_else(|e| panic!("{at} expire: {e}"));
    // Written while the cache's session turns over.
    writer
        .create(&p("/tr/during"), Bytes::from("1"), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create during: {e}"));
    writer
        .set(&p("/tr/kept"), Bytes::from("2"), Expected::Any)
        .await
        .unwrap_or_else(|e| panic!("{at} set during: {e}"));
    let bound = fx.expiry_bound() + Duration::from_secs(20);
    cache_until(
        &cache,
        bound,
        &format!("{at} the ephemeral leaves the copy"),
        |tree| tree.get(&p("/tr/mine")).is_none(),
    )
    .await;
    let expected = fresh(&writer, "/tr").await;
    cache_until(
        &cache,
        bound,
        &format!("{at} fresh and equal to a read"),
        |tree| !tree.is_stale() && summary(tree.nodes()) == expected,
    )
    .await;
    env.finish().await
}

/// A persistent watch of three sources (children, node and subtree scopes) whose session is
/// lost says it is stale, and the first time it is fresh again every source's state, built
/// from its items alone, equals a fresh read: the lost session's ephemeral gone, every write
/// made meanwhile in.
pub async fn persistent_watch_reads_every_source_anew(fx: &dyn Fixture) -> Outcome {
    if !fx.supports(Fault::ExpireSession) {
        return Outcome::Skipped("fixture cannot expire sessions".into());
    }
    let mut env = CaseEnv::new(fx, "persistent_watch_reads_every_source_anew");
    let c = env.client().await;
    let writer = env.client().await;
    let at = env.at();
    for (path, value) in [("/pw/a/x", "1"), ("/pw/b", "1"), ("/pw/c/d", "1")] {
        writer
            .create(&p(path), Bytes::from(value), CreateMode::Persistent)
            .await
            .unwrap_or_else(|e| panic!("{at} create {path}: {e}"));
    }
    c.create(&p("/pw/a/mine"), Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap_or_else(|e| panic!("{at} create ephemeral: {e}"));
    let sources = vec![
        (p("/pw/a"), WatchScope::Children),
        (p("/pw/b"), WatchScope::Node),
        (p("/pw/c"), WatchScope::Subtree),
    ];
    let (mut watch, mut states) = PersistentWatch::open(c.clone(), sources.clone())
        .await
        .unwrap_or_else(|e| panic!("{at} open: {e}"));
    assert!(!watch.is_stale(), "{at} stale right after open");
    assert!(
        states[0].get(&p("/pw/a/mine")).is_some(),
        "{at} ephemeral at open"
    );
    fx.expire_session(session_of(&c))
        .await
        .unwrap_or_else(|e| panic!("{at} expire: {e}"));
    writer
        .set(&p("/pw/b"), Bytes::from("2"), Expected::Any)
        .await
        .unwrap_or_else(|e| panic!("{at} set during: {e}"));
    for path in ["/pw/a/y", "/pw/c/d/e"] {
        writer
            .create(&p(path), Bytes::from("1"), CreateMode::Persistent)
            .await
            .unwrap_or_else(|e| panic!("{at} create {path} during: {e}"));
    }
    let bound = fx.expiry_bound() + Duration::from_secs(20);
    let mut stale_seen = false;
    let followed = tokio::time::timeout(bound, async {
        while let Some(item) = watch.next().await {
            match item {
                Ok(PersistentItem::Event { source, event }) => states[source].apply(&event),
                Ok(PersistentItem::Staleness) => {}
                Err(error) => panic!("{at} refused: {error}"),
            }
            stale_seen |= watch.is_stale();
            if stale_seen && !watch.is_stale() {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        followed,
        Ok(true),
        "{at} fresh again after the session loss (stale seen: {stale_seen})"
    );
    for ((path, scope), state) in sources.iter().zip(&states) {
        let read = read_scope(&writer, path, *scope)
            .await
            .unwrap_or_else(|e| panic!("{at} read {path}: {e}"));
        assert_eq!(
            summary(state.nodes()),
            summary(read.iter()),
            "{at} {path} ({scope:?}) at the first fresh moment"
        );
    }
    env.finish().await
}
