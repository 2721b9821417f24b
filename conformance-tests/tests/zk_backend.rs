//! ZooKeeper-specific behaviour beyond the shared suite, each against its own real server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use conformance_tests::harness::{wait_until, TcpProxy, ZkConfig, ZkServer};
use conformance_tests::support::{
    apply_until, close_while_unreachable, next_event, read_scope, session_reaches, summary,
};
use futures::StreamExt;
use registry_core::{
    Bytes, CreateMode, DeleteScope, Expected, NodePath, RegisterOptions, RegistrationStatus,
    Registry, SessionState, WatchEvent, WatchOptions, WatchScope, WatchedState,
};
use registry_zk::{ZkOptions, ZkRegistry};

fn p(s: &str) -> NodePath {
    NodePath::new(s).unwrap()
}

fn fast_server() -> ZkServer {
    ZkServer::start(ZkConfig {
        tick_time: Duration::from_millis(200),
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

async fn connect(connect_string: &str, timeout: Duration) -> Arc<ZkRegistry> {
    let options = ZkOptions::new([connect_string.to_owned()]).with_session_ttl(timeout);
    Arc::new(
        ZkRegistry::connect(options)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}")),
    )
}

async fn raw(connect_string: &str) -> zookeeper_client::Client {
    zookeeper_client::Client::connector()
        .with_session_timeout(Duration::from_secs(4))
        .connect(connect_string)
        .await
        .unwrap()
}

/// A raw client's persistent node, open to all.
fn raw_persistent() -> zookeeper_client::CreateOptions<'static> {
    zookeeper_client::CreateMode::Persistent.with_acls(zookeeper_client::Acls::anyone_all())
}

/// What `wchs` reports as the server's total watches.
fn total_watches(server: &ZkServer) -> usize {
    server
        .four_letter("wchs")
        .and_then(|a| {
            a.lines().find_map(|l| {
                l.strip_prefix("Total watches:")
                    .map(|n| n.trim().parse().ok())
            })
        })
        .flatten()
        .unwrap_or(usize::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dapeng_style_nodes_from_another_client_are_first_class() {
    let server = fast_server();
    let reg = connect(&server.connect_string(), Duration::from_secs(4)).await;
    let svc = p("/soa/runtime/services/S");
    reg.create(&svc, Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    let mut watch = reg.watch(&svc, WatchOptions::children()).await.unwrap();
    let mut state = WatchedState::new();
    state.apply(&next_event(&mut watch, "snapshot").await);

    // What Dapeng's Java provider does: an ephemeral-sequential `ip:port:version:`.
    let java = raw(&server.connect_string()).await;
    let options = zookeeper_client::CreateMode::EphemeralSequential
        .with_acls(zookeeper_client::Acls::anyone_all());
    let (_, sequence) = java
        .create("/soa/runtime/services/S/1.2.3.4:9090:1.0.0:", b"", &options)
        .await
        .unwrap();
    let name = format!("1.2.3.4:9090:1.0.0:{sequence}");
    apply_until(
        &mut watch,
        &mut state,
        Duration::from_secs(10),
        "foreign instance in the watch",
        |s| s.len() == 1,
    )
    .await;
    let children = reg.children(&svc).await.unwrap();
    assert_eq!(children.nodes.len(), 1);
    assert_eq!(children.nodes[0].path.name(), name);
    assert_eq!(
        children.nodes[0].ephemeral_owner.map(|s| s.0),
        Some(java.session_id().0)
    );
    drop(java);
    apply_until(
        &mut watch,
        &mut state,
        Duration::from_secs(10),
        "foreign instance gone with its session",
        |s| s.is_empty(),
    )
    .await;
    reg.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_expiry_ends_in_lost_then_reestablished_with_everything_back() {
    let mut server = fast_server();
    let cs = server.connect_string();
    let timeout = Duration::from_secs(2);
    let owner = connect(&cs, timeout).await;
    let watcher_client = connect(&cs, Duration::from_secs(4)).await;
    let mut events = owner.session_events();
    let path = p("/svc/10.0.0.9:9090");
    let reg = owner
        .register(&path, Bytes::from("w"), RegisterOptions::new())
        .await
        .unwrap();
    let mut watch = owner
        .watch(&p("/svc"), WatchOptions::children())
        .await
        .unwrap();
    let mut state = WatchedState::new();
    state.apply(&next_event(&mut watch, "snapshot").await);
    let first_session = owner.session().session_id;

    // A stall longer than the session timeout: the server expires the session on resume.
    server.pause().unwrap();
    tokio::time::sleep(timeout * 3).await;
    server.resume().unwrap();

    let mut seen = Vec::new();
    let status = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(s) = events.next().await {
            seen.push(s.state);
            if s.state == SessionState::Reestablished {
                return s;
            }
        }
        panic!("session stream ended: {seen:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no Reestablished; states seen: {seen:?}"));
    assert!(
        seen.contains(&SessionState::Lost),
        "Reestablished without Lost: {seen:?}"
    );
    assert_eq!(status.epoch, 2);
    assert_ne!(status.session_id, first_session);
    let node = reg.wait_registered(Duration::from_secs(15)).await.unwrap();
    assert_eq!(node.ephemeral_owner, owner.session().session_id);
    let expected = summary(
        read_scope(
            &(watcher_client.clone() as Arc<dyn Registry>),
            &p("/svc"),
            WatchScope::Children,
        )
        .await
        .unwrap()
        .iter(),
    );
    apply_until(
        &mut watch,
        &mut state,
        Duration::from_secs(15),
        "watch converged after expiry",
        |s| summary(s.nodes()) == expected,
    )
    .await;
    reg.deregister().await.unwrap();
    owner.close().await.unwrap();
    watcher_client.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_connection_drop_is_not_a_loss() {
    let server = fast_server();
    let proxy = TcpProxy::start(server.addr()).unwrap();
    let owner = connect(&proxy.addr().to_string(), Duration::from_secs(4)).await;
    let mut events = owner.session_events();
    let reg = owner
        .register(&p("/svc/10.0.0.7:1"), Bytes::new(), RegisterOptions::new())
        .await
        .unwrap();
    let before = reg.wait_registered(Duration::from_secs(5)).await.unwrap();
    let session = owner.session().session_id;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(600)).await;
    proxy.forward();
    let mut seen = Vec::new();
    let back = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(s) = events.next().await {
            seen.push(s.state);
            if s.state == SessionState::Connected && seen.contains(&SessionState::Suspended) {
                return;
            }
        }
    })
    .await;
    assert!(back.is_ok(), "no Suspended then Connected: {seen:?}");
    assert!(
        !seen.contains(&SessionState::Lost),
        "a short drop was reported as a loss: {seen:?}"
    );
    assert_eq!(owner.session().session_id, session);
    let after = reg.wait_registered(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        after.create_order, before.create_order,
        "the registration was re-created after a blip"
    );
    owner.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_a_thousand_changes_converges() {
    let server = fast_server();
    let cs = server.connect_string();
    let writer = connect(&cs, Duration::from_secs(4)).await;
    let watcher = connect(&cs, Duration::from_secs(4)).await;
    let root = p("/burst");
    writer
        .create(&root, Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    let mut stream = watcher
        .watch(&root, WatchOptions::children())
        .await
        .unwrap();
    let mut state = WatchedState::new();
    state.apply(&next_event(&mut stream, "snapshot").await);
    let started = Instant::now();
    let mut writes = futures::stream::iter(0..1000)
        .map(|i| {
            let writer = writer.clone();
            let root = root.clone();
            async move {
                let path = root.join(&format!("n{}", i % 100)).unwrap();
                if i < 100 {
                    writer
                        .create(&path, Bytes::from(i.to_string()), CreateMode::Persistent)
                        .await
                        .map(|_| ())
                } else {
                    writer
                        .set(&path, Bytes::from(i.to_string()), Expected::Any)
                        .await
                        .map(|_| ())
                }
            }
        })
        .buffered(16);
    while let Some(r) = writes.next().await {
        r.unwrap();
    }
    let expected = summary(
        read_scope(
            &(writer.clone() as Arc<dyn Registry>),
            &root,
            WatchScope::Children,
        )
        .await
        .unwrap()
        .iter(),
    );
    apply_until(
        &mut stream,
        &mut state,
        Duration::from_secs(30),
        "burst converged",
        |s| summary(s.nodes()) == expected,
    )
    .await;
    eprintln!("1000 changes converged in {:?}", started.elapsed());
    writer.close().await.unwrap();
    watcher.close().await.unwrap();
}

/// One change seen by a watch can stand for more nodes than a stream buffers: a consumer
/// that keeps reading gets each of them as a change, not a `Resync` (`Lagged`) and a full
/// read again of everything in scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_larger_than_the_buffer_is_delivered_to_a_reading_consumer() {
    let server = fast_server();
    let cs = server.connect_string();
    let watcher = connect(&cs, Duration::from_secs(4)).await;
    let writer = raw(&cs).await;
    let persistent = raw_persistent();
    writer.create("/big", b"", &persistent).await.unwrap();
    let mut stream = watcher
        .watch(&p("/big"), WatchOptions::children())
        .await
        .unwrap();
    next_event(&mut stream, "snapshot").await;
    // All at once (one multi), so one firing of the child watch finds every one of them.
    let n = registry_zk::watch::WATCH_BUFFER + 904;
    let mut multi = writer.new_multi_writer();
    for i in 0..n {
        multi
            .add_create(&format!("/big/n{i}"), b"", &persistent)
            .unwrap();
    }
    multi.commit().await.unwrap();
    let mut created = std::collections::BTreeSet::new();
    while created.len() < n {
        match next_event(&mut stream, "the children created").await {
            WatchEvent::Created(node) => {
                created.insert(node.path);
            }
            other => panic!("after {} of {n} children: {other:?}", created.len()),
        }
    }
    watcher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_ephemeral_of_another_session_is_replaced() {
    let server = fast_server();
    let cs = server.connect_string();
    let stale = raw(&cs).await;
    let options =
        zookeeper_client::CreateMode::Ephemeral.with_acls(zookeeper_client::Acls::anyone_all());
    stale.create("/svc", b"", &raw_persistent()).await.unwrap();
    stale
        .create("/svc/10.0.0.8:9090", b"old", &options)
        .await
        .unwrap();
    let owner = connect(&cs, Duration::from_secs(4)).await;
    let reg = owner
        .register(
            &p("/svc/10.0.0.8:9090"),
            Bytes::from("new"),
            RegisterOptions::new(),
        )
        .await
        .unwrap();
    let node = owner.get(&p("/svc/10.0.0.8:9090")).await.unwrap();
    assert_eq!(node.ephemeral_owner, owner.session().session_id);
    assert_ne!(
        node.ephemeral_owner.map(|s| s.0),
        Some(stale.session_id().0)
    );
    assert_eq!(node.value, "new");
    assert!(matches!(reg.status(), RegistrationStatus::Registered(_)));
    owner.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_stops_rearming_its_watches() {
    let server = fast_server();
    let reg = connect(&server.connect_string(), Duration::from_secs(4)).await;
    for i in 0..5 {
        reg.create(
            &p(&format!("/w/n{i}")),
            Bytes::new(),
            CreateMode::Persistent,
        )
        .await
        .unwrap();
    }
    let before = total_watches(&server);
    let mut stream = reg.watch(&p("/w"), WatchOptions::subtree()).await.unwrap();
    next_event(&mut stream, "snapshot").await;
    assert!(
        wait_until(Duration::from_secs(5), || total_watches(&server)
            >= before + 6),
        "watches not armed: {}",
        total_watches(&server)
    );
    drop(stream);
    // A change fires the armed watches once; nothing re-arms them afterwards.
    reg.set(&p("/w/n0"), Bytes::from("x"), Expected::Any)
        .await
        .unwrap();
    reg.create(&p("/w/n9"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    for i in 0..5 {
        reg.set(&p(&format!("/w/n{i}")), Bytes::from("y"), Expected::Any)
            .await
            .unwrap();
    }
    reg.delete(
        &p("/w"),
        Expected::Any,
        registry_core::DeleteScope::Recursive,
    )
    .await
    .unwrap();
    let released = wait_until(Duration::from_secs(10), || total_watches(&server) <= before);
    assert!(
        released,
        "server still holds {} watches (had {before})",
        total_watches(&server)
    );
    // The first dip is not enough: a late re-arm would push the count back up.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = total_watches(&server);
        assert!(
            now <= before,
            "watches re-armed after release: {now} (had {before})"
        );
    }
    reg.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_single_leader_under_server_pause() {
    let mut server = fast_server();
    let cs = server.connect_string();
    let mut candidates: Vec<Arc<dyn Registry>> = Vec::new();
    for _ in 0..3 {
        candidates.push(connect(&cs, Duration::from_secs(2)).await);
    }
    let outage = async {
        server.pause().unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        server.resume().unwrap();
    };
    let took = conformance_tests::support::election_survives_outage(
        candidates,
        outage,
        Duration::from_secs(15),
    )
    .await;
    eprintln!("new leader {took:?} after the server resumed");
}

/// Once the server has applied `what` (polled with `applied`, bounded), drops the client's
/// connection (its reply is lost with it) and lets it reconnect after it noticed.
async fn drop_connection_once<F, Fut>(
    proxy: &TcpProxy,
    events: &mut futures::stream::BoxStream<'static, registry_core::SessionStatus>,
    what: &str,
    mut applied: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut done = false;
    for _ in 0..200 {
        if applied().await {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(done, "the server never applied {what}");
    proxy.cut();
    let suspended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(s) = events.next().await {
            if s.state == SessionState::Suspended {
                return;
            }
        }
    })
    .await;
    assert!(suspended.is_ok(), "the client never noticed the cut");
    proxy.forward();
}

/// A write the server applied but whose reply was lost (the connection dropped first): the
/// client cannot know it was applied. A versioned set is not sent again, since its second
/// attempt would fail against its own first one and report a conflict; an unconditional
/// delete is sent again and, finding no node, succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_reply_was_lost_is_not_reported_as_a_conflict() {
    let server = fast_server();
    let proxy = TcpProxy::start(server.addr()).unwrap();
    let ours = connect(&proxy.addr().to_string(), Duration::from_secs(4)).await;
    let observer = raw(&server.connect_string()).await;
    let node = p("/lost-reply/node");
    ours.create(&node, Bytes::from_static(b"v0"), CreateMode::Persistent)
        .await
        .unwrap();

    let mut events = ours.session_events();
    proxy.drop_replies();
    let set = tokio::spawn({
        let (ours, node) = (ours.clone(), node.clone());
        async move {
            ours.set(&node, Bytes::from_static(b"v1"), Expected::Version(0))
                .await
        }
    });
    drop_connection_once(&proxy, &mut events, "the set", || async {
        observer.get_data(node.as_str()).await.unwrap().1.version == 1
    })
    .await;
    let result = tokio::time::timeout(Duration::from_secs(10), set)
        .await
        .expect("the set never returned")
        .unwrap();
    match result {
        Err(registry_core::Error::Unavailable { .. }) => {}
        other => panic!("a set whose outcome is unknown must report Unavailable, got {other:?}"),
    }
    let now = ours.get(&node).await.unwrap();
    assert_eq!((now.version, &now.value[..]), (1, &b"v1"[..]));

    proxy.drop_replies();
    let delete = tokio::spawn({
        let (ours, node) = (ours.clone(), node.clone());
        async move {
            ours.delete(&node, Expected::Any, registry_core::DeleteScope::Node)
                .await
        }
    });
    drop_connection_once(&proxy, &mut events, "the delete", || async {
        observer.check_stat(node.as_str()).await.unwrap().is_none()
    })
    .await;
    let result = tokio::time::timeout(Duration::from_secs(10), delete)
        .await
        .expect("the delete never returned")
        .unwrap();
    assert!(
        result.is_ok(),
        "an unconditional delete resent after its first attempt removed the node: {result:?}"
    );
    ours.close().await.unwrap();
}

/// A versioned recursive delete and a write of the node made the moment the first child
/// goes: either the whole tree goes (the write then finds no node) or, on a version mismatch,
/// nothing does. Deleting child by child, then the node at its version, fails this.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_versioned_recursive_delete_is_all_or_nothing() {
    let server = fast_server();
    let ours = connect(&server.connect_string(), Duration::from_secs(4)).await;
    let writer = connect(&server.connect_string(), Duration::from_secs(4)).await;
    let root = p("/atomic/tree");
    for round in 0..3 {
        let node = ours
            .create(&root, Bytes::new(), CreateMode::Persistent)
            .await
            .unwrap();
        for i in 0..5 {
            ours.create(
                &root.join(&format!("c{i}")).unwrap(),
                Bytes::new(),
                CreateMode::Persistent,
            )
            .await
            .unwrap();
        }
        let mut children = writer.watch(&root, WatchOptions::children()).await.unwrap();
        let first = next_event(&mut children, "the tree's snapshot").await;
        assert!(
            matches!(first, registry_core::WatchEvent::Snapshot(_)),
            "{first:?}"
        );
        let write = tokio::spawn({
            let (writer, root) = (writer.clone(), root.clone());
            async move {
                // Bounded: the tree has five children.
                for _ in 0..10 {
                    let event = next_event(&mut children, "a child deleted").await;
                    if matches!(event, registry_core::WatchEvent::Deleted(_)) {
                        break;
                    }
                }
                writer
                    .set(&root, Bytes::from(format!("{round}")), Expected::Any)
                    .await
            }
        });
        let outcome = ours
            .delete(
                &root,
                Expected::Version(node.version),
                registry_core::DeleteScope::Recursive,
            )
            .await;
        let written = tokio::time::timeout(Duration::from_secs(10), write)
            .await
            .expect("the writer never saw a child go")
            .unwrap();
        match outcome {
            Ok(()) => assert!(
                written.is_err(),
                "round {round}: the node was written after its children went, yet deleted"
            ),
            Err(registry_core::Error::VersionMismatch { .. }) => {
                let left = ours.children(&root).await.unwrap().nodes.len();
                assert_eq!(
                    left,
                    5,
                    "round {round}: a failed delete removed {} children",
                    5 - left
                );
                ours.delete(&root, Expected::Any, registry_core::DeleteScope::Recursive)
                    .await
                    .unwrap();
            }
            Err(e) => panic!("round {round}: {e}"),
        }
    }
    ours.close().await.unwrap();
    writer.close().await.unwrap();
}

/// A close that cannot reach the server still releases the client, and says the session's
/// ephemeral nodes were not deleted (they go when the session expires).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_that_cannot_end_the_session_says_so() {
    let server = fast_server();
    let proxy = TcpProxy::start(server.addr()).unwrap();
    let options = ZkOptions::new([proxy.addr().to_string()])
        .with_session_ttl(Duration::from_secs(2))
        .with_request_timeout(Duration::from_millis(500));
    let owner = ZkRegistry::connect(options).await.unwrap();
    let observer = connect(&server.connect_string(), Duration::from_secs(4)).await;
    // The server expires the silent session within its timeout (2 s), with margin.
    close_while_unreachable(&owner, &proxy, &*observer, Duration::from_secs(8)).await;
    observer.close().await.unwrap();
}

/// A close answered only after the client pinged again (the server was slow to close it, as
/// with a session of thousands of watched ephemerals; here the server is paused): the server
/// ends the connection with the ping unanswered, the client reconnects, hears "session
/// expired" and reports `Expired`, not `Closed`. `close` asks the server and returns `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_answered_after_a_ping_is_confirmed() {
    let mut server = ZkServer::start(ZkConfig {
        tick_time: Duration::from_millis(500),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let owner = connect(&server.connect_string(), Duration::from_secs(10)).await;
    let observer = connect(&server.connect_string(), Duration::from_secs(10)).await;
    let node = p("/owned");
    owner
        .create(&node, Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap();
    // A reply just now: the client gives up on a connection only after 4 s of silence.
    assert!(owner.exists(&p("/")).await.unwrap());
    server.pause().unwrap();
    let closing = tokio::spawn(async move { owner.close().await });
    // Time is the property: the client pings 1.5 s after the close request (3 ticks of 1/20
    // of its 10 s session); the server resumes after that and well before the 4 s.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    server.resume().unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(30), closing).await;
    assert!(matches!(closed, Ok(Ok(Ok(())))), "{closed:?}");
    assert!(!observer.exists(&node).await.unwrap(), "ephemeral left");
    observer.close().await.unwrap();
}

/// A subtree watcher that lists a node just deleted (gone) and then reads it just re-created
/// (back) must list the new incarnation again: otherwise it holds no child watch on it and
/// never sees its children. Each round races a delete and a re-create (each one transaction,
/// a varying few hundred microseconds apart) against the watcher's list and read, then checks
/// that the new children, and one added afterwards, are seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subtree_watch_follows_a_node_recreated_between_its_list_and_read() {
    let server = fast_server();
    let watcher = connect(&server.connect_string(), Duration::from_secs(4)).await;
    let writer = raw(&server.connect_string()).await;
    let root = p("/race");
    let parent = p("/race/p");
    watcher
        .create(&parent, Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    let mut stream = watcher.watch(&root, WatchOptions::subtree()).await.unwrap();
    let mut state = WatchedState::new();
    state.apply(&next_event(&mut stream, "snapshot").await);
    let open = raw_persistent();
    let mut children: Vec<String> = Vec::new();
    for round in 0..24u32 {
        let mut gone = writer.new_multi_writer();
        for child in children.drain(..) {
            gone.add_delete(&child, None).unwrap();
        }
        gone.add_delete(parent.as_str(), None).unwrap();
        gone.commit().await.unwrap();
        // Not a wait for anything: it moves the re-create across the watcher's reads.
        let gap = Duration::from_micros(u64::from(round % 8) * 100);
        let started = Instant::now();
        while started.elapsed() < gap {
            std::hint::spin_loop();
        }
        let child = format!("/race/p/c{round}");
        let mut back = writer.new_multi_writer();
        back.add_create(parent.as_str(), b"", &open).unwrap();
        back.add_create(&child, b"", &open).unwrap();
        back.commit().await.unwrap();
        children.push(child.clone());
        let czxid = writer
            .check_stat(parent.as_str())
            .await
            .unwrap()
            .map_or(0, |stat| u64::try_from(stat.czxid).unwrap_or(0));
        let (parent_path, child_path) = (parent.clone(), p(&child));
        apply_until(
            &mut stream,
            &mut state,
            Duration::from_secs(5),
            &format!("round {round}: the re-created node and its child"),
            |s| {
                s.get(&parent_path).is_some_and(|n| n.create_order == czxid)
                    && s.get(&child_path).is_some()
            },
        )
        .await;
        // The watcher is quiet now: only the new incarnation's child watch reports this.
        let late = format!("/race/p/late{round}");
        writer.create(&late, b"", &open).await.unwrap();
        children.push(late.clone());
        let late = p(&late);
        apply_until(
            &mut stream,
            &mut state,
            Duration::from_secs(5),
            &format!("round {round}: a child added to the re-created node"),
            |s| s.get(&late).is_some(),
        )
        .await;
    }
    watcher.close().await.unwrap();
}

/// A consumer that stopped reading (its stream lagged and the task waits for room) must not
/// keep the session open: close ends it at once instead of waiting out the request timeout
/// for a client the stalled watch task still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_is_prompt_while_a_watch_consumer_lags() {
    let server = fast_server();
    let options = ZkOptions::new([server.connect_string()])
        .with_session_ttl(Duration::from_secs(4))
        .with_request_timeout(Duration::from_secs(10));
    let watcher = ZkRegistry::connect(options).await.unwrap();
    let writer = connect(&server.connect_string(), Duration::from_secs(4)).await;
    let root = p("/lag");
    writer
        .create(&root, Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    let before = total_watches(&server);
    let mut stream = watcher
        .watch(&root, WatchOptions::children())
        .await
        .unwrap();
    next_event(&mut stream, "snapshot").await;
    // More changes than a stream buffers (4096), never read.
    let n = 4200;
    let mut writes = futures::stream::iter(0..n)
        .map(|i| {
            let (writer, path) = (writer.clone(), root.join(&format!("n{i}")).unwrap());
            async move {
                writer
                    .create(&path, Bytes::new(), CreateMode::Persistent)
                    .await
            }
        })
        .buffer_unordered(64);
    while let Some(written) = writes.next().await {
        written.unwrap();
    }
    // The root's child watch and more data watches than the stream buffers: the watcher
    // read a child for every buffered item and one more, so it waits for room. (It reads a
    // round of children before sending their items, so it may stop short of all n.)
    let lagging = before + 1 + registry_zk::watch::WATCH_BUFFER + 1;
    assert!(
        wait_until(Duration::from_secs(30), || total_watches(&server)
            >= lagging),
        "the watcher never read every child: {} watches",
        total_watches(&server)
    );
    let started = Instant::now();
    watcher.close().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "close took {:?} with a lagging watch",
        started.elapsed()
    );
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while stream.next().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the lagging stream did not end after close");
    writer.close().await.unwrap();
}

/// A sequential create whose path is valid only without the 10 digits the server appends is
/// an input error: nothing is sent, so neither the node nor its missing parent is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_name_too_long_with_its_counter_creates_nothing() {
    let server = fast_server();
    let reg = connect(&server.connect_string(), Duration::from_secs(4)).await;
    let observer = raw(&server.connect_string()).await;
    let parent = "/seqlong";
    // 1020 bytes: valid as given, 1030 with the counter.
    let path = p(&format!("{parent}/{}", "x".repeat(1020 - parent.len() - 1)));
    for mode in [
        CreateMode::PersistentSequential,
        CreateMode::EphemeralSequential,
    ] {
        let created = reg.create(&path, Bytes::new(), mode).await;
        assert!(
            matches!(created, Err(registry_core::Error::InvalidPath { .. })),
            "{mode:?}: expected InvalidPath, got {created:?}"
        );
        let left = observer.check_stat(parent).await.unwrap();
        assert!(left.is_none(), "{mode:?}: {parent} was created: {left:?}");
    }
    reg.close().await.unwrap();
}

/// ZooKeeper's version is a 32-bit counter: an expected version beyond `i32::MAX` is still a
/// version (the counter goes there after 2^31 writes); `u32::MAX` would be sent as -1, which
/// the server reads as "any version", and one beyond it is one no znode holds. All are
/// mismatches (or `NotFound` without a node), never input errors, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_beyond_i32_are_mismatches_not_input_errors() {
    use registry_core::{DeleteScope, Error};
    let server = fast_server();
    let reg = connect(&server.connect_string(), Duration::from_secs(4)).await;
    let node = p("/versions/n");
    reg.create(&node, Bytes::from("v0"), CreateMode::Persistent)
        .await
        .unwrap();
    for expected in [
        1u64 << 31,
        u64::from(u32::MAX),
        u64::from(u32::MAX) + 1,
        u64::MAX,
    ] {
        let set = reg
            .set(&node, Bytes::from("x"), Expected::Version(expected))
            .await;
        assert!(
            matches!(set, Err(Error::VersionMismatch { expected: e, actual: 0, .. }) if e == expected),
            "set at {expected}: {set:?}"
        );
        for scope in [DeleteScope::Node, DeleteScope::Recursive] {
            let deleted = reg.delete(&node, Expected::Version(expected), scope).await;
            assert!(
                matches!(deleted, Err(Error::VersionMismatch { expected: e, actual: 0, .. }) if e == expected),
                "delete {scope:?} at {expected}: {deleted:?}"
            );
        }
        let missing = reg
            .set(
                &p("/versions/none"),
                Bytes::new(),
                Expected::Version(expected),
            )
            .await;
        assert!(
            matches!(missing, Err(Error::NotFound { .. })),
            "set of a missing node at {expected}: {missing:?}"
        );
    }
    assert_eq!(reg.get(&node).await.unwrap().value, Bytes::from("v0"));
    reg.close().await.unwrap();
}

/// Forwards ZooKeeper traffic frame by frame; once armed, sends the client a reply to a
/// request it never made just before the next reply to one of its requests. The client then
/// resets the connection (a protocol error) and fails the requests in flight.
/// One length-prefixed ZooKeeper frame from `from`: its length bytes and body. `None` when
/// the connection ends, or on a length no frame has (the answer to the client's `srvr`
/// question, read as a length).
async fn read_frame(from: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<([u8; 4], Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    from.read_exact(&mut len).await.ok()?;
    let size = u32::from_be_bytes(len) as usize;
    if size > 16 << 20 {
        return None;
    }
    let mut body = vec![0u8; size];
    from.read_exact(&mut body).await.ok()?;
    Some((len, body))
}

struct BogusReplyProxy {
    addr: std::net::SocketAddr,
    armed: Arc<std::sync::atomic::AtomicBool>,
}

impl BogusReplyProxy {
    async fn start(upstream: std::net::SocketAddr) -> BogusReplyProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        let flag = armed.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
                });
                let flag = flag.clone();
                tokio::spawn(async move {
                    // The first frame answers the connect request and carries no xid.
                    let mut first = true;
                    // Bounded by the connection: it ends when either side closes.
                    while let Some((len, body)) = read_frame(&mut server_rx).await {
                        let xid = body
                            .get(..4)
                            .map_or(0, |x| i32::from_be_bytes([x[0], x[1], x[2], x[3]]));
                        // Positive xids answer requests; negative ones are pings, events.
                        if !first && xid > 0 && flag.swap(false, Ordering::SeqCst) {
                            let mut bogus = 16u32.to_be_bytes().to_vec();
                            bogus.extend_from_slice(&0x7fff_0000i32.to_be_bytes()); // xid
                            bogus.extend_from_slice(&0i64.to_be_bytes()); // zxid
                            bogus.extend_from_slice(&0i32.to_be_bytes()); // error code
                            if client_tx.write_all(&bogus).await.is_err() {
                                return;
                            }
                        }
                        first = false;
                        if client_tx.write_all(&len).await.is_err()
                            || client_tx.write_all(&body).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        BogusReplyProxy { addr, armed }
    }
}

/// A request failed by the client's reset after a protocol error (its "unexpected error")
/// is retryable: the session survives, and the read is sent again and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_failed_by_a_protocol_reset_is_sent_again() {
    let server = fast_server();
    let proxy = BogusReplyProxy::start(server.addr()).await;
    let reg = connect(&proxy.addr.to_string(), Duration::from_secs(4)).await;
    let node = p("/reset/n");
    reg.create(&node, Bytes::from("v"), CreateMode::Persistent)
        .await
        .unwrap();
    let session = reg.session().session_id;
    proxy.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let read = reg.get(&node).await;
    assert!(
        !proxy.armed.load(std::sync::atomic::Ordering::SeqCst),
        "no bogus reply was sent"
    );
    let value = read.as_ref().ok().map(|n| n.value.clone());
    assert_eq!(value, Some(Bytes::from("v")), "{read:?}");
    assert_eq!(
        reg.session().session_id,
        session,
        "the session was replaced"
    );
    reg.close().await.unwrap();
}

/// Nodes another client created deeper (over 64 levels) or with longer paths (over 1024
/// bytes) than a `NodePath` allows: listings leave them out (with a warning), and a
/// recursive delete removes them with the rest, versioned (one transaction) or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recursive_delete_removes_nodes_too_deep_or_long_for_a_node_path() {
    use registry_core::{DeleteScope, MAX_DEPTH, MAX_PATH_LEN};
    let server = fast_server();
    let reg = connect(&server.connect_string(), Duration::from_secs(4)).await;
    let other = raw(&server.connect_string()).await;
    let open = raw_persistent();
    for (root, expected) in [("/deep", Expected::Any), ("/deep2", Expected::Version(0))] {
        let mut path = root.to_owned();
        other.create(&path, b"", &open).await.unwrap();
        // One level past the limit.
        for _ in 0..MAX_DEPTH {
            path.push_str("/a");
            other.create(&path, b"", &open).await.unwrap();
        }
        let long = format!("{root}/{}", "l".repeat(MAX_PATH_LEN));
        other.create(&long, b"", &open).await.unwrap();
        other
            .create(&format!("{long}/below"), b"", &open)
            .await
            .unwrap();

        let listed = reg.children(&p(root)).await.unwrap();
        let names: Vec<&str> = listed.nodes.iter().map(|n| n.path.name()).collect();
        assert_eq!(names, ["a"], "{root}: children listed");
        let skipped = registry_core::SkippedChild {
            name: "l".repeat(MAX_PATH_LEN),
            ephemeral: false,
        };
        assert_eq!(listed.skipped, [skipped], "{root}: skipped");
        conformance_tests::support::assert_copy_refuses_unnamable(&*reg, root).await;

        let deleted = reg.delete(&p(root), expected, DeleteScope::Recursive).await;
        assert!(deleted.is_ok(), "{root} ({expected:?}): {deleted:?}");
        let left = other.check_stat(root).await.unwrap();
        assert!(left.is_none(), "{root} still exists: {left:?}");
    }
    reg.close().await.unwrap();
}

/// A client whose server goes silent (connection open, no answer, like a paused process)
/// resumes its session through another listed server within 2/3 of the TTL, even when its
/// first try is the silent server again: zookeeper-client shuffles the servers after each
/// connection, so that happens to half the clients here; with every try bounded by 2/5 of the
/// TTL (its default) such a client took 4/5 of the TTL, and lost its session under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_left_well_within_the_session() {
    const CLIENTS: usize = 6;
    const TTL: Duration = Duration::from_secs(4);
    let server = fast_server();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (first, spare) = (
            TcpProxy::start(server.addr()).unwrap(),
            TcpProxy::start(server.addr()).unwrap(),
        );
        // Refused while the session opens, so it opens through `first`.
        spare.cut();
        let registry = connect(&format!("{},{}", first.addr(), spare.addr()), TTL).await;
        spare.forward();
        let events = registry.session_events();
        clients.push((registry, first, spare, events));
    }
    let silenced = Instant::now();
    for (_, first, _, _) in &clients {
        first.blackhole();
    }
    // Worst case now: 1/4 to notice, 1/4 on the silent server again, then the other (~2.1 s);
    // before: 2/5 + 2/5 (3.2 s).
    let bound = TTL * 2 / 3;
    // Each client's events are followed at once, so each resumption is timed when it happens.
    let resumptions = clients
        .iter_mut()
        .map(|(registry, _, _, events)| async move {
            let session = registry.session().session_id;
            let mut suspended = false;
            // Bounded by the TTL: the session expires by then if nothing answered.
            let resumed = tokio::time::timeout(TTL, async {
                while let Some(status) = events.next().await {
                    match status.state {
                        SessionState::Suspended => suspended = true,
                        SessionState::Connected if suspended => return Some(silenced.elapsed()),
                        SessionState::Lost => return None,
                        _ => {}
                    }
                }
                None
            })
            .await
            .ok()
            .flatten();
            (resumed, registry.session().session_id == session)
        });
    let resumptions = futures::future::join_all(resumptions).await;
    for (i, (resumed, same_session)) in resumptions.into_iter().enumerate() {
        let resumed = resumed
            .unwrap_or_else(|| panic!("client {i} did not resume its session within the TTL"));
        assert!(same_session, "client {i} resumed another session");
        assert!(
            resumed <= bound,
            "client {i} resumed its session {resumed:?} after its server went silent (bound {bound:?}, TTL {TTL:?})"
        );
    }
}

/// What `srvr` reports as the packets the server received so far.
fn packets_received(server: &ZkServer) -> u64 {
    server
        .four_letter("srvr")
        .and_then(|a| {
            a.lines()
                .find_map(|l| l.strip_prefix("Received:").map(|n| n.trim().parse().ok()))
        })
        .flatten()
        .unwrap_or(u64::MAX)
}

/// Packets the server received while `registry` listed `parent` with values, and what it
/// listed.
async fn children_cost(
    server: &ZkServer,
    registry: &ZkRegistry,
    parent: &NodePath,
) -> (u64, Vec<(NodePath, Bytes, u64, u64)>) {
    let before = packets_received(server);
    let children = registry.children(parent).await.unwrap();
    let cost = packets_received(server).saturating_sub(before);
    let nodes = children
        .nodes
        .into_iter()
        .map(|n| (n.path, n.value, n.version, n.create_order))
        .collect();
    (cost, nodes)
}

/// ZooKeeper 3.6 and later read many values in one `multiRead`: `children` uses it once the
/// server said its release at connect, and reads the same nodes as one `getData` per child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_values_come_in_multi_reads_from_a_server_that_has_them() {
    let server = fast_server();
    let cs = server.connect_string();
    let setup = connect(&cs, Duration::from_secs(4)).await;
    let parent = p("/svc");
    setup
        .create(&parent, Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    for i in 0..100 {
        let child = parent.join(&format!("c{i:03}")).unwrap();
        let value = Bytes::from(format!("value {i}"));
        setup
            .create(&child, value, CreateMode::Persistent)
            .await
            .unwrap();
    }
    // An update, so versions differ between children.
    setup
        .set(&p("/svc/c042"), Bytes::from_static(b"again"), Expected::Any)
        .await
        .unwrap();

    let options = ZkOptions::new([cs.clone()]).with_session_ttl(Duration::from_secs(4));
    let one_by_one = ZkRegistry::connect(options.clone().with_multi_read(false))
        .await
        .unwrap();
    let (each_cost, expected) = children_cost(&server, &one_by_one, &parent).await;
    assert_eq!(expected.len(), 100);
    assert!(
        each_cost >= 101,
        "one getData per child: {each_cost} packets"
    );
    let c042 = expected.iter().find(|n| n.0 == p("/svc/c042")).unwrap();
    assert_eq!((&c042.1[..], c042.2), (&b"again"[..], 1));

    // Told to, and asked (the answer to `srvr` arrives in the background after connect).
    let told = ZkRegistry::connect(options.clone().with_multi_read(true))
        .await
        .unwrap();
    let (told_cost, told_nodes) = children_cost(&server, &told, &parent).await;
    assert_eq!(told_nodes, expected);
    assert!(told_cost <= 20, "four multiReads: {told_cost} packets");
    let asked = ZkRegistry::connect(options).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let asked_cost = loop {
        let (cost, nodes) = children_cost(&server, &asked, &parent).await;
        assert_eq!(nodes, expected);
        if cost <= 20 || Instant::now() >= deadline {
            break cost;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        asked_cost <= 20,
        "a 3.8 server's release was not learnt: {asked_cost} packets"
    );
    for registry in [&one_by_one, &told, &asked] {
        registry.close().await.unwrap();
    }
    setup.close().await.unwrap();
}

/// ZooKeeper's opcode of `multiRead`, new in 3.6.
const OP_MULTI_READ: i32 = 22;
/// ZooKeeper's error code `UNIMPLEMENTED`.
const ERR_UNIMPLEMENTED: i32 = -6;

/// Stands in front of `server` as a ZooKeeper older than 3.6 does: a `multiRead` gets an
/// `UNIMPLEMENTED` answer and the connection is closed (what `UnimplementedRequestProcessor`
/// does); everything else passes. Counts the `multiRead`s it refused.
async fn pre_3_6_proxy(
    server: std::net::SocketAddr,
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = refused.clone();
    tokio::spawn(async move {
        // Bounded by the test: it ends when the runtime does.
        while let Ok((client, _)) = listener.accept().await {
            let Ok(upstream) = tokio::net::TcpStream::connect(server).await else {
                continue;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let (mut client_read, client_write) = client.into_split();
                let (mut server_read, mut server_write) = upstream.into_split();
                let client_write = Arc::new(tokio::sync::Mutex::new(client_write));
                let to_client = client_write.clone();
                // Whole frames only, so a refusal never lands inside an answer.
                let answers = tokio::spawn(async move {
                    while let Some((len, frame)) = read_frame(&mut server_read).await {
                        let mut out = to_client.lock().await;
                        if out.write_all(&len).await.is_err()
                            || out.write_all(&frame).await.is_err()
                        {
                            return;
                        }
                    }
                });
                let mut first = true;
                while let Some((len, frame)) = read_frame(&mut client_read).await {
                    // The connect request has no request header.
                    let op = (!first && frame.len() >= 8)
                        .then(|| i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]));
                    first = false;
                    if op == Some(OP_MULTI_READ) {
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let mut reply = 16u32.to_be_bytes().to_vec();
                        reply.extend_from_slice(&frame[0..4]); // its xid
                        reply.extend_from_slice(&0i64.to_be_bytes());
                        reply.extend_from_slice(&ERR_UNIMPLEMENTED.to_be_bytes());
                        let _ = client_write.lock().await.write_all(&reply).await;
                        break;
                    }
                    if server_write.write_all(&len).await.is_err()
                        || server_write.write_all(&frame).await.is_err()
                    {
                        break;
                    }
                }
                answers.abort();
                let _ = client_write.lock().await.shutdown().await;
            });
        }
    });
    (address, refused)
}

/// A server that turns out not to know `multiRead` (told to use it, or one of an ensemble
/// mid-upgrade) costs the client one dropped connection: it then reads children one by one,
/// in the same session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_refusing_multi_read_turns_it_off() {
    let server = fast_server();
    let setup = connect(&server.connect_string(), Duration::from_secs(4)).await;
    let parent = p("/svc");
    setup
        .create(&parent, Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    for i in 0..10 {
        let child = parent.join(&format!("c{i}")).unwrap();
        setup
            .create(&child, Bytes::from(format!("{i}")), CreateMode::Persistent)
            .await
            .unwrap();
    }
    let (address, refused) = pre_3_6_proxy(server.addr()).await;
    let options = ZkOptions::new([address])
        .with_session_ttl(Duration::from_secs(4))
        .with_multi_read(true);
    let registry = ZkRegistry::connect(options).await.unwrap();
    let session = registry.session().session_id;
    // The refused read is made one by one, sent again after the dropped connection.
    let listed = registry.children(&parent).await.unwrap();
    assert_eq!(listed.nodes.len(), 10);
    for _ in 0..3 {
        assert_eq!(registry.children(&parent).await.unwrap().nodes.len(), 10);
    }
    assert_eq!(
        refused.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "multiRead was sent again after the server refused it"
    );
    assert_eq!(
        registry.session().session_id,
        session,
        "the session survives"
    );
    registry.close().await.unwrap();
    setup.close().await.unwrap();
}

/// After a session loss a registration re-creates its node before it watches the node
/// again. Its node watch used to be re-armed in the new session at once (a sync and a read),
/// ahead of the create, which then fired it for another read: ten thousand registrations
/// queued those requests in front of their own creates and took about 5 s to come back.
/// Now each costs the server about two requests: the create and the new watch's read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_come_back_after_a_session_loss_for_two_requests_each() {
    const N: usize = 100;
    const TTL: Duration = Duration::from_secs(2);
    let server = fast_server();
    let setup = connect(&server.connect_string(), Duration::from_secs(4)).await;
    let parent = p("/svc");
    setup
        .create(&parent, Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    let proxy = TcpProxy::start(server.addr()).unwrap();
    let owner = connect(&proxy.addr().to_string(), TTL).await;
    let mut registrations = Vec::new();
    for i in 0..N {
        let path = parent.join(&format!("10.0.0.{i}:9090")).unwrap();
        let registration = owner
            .register(&path, Bytes::from_static(b"v"), RegisterOptions::new())
            .await
            .unwrap();
        registrations.push(registration);
    }
    // The owner's watches, one per registration, once all are armed.
    let mut watching = 0;
    conformance_tests::support::eventually(
        Duration::from_secs(10),
        "every registration watches its node",
        || {
            watching = total_watches(&server);
            async move { watching != usize::MAX && watching >= N }
        },
    )
    .await;
    let lost = owner.session().session_id;
    proxy.blackhole();
    conformance_tests::support::eventually(
        TTL * 5,
        "the server expires the cut-off session and its nodes",
        || async {
            setup
                .children(&parent)
                .await
                .is_ok_and(|c| c.nodes.is_empty())
        },
    )
    .await;
    // Only the owner talks to the server while the cost is counted.
    setup.close().await.unwrap();
    let before = packets_received(&server);
    proxy.forward();
    for registration in &registrations {
        let mut status = registration.watch_status();
        let back = tokio::time::timeout(
            Duration::from_secs(20),
            status.wait_for(|s| {
                matches!(s, RegistrationStatus::Registered(node) if node.ephemeral_owner != lost)
            }),
        )
        .await;
        assert!(
            matches!(back, Ok(Ok(_))),
            "{:?} not back under a new session within 20 s",
            registration.requested_path()
        );
    }
    conformance_tests::support::eventually(
        Duration::from_secs(10),
        "every registration watches its node again",
        || async {
            let watches = total_watches(&server);
            watches != usize::MAX && watches >= watching
        },
    )
    .await;
    let after = packets_received(&server);
    assert!(
        before != u64::MAX && after != u64::MAX,
        "srvr did not report packet counts"
    );
    let cost = after - before;
    // Two per registration, and some for the new connection, the session and pings (which
    // grow with the machine's slowness).
    assert!(
        cost <= 3 * N as u64,
        "recovering {N} registrations cost the server {cost} requests"
    );
    let reader = connect(&server.connect_string(), Duration::from_secs(4)).await;
    let children = reader.children(&parent).await.unwrap();
    assert_eq!(children.nodes.len(), N);
}

/// A write that timed out while the connection was down is not sent again: zookeeper-client
/// keeps every attempt queued and sends them all once the connection is back, so each resend
/// was applied too (one `set` moved the version by 3, and its copies landed after the caller
/// had been told it timed out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_timed_out_while_disconnected_is_applied_once() {
    let server = fast_server();
    let setup = connect(&server.connect_string(), Duration::from_secs(4)).await;
    let path = p("/once");
    setup
        .create(&path, Bytes::from_static(b"v0"), CreateMode::Persistent)
        .await
        .unwrap();
    let proxy = TcpProxy::start(server.addr()).unwrap();
    let options = ZkOptions::new([proxy.addr().to_string()])
        .with_session_ttl(Duration::from_secs(4))
        .with_request_timeout(Duration::from_millis(300));
    let writer = ZkRegistry::connect(options).await.unwrap();
    let session = writer.session().session_id;
    let mut events = writer.session_events();
    proxy.cut();
    assert!(
        session_reaches(&mut events, SessionState::Suspended, Duration::from_secs(5)).await,
        "not suspended within 5 s of the cut"
    );
    let set = writer
        .set(&path, Bytes::from_static(b"v1"), Expected::Any)
        .await;
    assert!(
        matches!(set, Err(registry_core::Error::Timeout { .. })),
        "a set with no connection: {set:?}"
    );
    proxy.forward();
    assert!(
        session_reaches(&mut events, SessionState::Connected, Duration::from_secs(5)).await,
        "not connected again within 5 s"
    );
    assert_eq!(writer.session().session_id, session, "the session changed");
    // Requests go out in order: this read is answered after whatever was queued before it.
    let node = writer.get(&path).await.unwrap();
    assert_eq!(node.value, Bytes::from_static(b"v1"));
    assert_eq!(
        node.version, 1,
        "the timed-out set was applied more than once"
    );
    writer.close().await.unwrap();
    setup.close().await.unwrap();
}

/// Each node a watch reported, by path, with its create order.
type Present = std::collections::BTreeMap<NodePath, u64>;

fn create_orders(snapshot: registry_core::Snapshot) -> Present {
    snapshot
        .nodes
        .into_iter()
        .map(|n| (n.path, n.create_order))
        .collect()
}

/// Nothing reported below a node reported deleted goes on living after it.
fn assert_nothing_below(present: &Present, deleted: &NodePath) {
    let below: Vec<&NodePath> = present.keys().filter(|q| q.is_within(deleted)).collect();
    assert!(
        below.is_empty(),
        "{deleted} reported deleted with {below:?} below it"
    );
}

/// Applies an item of a subtree watch of `root` to `present`, asserting tree order: a node
/// other than `root` is created or written only after its parent's creation, and nothing
/// reported lives on below a node reported deleted.
fn apply_in_tree_order(present: &mut Present, root: &NodePath, event: WatchEvent) {
    match event {
        WatchEvent::Snapshot(s) | WatchEvent::Resync { snapshot: s, .. } => {
            *present = create_orders(s);
        }
        WatchEvent::Created(n) | WatchEvent::Updated(n) => {
            if n.path != *root {
                let parent = n.path.parent().unwrap();
                let parent_created = present.get(&parent).copied();
                assert!(
                    parent_created.is_some_and(|c| c <= n.create_order),
                    "{} (created at {}) reported under {parent} created at {parent_created:?}",
                    n.path,
                    n.create_order
                );
            }
            present.insert(n.path, n.create_order);
        }
        WatchEvent::Deleted(n) => {
            present.remove(&n.path);
            assert_nothing_below(present, &n.path);
        }
    }
}

/// `/t`, its child `/t/x` and grandchild `/t/x/c`, persistent.
async fn create_parent_and_child(setup: &Arc<ZkRegistry>) {
    for path in ["/t", "/t/x", "/t/x/c"] {
        setup
            .create(&p(path), Bytes::new(), CreateMode::Persistent)
            .await
            .unwrap();
    }
}

/// Deletes `/t/x/c` and `/t/x` and creates them again, in one transaction.
async fn recreate_parent_and_child(writer: &zookeeper_client::Client) {
    let persistent = raw_persistent();
    let mut multi = writer.new_multi_writer();
    multi.add_delete("/t/x/c", None).unwrap();
    multi.add_delete("/t/x", None).unwrap();
    multi.add_create("/t/x", b"", &persistent).unwrap();
    multi.add_create("/t/x/c", b"", &persistent).unwrap();
    multi.commit().await.unwrap();
}

/// A parent deleted and re-created with its child, again and again under a subtree watch,
/// in one transaction or in pipelined requests whose notifications come apart (with or
/// without a write of the parent's value first): every
/// `Created` or `Updated` comes after its parent's, in the parent's current incarnation
/// (commit order), nothing reported lives on below a node reported deleted, and the watch
/// ends up with both nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subtree_watch_reports_a_recreated_parent_before_its_child() {
    let server = fast_server();
    let cs = server.connect_string();
    let setup = connect(&cs, Duration::from_secs(4)).await;
    create_parent_and_child(&setup).await;
    let mut stream = setup
        .watch(&p("/t"), WatchOptions::subtree())
        .await
        .unwrap();
    // Each node the watch reports, by path, with its create order.
    let mut present = Present::new();
    let root = p("/t");
    let apply = |present: &mut Present, event| apply_in_tree_order(present, &root, event);
    let first = next_event(&mut stream, "snapshot").await;
    apply(&mut present, first);
    let writer = raw(&cs).await;
    let persistent = raw_persistent();
    for round in 0..300 {
        if round % 3 == 2 {
            // The parent's own data watch fires too (so it is read ahead of its child), and
            // the next round writes the parent after its child was created.
            let (set, a, b, c, d) = futures::join!(
                writer.set_data("/t/x", b"v", None),
                writer.delete("/t/x/c", None),
                writer.delete("/t/x", None),
                writer.create("/t/x", b"", &persistent),
                writer.create("/t/x/c", b"", &persistent),
            );
            set.unwrap();
            a.unwrap();
            b.unwrap();
            c.unwrap();
            d.unwrap();
        } else if round % 3 == 0 {
            recreate_parent_and_child(&writer).await;
        } else {
            let (a, b, c, d) = futures::join!(
                writer.delete("/t/x/c", None),
                writer.delete("/t/x", None),
                writer.create("/t/x", b"", &persistent),
                writer.create("/t/x/c", b"", &persistent),
            );
            a.unwrap();
            b.unwrap();
            c.unwrap();
            d.unwrap();
        }
        // Whatever the watch delivered by now keeps the order.
        while let Some(Some(item)) = futures::FutureExt::now_or_never(stream.next()) {
            apply(&mut present, item.unwrap());
        }
    }
    let last = setup.children(&p("/t/x")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    // Converged: both nodes, in their last incarnations.
    while present.get(&p("/t/x/c")) != last.nodes.first().map(|n| n.create_order).as_ref()
        || !present.contains_key(&p("/t/x"))
    {
        assert!(Instant::now() < deadline, "never converged: {present:?}");
        let item = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .ok()
            .flatten();
        if let Some(item) = item {
            apply(&mut present, item.unwrap());
        }
    }
    setup.close().await.unwrap();
}

/// A subtree watch whose root is deleted and made again with a new child (in one
/// transaction, right after an older child's deletion): the new child used to be reported
/// under the root's old incarnation, which was then reported deleted with that child still
/// below it. The watch must report the root gone with everything below it first, then the
/// new root, then its child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subtree_watch_whose_root_is_made_again_keeps_the_order() {
    let server = fast_server();
    let cs = server.connect_string();
    let watcher = connect(&cs, Duration::from_secs(4)).await;
    let writer = raw(&cs).await;
    let persistent = raw_persistent();
    for round in 0..20 {
        let root = p(&format!("/w{round}"));
        let (old_child, new_child) = (format!("{root}/b"), format!("{root}/a"));
        writer
            .create(root.as_str(), b"", &persistent)
            .await
            .unwrap();
        writer.create(&old_child, b"", &persistent).await.unwrap();
        let mut stream = watcher.watch(&root, WatchOptions::subtree()).await.unwrap();
        let mut present = Present::new();
        let apply = |present: &mut Present, event| apply_in_tree_order(present, &root, event);
        apply(&mut present, next_event(&mut stream, "snapshot").await);
        // Pipelined: the child watch on the root fires for the first, before the multi.
        let delete_old = writer.delete(&old_child, None);
        let mut again = writer.new_multi_writer();
        again.add_delete(root.as_str(), None).unwrap();
        again
            .add_create(root.as_str(), b"new", &persistent)
            .unwrap();
        again.add_create(&new_child, b"new", &persistent).unwrap();
        let (deleted, made) = futures::join!(delete_old, again.commit());
        deleted.unwrap();
        made.unwrap();
        // The multi made both at one zxid.
        let last = watcher.get(&p(&new_child)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while present.get(&p(&new_child)) != Some(&last.create_order)
            || present.get(&root) != Some(&last.create_order)
            || present.contains_key(&p(&old_child))
        {
            assert!(
                Instant::now() < deadline,
                "round {round}: never converged: {present:?}"
            );
            if let Ok(Some(item)) =
                tokio::time::timeout(Duration::from_secs(5), stream.next()).await
            {
                apply(&mut present, item.unwrap());
            }
        }
    }
    watcher.close().await.unwrap();
}

/// Subtree watches opened while a parent and its child are deleted and created again (in one
/// transaction, over and over): a first read made level by level can list a parent's new
/// incarnation after reading its old one, and must then be made again. No stream ever shows a
/// node whose parent is missing, or anything living on below a node reported deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subtree_watches_opened_while_a_tree_is_recreated_never_show_an_orphan() {
    let server = fast_server();
    let cs = server.connect_string();
    let setup = connect(&cs, Duration::from_secs(4)).await;
    create_parent_and_child(&setup).await;
    let check = |present: &Present, at: &str| {
        for child in present.keys() {
            let parent = child.parent().unwrap();
            if parent != p("/t") && parent != NodePath::root() {
                assert!(
                    present.contains_key(&parent),
                    "{at}: {child} shown without its parent: {present:?}"
                );
            }
        }
    };
    let apply = |present: &mut Present, event: WatchEvent| match event {
        WatchEvent::Snapshot(s) | WatchEvent::Resync { snapshot: s, .. } => {
            *present = create_orders(s);
            check(present, "snapshot");
        }
        WatchEvent::Created(n) | WatchEvent::Updated(n) => {
            present.insert(n.path, n.create_order);
            check(present, "created");
        }
        WatchEvent::Deleted(n) => {
            present.remove(&n.path);
            assert_nothing_below(present, &n.path);
        }
    };
    let writer = raw(&cs).await;
    let mut streams: Vec<(registry_core::WatchStream, Present)> = Vec::new();
    for round in 0..300 {
        if round % 5 == 0 {
            let stream = setup
                .watch(&p("/t"), WatchOptions::subtree())
                .await
                .unwrap();
            streams.push((stream, Present::new()));
        }
        recreate_parent_and_child(&writer).await;
        for (stream, present) in &mut streams {
            while let Some(Some(item)) = futures::FutureExt::now_or_never(stream.next()) {
                apply(present, item.unwrap());
            }
        }
    }
    // And every stream got its first read through.
    for (stream, present) in &mut streams {
        while present.is_empty() {
            let item = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
            let Ok(Some(item)) = item else {
                panic!("a stream never delivered its first read");
            };
            apply(present, item.unwrap());
        }
    }
    setup.close().await.unwrap();
}

/// A subtree watch opened while the nodes below it are deleted one after another delivers its
/// first read at once: a node gone between its read and its listing is no mixed read (taken
/// for one, every attempt started over while anything was being deleted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subtree_watch_reads_a_tree_while_its_nodes_are_deleted() {
    let server = fast_server();
    let cs = server.connect_string();
    let setup = connect(&cs, Duration::from_secs(4)).await;
    let leaves = 500;
    setup
        .create(&p("/d"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    let writer = raw(&cs).await;
    let persistent = raw_persistent();
    for i in 0..leaves {
        writer
            .create(&format!("/d/n{i:04}"), b"", &persistent)
            .await
            .unwrap();
    }
    // Paced, so the deletions outlast many full reads of the tree.
    let deleting = tokio::spawn(async move {
        for i in 0..leaves {
            writer.delete(&format!("/d/n{i:04}"), None).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let mut stream = setup
        .watch(&p("/d"), WatchOptions::subtree())
        .await
        .unwrap();
    let first = next_event(&mut stream, "first read").await;
    let WatchEvent::Snapshot(snapshot) = first else {
        panic!("expected the first read, got {first:?}");
    };
    // The first attempt gets through: it shows nearly all the tree (488-497 of the 501
    // nodes here; a read that started over until nothing was deleted under it, 108-243).
    assert!(
        snapshot.nodes.len() > leaves * 9 / 10,
        "the first read came late, with {} nodes left",
        snapshot.nodes.len()
    );
    deleting.await.unwrap();
    setup.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_and_ttl_nodes_are_persistent_and_copied() {
    let server = fast_server();
    let reg = connect(&server.connect_string(), Duration::from_secs(4)).await;
    // What Curator's `creatingParentContainersIfNeeded` and a TTL recipe leave behind.
    let other = raw(&server.connect_string()).await;
    let open = zookeeper_client::Acls::anyone_all();
    for (path, options) in [
        (
            "/soa",
            zookeeper_client::CreateMode::Container.with_acls(open),
        ),
        (
            "/soa/c",
            zookeeper_client::CreateMode::Container.with_acls(open),
        ),
        (
            "/soa/c/ttl",
            zookeeper_client::CreateMode::Persistent
                .with_acls(open)
                .with_ttl(Duration::from_secs(3600)),
        ),
        (
            "/soa/c/eph",
            zookeeper_client::CreateMode::Ephemeral.with_acls(open),
        ),
    ] {
        other
            .create(path, b"v", &options)
            .await
            .unwrap_or_else(|e| panic!("create {path}: {e}"));
    }

    for path in ["/soa", "/soa/c", "/soa/c/ttl"] {
        let node = reg.get(&p(path)).await.unwrap();
        assert_eq!(node.ephemeral_owner, None, "{path} read as ephemeral");
    }
    let eph = reg.get(&p("/soa/c/eph")).await.unwrap();
    assert_eq!(eph.ephemeral_owner.map(|s| s.0), Some(other.session_id().0));
    let mut watch = reg
        .watch(&p("/soa"), WatchOptions::subtree())
        .await
        .unwrap();
    let WatchEvent::Snapshot(snapshot) = next_event(&mut watch, "snapshot").await else {
        panic!("the first item is not a snapshot");
    };
    let owners: Vec<(String, bool)> = snapshot
        .nodes
        .iter()
        .map(|n| (n.path.to_string(), n.ephemeral_owner.is_some()))
        .collect();
    assert_eq!(
        owners,
        [
            ("/soa".to_owned(), false),
            ("/soa/c".to_owned(), false),
            ("/soa/c/eph".to_owned(), true),
            ("/soa/c/ttl".to_owned(), false),
        ]
    );

    let (summary, target) = conformance_tests::support::copy_into_memory(&*reg, "/soa").await;
    let summary = summary.unwrap_or_else(|e| panic!("copy: {e}"));
    assert_eq!(summary.created, 3, "{summary:?}");
    assert!(target.get(&p("/soa/c/ttl")).await.is_ok());
    assert!(target.get(&p("/soa/c/eph")).await.is_err());
    reg.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_over_the_limit_stops_a_copy_before_it_writes_and_is_skipped_by_a_mirror() {
    use registry_core::migrate::{self, Mirror, MirrorChange};
    let server = fast_server();
    let reg = connect(&server.connect_string(), Duration::from_secs(4)).await;
    reg.create(
        &p("/soa/config/a"),
        Bytes::from("1"),
        CreateMode::Persistent,
    )
    .await
    .unwrap();
    // ZooKeeper takes values up to its 1 MiB jute.maxbuffer; no backend here takes this one.
    let big = vec![b'x'; registry_core::MAX_VALUE_LEN + 1];
    let other = raw(&server.connect_string()).await;
    let open = raw_persistent();
    other.create("/soa/config/big", &big, &open).await.unwrap();
    other
        .create("/soa/config/big/below", b"2", &open)
        .await
        .unwrap();

    let store = registry_core::MemoryStore::new();
    let target: Arc<dyn Registry> = Arc::new(
        registry_core::MemoryRegistry::connect(&store, Default::default())
            .await
            .unwrap(),
    );
    let refused = migrate::copy(&*reg, &*target, &p("/soa"), Default::default(), |_, _| {}).await;
    assert!(
        matches!(&refused, Err(registry_core::Error::ValueTooLarge { path, .. }) if *path == p("/soa/config/big")),
        "{refused:?}"
    );
    assert!(
        !target.exists(&p("/soa")).await.unwrap(),
        "the refused copy wrote something"
    );

    let (changes_tx, mut changes) = tokio::sync::mpsc::unbounded_channel();
    let mirror = Mirror::start_with_observer(reg.clone(), target.clone(), p("/soa"), move |c| {
        let _ = changes_tx.send(c);
    });
    mirror.wait_synced(Duration::from_secs(20)).await.unwrap();
    let status = mirror.status();
    assert_eq!((status.too_large, status.last_error), (1, None));
    assert_eq!(
        target.get(&p("/soa/config/big/below")).await.unwrap().value,
        Bytes::from("2")
    );
    assert_eq!(
        target.get(&p("/soa/config/big")).await.unwrap().value,
        Bytes::new()
    );
    // The mirror goes on following; a value within the limit is written.
    other
        .set_data("/soa/config/big", b"small", None)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let change = tokio::time::timeout_at(deadline.into(), changes.recv())
            .await
            .expect("no Put of the node once its value fits")
            .unwrap();
        if change == MirrorChange::Put(p("/soa/config/big")) {
            break;
        }
    }
    assert_eq!(mirror.status().too_large, 0);
    assert_eq!(
        target.get(&p("/soa/config/big")).await.unwrap().value,
        Bytes::from("small")
    );
    mirror.stop().await;
    reg.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_own_node_is_no_child_of_the_root_without_a_chroot() {
    let server = fast_server();
    // No chroot: the client sees ZooKeeper's own /zookeeper at its root.
    let reg = connect(&server.connect_string(), Duration::from_secs(4)).await;
    reg.create(
        &p("/soa/config/a"),
        Bytes::from("1"),
        CreateMode::Persistent,
    )
    .await
    .unwrap();
    let root = reg.children(&NodePath::root()).await.unwrap();
    let names: Vec<&str> = root.nodes.iter().map(|n| n.path.name()).collect();
    assert_eq!(names, ["soa"]);
    assert!(root.skipped.is_empty(), "{:?}", root.skipped);
    // So a migration of the whole tree works.
    let tree = registry_core::migrate::persistent_tree(&*reg, &NodePath::root())
        .await
        .unwrap_or_else(|e| panic!("walking /: {e}"));
    assert_eq!(tree.len(), 3, "{:?}", tree.keys().collect::<Vec<_>>());
    let mut watch = reg
        .watch(&NodePath::root(), WatchOptions::children())
        .await
        .unwrap();
    let WatchEvent::Snapshot(snapshot) = next_event(&mut watch, "snapshot").await else {
        panic!("the first item is not a snapshot");
    };
    let names: Vec<&str> = snapshot.nodes.iter().map(|n| n.path.name()).collect();
    assert_eq!(names, ["soa"]);
    reg.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unnamable_ephemeral_node_is_skipped_as_such_and_a_copy_goes_on() {
    let server = fast_server();
    let reg = connect(&server.connect_string(), Duration::from_secs(4)).await;
    reg.create(&p("/dubbo/ok"), Bytes::from("1"), CreateMode::Persistent)
        .await
        .unwrap();
    // A provider URL longer than a NodePath allows, as another framework may register.
    let long = "u".repeat(registry_core::MAX_PATH_LEN);
    let provider = raw(&server.connect_string()).await;
    let ephemeral =
        zookeeper_client::CreateMode::Ephemeral.with_acls(zookeeper_client::Acls::anyone_all());
    provider
        .create(&format!("/dubbo/{long}"), b"", &ephemeral)
        .await
        .unwrap();
    conformance_tests::support::assert_copy_passes_unnamable_ephemeral(&*reg, "/dubbo", long, 2)
        .await;
    reg.close().await.unwrap();
}

/// A node watch told that its node was deleted asks only whether it exists (one request,
/// which also watches for its return) instead of reading it first and failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_watch_learns_of_its_deletion_with_one_request() {
    let server = fast_server();
    let cs = server.connect_string();
    let writer = connect(&cs, Duration::from_secs(4)).await;
    let watcher = connect(&cs, Duration::from_secs(4)).await;
    let path = p("/gone");
    // A session's ping can land in the window, as can the remove-watch of the last round's
    // dropped stream: the fewest packets over three rounds.
    let mut fewest = u64::MAX;
    for _ in 0..3 {
        writer
            .create(&path, Bytes::new(), CreateMode::Persistent)
            .await
            .unwrap();
        let mut watch = watcher.watch(&path, WatchOptions::node()).await.unwrap();
        match next_event(&mut watch, "snapshot").await {
            WatchEvent::Snapshot(s) => assert_eq!(s.nodes.len(), 1, "{s:?}"),
            other => panic!("expected the snapshot, got {other:?}"),
        }
        let before = packets_received(&server);
        writer
            .delete(&path, Expected::Any, DeleteScope::Node)
            .await
            .unwrap();
        match next_event(&mut watch, "the deletion").await {
            WatchEvent::Deleted(n) => assert_eq!(n.path, path),
            other => panic!("expected the deletion, got {other:?}"),
        }
        fewest = fewest.min(packets_received(&server).saturating_sub(before));
    }
    // The `srvr` that read the count (the server counts it too), the writer's delete, and
    // the watcher's existence check; a read of the node first made it 4.
    assert_eq!(
        fewest, 3,
        "packets from the delete to its event at the watcher"
    );
}
