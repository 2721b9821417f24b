//! Cases on watches: scopes, the model check, releasing streams.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use registry_core::{
    Bytes, CreateMode, DeleteScope, Expected, NodePath, Registry, ResyncReason, WatchEvent,
    WatchOptions, WatchScope, WatchStream, WatchedState,
};

use crate::fixture::Fixture;
use crate::support::{
    apply_until, create_all, diff, next_event, p, read_scope, summary, CaseEnv, Outcome,
};

/// The next change event; fails if it is out of scope or a second snapshot.
async fn next_change(
    stream: &mut WatchStream,
    scope: WatchScope,
    root: &NodePath,
    what: &str,
) -> WatchEvent {
    let event = next_event(stream, what).await;
    match &event {
        WatchEvent::Created(n) | WatchEvent::Updated(n) | WatchEvent::Deleted(n) => {
            assert!(
                scope.covers(root, &n.path),
                "{what}: event out of scope: {event:?}"
            );
        }
        WatchEvent::Resync { .. } => {}
        WatchEvent::Snapshot(_) => panic!("{what}: a second snapshot: {event:?}"),
    }
    event
}

async fn scope_case(fx: &dyn Fixture, case: &'static str, scope: WatchScope) -> Outcome {
    let mut env = CaseEnv::new(fx, case);
    let c = env.client().await;
    let writer = env.client().await;
    let at = env.at();
    let root = p("/w/a");
    for path in ["/w/a", "/w/a/x", "/w/a/x/deep", "/w/b"] {
        c.create(&p(path), Bytes::from("0"), CreateMode::Persistent)
            .await
            .unwrap_or_else(|e| panic!("{at} create {path}: {e}"));
    }
    let mut stream = c
        .watch(&root, WatchOptions::scoped(scope))
        .await
        .unwrap_or_else(|e| panic!("{at} watch: {e}"));
    let expected_snapshot: &[&str] = match scope {
        WatchScope::Node => &["/w/a"],
        WatchScope::Children => &["/w/a/x"],
        WatchScope::Subtree => &["/w/a", "/w/a/x", "/w/a/x/deep"],
    };
    match next_event(&mut stream, "snapshot").await {
        WatchEvent::Snapshot(s) => {
            // In path order, as the snapshot promises, not merely the same set.
            let paths: Vec<_> = s.nodes.iter().map(|n| n.path.to_string()).collect();
            assert_eq!(paths, expected_snapshot, "{at} snapshot of {scope:?}");
        }
        other => panic!("{at} first item is not a snapshot: {other:?}"),
    }
    // Writes out of scope first: none of them may show up.
    let mut out_of_scope = vec!["/w/b", "/w"];
    if scope != WatchScope::Subtree {
        out_of_scope.push("/w/a/x/deep");
    }
    if scope == WatchScope::Children {
        out_of_scope.push("/w/a");
    }
    for path in &out_of_scope {
        writer
            .set(&p(path), Bytes::from("noise"), Expected::Any)
            .await
            .unwrap_or_else(|e| panic!("{at} set {path}: {e}"));
    }
    let (updated, created) = match scope {
        WatchScope::Node => ("/w/a", "/w/a"),
        WatchScope::Children => ("/w/a/x", "/w/a/y"),
        WatchScope::Subtree => ("/w/a/x/deep", "/w/a/x/deep/z"),
    };
    let w = writer
        .set(&p(updated), Bytes::from("1"), Expected::Any)
        .await
        .unwrap_or_else(|e| panic!("{at} set: {e}"));
    match next_change(&mut stream, scope, &root, &format!("{at} update")).await {
        WatchEvent::Updated(n) => assert_eq!(
            (n.path.as_str(), n.value.clone(), n.version),
            (updated, Bytes::from("1"), w.version),
            "{at} update event"
        ),
        other => panic!("{at} expected Updated({updated}), got {other:?}"),
    }
    if scope == WatchScope::Node {
        writer
            .delete(&root, Expected::Any, DeleteScope::Recursive)
            .await
            .unwrap_or_else(|e| panic!("{at} delete: {e}"));
        let mut state = WatchedState::new();
        state.apply(&WatchEvent::Snapshot(Default::default()));
        match next_change(&mut stream, scope, &root, &format!("{at} delete")).await {
            // The node as last delivered: the update's value and version.
            WatchEvent::Deleted(n) => assert_eq!(
                (&n.path, n.value.clone(), n.version),
                (&root, Bytes::from("1"), w.version),
                "{at} delete event"
            ),
            other => panic!("{at} expected Deleted, got {other:?}"),
        }
        writer
            .create(&root, Bytes::from("again"), CreateMode::Persistent)
            .await
            .unwrap_or_else(|e| panic!("{at} re-create: {e}"));
    } else {
        writer
            .create(&p(created), Bytes::from("new"), CreateMode::Persistent)
            .await
            .unwrap_or_else(|e| panic!("{at} create: {e}"));
    }
    match next_change(&mut stream, scope, &root, &format!("{at} create")).await {
        WatchEvent::Created(n) => assert_eq!(n.path.as_str(), created, "{at} create event"),
        other => panic!("{at} expected Created({created}), got {other:?}"),
    }
    if scope != WatchScope::Node {
        writer
            .delete(&p(created), Expected::Any, DeleteScope::Node)
            .await
            .unwrap_or_else(|e| panic!("{at} delete: {e}"));
        match next_change(&mut stream, scope, &root, &format!("{at} delete")).await {
            WatchEvent::Deleted(n) => assert_eq!(
                (n.path.as_str(), n.value.clone()),
                (created, Bytes::from("new")),
                "{at} delete event"
            ),
            other => panic!("{at} expected Deleted({created}), got {other:?}"),
        }
    }
    env.finish().await
}

/// A node-scope watch: snapshot of the node, then its update, deletion and re-creation only.
pub async fn watch_node_scope(fx: &dyn Fixture) -> Outcome {
    scope_case(fx, "watch_node_scope", WatchScope::Node).await
}

/// A children-scope watch on `/a` sees `/a/x` but never `/a` itself or `/a/x/y`.
pub async fn watch_children_scope(fx: &dyn Fixture) -> Outcome {
    scope_case(fx, "watch_children_scope", WatchScope::Children).await
}

/// A subtree-scope watch sees the node and every descendant, nothing beside it.
pub async fn watch_subtree_scope(fx: &dyn Fixture) -> Outcome {
    scope_case(fx, "watch_subtree_scope", WatchScope::Subtree).await
}

async fn random_writer(client: Arc<dyn Registry>, seed: u64, ops: usize) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let names = ["a", "b", "c", "d"];
    for _ in 0..ops {
        let dir = if rng.gen_bool(0.5) { "/m/x" } else { "/m/x/y" };
        let path = p(&format!("{dir}/{}", names[rng.gen_range(0..names.len())]));
        let value = Bytes::from(rng.gen::<u32>().to_string());
        let result = match rng.gen_range(0..10) {
            0..=2 => client
                .create(&path, value, CreateMode::Persistent)
                .await
                .map(|_| ()),
            3 => client
                .create(&path, value, CreateMode::Ephemeral)
                .await
                .map(|_| ()),
            4 => client
                .create(
                    &p(&format!("{dir}/s-")),
                    value,
                    CreateMode::PersistentSequential,
                )
                .await
                .map(|_| ()),
            5..=7 => client.set(&path, value, Expected::Any).await.map(|_| ()),
            _ => {
                client
                    .delete(&path, Expected::Any, DeleteScope::Recursive)
                    .await
            }
        };
        match result {
            Ok(())
            | Err(registry_core::Error::AlreadyExists { .. })
            | Err(registry_core::Error::NotFound { .. })
            | Err(registry_core::Error::NotEmpty { .. })
            | Err(registry_core::Error::EphemeralParent { .. }) => {}
            Err(e) => return Err(format!("writer {seed}: {e}")),
        }
    }
    Ok(())
}

/// Model check: 4 writers make 250 random changes each while watchers of every scope apply
/// their streams; after a last write in every scope, each watcher's state equals a fresh
/// read, and every item up to that write could follow the ones before (see `follows`). With
/// exact events, every path's events also arrive in strictly increasing order, without
/// duplicates.
pub async fn watch_model_check(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "watch_model_check");
    let reader = env.client().await;
    let at = env.at();
    reader
        .create(&p("/m/x/y"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} setup: {e}"));
    let exact = reader.capabilities().exact_events;
    let seed: u64 = rand::thread_rng().gen();
    eprintln!("{at} model check seed {seed}");
    let watched = [
        (p("/m"), WatchScope::Subtree),
        (p("/m/x"), WatchScope::Children),
        (p("/m/x/y/a"), WatchScope::Node),
    ];
    let mut streams = Vec::new();
    for (path, scope) in &watched {
        let watcher = env.client().await;
        let stream = watcher
            .watch(path, WatchOptions::scoped(*scope))
            .await
            .unwrap_or_else(|e| panic!("{at} watch: {e}"));
        streams.push((
            path.clone(),
            *scope,
            stream,
            WatchedState::new(),
            HashMap::<NodePath, u64>::new(),
            true,
        ));
    }
    let mut writers = Vec::new();
    for i in 0..4u64 {
        let w = env.client().await;
        writers.push(tokio::spawn(random_writer(w, seed.wrapping_add(i), 250)));
    }
    for w in writers {
        w.await
            .unwrap_or_else(|e| panic!("{at} writer task: {e}"))
            .unwrap_or_else(|e| panic!("{at} {e} (seed {seed})"));
    }
    // A last write in every watched scope, after all of the writers' changes: each stream is
    // then read (and checked) past every event they caused, not only until its state first
    // matches a fresh read, which could leave a stray event after it unseen.
    let end = Bytes::from_static(b"model-check-end");
    let last = p("/m/x/y/a");
    match reader.set(&last, end.clone(), Expected::Any).await {
        Ok(_) => {}
        Err(registry_core::Error::NotFound { .. }) => {
            reader
                .create(&last, end.clone(), CreateMode::Persistent)
                .await
                .unwrap_or_else(|e| panic!("{at} last write of {last}: {e}"));
        }
        Err(e) => panic!("{at} last write of {last}: {e}"),
    }
    reader
        .create(&p("/m/x/end"), end, CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} last write of /m/x/end: {e}"));
    for (path, scope, stream, state, last_order, fresh) in &mut streams {
        let expected = summary(
            read_scope(&reader, path, *scope)
                .await
                .unwrap_or_else(|e| panic!("{at} fresh read: {e}"))
                .iter(),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while summary(state.nodes()) != expected {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let item = match tokio::time::timeout(left, futures::StreamExt::next(stream)).await {
                Ok(Some(Ok(event))) => event,
                other => panic!(
                    "{at} watcher of {path} ({scope:?}) did not converge (seed {seed}): {other:?}\n{}",
                    diff(&expected, &summary(state.nodes()))
                ),
            };
            if let Err(wrong) = follows(state, *fresh, &item, exact) {
                panic!("{at} watcher of {path} ({scope:?}), seed {seed}: {wrong}: {item:?}");
            }
            if exact {
                if let WatchEvent::Created(n) | WatchEvent::Updated(n) | WatchEvent::Deleted(n) =
                    &item
                {
                    let prev = last_order.insert(n.path.clone(), n.modify_order);
                    assert!(
                        prev.is_none_or(|prev| prev < n.modify_order),
                        "{at} event for {} out of order or duplicated (seed {seed}): {item:?}",
                        n.path
                    );
                }
            }
            *fresh = matches!(item, WatchEvent::Snapshot(_) | WatchEvent::Resync { .. });
            state.apply(&item);
        }
    }
    env.finish().await
}

/// Whether `item` can follow what a stream delivered so far (`state`; `fresh`: its last item
/// was a snapshot or resync). On every backend a `Created` is of a node the consumer does not
/// hold, an `Updated` or `Deleted` of one it holds. Where each change is its own event, each
/// comes at a revision past the snapshot's and no older than the change before (one Txn's
/// events share one), and an `Updated` is one write after the node held: the next version of
/// the same creation. So a lost, repeated or reordered event shows, not only a wrong end state.
fn follows(
    state: &WatchedState,
    fresh: bool,
    item: &WatchEvent,
    exact: bool,
) -> Result<(), &'static str> {
    let (node, held) = match item {
        WatchEvent::Snapshot(_) | WatchEvent::Resync { .. } => return Ok(()),
        WatchEvent::Created(n) | WatchEvent::Updated(n) | WatchEvent::Deleted(n) => {
            (n, state.get(&n.path))
        }
    };
    match (item, held) {
        (WatchEvent::Created(_), Some(_)) => return Err("created, but already held"),
        (WatchEvent::Updated(_) | WatchEvent::Deleted(_), None) => {
            return Err("a change of a node not held")
        }
        _ => {}
    }
    if !exact {
        return Ok(());
    }
    let floor = state.revision().0;
    if node.modify_order < floor || (fresh && node.modify_order == floor) {
        return Err("a change older than what the stream already showed");
    }
    if let (WatchEvent::Updated(now), Some(was)) = (item, held) {
        if now.create_order != was.create_order || now.version != was.version + 1 {
            return Err("an update that is not the next write of the node held");
        }
    }
    Ok(())
}

/// A watch that starts after a listing's revision misses nothing in between: a backend that
/// can replay from a revision delivers the changes since, one that cannot starts with a
/// `Resync` (`StartNotReplayable`) of what is there now.
pub async fn watch_from_revision(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "watch_from_revision");
    let c = env.client().await;
    let replays = c.capabilities().watch_from_revision;
    let at = env.at();
    c.create(&p("/r/a"), Bytes::from("a"), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create: {e}"));
    let listing = c
        .children(&p("/r"))
        .await
        .unwrap_or_else(|e| panic!("{at} children: {e}"));
    c.create(&p("/r/b"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create: {e}"));
    let mut stream = c
        .watch(&p("/r"), WatchOptions::children().after(listing.revision))
        .await
        .unwrap_or_else(|e| panic!("{at} watch: {e}"));
    match next_event(&mut stream, "replayed create").await {
        WatchEvent::Created(n) if replays => assert_eq!(n.path.as_str(), "/r/b", "{at}"),
        // A backend that cannot replay says so and starts from what is there now.
        WatchEvent::Resync {
            snapshot,
            reason: ResyncReason::StartNotReplayable,
        } if !replays => {
            let paths: Vec<_> = snapshot.nodes.iter().map(|n| n.path.as_str()).collect();
            assert_eq!(paths, ["/r/a", "/r/b"], "{at} the resync's snapshot");
        }
        other => panic!(
            "{at} expected {} first, got {other:?}",
            if replays {
                "the create after the listing"
            } else {
                "a resync (start not replayable)"
            }
        ),
    }
    // A node the stream never delivered is still reported as it was when deleted.
    c.delete(&p("/r/a"), Expected::Any, DeleteScope::Node)
        .await
        .unwrap_or_else(|e| panic!("{at} delete: {e}"));
    match next_event(&mut stream, "delete").await {
        WatchEvent::Deleted(n) => assert_eq!(
            (n.path.as_str(), n.value.clone()),
            ("/r/a", Bytes::from("a")),
            "{at}"
        ),
        other => panic!("{at} expected the delete of /r/a, got {other:?}"),
    }
    env.finish().await
}

/// A deletions-only watch shows every node in its snapshot and then only deletions, in commit
/// order (on exact backends also of a node created after it); no write reaches it.
pub async fn watch_deletions_only(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "watch_deletions_only");
    let c = env.client().await;
    let writer = env.client().await;
    let at = env.at();
    c.create(&p("/o"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create /o: {e}"));
    let a = c
        .create(&p("/o/a"), Bytes::from("0"), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create /o/a: {e}"));
    let create_b = || async {
        writer
            .create(&p("/o/b"), Bytes::from("0"), CreateMode::Ephemeral)
            .await
            .unwrap_or_else(|e| panic!("{at} create /o/b: {e}"))
    };
    // A backend that reports the net change between its reads may never read a node created
    // after the watch before it is deleted (nothing here waits for a read): there /o/b is in
    // the snapshot, and only exact backends show the deletion of a node never shown.
    let exact = c.capabilities().exact_events;
    let early_b = if exact { None } else { Some(create_b().await) };
    let mut stream = c
        .watch(&p("/o"), WatchOptions::children().deletions_only())
        .await
        .unwrap_or_else(|e| panic!("{at} watch: {e}"));
    let shown: &[&str] = if exact { &["/o/a"] } else { &["/o/a", "/o/b"] };
    match next_event(&mut stream, "snapshot").await {
        WatchEvent::Snapshot(s) => {
            let paths: Vec<_> = s.nodes.iter().map(|n| n.path.as_str()).collect();
            assert_eq!(paths, shown, "{at} snapshot");
        }
        other => panic!("{at} first item is not a snapshot: {other:?}"),
    }
    writer
        .set(&p("/o/a"), Bytes::from("1"), Expected::Any)
        .await
        .unwrap_or_else(|e| panic!("{at} set /o/a: {e}"));
    let b = match early_b {
        Some(b) => b,
        None => create_b().await,
    };
    writer
        .set(&p("/o/b"), Bytes::from("1"), Expected::Any)
        .await
        .unwrap_or_else(|e| panic!("{at} set /o/b: {e}"));
    // A write that got through would come before the deletion after it (commit order, or
    // for net-change backends in the batch of their next read).
    for (path, created) in [("/o/a", a.create_order), ("/o/b", b.create_order)] {
        writer
            .delete(&p(path), Expected::Any, DeleteScope::Node)
            .await
            .unwrap_or_else(|e| panic!("{at} delete {path}: {e}"));
        match next_event(&mut stream, &format!("{at} delete of {path}")).await {
            WatchEvent::Deleted(n) => {
                assert_eq!(n.path.as_str(), path, "{at} deletion");
                // The delete's revision, or the last write the backend saw: never before the
                // creation, which is what a registration tells incarnations apart by.
                assert!(
                    n.modify_order >= created,
                    "{at} {path} reported at {}, before its creation at {created}",
                    n.modify_order
                );
            }
            other => panic!("{at} expected only the delete of {path}, got {other:?}"),
        }
    }
    env.finish().await
}

/// A recursive delete reports each node's deletion after its descendants', so a consumer
/// applying events one by one never holds a node whose parent it already removed.
pub async fn watch_recursive_delete_children_first(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "watch_recursive_delete_children_first");
    let c = env.client().await;
    let writer = env.client().await;
    let at = env.at();
    for path in ["/t", "/t/a", "/t/a/b", "/t/a/b/c", "/t/a/d", "/t/e"] {
        c.create(&p(path), Bytes::from("0"), CreateMode::Persistent)
            .await
            .unwrap_or_else(|e| panic!("{at} create {path}: {e}"));
    }
    let mut stream = c
        .watch(&p("/t"), WatchOptions::scoped(WatchScope::Subtree))
        .await
        .unwrap_or_else(|e| panic!("{at} watch: {e}"));
    match next_event(&mut stream, "snapshot").await {
        WatchEvent::Snapshot(s) => assert_eq!(s.nodes.len(), 6, "{at} snapshot: {s:?}"),
        other => panic!("{at} first item is not a snapshot: {other:?}"),
    }
    writer
        .delete(&p("/t/a"), Expected::Any, DeleteScope::Recursive)
        .await
        .unwrap_or_else(|e| panic!("{at} delete /t/a: {e}"));
    let mut order: Vec<NodePath> = Vec::new();
    while order.len() < 4 {
        match next_change(&mut stream, WatchScope::Subtree, &p("/t"), "the deletions").await {
            WatchEvent::Deleted(n) => order.push(n.path),
            other => panic!("{at} expected only deletions, got {other:?} after {order:?}"),
        }
    }
    let mut deleted: Vec<&str> = order.iter().map(|n| n.as_str()).collect();
    deleted.sort();
    assert_eq!(
        deleted,
        ["/t/a", "/t/a/b", "/t/a/b/c", "/t/a/d"],
        "{at} deleted {order:?}"
    );
    for (i, node) in order.iter().enumerate() {
        if let Some(late) = order[i + 1..].iter().find(|later| later.is_within(node)) {
            panic!("{at} {node} reported deleted before {late}, below it: {order:?}");
        }
    }
    env.finish().await
}

/// Children of the large change in [`watch_large_change_reaches_a_reading_consumer`]: more
/// than any backend's stream buffers (4096).
pub const LARGE_CHANGE: usize = 5000;

/// One change that stands for more items than a stream buffers (a recursive delete of
/// [`LARGE_CHANGE`] children) reaches a consumer that keeps reading as each deletion, with no
/// `Resync`: a stream resyncs as lagging only when its consumer falls behind.
pub async fn watch_large_change_reaches_a_reading_consumer(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "watch_large_change_reaches_a_reading_consumer");
    let c = env.client().await;
    let writer = env.client().await;
    let at = env.at();
    let paths = (0..LARGE_CHANGE).map(|i| p(&format!("/large/child-{i:04}")));
    create_all(&writer, paths, CreateMode::Persistent, &at).await;
    let root = p("/large");
    let mut stream = c
        .watch(&root, WatchOptions::children())
        .await
        .unwrap_or_else(|e| panic!("{at} watch: {e}"));
    match next_event(&mut stream, "snapshot").await {
        WatchEvent::Snapshot(s) => assert_eq!(s.nodes.len(), LARGE_CHANGE, "{at} snapshot"),
        other => panic!("{at} first item is not a snapshot: {other:?}"),
    }
    writer
        .delete(&root, Expected::Any, DeleteScope::Recursive)
        .await
        .unwrap_or_else(|e| panic!("{at} delete /large: {e}"));
    let mut deleted = std::collections::BTreeSet::new();
    while deleted.len() < LARGE_CHANGE {
        match next_change(&mut stream, WatchScope::Children, &root, "the deletions").await {
            WatchEvent::Deleted(n) => {
                assert!(
                    deleted.insert(n.path.clone()),
                    "{at} {} deleted twice",
                    n.path
                );
            }
            other => panic!(
                "{at} after {} of {LARGE_CHANGE} deletions: {}",
                deleted.len(),
                match other {
                    WatchEvent::Resync { reason, .. } => format!("a Resync ({reason:?})"),
                    other => format!("{other:?}"),
                }
            ),
        }
    }
    env.finish().await
}

/// A stream outlives the handle it was opened from: dropping every handle of a client while
/// one of its streams is kept neither ends the stream nor the client's session; dropping the
/// stream then lets the session go.
pub async fn watch_outlives_its_client_handle(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "watch_outlives_its_client_handle");
    let writer = env.client().await;
    let at = env.at();
    writer
        .create(&p("/o"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create /o: {e}"));
    // Not the environment's: its only handle is dropped below.
    let owner = fx
        .open(&env.namespace)
        .await
        .unwrap_or_else(|e| panic!("{at} open: {e}"));
    owner
        .create(&p("/o/e"), Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap_or_else(|e| panic!("{at} create /o/e: {e}"));
    let mut stream = owner
        .watch(&p("/o"), WatchOptions::children())
        .await
        .unwrap_or_else(|e| panic!("{at} watch: {e}"));
    let _ = next_event(&mut stream, "snapshot").await;
    drop(owner);
    writer
        .create(&p("/o/new"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create /o/new: {e}"));
    match next_change(&mut stream, WatchScope::Children, &p("/o"), "/o/new").await {
        WatchEvent::Created(n) if n.path == p("/o/new") => {}
        other => panic!("{at} expected /o/new created, got {other:?}"),
    }
    assert!(
        writer
            .exists(&p("/o/e"))
            .await
            .unwrap_or_else(|e| panic!("{at} exists: {e}")),
        "{at} the session ended with its handle while its stream was kept"
    );
    drop(stream);
    crate::support::eventually(
        fx.session_ttl() + fx.expiry_bound(),
        &format!("{at} the session's node gone once its last stream was dropped"),
        || async { matches!(writer.exists(&p("/o/e")).await, Ok(false)) },
    )
    .await;
    env.finish().await
}

/// Dropping a watch stream releases it on the server (where the fixture can count watches).
pub async fn watch_drop_releases(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "watch_drop_releases");
    let c = env.client().await;
    let at = env.at();
    let Some(before) = fx.active_watches(&env.namespace).await else {
        return Outcome::Skipped("fixture cannot count server-side watches".into());
    };
    let mut streams = Vec::new();
    for i in 0..5 {
        let mut s = c
            .watch(&p(&format!("/d/{i}")), WatchOptions::node())
            .await
            .unwrap_or_else(|e| panic!("{at} watch: {e}"));
        let _ = next_event(&mut s, "snapshot").await;
        streams.push(s);
    }
    crate::support::eventually(
        Duration::from_secs(10),
        &format!("{at} watches registered"),
        || async {
            fx.active_watches(&env.namespace)
                .await
                .is_some_and(|n| n >= before + 5)
        },
    )
    .await;
    drop(streams);
    crate::support::eventually(
        Duration::from_secs(10),
        &format!("{at} watches released after drop"),
        || async {
            fx.active_watches(&env.namespace)
                .await
                .is_some_and(|n| n <= before)
        },
    )
    .await;
    let mut state = WatchedState::new();
    let mut s = c
        .watch(&p("/d"), WatchOptions::children())
        .await
        .unwrap_or_else(|e| panic!("{at} watch after drop: {e}"));
    c.create(&p("/d/new"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create: {e}"));
    apply_until(
        &mut s,
        &mut state,
        Duration::from_secs(10),
        &format!("{at} client still watches"),
        |s| s.len() == 1,
    )
    .await;
    env.finish().await
}

#[cfg(test)]
mod tests {
    use registry_core::{Node, Revision, Snapshot};

    use super::*;

    fn node(version: u64, create_order: u64, modify_order: u64) -> Node {
        Node {
            path: p("/m/a"),
            value: Bytes::new(),
            version,
            create_order,
            modify_order,
            ephemeral_owner: None,
        }
    }

    #[test]
    fn the_model_check_catches_lost_repeated_and_reordered_events() {
        let mut state = WatchedState::new();
        let snapshot = WatchEvent::Snapshot(Snapshot {
            nodes: vec![node(0, 5, 5)],
            revision: Revision(9),
        });
        assert!(follows(&state, false, &snapshot, true).is_ok());
        state.apply(&snapshot);
        // The next write, after the snapshot: fine everywhere.
        assert!(follows(&state, true, &WatchEvent::Updated(node(1, 5, 10)), true).is_ok());
        // A lost write in between, a change the snapshot already holds, a second creation.
        assert!(follows(&state, true, &WatchEvent::Updated(node(2, 5, 11)), true).is_err());
        assert!(follows(&state, true, &WatchEvent::Updated(node(1, 5, 9)), true).is_err());
        assert!(follows(&state, true, &WatchEvent::Created(node(0, 10, 10)), false).is_err());
        state.apply(&WatchEvent::Deleted(node(0, 5, 12)));
        assert!(follows(&state, false, &WatchEvent::Deleted(node(0, 5, 13)), false).is_err());
        // Older than the delete already shown.
        assert!(follows(&state, false, &WatchEvent::Created(node(0, 11, 11)), true).is_err());
        assert!(follows(&state, false, &WatchEvent::Created(node(0, 12, 12)), true).is_ok());
    }
}
