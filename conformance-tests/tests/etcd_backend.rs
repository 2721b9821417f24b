//! etcd-specific behaviour beyond the shared suite, each against its own real etcd.

use std::sync::Arc;
use std::time::{Duration, Instant};

use conformance_tests::harness::{EtcdCluster, EtcdServer, TcpProxy};
use conformance_tests::support::{
    apply_until, close_while_unreachable, etcdctl, next_event, read_scope, session_reaches, summary,
};
use futures::StreamExt;
use registry_core::{
    Bytes, CreateMode, DeleteScope, Error, Expected, Node, NodePath, RegisterOptions, Registration,
    RegistrationStatus, Registry, ResyncReason, SessionState, WatchEvent, WatchOptions, WatchScope,
    WatchStream, WatchedState,
};
use registry_etcd::{EtcdOptions, EtcdRegistry};

fn p(s: &str) -> NodePath {
    NodePath::new(s).unwrap()
}

async fn connect(endpoint: &str) -> Arc<dyn Registry> {
    let options = EtcdOptions::new([endpoint.to_owned()]).with_session_ttl(Duration::from_secs(2));
    Arc::new(
        EtcdRegistry::connect(options)
            .await
            .unwrap_or_else(|e| panic!("connect {endpoint}: {e}")),
    )
}

/// Turns auth on (with a root user) and adds `user` (password `<user>-pw`) holding
/// `permissions`; the options connect as that user with a 2 s session TTL.
async fn user_under_auth(
    ep: &str,
    user: &str,
    permissions: impl IntoIterator<Item = etcd_client::Permission>,
) -> EtcdOptions {
    use etcd_client::ConnectOptions;
    let mut plain = etcd_client::Client::connect([ep], None).await.unwrap();
    plain.user_add("root", "root-pw", None).await.unwrap();
    plain.user_grant_role("root", "root").await.unwrap();
    plain.auth_enable().await.unwrap();
    let root_options = ConnectOptions::new().with_user("root", "root-pw");
    let mut root = etcd_client::Client::connect([ep], Some(root_options))
        .await
        .unwrap();
    let role = format!("{user}-role");
    root.role_add(role.as_str()).await.unwrap();
    for permission in permissions {
        root.role_grant_permission(role.as_str(), permission)
            .await
            .unwrap();
    }
    let password = format!("{user}-pw");
    root.user_add(user, password.as_str(), None).await.unwrap();
    root.user_grant_role(user, role.as_str()).await.unwrap();
    EtcdOptions::new([ep.to_owned()])
        .with_credentials(user, password)
        .with_session_ttl(Duration::from_secs(2))
}

/// Node watches on `{prefix}/0` .. `{prefix}/{n-1}`, each past its first snapshot.
async fn watch_nodes(reg: &Arc<dyn Registry>, prefix: &str, n: usize) -> Vec<WatchStream> {
    let mut streams = Vec::new();
    for i in 0..n {
        let mut s = reg
            .watch(&p(&format!("{prefix}/{i}")), WatchOptions::node())
            .await
            .unwrap();
        next_event(&mut s, "snapshot").await;
        streams.push(s);
    }
    streams
}

/// Registers each of `paths` with `value`, one after another.
async fn register_all(
    reg: &Arc<dyn Registry>,
    paths: impl IntoIterator<Item = String>,
    value: &'static str,
) -> Vec<Registration> {
    let mut registrations = Vec::new();
    for path in paths {
        registrations.push(
            reg.register(&p(&path), Bytes::from(value), RegisterOptions::new())
                .await
                .unwrap(),
        );
    }
    registrations
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_written_by_etcdctl_are_first_class() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let ep = server.endpoint();
    let reg = connect(&ep).await;
    let svc = p("/soa/runtime/services/com.today.service.goods.GoodsService");
    let mut watch = reg.watch(&svc, WatchOptions::children()).await.unwrap();
    assert!(
        matches!(next_event(&mut watch, "snapshot").await, WatchEvent::Snapshot(s) if s.nodes.is_empty())
    );

    etcdctl(&ep, &["put", &format!("{svc}/192.168.10.121:9071"), "50"]);
    let lease_line = etcdctl(&ep, &["lease", "grant", "60"]);
    let lease_hex = lease_line
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("lease grant said {lease_line:?}"));
    etcdctl(
        &ep,
        &[
            "put",
            "--lease",
            lease_hex,
            &format!("{svc}/192.168.10.122:9071"),
            "70",
        ],
    );

    let mut state = WatchedState::new();
    apply_until(
        &mut watch,
        &mut state,
        Duration::from_secs(10),
        "etcdctl keys in the watch",
        |s| s.len() == 2,
    )
    .await;
    let children = reg.children(&svc).await.unwrap();
    let names: Vec<_> = children
        .nodes
        .iter()
        .map(|n| n.path.name().to_owned())
        .collect();
    assert_eq!(names, ["192.168.10.121:9071", "192.168.10.122:9071"]);
    assert_eq!(children.nodes[0].value, "50");
    assert!(children.nodes[0].ephemeral_owner.is_none());
    let lease = i64::from_str_radix(lease_hex, 16).unwrap();
    assert_eq!(
        children.nodes[1].ephemeral_owner,
        Some(registry_etcd::session_of_lease(lease))
    );
    // Parents nobody wrote behave as empty persistent nodes.
    let soa = reg.get(&p("/soa")).await.unwrap();
    assert!(soa.value.is_empty() && soa.version == 0 && soa.create_order == 0);
    let top: Vec<_> = reg
        .children(&p("/"))
        .await
        .unwrap()
        .nodes
        .iter()
        .map(|n| n.path.to_string())
        .collect();
    assert_eq!(top, ["/soa"]);
    // A child named only by deeper keys is listed once, as implicit, even when a sibling
    // sorts between its keys (`/t/b-x` falls between `/t/b` and `/t/b/c`).
    for key in ["/t/a", "/t/a/deep", "/t/b-x", "/t/b/c", "/t/b/d/e"] {
        etcdctl(&ep, &["put", key, "v"]);
    }
    let listed: Vec<(String, bool)> = reg
        .children(&p("/t"))
        .await
        .unwrap()
        .nodes
        .iter()
        .map(|n| (n.path.to_string(), n.create_order == 0))
        .collect();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            ("/t/a".to_owned(), false),
            ("/t/b".to_owned(), true),
            ("/t/b-x".to_owned(), false)
        ],
        "{listed:?}"
    );
    // One deletes like an empty persistent node: not while keys live below it, and with them
    // recursively, sparing a sibling whose keys share its prefix.
    let implicit = p("/t/b");
    let r = reg
        .delete(&implicit, Expected::Any, DeleteScope::Node)
        .await;
    assert!(matches!(r, Err(Error::NotEmpty { .. })), "{r:?}");
    // So does an owner-checked delete of a persistent node (it said no node was there).
    let r = reg.delete_owned(&Node::empty(implicit.clone(), None)).await;
    assert!(matches!(r, Err(Error::NotEmpty { .. })), "{r:?}");
    let r = reg
        .delete(&implicit, Expected::Version(1), DeleteScope::Recursive)
        .await;
    assert!(matches!(r, Err(Error::VersionMismatch { .. })), "{r:?}");
    reg.delete(&implicit, Expected::Version(0), DeleteScope::Recursive)
        .await
        .unwrap();
    for gone in ["/t/b", "/t/b/c", "/t/b/d/e"] {
        let r = reg.get(&p(gone)).await;
        assert!(matches!(r, Err(Error::NotFound { .. })), "{gone}: {r:?}");
    }
    reg.get(&p("/t/b-x")).await.unwrap();
    // They have no key to write: create them first.
    assert!(matches!(
        reg.set(&p("/soa"), Bytes::from("x"), Expected::Any).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        reg.set(&p("/soa"), Bytes::from("x"), Expected::Version(0))
            .await,
        Err(Error::NotFound { .. })
    ));
    // Our own sequence counters never show up to etcdctl users as nodes of the tree.
    reg.create(
        &svc.join("x-").unwrap(),
        Bytes::new(),
        CreateMode::PersistentSequential,
    )
    .await
    .unwrap();
    let listed = reg.children(&svc).await.unwrap();
    assert_eq!(listed.nodes.len(), 3, "{:?}", listed.nodes);
    reg.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_cut_off_ends_in_resync_and_convergence() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let proxy = TcpProxy::start(server.addr()).unwrap();
    let writer = connect(&server.endpoint()).await;
    let watcher = connect(&proxy.addr().to_string()).await;
    let root = p("/c");
    writer
        .create(
            &root.join("seed").unwrap(),
            Bytes::new(),
            CreateMode::Persistent,
        )
        .await
        .unwrap();
    let mut stream = watcher.watch(&root, WatchOptions::subtree()).await.unwrap();
    let mut state = WatchedState::new();
    state.apply(&next_event(&mut stream, "snapshot").await);

    proxy.cut();
    for i in 0..20 {
        writer
            .create(
                &root.join(&format!("k{i}")).unwrap(),
                Bytes::from("v"),
                CreateMode::Persistent,
            )
            .await
            .unwrap();
    }
    let etcd = writer.clone();
    let rev = etcd.children(&root).await.unwrap().revision.0 as i64;
    let mut raw = etcd_client::Client::connect([server.endpoint()], None)
        .await
        .unwrap();
    raw.compact(rev, None).await.unwrap();
    proxy.forward();

    let mut saw_compacted = false;
    let expected = summary(
        read_scope(&writer, &root, WatchScope::Subtree)
            .await
            .unwrap()
            .iter(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while summary(state.nodes()) != expected || !saw_compacted {
        assert!(
            Instant::now() < deadline,
            "no convergence; compacted resync seen: {saw_compacted}"
        );
        let event = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let WatchEvent::Resync {
            reason: ResyncReason::Compacted,
            ..
        } = &event
        {
            saw_compacted = true;
        }
        state.apply(&event);
    }
    watcher.close().await.unwrap();
    writer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_loses_no_event() {
    let mut server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let ep = server.endpoint();
    let writer = connect(&ep).await;
    let watcher = connect(&ep).await;
    let root = p("/r");
    writer
        .create(&root, Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    let mut stream = watcher.watch(&root, WatchOptions::subtree()).await.unwrap();
    let mut state = WatchedState::new();
    state.apply(&next_event(&mut stream, "snapshot").await);
    for i in 0..50 {
        writer
            .create(
                &root.join(&format!("a{i}")).unwrap(),
                Bytes::from(i.to_string()),
                CreateMode::Persistent,
            )
            .await
            .unwrap();
    }
    server.kill().unwrap();
    server.restart().unwrap_or_else(|e| panic!("{e}"));
    for i in 0..50 {
        let path = root.join(&format!("b{i}")).unwrap();
        // The first writes after a restart may meet a connection still being re-made.
        let mut attempts = 0;
        while let Err(e) = writer
            .create(&path, Bytes::from(i.to_string()), CreateMode::Persistent)
            .await
        {
            attempts += 1;
            assert!(
                e.is_retryable() && attempts < 50,
                "write after restart: {e}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let expected = summary(
        read_scope(&writer, &root, WatchScope::Subtree)
            .await
            .unwrap()
            .iter(),
    );
    let mut created = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while summary(state.nodes()) != expected {
        assert!(
            Instant::now() < deadline,
            "watcher did not converge after restart"
        );
        let event = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            !matches!(event, WatchEvent::Resync { .. }),
            "a restart must resume, not resync: {event:?}"
        );
        if let WatchEvent::Created(n) = &event {
            created += 1;
            assert!(
                state.get(&n.path).is_none(),
                "duplicate Created for {} (modify_order {})",
                n.path,
                n.modify_order
            );
        }
        state.apply(&event);
    }
    assert_eq!(
        created, 100,
        "every create arrives exactly once across the restart"
    );
    watcher.close().await.unwrap();
    writer.close().await.unwrap();
}

/// Waits (bounded) until `done` holds.
async fn eventually(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what} not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many keys live under `prefix`, and the distinct leases they are under.
async fn keys_and_leases_under(raw: &mut etcd_client::Client, prefix: &str) -> (usize, Vec<i64>) {
    let response = raw
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let mut leases: Vec<i64> = response.kvs().iter().map(|kv| kv.lease()).collect();
    leases.sort_unstable();
    leases.dedup();
    (response.kvs().len(), leases)
}

async fn assert_revoked(raw: &mut etcd_client::Client, leases: &[i64], which: &str) {
    for &lease in leases {
        let ttl = raw.lease_time_to_live(lease, None).await.unwrap().ttl();
        assert!(ttl <= 0, "lease {lease:x} {which} still has {ttl} s");
    }
}

/// A server, a registry on it whose session puts 2 keys per lease (2 s TTL), a raw client to
/// look at the leases, and the session's ID.
async fn two_keys_per_lease() -> (
    EtcdServer,
    Arc<dyn Registry>,
    etcd_client::Client,
    registry_core::SessionId,
) {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let ep = server.endpoint();
    let options = EtcdOptions::new([ep.clone()])
        .with_session_ttl(Duration::from_secs(2))
        .with_keys_per_lease(2);
    let reg: Arc<dyn Registry> = Arc::new(EtcdRegistry::connect(options).await.unwrap());
    let raw = etcd_client::Client::connect([ep], None).await.unwrap();
    let session = reg.session().session_id.unwrap();
    (server, reg, raw, session)
}

/// Every lease on the server that belongs to `session`.
async fn leases_of_session(
    raw: &mut etcd_client::Client,
    session: registry_core::SessionId,
) -> Vec<i64> {
    raw.leases()
        .await
        .unwrap()
        .leases()
        .iter()
        .map(|l| l.id())
        .filter(|&l| registry_etcd::session_of_lease(l) == session)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_grows_leases_with_live_keys_not_with_creates() {
    // A long-lived session that keeps creating and deleting (locks, churning registrations)
    // holds few keys: it must not climb towards thousands of leases, each kept alive.
    let (_server, reg, mut raw, session) = two_keys_per_lease().await;
    let kept = reg
        .create(&p("/churn/kept"), Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap();
    for i in 0..20 {
        let node = reg
            .create(
                &p(&format!("/churn/n{i}")),
                Bytes::new(),
                CreateMode::Ephemeral,
            )
            .await
            .unwrap();
        // A failed attempt takes no room either.
        let again = reg
            .create(&node.path, Bytes::new(), CreateMode::Ephemeral)
            .await;
        assert!(
            matches!(again, Err(Error::AlreadyExists { .. })),
            "{again:?}"
        );
        reg.delete(&node.path, Expected::Any, DeleteScope::Node)
            .await
            .unwrap();
    }
    let leases = leases_of_session(&mut raw, session).await;
    // At most two live keys at a time (the kept one and one churning), 2 per lease: 2 leases,
    // where every create counted used to grow it to 21.
    assert!(leases.len() <= 2, "{leases:x?}");
    // Keys that stay still spread: each lease fills, then another is granted.
    let more = register_all(&reg, (0..5).map(|i| format!("/churn/r{i}")), "1").await;
    let (keys, leases) = keys_and_leases_under(&mut raw, "/churn/").await;
    assert_eq!(keys, 6);
    assert!(leases.len() >= 3, "6 keys, 2 per lease: {leases:x?}");
    drop((kept, more));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_spreads_its_keys_over_leases_and_loses_them_together() {
    let (_server, reg, mut raw, session) = two_keys_per_lease().await;
    let registrations = register_all(&reg, (0..7).map(|i| format!("/spread/r{i}")), "1").await;
    let (keys, leases) = keys_and_leases_under(&mut raw, "/spread/").await;
    assert_eq!(keys, 7);
    assert_eq!(leases.len(), 4, "7 keys, 2 per lease: {leases:x?}");
    assert!(leases
        .iter()
        .all(|&l| registry_etcd::session_of_lease(l) == session));
    let nodes = reg.children(&p("/spread")).await.unwrap().nodes;
    assert!(nodes.iter().all(|n| n.ephemeral_owner == Some(session)));

    // delete_owned matches any lease of the owner's session, and no other session.
    let extra = reg
        .create(&p("/spread/extra"), Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap();
    let mut foreign = extra.clone();
    foreign.ephemeral_owner = Some(registry_etcd::session_of_lease(leases[0] + (1 << 28)));
    assert!(!reg.delete_owned(&foreign).await.unwrap());
    assert!(reg.delete_owned(&extra).await.unwrap());

    // Losing one lease (not the first) loses the session: every key goes, every registration
    // comes back under a new session, and no lease of the old one is left.
    let mut states = reg.session_events();
    raw.lease_revoke(leases[3]).await.unwrap();
    let lost_within = Duration::from_secs(5);
    let lost = tokio::time::timeout(lost_within, async {
        while let Some(status) = states.next().await {
            if status.state == SessionState::Reestablished {
                return status.session_id;
            }
        }
        None
    })
    .await
    .unwrap_or_else(|_| panic!("no new session within {lost_within:?}"));
    let new = lost.unwrap();
    assert_ne!(new, session);
    assert_revoked(&mut raw, &leases, "of the lost session").await;
    eventually("all registrations back", Duration::from_secs(10), || {
        registrations.iter().all(|r| {
            matches!(r.status(), RegistrationStatus::Registered(n) if n.ephemeral_owner == Some(new))
        })
    })
    .await;
    let (keys, leases) = keys_and_leases_under(&mut raw, "/spread/").await;
    assert_eq!(keys, 7);
    // 4 as a rule; a re-create given up in flight can still land on a lease counted free.
    assert!(leases.len() >= 3, "{leases:x?}");
    assert!(leases
        .iter()
        .all(|&l| registry_etcd::session_of_lease(l) == new));

    // Closing revokes every lease of the session.
    reg.close().await.unwrap();
    assert_revoked(&mut raw, &leases, "after close").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_registrations_come_back_after_the_lease_is_lost() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let ep = server.endpoint();
    // The default TTL: with 2 cores busy re-creating 10k keys, a 2 s lease can starve.
    let with_default_ttl = |ep: &str| EtcdOptions::new([ep.to_owned()]);
    let reg: Arc<dyn Registry> =
        Arc::new(EtcdRegistry::connect(with_default_ttl(&ep)).await.unwrap());
    let reader: Arc<dyn Registry> =
        Arc::new(EtcdRegistry::connect(with_default_ttl(&ep)).await.unwrap());
    const N: usize = 10_000;
    let mut registrations = Vec::with_capacity(N);
    let started = Instant::now();
    let mut batch = futures::stream::iter(0..N)
        .map(|i| {
            let reg = reg.clone();
            async move {
                // Under load a first attempt may time out; like an application, retry that.
                let path = p(&format!("/many/{i:05}"));
                let mut attempt = 0;
                loop {
                    match reg
                        .register(&path, Bytes::from("1"), RegisterOptions::new())
                        .await
                    {
                        Err(e) if e.is_retryable() && attempt < 5 => attempt += 1,
                        other => return other,
                    }
                }
            }
        })
        .buffer_unordered(64);
    while let Some(r) = batch.next().await {
        registrations.push(r.unwrap());
    }
    drop(batch);
    eprintln!("registered {N} in {:?}", started.elapsed());
    let old = reg.session().session_id.unwrap();
    let mut raw = etcd_client::Client::connect([ep.clone()], None)
        .await
        .unwrap();
    let revoked_at = Instant::now();
    // Deleting 10k keys can outlast the server's own request timeout while it still applies:
    // ask again until the lease is gone.
    for attempt in 0..10 {
        match raw.lease_revoke(old.0).await {
            Ok(_) => break,
            Err(e) if e.to_string().contains("lease not found") => break,
            Err(e) if attempt == 9 => panic!("revoke: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    let deadline = Duration::from_secs(60);
    loop {
        let new = reg.session().session_id;
        let back = registrations
            .iter()
            .filter(|r| matches!(r.status(), RegistrationStatus::Registered(n) if n.ephemeral_owner == new && new != Some(old)))
            .count();
        if back == N {
            break;
        }
        if revoked_at.elapsed() >= deadline {
            let stuck: Vec<_> = registrations
                .iter()
                .filter(|r| !matches!(r.status(), RegistrationStatus::Registered(n) if n.ephemeral_owner == new))
                .take(5)
                .map(|r| format!("{} {:?}", r.requested_path(), r.status()))
                .collect();
            panic!(
                "{back}/{N} registrations back after {deadline:?}; session {:?}; stuck: {stuck:#?}",
                reg.session()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{N} registrations back {:?} after the lease was revoked",
        revoked_at.elapsed()
    );
    let listed = reader.children(&p("/many")).await.unwrap();
    assert_eq!(listed.nodes.len(), N);
    assert!(listed
        .nodes
        .iter()
        .all(|n| n.ephemeral_owner == reg.session().session_id));
    assert_eq!(reg.session().state, SessionState::Reestablished);
    reg.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_cancels_its_server_side_watch() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let reg = connect(&server.endpoint()).await;
    let before = server.watcher_total().unwrap();
    let streams = watch_nodes(&reg, "/w", 5).await;
    let counted = conformance_tests::harness::wait_until(Duration::from_secs(10), || {
        server.watcher_total() == Some(before + 5)
    });
    assert!(
        counted,
        "server holds {:?} watchers, expected {}",
        server.watcher_total(),
        before + 5
    );
    drop(streams);
    let released = conformance_tests::harness::wait_until(Duration::from_secs(10), || {
        server.watcher_total() == Some(before)
    });
    assert!(
        released,
        "server still holds {:?} watchers after drop",
        server.watcher_total()
    );
    reg.close().await.unwrap();
}

/// Watches and registrations of one client share one gRPC watch stream: a watch costs a
/// create request on it, not a stream of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_of_a_client_share_one_grpc_stream() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let reg = connect(&server.endpoint()).await;
    let streams_before = server.watch_stream_total().unwrap();
    let watchers_before = server.watcher_total().unwrap();
    let mut streams = watch_nodes(&reg, "/s", 20).await;
    let registrations = register_all(&reg, (0..20).map(|i| format!("/s/r/{i}")), "x").await;
    // The 20 registrations share their parent's children watch.
    let counted = conformance_tests::harness::wait_until(Duration::from_secs(10), || {
        server.watcher_total() == Some(watchers_before + 21)
    });
    assert!(
        counted,
        "server holds {:?} watchers, expected {}",
        server.watcher_total(),
        watchers_before + 21
    );
    assert_eq!(
        server.watch_stream_total(),
        Some(streams_before + 1),
        "21 watches of one client should share one gRPC stream"
    );
    // Events still reach each watch on the shared stream.
    reg.create(&p("/s/7"), Bytes::from("v"), CreateMode::Persistent)
        .await
        .unwrap();
    match next_event(&mut streams[7], "create").await {
        WatchEvent::Created(n) => assert_eq!(n.path.as_str(), "/s/7"),
        other => panic!("expected the create of /s/7, got {other:?}"),
    }
    drop(streams);
    for r in registrations {
        r.deregister().await.unwrap();
    }
    let released = conformance_tests::harness::wait_until(Duration::from_secs(10), || {
        server.watcher_total() == Some(watchers_before)
    });
    assert!(
        released,
        "server still holds {:?} watchers",
        server.watcher_total()
    );
    reg.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_member_does_not_fail_reads_while_others_live() {
    let mut cluster = EtcdCluster::start(3).unwrap_or_else(|e| panic!("{e}"));
    let options = EtcdOptions::new(cluster.endpoints()).with_session_ttl(Duration::from_secs(3));
    let reg: Arc<dyn Registry> = Arc::new(EtcdRegistry::connect(options).await.unwrap());
    reg.create(&p("/d/x"), Bytes::from("1"), CreateMode::Persistent)
        .await
        .unwrap();
    let victim = cluster.leader().map(|l| (l + 1) % 3).unwrap_or(0);
    cluster.kill(victim).unwrap();
    for i in 0..30 {
        let node = reg
            .get(&p("/d/x"))
            .await
            .unwrap_or_else(|e| panic!("read {i} failed with a member down: {e}"));
        assert_eq!(node.value, "1");
        reg.set(&p("/d/x"), Bytes::from("1"), Expected::Any)
            .await
            .unwrap_or_else(|e| panic!("write {i} failed with a member down: {e}"));
    }
    reg.close().await.unwrap();
}

/// A member cut off from its cluster still answers its clients, but has no leader: a watch
/// left on it would see no more changes, and its reads and writes would wait out their
/// timeout. The watch moves to a member that hears its leader and misses nothing, reads and
/// writes keep succeeding, and the session's registration stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cut_off_from_its_cluster_loses_no_watch_event_and_fails_no_request() {
    let cluster = EtcdCluster::start_partitionable(3).unwrap_or_else(|e| panic!("{e}"));
    let options = EtcdOptions::new(cluster.endpoints()).with_session_ttl(Duration::from_secs(3));
    let reg: Arc<dyn Registry> = Arc::new(EtcdRegistry::connect(options).await.unwrap());
    reg.create(&p("/cut"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    let registration = reg
        .register(
            &p("/cut/live"),
            Bytes::from("r"),
            RegisterOptions::default(),
        )
        .await
        .unwrap();
    let mut watch = reg
        .watch(&p("/cut"), WatchOptions::subtree())
        .await
        .unwrap();
    let mut state = WatchedState::new();
    apply_until(
        &mut watch,
        &mut state,
        Duration::from_secs(10),
        "snapshot",
        |s| s.get(&p("/cut/live")).is_some(),
    )
    .await;
    // The member whose watch streams the client's watches share.
    let mut holder = None;
    let found = conformance_tests::harness::wait_until(Duration::from_secs(10), || {
        holder = (0..3).find(|&i| cluster.watch_streams_on(i).is_some_and(|n| n > 0));
        holder.is_some()
    });
    assert!(found, "no member holds the watch stream");
    // One stream, which every watch of the client shares: the cut takes all of them.
    assert_eq!(
        cluster.watch_stream_total(),
        Some(1),
        "the client's watch streams"
    );
    let holder = holder.unwrap_or_default();
    cluster.cut_off(holder).unwrap();
    // The holder may have led: until the others elect a leader, nothing can be written.
    let led = conformance_tests::harness::wait_until(Duration::from_secs(15), || {
        (0..3).any(|i| i != holder && cluster.is_leader(i))
    });
    assert!(led, "the majority elected no leader");
    let majority: Vec<String> = (0..3)
        .filter(|&i| i != holder)
        .map(|i| cluster.client_addr(i).unwrap().to_string())
        .collect();
    let writer = EtcdRegistry::connect(EtcdOptions::new(majority))
        .await
        .unwrap();
    let cut_at = Instant::now();
    // Written by another client: only a watch on the majority's side sees it.
    writer
        .create(&p("/cut/after"), Bytes::from("w"), CreateMode::Persistent)
        .await
        .unwrap();
    apply_until(
        &mut watch,
        &mut state,
        Duration::from_secs(15),
        "the write made on the majority's side",
        |s| s.get(&p("/cut/after")).is_some(),
    )
    .await;
    eprintln!(
        "the watch saw the write {:?} after the cut",
        cut_at.elapsed()
    );
    for i in 0..20 {
        let value = Bytes::from(format!("v{i}"));
        reg.set(&p("/cut/after"), value.clone(), Expected::Any)
            .await
            .unwrap_or_else(|e| panic!("write {i} failed during the partition: {e}"));
        let node = reg
            .get(&p("/cut/after"))
            .await
            .unwrap_or_else(|e| panic!("read {i} failed during the partition: {e}"));
        assert_eq!(node.value, value);
    }
    // Two TTLs into the partition: the session kept its lease or made a new one.
    let two_ttls = Duration::from_secs(6).saturating_sub(cut_at.elapsed());
    tokio::time::sleep(two_ttls).await;
    let held = conformance_tests::harness::wait_until(Duration::from_secs(10), || {
        etcdctl(
            &cluster.client_addr((holder + 1) % 3).unwrap().to_string(),
            &["get", "--prefix", "/", "--keys-only"],
        )
        .contains("/cut/live")
    });
    assert!(held, "the registration is gone from the majority's side");
    cluster.heal();
    drop(registration);
    writer.close().await.unwrap();
    reg.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_single_leader_under_server_pause() {
    let mut server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let ep = server.endpoint();
    let mut candidates = Vec::new();
    for _ in 0..3 {
        candidates.push(connect(&ep).await);
    }
    let outage = async {
        server.pause().unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        server.resume().unwrap();
    };
    // TTL 2 s: a new leader must appear within TTL + the reconnect, with margin.
    let took = conformance_tests::support::election_survives_outage(
        candidates,
        outage,
        Duration::from_secs(15),
    )
    .await;
    eprintln!("new leader {took:?} after the server resumed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_node_fails_alone_in_a_batch_of_creates() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let reg = connect(&server.endpoint()).await;
    reg.create(&p("/batch"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    // Every tenth node exists already; 200 creates at once share Txns.
    for i in (0..200).step_by(10) {
        reg.create(
            &p(&format!("/batch/n{i}")),
            Bytes::new(),
            CreateMode::Persistent,
        )
        .await
        .unwrap();
    }
    let results = futures::future::join_all((0..200).map(|i| {
        let reg = reg.clone();
        async move {
            let path = p(&format!("/batch/n{i}"));
            (
                i,
                reg.create(&path, Bytes::from("e"), CreateMode::Ephemeral)
                    .await,
            )
        }
    }))
    .await;
    for (i, result) in results {
        match result {
            Err(Error::AlreadyExists { path }) if i % 10 == 0 => {
                assert_eq!(path, p(&format!("/batch/n{i}")))
            }
            Ok(node) if i % 10 != 0 => assert!(node.is_ephemeral(), "n{i}: {node:?}"),
            other => panic!("n{i}: {other:?}"),
        }
    }
    let children = reg.children(&p("/batch")).await.unwrap().nodes;
    assert_eq!(children.len(), 200);
    assert_eq!(children.iter().filter(|n| n.is_ephemeral()).count(), 180);
    reg.close().await.unwrap();
}

/// A deep create racing with "delete the top recursively, then create it ephemeral" never
/// leaves a key under the ephemeral top: the create puts a missing ancestor only while the
/// ancestors above it are still the persistent keys it read. (Creates compare only their
/// parent, so a key left under an ephemeral node would let later creates under it succeed
/// and `delete_owned` of the top leave it behind.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_a_deep_create_leaves_nothing_under_an_ephemeral_node() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let ep = server.endpoint();
    let (a, b) = (connect(&ep).await, connect(&ep).await);
    let mut raced = 0;
    for round in 0..4 {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..32u64 {
            let (a, b) = (a.clone(), b.clone());
            let top = p(&format!("/race/r{round}n{i}"));
            tasks.spawn(async move {
                a.create(&top, Bytes::new(), CreateMode::Persistent)
                    .await
                    .unwrap();
                let deep = top.join("b").unwrap().join("c").unwrap();
                let creator = {
                    let a = a.clone();
                    tokio::spawn(async move {
                        a.create(&deep, Bytes::new(), CreateMode::Persistent).await
                    })
                };
                // Jitter, not synchronisation: spreads where the delete lands in the create.
                tokio::time::sleep(Duration::from_micros((i * 97) % 1500)).await;
                let _ = b.delete(&top, Expected::Any, DeleteScope::Recursive).await;
                let _ = b.create(&top, Bytes::new(), CreateMode::Ephemeral).await;
                let _ = creator.await;
                let now = b.get(&top).await.ok();
                let ephemeral = now.as_ref().is_some_and(|n| n.is_ephemeral());
                let below = b.exists(&top.join("b").unwrap()).await.unwrap();
                if ephemeral {
                    assert!(!below, "{top} is ephemeral with a node below it");
                    let under = a
                        .create(&top.join("x").unwrap(), Bytes::new(), CreateMode::Ephemeral)
                        .await;
                    assert!(
                        matches!(under, Err(Error::EphemeralParent { .. })),
                        "create under ephemeral {top}: {under:?}"
                    );
                }
                ephemeral
            });
        }
        while let Some(done) = tasks.join_next().await {
            raced += usize::from(done.unwrap());
        }
    }
    // The race must have been run, not dodged: most tops end ephemeral.
    assert!(raced > 0, "no top ended ephemeral: the race never ran");
}

/// The next item of `stream`, within 10 s; `None` once it ended.
async fn next_item(
    stream: &mut WatchStream,
    what: &str,
) -> Option<registry_core::Result<WatchEvent>> {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap_or_else(|_| panic!("nothing within 10 s while waiting for {what}"))
}

/// A client without credentials on a server with auth on is told so, typed: reads fail with
/// `AuthFailed` (they were a non-retryable `Backend` error), and a watch yields it and ends
/// (it retried its first read for good, yielding nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_credentials_are_an_auth_error_and_end_a_watch() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let ep = server.endpoint();
    user_under_auth(&ep, "unused", []).await;
    // etcd 3.4 grants leases without a user: the connect itself succeeds.
    let anonymous = connect(&ep).await;
    let read = anonymous.get(&p("/a")).await;
    assert!(matches!(read, Err(Error::AuthFailed(_))), "{read:?}");
    let mut stream = anonymous
        .watch(&p("/a"), WatchOptions::children())
        .await
        .unwrap();
    match next_item(&mut stream, "the read's error").await {
        Some(Err(Error::AuthFailed(_))) => {}
        other => panic!("expected AuthFailed, got {other:?}"),
    }
    assert!(next_item(&mut stream, "the end").await.is_none());
    let _ = anonymous.close().await;
}

/// With auth on, a watch the user may not make is refused for good: the stream yields the
/// error and ends, instead of retrying silently forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_the_user_may_not_make_yields_the_error_and_ends() {
    use etcd_client::Permission;
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let ep = server.endpoint();
    // `reader` may read /granted and everything under /granted/, nothing else.
    let options = user_under_auth(
        &ep,
        "reader",
        [
            Permission::read("/granted"),
            Permission::read("/granted/").with_prefix(),
        ],
    )
    .await;
    let reader = EtcdRegistry::connect(options)
        .await
        .unwrap_or_else(|e| panic!("connect as reader: {e}"));

    // The first read is refused.
    let secret = p("/secret");
    let mut stream = reader
        .watch(&secret, WatchOptions::children())
        .await
        .unwrap();
    match next_item(&mut stream, "the read's error").await {
        Some(Err(Error::PermissionDenied { path })) => assert_eq!(path, secret),
        other => panic!("expected PermissionDenied at {secret}, got {other:?}"),
    }
    assert!(next_item(&mut stream, "the end").await.is_none());

    // The read is allowed, the watch is not: a subtree watch of /granted covers the range
    // ["/granted", "/granted0"), which also holds keys such as "/granted-x".
    let granted = p("/granted");
    let mut stream = reader
        .watch(&granted, WatchOptions::subtree())
        .await
        .unwrap();
    assert!(matches!(
        next_item(&mut stream, "the snapshot").await,
        Some(Ok(WatchEvent::Snapshot(_)))
    ));
    match next_item(&mut stream, "the watch's error").await {
        Some(Err(Error::PermissionDenied { path })) => assert_eq!(path, granted),
        other => panic!("expected PermissionDenied at {granted}, got {other:?}"),
    }
    assert!(next_item(&mut stream, "the end").await.is_none());
    reader.close().await.unwrap();
}

/// A first read that fails (retryably) and is retried still ends in a `Snapshot` first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_first_read_still_yields_a_snapshot_first() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let proxy = TcpProxy::start(server.addr()).unwrap();
    let watcher = connect(&proxy.addr().to_string()).await;
    proxy.cut();
    let mut stream = watcher
        .watch(&p("/s"), WatchOptions::children())
        .await
        .unwrap();
    // Long enough for the first read to fail and be retried.
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.forward();
    let first = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .unwrap_or_else(|_| panic!("no first item within 30 s"));
    assert!(
        matches!(first, Some(Ok(WatchEvent::Snapshot(_)))),
        "the first item must be a Snapshot, got {first:?}"
    );
    watcher.close().await.unwrap();
}

/// A close that cannot reach the server still releases the client, and says the session's
/// ephemeral nodes were not deleted (they go when the leases expire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_that_cannot_revoke_says_so_and_the_nodes_expire() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let proxy = TcpProxy::start(server.addr()).unwrap();
    let observer = connect(&server.endpoint()).await;
    let options = EtcdOptions::new([proxy.addr().to_string()])
        .with_session_ttl(Duration::from_secs(2))
        .with_request_timeout(Duration::from_millis(500));
    let owner = EtcdRegistry::connect(options).await.unwrap();
    // The lease expires within its TTL (2 s) plus etcd's checking, with margin.
    close_while_unreachable(&owner, &proxy, &*observer, Duration::from_secs(8)).await;
    observer.close().await.unwrap();
}

/// Ephemeral creates of large values at once (as when registrations with big values come
/// back after a lost lease) each succeed: a coalesced Txn stays within etcd's request limit
/// (1.5 MiB by default), where eight of them in one Txn were refused as a whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_large_values_stay_within_the_request_limit() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let reg = connect(&server.endpoint()).await;
    reg.create(&p("/large"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    let value = Bytes::from(vec![b'v'; 400 * 1024]);
    let results = futures::future::join_all((0..12).map(|i| {
        let (reg, value) = (reg.clone(), value.clone());
        async move {
            let path = p(&format!("/large/n{i}"));
            (i, reg.create(&path, value, CreateMode::Ephemeral).await)
        }
    }))
    .await;
    for (i, result) in results {
        match result {
            Ok(node) => assert!(node.is_ephemeral(), "n{i}: {node:?}"),
            Err(e) => panic!("create of n{i} (400 KiB) failed: {e}"),
        }
    }
    reg.close().await.unwrap();
}

/// A parent whose children hold more than 4 MiB together (12 values of 400 KiB) can be
/// listed and watched: responses that large used to fail `children` for good (tonic's 4 MiB
/// default), and a watch retried its first read silently forever.
/// One revision can hold more events than a stream buffers (here a recursive delete): a
/// consumer that keeps reading gets each of them, not a `Resync` (`Lagged`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_larger_than_the_buffer_is_delivered_to_a_reading_consumer() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let ep = server.endpoint();
    let reg = connect(&ep).await;
    let mut raw = etcd_client::Client::connect([ep.as_str()], None)
        .await
        .unwrap();
    let n = registry_etcd::watch::WATCH_BUFFER + 904;
    raw.put("/big", "", None).await.unwrap();
    for first in (0..n).step_by(100) {
        let puts: Vec<etcd_client::TxnOp> = (first..n.min(first + 100))
            .map(|i| etcd_client::TxnOp::put(format!("/big/n{i}"), "", None))
            .collect();
        raw.txn(etcd_client::Txn::new().and_then(puts))
            .await
            .unwrap();
    }
    let mut stream = reg
        .watch(&p("/big"), WatchOptions::children())
        .await
        .unwrap();
    next_event(&mut stream, "snapshot").await;
    reg.delete(&p("/big"), Expected::Any, DeleteScope::Recursive)
        .await
        .unwrap();
    let mut deleted = std::collections::BTreeSet::new();
    while deleted.len() < n {
        match next_event(&mut stream, "the children deleted").await {
            WatchEvent::Deleted(node) => {
                deleted.insert(node.path);
            }
            other => panic!("after {} of {n} children: {other:?}", deleted.len()),
        }
    }
    reg.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_and_watches_of_more_than_four_mib_are_read() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let ep = server.endpoint();
    let reg = connect(&ep).await;
    let parent = p("/wide");
    let value = Bytes::from(vec![b'w'; 400 * 1024]);
    for i in 0..12 {
        reg.create(
            &parent.join(&format!("n{i:02}")).unwrap(),
            value.clone(),
            CreateMode::Persistent,
        )
        .await
        .unwrap();
    }
    let listed = reg
        .children(&parent)
        .await
        .unwrap_or_else(|e| panic!("children of 12 x 400 KiB: {e}"));
    assert_eq!(listed.nodes.len(), 12);
    let mut stream = reg.watch(&parent, WatchOptions::children()).await.unwrap();
    match next_item(&mut stream, "the snapshot").await {
        Some(Ok(WatchEvent::Snapshot(s))) => assert_eq!(s.nodes.len(), 12),
        other => panic!("expected a snapshot of 12 nodes, got {other:?}"),
    }
    // A watch resumed after these writes gets them in one catch-up response (> 4 MiB).
    let resumed = reg
        .watch(
            &parent,
            WatchOptions::children().after(registry_core::Revision(1)),
        )
        .await
        .unwrap();
    let mut state = WatchedState::new();
    let mut resumed = resumed;
    let mut created = 0;
    while created < 12 {
        match next_item(&mut resumed, "the replayed creates").await {
            Some(Ok(event)) => {
                created += usize::from(matches!(event, WatchEvent::Created(_)));
                state.apply(&event);
            }
            other => panic!("replaying 12 creates: {other:?}"),
        }
    }
    assert_eq!(state.len(), 12);
    reg.close().await.unwrap();
}

/// With auth on, ephemeral creates at once under a path the user may write and one it may
/// not: each gets its own outcome. A coalesced Txn refused as a whole used to turn every
/// create in it, the permitted ones too, into a retryable `Unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_gives_each_create_its_own_outcome() {
    use etcd_client::Permission;
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let ep = server.endpoint();
    let mut plain = etcd_client::Client::connect([ep.clone()], None)
        .await
        .unwrap();
    plain.put("/ok", "", None).await.unwrap();
    plain.put("/no", "", None).await.unwrap();
    // `writer` may read everything and write only under /ok/.
    let options = user_under_auth(
        &ep,
        "writer",
        [
            Permission::read("/").with_prefix(),
            Permission::read_write("/ok/").with_prefix(),
        ],
    )
    .await;
    let writer: Arc<dyn Registry> = Arc::new(
        EtcdRegistry::connect(options)
            .await
            .unwrap_or_else(|e| panic!("connect as writer: {e}")),
    );
    let results = futures::future::join_all((0..32).map(|i| {
        let writer = writer.clone();
        let dir = if i % 2 == 0 { "ok" } else { "no" };
        async move {
            let path = p(&format!("/{dir}/n{i}"));
            let result = writer
                .create(&path, Bytes::new(), CreateMode::Ephemeral)
                .await;
            (path, result)
        }
    }))
    .await;
    for (path, result) in results {
        if path.as_str().starts_with("/ok/") {
            assert!(result.is_ok(), "{path}: {result:?}");
        } else {
            match result {
                Err(Error::PermissionDenied { path: denied }) => assert_eq!(denied, path),
                other => panic!("{path}: expected PermissionDenied, got {other:?}"),
            }
        }
    }
    writer.close().await.unwrap();
}

/// A session revoked while its client was cut off is reported `Lost` (then `Reestablished`)
/// as soon as the client is back and the server says the lease is gone, not only once a
/// whole TTL has passed without a keep-alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_revoked_while_cut_off_is_lost_at_reconnect() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let proxy = TcpProxy::start(server.addr()).unwrap();
    let ttl = Duration::from_secs(20);
    let options = EtcdOptions::new([proxy.addr().to_string()]).with_session_ttl(ttl);
    let reg: Arc<dyn Registry> = Arc::new(EtcdRegistry::connect(options).await.unwrap());
    let session = reg.session().session_id.unwrap();
    let mut states = reg.session_events();
    proxy.cut();
    next_state_is(&mut states, SessionState::Suspended)
        .await
        .unwrap_or_else(|_| panic!("no Suspended within 5 s of the cut"));
    // Suspended is not over: an ephemeral create says the server is out of reach, not that
    // the session ended.
    let refused = reg
        .create(&p("/suspended"), Bytes::new(), CreateMode::Ephemeral)
        .await;
    assert!(
        matches!(refused, Err(Error::Unavailable { .. })),
        "{refused:?}"
    );
    let raw = etcd_client::Client::connect([server.endpoint()], None)
        .await
        .unwrap();
    let revoked = registry_etcd::revoke_session(&raw, session, Duration::from_secs(3))
        .await
        .unwrap();
    assert!(revoked > 0, "no lease of {session:?} to revoke");
    proxy.forward();
    // Far under the 20 s TTL: the keep-alive reopened at reconnect hears the lease is gone.
    next_state_is(&mut states, SessionState::Lost)
        .await
        .unwrap_or_else(|_| panic!("no Lost within 5 s of the reconnect (TTL {ttl:?})"));
    let back = next_state_is(&mut states, SessionState::Reestablished)
        .await
        .unwrap_or_else(|_| panic!("no Reestablished within 5 s of Lost"));
    assert_ne!(back.session_id, Some(session));
    reg.close().await.unwrap();
}

/// The next session status in `want` state, within 5 s (`Err` if none came).
async fn next_state_is(
    states: &mut futures::stream::BoxStream<'static, registry_core::SessionStatus>,
    want: SessionState,
) -> Result<registry_core::SessionStatus, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(status) = states.next().await {
            if status.state == want {
                return status;
            }
        }
        panic!("session events ended before {want:?}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_gives_a_parent_without_a_key_its_value() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let ep = server.endpoint();
    let target = connect(&ep).await;
    // Written by another tool: `/svc/a` has a key, its parent `/svc` has none (a copy
    // creates that key).
    etcdctl(&ep, &["put", "/svc/a", "route"]);
    assert_eq!(target.get(&p("/svc")).await.unwrap().value, Bytes::new());
    let store = registry_core::MemoryStore::new();
    let source = registry_core::MemoryRegistry::connect(&store, Default::default())
        .await
        .unwrap();
    source
        .create(
            &p("/svc"),
            Bytes::from("parent value"),
            CreateMode::Persistent,
        )
        .await
        .unwrap();
    source
        .create(&p("/svc/a"), Bytes::from("route"), CreateMode::Persistent)
        .await
        .unwrap();

    let summary =
        registry_core::migrate::copy(&source, &*target, &p("/svc"), Default::default(), |_, _| {})
            .await
            .unwrap_or_else(|e| panic!("copy onto a parent without a key: {e}"));
    assert_eq!((summary.created, summary.unchanged), (1, 1), "{summary:?}");
    assert_eq!(
        target.get(&p("/svc")).await.unwrap().value,
        Bytes::from("parent value")
    );
    let left = registry_core::migrate::diff(&source, &*target, &p("/svc"))
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");

    // An empty source value reads like the keyless parent, which is still not the node:
    // diff calls it missing, and copy creates its key.
    etcdctl(&ep, &["put", "/bare/a", "route"]);
    for (path, value) in [("/bare", ""), ("/bare/a", "route")] {
        source
            .create(&p(path), Bytes::from(value), CreateMode::Persistent)
            .await
            .unwrap();
    }
    let before = registry_core::migrate::diff(&source, &*target, &p("/bare"))
        .await
        .unwrap();
    assert_eq!(
        before,
        [registry_core::migrate::Difference {
            kind: registry_core::migrate::DifferenceKind::Missing,
            path: p("/bare"),
        }]
    );
    let summary = registry_core::migrate::copy(
        &source,
        &*target,
        &p("/bare"),
        Default::default(),
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!((summary.created, summary.unchanged), (1, 1), "{summary:?}");
    assert_ne!(target.get(&p("/bare")).await.unwrap().create_order, 0);
    let left = registry_core::migrate::diff(&source, &*target, &p("/bare"))
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
}

/// Every key: what the users of the auth-token tests may read and write (sequence counters
/// live outside "/").
fn all_keys() -> etcd_client::Permission {
    etcd_client::Permission::read_write(vec![0u8]).with_from_key()
}

/// Writes `path`, retrying only what the contract calls retryable (a connection still being
/// re-made after a restart), 50 times at most.
async fn create_retrying(reg: &Arc<dyn Registry>, path: &NodePath, value: &str) {
    let mut attempts = 0;
    while let Err(e) = reg
        .create(path, Bytes::from(value.to_owned()), CreateMode::Persistent)
        .await
    {
        attempts += 1;
        assert!(
            e.is_retryable() && attempts < 50,
            "create {path} (attempt {attempts}): {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// etcd's simple auth token expires after `--auth-token-ttl` without use. A client with
/// credentials logs in again and retries: reads, writes, watches opened before and after,
/// and registrations keep working past the token's TTL (twice, so a renewed token expiring
/// is renewed too), never reporting `AuthFailed` or `PermissionDenied`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_auth_token_is_renewed_not_reported() {
    use etcd_client::ConnectOptions;
    const TOKEN_TTL: Duration = Duration::from_secs(2);
    // etcd drops expired tokens on a 1 s tick: this is past the TTL whatever the phase.
    const PAST_TOKEN_TTL: Duration = Duration::from_secs(TOKEN_TTL.as_secs() + 2);
    let ttl_arg = TOKEN_TTL.as_secs().to_string();
    let server = EtcdServer::start_with_args(&["--auth-token-ttl", ttl_arg.as_str()])
        .unwrap_or_else(|e| panic!("{e}"));
    let ep = server.endpoint();
    let options = user_under_auth(&ep, "app", [all_keys()]).await;
    let (user, password) = options.credentials.clone().unwrap();
    let reg: Arc<dyn Registry> = Arc::new(
        EtcdRegistry::connect(options)
            .await
            .unwrap_or_else(|e| panic!("connect as app: {e}")),
    );
    // Logged in the same way but never renewing: shows the server did expire the token.
    let mut plain = etcd_client::Client::connect(
        [ep.as_str()],
        Some(ConnectOptions::new().with_user(user, password)),
    )
    .await
    .unwrap();

    let t = p("/t");
    let a = p("/t/a");
    reg.create(&a, Bytes::from("1"), CreateMode::Persistent)
        .await
        .unwrap();
    let mut early = reg.watch(&t, WatchOptions::children()).await.unwrap();
    let mut early_state = WatchedState::new();
    early_state.apply(&next_event(&mut early, "early snapshot").await);

    for round in 0..2 {
        // Time is the property: nothing this client does refreshes its token meanwhile.
        tokio::time::sleep(PAST_TOKEN_TTL).await;
        match plain.get("/t", None).await {
            Err(e) if e.to_string().contains("invalid auth token") => {}
            other => panic!("round {round}: the idle token should have expired: {other:?}"),
        }

        let value = format!("v{round}");
        let got = reg
            .get(&a)
            .await
            .unwrap_or_else(|e| panic!("round {round}: get after the token TTL: {e}"));
        assert_eq!(got.version, u64::try_from(round).unwrap(), "round {round}");
        reg.set(&a, Bytes::from(value.clone()), Expected::Any)
            .await
            .unwrap_or_else(|e| panic!("round {round}: set after the token TTL: {e}"));
        let b = t.join(&format!("b{round}")).unwrap();
        reg.create(&b, Bytes::new(), CreateMode::Persistent)
            .await
            .unwrap_or_else(|e| panic!("round {round}: create after the token TTL: {e}"));

        // A watch opened now: its create is sent on the stream opened with the old token.
        let mut late = reg.watch(&t, WatchOptions::children()).await.unwrap();
        let mut late_state = WatchedState::new();
        late_state.apply(&next_event(&mut late, "late snapshot").await);
        assert!(
            late_state.get(&b).is_some(),
            "round {round}: late snapshot lacks {b}"
        );
        let c = t.join(&format!("c{round}")).unwrap();
        reg.create(&c, Bytes::new(), CreateMode::Persistent)
            .await
            .unwrap_or_else(|e| panic!("round {round}: create: {e}"));
        apply_until(
            &mut late,
            &mut late_state,
            Duration::from_secs(10),
            "late watch",
            |s| s.get(&c).is_some(),
        )
        .await;

        // A registration made now is created, and healed (through its own watch) when its
        // node is deleted.
        let svc = t.join(&format!("svc{round}")).unwrap();
        let registration = reg
            .register(&svc, Bytes::from("x"), RegisterOptions::new())
            .await
            .unwrap_or_else(|e| panic!("round {round}: register after the token TTL: {e}"));
        let first = registration
            .wait_registered(Duration::from_secs(10))
            .await
            .unwrap();
        reg.delete(&svc, Expected::Any, DeleteScope::Node)
            .await
            .unwrap();
        let mut status = registration.watch_status();
        tokio::time::timeout(
            Duration::from_secs(10),
            status.wait_for(|s| {
                matches!(s, RegistrationStatus::Registered(n) if n.create_order > first.create_order)
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("round {round}: registration not re-created: {:?}", registration.status()))
        .unwrap();

        // The watch opened before the TTL sees all of it.
        apply_until(
            &mut early,
            &mut early_state,
            Duration::from_secs(10),
            "early watch",
            |s| {
                s.get(&a).is_some_and(|n| n.value == value.as_bytes())
                    && s.get(&c).is_some()
                    && s.get(&svc).is_some()
            },
        )
        .await;
        drop(late);
        drop(registration);
    }
    reg.close().await.unwrap();
}

/// etcd forgets every simple token when it restarts. A client with credentials logs in
/// again: writes succeed, and a watch open across the restart goes on (resumed or resynced)
/// and delivers every write made after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_auth_on_keeps_writes_and_watches_working() {
    let mut server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let ep = server.endpoint();
    let options = user_under_auth(&ep, "app", [all_keys()]).await;
    let (user, password) = options.credentials.clone().unwrap();
    let reg: Arc<dyn Registry> = Arc::new(
        EtcdRegistry::connect(options)
            .await
            .unwrap_or_else(|e| panic!("connect as app: {e}")),
    );
    // Logged in the same way but never renewing: shows the restart forgot the token.
    let login = |user: String, password: String| {
        etcd_client::Client::connect(
            [ep.clone()],
            Some(etcd_client::ConnectOptions::new().with_user(user, password)),
        )
    };
    let mut plain = login(user, password).await.unwrap();
    let mut admin = login("root".into(), "root-pw".into()).await.unwrap();
    let root = p("/r");
    reg.create(&root, Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    let mut stream = reg.watch(&root, WatchOptions::subtree()).await.unwrap();
    let mut state = WatchedState::new();
    state.apply(&next_event(&mut stream, "snapshot").await);
    for i in 0..5 {
        create_retrying(&reg, &root.join(&format!("a{i}")).unwrap(), "a").await;
    }
    apply_until(
        &mut stream,
        &mut state,
        Duration::from_secs(10),
        "before restart",
        |s| s.nodes().count() == 6,
    )
    .await;
    // etcd re-creates the tokens of the logins it replays from its log at startup: those
    // after the last write its backend committed. A forced commit (a hash does one) after
    // the writes above puts every login behind that point, as etcd's 100 ms commit interval
    // does in production.
    admin.hash().await.unwrap();

    server.kill().unwrap();
    server.restart().unwrap_or_else(|e| panic!("{e}"));
    match plain.get("/r", None).await {
        Err(e) if e.to_string().contains("invalid auth token") => {}
        other => panic!("the restart should have forgotten the token: {other:?}"),
    }

    for i in 0..5 {
        create_retrying(&reg, &root.join(&format!("b{i}")).unwrap(), "b").await;
    }
    let expected = summary(
        read_scope(&reg, &root, WatchScope::Subtree)
            .await
            .unwrap()
            .iter(),
    );
    assert_eq!(expected.len(), 11, "{expected:?}");
    apply_until(
        &mut stream,
        &mut state,
        Duration::from_secs(30),
        "after restart",
        |s| summary(s.nodes()) == expected,
    )
    .await;
    reg.close().await.unwrap();
}

/// Huge timeouts are allowed (they mean "no deadline"): with a request timeout of
/// `Duration::MAX`, requests and watches work as with any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_request_timeout_means_no_deadline() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let options = EtcdOptions::new([server.endpoint()])
        .with_session_ttl(Duration::from_secs(2))
        .with_request_timeout(Duration::MAX);
    let reg: Arc<dyn Registry> = Arc::new(
        EtcdRegistry::connect(options)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}")),
    );
    let root = p("/huge");
    reg.create(&root, Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    let mut stream = reg.watch(&root, WatchOptions::children()).await.unwrap();
    let mut state = WatchedState::new();
    state.apply(&next_event(&mut stream, "snapshot").await);
    let child = p("/huge/a");
    reg.create(&child, Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap();
    apply_until(
        &mut stream,
        &mut state,
        Duration::from_secs(10),
        "watch",
        |s| s.get(&child).is_some(),
    )
    .await;
    reg.close().await.unwrap();
}

/// With one endpoint and nowhere to move on to, a session whose keep-alives go unanswered
/// still reports `Suspended` well before the server can expire its leases (TTL after the
/// last keep-alive it got), so a master or lock holder steps down before another takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_session_is_suspended_before_its_leases_can_expire() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let proxy = TcpProxy::start(server.addr()).unwrap();
    let ttl = Duration::from_secs(2);
    let reg = connect(&proxy.addr().to_string()).await;
    let mut states = reg.session_events();
    assert!(next_state_is(&mut states, SessionState::Connected)
        .await
        .is_ok());
    // Steady state first: the keep-alive stream open and answered for a while (nothing
    // signals it; a cut while it opens is noticed by the open's own timeout instead).
    tokio::time::sleep(ttl).await;
    let cut_at = Instant::now();
    proxy.blackhole();
    let suspended = next_state_is(&mut states, SessionState::Suspended).await;
    let after = cut_at.elapsed();
    assert!(suspended.is_ok(), "never suspended");
    // Two thirds of the TTL after the last answer (which came before the cut), with margin;
    // never as late as the TTL.
    assert!(
        after < ttl * 9 / 10,
        "suspended {after:?} after the cut; the leases may expire {ttl:?} after it"
    );
    proxy.forward();
    assert!(
        next_state_is(&mut states, SessionState::Connected)
            .await
            .is_ok(),
        "not connected again after the cut ended"
    );
}

/// With credentials every connection logs in first, so trying the members in turn fails for
/// as long as none is reachable. A session cut off from all its endpoints past the TTL is
/// still reported lost within the TTL and a bit (its leases have expired on the server), not
/// only once a member answers again: cut off right after it opened (before its keeper's
/// first connection), and again while it is being kept alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cut_off_from_every_member_is_lost_within_the_ttl_with_credentials() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let ep = server.endpoint();
    let options = user_under_auth(
        &ep,
        "cut",
        [etcd_client::Permission::read_write("/").with_prefix()],
    )
    .await;
    let (user, password) = options.credentials.clone().unwrap();
    let proxies = [
        TcpProxy::start(server.addr()).unwrap(),
        TcpProxy::start(server.addr()).unwrap(),
    ];
    let ttl = Duration::from_secs(2);
    let options = EtcdOptions::new(proxies.iter().map(|p| p.addr().to_string()))
        .with_credentials(user, password)
        .with_session_ttl(ttl);
    let reg = EtcdRegistry::connect(options).await.unwrap();
    let mut events = reg.session_events();
    for round in ["right after connecting", "while kept alive"] {
        proxies.iter().for_each(TcpProxy::cut);
        // The TTL, then the vouching request's deadline (3 s by default) and a margin.
        let bound = ttl + Duration::from_secs(4);
        assert!(
            session_reaches(&mut events, SessionState::Lost, bound).await,
            "cut off {round}: not lost within {bound:?}"
        );
        proxies.iter().for_each(TcpProxy::forward);
        assert!(
            session_reaches(
                &mut events,
                SessionState::Reestablished,
                Duration::from_secs(15)
            )
            .await,
            "cut off {round}: no new session once reachable again"
        );
    }
    reg.close().await.unwrap();
}

/// A session lost while cut off, whose leases someone else kept granted meanwhile (as a new
/// leader renews every lease by its TTL), has them revoked once the cluster answers again,
/// before `Reestablished`: its ephemeral nodes are gone when the new session is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_sessions_leases_still_granted_are_revoked_before_reestablished() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let proxy = TcpProxy::start(server.addr()).unwrap();
    let reg = connect(&proxy.addr().to_string()).await;
    let mut raw = etcd_client::Client::connect([server.endpoint()], None)
        .await
        .unwrap();
    reg.create(&p("/kept/a"), Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap();
    let session = reg.session().session_id.unwrap();
    let leases = leases_of_session(&mut raw, session).await;
    assert!(!leases.is_empty());
    // Renews the session's leases from outside, directly, until aborted (bounded: 30 s).
    let mut renewing = raw.clone();
    let kept = leases.clone();
    let renewer = tokio::spawn(async move {
        let mut keepers = Vec::new();
        for &lease in &kept {
            keepers.push(renewing.lease_keep_alive(lease).await.unwrap());
        }
        for _ in 0..300 {
            for (keeper, answers) in &mut keepers {
                keeper.keep_alive().await.unwrap();
                answers.message().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut events = reg.session_events();
    proxy.cut();
    // Lost once the TTL is up and the server cannot vouch for the session; the revokes fail.
    let bound = Duration::from_secs(2) + Duration::from_secs(4);
    assert!(
        session_reaches(&mut events, SessionState::Lost, bound).await,
        "not lost within {bound:?}"
    );
    // Still cut for a second: the revokes that follow `Lost` fail meanwhile (5 tries, 0.2 s
    // of backoff); nothing signals them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.forward();
    assert!(
        session_reaches(
            &mut events,
            SessionState::Reestablished,
            Duration::from_secs(15)
        )
        .await,
        "no new session once reachable again"
    );
    let renewed_throughout = !renewer.is_finished();
    renewer.abort();
    assert!(renewed_throughout, "the outside renewals stopped early");
    assert!(
        raw.get("/kept/a", None).await.unwrap().kvs().is_empty(),
        "the lost session's ephemeral node outlived Reestablished"
    );
    assert_revoked(&mut raw, &leases, "of the lost session").await;
    reg.close().await.unwrap();
}

/// A key put over a registration's node (by a raw client, with its own lease) reaches no
/// registration watch, which asks for deletions only; the next value write finds the node not
/// ours and has the healer replace it with ours, carrying the new value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_put_over_a_registration_is_replaced_at_its_next_value_write() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let ep = server.endpoint();
    let reg = connect(&ep).await;
    let mut raw = etcd_client::Client::connect([ep.clone()], None)
        .await
        .unwrap();
    let session = reg.session().session_id;
    reg.create(&p("/ov"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    let registration = reg
        .register(&p("/ov/a"), Bytes::from("1"), RegisterOptions::new())
        .await
        .unwrap();
    let theirs = raw.lease_grant(60, None).await.unwrap().id();
    raw.put(
        "/ov/a",
        "theirs",
        Some(etcd_client::PutOptions::new().with_lease(theirs)),
    )
    .await
    .unwrap();
    registration.set_value(Bytes::from("2")).await.unwrap();
    let node = registration
        .wait_registered(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("not registered again within 10 s: {e}"));
    assert_eq!(
        (node.value, node.ephemeral_owner),
        (Bytes::from("2"), session),
        "the node after the value write"
    );
    let stored = reg.get(&p("/ov/a")).await.unwrap();
    assert_eq!(
        (stored.value, stored.ephemeral_owner),
        (Bytes::from("2"), session)
    );
    registration.deregister().await.unwrap();
    reg.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_no_path_can_name_are_listed_as_skipped_and_stop_a_copy() {
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let ep = server.endpoint();
    let reg = connect(&ep).await;
    // What other tools may write: an empty segment, a trailing slash, one deeper down.
    etcdctl(&ep, &["put", "/svc/ok", "1"]);
    etcdctl(&ep, &["put", "/svc//x", "2"]);
    etcdctl(&ep, &["put", "/svc/a/", "3"]);
    etcdctl(&ep, &["put", "/svc/b//deep", "4"]);

    let listed = reg.children(&p("/svc")).await.unwrap();
    let mut names: Vec<&str> = listed.nodes.iter().map(|n| n.path.name()).collect();
    names.sort();
    // `a` and `b` exist as the parents of keys below them, as for any key.
    assert_eq!(names, ["a", "b", "ok"]);
    let persistent = |name: &str| registry_core::SkippedChild {
        name: name.to_owned(),
        ephemeral: false,
    };
    assert_eq!(listed.skipped, [persistent("")]);
    for parent in ["/svc/a", "/svc/b"] {
        let listed = reg.children(&p(parent)).await.unwrap();
        assert!(listed.nodes.is_empty(), "{parent}: {:?}", listed.nodes);
        assert_eq!(listed.skipped, [persistent("")], "{parent}");
    }
    // An unnamable key under a lease is ephemeral: a copy leaves it out, as any ephemeral.
    let long = "l".repeat(registry_core::MAX_PATH_LEN);
    let lease_line = etcdctl(&ep, &["lease", "grant", "60"]);
    let lease = lease_line
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("lease grant said {lease_line:?}"));
    etcdctl(&ep, &["put", "/eph/ok", "1"]);
    etcdctl(
        &ep,
        &["put", "--lease", lease, &format!("/eph/{long}"), "2"],
    );
    conformance_tests::support::assert_copy_passes_unnamable_ephemeral(&*reg, "/eph", long, 2)
        .await;

    for root in ["/svc", "/svc/b"] {
        conformance_tests::support::assert_copy_refuses_unnamable(&*reg, root).await;
    }
    reg.close().await.unwrap();
}

/// Everything a test's log says, as text.
#[derive(Clone, Default)]
struct Log(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// One thread: every task of the client logs through this thread's subscriber.
#[tokio::test(flavor = "current_thread")]
async fn close_ends_the_create_batcher_while_handles_live_on() {
    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_env_filter("registry_etcd=debug")
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let reg = connect(&server.endpoint()).await;
    // A handle that outlives the close, as a registration or a clone would.
    let kept = reg.clone();
    reg.close().await.unwrap();
    let ended = |log: &Log| {
        String::from_utf8_lossy(&log.0.lock().unwrap())
            .lines()
            .any(|l| l.contains("etcd_create_batcher") && l.contains("close"))
    };
    let closed_within = tokio::time::timeout(Duration::from_secs(5), async {
        while !ended(&log) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(closed_within.is_ok(), "the batcher still runs after close");
    drop(kept);
}
