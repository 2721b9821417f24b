//! Cases on self-healing registrations.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use registry_core::{
    Bytes, CreateMode, DeleteScope, Error, Expected, Node, NodePath, RegisterOptions, Registration,
    RegistrationStatus, Registry, WatchOptions,
};

use crate::fixture::{Fault, Fixture};
use crate::support::{eventually, next_event, p, session_of, wait_gone, CaseEnv, Outcome};

/// Waits until `path` exists, owned by `owner`'s current session, with `value`.
async fn owned_by(
    fx: &dyn Fixture,
    at: &str,
    reader: &Arc<dyn Registry>,
    owner: &Arc<dyn Registry>,
    path: &NodePath,
    value: &str,
) {
    let bound = fx.expiry_bound() + Duration::from_secs(10);
    eventually(
        bound,
        &format!("{at} {path} registered by the current session with {value:?}"),
        || {
            let (reader, owner, path) = (reader.clone(), owner.clone(), path.clone());
            async move {
                match reader.get(&path).await {
                    Ok(n) => {
                        n.ephemeral_owner.is_some()
                            && n.ephemeral_owner == owner.session().session_id
                            && n.value == value.as_bytes()
                    }
                    Err(_) => false,
                }
            }
        },
    )
    .await;
}

/// Whether `registration`'s status meets `wanted` within `bound`.
async fn reaches(
    registration: &Registration,
    bound: Duration,
    wanted: impl FnMut(&RegistrationStatus) -> bool,
) -> bool {
    let mut status = registration.watch_status();
    // The borrow `wait_for` returns is dropped at once: held, it would block the
    // registration's next status change.
    tokio::time::timeout(bound, status.wait_for(wanted))
        .await
        .is_ok_and(|seen| seen.is_ok())
}

/// A registration exists as an ephemeral of its client; `deregister` removes it at once and
/// dropping the handle removes it in the background.
pub async fn register_deregister_and_drop(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "register_deregister_and_drop");
    let owner = env.client().await;
    let reader = env.client().await;
    let at = env.at();
    let path = p("/reg/10.0.0.1:9090");
    let reg = owner
        .register(&path, Bytes::from("50"), RegisterOptions::new())
        .await
        .unwrap_or_else(|e| panic!("{at} register: {e}"));
    let node = reader
        .get(&path)
        .await
        .unwrap_or_else(|e| panic!("{at} registered node not visible: {e}"));
    assert_eq!(node.ephemeral_owner, Some(session_of(&owner)), "{at} owner");
    assert!(
        matches!(reg.status(), RegistrationStatus::Registered(_)),
        "{at} status {:?}",
        reg.status()
    );
    reg.deregister()
        .await
        .unwrap_or_else(|e| panic!("{at} deregister: {e}"));
    assert!(
        !reader.exists(&path).await.unwrap_or(true),
        "{at} node still there after deregister returned"
    );
    let reg = owner
        .register(&path, Bytes::from("50"), RegisterOptions::new())
        .await
        .unwrap_or_else(|e| panic!("{at} register again: {e}"));
    drop(reg);
    wait_gone(fx, &at, &reader, &path).await;
    // Refusals are typed, and leave nothing behind.
    let parent = reader
        .get(&p("/reg"))
        .await
        .unwrap_or_else(|e| panic!("{at} get the parent: {e}"));
    let r = owner
        .register(&p("/reg"), Bytes::new(), RegisterOptions::new())
        .await
        .map(drop);
    assert!(
        matches!(&r, Err(Error::AlreadyExists { path }) if *path == p("/reg")),
        "{at} registering over a persistent node: {r:?}"
    );
    assert_eq!(
        reader.get(&p("/reg")).await.ok(),
        Some(parent),
        "{at} a refused registration changed the persistent node"
    );
    let eph = p("/reg/eph");
    owner
        .create(&eph, Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap_or_else(|e| panic!("{at} create ephemeral: {e}"));
    for options in [RegisterOptions::new(), RegisterOptions::new().sequential()] {
        let r = owner
            .register(&p("/reg/eph/kid"), Bytes::new(), options.clone())
            .await
            .map(drop);
        assert!(
            matches!(&r, Err(Error::EphemeralParent { parent, .. }) if *parent == eph),
            "{at} registering under an ephemeral node ({options:?}): {r:?}"
        );
    }
    let too_large = Bytes::from(vec![b'x'; registry_core::MAX_VALUE_LEN + 1]);
    let r = owner
        .register(&p("/reg/big"), too_large, RegisterOptions::new())
        .await
        .map(drop);
    assert!(
        matches!(&r, Err(Error::ValueTooLarge { .. })),
        "{at} registering an oversized value: {r:?}"
    );
    let left = reader
        .children(&p("/reg"))
        .await
        .unwrap_or_else(|e| panic!("{at} children: {e}"));
    let names: Vec<&str> = left.nodes.iter().map(|n| n.path.name()).collect();
    assert_eq!(
        names,
        ["eph"],
        "{at} refused registrations left nodes behind"
    );
    env.finish().await
}

/// Closing the registry stops its registrations: their nodes are gone when `close` returns,
/// each reports `Deregistered`, and nothing comes back.
pub async fn close_stops_registrations(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "close_stops_registrations");
    let owner = env.client().await;
    let reader = env.client().await;
    let at = env.at();
    let plain = owner
        .register(
            &p("/cs/10.0.0.9:9090"),
            Bytes::from("p"),
            RegisterOptions::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("{at} register: {e}"));
    let sequential = owner
        .register(
            &p("/cs/10.0.0.9:9091:1.0:"),
            Bytes::from("s"),
            RegisterOptions::new().sequential(),
        )
        .await
        .unwrap_or_else(|e| panic!("{at} register sequential: {e}"));
    let mut watch = reader
        .watch(&p("/cs"), WatchOptions::children())
        .await
        .unwrap_or_else(|e| panic!("{at} watch: {e}"));
    match next_event(&mut watch, "snapshot").await {
        registry_core::WatchEvent::Snapshot(s) => {
            assert_eq!(s.nodes.len(), 2, "{at} registered nodes: {:?}", s.nodes)
        }
        other => panic!("{at} expected a snapshot, got {other:?}"),
    }
    owner
        .close()
        .await
        .unwrap_or_else(|e| panic!("{at} close: {e}"));
    let left = reader
        .children(&p("/cs"))
        .await
        .unwrap_or_else(|e| panic!("{at} children: {e}"));
    assert!(
        left.nodes.is_empty(),
        "{at} registrations outlived close: {:?}",
        left.nodes
    );
    for registration in [&plain, &sequential] {
        let stopped = reaches(registration, Duration::from_secs(5), |s| {
            *s == RegistrationStatus::Deregistered
        })
        .await;
        assert!(
            stopped,
            "{at} a registration of a closed registry reads {:?}",
            registration.status()
        );
    }
    // Both deletions, then nothing: no re-creation after close.
    let mut deleted = 0;
    while deleted < 2 {
        match next_event(&mut watch, "the registrations' deletions").await {
            registry_core::WatchEvent::Deleted(_) => deleted += 1,
            other => panic!("{at} expected deletions, got {other:?}"),
        }
    }
    let later = tokio::time::timeout(Duration::from_secs(2), watch.next()).await;
    assert!(later.is_err(), "{at} a change after close: {later:?}");
    drop((plain, sequential));
    env.finish().await
}

/// `delete_owned` deletes a node only while it has the given owner, whatever its version,
/// and leaves another owner's node at the same path alone.
pub async fn delete_owned_spares_other_owners(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "delete_owned_spares_other_owners");
    let mine = env.client().await;
    let other = env.client().await;
    let at = env.at();
    let path = p("/own/10.0.0.9:9090");
    let made = mine
        .create(&path, Bytes::from("0"), CreateMode::Ephemeral)
        .await
        .unwrap_or_else(|e| panic!("{at} create: {e}"));
    let mut theirs = made.clone();
    theirs.ephemeral_owner = other.session().session_id;
    assert_eq!(
        mine.delete_owned(&theirs).await.ok(),
        Some(false),
        "{at} delete_owned with another owner"
    );
    mine.set(&path, Bytes::from("1"), Expected::Any)
        .await
        .unwrap_or_else(|e| panic!("{at} set: {e}"));
    assert_eq!(
        mine.delete_owned(&made).await.ok(),
        Some(true),
        "{at} delete_owned of our node after a write"
    );
    assert!(
        !other.exists(&path).await.unwrap_or(true),
        "{at} node still there after delete_owned"
    );
    assert_eq!(
        mine.delete_owned(&made).await.ok(),
        Some(false),
        "{at} delete_owned of a missing node"
    );
    other
        .create(&path, Bytes::from("2"), CreateMode::Ephemeral)
        .await
        .unwrap_or_else(|e| panic!("{at} create by the other: {e}"));
    assert_eq!(
        mine.delete_owned(&made).await.ok(),
        Some(false),
        "{at} delete_owned over another session's node"
    );
    assert_eq!(
        other.get(&path).await.ok().map(|n| n.value),
        Some(Bytes::from("2")),
        "{at} another session's node was deleted"
    );
    let parent = mine
        .create(&p("/own/dir"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create parent: {e}"));
    mine.create(&p("/own/dir/child"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create child: {e}"));
    let refused = mine.delete_owned(&parent).await;
    assert!(
        matches!(refused, Err(Error::NotEmpty { .. })),
        "{at} delete_owned with a child: {refused:?}"
    );
    env.finish().await
}

/// `set_owned` writes a node only while it has the given owner (none: a persistent node),
/// whatever its version, and leaves any other node alone.
pub async fn set_owned_spares_other_owners(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "set_owned_spares_other_owners");
    let mine = env.client().await;
    let other = env.client().await;
    let at = env.at();
    let path = p("/owned/10.0.0.9:9090");
    let made = mine
        .create(&path, Bytes::from("0"), CreateMode::Ephemeral)
        .await
        .unwrap_or_else(|e| panic!("{at} create: {e}"));
    mine.set(&path, Bytes::from("1"), Expected::Any)
        .await
        .unwrap_or_else(|e| panic!("{at} set: {e}"));
    let written = mine
        .set_owned(&made, Bytes::from("2"))
        .await
        .unwrap_or_else(|e| panic!("{at} set_owned of our node after a write: {e}"))
        .unwrap_or_else(|| panic!("{at} set_owned did not write our node"));
    assert_eq!(
        (
            written.value.clone(),
            written.version,
            written.ephemeral_owner
        ),
        (Bytes::from("2"), 2, made.ephemeral_owner),
        "{at} set_owned's node as written"
    );
    assert_eq!(
        other.get(&path).await.ok().map(|n| n.value),
        Some(Bytes::from("2")),
        "{at} value after set_owned"
    );
    let mut theirs = made.clone();
    theirs.ephemeral_owner = other.session().session_id;
    let persistent = Node {
        ephemeral_owner: None,
        ..made.clone()
    };
    for (asked, what) in [(&theirs, "another owner"), (&persistent, "no owner")] {
        assert_eq!(
            mine.set_owned(asked, Bytes::from("x")).await.ok(),
            Some(None),
            "{at} set_owned of an ephemeral node with {what}"
        );
    }
    mine.delete(&path, Expected::Any, DeleteScope::Node)
        .await
        .unwrap_or_else(|e| panic!("{at} delete: {e}"));
    assert_eq!(
        mine.set_owned(&made, Bytes::from("x")).await.ok(),
        Some(None),
        "{at} set_owned of a missing node"
    );
    // Replaced by another session's node at the very version ours had.
    other
        .create(&path, Bytes::from("theirs"), CreateMode::Ephemeral)
        .await
        .unwrap_or_else(|e| panic!("{at} create by the other: {e}"));
    assert_eq!(
        mine.set_owned(&made, Bytes::from("x")).await.ok(),
        Some(None),
        "{at} set_owned over another session's node"
    );
    let config = p("/owned/config");
    let kept = mine
        .create(&config, Bytes::from("a"), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create persistent: {e}"));
    let written = mine
        .set_owned(&kept, Bytes::from("b"))
        .await
        .unwrap_or_else(|e| panic!("{at} set_owned of a persistent node: {e}"));
    assert_eq!(
        written.map(|n| (n.value, n.ephemeral_owner)),
        Some((Bytes::from("b"), None)),
        "{at} set_owned of a persistent node"
    );
    assert_eq!(
        other.get(&path).await.ok().map(|n| n.value),
        Some(Bytes::from("theirs")),
        "{at} another session's node was written"
    );
    env.finish().await
}

/// After the session expires, the registration comes back under the new session, with the
/// value last set, and goes on healing: deleted then, it is re-created.
pub async fn registration_recreated_after_expiry(fx: &dyn Fixture) -> Outcome {
    if !fx.supports(Fault::ExpireSession) {
        return Outcome::Skipped("fixture cannot expire sessions".into());
    }
    let mut env = CaseEnv::new(fx, "registration_recreated_after_expiry");
    let owner = env.client().await;
    let reader = env.client().await;
    let at = env.at();
    let path = p("/reg/10.0.0.2:9090");
    let reg = owner
        .register(&path, Bytes::from("v1"), RegisterOptions::new())
        .await
        .unwrap_or_else(|e| panic!("{at} register: {e}"));
    reg.set_value(Bytes::from("v2"))
        .await
        .unwrap_or_else(|e| panic!("{at} set_value: {e}"));
    let old = session_of(&owner);
    fx.expire_session(old)
        .await
        .unwrap_or_else(|e| panic!("{at} expire: {e}"));
    eventually(
        fx.expiry_bound() + Duration::from_secs(10),
        &format!("{at} new session"),
        || {
            let owner = owner.clone();
            async move {
                owner.session().session_id.is_some_and(|s| s != old)
                    && owner.session().state.is_live()
            }
        },
    )
    .await;
    owned_by(fx, &at, &reader, &owner, &path, "v2").await;
    // It heals in the new session too: the node's watch came back with the node.
    let back = reader
        .get(&path)
        .await
        .unwrap_or_else(|e| panic!("{at} get: {e}"));
    reader
        .delete(&path, Expected::Any, DeleteScope::Node)
        .await
        .unwrap_or_else(|e| panic!("{at} delete after the expiry: {e}"));
    recreated_after(&at, &reader, &path, &back).await;
    owned_by(fx, &at, &reader, &owner, &path, "v2").await;
    reg.deregister()
        .await
        .unwrap_or_else(|e| panic!("{at} deregister: {e}"));
    env.finish().await
}

/// Waits until `path` exists again, created after `first` (the node that was deleted).
async fn recreated_after(at: &str, reader: &Arc<dyn Registry>, path: &NodePath, first: &Node) {
    let created = first.create_order;
    eventually(
        Duration::from_secs(10),
        &format!("{at} {path} re-created after delete"),
        || {
            let (reader, path) = (reader.clone(), path.clone());
            async move {
                reader
                    .get(&path)
                    .await
                    .is_ok_and(|n| n.create_order > created)
            }
        },
    )
    .await;
}

/// Someone else deleting a registration does not remove it for long.
pub async fn registration_recreated_after_external_delete(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "registration_recreated_after_external_delete");
    let owner = env.client().await;
    let operator = env.client().await;
    let at = env.at();
    let path = p("/reg/10.0.0.3:9090");
    let reg = owner
        .register(&path, Bytes::from("x"), RegisterOptions::new())
        .await
        .unwrap_or_else(|e| panic!("{at} register: {e}"));
    let first = operator
        .get(&path)
        .await
        .unwrap_or_else(|e| panic!("{at} get: {e}"));
    operator
        .delete(&path, Expected::Any, DeleteScope::Node)
        .await
        .unwrap_or_else(|e| panic!("{at} delete: {e}"));
    recreated_after(&at, &operator, &path, &first).await;
    owned_by(fx, &at, &operator, &owner, &path, "x").await;
    reg.deregister()
        .await
        .unwrap_or_else(|e| panic!("{at} deregister: {e}"));
    env.finish().await
}

/// A registration deleted the moment `register` returns is re-created: nothing between the
/// create and the healer's watch taking hold may go unnoticed.
pub async fn registration_recreated_when_deleted_at_once(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "registration_recreated_when_deleted_at_once");
    let owner = env.client().await;
    let operator = env.client().await;
    let at = env.at();
    let mut regs = Vec::new();
    // Several under one parent: on backends whose registrations share a parent watch, later
    // ones join a watch that is already running.
    for i in 0..5 {
        let path = p(&format!("/reg/at-once/10.0.0.{i}:9090"));
        let reg = owner
            .register(&path, Bytes::from("x"), RegisterOptions::new())
            .await
            .unwrap_or_else(|e| panic!("{at} register {path}: {e}"));
        let RegistrationStatus::Registered(first) = reg.status() else {
            panic!("{at} {path}: not registered once register returned");
        };
        operator
            .delete(&path, Expected::Any, DeleteScope::Node)
            .await
            .unwrap_or_else(|e| panic!("{at} delete {path}: {e}"));
        regs.push((path, first, reg));
    }
    for (path, first, _) in &regs {
        recreated_after(&at, &operator, path, first).await;
        owned_by(fx, &at, &operator, &owner, path, "x").await;
    }
    for (_, _, reg) in regs {
        reg.deregister()
            .await
            .unwrap_or_else(|e| panic!("{at} deregister: {e}"));
    }
    env.finish().await
}

/// A stale ephemeral of another session at the registration's path is replaced.
pub async fn registration_replaces_stale_node(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "registration_replaces_stale_node");
    let stale = env.client().await;
    let owner = env.client().await;
    let at = env.at();
    let path = p("/reg/10.0.0.4:9090");
    stale
        .create(&path, Bytes::from("old"), CreateMode::Ephemeral)
        .await
        .unwrap_or_else(|e| panic!("{at} stale create: {e}"));
    let reg = owner
        .register(&path, Bytes::from("new"), RegisterOptions::new())
        .await
        .unwrap_or_else(|e| panic!("{at} register over stale: {e}"));
    let node = owner
        .get(&path)
        .await
        .unwrap_or_else(|e| panic!("{at} get: {e}"));
    assert_eq!(
        (node.ephemeral_owner, node.value),
        (Some(session_of(&owner)), Bytes::from("new")),
        "{at} stale node not replaced"
    );
    reg.deregister()
        .await
        .unwrap_or_else(|e| panic!("{at} deregister: {e}"));
    env.finish().await
}

/// A value set on a registration is the one re-created after it is lost; sequential
/// registrations get a new counter each time and leave no orphan behind.
pub async fn registration_set_value_survives_recreation(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "registration_set_value_survives_recreation");
    let owner = env.client().await;
    let operator = env.client().await;
    let at = env.at();
    let prefix = p("/soa/runtime/services/S/10.0.0.5:9090:1.0.0:");
    let reg: Registration = owner
        .register(
            &prefix,
            Bytes::from("a"),
            RegisterOptions::new().sequential(),
        )
        .await
        .unwrap_or_else(|e| panic!("{at} register: {e}"));
    let first = reg.path().unwrap_or_else(|| panic!("{at} no path"));
    assert!(
        first.name().starts_with("10.0.0.5:9090:1.0.0:") && first.sequence().is_some(),
        "{at} sequential name {first}"
    );
    reg.set_value(Bytes::from("b"))
        .await
        .unwrap_or_else(|e| panic!("{at} set_value: {e}"));
    assert_eq!(
        operator.get(&first).await.map(|n| n.value).ok(),
        Some(Bytes::from("b")),
        "{at} set_value not written"
    );
    operator
        .delete(&first, Expected::Any, DeleteScope::Node)
        .await
        .unwrap_or_else(|e| panic!("{at} delete: {e}"));
    let parent = p("/soa/runtime/services/S");
    eventually(
        Duration::from_secs(10),
        &format!("{at} re-created with a new counter and the new value"),
        || {
            let (operator, parent, first) = (operator.clone(), parent.clone(), first.clone());
            async move {
                match operator.children(&parent).await {
                    Ok(c) => {
                        c.nodes.len() == 1 && c.nodes[0].path != first && c.nodes[0].value == "b"
                    }
                    Err(_) => false,
                }
            }
        },
    )
    .await;
    reg.deregister()
        .await
        .unwrap_or_else(|e| panic!("{at} deregister: {e}"));
    assert!(
        operator
            .children(&parent)
            .await
            .map(|c| c.nodes.is_empty())
            .unwrap_or(false),
        "{at} orphan after deregister"
    );
    env.finish().await
}

/// Two live registrations of one path never fight over it. In one process the second adopts
/// the first's node, and removing the first leaves it in place. Across two clients the
/// newer one replaces the node and the older reports `Recreating`, leaves it alone, and takes
/// it back once the newer one is removed; or, if the older one re-creates its node as fast
/// as it goes, the newer one fails with `AlreadyExists` and the older keeps it.
pub async fn registrations_of_one_path_take_turns(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "registrations_of_one_path_take_turns");
    let first = env.client().await;
    let second = env.client().await;
    let reader = env.client().await;
    let at = env.at();
    // Nothing may happen at `path` for a while: a watch that stays silent.
    let quiet = |path: NodePath, what: &'static str| {
        let (reader, at) = (reader.clone(), at.clone());
        async move {
            let mut watch = reader
                .watch(&path, WatchOptions::node())
                .await
                .unwrap_or_else(|e| panic!("{at} watch: {e}"));
            let _ = next_event(&mut watch, "snapshot").await;
            let event = tokio::time::timeout(Duration::from_secs(2), watch.next()).await;
            assert!(event.is_err(), "{at} {what}: {path} changed: {event:?}");
        }
    };

    let path = p("/turns/10.0.0.7:9090");
    let reg1 = first
        .register(&path, Bytes::from("1"), RegisterOptions::new())
        .await
        .unwrap_or_else(|e| panic!("{at} register: {e}"));
    let node = reader
        .get(&path)
        .await
        .unwrap_or_else(|e| panic!("{at} get: {e}"));
    let reg2 = first
        .register(&path, Bytes::from("1"), RegisterOptions::new())
        .await
        .unwrap_or_else(|e| panic!("{at} register the same path again: {e}"));
    let adopted = reader
        .get(&path)
        .await
        .unwrap_or_else(|e| panic!("{at} get: {e}"));
    assert_eq!(
        (adopted.create_order, adopted.ephemeral_owner),
        (node.create_order, node.ephemeral_owner),
        "{at} the second registration replaced the node instead of adopting it"
    );
    reg1.deregister()
        .await
        .unwrap_or_else(|e| panic!("{at} deregister the first: {e}"));
    let kept = reader
        .get(&path)
        .await
        .unwrap_or_else(|e| panic!("{at} the adopted node went with the first handle: {e}"));
    assert_eq!(kept.create_order, node.create_order, "{at} node replaced");
    quiet(path.clone(), "after the first handle's removal").await;
    assert!(
        matches!(reg2.status(), RegistrationStatus::Registered(_)),
        "{at} the adopting registration: {:?}",
        reg2.status()
    );
    reg2.deregister()
        .await
        .unwrap_or_else(|e| panic!("{at} deregister the second: {e}"));
    assert!(
        !reader.exists(&path).await.unwrap_or(true),
        "{at} the node outlived its last registration"
    );

    let path = p("/turns/10.0.0.8:9090");
    let older = first
        .register(&path, Bytes::from("older"), RegisterOptions::new())
        .await
        .unwrap_or_else(|e| panic!("{at} register: {e}"));
    // The newer one replaces the node, unless the older one re-creates it faster than it is
    // removed, which shows its owner alive: then the newer one leaves it, AlreadyExists.
    match second
        .register(&path, Bytes::from("newer"), RegisterOptions::new())
        .await
    {
        Ok(newer) => {
            owned_by(fx, &at, &reader, &second, &path, "newer").await;
            let waiting = reaches(&older, Duration::from_secs(10), |s| {
                matches!(s, RegistrationStatus::Recreating { .. })
            })
            .await;
            assert!(
                waiting,
                "{at} the older registration never reported Recreating: {:?}",
                older.status()
            );
            quiet(path.clone(), "while both registrations live").await;
            newer
                .deregister()
                .await
                .unwrap_or_else(|e| panic!("{at} deregister the newer: {e}"));
            // Its turn: the older one takes the path back.
            owned_by(fx, &at, &reader, &first, &path, "older").await;
        }
        Err(Error::AlreadyExists { path: held }) if held == path => {
            owned_by(fx, &at, &reader, &first, &path, "older").await;
            quiet(path.clone(), "after the newer registration gave up").await;
        }
        Err(e) => panic!("{at} register over another client's live registration: {e}"),
    }
    older
        .deregister()
        .await
        .unwrap_or_else(|e| panic!("{at} deregister the older: {e}"));
    env.finish().await
}
