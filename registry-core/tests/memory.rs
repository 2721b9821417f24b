//! Backend-specific tests of the in-memory store: its fault hooks and buffer policy, and the
//! Registration engine driven through them. The shared contract is tested by the
//! conformance suite (conformance-tests/tests/memory.rs).

use std::time::Duration;

use futures::StreamExt;
use registry_core::memory::{MemoryOptions, MemoryRegistry, MemoryStore, WATCH_BUFFER};
use registry_core::{
    Bytes, CreateMode, DeleteScope, Error, Expected, NodePath, RegisterOptions, RegistrationStatus,
    Registry, ResyncReason, Revision, SessionState, WatchEvent, WatchOptions,
};

const WAIT: Duration = Duration::from_secs(5);

fn p(s: &str) -> NodePath {
    NodePath::new(s).unwrap()
}

async fn client(store: &MemoryStore) -> MemoryRegistry {
    client_with_ttl(store, Duration::from_millis(500)).await
}

async fn client_with_ttl(store: &MemoryStore, ttl: Duration) -> MemoryRegistry {
    MemoryRegistry::connect(store, MemoryOptions::default().with_session_ttl(ttl))
        .await
        .unwrap()
}

async fn next_event(stream: &mut registry_core::WatchStream) -> WatchEvent {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("no watch event within 5 s")
        .expect("watch stream ended")
        .expect("watch stream error")
}

async fn wait_status(
    reg: &registry_core::Registration,
    pred: impl Fn(&RegistrationStatus) -> bool,
) -> RegistrationStatus {
    let mut rx = reg.watch_status();
    let reached = tokio::time::timeout(WAIT, rx.wait_for(|s| pred(s)))
        .await
        .expect("registration status not reached within 5 s")
        .expect("status channel closed")
        .clone();
    reached
}

#[tokio::test]
async fn lagging_consumer_gets_a_resync_not_unbounded_memory() {
    let store = MemoryStore::new();
    let c = client(&store).await;
    c.create(&p("/x"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    let mut watch = c.watch(&p("/x"), WatchOptions::node()).await.unwrap();
    assert!(matches!(
        next_event(&mut watch).await,
        WatchEvent::Snapshot(_)
    ));
    for i in 0..(WATCH_BUFFER + 10) {
        c.set(&p("/x"), Bytes::from(i.to_string()), Expected::Any)
            .await
            .unwrap();
    }
    let mut seen = 0;
    loop {
        match next_event(&mut watch).await {
            WatchEvent::Updated(_) => seen += 1,
            WatchEvent::Resync { snapshot, reason } => {
                assert_eq!(reason, ResyncReason::Lagged);
                assert_eq!(
                    snapshot.nodes[0].value,
                    Bytes::from((WATCH_BUFFER + 9).to_string())
                );
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            seen <= WATCH_BUFFER,
            "more than the buffer was delivered before the resync"
        );
    }
}

#[tokio::test]
async fn short_interruption_keeps_the_session_and_resyncs_watches() {
    let store = MemoryStore::new();
    let c = client(&store).await;
    let mut events = c.session_events();
    let session = c.session().session_id.unwrap();
    c.create(&p("/e"), Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap();
    let mut watch = c.watch(&p("/e"), WatchOptions::node()).await.unwrap();
    next_event(&mut watch).await;
    store
        .interrupt_connection(session, Duration::from_millis(100))
        .unwrap();
    assert!(matches!(
        c.get(&p("/e")).await,
        Err(Error::Unavailable { .. })
    ));
    let states: Vec<_> = tokio::time::timeout(WAIT, events.by_ref().take(3).collect::<Vec<_>>())
        .await
        .unwrap();
    let states: Vec<_> = states.iter().map(|s| s.state).collect();
    assert_eq!(
        states,
        [
            SessionState::Connected,
            SessionState::Suspended,
            SessionState::Connected
        ]
    );
    assert_eq!(c.session().session_id, Some(session));
    match next_event(&mut watch).await {
        WatchEvent::Resync { snapshot, reason } => {
            assert_eq!(reason, ResyncReason::Reconnected);
            assert_eq!(
                snapshot.nodes.len(),
                1,
                "ephemeral must survive a short cut"
            );
        }
        other => panic!("expected a resync, got {other:?}"),
    }
}

#[tokio::test]
async fn long_interruption_expires_the_session() {
    let store = MemoryStore::new();
    let c = client(&store).await;
    let other = client(&store).await;
    let session = c.session().session_id.unwrap();
    c.create(&p("/e"), Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap();
    let mut watch = other.watch(&p("/e"), WatchOptions::node()).await.unwrap();
    next_event(&mut watch).await;
    store
        .interrupt_connection(session, Duration::from_millis(700))
        .unwrap();
    assert!(matches!(
        next_event(&mut watch).await,
        WatchEvent::Deleted(_)
    ));
    let mut rx = c.session_events();
    let reestablished = tokio::time::timeout(WAIT, async {
        while let Some(s) = rx.next().await {
            if s.state == SessionState::Reestablished {
                return s;
            }
        }
        panic!("session stream ended")
    })
    .await
    .unwrap();
    assert_eq!(reestablished.epoch, 2);
    assert_ne!(reestablished.session_id, Some(session));
}

#[tokio::test]
async fn registration_heals_after_expiry_delete_and_stale_node() {
    let store = MemoryStore::new();
    let owner = client(&store).await;
    let other = client(&store).await;
    let path = p("/svc/1.2.3.4:80");
    let reg = owner
        .register(&path, Bytes::from("w=1"), RegisterOptions::new())
        .await
        .unwrap();

    store
        .expire_session(owner.session().session_id.unwrap())
        .unwrap();
    let deleted = match wait_status(&reg, |s| matches!(s, RegistrationStatus::Registered(n) if n.ephemeral_owner == owner.session().session_id)).await {
        RegistrationStatus::Registered(n) => n.create_order,
        other => panic!("{other:?}"),
    };

    other
        .delete(&path, Expected::Any, DeleteScope::Node)
        .await
        .unwrap();
    // The status still shows the deleted node until the delete is seen: wait for a newer one.
    wait_status(
        &reg,
        |s| matches!(s, RegistrationStatus::Registered(n) if n.create_order > deleted),
    )
    .await;
    let node = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(n) = other.get(&path).await {
                return n;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    assert_eq!(node.ephemeral_owner, owner.session().session_id);
    assert!(
        node.create_order > deleted,
        "the deleted node was not recreated"
    );

    reg.set_value(Bytes::from("w=2")).await.unwrap();
    store
        .expire_session(owner.session().session_id.unwrap())
        .unwrap();
    let healed = wait_status(&reg, |s| matches!(s, RegistrationStatus::Registered(n) if n.ephemeral_owner == owner.session().session_id)).await;
    match healed {
        RegistrationStatus::Registered(n) => assert_eq!(n.value, Bytes::from("w=2")),
        other => panic!("{other:?}"),
    }

    reg.deregister().await.unwrap();
    assert!(!other.exists(&path).await.unwrap());
}

#[tokio::test]
async fn registration_replaces_a_stale_node_of_another_session() {
    let store = MemoryStore::new();
    let stale = client(&store).await;
    let owner = client(&store).await;
    let path = p("/svc/10.0.0.1:9090");
    stale
        .create(&path, Bytes::from("old"), CreateMode::Ephemeral)
        .await
        .unwrap();
    let reg = owner
        .register(&path, Bytes::from("new"), RegisterOptions::new())
        .await
        .unwrap();
    let node = owner.get(&path).await.unwrap();
    assert_eq!(node.ephemeral_owner, owner.session().session_id);
    assert_eq!(node.value, Bytes::from("new"));
    drop(reg);
    let mut watch = stale.watch(&path, WatchOptions::node()).await.unwrap();
    loop {
        match next_event(&mut watch).await {
            WatchEvent::Snapshot(s) if s.nodes.is_empty() => break,
            WatchEvent::Deleted(_) => break,
            _ => {}
        }
    }
}

#[tokio::test]
async fn sequential_registration_gets_a_new_counter_on_recreation() {
    let store = MemoryStore::new();
    let owner = client(&store).await;
    let prefix = p("/soa/runtime/services/S/1.2.3.4:9090:1.0.0:");
    let reg = owner
        .register(&prefix, Bytes::new(), RegisterOptions::new().sequential())
        .await
        .unwrap();
    let first = reg.path().unwrap();
    assert_eq!(first.name(), "1.2.3.4:9090:1.0.0:0000000000");
    store
        .expire_session(owner.session().session_id.unwrap())
        .unwrap();
    let status = wait_status(
        &reg,
        |s| matches!(s, RegistrationStatus::Registered(n) if n.path != first),
    )
    .await;
    let RegistrationStatus::Registered(node) = status else {
        unreachable!()
    };
    assert_eq!(node.path.name(), "1.2.3.4:9090:1.0.0:0000000001");
    let children = owner.children(&p("/soa/runtime/services/S")).await.unwrap();
    assert_eq!(
        children.nodes.len(),
        1,
        "no orphan of the old session: {:?}",
        children.nodes
    );
}

/// Whether the store's watcher count reaches `count` within [`WAIT`].
async fn watchers_reach(store: &MemoryStore, count: usize) -> bool {
    tokio::time::timeout(WAIT, async {
        while store.watcher_count() != count {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn registrations_under_one_parent_share_one_watch_and_heal_alone() {
    let store = MemoryStore::new();
    let owner = client(&store).await;
    let other = client(&store).await;
    let watchers_before = store.watcher_count();
    let mut registrations = Vec::new();
    for i in 0..10 {
        let path = p(&format!("/svc/a/n{i}"));
        let registration = owner
            .register(&path, Bytes::from("1"), RegisterOptions::new())
            .await
            .unwrap();
        registrations.push(registration);
    }
    // Another parent gets a watch of its own, joined after the first was open.
    let late = owner
        .register(&p("/svc/b/n0"), Bytes::from("1"), RegisterOptions::new())
        .await
        .unwrap();
    assert!(
        watchers_reach(&store, watchers_before + 2).await,
        "11 registrations under 2 parents hold {} watchers, not 2",
        store.watcher_count() - watchers_before
    );

    // Deleting one node re-creates that one; its siblings keep their nodes.
    let before: Vec<_> = registrations
        .iter()
        .map(|r| match r.status() {
            RegistrationStatus::Registered(n) => n.create_order,
            other => panic!("not registered: {other:?}"),
        })
        .collect();
    let victim = p("/svc/a/n3");
    let gone = owner.get(&victim).await.unwrap();
    other
        .delete(&victim, Expected::Any, DeleteScope::Node)
        .await
        .unwrap();
    let healed = wait_status(
        &registrations[3],
        |s| matches!(s, RegistrationStatus::Registered(n) if n.create_order > gone.create_order),
    )
    .await;
    assert!(matches!(healed, RegistrationStatus::Registered(n) if n.path == victim));
    for (i, r) in registrations.iter().enumerate().filter(|(i, _)| *i != 3) {
        assert!(
            matches!(r.status(), RegistrationStatus::Registered(n) if n.create_order == before[i]),
            "n{i} was touched: {:?}",
            r.status()
        );
    }
    // The late joiner hears of its node too.
    let gone = owner.get(&p("/svc/b/n0")).await.unwrap();
    other
        .delete(&gone.path, Expected::Any, DeleteScope::Node)
        .await
        .unwrap();
    wait_status(
        &late,
        |s| matches!(s, RegistrationStatus::Registered(n) if n.create_order > gone.create_order),
    )
    .await;

    // The parents' watches go with their last registrations.
    for r in registrations {
        r.deregister().await.unwrap();
    }
    late.deregister().await.unwrap();
    assert!(
        watchers_reach(&store, watchers_before).await,
        "{} watchers left after every registration ended",
        store.watcher_count() - watchers_before
    );
}

/// The next session state from `events`, within [`WAIT`].
async fn next_state(
    events: &mut futures::stream::BoxStream<'static, registry_core::SessionStatus>,
) -> SessionState {
    tokio::time::timeout(WAIT, events.next())
        .await
        .expect("no session event within 5 s")
        .expect("session stream ended")
        .state
}

#[tokio::test]
async fn close_while_cut_off_is_unavailable_and_the_session_expires_at_its_ttl() {
    let store = MemoryStore::new();
    let ttl = Duration::from_millis(500);
    let owner = client(&store).await;
    let observer = client(&store).await;
    let node = p("/close/ephemeral");
    owner
        .create(&node, Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap();
    let session = owner.session().session_id.unwrap();
    let mut gone = observer.watch(&node, WatchOptions::node()).await.unwrap();
    next_event(&mut gone).await;
    let cut_at = tokio::time::Instant::now();
    store
        .interrupt_connection(session, Duration::from_millis(100))
        .unwrap();
    // As on a real server (see `close_while_unreachable`): the server could not be told.
    let closed = owner.close().await;
    assert!(
        matches!(closed, Err(Error::Unavailable { .. })),
        "close while cut off reported {closed:?}"
    );
    assert!(matches!(owner.get(&node).await, Err(Error::Closed)));
    assert!(owner.close().await.is_ok(), "a second close is not Ok");
    assert_eq!(owner.session().state, SessionState::Closed);
    assert!(
        observer.exists(&node).await.unwrap(),
        "the node went before its session's TTL ran out"
    );
    // The session outlives the end of the cut (nobody keeps it alive) until its TTL.
    assert!(matches!(
        next_event(&mut gone).await,
        WatchEvent::Deleted(_)
    ));
    let after = cut_at.elapsed();
    assert!(
        after >= ttl - Duration::from_millis(50),
        "the node went {after:?} after the cut, before the {ttl:?} TTL"
    );
    assert!(
        store.sessions().iter().all(|(id, _)| *id != session),
        "the closed client's session is still live: {:?}",
        store.sessions()
    );
}

#[tokio::test]
async fn a_cut_made_during_a_cut_extends_it() {
    let store = MemoryStore::new();
    let c = client_with_ttl(&store, Duration::from_secs(3)).await;
    let session = c.session().session_id.unwrap();
    let mut events = c.session_events();
    assert_eq!(next_state(&mut events).await, SessionState::Connected);
    let start = tokio::time::Instant::now();
    store
        .interrupt_connection(session, Duration::from_millis(300))
        .unwrap();
    assert_eq!(next_state(&mut events).await, SessionState::Suspended);
    // Timing of the fault itself, not a wait for an event.
    tokio::time::sleep(Duration::from_millis(100)).await;
    store
        .interrupt_connection(session, Duration::from_millis(500))
        .unwrap();
    // The first cut's end must not reconnect the client: the second holds it off to ~600 ms.
    assert_eq!(next_state(&mut events).await, SessionState::Connected);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(550),
        "reconnected after {took:?}, while the second cut lasts until 600 ms"
    );
    assert_eq!(c.session().session_id, Some(session), "session changed");
    assert!(c.exists(&p("/x")).await.is_ok());
}

#[tokio::test]
async fn overlapping_cuts_count_the_ttl_from_the_first() {
    let store = MemoryStore::new();
    let c = client(&store).await; // TTL 500 ms
    let other = client(&store).await;
    let node = p("/e");
    c.create(&node, Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap();
    let session = c.session().session_id.unwrap();
    let mut watch = other.watch(&node, WatchOptions::node()).await.unwrap();
    next_event(&mut watch).await;
    let mut events = c.session_events();
    assert_eq!(next_state(&mut events).await, SessionState::Connected);
    store
        .interrupt_connection(session, Duration::from_millis(300))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Together 200 + 400 ms without a connection: past the TTL, though neither cut is.
    store
        .interrupt_connection(session, Duration::from_millis(400))
        .unwrap();
    assert!(matches!(
        next_event(&mut watch).await,
        WatchEvent::Deleted(_)
    ));
    let mut seen = Vec::new();
    while !seen.contains(&SessionState::Reestablished) {
        seen.push(next_state(&mut events).await);
    }
    assert_eq!(
        seen,
        [
            SessionState::Suspended,
            SessionState::Lost,
            SessionState::Reestablished
        ]
    );
    assert_ne!(c.session().session_id, Some(session));
}

#[tokio::test]
async fn an_expiry_during_a_cut_is_learned_on_reconnection() {
    let store = MemoryStore::new();
    let c = client_with_ttl(&store, Duration::from_secs(3)).await;
    let session = c.session().session_id.unwrap();
    let mut events = c.session_events();
    assert_eq!(next_state(&mut events).await, SessionState::Connected);
    store
        .interrupt_connection(session, Duration::from_millis(200))
        .unwrap();
    assert_eq!(next_state(&mut events).await, SessionState::Suspended);
    store.expire_session(session).unwrap();
    // Still cut off: no new session can be live yet.
    assert_eq!(c.session().state, SessionState::Suspended);
    assert_eq!(next_state(&mut events).await, SessionState::Lost);
    assert_eq!(next_state(&mut events).await, SessionState::Reestablished);
    assert!(
        c.exists(&p("/x")).await.is_ok(),
        "reconnected client unusable"
    );
}

/// Two live registrations of one plain path (two processes configured with one address):
/// the newer keeps the path and the older waits for it to go, instead of each replacing the
/// other's node in turn forever.
#[tokio::test]
async fn two_live_registrations_of_one_path_take_turns_instead_of_fighting() {
    let store = MemoryStore::new();
    let (older, newer, observer) = (
        client(&store).await,
        client(&store).await,
        client(&store).await,
    );
    let path = p("/svc/10.0.0.1:9090");
    let first = older
        .register(&path, Bytes::from("older"), RegisterOptions::new())
        .await
        .unwrap();
    let second = newer
        .register(&path, Bytes::from("newer"), RegisterOptions::new())
        .await
        .unwrap();
    wait_status(&first, |s| {
        matches!(s, RegistrationStatus::Recreating { .. })
    })
    .await;
    let mut changes = observer.watch(&path, WatchOptions::node()).await.unwrap();
    let WatchEvent::Snapshot(snapshot) = next_event(&mut changes).await else {
        panic!("no snapshot first");
    };
    assert_eq!(snapshot.nodes[0].value, "newer");
    // Time is the property: the old code replaced the newer node within the first retry
    // (50 ms), and the two went on replacing each other.
    let quiet = tokio::time::timeout(Duration::from_secs(1), changes.next()).await;
    assert!(quiet.is_err(), "the path changed hands again: {quiet:?}");
    assert!(matches!(
        first.status(),
        RegistrationStatus::Recreating { .. }
    ));
    // Once the newer one goes, the older takes the path back.
    second.deregister().await.unwrap();
    let back = wait_status(&first, |s| matches!(s, RegistrationStatus::Registered(_))).await;
    let RegistrationStatus::Registered(node) = back else {
        unreachable!()
    };
    assert_eq!(node.value, "older");
    assert_eq!(observer.get(&path).await.unwrap().value, "older");
}

#[tokio::test]
async fn durations_past_the_clock_are_refused_or_never_expire() {
    let store = MemoryStore::new();
    let c = client(&store).await;
    let session = c.session().session_id.unwrap();
    assert!(matches!(
        store.interrupt_connection(session, Duration::MAX),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(c.session().state, SessionState::Connected);
    // A TTL too long to add to the clock: a cut never ends the session.
    let forever = MemoryRegistry::connect(
        &store,
        MemoryOptions::default().with_session_ttl(Duration::MAX),
    )
    .await
    .unwrap();
    let session = forever.session().session_id.unwrap();
    store
        .interrupt_connection(session, Duration::from_millis(50))
        .unwrap();
    let mut events = forever.session_events();
    let back = tokio::time::timeout(WAIT, async {
        while let Some(status) = events.next().await {
            if status.state == SessionState::Connected {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(back, Ok(true));
    assert_eq!(forever.session().session_id, Some(session));
}

/// A watch opened while `close` runs either fails with `Closed` or is ended by it: one used to
/// check for the close before taking the store's lock, register after `close` had ended every
/// stream, and stay open (its stream pending for good) after `close` returned.
#[test]
fn a_watch_racing_close_never_outlives_it() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for round in 0..20 {
        let store = MemoryStore::new();
        let (closing, writer) = runtime.block_on(async {
            let writer = client(&store).await;
            for i in 0..5_000 {
                writer
                    .create(
                        &p(&format!("/big/n{i}")),
                        Bytes::new(),
                        CreateMode::Persistent,
                    )
                    .await
                    .unwrap();
            }
            (client(&store).await, writer)
        });
        // The store's lock kept busy, so the watch and the close queue for it together.
        let stop = Arc::new(AtomicBool::new(false));
        let hammer = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    store.watcher_count();
                }
            })
        };
        let handle = runtime.handle().clone();
        let holder = std::thread::spawn(move || {
            handle
                .block_on(writer.delete(&p("/big"), Expected::Any, DeleteScope::Recursive))
                .unwrap()
        });
        std::thread::sleep(Duration::from_millis(2));
        let (watching, handle) = (closing.clone(), runtime.handle().clone());
        let watcher = std::thread::spawn(move || {
            handle.block_on(watching.watch(&p("/x"), WatchOptions::node()))
        });
        std::thread::sleep(Duration::from_millis(2));
        runtime.block_on(closing.close()).unwrap();
        let watched = watcher.join().unwrap();
        holder.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        hammer.join().unwrap();
        match watched {
            Err(error) => assert!(matches!(error, Error::Closed), "round {round}: {error}"),
            Ok(mut stream) => {
                assert_eq!(
                    store.watcher_count(),
                    0,
                    "round {round}: a watch outlived close"
                );
                runtime.block_on(async {
                    let ended = tokio::time::timeout(WAIT, async {
                        while let Some(item) = stream.next().await {
                            assert!(matches!(item, Ok(WatchEvent::Snapshot(_))), "{item:?}");
                        }
                    })
                    .await;
                    assert!(ended.is_ok(), "round {round}: the stream never ended");
                });
            }
        }
    }
}

/// A watch after a revision the store has not reached yet delivers only later changes (it
/// delivered every change from the next one on).
#[tokio::test]
async fn a_watch_after_a_future_revision_waits_for_it() {
    let store = MemoryStore::new();
    let reg = client(&store).await;
    let created = reg
        .create(&p("/a"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    let after = created.modify_order + 3;
    let mut stream = reg
        .watch(&p("/a"), WatchOptions::node().after(Revision(after)))
        .await
        .unwrap();
    for i in 0..5 {
        reg.set(&p("/a"), Bytes::from(format!("{i}")), Expected::Any)
            .await
            .unwrap();
    }
    for expected in [after + 1, after + 2] {
        match next_event(&mut stream).await {
            WatchEvent::Updated(n) => assert_eq!(n.modify_order, expected),
            other => panic!("expected the write of revision {expected}, got {other:?}"),
        }
    }
}

/// The history a watch may start from holds at most `HISTORY_BYTES` of values, the oldest
/// changes going first (it held 100 000 changes whatever their size).
#[tokio::test]
async fn the_history_is_bounded_in_bytes() {
    let store = MemoryStore::new();
    let reg = client(&store).await;
    let first = reg
        .create(&p("/big"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    // One buffer, shared by every change: the test itself stays small.
    let value = Bytes::from(vec![7u8; 512 * 1024]);
    let writes = registry_core::memory::HISTORY_BYTES / value.len() + 8;
    for _ in 0..writes {
        reg.set(&p("/big"), value.clone(), Expected::Any)
            .await
            .unwrap();
    }
    let mut stream = reg
        .watch(
            &p("/big"),
            WatchOptions::node().after(Revision(first.modify_order)),
        )
        .await
        .unwrap();
    match next_event(&mut stream).await {
        WatchEvent::Resync { reason, .. } => assert_eq!(reason, ResyncReason::StartNotReplayable),
        other => panic!("replayed {writes} changes of 512 KiB: {other:?}"),
    }
}

/// A node made again at a path starts its children's sequence over, as ZooKeeper's does
/// (the counter outlived the node, and the map of counters grew for good).
#[tokio::test]
async fn a_parent_made_again_starts_its_sequence_over() {
    let store = MemoryStore::new();
    let reg = client(&store).await;
    for _ in 0..2 {
        let made = reg
            .create(&p("/q/n-"), Bytes::new(), CreateMode::PersistentSequential)
            .await
            .unwrap();
        assert_eq!(made.path, p("/q/n-0000000000"));
        reg.delete(&p("/q"), Expected::Any, DeleteScope::Recursive)
            .await
            .unwrap();
    }
}
