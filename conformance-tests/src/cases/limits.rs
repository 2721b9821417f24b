//! Input at the limits: the longest and deepest valid paths work end to end, and a node with
//! 100k children gives either the full list or a typed error, promptly.

use std::time::{Duration, Instant};

use registry_core::{
    Bytes, CreateMode, DeleteScope, Error, Expected, RegisterOptions, MAX_DEPTH, MAX_PATH_LEN,
    SEQUENCE_DIGITS,
};

use crate::fixture::Fixture;
use crate::support::{create_all, p, read_subtree, CaseEnv, Outcome};

/// The longest path ([`MAX_PATH_LEN`] bytes) and the deepest ([`MAX_DEPTH`] segments) are
/// created, read, listed and deleted like any other.
pub async fn limits_path_and_depth_at_the_edge(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "limits_path_and_depth_at_the_edge");
    let at = env.at();
    let c = env.client().await;
    let deepest = p(&"/d".repeat(MAX_DEPTH));
    c.create(&deepest, Bytes::from("deep"), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create a {MAX_DEPTH}-deep path: {e}"));
    assert_eq!(
        c.get(&deepest).await.map(|n| n.value).ok(),
        Some(Bytes::from("deep")),
        "{at} deepest path"
    );
    let below = read_subtree(&c, &p("/d"))
        .await
        .unwrap_or_else(|e| panic!("{at} read the deep chain: {e}"));
    assert_eq!(below.len(), MAX_DEPTH, "{at} every level of the deep chain");
    c.delete(&p("/d"), Expected::Any, DeleteScope::Recursive)
        .await
        .unwrap_or_else(|e| panic!("{at} delete the deep chain: {e}"));

    let longest = p(&format!("/{}", "a".repeat(MAX_PATH_LEN - 1)));
    assert_eq!(longest.as_str().len(), MAX_PATH_LEN);
    c.create(&longest, Bytes::from("long"), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create a {MAX_PATH_LEN}-byte path: {e}"));
    let listed = c
        .children(&p("/"))
        .await
        .unwrap_or_else(|e| panic!("{at} list the root: {e}"));
    assert!(
        listed.nodes.iter().any(|n| n.path == longest),
        "{at} the longest path is not listed"
    );
    c.delete(&longest, Expected::Any, DeleteScope::Node)
        .await
        .unwrap_or_else(|e| panic!("{at} delete the longest path: {e}"));

    // A sequential name is its prefix plus 10 digits: a prefix that leaves no room for them
    // is bad input, named before any I/O (so also by a closed client), with nothing written.
    let room = MAX_PATH_LEN - "/s/".len() - SEQUENCE_DIGITS;
    let too_long = p(&format!("/s/{}", "a".repeat(room + 1)));
    let closed = fx
        .open(&env.namespace)
        .await
        .unwrap_or_else(|e| panic!("{at} open: {e}"));
    let _ = closed.close().await;
    for (client, which) in [(&c, "an open client"), (&closed, "a closed client")] {
        for mode in [
            CreateMode::PersistentSequential,
            CreateMode::EphemeralSequential,
        ] {
            match client.create(&too_long, Bytes::new(), mode).await {
                Err(Error::InvalidPath { .. }) => {}
                other => panic!("{at} {which}: {mode:?} create leaving no room: {other:?}"),
            }
        }
        let sequential = RegisterOptions::new().sequential();
        match client.register(&too_long, Bytes::new(), sequential).await {
            Err(Error::InvalidPath { .. }) => {}
            other => panic!("{at} {which}: sequential register leaving no room: {other:?}"),
        }
    }
    assert_eq!(
        c.exists(&p("/s")).await.ok(),
        Some(false),
        "{at} a refused sequential create wrote its parent"
    );
    let fits = p(&format!("/s/{}", "a".repeat(room)));
    let made = c
        .create(&fits, Bytes::new(), CreateMode::PersistentSequential)
        .await
        .unwrap_or_else(|e| panic!("{at} sequential create at the edge: {e}"));
    assert_eq!(made.path.as_str().len(), MAX_PATH_LEN, "{at} {}", made.path);
    env.finish().await
}

/// Children of one node in [`limits_many_children`].
pub const MANY_CHILDREN: usize = 100_000;

/// 100k children under one node: listing them gives all of them within a minute, never a
/// hang or a refusal (every backend does: ZooKeeper's answer, over 1 MiB, is sent and read
/// whole).
pub async fn limits_many_children(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "limits_many_children");
    let at = env.at();
    let c = env.client().await;
    let started = Instant::now();
    let paths = (0..MANY_CHILDREN).map(|i| p(&format!("/wide/child-{i:06}")));
    create_all(&c, paths, CreateMode::Ephemeral, &at).await;
    let created_in = started.elapsed();
    let bound = Duration::from_secs(60);
    let listed = tokio::time::timeout(bound, c.children(&p("/wide")))
        .await
        .unwrap_or_else(|_| panic!("{at} listing {MANY_CHILDREN} children hung past {bound:?}"));
    match listed {
        Ok(children) => assert_eq!(children.nodes.len(), MANY_CHILDREN, "{at} children listed"),
        Err(e) => panic!("{at} listing {MANY_CHILDREN} children failed: {e:?}"),
    }
    eprintln!("{at} {MANY_CHILDREN} children created in {created_in:?}");
    env.finish().await
}
