//! ZooKeeper digest auth and ACLs on a real server: registrations others can read but not
//! remove, unreadable nodes that fail fast with a permission error, and auth that survives
//! reconnects and new sessions.

use std::sync::Arc;
use std::time::Duration;

use conformance_tests::harness::{TcpProxy, ZkConfig, ZkServer};
use conformance_tests::support::session_reaches;
use futures::StreamExt;
use registry_core::{
    Bytes, CreateMode, DeleteScope, Error, Expected, NodePath, RegisterOptions, Registry,
    SessionState, WatchOptions,
};
use registry_zk::{ZkAcl, ZkOptions, ZkRegistry};

const SESSION: Duration = Duration::from_secs(2);

fn p(s: &str) -> NodePath {
    NodePath::new(s).unwrap_or_else(|e| panic!("{e}"))
}

fn server() -> ZkServer {
    ZkServer::start(ZkConfig {
        tick_time: Duration::from_millis(200),
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

async fn client(addr: String, identity: Option<&str>) -> ZkRegistry {
    let mut options = ZkOptions::new([addr]).with_session_ttl(SESSION);
    if let Some(identity) = identity {
        options = options.with_auth("digest", identity.as_bytes().to_vec());
    }
    ZkRegistry::connect(options)
        .await
        .unwrap_or_else(|e| panic!("connect as {identity:?}: {e}"))
}

/// A raw client with no identity, as an operator's tool sets nodes and ACLs up.
async fn admin(zk: &ZkServer) -> zookeeper_client::Client {
    zookeeper_client::Client::connector()
        .with_session_timeout(Duration::from_secs(4))
        .connect(&zk.connect_string())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn open_persistent() -> zookeeper_client::CreateOptions<'static> {
    zookeeper_client::CreateMode::Persistent.with_acls(zookeeper_client::Acls::anyone_all())
}

fn denied<T: std::fmt::Debug>(what: &str, result: registry_core::Result<T>, path: &NodePath) {
    assert!(
        matches!(&result, Err(Error::PermissionDenied { path: at }) if at == path),
        "{what}: expected PermissionDenied at {path}, got {result:?}"
    );
}

/// A provider of the service: its identity, service nodes only that identity may change.
async fn goods_provider(addr: String) -> ZkRegistry {
    let options = ZkOptions::new([addr])
        .with_session_ttl(SESSION)
        .with_auth("digest", b"goods:goods-pw".to_vec())
        .with_persistent_acl(ZkAcl::CreatorWritesAnyoneReads);
    ZkRegistry::connect(options)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_identities_can_read_a_registration_but_not_remove_or_change_it() {
    let zk = server();
    let alice = goods_provider(zk.connect_string()).await;
    alice
        .create(
            &p("/soa/runtime/services/com.today.Goods"),
            Bytes::new(),
            CreateMode::Persistent,
        )
        .await
        .unwrap_or_else(|e| panic!("service node: {e}"));
    let bob = client(zk.connect_string(), Some("bob:bob-pw")).await;
    let anonymous = client(zk.connect_string(), None).await;
    let path = p("/soa/runtime/services/com.today.Goods/10.0.0.1:9090:1.0.0");
    let registration = alice
        .register(&path, Bytes::from("alice"), RegisterOptions::new())
        .await
        .unwrap_or_else(|e| panic!("register: {e}"));
    // Discovery works for everyone.
    assert_eq!(
        bob.get(&path).await.map(|n| n.value).ok(),
        Some(Bytes::from("alice"))
    );
    assert_eq!(
        anonymous
            .children(&p("/soa/runtime/services/com.today.Goods"))
            .await
            .map(|c| c.nodes.len())
            .ok(),
        Some(1)
    );
    // Nobody else can remove or change it.
    denied(
        "bob deletes",
        bob.delete(&path, Expected::Any, DeleteScope::Node).await,
        &path,
    );
    denied(
        "bob writes",
        bob.set(&path, Bytes::from("bob"), Expected::Any).await,
        &path,
    );
    denied(
        "anonymous deletes",
        anonymous
            .delete(&path, Expected::Any, DeleteScope::Node)
            .await,
        &path,
    );
    // Another identity cannot register under this service either.
    let intruder = p("/soa/runtime/services/com.today.Goods/10.6.6.6:9090:1.0.0");
    denied(
        "bob registers under the service",
        bob.create(&intruder, Bytes::new(), CreateMode::Ephemeral)
            .await,
        &intruder,
    );
    // A second provider of the same service (same identity) registers and leaves freely.
    let second = goods_provider(zk.connect_string()).await;
    let neighbour = p("/soa/runtime/services/com.today.Goods/10.0.0.2:9090:1.0.0");
    let theirs = second
        .register(&neighbour, Bytes::from("second"), RegisterOptions::new())
        .await
        .unwrap_or_else(|e| panic!("second provider registers: {e}"));
    theirs.deregister().await.unwrap_or_else(|e| panic!("{e}"));
    registration
        .deregister()
        .await
        .unwrap_or_else(|e| panic!("alice deregisters: {e}"));
    assert!(!bob.exists(&path).await.unwrap_or(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_node_is_a_permission_error_not_a_hang() {
    let zk = server();
    let options = ZkOptions::new([zk.connect_string()])
        .with_session_ttl(SESSION)
        .with_auth("digest", b"ops:ops-pw".to_vec())
        .with_persistent_acl(ZkAcl::CreatorOnly);
    let ops = ZkRegistry::connect(options)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let secret = p("/soa/config/freq/com.today.Goods");
    ops.create(&secret, Bytes::from("limit/100"), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("create: {e}"));
    assert_eq!(
        ops.get(&secret).await.map(|n| n.value).ok(),
        Some(Bytes::from("limit/100"))
    );
    let bob = client(zk.connect_string(), Some("bob:bob-pw")).await;
    let bounded = Duration::from_secs(5);
    let read = tokio::time::timeout(bounded, bob.get(&secret))
        .await
        .unwrap_or_else(|_| panic!("a read of an unreadable node hung past {bounded:?}"));
    denied("bob reads", read, &secret);
    let watched = tokio::time::timeout(bounded, async {
        match bob.watch(&secret, WatchOptions::node()).await {
            Err(e) => Err(e),
            Ok(mut stream) => match stream.next().await {
                Some(Err(e)) => Err(e),
                other => Ok(format!("{other:?}")),
            },
        }
    })
    .await
    .unwrap_or_else(|_| panic!("a watch of an unreadable node hung past {bounded:?}"));
    denied("bob watches", watched, &secret);
    // Creator ACLs without an identity are refused before any I/O.
    let refused = ZkRegistry::connect(
        ZkOptions::new([zk.connect_string()]).with_persistent_acl(ZkAcl::CreatorOnly),
    )
    .await;
    assert!(
        matches!(refused, Err(Error::InvalidArgument(_))),
        "{:?}",
        refused.err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_is_sent_again_after_a_reconnect_and_on_a_new_session() {
    let zk = server();
    let proxy = TcpProxy::start(zk.addr()).unwrap_or_else(|e| panic!("{e}"));
    let options = ZkOptions::new([proxy.addr().to_string()])
        .with_session_ttl(SESSION)
        .with_auth("digest", b"alice:alice-pw".to_vec())
        .with_persistent_acl(ZkAcl::CreatorOnly);
    let alice = Arc::new(
        ZkRegistry::connect(options)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let mine = p("/private/alice");
    alice
        .create(&mine, Bytes::from("only alice"), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The service node: only alice's identity may add or remove instances under it.
    alice
        .create(&p("/svc"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let instance = p("/svc/alice-1");
    let registration = alice
        .register(&instance, Bytes::new(), RegisterOptions::new())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let first = alice.session().session_id;

    // A short cut: same session, a new connection, which must authenticate again.
    proxy.cut();
    tokio::time::sleep(SESSION / 4).await;
    proxy.forward();
    let read = read_within(&alice, &mine).await;
    assert_eq!(read, Bytes::from("only alice"), "after a reconnect");
    assert_eq!(
        alice.session().session_id,
        first,
        "a short cut must keep the session"
    );

    // A partition past the timeout: the server expires the session; the new one authenticates.
    let mut events = alice.session_events();
    proxy.blackhole();
    tokio::time::sleep(SESSION * 2).await;
    proxy.forward();
    assert!(
        session_reaches(
            &mut events,
            SessionState::Reestablished,
            Duration::from_secs(20)
        )
        .await,
        "no new session after expiry"
    );
    assert_ne!(alice.session().session_id, first);
    assert_eq!(
        read_within(&alice, &mine).await,
        Bytes::from("only alice"),
        "on a new session"
    );
    // The registration came back with its ACL: still not removable by another identity.
    registration
        .wait_registered(Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("registration not back: {e}"));
    let bob = client(zk.connect_string(), Some("bob:bob-pw")).await;
    denied(
        "bob deletes the re-created registration",
        bob.delete(&instance, Expected::Any, DeleteScope::Node)
            .await,
        &instance,
    );
}

/// Reads `path`, retrying while the connection settles (at most 10 s).
async fn read_within(reg: &ZkRegistry, path: &NodePath) -> Bytes {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match reg.get(path).await {
            Ok(node) => return node.value,
            Err(Error::PermissionDenied { .. }) => {
                panic!("{path}: permission denied: auth was not sent again")
            }
            Err(e) if tokio::time::Instant::now() >= deadline => panic!("{path}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_digest_md5_identities_and_acls() {
    let zk = ZkServer::start_with_sasl(
        ZkConfig {
            tick_time: Duration::from_millis(200),
        },
        &[("alice", "alice-pw"), ("bob", "bob-pw")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let sasl = |user: &str, password: &str| {
        ZkOptions::new([zk.connect_string()])
            .with_session_ttl(SESSION)
            .with_connect_timeout(Duration::from_secs(5))
            .with_sasl_digest_md5(user, password)
    };
    let alice =
        ZkRegistry::connect(sasl("alice", "alice-pw").with_persistent_acl(ZkAcl::CreatorOnly))
            .await
            .unwrap_or_else(|e| panic!("alice over SASL: {e}"));
    let secret = p("/sasl/alice-only");
    alice
        .create(&secret, Bytes::from("a"), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("alice creates: {e}"));
    assert_eq!(
        alice.get(&secret).await.map(|n| n.value).ok(),
        Some(Bytes::from("a"))
    );
    let bob = ZkRegistry::connect(sasl("bob", "bob-pw"))
        .await
        .unwrap_or_else(|e| panic!("bob over SASL: {e}"));
    denied("bob reads alice's node", bob.get(&secret).await, &secret);
    // A wrong password is refused, promptly and as an authentication failure.
    let wrong = tokio::time::timeout(
        Duration::from_secs(20),
        ZkRegistry::connect(sasl("alice", "wrong")),
    )
    .await
    .unwrap_or_else(|_| panic!("a wrong SASL password hung the connect"));
    assert!(
        matches!(wrong, Err(Error::AuthFailed(_))),
        "expected AuthFailed, got {:?}",
        wrong.err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_chroot_serves_a_client_that_may_not_create_at_the_root() {
    let zk = server();
    let admin = admin(&zk).await;
    let open = open_persistent();
    for path in ["/team", "/team/soa"] {
        admin
            .create(path, b"", &open)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    // A locked-down ensemble: nobody but its operators creates at `/`, nor under `/team`.
    for path in ["/", "/team"] {
        admin
            .set_acl(path, &zookeeper_client::Acls::anyone_read(), None)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    let options = ZkOptions::new([zk.connect_string()])
        .with_session_ttl(SESSION)
        .with_namespace(p("/team/soa"));
    let reg = ZkRegistry::connect(options)
        .await
        .unwrap_or_else(|e| panic!("connect under an existing chroot: {e}"));
    reg.create(&p("/config"), Bytes::from("v"), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("write under the chroot: {e}"));
    assert_eq!(
        admin
            .get_data("/team/soa/config")
            .await
            .map(|(v, _)| v)
            .ok(),
        Some(b"v".to_vec())
    );
    // A chroot that is missing still needs the right to create it, and says so.
    let options = ZkOptions::new([zk.connect_string()])
        .with_session_ttl(SESSION)
        .with_namespace(p("/team/other"));
    match ZkRegistry::connect(options).await.map(|_| ()) {
        Err(Error::PermissionDenied { path }) => assert_eq!(path, p("/team/other")),
        other => panic!("expected PermissionDenied on /team/other, got {other:?}"),
    }
    reg.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_parents_are_created_below_an_ancestor_the_client_may_not_create_under() {
    let zk = server();
    let admin = admin(&zk).await;
    let open = open_persistent();
    for path in ["/locked", "/locked/open"] {
        admin
            .create(path, b"", &open)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    // Nobody creates directly under /locked any more; /locked/open stays open.
    admin
        .set_acl("/locked", &zookeeper_client::Acls::anyone_read(), None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let reg = client(zk.connect_string(), None).await;
    reg.create(
        &p("/locked/open/a/b"),
        Bytes::from("v"),
        CreateMode::Persistent,
    )
    .await
    .unwrap_or_else(|e| panic!("create below an open node: {e}"));
    let registration = reg
        .register(
            &p("/locked/open/svc/10.0.0.1:9090"),
            Bytes::new(),
            RegisterOptions::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("register below an open node: {e}"));
    // Where the client may not create, it is told so, naming the node.
    match reg
        .create(&p("/locked/x/y"), Bytes::new(), CreateMode::Persistent)
        .await
    {
        Err(Error::PermissionDenied { path }) => assert_eq!(path, p("/locked/x")),
        other => panic!("expected PermissionDenied on /locked/x, got {other:?}"),
    }
    registration.deregister().await.unwrap();
    reg.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recursive_delete_removes_nodes_it_may_delete_but_not_read() {
    let zk = server();
    let operator = client(zk.connect_string(), None).await;
    operator
        .create(&p("/svc"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Alice's registrations are hers alone, even to read; /svc lets anyone delete in it.
    let alice = ZkRegistry::connect(
        ZkOptions::new([zk.connect_string()])
            .with_session_ttl(SESSION)
            .with_auth("digest", b"alice:alice-pw".to_vec())
            .with_ephemeral_acl(ZkAcl::CreatorOnly),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    for name in ["a", "b"] {
        alice
            .create(
                &p(&format!("/svc/{name}")),
                Bytes::new(),
                CreateMode::Ephemeral,
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    operator
        .delete(&p("/svc"), Expected::Any, DeleteScope::Recursive)
        .await
        .unwrap_or_else(|e| panic!("recursive delete over unreadable nodes: {e}"));
    assert!(!operator.exists(&p("/svc")).await.unwrap());

    // One that hides children of its own cannot be deleted: the error names it, at once.
    let hidden = ZkRegistry::connect(
        ZkOptions::new([zk.connect_string()])
            .with_session_ttl(SESSION)
            .with_auth("digest", b"alice:alice-pw".to_vec())
            .with_persistent_acl(ZkAcl::CreatorOnly),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    operator
        .create(&p("/svc2"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for path in ["/svc2/a", "/svc2/a/b"] {
        hidden
            .create(&p(path), Bytes::new(), CreateMode::Persistent)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    // Unreadable leaves around it are no reason to refuse: the one hiding children is named.
    for path in ["/svc2/0", "/svc2/z"] {
        alice
            .create(&p(path), Bytes::new(), CreateMode::Ephemeral)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    match operator
        .delete(&p("/svc2"), Expected::Any, DeleteScope::Recursive)
        .await
    {
        Err(Error::PermissionDenied { path }) => assert_eq!(path, p("/svc2/a")),
        other => panic!("expected PermissionDenied on /svc2/a, got {other:?}"),
    }
    hidden.close().await.unwrap();
    alice.close().await.unwrap();
    operator.close().await.unwrap();
}
