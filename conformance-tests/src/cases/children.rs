//! Cases on children: direct only, creation order, concurrent sequential creates.

use std::collections::HashSet;

use registry_core::{parse_sequence, Bytes, CreateMode, Error, SEQUENCE_DIGITS};

use crate::fixture::Fixture;
use crate::support::{p, CaseEnv, Outcome};

/// `children` lists direct children only, oldest first, with the node's values.
pub async fn children_direct_and_ordered(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "children_direct_and_ordered");
    let c = env.client().await;
    let at = env.at();
    for name in ["zeta", "alpha", "mid", "beta"] {
        c.create(
            &p(&format!("/ch/{name}")),
            Bytes::from(name),
            CreateMode::Persistent,
        )
        .await
        .unwrap_or_else(|e| panic!("{at} create {name}: {e}"));
    }
    c.create(
        &p("/ch/alpha/grandchild"),
        Bytes::new(),
        CreateMode::Persistent,
    )
    .await
    .unwrap_or_else(|e| panic!("{at} create grandchild: {e}"));
    let children = c
        .children(&p("/ch"))
        .await
        .unwrap_or_else(|e| panic!("{at} children: {e}"));
    let names: Vec<_> = children.nodes.iter().map(|n| n.path.name()).collect();
    assert_eq!(
        names,
        ["zeta", "alpha", "mid", "beta"],
        "{at} children not direct-only in creation order"
    );
    assert!(
        children
            .nodes
            .windows(2)
            .all(|w| w[0].create_order < w[1].create_order),
        "{at} create_order not increasing"
    );
    assert!(
        children
            .nodes
            .iter()
            .all(|n| n.value == n.path.name().as_bytes()),
        "{at} children carry wrong values"
    );
    let empty = c
        .children(&p("/ch/zeta"))
        .await
        .unwrap_or_else(|e| panic!("{at} children of leaf: {e}"));
    assert!(
        empty.nodes.is_empty(),
        "{at} a leaf has children: {:?}",
        empty.nodes
    );
    env.finish().await
}

/// 50 sequential creates from 5 clients at once get unique names `<prefix><10 digits>`, and
/// ordering the names orders them by creation.
pub async fn sequential_concurrent_unique(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "sequential_concurrent_unique");
    let at = env.at();
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(env.client().await);
    }
    clients[0]
        .create(&p("/seq"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create parent: {e}"));
    let mut tasks = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        for j in 0..10 {
            let c = c.clone();
            let mode = if j % 2 == 0 {
                CreateMode::PersistentSequential
            } else {
                CreateMode::EphemeralSequential
            };
            tasks.push(tokio::spawn(async move {
                c.create(&p("/seq/n-"), Bytes::from(format!("{i}-{j}")), mode)
                    .await
            }));
        }
    }
    let mut created = Vec::new();
    for t in tasks {
        let node = t.await.unwrap_or_else(|e| panic!("{at} task: {e}"));
        created.push(node.unwrap_or_else(|e| panic!("{at} sequential create: {e}")));
    }
    let names: HashSet<_> = created.iter().map(|n| n.path.name().to_owned()).collect();
    assert_eq!(names.len(), 50, "{at} duplicate sequential names");
    for n in &created {
        let name = n.path.name();
        assert!(
            name.starts_with("n-")
                && name.len() == 2 + SEQUENCE_DIGITS
                && parse_sequence(name).is_some(),
            "{at} bad sequential name {name:?}"
        );
    }
    let mut by_name = created.clone();
    by_name.sort_by(|a, b| a.path.cmp(&b.path));
    let mut by_order = created.clone();
    by_order.sort_by_key(|n| n.create_order);
    let a: Vec<_> = by_name.iter().map(|n| n.path.to_string()).collect();
    let b: Vec<_> = by_order.iter().map(|n| n.path.to_string()).collect();
    assert_eq!(a, b, "{at} name order differs from creation order");
    let listed = clients[1]
        .children(&p("/seq"))
        .await
        .unwrap_or_else(|e| panic!("{at} children: {e}"));
    let listed: Vec<_> = listed.nodes.iter().map(|n| n.path.to_string()).collect();
    assert_eq!(
        listed, b,
        "{at} children() order differs from creation order"
    );
    env.finish().await
}

/// A sequential create never replaces a node that already holds the name it generates (one
/// created under that exact name): it either gets a later free number or, where the backend's
/// counter cannot move past the name (ZooKeeper), fails with `AlreadyExists`.
pub async fn sequential_never_overwrites(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "sequential_never_overwrites");
    let at = env.at();
    let client = env.client().await;
    let first = client
        .create(
            &p("/seqx/job-"),
            Bytes::new(),
            CreateMode::PersistentSequential,
        )
        .await
        .unwrap_or_else(|e| panic!("{at} first sequential create: {e}"));
    let start = parse_sequence(first.path.name())
        .unwrap_or_else(|| panic!("{at} bad sequential name {}", first.path));
    // Names the counter reaches next, taken by name.
    let mut taken = Vec::new();
    for ahead in [2u64, 3] {
        let name = p(&format!(
            "/seqx/{}",
            registry_core::sequential_name("job-", start + ahead)
        ));
        client
            .create(&name, Bytes::from("taken"), CreateMode::Persistent)
            .await
            .unwrap_or_else(|e| panic!("{at} create {name}: {e}"));
        taken.push(name);
    }
    let skips_taken = client.capabilities().sequential_skips_taken;
    let mut last = start;
    for _ in 0..4 {
        match client
            .create(
                &p("/seqx/job-"),
                Bytes::from("new"),
                CreateMode::PersistentSequential,
            )
            .await
        {
            Ok(node) => {
                let seq = parse_sequence(node.path.name())
                    .unwrap_or_else(|| panic!("{at} bad sequential name {}", node.path));
                assert!(seq > last, "{at} sequence went from {last} to {seq}");
                assert!(
                    !taken.contains(&node.path),
                    "{at} got a taken name {}",
                    node.path
                );
                last = seq;
            }
            Err(Error::AlreadyExists { path }) => {
                assert!(
                    !skips_taken,
                    "{at} AlreadyExists ({path}) from a backend that declares it moves past taken names"
                );
                assert!(
                    taken.contains(&path),
                    "{at} AlreadyExists names {path}, not a taken name"
                );
            }
            Err(e) => panic!("{at} sequential create past taken names: {e}"),
        }
    }
    for name in &taken {
        let node = client
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("{at} get {name}: {e}"));
        assert_eq!(
            (&node.value[..], node.version),
            (&b"taken"[..], 0),
            "{at} {name} was overwritten"
        );
    }
    env.finish().await
}
