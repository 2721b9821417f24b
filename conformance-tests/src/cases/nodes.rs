//! Cases on single nodes: values, paths, typed errors, versions, parents.

use std::time::Duration;

use registry_core::{
    Bytes, CreateMode, DeleteScope, Error, Expected, InvalidPath, Node, NodePath, RegisterOptions,
    Revision, WatchEvent, WatchOptions, MAX_VALUE_LEN,
};

use crate::fixture::Fixture;
use crate::support::{next_event, p, CaseEnv, Outcome};

/// Values of every shape come back byte for byte: empty, with NUL, non-UTF-8, exactly the
/// size limit; one byte over the limit is refused before anything is written.
pub async fn values_round_trip(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "values_round_trip");
    let c = env.client().await;
    let at = env.at();
    let max = Bytes::from(vec![0xA5u8; MAX_VALUE_LEN]);
    let values = [
        ("empty", Bytes::new()),
        ("nul", Bytes::from_static(b"a\0b\0")),
        ("binary", Bytes::from_static(&[0xff, 0xfe, 0x00, 0x80])),
        ("utf8", Bytes::from("weight/600;timeout/800ms ✓")),
        ("max", max.clone()),
    ];
    for (name, value) in &values {
        let path = p(&format!("/v/{name}"));
        let created = c.create(&path, value.clone(), CreateMode::Persistent).await;
        let created = created.unwrap_or_else(|e| panic!("{at} create {name}: {e}"));
        assert_eq!(
            &created.value, value,
            "{at} create returned another value for {name}"
        );
        let read = c
            .get(&path)
            .await
            .unwrap_or_else(|e| panic!("{at} get {name}: {e}"));
        assert_eq!(&read.value, value, "{at} value {name} did not round-trip");
        let set = c.set(&path, value.clone(), Expected::Any).await;
        assert_eq!(
            set.map(|n| n.value).ok().as_ref(),
            Some(value),
            "{at} set {name}"
        );
    }
    let over = Bytes::from(vec![1u8; MAX_VALUE_LEN + 1]);
    let too_big = c
        .create(&p("/v/over"), over.clone(), CreateMode::Persistent)
        .await;
    assert!(
        matches!(too_big, Err(Error::ValueTooLarge { len, max, .. }) if len == MAX_VALUE_LEN + 1 && max == MAX_VALUE_LEN),
        "{at} oversized create: {too_big:?}"
    );
    assert!(
        !c.exists(&p("/v/over")).await.unwrap_or(true),
        "{at} oversized create wrote a node"
    );
    let too_big = c.set(&p("/v/empty"), over, Expected::Any).await;
    assert!(
        matches!(too_big, Err(Error::ValueTooLarge { .. })),
        "{at} oversized set: {too_big:?}"
    );
    assert_eq!(
        c.get(&p("/v/empty")).await.map(|n| n.value.len()).ok(),
        Some(0),
        "{at} oversized set wrote"
    );
    env.finish().await
}

/// Every path rule rejects with its own reason, and joins cannot build an invalid path.
pub async fn paths_rejected(fx: &dyn Fixture) -> Outcome {
    let env = CaseEnv::new(fx, "paths_rejected");
    let at = env.at();
    type ReasonCheck = fn(&InvalidPath) -> bool;
    let cases: &[(&str, ReasonCheck)] = &[
        ("", |r| *r == InvalidPath::Empty),
        ("a/b", |r| *r == InvalidPath::NotAbsolute),
        ("/a/", |r| *r == InvalidPath::TrailingSlash),
        ("/a//b", |r| {
            matches!(r, InvalidPath::EmptySegment { index: 1 })
        }),
        ("/a/./b", |r| {
            matches!(r, InvalidPath::RelativeSegment { .. })
        }),
        ("/a/..", |r| {
            matches!(r, InvalidPath::RelativeSegment { .. })
        }),
        ("/a\0b", |r| {
            matches!(
                r,
                InvalidPath::ForbiddenCharacter {
                    character: '\0',
                    ..
                }
            )
        }),
        ("/a\tb", |r| {
            matches!(r, InvalidPath::ForbiddenCharacter { .. })
        }),
        ("/a\u{7f}", |r| {
            matches!(r, InvalidPath::ForbiddenCharacter { .. })
        }),
        ("/a\u{e000}", |r| {
            matches!(r, InvalidPath::ForbiddenCharacter { .. })
        }),
        ("/a\u{fff5}", |r| {
            matches!(r, InvalidPath::ForbiddenCharacter { .. })
        }),
        ("/zookeeper", |r| *r == InvalidPath::Reserved),
    ];
    for (raw, expected) in cases {
        match NodePath::new(raw) {
            Err(Error::InvalidPath { reason, .. }) => {
                assert!(
                    expected(&reason),
                    "{at} {raw:?} rejected for the wrong reason: {reason:?}"
                )
            }
            other => panic!("{at} {raw:?} should be rejected, got {other:?}"),
        }
    }
    let long = format!("/{}", "a".repeat(registry_core::MAX_PATH_LEN));
    assert!(
        matches!(
            NodePath::new(&long),
            Err(Error::InvalidPath {
                reason: InvalidPath::TooLong { .. },
                ..
            })
        ),
        "{at} long path"
    );
    let deep = "/d".repeat(registry_core::MAX_DEPTH + 1);
    assert!(
        matches!(
            NodePath::new(&deep),
            Err(Error::InvalidPath {
                reason: InvalidPath::TooDeep { .. },
                ..
            })
        ),
        "{at} deep path"
    );
    assert!(
        p("/a").join("b/c").is_err() && p("/a").join("..").is_err(),
        "{at} join accepted a bad name"
    );
    env.finish().await
}

/// Each failure has its own variant: exists, not found, version mismatch, not empty,
/// ephemeral parent, and writes to the root are refused.
pub async fn errors_are_typed(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "errors_are_typed");
    let c = env.client().await;
    let at = env.at();
    let a = p("/e/a");
    c.create(&a, Bytes::from("x"), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create: {e}"));
    let r = c.create(&a, Bytes::new(), CreateMode::Persistent).await;
    assert!(
        matches!(r, Err(Error::AlreadyExists { ref path }) if *path == a),
        "{at} create twice: {r:?}"
    );
    // Every error names the node it concerns.
    let missing = p("/e/missing");
    let not_found = |r: Result<(), Error>, call: &str| {
        assert!(
            matches!(&r, Err(Error::NotFound { path }) if *path == missing),
            "{at} {call} missing: {r:?}"
        );
    };
    not_found(c.get(&missing).await.map(drop), "get");
    assert!(
        !c.exists(&missing).await.unwrap_or(true),
        "{at} exists missing"
    );
    not_found(
        c.set(&missing, Bytes::new(), Expected::Any).await.map(drop),
        "set",
    );
    for scope in [DeleteScope::Node, DeleteScope::Recursive] {
        not_found(
            c.delete(&missing, Expected::Any, scope).await,
            &format!("delete ({scope:?})"),
        );
    }
    not_found(c.children(&missing).await.map(drop), "children");
    let r = c.set(&a, Bytes::from("y"), Expected::Version(7)).await;
    assert!(
        matches!(
            r,
            Err(Error::VersionMismatch {
                expected: 7,
                actual: 0,
                ..
            })
        ),
        "{at} CAS with wrong version: {r:?}"
    );
    // A version no backend can hold is a mismatch like any other, not a wrap-around.
    let r = c
        .set(&a, Bytes::from("y"), Expected::Version(u64::MAX))
        .await;
    assert!(
        matches!(
            &r,
            Err(Error::VersionMismatch { path, expected: u64::MAX, actual: 0 }) if *path == a
        ),
        "{at} CAS with the largest version: {r:?}"
    );
    let unchanged = c.get(&a).await.unwrap_or_else(|e| panic!("{at} get: {e}"));
    assert_eq!(
        (unchanged.value.clone(), unchanged.version),
        (Bytes::from("x"), 0),
        "{at} a failed CAS wrote"
    );
    c.create(&p("/e/a/child"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create child: {e}"));
    for scope in [DeleteScope::Node, DeleteScope::Recursive] {
        let r = c.delete(&a, Expected::Version(3), scope).await;
        assert!(
            matches!(
                &r,
                Err(Error::VersionMismatch { path, expected: 3, actual: 0 }) if *path == a
            ),
            "{at} delete ({scope:?}) with wrong version: {r:?}"
        );
        assert!(
            c.exists(&p("/e/a/child")).await.unwrap_or(false),
            "{at} a failed delete ({scope:?}) removed a child"
        );
    }
    let r = c.delete(&a, Expected::Any, DeleteScope::Node).await;
    assert!(
        matches!(&r, Err(Error::NotEmpty { path }) if *path == a),
        "{at} delete non-empty: {r:?}"
    );
    assert_eq!(
        c.get(&a).await.ok(),
        Some(unchanged),
        "{at} a failed delete changed its node"
    );
    assert!(
        c.exists(&p("/e/a/child")).await.unwrap_or(false),
        "{at} failed delete removed a child"
    );
    let eph = p("/e/eph");
    c.create(&eph, Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap_or_else(|e| panic!("{at} create ephemeral: {e}"));
    for mode in [
        CreateMode::Persistent,
        CreateMode::Ephemeral,
        CreateMode::PersistentSequential,
        CreateMode::EphemeralSequential,
    ] {
        let r = c.create(&p("/e/eph/kid"), Bytes::new(), mode).await;
        assert!(
            matches!(r, Err(Error::EphemeralParent { ref parent, .. }) if *parent == eph),
            "{at} child of ephemeral ({mode:?}): {r:?}"
        );
    }
    let r = c
        .create(
            &p("/e/eph/kid/grandkid"),
            Bytes::new(),
            CreateMode::Persistent,
        )
        .await;
    assert!(
        matches!(r, Err(Error::EphemeralParent { .. })),
        "{at} grandchild of ephemeral: {r:?}"
    );
    let kids = c
        .children(&eph)
        .await
        .unwrap_or_else(|e| panic!("{at} children of the ephemeral: {e}"));
    assert!(
        kids.nodes.is_empty(),
        "{at} children of an ephemeral were created: {:?}",
        kids.nodes
    );
    // The root always exists and is no one's: every backend refuses to create, write,
    // delete or register it with the same typed error, and an oversized value as too large.
    // Input errors come before anything else: a closed client gives them too.
    let root = NodePath::root();
    let closed = fx
        .open(&env.namespace)
        .await
        .unwrap_or_else(|e| panic!("{at} open: {e}"));
    let _ = closed.close().await;
    let oversized = Bytes::from(vec![0u8; MAX_VALUE_LEN + 1]);
    for (client, which) in [(&c, "open"), (&closed, "closed")] {
        let refused = |r: Result<(), Error>, operation: &str| {
            let expected = Error::root(operation).to_string();
            assert!(
                matches!(&r, Err(e @ Error::InvalidArgument(_)) if e.to_string() == expected),
                "{at} {operation} the root ({which} client): {r:?}"
            );
        };
        refused(
            client
                .create(&root, Bytes::new(), CreateMode::Persistent)
                .await
                .map(drop),
            "create",
        );
        refused(
            client
                .set(&root, Bytes::from("x"), Expected::Any)
                .await
                .map(drop),
            "write",
        );
        for owner in [None, client.session().session_id] {
            let node = Node::empty(root.clone(), owner);
            refused(
                client.set_owned(&node, Bytes::from("x")).await.map(drop),
                "write",
            );
            refused(client.delete_owned(&node).await.map(drop), "delete");
        }
        for scope in [DeleteScope::Node, DeleteScope::Recursive] {
            refused(client.delete(&root, Expected::Any, scope).await, "delete");
        }
        refused(
            client
                .register(&root, Bytes::new(), RegisterOptions::default())
                .await
                .map(drop),
            "register",
        );
        let too_large = client
            .register(&p("/e/big"), oversized.clone(), RegisterOptions::default())
            .await
            .map(drop);
        assert!(
            matches!(too_large, Err(Error::ValueTooLarge { .. })),
            "{at} register an oversized value ({which} client): {too_large:?}"
        );
        // A revision never reached: such a watch would wait for good.
        let past = Revision(Revision::MAX_WATCH_AFTER.0 + 1);
        let far = client
            .watch(&p("/e"), WatchOptions::node().after(past))
            .await
            .map(drop);
        assert!(
            matches!(far, Err(Error::InvalidArgument(_))),
            "{at} watch after {past:?} ({which} client): {far:?}"
        );
    }
    assert!(
        c.exists(&root).await.unwrap_or(false),
        "{at} the root must exist"
    );
    env.finish().await
}

/// Versions start at 0 and count writes; a compare-and-set with the right version succeeds;
/// a write returns the node exactly as a read then returns it; a recursive delete removes the
/// whole subtree.
pub async fn versions_count_writes(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "versions_count_writes");
    let c = env.client().await;
    let at = env.at();
    let path = p("/ver/n");
    let created = c
        .create(&path, Bytes::from("0"), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create: {e}"));
    assert_eq!(created.version, 0, "{at} version at create");
    // Whatever the mode, create returns the node exactly as a read then returns it, owned by
    // the session for ephemeral modes and by no one otherwise.
    let session = crate::support::session_of(&c);
    for (mode, name) in [
        (CreateMode::Persistent, "/ver/modes/p"),
        (CreateMode::Ephemeral, "/ver/modes/e"),
        (CreateMode::PersistentSequential, "/ver/modes/ps-"),
        (CreateMode::EphemeralSequential, "/ver/modes/es-"),
    ] {
        let made = c
            .create(&p(name), Bytes::from("m"), mode)
            .await
            .unwrap_or_else(|e| panic!("{at} create {mode:?}: {e}"));
        assert_eq!(
            (made.version, made.ephemeral_owner),
            (0, mode.is_ephemeral().then_some(session)),
            "{at} node created {mode:?}"
        );
        assert_eq!(
            c.get(&made.path).await.ok(),
            Some(made.clone()),
            "{at} a read differs from the node create ({mode:?}) returned"
        );
    }
    assert_eq!(
        c.get(&path).await.ok(),
        Some(created.clone()),
        "{at} a read differs from the node create returned"
    );
    for i in 1..=3u64 {
        let n = c
            .set(&path, Bytes::from(i.to_string()), Expected::Version(i - 1))
            .await
            .unwrap_or_else(|e| panic!("{at} CAS {i}: {e}"));
        assert_eq!(n.version, i, "{at} version after {i} writes");
        assert_eq!(
            c.get(&path).await.ok(),
            Some(n),
            "{at} a read after {i} writes differs from the node set returned"
        );
    }
    let any = c
        .set(&path, Bytes::from("3"), Expected::Any)
        .await
        .unwrap_or_else(|e| panic!("{at} set any: {e}"));
    assert_eq!(
        c.get(&path).await.ok(),
        Some(any),
        "{at} a read differs from the node set(Any) returned"
    );
    let eph = p("/ver/e");
    c.create(&eph, Bytes::from("0"), CreateMode::Ephemeral)
        .await
        .unwrap_or_else(|e| panic!("{at} create ephemeral: {e}"));
    let eph_set = c
        .set(&eph, Bytes::from("1"), Expected::Any)
        .await
        .unwrap_or_else(|e| panic!("{at} set ephemeral: {e}"));
    assert!(eph_set.is_ephemeral(), "{at} set made a node persistent");
    assert_eq!(
        c.get(&eph).await.ok(),
        Some(eph_set),
        "{at} a read of an ephemeral node differs from the node set returned"
    );
    assert_eq!(
        c.get(&path).await.map(|n| n.create_order).ok(),
        Some(created.create_order),
        "{at} create_order changed on write"
    );
    c.create(&p("/ver/n/a/b"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create deep: {e}"));
    c.delete(&path, Expected::Version(4), DeleteScope::Recursive)
        .await
        .unwrap_or_else(|e| panic!("{at} recursive delete: {e}"));
    for gone in ["/ver/n", "/ver/n/a", "/ver/n/a/b"] {
        assert!(
            !c.exists(&p(gone)).await.unwrap_or(true),
            "{at} {gone} survived a recursive delete"
        );
    }
    assert!(
        c.exists(&p("/ver")).await.unwrap_or(false),
        "{at} the parent of a deleted subtree went too"
    );
    env.finish().await
}

/// Creating a deep node creates its missing parents as empty persistent nodes.
pub async fn parents_created(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "parents_created");
    let c = env.client().await;
    let at = env.at();
    let deep = p("/pa/b/c/leaf");
    let leaf = c
        .create(&deep, Bytes::from("v"), CreateMode::Ephemeral)
        .await
        .unwrap_or_else(|e| panic!("{at} create deep: {e}"));
    for parent in ["/pa", "/pa/b", "/pa/b/c"] {
        let n = c
            .get(&p(parent))
            .await
            .unwrap_or_else(|e| panic!("{at} parent {parent} missing: {e}"));
        assert!(
            n.value.is_empty() && n.version == 0 && n.ephemeral_owner.is_none(),
            "{at} parent {parent} is not an empty persistent node: {n:?}"
        );
        assert!(
            n.create_order < leaf.create_order,
            "{at} parent {parent} created after its child"
        );
    }
    env.finish().await
}

/// Every path the parser accepts works on every backend (the rules are the union of what
/// ZooKeeper and etcd store faithfully): names at the edges of the allowed characters are
/// created, read and listed as given; a character beyond U+FFFF, which ZooKeeper's server
/// refuses, is refused by the parser before any request.
pub async fn paths_at_character_edges_work(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "paths_at_character_edges_work");
    let c = env.client().await;
    let at = env.at();
    let names = [
        "\u{a0}",
        "\u{d7ff}",
        "\u{f900}",
        "\u{ffef}",
        "中文",
        "\u{202e}rtl",
        "..b",
        "...",
    ];
    let dir = p("/chars");
    for name in names {
        let path = dir
            .join(name)
            .unwrap_or_else(|e| panic!("{at} {name:?} refused: {e}"));
        let created = c
            .create(&path, Bytes::from(name), CreateMode::Persistent)
            .await
            .unwrap_or_else(|e| panic!("{at} create {path:?}: {e}"));
        assert_eq!(created.path, path, "{at} created elsewhere");
        let read = c
            .get(&path)
            .await
            .unwrap_or_else(|e| panic!("{at} get {path:?}: {e}"));
        assert_eq!(read.value, Bytes::from(name), "{at} value of {path:?}");
    }
    let listed = c
        .children(&dir)
        .await
        .unwrap_or_else(|e| panic!("{at} children: {e}"));
    let mut found: Vec<&str> = listed.nodes.iter().map(|n| n.path.name()).collect();
    let mut expected = names.to_vec();
    found.sort_unstable();
    expected.sort_unstable();
    assert_eq!(found, expected, "{at} listed names");
    for raw in ["/chars/a\u{1f600}", "/chars/\u{10000}", "/\u{10ffff}"] {
        assert!(
            matches!(
                NodePath::new(raw),
                Err(Error::InvalidPath {
                    reason: InvalidPath::ForbiddenCharacter { .. },
                    ..
                })
            ),
            "{at} {raw:?} accepted, but ZooKeeper refuses characters beyond U+FFFF"
        );
    }
    c.delete(&dir, Expected::Any, DeleteScope::Recursive)
        .await
        .unwrap_or_else(|e| panic!("{at} delete: {e}"));
    env.finish().await
}

/// A recursive delete is one step: a call cut short at any moment (its future dropped) has
/// removed the whole subtree or none of it.
pub async fn recursive_delete_is_all_or_nothing(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "recursive_delete_is_all_or_nothing");
    let c = env.client().await;
    let at = env.at();
    const CHILDREN: usize = 40;
    let cut_after_ms = [0u64, 1, 2, 4, 8, 16, 32, 64];
    for ms in cut_after_ms {
        for i in 0..CHILDREN {
            let child = p(&format!("/cx/t{ms}/c{i}"));
            c.create(&child, Bytes::from("x"), CreateMode::Persistent)
                .await
                .unwrap_or_else(|e| panic!("{at} create {child}: {e}"));
        }
    }
    for ms in cut_after_ms {
        let tree = p(&format!("/cx/t{ms}"));
        let _ = tokio::time::timeout(
            Duration::from_millis(ms),
            c.delete(&tree, Expected::Any, DeleteScope::Recursive),
        )
        .await;
    }
    // Each tree as one snapshot, read at one revision (etcd, memory) or after whatever the
    // dropped call sent (a ZooKeeper session answers in order): whole or gone, never part.
    for ms in cut_after_ms {
        let tree = p(&format!("/cx/t{ms}"));
        let mut watch = c
            .watch(&tree, WatchOptions::subtree())
            .await
            .unwrap_or_else(|e| panic!("{at} watch {tree}: {e}"));
        let left = match next_event(&mut watch, "snapshot").await {
            WatchEvent::Snapshot(snapshot) => snapshot.nodes.len(),
            other => panic!("{at} expected a snapshot of {tree}, got {other:?}"),
        };
        assert!(
            left == 0 || left == CHILDREN + 1,
            "{at} a recursive delete cut after {ms} ms left {left} of {} nodes of {tree}",
            CHILDREN + 1
        );
    }
    env.finish().await
}
