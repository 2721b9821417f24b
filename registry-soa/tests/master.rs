//! Master election over the in-memory backend: an instance is master only while its node
//! exists under its registry's current, live session, whatever its tasks have noticed yet.

use std::sync::Arc;
use std::time::Duration;

use registry_core::{MemoryOptions, MemoryRegistry, MemoryStore, Registry};
use registry_soa::master::{provider_is_master, watch_mastership};
use registry_soa::{Address, Provider, ServiceView};

const SERVICE: &str = "test.MasterService";

fn addr(s: &str) -> Address {
    s.parse().unwrap()
}

async fn client(store: &MemoryStore) -> Arc<dyn Registry> {
    Arc::new(
        MemoryRegistry::connect(
            store,
            MemoryOptions::default().with_session_ttl(Duration::from_secs(2)),
        )
        .await
        .unwrap(),
    )
}

async fn until_master(view: &ServiceView, provider: &Provider) {
    let mut changes = view.changes();
    let became = tokio::time::timeout(Duration::from_secs(10), async {
        while !provider_is_master(view, provider) {
            changes.changed().await.unwrap();
        }
    })
    .await;
    assert!(became.is_ok(), "the only instance never became master");
}

#[tokio::test]
async fn a_master_whose_session_was_lost_is_not_master_before_its_tasks_notice() {
    let store = MemoryStore::new();
    let registry = client(&store).await;
    let provider = Provider::register(&registry, SERVICE, addr("10.0.5.1:9090"), "1.0.0")
        .await
        .unwrap();
    let view = ServiceView::open(registry.clone(), SERVICE).await.unwrap();
    until_master(&view, &provider).await;
    // The server expires the session and deletes the node; on this single-threaded runtime
    // neither the registration nor the view has run since, so both still show the old node.
    store
        .expire_session(registry.session().session_id.unwrap())
        .unwrap();
    assert!(
        !provider_is_master(&view, &provider),
        "master although its node is gone with its lost session (another instance may already lead)"
    );
}

#[tokio::test]
async fn a_suspended_master_steps_down_even_when_the_view_is_fresh() {
    let store = MemoryStore::new();
    let registry = client(&store).await;
    let provider = Provider::register(&registry, SERVICE, addr("10.0.5.2:9090"), "1.0.0")
        .await
        .unwrap();
    // The view reads through another client, which stays connected.
    let view = ServiceView::open(client(&store).await, SERVICE)
        .await
        .unwrap();
    until_master(&view, &provider).await;
    let mut master = watch_mastership(&view, &provider);
    assert!(*master.borrow_and_update());
    // Cut the provider off for less than its TTL: the server may expire it at any moment, so
    // it must not act as master meanwhile; it is master again once back on the same session.
    store
        .interrupt_connection(
            registry.session().session_id.unwrap(),
            Duration::from_millis(600),
        )
        .unwrap();
    assert!(!provider_is_master(&view, &provider));
    let stepped_down = tokio::time::timeout(Duration::from_millis(500), master.wait_for(|m| !*m));
    assert!(
        stepped_down.await.is_ok(),
        "watch_mastership still says master while the session is suspended"
    );
    let back = tokio::time::timeout(Duration::from_secs(10), master.wait_for(|m| *m));
    assert!(back.await.is_ok(), "not master again after reconnecting");
}

#[tokio::test]
async fn mastership_reads_false_once_nothing_follows_it() {
    let store = MemoryStore::new();
    let registry = client(&store).await;
    let provider = Provider::register(&registry, SERVICE, addr("10.0.5.3:9090"), "1.0.0")
        .await
        .unwrap();
    let view = ServiceView::open(client(&store).await, SERVICE)
        .await
        .unwrap();
    until_master(&view, &provider).await;
    let mut master = watch_mastership(&view, &provider);
    assert!(*master.borrow_and_update());
    // The view goes: its updates end, and the mastership it showed cannot be trusted.
    drop(view);
    // Ends either way: the value flips to false, or the sender goes (then the last value).
    let ended = tokio::time::timeout(Duration::from_secs(5), master.changed()).await;
    assert!(ended.is_ok(), "mastership neither changed nor ended");
    assert!(
        !*master.borrow(),
        "still master after the view that decided it ended"
    );
}

#[tokio::test]
async fn one_master_for_all_versions_as_dapeng_elects() {
    let store = MemoryStore::new();
    let registry = client(&store).await;
    // A rolling upgrade: the new version's instance came first, so it holds the lowest
    // sequence; the old version's only instance must not run the service's singleton work too.
    let newer = Provider::register(&registry, SERVICE, addr("10.0.5.4:9090"), "1.0.1")
        .await
        .unwrap();
    let older = Provider::register(&registry, SERVICE, addr("10.0.5.5:9090"), "1.0.0")
        .await
        .unwrap();
    let view = ServiceView::open(client(&store).await, SERVICE)
        .await
        .unwrap();
    until_master(&view, &newer).await;
    let mut older_master = watch_mastership(&view, &older);
    assert!(
        !*older_master.borrow_and_update(),
        "a second master: the only 1.0.0 instance although a 1.0.1 node has a lower sequence"
    );
    // The lowest node goes: the next lowest leads, whatever its version.
    newer.shutdown().await.unwrap();
    let took_over = tokio::time::timeout(Duration::from_secs(10), older_master.wait_for(|m| *m));
    assert!(
        took_over.await.is_ok(),
        "the remaining instance never became master"
    );
    older.shutdown().await.unwrap();
}
