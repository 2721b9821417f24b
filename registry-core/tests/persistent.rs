//! `PersistentWatch` on the memory backend: a source whose watch ends or breaks is watched
//! again with the others, a refusal is the owner's to act on, and the watch says it is stale
//! until every source has been read anew. (`TreeCache` and the service view rest on it; the
//! conformance suite runs the cache on every backend.)

use std::sync::Arc;
use std::time::Duration;

use registry_core::memory::MemoryStore;
mod support;

use registry_core::{
    Bytes, CreateMode, Error, NodePath, PersistentItem, PersistentWatch, Registry, WatchScope,
    WatchedState,
};
use support::{client, p, Faulty};

/// What the owner of a watch sees: each source's state, and the errors it was handed.
struct Followed {
    watch: PersistentWatch,
    states: Vec<WatchedState>,
    errors: Vec<Error>,
    /// Sources whose state a `Snapshot` or `Resync` replaced since the last `drive`.
    read_anew: Vec<usize>,
}

impl Followed {
    async fn open(registry: Arc<dyn Registry>, sources: Vec<(NodePath, WatchScope)>) -> Self {
        let (watch, states) = PersistentWatch::open(registry, sources).await.unwrap();
        Followed {
            watch,
            states,
            errors: Vec::new(),
            read_anew: Vec::new(),
        }
    }

    /// Takes items until `done` holds after one (10 s at most): true then, false if the watch
    /// ended first, a panic if time ran out.
    async fn drive(&mut self, done: impl Fn(&Followed) -> bool) -> bool {
        self.read_anew.clear();
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(item) = self.watch.next().await {
                match item {
                    Ok(PersistentItem::Event { source, event }) => {
                        if matches!(
                            event,
                            registry_core::WatchEvent::Snapshot(_)
                                | registry_core::WatchEvent::Resync { .. }
                        ) {
                            self.read_anew.push(source);
                        }
                        self.states[source].apply(&event);
                    }
                    Ok(PersistentItem::Staleness) => {}
                    Err(error) => self.errors.push(error),
                }
                if done(self) {
                    return true;
                }
            }
            false
        })
        .await
        .expect("neither done nor ended within 10 s")
    }
}

/// One source's watch ending quietly (no error) is not lost among the others': every source
/// is watched again, and the watch is stale until each has been read anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_whose_watch_ends_is_watched_again_with_the_others() {
    let store = MemoryStore::new();
    let faulty = Faulty::new(client(&store).await);
    let writer = client(&store).await;
    let mut followed = Followed::open(
        faulty.clone(),
        vec![
            (p("/a"), WatchScope::Subtree),
            (p("/b"), WatchScope::Children),
        ],
    )
    .await;
    assert!(!followed.watch.is_stale());
    assert_eq!(faulty.watches_opened(), 2);
    faulty.end_watches_of(&p("/b"));
    writer
        .create(&p("/b/x"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    let stale_seen = followed.drive(|f| f.watch.is_stale()).await;
    assert!(stale_seen, "never stale after a source's watch ended");
    let caught_up = followed
        .drive(|f| f.read_anew.contains(&0) && f.read_anew.contains(&1))
        .await;
    assert!(caught_up, "not every source was read anew");
    assert!(
        !followed.watch.is_stale(),
        "stale after every source was read"
    );
    assert_eq!(faulty.watches_opened(), 4, "both sources watched again");
    assert!(followed.states[1].get(&p("/b/x")).is_some());
    assert!(followed.errors.is_empty(), "{:?}", followed.errors);
}

/// A refusal that retrying cannot mend goes to the owner, with the watch stale; calling on
/// tries again (after a backoff), and once the refusal is lifted the sources are read anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_goes_to_the_owner_and_the_next_call_tries_again() {
    let store = MemoryStore::new();
    let faulty = Faulty::new(client(&store).await);
    let writer = client(&store).await;
    let mut followed = Followed::open(faulty.clone(), vec![(p("/r"), WatchScope::Subtree)]).await;
    faulty.refuse_watch_opens(true);
    faulty.break_watches();
    let refused = followed.drive(|f| !f.errors.is_empty()).await;
    assert!(refused, "the refusal never reached the owner");
    assert!(
        matches!(followed.errors[0], Error::PermissionDenied { .. }),
        "{:?}",
        followed.errors
    );
    assert!(followed.watch.is_stale(), "fresh while refused");
    writer
        .create(&p("/r/meanwhile"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    faulty.refuse_watch_opens(false);
    let read = followed.drive(|f| f.read_anew.contains(&0)).await;
    assert!(read, "never read anew after the refusal was lifted");
    assert!(!followed.watch.is_stale());
    assert!(followed.states[0].get(&p("/r/meanwhile")).is_some());
}

/// No sources is bad input, refused before any watch; a closed registry ends the watch, which
/// then says it is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sources_is_refused_and_a_close_ends_the_watch() {
    let store = MemoryStore::new();
    let faulty = Faulty::new(client(&store).await);
    let none = PersistentWatch::open(faulty.clone(), Vec::new()).await;
    assert!(matches!(none, Err(Error::InvalidArgument(_))), "{none:?}");
    assert_eq!(faulty.watches_opened(), 0);
    let mut followed = Followed::open(faulty.clone(), vec![(p("/c"), WatchScope::Node)]).await;
    faulty.close().await.unwrap();
    let done = followed.drive(|_| false).await;
    assert!(!done, "the watch went on after its registry closed");
    let after = tokio::time::timeout(Duration::from_secs(10), followed.watch.next()).await;
    assert!(
        matches!(after, Ok(None)),
        "an item after the end: {after:?}"
    );
    assert!(
        followed.watch.is_stale(),
        "a closed registry's watch is fresh"
    );
}

/// `next` may be one branch of a `select!` whose other branch wins far more often than the
/// re-open's backoff delay lasts: the delay already served is kept, so the sources are
/// still watched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_next_keeps_the_wait_it_served() {
    let store = MemoryStore::new();
    let faulty = Faulty::new(client(&store).await);
    let mut followed = Followed::open(faulty.clone(), vec![(p("/k"), WatchScope::Subtree)]).await;
    faulty.break_watches();
    let mut read_anew = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !read_anew && tokio::time::Instant::now() < deadline {
        tokio::select! {
            item = followed.watch.next() => {
                if let Some(Ok(PersistentItem::Event { event: registry_core::WatchEvent::Snapshot(_), .. })) = item {
                    read_anew = true;
                }
            }
            // Shorter than the first re-open delay (100 ms).
            () = tokio::time::sleep(Duration::from_millis(30)) => {}
        }
    }
    assert!(read_anew, "never watched again under cancellation");
    assert_eq!(faulty.watches_opened(), 2);
    assert!(!followed.watch.is_stale());
}

/// A new watch that begins with an event instead of a snapshot would leave a wrong state
/// that says it is current: it is opened again until one begins with a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_watch_without_a_snapshot_is_opened_again() {
    let store = MemoryStore::new();
    let faulty = Faulty::new(client(&store).await);
    let writer = client(&store).await;
    let mut followed = Followed::open(faulty.clone(), vec![(p("/n"), WatchScope::Subtree)]).await;
    faulty.skip_first_items(true);
    faulty.break_watches();
    // Wait for the re-open (its snapshot skipped), then write: its first item is an event.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while faulty.watches_opened() < 2 && tokio::time::Instant::now() < deadline {
        tokio::select! {
            _ = followed.watch.next() => {}
            () = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
    assert_eq!(faulty.watches_opened(), 2, "never re-opened");
    faulty.skip_first_items(false);
    writer
        .create(&p("/n/x"), Bytes::new(), CreateMode::Persistent)
        .await
        .unwrap();
    let read = followed.drive(|f| f.read_anew.contains(&0)).await;
    assert!(read, "never read anew");
    assert!(
        faulty.watches_opened() >= 3,
        "the snapshot-less watch was kept"
    );
    assert!(!followed.watch.is_stale());
    assert!(followed.states[0].get(&p("/n/x")).is_some());
}

/// A new session is a cut even when the subscriber is handed it without the not-live states
/// before it (it lagged behind them): every source is watched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_seen_without_its_cut_still_has_every_source_read_anew() {
    let store = MemoryStore::new();
    let faulty = Faulty::new(client(&store).await);
    let mut followed = Followed::open(faulty.clone(), vec![(p("/a"), WatchScope::Subtree)]).await;
    assert_eq!(faulty.watches_opened(), 1);
    let now = faulty.session();
    faulty.inject_session(registry_core::SessionStatus {
        state: registry_core::SessionState::Reestablished,
        epoch: now.epoch + 1,
        session_id: now
            .session_id
            .map(|id| registry_core::SessionId(id.0 + 1000)),
    });
    let stale_seen = followed.drive(|f| f.watch.is_stale()).await;
    assert!(stale_seen, "a new session did not make the watch stale");
    let caught_up = followed.drive(|f| f.read_anew.contains(&0)).await;
    assert!(caught_up, "the source was not read anew");
    assert_eq!(
        faulty.watches_opened(),
        2,
        "the source was not watched again"
    );
    assert!(followed.errors.is_empty(), "{:?}", followed.errors);
}
