//! DualRegistry, copy, diff and Mirror on the in-memory backend: each guarantee of their
//! rustdoc, including failures of one side. The real-server migration runbook is tested in
//! conformance-tests/tests/migration.rs.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use registry_core::memory::{MemoryOptions, MemoryRegistry, MemoryStore};
use registry_core::migrate::{self, CopyOptions, DifferenceKind, Mirror, MirrorChange};
use registry_core::{
    Bytes, CreateMode, DeleteScope, DualOptions, DualRegistry, Error, Expected, NodePath,
    RegisterOptions, Registry, ResyncReason, WatchEvent, WatchOptions,
};

const WAIT: Duration = Duration::from_secs(5);

/// A mirror of `root` from `src` to `dst`, and what it reports, in order.
fn observed(
    src: &Arc<dyn Registry>,
    dst: &Arc<dyn Registry>,
    root: &str,
) -> (Mirror, tokio::sync::mpsc::UnboundedReceiver<MirrorChange>) {
    let (tx, changes) = tokio::sync::mpsc::unbounded_channel();
    let mirror = Mirror::start_with_observer(src.clone(), dst.clone(), p(root), move |c| {
        let _ = tx.send(c);
    });
    (mirror, changes)
}

fn p(s: &str) -> NodePath {
    NodePath::new(s).unwrap()
}

/// A primary and a secondary on stores of their own, and a DualRegistry merging their reads.
async fn merged() -> (Arc<dyn Registry>, Arc<dyn Registry>, DualRegistry) {
    let (pa, sb) = (
        client(&MemoryStore::new()).await,
        client(&MemoryStore::new()).await,
    );
    let dual = DualRegistry::new(
        pa.clone(),
        sb.clone(),
        DualOptions::new().with_merge_reads(true),
    );
    (pa, sb, dual)
}

/// A merged watch starts afresh (the merge has no history), but a revision no backend can
/// reach is refused first, as each backend refuses it.
#[tokio::test]
async fn a_merged_watch_after_an_unreachable_revision_is_refused() {
    let (_, _, dual) = merged().await;
    let past = registry_core::Revision(registry_core::Revision::MAX_WATCH_AFTER.0 + 1);
    let refused = dual
        .watch(&p("/x"), WatchOptions::node().after(past))
        .await
        .map(drop);
    assert!(
        matches!(refused, Err(Error::InvalidArgument(_))),
        "{refused:?}"
    );
}

async fn client(store: &MemoryStore) -> Arc<dyn Registry> {
    Arc::new(
        MemoryRegistry::connect(
            store,
            MemoryOptions::default().with_session_ttl(Duration::from_millis(500)),
        )
        .await
        .unwrap(),
    )
}

async fn value(reg: &dyn Registry, path: &str) -> Option<Bytes> {
    match reg.get(&p(path)).await {
        Ok(n) => Some(n.value),
        Err(Error::NotFound { .. }) => None,
        Err(e) => panic!("get {path}: {e}"),
    }
}

/// Polls until `check` holds, up to 5 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not within 5 s: {what}");
}

async fn next_event(stream: &mut registry_core::WatchStream) -> WatchEvent {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("no watch event within 5 s")
        .expect("watch stream ended")
        .expect("watch stream error")
}

#[tokio::test]
async fn dual_writes_reach_both_and_reads_come_from_the_primary() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (pa, sb) = (client(&a).await, client(&b).await);
    let dual = DualRegistry::new(pa.clone(), sb.clone(), DualOptions::new());

    dual.create(&p("/cfg/x"), Bytes::from("1"), CreateMode::Persistent)
        .await
        .unwrap();
    dual.set(&p("/cfg/x"), Bytes::from("2"), Expected::Version(0))
        .await
        .unwrap();
    assert_eq!(value(&*pa, "/cfg/x").await, Some(Bytes::from("2")));
    assert_eq!(value(&*sb, "/cfg/x").await, Some(Bytes::from("2")));

    // The primary's version check is the one that counts.
    let stale = dual
        .set(&p("/cfg/x"), Bytes::from("3"), Expected::Version(0))
        .await;
    assert!(
        matches!(stale, Err(Error::VersionMismatch { .. })),
        "{stale:?}"
    );
    assert_eq!(value(&*sb, "/cfg/x").await, Some(Bytes::from("2")));

    // A sequential create is counted once: the secondary gets the primary's exact name.
    sb.create(&p("/seq/other"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    let made = dual
        .create(&p("/seq/n"), Bytes::new(), CreateMode::PersistentSequential)
        .await
        .unwrap();
    assert!(
        sb.exists(&made.path).await.unwrap(),
        "{} not on the secondary",
        made.path
    );

    // Reads come from the primary only.
    sb.create(&p("/only-secondary"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    assert!(!dual.exists(&p("/only-secondary")).await.unwrap());

    dual.delete(&p("/cfg"), Expected::Any, DeleteScope::Recursive)
        .await
        .unwrap();
    assert_eq!(value(&*pa, "/cfg/x").await, None);
    assert_eq!(value(&*sb, "/cfg/x").await, None);
}

#[tokio::test]
async fn dual_create_failing_on_the_secondary_is_undone_on_the_primary() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (pa, sb) = (client(&a).await, client(&b).await);
    let dual = DualRegistry::new(pa.clone(), sb.clone(), DualOptions::new());
    sb.close().await.unwrap();
    let made = dual
        .create(&p("/x"), Bytes::from("v"), CreateMode::Persistent)
        .await;
    assert!(matches!(made, Err(Error::Closed)), "{made:?}");
    assert_eq!(
        value(&*pa, "/x").await,
        None,
        "half-written create left on the primary"
    );
}

/// A caller that stops waiting (a timeout) between the two sides' writes used to stop the
/// write there: the primary kept a create the secondary refused, or a delete the secondary
/// never got.
#[tokio::test]
async fn dual_writes_dropped_midway_still_finish_on_both_sides() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (pa, sb) = (client(&a).await, client(&b).await);
    sb.create(&p("/taken"), Bytes::from("theirs"), CreateMode::Persistent)
        .await
        .unwrap();
    let secondary = support::Faulty::new(sb.clone());
    let (gate, open) = tokio::sync::watch::channel(false);
    secondary.on_create(Arc::new(move |_, answer| {
        let mut open = open.clone();
        Box::pin(async move {
            let _ = open.wait_for(|open| *open).await;
            answer
        })
    }));
    let dual = DualRegistry::new(pa.clone(), secondary.clone(), DualOptions::new());
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        dual.create(&p("/taken"), Bytes::from("ours"), CreateMode::Ephemeral),
    )
    .await;
    assert!(gave_up.is_err(), "the create did not wait: {gave_up:?}");
    assert!(
        value(&*pa, "/taken").await.is_some(),
        "the primary's create had not run"
    );
    gate.send_replace(true);
    eventually("the refused create undone on the primary", || async {
        value(&*pa, "/taken").await.is_none()
    })
    .await;

    dual.create(&p("/gone"), Bytes::from("v"), CreateMode::Persistent)
        .await
        .unwrap();
    secondary.hold_deletes(true);
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        dual.delete(&p("/gone"), Expected::Any, DeleteScope::Node),
    )
    .await;
    assert!(gave_up.is_err(), "the delete did not wait: {gave_up:?}");
    assert_eq!(value(&*pa, "/gone").await, None);
    secondary.hold_deletes(false);
    eventually("the delete finished on the secondary", || async {
        value(&*sb, "/gone").await.is_none()
    })
    .await;
}

/// A write whose caller gave up (a timeout) used to finish in the background after the
/// caller's next write, and land on the secondary over it.
#[tokio::test]
async fn dual_write_dropped_midway_never_lands_after_a_later_one() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (pa, sb) = (client(&a).await, client(&b).await);
    let secondary = support::Faulty::new(sb.clone());
    let dual = DualRegistry::new(pa.clone(), secondary.clone(), DualOptions::new());
    dual.create(&p("/x"), Bytes::from("v0"), CreateMode::Persistent)
        .await
        .unwrap();
    // The secondary's first write waits at the gate; every write's answer is reported.
    let (gate, open) = tokio::sync::watch::channel(false);
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    secondary.before_set(Some(Arc::new(move |_| {
        let mut open = open.clone();
        let first = first.swap(false, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            if first {
                let _ = open.wait_for(|open| *open).await;
            }
        })
    })));
    let (written, mut answers) = tokio::sync::mpsc::unbounded_channel();
    secondary.on_set(Arc::new(move |_, answer| {
        if let Ok(node) = &answer {
            let _ = written.send(node.value.clone());
        }
        Box::pin(async move { answer })
    }));
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        dual.set(&p("/x"), Bytes::from("v1"), Expected::Any),
    )
    .await;
    assert!(gave_up.is_err(), "the set did not wait: {gave_up:?}");
    let mut later = tokio::spawn({
        let dual = dual.clone();
        async move { dual.set(&p("/x"), Bytes::from("v2"), Expected::Any).await }
    });
    // Waits for its turn behind the first (it used to go ahead and finish here).
    let _ = tokio::time::timeout(Duration::from_millis(200), &mut later).await;
    gate.send_replace(true);
    let mut seen = Vec::new();
    while !(seen.contains(&Bytes::from("v1")) && seen.contains(&Bytes::from("v2"))) {
        let value = tokio::time::timeout(WAIT, answers.recv())
            .await
            .expect("both writes did not reach the secondary within 5 s")
            .expect("hook gone");
        seen.push(value);
    }
    assert_eq!(
        seen.last(),
        Some(&Bytes::from("v2")),
        "order on the secondary: {seen:?}"
    );
    assert_eq!(value(&*sb, "/x").await, Some(Bytes::from("v2")));
    assert_eq!(value(&*pa, "/x").await, Some(Bytes::from("v2")));
}

/// A path the target holds as a live session's ephemeral node is written once that node is
/// gone (it used to stay missing until the mirror started over for some other reason).
#[tokio::test]
async fn mirror_writes_a_held_path_once_the_session_node_is_gone() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (src, dst, session) = (client(&a).await, client(&b).await, client(&b).await);
    src.create(
        &p("/soa/config/x"),
        Bytes::from("v"),
        CreateMode::Persistent,
    )
    .await
    .unwrap();
    session
        .create(
            &p("/soa/config/x"),
            Bytes::from("live"),
            CreateMode::Ephemeral,
        )
        .await
        .unwrap();
    let (mirror, mut changes) = observed(&src, &dst, "/soa");
    mirror.wait_synced(WAIT).await.unwrap();
    match tokio::time::timeout(WAIT, changes.recv()).await.unwrap() {
        Some(MirrorChange::Synced { held, .. }) => assert_eq!(held, 1),
        other => panic!("expected the first sync, got {other:?}"),
    }
    assert_eq!(mirror.status().held, 1);

    session.close().await.unwrap();
    match tokio::time::timeout(WAIT, changes.recv()).await.unwrap() {
        Some(MirrorChange::Put(path)) => assert_eq!(path, p("/soa/config/x")),
        other => panic!("expected the held path written, got {other:?}"),
    }
    let node = dst.get(&p("/soa/config/x")).await.unwrap();
    assert_eq!(node.value, Bytes::from("v"));
    assert!(!node.is_ephemeral());
    assert_eq!(mirror.status().held, 0);
    mirror.stop().await;
}

/// A path deleted in the source but kept in the target for live ephemeral nodes below it is
/// deleted once they go, by a followed deletion and by a full sync alike; meanwhile the
/// status counts it (it used to stay for good while the mirror said it was in sync).
#[tokio::test]
async fn mirror_deletes_a_kept_path_once_the_live_nodes_below_it_are_gone() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (src, dst, instances) = (client(&a).await, client(&b).await, client(&b).await);
    for service in ["/soa/s/followed", "/soa/s/synced"] {
        src.create(&p(service), Bytes::from("cfg"), CreateMode::Persistent)
            .await
            .unwrap();
    }
    let (mirror, mut changes) = observed(&src, &dst, "/soa");
    mirror.wait_synced(WAIT).await.unwrap();
    for service in ["/soa/s/followed", "/soa/s/synced"] {
        instances
            .create(
                &p(&format!("{service}/i1")),
                Bytes::new(),
                CreateMode::Ephemeral,
            )
            .await
            .unwrap();
    }
    // Followed: the source's deletion meets the live instance.
    src.delete(&p("/soa/s/followed"), Expected::Any, DeleteScope::Node)
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(WAIT, changes.recv()).await.unwrap() {
            Some(MirrorChange::Kept(path)) => {
                assert_eq!(path, p("/soa/s/followed"));
                break;
            }
            Some(MirrorChange::Synced { .. }) => {}
            other => panic!("expected the service node kept, got {other:?}"),
        }
    }
    assert_eq!(mirror.status().kept, 1);
    // Synced: a new mirror finds the source without the node and the target with it.
    mirror.stop().await;
    src.delete(&p("/soa/s/synced"), Expected::Any, DeleteScope::Node)
        .await
        .unwrap();
    let (mirror, mut changes) = observed(&src, &dst, "/soa");
    mirror.wait_synced(WAIT).await.unwrap();
    match tokio::time::timeout(WAIT, changes.recv()).await.unwrap() {
        Some(MirrorChange::Synced { kept, deleted, .. }) => assert_eq!((kept, deleted), (2, 0)),
        other => panic!("expected the first sync, got {other:?}"),
    }
    assert_eq!(mirror.status().kept, 2);
    assert!(mirror.status().synced);

    instances.close().await.unwrap();
    let mut deleted = Vec::new();
    while deleted.len() < 2 {
        match tokio::time::timeout(WAIT, changes.recv()).await.unwrap() {
            Some(MirrorChange::Deleted(path)) => deleted.push(path),
            other => panic!("expected the kept paths deleted, got {other:?}"),
        }
    }
    deleted.sort();
    assert_eq!(deleted, [p("/soa/s/followed"), p("/soa/s/synced")]);
    assert_eq!(mirror.status().kept, 0);
    assert!(migrate::diff(&*src, &*dst, &p("/soa"))
        .await
        .unwrap()
        .is_empty());
    mirror.stop().await;
}

/// A persistent create or write through the dual never lands in a live session's ephemeral
/// node on the secondary (its value would go with that session): the create is refused and
/// undone on the primary, the write is refused.
#[tokio::test]
async fn dual_writes_leave_a_live_sessions_ephemeral_node_on_the_secondary_alone() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (pa, sb, session) = (client(&a).await, client(&b).await, client(&b).await);
    let dual = DualRegistry::new(pa.clone(), sb.clone(), DualOptions::new());
    session
        .create(&p("/c/x"), Bytes::from("live"), CreateMode::Ephemeral)
        .await
        .unwrap();
    let live = || async { sb.get(&p("/c/x")).await.unwrap() };
    let before = live().await;

    let made = dual
        .create(&p("/c/x"), Bytes::from("v"), CreateMode::Persistent)
        .await;
    assert!(matches!(made, Err(Error::AlreadyExists { .. })), "{made:?}");
    assert_eq!(
        value(&*pa, "/c/x").await,
        None,
        "the create stayed on the primary"
    );
    assert_eq!(live().await, before);

    pa.create(&p("/c/x"), Bytes::from("v1"), CreateMode::Persistent)
        .await
        .unwrap();
    let written = dual.set(&p("/c/x"), Bytes::from("v2"), Expected::Any).await;
    assert!(
        matches!(written, Err(Error::AlreadyExists { .. })),
        "{written:?}"
    );
    assert_eq!(live().await, before);
}

/// A failed create must not leave this session's ephemeral node on the primary, even when
/// another writer changed it before the undo (the versioned undo used to fail then, and the
/// node stayed on the primary only).
#[tokio::test]
async fn dual_ephemeral_create_is_undone_whatever_others_wrote_to_it() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (pa, sb, other) = (client(&a).await, client(&b).await, client(&a).await);
    sb.create(&p("/x"), Bytes::from("theirs"), CreateMode::Persistent)
        .await
        .unwrap();
    let secondary = support::Faulty::new(sb.clone());
    secondary.on_create(Arc::new(move |path, answer| {
        let other = other.clone();
        Box::pin(async move {
            other
                .set(&path, Bytes::from("changed"), Expected::Any)
                .await
                .unwrap();
            answer
        })
    }));
    let dual = DualRegistry::new(pa.clone(), secondary, DualOptions::new());
    let made = dual
        .create(&p("/x"), Bytes::from("ours"), CreateMode::Ephemeral)
        .await;
    assert!(matches!(made, Err(Error::AlreadyExists { .. })), "{made:?}");
    assert_eq!(
        value(&*pa, "/x").await,
        None,
        "the failed create left its node on the primary"
    );
}

#[tokio::test]
async fn dual_registration_lives_on_both_and_heals_each_side() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (pa, sb) = (client(&a).await, client(&b).await);
    let dual = DualRegistry::new(pa.clone(), sb.clone(), DualOptions::new());
    let path = p("/soa/runtime/services/S/10.0.0.1:9090:1.0.0");
    let reg = dual
        .register(&path, Bytes::from("v1"), RegisterOptions::new())
        .await
        .unwrap();
    assert!(pa.exists(&path).await.unwrap() && sb.exists(&path).await.unwrap());

    // The secondary's session is lost: its own copy comes back.
    let lost = sb.session().session_id.unwrap();
    b.expire_session(lost).unwrap();
    eventually("registration back on the secondary", || async {
        match sb.get(&path).await {
            Ok(n) => n.ephemeral_owner.is_some() && n.ephemeral_owner != Some(lost),
            Err(_) => false,
        }
    })
    .await;

    reg.set_value(Bytes::from("v2")).await.unwrap();
    assert_eq!(value(&*pa, path.as_str()).await, Some(Bytes::from("v2")));
    assert_eq!(value(&*sb, path.as_str()).await, Some(Bytes::from("v2")));

    reg.deregister().await.unwrap();
    assert!(!pa.exists(&path).await.unwrap());
    assert!(!sb.exists(&path).await.unwrap());
}

/// Each backend used to count a sequential registration's name itself, so a merged view
/// showed the provider twice, under two names.
#[tokio::test]
async fn dual_sequential_registration_has_one_name_on_both_sides() {
    let (pa, sb, dual) = merged().await;
    // The secondary's counter runs ahead of the primary's.
    for _ in 0..3 {
        sb.create(
            &p("/svc/other-"),
            Bytes::new(),
            CreateMode::PersistentSequential,
        )
        .await
        .unwrap();
    }
    let reg = dual
        .register(
            &p("/svc/i-"),
            Bytes::from("v"),
            RegisterOptions::new().sequential(),
        )
        .await
        .unwrap();
    let name = reg.path().expect("registered");
    assert_eq!(value(&*pa, name.as_str()).await, Some(Bytes::from("v")));
    assert_eq!(value(&*sb, name.as_str()).await, Some(Bytes::from("v")));
    let listed = dual.children(&p("/svc")).await.unwrap();
    let ours: Vec<_> = listed.nodes.iter().filter(|n| n.is_ephemeral()).collect();
    assert_eq!(ours.len(), 1, "the merged view shows {ours:?}");
    reg.deregister().await.unwrap();
    assert_eq!(value(&*pa, name.as_str()).await, None);
    assert_eq!(value(&*sb, name.as_str()).await, None);
}

/// A primary, a secondary, the secondary behind a `Faulty` that loses every create's answer
/// (the create happens), and a DualRegistry over the two.
async fn losing_secondary_create_replies() -> (
    Arc<dyn Registry>,
    Arc<dyn Registry>,
    Arc<support::Faulty>,
    DualRegistry,
) {
    let (pa, sb) = (
        client(&MemoryStore::new()).await,
        client(&MemoryStore::new()).await,
    );
    let faulty = support::Faulty::new(sb.clone());
    faulty.lose_create_replies();
    let dual = DualRegistry::new(pa.clone(), faulty.clone(), DualOptions::new());
    (pa, sb, faulty, dual)
}

/// A create whose answer the secondary lost is read back there: it happened, so the call
/// succeeds on both sides (the primary's node used to be undone, the secondary's left, and a
/// retried ephemeral create failed for good on it). Unreadable, it fails on both: the
/// secondary's ephemeral node is removed with the primary's.
#[tokio::test]
async fn dual_create_whose_secondary_answer_was_lost_is_read_back() {
    let (pa, sb, faulty, dual) = losing_secondary_create_replies().await;
    for (path, mode) in [
        ("/svc/e", CreateMode::Ephemeral),
        ("/svc/p", CreateMode::Persistent),
        ("/svc/s-", CreateMode::EphemeralSequential),
        ("/svc/q-", CreateMode::PersistentSequential),
    ] {
        let made = dual
            .create(&p(path), Bytes::from("v"), mode)
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        assert_eq!(
            value(&*pa, made.path.as_str()).await,
            Some(Bytes::from("v"))
        );
        assert_eq!(
            value(&*sb, made.path.as_str()).await,
            Some(Bytes::from("v"))
        );
    }

    faulty.fail_gets(true);
    let made = dual
        .create(&p("/svc/lost"), Bytes::from("v"), CreateMode::Ephemeral)
        .await;
    assert!(made.is_err(), "{made:?}");
    assert_eq!(value(&*pa, "/svc/lost").await, None);
    assert_eq!(
        value(&*sb, "/svc/lost").await,
        None,
        "left on the secondary"
    );
}

/// A sequential name the secondary already holds, made by its own counter, is never written
/// over (a persistent one used to be), nor fails the create (an ephemeral one did): the
/// create moves on to the primary's next name on both sides.
#[tokio::test]
async fn dual_sequential_create_moves_past_a_name_the_secondary_holds() {
    let (pa, sb, legacy) = {
        let b = MemoryStore::new();
        (
            client(&MemoryStore::new()).await,
            client(&b).await,
            client(&b).await,
        )
    };
    let dual = DualRegistry::new(pa.clone(), sb.clone(), DualOptions::new());
    for (prefix, mode) in [
        ("/q/job-", CreateMode::PersistentSequential),
        ("/lock/n-", CreateMode::EphemeralSequential),
    ] {
        let theirs = legacy
            .create(&p(prefix), Bytes::from("theirs"), mode)
            .await
            .unwrap();
        let ours = dual
            .create(&p(prefix), Bytes::from("ours"), mode)
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        assert_ne!(ours.path, theirs.path, "{mode:?}");
        let kept = sb.get(&theirs.path).await.unwrap();
        assert_eq!(
            (kept.value, kept.ephemeral_owner),
            (Bytes::from("theirs"), theirs.ephemeral_owner),
            "{mode:?}: the secondary's own node was written over"
        );
        assert_eq!(value(&*pa, theirs.path.as_str()).await, None, "{mode:?}");
        assert_eq!(
            value(&*pa, ours.path.as_str()).await,
            Some(Bytes::from("ours"))
        );
        assert_eq!(
            value(&*sb, ours.path.as_str()).await,
            Some(Bytes::from("ours"))
        );
    }
}

/// A sequential registration whose create on the secondary lost its answer adopts the node
/// it made there (it used to fail and leave that node behind, healed by nothing).
#[tokio::test]
async fn dual_sequential_registration_adopts_a_secondary_node_whose_answer_was_lost() {
    let (pa, sb, faulty, dual) = losing_secondary_create_replies().await;
    let reg = dual
        .register(
            &p("/svc/i-"),
            Bytes::from("v"),
            RegisterOptions::new().sequential(),
        )
        .await
        .unwrap();
    let name = reg.path().expect("registered");
    let on_secondary = sb.children(&p("/svc")).await.unwrap().nodes;
    assert_eq!(
        on_secondary.iter().map(|n| &n.path).collect::<Vec<_>>(),
        [&name]
    );
    reg.deregister().await.unwrap();
    assert!(sb.children(&p("/svc")).await.unwrap().nodes.is_empty());

    faulty.fail_gets(true);
    let reg = dual
        .register(
            &p("/svc/i-"),
            Bytes::from("v"),
            RegisterOptions::new().sequential(),
        )
        .await;
    assert!(
        reg.is_err(),
        "registered without knowing the secondary's node"
    );
    let left = sb.children(&p("/svc")).await.unwrap().nodes;
    assert!(left.is_empty(), "left behind on the secondary: {left:?}");
    assert!(pa.children(&p("/svc")).await.unwrap().nodes.is_empty());
}

/// A write to another session's ephemeral node reaches the secondary only where it has a
/// node there: one created by the dual would be the dual's, and outlive its owner.
#[tokio::test]
async fn dual_set_of_another_sessions_ephemeral_node_creates_none_on_the_secondary() {
    let a = MemoryStore::new();
    let (provider, pa, sb) = (
        client(&a).await,
        client(&a).await,
        client(&MemoryStore::new()).await,
    );
    provider
        .create(&p("/svc/i1"), Bytes::from("w=1"), CreateMode::Ephemeral)
        .await
        .unwrap();
    let dual = DualRegistry::new(pa.clone(), sb.clone(), DualOptions::new());
    dual.set(&p("/svc/i1"), Bytes::from("w=2"), Expected::Any)
        .await
        .unwrap();
    assert_eq!(value(&*pa, "/svc/i1").await, Some(Bytes::from("w=2")));
    assert_eq!(value(&*sb, "/svc/i1").await, None);
    // The dual's own ephemeral node is still written on both.
    dual.create(&p("/svc/own"), Bytes::from("a"), CreateMode::Ephemeral)
        .await
        .unwrap();
    sb.delete(&p("/svc/own"), Expected::Any, DeleteScope::Node)
        .await
        .unwrap();
    dual.set(&p("/svc/own"), Bytes::from("b"), Expected::Any)
        .await
        .unwrap();
    let copy = sb.get(&p("/svc/own")).await.unwrap();
    assert_eq!(copy.value, Bytes::from("b"));
    assert_eq!(copy.ephemeral_owner, sb.session().session_id);
}

/// Where the primary's generated name is taken on the secondary, the secondary generates one
/// of its own rather than failing the registration, and the node holding the name keeps it
/// (a plain registration there used to replace another session's live node as stale).
#[tokio::test]
async fn dual_sequential_registration_whose_name_is_taken_on_the_secondary_still_registers() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (pa, sb, legacy) = (client(&a).await, client(&b).await, client(&b).await);
    let dual = DualRegistry::new(pa.clone(), sb.clone(), DualOptions::new());
    let theirs = legacy
        .create(
            &p("/svc/i-"),
            Bytes::from("theirs"),
            CreateMode::EphemeralSequential,
        )
        .await
        .unwrap();
    let reg = dual
        .register(
            &p("/svc/i-"),
            Bytes::from("v"),
            RegisterOptions::new().sequential(),
        )
        .await
        .unwrap();
    let name = reg.path().expect("registered");
    assert_eq!(name, theirs.path, "the two counters were meant to meet");
    assert_eq!(value(&*pa, name.as_str()).await, Some(Bytes::from("v")));
    let still = sb.get(&theirs.path).await.unwrap();
    assert_eq!(
        (still.value, still.ephemeral_owner),
        (Bytes::from("theirs"), theirs.ephemeral_owner),
        "the other session's node was taken over"
    );
    let on_secondary = sb.children(&p("/svc")).await.unwrap();
    let ours: Vec<_> = on_secondary
        .nodes
        .iter()
        .filter(|n| n.value == "v" && n.is_ephemeral())
        .collect();
    assert_eq!(ours.len(), 1, "secondary holds {on_secondary:?}");
    reg.deregister().await.unwrap();
    assert_eq!(
        value(&*sb, theirs.path.as_str()).await,
        Some(Bytes::from("theirs"))
    );
}

#[tokio::test]
async fn dual_registration_failing_on_the_secondary_leaves_nothing_on_the_primary() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (pa, sb) = (client(&a).await, client(&b).await);
    let dual = DualRegistry::new(pa.clone(), sb.clone(), DualOptions::new());
    sb.close().await.unwrap();
    let path = p("/svc/i1");
    let reg = dual
        .register(&path, Bytes::new(), RegisterOptions::new())
        .await;
    assert!(reg.is_err(), "registered with a closed secondary");
    assert!(!pa.exists(&path).await.unwrap());
}

/// The merged view has no history: a watch asked to start after a revision says so with a
/// `Resync` of the whole merged view, as the contract asks of a backend that cannot replay
/// (it used to refuse the watch with `NotSupported` while declaring it could not replay).
#[tokio::test]
async fn a_merged_watch_from_a_revision_starts_with_a_resync() {
    let (pa, sb, dual) = merged().await;
    pa.create(&p("/svc/a"), Bytes::from("pa"), CreateMode::Persistent)
        .await
        .unwrap();
    sb.create(&p("/svc/b"), Bytes::from("sb"), CreateMode::Persistent)
        .await
        .unwrap();
    assert!(!dual.capabilities().watch_from_revision);
    let listing = dual.children(&p("/svc")).await.unwrap();
    let mut watch = dual
        .watch(&p("/svc"), WatchOptions::children().after(listing.revision))
        .await
        .unwrap();
    match next_event(&mut watch).await {
        WatchEvent::Resync {
            snapshot,
            reason: ResyncReason::StartNotReplayable,
        } => {
            let names: Vec<&str> = snapshot.nodes.iter().map(|n| n.path.name()).collect();
            assert_eq!(names, ["a", "b"]);
        }
        other => panic!("expected a resync of the merged view, got {other:?}"),
    }
    // Then changes as usual, of either side.
    sb.create(&p("/svc/c"), Bytes::from("sc"), CreateMode::Persistent)
        .await
        .unwrap();
    assert!(
        matches!(next_event(&mut watch).await, WatchEvent::Created(n) if n.path == p("/svc/c"))
    );
}

#[tokio::test]
async fn merged_reads_show_both_trees_and_the_primary_wins() {
    let (pa, sb, dual) = merged().await;
    pa.create(&p("/svc/a"), Bytes::from("pa"), CreateMode::Persistent)
        .await
        .unwrap();
    sb.create(&p("/svc/a"), Bytes::from("sa"), CreateMode::Persistent)
        .await
        .unwrap();
    sb.create(&p("/svc/b"), Bytes::from("sb"), CreateMode::Persistent)
        .await
        .unwrap();

    let names: Vec<String> = dual
        .children(&p("/svc"))
        .await
        .unwrap()
        .nodes
        .iter()
        .map(|n| format!("{}={}", n.path.name(), String::from_utf8_lossy(&n.value)))
        .collect();
    assert_eq!(names, ["a=pa", "b=sb"]);
    assert_eq!(
        dual.get(&p("/svc/b")).await.unwrap().value,
        Bytes::from("sb")
    );

    let mut watch = dual
        .watch(&p("/svc"), WatchOptions::children())
        .await
        .unwrap();
    match next_event(&mut watch).await {
        WatchEvent::Snapshot(s) => assert_eq!(s.nodes.len(), 2, "{s:?}"),
        other => panic!("expected the merged snapshot, got {other:?}"),
    }
    // New on the secondary only: created in the merged view.
    sb.create(&p("/svc/c"), Bytes::from("sc"), CreateMode::Persistent)
        .await
        .unwrap();
    assert!(
        matches!(next_event(&mut watch).await, WatchEvent::Created(n) if n.path == p("/svc/c"))
    );
    // Gone from the primary but still on the secondary: the secondary's node shows.
    pa.delete(&p("/svc/a"), Expected::Any, DeleteScope::Node)
        .await
        .unwrap();
    assert!(matches!(next_event(&mut watch).await, WatchEvent::Updated(n) if n.value == "sa"));
    // Gone from both: deleted.
    sb.delete(&p("/svc/a"), Expected::Any, DeleteScope::Node)
        .await
        .unwrap();
    assert!(
        matches!(next_event(&mut watch).await, WatchEvent::Deleted(n) if n.path == p("/svc/a"))
    );
}

/// A target node that turns ephemeral after the up-front check, once writing has begun, used
/// to count as copied when the session's node had the version read (the write landed in it),
/// and otherwise to fail the copy with the same `AlreadyExists` as the check, whose meaning
/// is "nothing written" (and regctl said so), while earlier nodes were written.
#[tokio::test]
async fn copy_that_meets_a_new_ephemeral_node_midway_says_what_it_wrote() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (src, dst, other) = (client(&a).await, client(&b).await, client(&b).await);
    for (path, v) in [("/cfg/a", "1"), ("/cfg/b", "2")] {
        src.create(&p(path), Bytes::from(v), CreateMode::Persistent)
            .await
            .unwrap();
    }
    dst.create(&p("/cfg/b"), Bytes::from("old"), CreateMode::Persistent)
        .await
        .unwrap();
    let target = support::Faulty::new(dst.clone());
    target.before_set(Some(Arc::new(move |path| {
        let other = other.clone();
        Box::pin(async move {
            other
                .delete(&path, Expected::Any, DeleteScope::Node)
                .await
                .unwrap();
            other
                .create(&path, Bytes::from("live"), CreateMode::Ephemeral)
                .await
                .unwrap();
        })
    })));
    let copied = migrate::copy(
        &*src,
        &*target,
        &p("/cfg"),
        CopyOptions::default(),
        |_, _| {},
    )
    .await;
    match copied {
        Err(Error::Backend { message, .. }) => {
            assert!(message.contains("/cfg/b"), "{message}");
            assert!(
                message.contains("after 1 of 2 nodes were written"),
                "{message}"
            );
        }
        other => panic!("expected a copy error that says what was written, got {other:?}"),
    }
    assert_eq!(value(&*dst, "/cfg/a").await, Some(Bytes::from("1")));
    // Replaced within the owner check's round trip (this wrapper checks, then writes, as
    // ZooKeeper must), the node took the value, but it is still the session's and the copy
    // did not count it as copied.
    assert!(dst.get(&p("/cfg/b")).await.unwrap().is_ephemeral());
}

/// A source root that does not exist is an error, not an empty copy (a mistyped path used to
/// succeed doing nothing); a target holding a parent of the root as an ephemeral node is
/// refused up front, dry run or not (a dry run used to succeed, and the copy to fail
/// halfway with an error naming a change "during the copy").
#[tokio::test]
async fn copy_refuses_a_missing_source_root_and_an_ephemeral_parent_up_front() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (src, dst, session) = (client(&a).await, client(&b).await, client(&b).await);
    let copied = migrate::copy(&*src, &*dst, &p("/sao"), CopyOptions::default(), |_, _| {}).await;
    assert!(
        matches!(&copied, Err(Error::NotFound { path }) if *path == p("/sao")),
        "{copied:?}"
    );
    src.create(
        &p("/soa/config/x"),
        Bytes::from("v"),
        CreateMode::Persistent,
    )
    .await
    .unwrap();
    session
        .create(&p("/soa"), Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap();
    for dry_run in [true, false] {
        let copied = migrate::copy(
            &*src,
            &*dst,
            &p("/soa/config"),
            CopyOptions { dry_run },
            |_, _| {},
        )
        .await;
        assert!(
            matches!(&copied, Err(Error::EphemeralParent { parent, .. }) if *parent == p("/soa")),
            "dry run {dry_run}: {copied:?}"
        );
    }
}

#[tokio::test]
async fn copy_is_idempotent_skips_ephemerals_and_dry_run_writes_nothing() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (src, dst) = (client(&a).await, client(&b).await);
    for (path, v) in [
        ("/soa/config/services/S", "timeout/800ms;"),
        ("/soa/config/routes/S", "method match 'x' => ~ip'1.2.3.4'"),
    ] {
        src.create(&p(path), Bytes::from(v), CreateMode::Persistent)
            .await
            .unwrap();
    }
    src.create(
        &p("/soa/runtime/services/S/1.2.3.4:9090:1.0"),
        Bytes::new(),
        CreateMode::Ephemeral,
    )
    .await
    .unwrap();
    let root = p("/soa");

    let dry = migrate::copy(
        &*src,
        &*dst,
        &root,
        CopyOptions { dry_run: true },
        |_, _| {},
    )
    .await
    .unwrap();
    assert!(dry.created > 0);
    assert_eq!(
        value(&*dst, "/soa/config/services/S").await,
        None,
        "dry run wrote"
    );

    let mut calls = Vec::new();
    let first = migrate::copy(
        &*src,
        &*dst,
        &root,
        CopyOptions::default(),
        |done, total| calls.push((done, total)),
    )
    .await
    .unwrap();
    assert_eq!(first, dry);
    assert_eq!(calls.last().map(|c| c.0), calls.last().map(|c| c.1));
    assert!(
        !dst.exists(&p("/soa/runtime/services/S/1.2.3.4:9090:1.0"))
            .await
            .unwrap(),
        "an ephemeral was copied"
    );
    assert!(migrate::diff(&*src, &*dst, &root).await.unwrap().is_empty());

    let again = migrate::copy(&*src, &*dst, &root, CopyOptions::default(), |_, _| {})
        .await
        .unwrap();
    assert_eq!((again.created, again.updated), (0, 0), "{again:?}");

    dst.set(
        &p("/soa/config/services/S"),
        Bytes::from("changed"),
        Expected::Any,
    )
    .await
    .unwrap();
    dst.create(
        &p("/soa/config/extra"),
        Bytes::new(),
        CreateMode::Persistent,
    )
    .await
    .unwrap();
    let kinds: Vec<(DifferenceKind, String)> = migrate::diff(&*src, &*dst, &root)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.kind, d.path.to_string()))
        .collect();
    assert_eq!(
        kinds,
        [
            (DifferenceKind::Extra, "/soa/config/extra".to_owned()),
            (
                DifferenceKind::Different,
                "/soa/config/services/S".to_owned()
            ),
        ]
    );
}

#[tokio::test]
async fn mirror_syncs_follows_and_survives_both_sides_failing() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (src, dst) = (client(&a).await, client(&b).await);
    src.create(
        &p("/soa/config/services/S"),
        Bytes::from("v1"),
        CreateMode::Persistent,
    )
    .await
    .unwrap();
    // In the target only: a stale node (removed) and a service holding a live instance (kept).
    dst.create(
        &p("/soa/config/stale"),
        Bytes::new(),
        CreateMode::Persistent,
    )
    .await
    .unwrap();
    dst.create(
        &p("/soa/runtime/services/T/i1"),
        Bytes::new(),
        CreateMode::Ephemeral,
    )
    .await
    .unwrap();

    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let mirror = Mirror::start_with_observer(src.clone(), dst.clone(), p("/soa"), move |c| {
        log.lock().unwrap().push(c)
    });
    mirror.wait_synced(WAIT).await.unwrap();
    assert_eq!(
        value(&*dst, "/soa/config/services/S").await,
        Some(Bytes::from("v1"))
    );
    assert_eq!(value(&*dst, "/soa/config/stale").await, None);
    assert!(
        dst.exists(&p("/soa/runtime/services/T/i1")).await.unwrap(),
        "a live instance was removed"
    );

    src.set(
        &p("/soa/config/services/S"),
        Bytes::from("v2"),
        Expected::Any,
    )
    .await
    .unwrap();
    src.create(
        &p("/soa/config/routes/S"),
        Bytes::from("r"),
        CreateMode::Persistent,
    )
    .await
    .unwrap();
    src.create(
        &p("/soa/runtime/services/S/i9"),
        Bytes::new(),
        CreateMode::Ephemeral,
    )
    .await
    .unwrap();
    eventually("changes mirrored", || async {
        value(&*dst, "/soa/config/services/S").await == Some(Bytes::from("v2"))
            && value(&*dst, "/soa/config/routes/S").await.is_some()
    })
    .await;
    assert!(
        !dst.exists(&p("/soa/runtime/services/S/i9")).await.unwrap(),
        "an ephemeral was mirrored"
    );

    // The target is cut off while the source changes; the mirror retries and catches up.
    b.interrupt_connection(
        dst.session().session_id.unwrap(),
        Duration::from_millis(300),
    )
    .unwrap();
    src.set(
        &p("/soa/config/services/S"),
        Bytes::from("v3"),
        Expected::Any,
    )
    .await
    .unwrap();
    // The source's session is lost: its watch resyncs, and a delete made meanwhile lands.
    a.expire_session(src.session().session_id.unwrap()).unwrap();
    src.delete(&p("/soa/config/routes/S"), Expected::Any, DeleteScope::Node)
        .await
        .unwrap();
    eventually("mirror converged after failures", || async {
        migrate::diff(&*src, &*dst, &p("/soa/config"))
            .await
            .map(|d| d.is_empty())
            .unwrap_or(false)
    })
    .await;

    let status = mirror.stop().await;
    assert!(status.applied >= 2 && status.syncs >= 2, "{status:?}");
    let retried = seen
        .lock()
        .unwrap()
        .iter()
        .any(|c| matches!(c, MirrorChange::Retrying { .. }));
    assert!(retried, "the cut-off target never made the mirror retry");
    // Stopped: later changes stay in the source.
    src.set(
        &p("/soa/config/services/S"),
        Bytes::from("v4"),
        Expected::Any,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        value(&*dst, "/soa/config/services/S").await,
        Some(Bytes::from("v3"))
    );
}

#[tokio::test]
async fn dual_registration_set_value_keeps_the_primary_current_when_the_secondary_fails() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (pa, sb) = (client(&a).await, client(&b).await);
    let dual = DualRegistry::new(pa.clone(), sb.clone(), DualOptions::new());
    let registration = dual
        .register(&p("/svc/a:1"), Bytes::from("old"), RegisterOptions::new())
        .await
        .unwrap();
    registration.wait_registered(WAIT).await.unwrap();
    // The secondary's client is gone: its write fails.
    sb.close().await.unwrap();
    let outcome = registration.set_value(Bytes::from("new")).await;
    assert!(outcome.is_err(), "the secondary's failure was not reported");
    assert_eq!(
        value(&*pa, "/svc/a:1").await,
        Some(Bytes::from("new")),
        "the primary kept the old value because the secondary failed"
    );
    drop(registration);
}

#[tokio::test]
async fn merged_children_report_a_failing_side_rather_than_not_found() {
    let (_, sb, dual) = merged().await;
    // Only the secondary has the service; the secondary then fails.
    sb.create(&p("/svc/a"), Bytes::from("sa"), CreateMode::Persistent)
        .await
        .unwrap();
    sb.close().await.unwrap();
    let children = dual.children(&p("/svc")).await;
    assert!(
        matches!(children, Err(Error::Closed)),
        "a failed secondary read as 'no such node': {children:?}"
    );
}

#[tokio::test]
async fn merged_watch_ends_when_either_side_ends() {
    for close_primary in [false, true] {
        let (pa, sb, dual) = merged().await;
        sb.create(&p("/svc/b"), Bytes::from("sb"), CreateMode::Persistent)
            .await
            .unwrap();
        let mut watch = dual
            .watch(&p("/svc"), WatchOptions::children())
            .await
            .unwrap();
        assert!(matches!(
            next_event(&mut watch).await,
            WatchEvent::Snapshot(_)
        ));
        let closed = if close_primary { &pa } else { &sb };
        closed.close().await.unwrap();
        // Going on would keep showing the closed side's last nodes as live.
        let next = tokio::time::timeout(WAIT, watch.next()).await;
        assert!(
            matches!(next, Ok(None)),
            "close_primary={close_primary}: merged watch still open: {next:?}"
        );
    }
}

#[tokio::test]
async fn mirror_never_empties_the_target_from_a_missing_source_root() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (src, dst) = (client(&a).await, client(&b).await);
    dst.create(
        &p("/soa/config/services/S"),
        Bytes::from("kept"),
        CreateMode::Persistent,
    )
    .await
    .unwrap();

    // A wrong root (or a source that lost its data): nothing at /soa/config in the source.
    let (mirror, mut changes) = observed(&src, &dst, "/soa/config");
    let first = tokio::time::timeout(WAIT, changes.recv()).await.unwrap();
    match first {
        Some(MirrorChange::Retrying { error, .. }) => {
            assert!(error.contains("does not exist in the source"), "{error}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        value(&*dst, "/soa/config/services/S").await,
        Some(Bytes::from("kept"))
    );
    assert!(!mirror.status().synced);

    // Once the root exists, the mirror syncs as usual, deletions included.
    src.create(&p("/soa/config"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    mirror.wait_synced(WAIT).await.unwrap();
    assert_eq!(value(&*dst, "/soa/config/services/S").await, None);
    mirror.stop().await;
}

#[tokio::test]
async fn mirror_keeps_the_target_root_when_the_source_root_is_deleted() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (src, dst) = (client(&a).await, client(&b).await);
    src.create(
        &p("/soa/config/x"),
        Bytes::from("1"),
        CreateMode::Persistent,
    )
    .await
    .unwrap();
    let (mirror, mut changes) = observed(&src, &dst, "/soa/config");
    mirror.wait_synced(WAIT).await.unwrap();
    src.delete(&p("/soa/config"), Expected::Any, DeleteScope::Recursive)
        .await
        .unwrap();
    // Bounded: the mirror reports within WAIT or the test fails.
    loop {
        match tokio::time::timeout(WAIT, changes.recv()).await.unwrap() {
            Some(MirrorChange::Retrying { error, .. }) => {
                assert!(error.contains("/soa/config"), "{error}");
                break;
            }
            Some(MirrorChange::Deleted(path)) => assert_eq!(path, p("/soa/config/x")),
            Some(MirrorChange::Synced { .. }) => {}
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert!(dst.exists(&p("/soa/config")).await.unwrap());
    assert!(!mirror.status().synced);
    mirror.stop().await;
}

#[tokio::test]
async fn merged_children_put_the_primary_first_as_create_orders_are_not_comparable() {
    let (pa, sb, dual) = merged().await;
    // The primary's counter runs ahead (as a ZooKeeper zxid does of a fresh etcd revision).
    for i in 0..5 {
        pa.create(
            &p(&format!("/other/{i}")),
            Bytes::new(),
            CreateMode::Persistent,
        )
        .await
        .unwrap();
    }
    let older = pa
        .create(&p("/q/x"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    let newer = sb
        .create(&p("/q/y"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    assert!(newer.create_order < older.create_order, "set-up");
    let names: Vec<String> = dual
        .children(&p("/q"))
        .await
        .unwrap()
        .nodes
        .iter()
        .map(|n| n.path.name().to_owned())
        .collect();
    assert_eq!(names, ["x", "y"]);
}

/// A path the target holds as a live session's ephemeral node (a provider registered there
/// directly) is neither written into nor replaced: `copy` refuses before writing anything, a
/// mirror syncs everything else and reports the path as held.
#[tokio::test]
async fn copy_and_mirror_leave_a_live_sessions_ephemeral_node_alone() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (src, dst) = (client(&a).await, client(&b).await);
    for (path, v) in [
        ("/soa/config/a", "1"),
        ("/soa/config/held", "2"),
        ("/soa/config/held/below", "3"),
    ] {
        src.create(&p(path), Bytes::from(v), CreateMode::Persistent)
            .await
            .unwrap();
    }
    dst.create(
        &p("/soa/config/held"),
        Bytes::from("live"),
        CreateMode::Ephemeral,
    )
    .await
    .unwrap();
    let live = |node: registry_core::Node| (node.value, node.ephemeral_owner);
    let before = live(dst.get(&p("/soa/config/held")).await.unwrap());

    for dry_run in [true, false] {
        let refused =
            migrate::copy(&*src, &*dst, &p("/soa"), CopyOptions { dry_run }, |_, _| {}).await;
        assert!(
            matches!(&refused, Err(Error::AlreadyExists { path }) if *path == p("/soa/config/held")),
            "{refused:?}"
        );
    }
    assert_eq!(
        value(&*dst, "/soa/config/a").await,
        None,
        "a refused copy wrote"
    );
    assert_eq!(live(dst.get(&p("/soa/config/held")).await.unwrap()), before);

    let (mirror, mut changes) = observed(&src, &dst, "/soa");
    mirror.wait_synced(WAIT).await.unwrap();
    match tokio::time::timeout(WAIT, changes.recv()).await.unwrap() {
        // The held node and the one below it.
        Some(MirrorChange::Synced { held, .. }) => assert_eq!(held, 2),
        other => panic!("expected the first sync, got {other:?}"),
    }
    assert_eq!(value(&*dst, "/soa/config/a").await, Some(Bytes::from("1")));
    src.set(&p("/soa/config/held"), Bytes::from("2b"), Expected::Any)
        .await
        .unwrap();
    match tokio::time::timeout(WAIT, changes.recv()).await.unwrap() {
        Some(MirrorChange::Held(path)) => assert_eq!(path, p("/soa/config/held")),
        other => panic!("expected the held path, got {other:?}"),
    }
    assert_eq!(live(dst.get(&p("/soa/config/held")).await.unwrap()), before);
    // The mirror goes on with the rest.
    src.set(&p("/soa/config/a"), Bytes::from("1b"), Expected::Any)
        .await
        .unwrap();
    match tokio::time::timeout(WAIT, changes.recv()).await.unwrap() {
        Some(MirrorChange::Put(path)) => assert_eq!(path, p("/soa/config/a")),
        other => panic!("expected a put, got {other:?}"),
    }
    // Deleted in the source: the live node in the target stays (it used to be deleted).
    src.delete(
        &p("/soa/config/held"),
        Expected::Any,
        DeleteScope::Recursive,
    )
    .await
    .unwrap();
    loop {
        match tokio::time::timeout(WAIT, changes.recv()).await.unwrap() {
            Some(MirrorChange::Deleted(path)) if path == p("/soa/config/held/below") => {}
            Some(MirrorChange::Kept(path)) => {
                assert_eq!(path, p("/soa/config/held"));
                break;
            }
            other => panic!("expected the held node kept, got {other:?}"),
        }
    }
    assert_eq!(live(dst.get(&p("/soa/config/held")).await.unwrap()), before);
    mirror.stop().await;
}

/// A delete whose secondary half failed is retried as the docs say: the retry finds the
/// primary's node gone, and must still remove the secondary's.
#[tokio::test]
async fn dual_delete_retried_after_the_secondary_failed_finishes_there() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (pa, sb) = (client(&a).await, client(&b).await);
    let dual = DualRegistry::new(pa.clone(), sb.clone(), DualOptions::new());
    dual.create(&p("/gone"), Bytes::from("v"), CreateMode::Persistent)
        .await
        .unwrap();
    let secondary_session = sb.session().session_id.unwrap();
    // Long enough that the delete below surely meets it on a busy machine.
    b.interrupt_connection(secondary_session, Duration::from_secs(2))
        .unwrap();
    let failed = dual
        .delete(&p("/gone"), Expected::Any, DeleteScope::Node)
        .await;
    assert!(
        failed.as_ref().is_err_and(Error::is_retryable),
        "{failed:?}"
    );
    assert_eq!(value(&*pa, "/gone").await, None);
    eventually("the secondary back", || async {
        sb.session().state.is_live()
    })
    .await;
    let retried = dual
        .delete(&p("/gone"), Expected::Any, DeleteScope::Node)
        .await;
    assert!(
        matches!(retried, Err(Error::NotFound { .. })),
        "{retried:?}"
    );
    assert_eq!(value(&*sb, "/gone").await, None, "left on the secondary");
}

#[tokio::test]
async fn mirrors_in_opposite_directions_settle_instead_of_rewriting_each_other() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (left, right) = (client(&a).await, client(&b).await);
    for reg in [&left, &right] {
        reg.create(&p("/soa"), Bytes::new(), CreateMode::Persistent)
            .await
            .unwrap();
    }
    let (forth, _) = observed(&left, &right, "/soa");
    let (back, _) = observed(&right, &left, "/soa");
    forth.wait_synced(WAIT).await.unwrap();
    back.wait_synced(WAIT).await.unwrap();

    let written = left
        .create(&p("/soa/a"), Bytes::from("v1"), CreateMode::Persistent)
        .await
        .unwrap();
    eventually("/soa/a mirrored", || async {
        value(&*right, "/soa/a").await.is_some()
    })
    .await;
    // A later change on the right: once it is back on the left, `back` has handled the
    // right's event for /soa/a, which must not have written /soa/a again.
    right
        .create(&p("/soa/b"), Bytes::from("b"), CreateMode::Persistent)
        .await
        .unwrap();
    eventually("/soa/b mirrored back", || async {
        value(&*left, "/soa/b").await.is_some()
    })
    .await;
    let now = left.get(&p("/soa/a")).await.unwrap();
    assert_eq!(
        now.version, written.version,
        "the mirror wrote back an equal value"
    );
    assert_eq!(now.modify_order, written.modify_order);
    forth.stop().await;
    back.stop().await;
}

#[tokio::test]
async fn diff_and_mirror_refuse_a_root_missing_on_both_sides() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (src, dst) = (client(&a).await, client(&b).await);
    src.create(&p("/soa/config"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    // A typo: neither side has it.
    match migrate::diff(&*src, &*dst, &p("/soa/confg")).await {
        Err(Error::NotFound { path }) => assert_eq!(path, p("/soa/confg")),
        other => panic!("expected NotFound, got {other:?}"),
    }
    // Missing in the target only: a difference, not an error.
    let differences = migrate::diff(&*src, &*dst, &p("/soa/config"))
        .await
        .unwrap();
    assert_eq!(differences.len(), 1);
    assert_eq!(differences[0].kind, DifferenceKind::Missing);

    let (mirror, mut changes) = observed(&src, &dst, "/soa/confg");
    match tokio::time::timeout(WAIT, changes.recv()).await.unwrap() {
        Some(MirrorChange::Retrying { error, .. }) => {
            assert!(error.contains("exists in neither registry"), "{error}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!mirror.status().synced);
    // Once the source has it, the mirror syncs.
    src.create(&p("/soa/confg"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    mirror.wait_synced(WAIT).await.unwrap();
    assert!(dst.exists(&p("/soa/confg")).await.unwrap());
    mirror.stop().await;
}

#[tokio::test]
async fn copy_alongside_writers_of_both_sides_neither_reverts_nor_revives() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (src, dst_inner) = (client(&a).await, client(&b).await);
    for (reg, value) in [(&src, "v1"), (&dst_inner, "old")] {
        reg.create(&p("/c"), Bytes::new(), CreateMode::Persistent)
            .await
            .unwrap();
        reg.create(&p("/c/x"), Bytes::from(value), CreateMode::Persistent)
            .await
            .unwrap();
    }
    src.create(&p("/c/y"), Bytes::from("y"), CreateMode::Persistent)
        .await
        .unwrap();
    let dst = support::Faulty::new(dst_inner.clone());
    // Just before the copy writes /c/x, a dual writer sets it to v2 on both sides and
    // deletes /c/y (which the copy has read but not yet created) from both.
    let once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (writer_src, writer_dst) = (src.clone(), dst_inner.clone());
    dst.before_set(Some(Arc::new(move |_| {
        let (once, src, dst) = (once.clone(), writer_src.clone(), writer_dst.clone());
        Box::pin(async move {
            if once.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            for reg in [&src, &dst] {
                reg.set(&p("/c/x"), Bytes::from("v2"), Expected::Any)
                    .await
                    .unwrap();
            }
            src.delete(&p("/c/y"), Expected::Any, DeleteScope::Node)
                .await
                .unwrap();
        })
    })));

    let summary = migrate::copy(&*src, &*dst, &p("/c"), CopyOptions::default(), |_, _| {})
        .await
        .unwrap();
    assert_eq!(
        value(&*dst_inner, "/c/x").await,
        Some(Bytes::from("v2")),
        "copy reverted a newer write"
    );
    assert_eq!(
        value(&*dst_inner, "/c/y").await,
        None,
        "copy revived a deleted node"
    );
    assert!(
        migrate::diff(&*src, &*dst_inner, &p("/c"))
            .await
            .unwrap()
            .is_empty(),
        "{summary:?}"
    );
    assert_eq!(
        (
            summary.created,
            summary.updated,
            summary.unchanged,
            summary.gone
        ),
        (0, 0, 2, 1)
    );
}
