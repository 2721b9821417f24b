//! Cases on sessions and ephemeral nodes: visibility, expiry, close.

use std::time::Duration;

use futures::StreamExt;
use registry_core::{
    Bytes, CreateMode, DeleteScope, Error, Expected, RegisterOptions, SessionState, WatchOptions,
};

use crate::fixture::{Fault, Fixture};
use crate::support::{p, session_of, wait_gone, CaseEnv, Outcome};

/// An ephemeral node is visible to other clients with its owner's session, and disappears
/// once its owner closes.
pub async fn ephemeral_gone_after_close(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "ephemeral_gone_after_close");
    let owner = env.client().await;
    let other = env.client().await;
    let at = env.at();
    let path = p("/svc/10.0.0.1:9090");
    owner
        .create(&path, Bytes::from("100"), CreateMode::Ephemeral)
        .await
        .unwrap_or_else(|e| panic!("{at} create: {e}"));
    let seen = other
        .get(&path)
        .await
        .unwrap_or_else(|e| panic!("{at} other client cannot see it: {e}"));
    assert_eq!(
        seen.ephemeral_owner,
        Some(session_of(&owner)),
        "{at} wrong owner"
    );
    owner
        .close()
        .await
        .unwrap_or_else(|e| panic!("{at} close: {e}"));
    // Gone once close has returned, not eventually.
    let after = other.get(&path).await;
    assert!(
        matches!(after, Err(Error::NotFound { .. })),
        "{at} the ephemeral node outlived its owner's close: {after:?}"
    );
    assert!(
        matches!(owner.get(&path).await, Err(Error::Closed)),
        "{at} a closed client still answers"
    );
    env.finish().await
}

/// When a session expires, its ephemeral nodes go, and its client reports `Lost` then
/// `Reestablished` with a larger epoch and a new session.
pub async fn session_expiry_removes_ephemerals_and_reestablishes(fx: &dyn Fixture) -> Outcome {
    if !fx.supports(Fault::ExpireSession) {
        return Outcome::Skipped("fixture cannot expire sessions".into());
    }
    let mut env = CaseEnv::new(fx, "session_expiry_removes_ephemerals_and_reestablishes");
    let owner = env.client().await;
    let other = env.client().await;
    let at = env.at();
    let path = p("/exp/node");
    owner
        .create(&path, Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap_or_else(|e| panic!("{at} create: {e}"));
    let before = owner.session();
    let mut events = owner.session_events();
    fx.expire_session(session_of(&owner))
        .await
        .unwrap_or_else(|e| panic!("{at} expire: {e}"));
    let mut seen = Vec::new();
    let reestablished = tokio::time::timeout(fx.expiry_bound() + Duration::from_secs(10), async {
        while let Some(status) = events.next().await {
            seen.push(status.state);
            if status.state == SessionState::Reestablished {
                return Some(status);
            }
        }
        None
    })
    .await;
    let status = match reestablished {
        Ok(Some(status)) => status,
        other => panic!("{at} no Reestablished after expiry ({other:?}); states seen: {seen:?}"),
    };
    let lost_at = seen.iter().position(|s| *s == SessionState::Lost);
    assert!(
        lost_at.is_some(),
        "{at} Reestablished without Lost first: {seen:?}"
    );
    assert!(
        status.epoch > before.epoch,
        "{at} epoch did not grow: {} -> {}",
        before.epoch,
        status.epoch
    );
    assert_ne!(
        status.session_id, before.session_id,
        "{at} same session id after expiry"
    );
    wait_gone(fx, &at, &other, &path).await;
    owner
        .create(&p("/exp/again"), Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap_or_else(|e| panic!("{at} new session unusable: {e}"));
    env.finish().await
}

/// `close` ends every watch stream and the session stream, and later calls fail with `Closed`.
pub async fn close_ends_streams(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "close_ends_streams");
    let c = env.client().await;
    let at = env.at();
    c.create(&p("/cl/x"), Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap_or_else(|e| panic!("{at} create: {e}"));
    let mut watch = c
        .watch(&p("/cl"), WatchOptions::subtree())
        .await
        .unwrap_or_else(|e| panic!("{at} watch: {e}"));
    let _ = crate::support::next_event(&mut watch, "snapshot").await;
    let sessions = c.session_events();
    c.close()
        .await
        .unwrap_or_else(|e| panic!("{at} close: {e}"));
    c.close()
        .await
        .unwrap_or_else(|e| panic!("{at} second close: {e}"));
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(item) = watch.next().await {
            if item.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "{at} watch stream did not end after close");
    let states: Vec<_> =
        tokio::time::timeout(Duration::from_secs(10), sessions.collect::<Vec<_>>())
            .await
            .unwrap_or_else(|_| panic!("{at} session stream did not end after close"));
    assert_eq!(
        states.last().map(|s| s.state),
        Some(SessionState::Closed),
        "{at} last session state"
    );
    assert!(
        matches!(c.exists(&p("/cl")).await, Err(Error::Closed)),
        "{at} call after close"
    );
    let other = env.client().await;
    wait_gone(fx, &at, &other, &p("/cl/x")).await;

    // A close whose caller stops waiting (a timeout) still runs to its end, and the next
    // close waits for it: it used to leave the session stopped halfway, reading `Connected`
    // for good, with its ephemeral nodes kept until the TTL, while a second close said `Ok`.
    let cancelled = env.client().await;
    cancelled
        .create(&p("/cl/y"), Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap_or_else(|e| panic!("{at} create: {e}"));
    let _ = tokio::time::timeout(Duration::ZERO, cancelled.close()).await;
    cancelled
        .close()
        .await
        .unwrap_or_else(|e| panic!("{at} close after a cancelled close: {e}"));
    assert_eq!(
        cancelled.session().state,
        SessionState::Closed,
        "{at} state once a close after a cancelled one returned"
    );
    wait_gone(fx, &at, &other, &p("/cl/y")).await;
    env.finish().await
}

/// A client that has connected holds its first session: `Connected`, epoch 1, a session id
/// of its own, which owns its ephemeral nodes; its session stream starts with that status.
pub async fn session_status_of_a_new_client(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "session_status_of_a_new_client");
    let c = env.client().await;
    let other = env.client().await;
    let at = env.at();
    let status = c.session();
    assert_eq!(
        (status.state, status.epoch),
        (SessionState::Connected, 1),
        "{at} status of a new client: {status:?}"
    );
    let id = session_of(&c);
    assert_ne!(id, session_of(&other), "{at} two clients share a session");
    let mut events = c.session_events();
    let first = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .unwrap_or_else(|_| panic!("{at} the session stream did not start"));
    assert_eq!(first, Some(status), "{at} first item of the session stream");
    let node = c
        .create(&p("/st/eph"), Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap_or_else(|e| panic!("{at} create: {e}"));
    assert_eq!(node.ephemeral_owner, Some(id), "{at} owner of a new node");
    assert_eq!(c.session(), status, "{at} a create changed the session");
    env.finish().await
}

/// After `close`, every call fails with `Closed`, whatever it is, and the session reads and
/// streams `Closed` alone.
pub async fn every_call_after_close_is_closed(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "every_call_after_close_is_closed");
    let c = env.client().await;
    let at = env.at();
    let path = p("/ac/n");
    let node = c
        .create(&path, Bytes::from("v"), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create: {e}"));
    c.close()
        .await
        .unwrap_or_else(|e| panic!("{at} close: {e}"));
    let closed = |r: Result<(), Error>, call: &str| {
        assert!(
            matches!(r, Err(Error::Closed)),
            "{at} {call} after close: {r:?}"
        );
    };
    closed(
        c.create(&p("/ac/m"), Bytes::new(), CreateMode::Persistent)
            .await
            .map(drop),
        "create",
    );
    closed(c.get(&path).await.map(drop), "get");
    closed(c.exists(&path).await.map(drop), "exists");
    closed(
        c.set(&path, Bytes::from("w"), Expected::Any)
            .await
            .map(drop),
        "set",
    );
    closed(
        c.set_owned(&node, Bytes::from("w")).await.map(drop),
        "set_owned",
    );
    closed(
        c.delete(&path, Expected::Any, DeleteScope::Node).await,
        "delete",
    );
    closed(c.delete_owned(&node).await.map(drop), "delete_owned");
    closed(c.children(&p("/ac")).await.map(drop), "children");
    closed(
        c.watch(&path, WatchOptions::node()).await.map(drop),
        "watch",
    );
    closed(
        c.register(&p("/ac/r"), Bytes::new(), RegisterOptions::default())
            .await
            .map(drop),
        "register",
    );
    assert_eq!(c.session().state, SessionState::Closed, "{at} state");
    let states: Vec<_> = tokio::time::timeout(
        Duration::from_secs(10),
        c.session_events().map(|s| s.state).collect::<Vec<_>>(),
    )
    .await
    .unwrap_or_else(|_| panic!("{at} the session stream of a closed client did not end"));
    assert_eq!(states, [SessionState::Closed], "{at} session stream");
    c.close()
        .await
        .unwrap_or_else(|e| panic!("{at} close again: {e}"));
    // Nothing was written after close.
    let reader = env.client().await;
    let now = reader
        .get(&path)
        .await
        .unwrap_or_else(|e| panic!("{at} read: {e}"));
    assert_eq!(now, node, "{at} the node changed after close");
    assert!(
        !reader.exists(&p("/ac/m")).await.unwrap_or(true),
        "{at} a create after close happened"
    );
    env.finish().await
}
