//! Cases on the recipes built on the trait: the distributed lock and leader election.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use registry_core::recipes::{Election, Mutex};
use registry_core::{Bytes, CreateMode, Expected};

use crate::fixture::{Fault, Fixture};
use crate::support::{p, session_of, until_queued, CaseEnv, Outcome};

/// Five clients take the lock in turns: never two holders at once, and each holder's
/// fencing token is larger than every earlier one.
pub async fn lock_mutual_exclusion(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "lock_mutual_exclusion");
    let at = env.at();
    let inside = Arc::new(AtomicBool::new(false));
    let last_token = Arc::new(AtomicU64::new(0));
    // A counter outside the lock directory, read and written under the lock.
    let counter = p("/counter/m");
    let setup = env.client().await;
    setup
        .create(&counter, Bytes::from("0"), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("{at} create {counter}: {e}"));
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let client = env.client().await;
        let mutex = Mutex::new(client.clone(), p("/locks/m"));
        let (inside, last_token, at, counter) = (
            inside.clone(),
            last_token.clone(),
            at.clone(),
            counter.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for _ in 0..3 {
                let guard = mutex
                    .lock()
                    .await
                    .unwrap_or_else(|e| panic!("{at} lock: {e}"));
                assert!(
                    !inside.swap(true, Ordering::SeqCst),
                    "{at} two holders at once"
                );
                let token = guard.fencing_token();
                let prev = last_token.swap(token, Ordering::SeqCst);
                assert!(token > prev, "{at} fencing token {token} not above {prev}");
                // Hold across server round trips: an overlapping holder would see `inside`
                // set, and a read-modify-write race would lose an increment.
                let node = client
                    .get(&counter)
                    .await
                    .unwrap_or_else(|e| panic!("{at} get {counter}: {e}"));
                let n: u64 = std::str::from_utf8(&node.value)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{at} counter holds {:?}", node.value));
                client
                    .set(&counter, Bytes::from((n + 1).to_string()), Expected::Any)
                    .await
                    .unwrap_or_else(|e| panic!("{at} set {counter}: {e}"));
                inside.store(false, Ordering::SeqCst);
                guard
                    .unlock()
                    .await
                    .unwrap_or_else(|e| panic!("{at} unlock: {e}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap_or_else(|e| panic!("{at} contender: {e}"));
    }
    let total = setup
        .get(&counter)
        .await
        .unwrap_or_else(|e| panic!("{at} get {counter}: {e}"))
        .value;
    assert_eq!(
        total,
        Bytes::from("15"),
        "{at} increments lost under the lock"
    );
    env.finish().await
}

/// With 20 waiters queued, each release wakes exactly one of them (no herd).
pub async fn lock_no_herd(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "lock_no_herd");
    let at = env.at();
    let holder = Mutex::new(env.client().await, p("/locks/h"));
    let guard = holder
        .lock()
        .await
        .unwrap_or_else(|e| panic!("{at} first lock: {e}"));
    let mut waiters = Vec::new();
    let mut handles = Vec::new();
    for i in 0..20 {
        let client = env.client().await;
        let mutex = Mutex::new(client.clone(), p("/locks/h"));
        handles.push(mutex.clone());
        let at_task = at.clone();
        waiters.push(tokio::spawn(async move {
            let g = mutex
                .lock()
                .await
                .unwrap_or_else(|e| panic!("{at_task} waiter {i}: {e}"));
            g.unlock()
                .await
                .unwrap_or_else(|e| panic!("{at_task} waiter {i} unlock: {e}"));
        }));
        // Queue in a known order so each waiter has exactly one predecessor.
        let reader = client.clone();
        until_queued(
            &reader,
            &p("/locks/h"),
            i + 2,
            &format!("{at} waiter {i} queued"),
        )
        .await;
    }
    guard
        .unlock()
        .await
        .unwrap_or_else(|e| panic!("{at} unlock: {e}"));
    for w in waiters {
        tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .unwrap_or_else(|_| panic!("{at} waiters did not all get the lock"))
            .unwrap_or_else(|e| panic!("{at} {e}"));
    }
    let wake_ups: u64 = handles.iter().map(|m| m.wake_ups()).sum();
    assert_eq!(
        wake_ups, 20,
        "{at} 20 releases woke waiters {wake_ups} times (a herd)"
    );
    env.finish().await
}

/// `try_lock` fails while the lock is held; a timed-out or cancelled `lock()` leaves no node.
pub async fn lock_cancelled_leaves_no_node(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "lock_cancelled_leaves_no_node");
    let at = env.at();
    let a = Mutex::new(env.client().await, p("/locks/c"));
    let reader = env.client().await;
    let b = Mutex::new(env.client().await, p("/locks/c"));
    let guard = a.lock().await.unwrap_or_else(|e| panic!("{at} lock: {e}"));
    assert!(
        b.try_lock()
            .await
            .unwrap_or_else(|e| panic!("{at} try_lock: {e}"))
            .is_none(),
        "{at} try_lock succeeded while held"
    );
    assert!(
        b.lock_timeout(Duration::from_millis(200)).await.is_err(),
        "{at} lock_timeout succeeded while held"
    );
    // The timed-out lock's node goes: only the holder's is left, so the node counted below
    // is the pending lock's, not a leftover.
    until_queued(
        &reader,
        &p("/locks/c"),
        1,
        &format!("{at} the timed-out lock's node removed"),
    )
    .await;
    let pending = tokio::spawn({
        let b = b.clone();
        async move { b.lock().await.map(|_| ()) }
    });
    until_queued(
        &reader,
        &p("/locks/c"),
        2,
        &format!("{at} pending lock queued"),
    )
    .await;
    pending.abort();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found = reader.children(&p("/locks/c")).await.map(|c| {
            c.nodes
                .iter()
                .map(|n| format!("{} owner {:?}", n.path, n.ephemeral_owner))
                .collect::<Vec<_>>()
        });
        if found.as_ref().is_ok_and(|names| names.len() == 1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{at} only the holder's node should remain after 10 s; found {found:?} (holder token {})",
            guard.fencing_token()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(guard.is_held(), "{at} holder lost the lock");
    guard
        .unlock()
        .await
        .unwrap_or_else(|e| panic!("{at} unlock: {e}"));
    env.finish().await
}

/// Nodes under a lock's or an election's path that the recipe did not make (a persistent
/// node, a deeper path's parent, an ephemeral node of another name) take no turn: the lock is
/// free, a campaign wins at once, and the leader named is the candidate.
pub async fn recipes_skip_foreign_nodes(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "recipes_skip_foreign_nodes");
    let at = env.at();
    let other = env.client().await;
    for dir in ["/locks/f", "/el/f"] {
        for (path, mode) in [
            (format!("{dir}/config"), CreateMode::Persistent),
            (format!("{dir}/sub/leaf"), CreateMode::Persistent),
            (format!("{dir}/lock-foreign"), CreateMode::Ephemeral),
            (format!("{dir}/candidate-foreign"), CreateMode::Ephemeral),
        ] {
            other
                .create(&p(&path), Bytes::from("x"), mode)
                .await
                .unwrap_or_else(|e| panic!("{at} create {path}: {e}"));
        }
    }
    let mutex = Mutex::new(env.client().await, p("/locks/f"));
    let guard = mutex
        .try_lock()
        .await
        .unwrap_or_else(|e| panic!("{at} try_lock: {e}"))
        .unwrap_or_else(|| panic!("{at} try_lock: a foreign node was taken for a holder"));
    guard
        .unlock()
        .await
        .unwrap_or_else(|e| panic!("{at} unlock: {e}"));
    let guard = mutex
        .lock_timeout(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{at} lock behind foreign nodes: {e}"));
    guard
        .unlock()
        .await
        .unwrap_or_else(|e| panic!("{at} unlock: {e}"));

    let election = Election::new(env.client().await, p("/el/f"));
    assert_eq!(
        election.leader().await.ok().flatten(),
        None,
        "{at} a foreign node named leader"
    );
    let leadership =
        tokio::time::timeout(Duration::from_secs(10), election.campaign(Bytes::from("a")))
            .await
            .unwrap_or_else(|_| panic!("{at} campaign behind foreign nodes did not win"))
            .unwrap_or_else(|e| panic!("{at} campaign: {e}"));
    assert_eq!(
        election.leader().await.ok().flatten().map(|l| l.value),
        Some(Bytes::from("a")),
        "{at} leader()"
    );
    let mut leaders = election
        .observe()
        .await
        .unwrap_or_else(|e| panic!("{at} observe: {e}"));
    match tokio::time::timeout(Duration::from_secs(10), leaders.next()).await {
        Ok(Some(Ok(Some(leader)))) => {
            assert_eq!(leader.token, leadership.token(), "{at} observed leader")
        }
        other => panic!("{at} observe: {other:?}"),
    }
    leadership
        .resign()
        .await
        .unwrap_or_else(|e| panic!("{at} resign: {e}"));
    env.finish().await
}

/// A holder whose session expires is told at once and never believes it still holds the
/// lock; the next contender gets it with a larger token.
pub async fn lock_lost_on_session_expiry(fx: &dyn Fixture) -> Outcome {
    if !fx.supports(Fault::ExpireSession) {
        return Outcome::Skipped("fixture cannot expire sessions".into());
    }
    let mut env = CaseEnv::new(fx, "lock_lost_on_session_expiry");
    let at = env.at();
    let holder_client = env.client().await;
    let holder = Mutex::new(holder_client.clone(), p("/locks/x"));
    let guard = holder
        .lock()
        .await
        .unwrap_or_else(|e| panic!("{at} lock: {e}"));
    let next = Mutex::new(env.client().await, p("/locks/x"));
    let waiter = tokio::spawn(async move { next.lock().await.map(|g| (g.fencing_token(), g)) });
    fx.expire_session(session_of(&holder_client))
        .await
        .unwrap_or_else(|e| panic!("{at} expire: {e}"));
    tokio::time::timeout(fx.expiry_bound() + Duration::from_secs(5), guard.lost())
        .await
        .unwrap_or_else(|_| panic!("{at} holder not told of the loss"));
    assert!(
        !guard.is_held(),
        "{at} holder still believes it holds the lock"
    );
    let (token, next_guard) =
        tokio::time::timeout(fx.expiry_bound() + Duration::from_secs(5), waiter)
            .await
            .unwrap_or_else(|_| panic!("{at} next contender never got the lock"))
            .unwrap_or_else(|e| panic!("{at} {e}"))
            .unwrap_or_else(|e| panic!("{at} next lock: {e}"));
    assert!(token > guard.fencing_token(), "{at} token did not grow");
    next_guard
        .unlock()
        .await
        .unwrap_or_else(|e| panic!("{at} unlock: {e}"));
    env.finish().await
}

/// Three candidates: one leader at a time, observers see each, resigning hands over, and
/// tokens grow.
pub async fn election_single_leader(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "election_single_leader");
    let at = env.at();
    let observer = Election::new(env.client().await, p("/el/e"));
    let mut leaders = observer
        .observe()
        .await
        .unwrap_or_else(|e| panic!("{at} observe: {e}"));
    let mut tokens = Vec::new();
    let first = Election::new(env.client().await, p("/el/e"))
        .campaign(Bytes::from("a"))
        .await
        .unwrap_or_else(|e| panic!("{at} campaign: {e}"));
    tokens.push(first.token());
    let b = Election::new(env.client().await, p("/el/e"));
    let c = Election::new(env.client().await, p("/el/e"));
    let tb = tokio::spawn(async move { b.campaign(Bytes::from("b")).await });
    let tc = tokio::spawn(async move { c.campaign(Bytes::from("c")).await });
    // Both candidates queued first, so the window below tests waiting, not slow creates.
    let reader = env.client().await;
    until_queued(
        &reader,
        &p("/el/e"),
        3,
        &format!("{at} candidates b and c queued"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !tb.is_finished() && !tc.is_finished(),
        "{at} a second leader while the first leads"
    );
    assert_eq!(
        observer.leader().await.ok().flatten().map(|l| l.value),
        Some(Bytes::from("a")),
        "{at} leader()"
    );
    first
        .resign()
        .await
        .unwrap_or_else(|e| panic!("{at} resign: {e}"));
    let (second, other) = match futures::future::select(tb, tc).await {
        futures::future::Either::Left((r, other)) | futures::future::Either::Right((r, other)) => {
            (r, other)
        }
    };
    let second = second
        .unwrap_or_else(|e| panic!("{at} {e}"))
        .unwrap_or_else(|e| panic!("{at} campaign: {e}"));
    assert!(second.is_leader() && !other.is_finished(), "{at} handover");
    tokens.push(second.token());
    second
        .resign()
        .await
        .unwrap_or_else(|e| panic!("{at} resign: {e}"));
    let third = tokio::time::timeout(Duration::from_secs(10), other)
        .await
        .unwrap_or_else(|_| panic!("{at} third never led"))
        .unwrap_or_else(|e| panic!("{at} {e}"))
        .unwrap_or_else(|e| panic!("{at} campaign: {e}"));
    tokens.push(third.token());
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "{at} tokens not increasing: {tokens:?}"
    );
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(10), leaders.next()).await {
            Ok(Some(Ok(Some(l)))) if seen.last() != Some(&l.token) => seen.push(l.token),
            Ok(Some(Ok(_))) => {}
            other => panic!("{at} observer stopped: {other:?}; saw {seen:?}"),
        }
    }
    assert_eq!(seen, tokens, "{at} observer saw other leaders");
    third
        .resign()
        .await
        .unwrap_or_else(|e| panic!("{at} resign: {e}"));
    env.finish().await
}

/// A leader whose session expires loses leadership and a waiting candidate takes over within
/// the expiry bound plus a second.
pub async fn election_leader_lost_on_session_expiry(fx: &dyn Fixture) -> Outcome {
    if !fx.supports(Fault::ExpireSession) {
        return Outcome::Skipped("fixture cannot expire sessions".into());
    }
    let mut env = CaseEnv::new(fx, "election_leader_lost_on_session_expiry");
    let at = env.at();
    let leader_client = env.client().await;
    let leader = Election::new(leader_client.clone(), p("/el/x"))
        .campaign(Bytes::from("a"))
        .await
        .unwrap_or_else(|e| panic!("{at} campaign: {e}"));
    let b = Election::new(env.client().await, p("/el/x"));
    let next = tokio::spawn(async move { b.campaign(Bytes::from("b")).await });
    fx.expire_session(session_of(&leader_client))
        .await
        .unwrap_or_else(|e| panic!("{at} expire: {e}"));
    let bound = fx.expiry_bound() + Duration::from_secs(1);
    tokio::time::timeout(bound, leader.lost())
        .await
        .unwrap_or_else(|_| panic!("{at} leader not told within {bound:?}"));
    assert!(!leader.is_leader(), "{at} old leader still leads");
    let new = tokio::time::timeout(bound, next)
        .await
        .unwrap_or_else(|_| panic!("{at} no new leader within {bound:?}"))
        .unwrap_or_else(|e| panic!("{at} {e}"))
        .unwrap_or_else(|e| panic!("{at} campaign: {e}"));
    assert!(new.token() > leader.token(), "{at} token did not grow");
    new.resign()
        .await
        .unwrap_or_else(|e| panic!("{at} resign: {e}"));
    env.finish().await
}
