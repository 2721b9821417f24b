//! Watches that outlive broken streams and lost sessions: what Curator's `PersistentWatcher`
//! is, for several sources at once, built only on [`Registry`]. [`TreeCache`](crate::TreeCache)
//! and the SOA layer's service view follow the tree through it.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use futures::future::{try_join_all, FutureExt};
use futures::stream::{self, BoxStream, SelectAll, StreamExt};

use crate::{
    Backoff, Error, NodePath, Registry, Result, SessionState, SessionStatus, WatchEvent,
    WatchOptions, WatchScope, WatchStream, WatchedState,
};

/// How long [`PersistentWatch::open`] waits for each source's first snapshot; a new watch
/// after a break whose snapshot is this late is given up and opened again.
pub const FIRST_SNAPSHOT: Duration = Duration::from_secs(30);

const RETRY_INITIAL: Duration = Duration::from_millis(100);
/// The longest wait between re-opens; also how long watches must have held for the next break
/// to start the waits over (a source that keeps ending at once must not spin).
const RETRY_MAX: Duration = Duration::from_secs(5);

/// At most this many queued session changes are taken before a stream item.
const QUEUED_SESSION_CHANGES: usize = 64;

/// What [`PersistentWatch::next`] reports.
#[derive(Debug)]
pub enum PersistentItem {
    /// Source number `source` (its place in the list given to
    /// [`open`](PersistentWatch::open)) reported `event`. Applying a source's events in order
    /// to its first snapshot (with [`WatchedState::apply`](crate::WatchedState::apply)) keeps
    /// its state; a `Snapshot` or `Resync` replaces it.
    Event {
        /// The source's index.
        source: usize,
        /// What happened.
        event: WatchEvent,
    },
    /// No event, but [`PersistentWatch::is_stale`] may say otherwise than before: the session
    /// was lost or is back, or a watch broke (or its new snapshot is overdue) and every source
    /// is about to be watched anew.
    Staleness,
}

/// Watches of a fixed list of sources, each a path and a scope, kept open for as long as the
/// registry is: when a stream breaks or ends, or the session is live again after a cut, every
/// source is watched anew (with a backoff while that fails), each starting with a snapshot
/// that replaces what the source held, so that nothing changed meanwhile is missed.
///
/// Guarantees: items of one source come in the order its watch reports them; each source's
/// first item after a new watch is a `Snapshot` (or `Resync`): a new watch that begins
/// otherwise, or whose snapshot is [`FIRST_SNAPSHOT`] late, is opened again;
/// [`is_stale`](Self::is_stale) is true whenever the sources' states, with every item so far
/// applied, may be behind the server, as far as the session changes queued when an item is
/// taken tell. No task of its own: it moves only while its owner awaits
/// [`next`](Self::next), and dropping it releases its watches.
pub struct PersistentWatch {
    registry: Arc<dyn Registry>,
    sources: Vec<(NodePath, WatchScope)>,
    streams: Tagged,
    sessions: BoxStream<'static, SessionStatus>,
    live: bool,
    /// The session epoch last seen: a new one is a cut even when the not-live states between
    /// were skipped (a subscriber that lagged is handed the latest status).
    epoch: u64,
    /// Sources watched anew whose snapshot has not come: their states mix old and new.
    awaiting: Vec<bool>,
    /// When the snapshots of a new watch of every source are overdue.
    snapshots_due: Option<Instant>,
    /// Every source is to be watched anew before the next item, at `reopen_at`.
    reopen: bool,
    reopen_at: Instant,
    /// When the current watches opened.
    opened_at: Instant,
    /// A stream item taken with session changes queued behind it: it comes after them.
    held: Option<(usize, Option<Result<WatchEvent>>)>,
    closed: bool,
    backoff: Backoff,
}

/// Each stream's items tagged with its source, and `None` once it ends: one source's end must
/// not go unseen among the others.
type Tagged = SelectAll<BoxStream<'static, (usize, Option<Result<WatchEvent>>)>>;

fn tag(streams: Vec<WatchStream>) -> Tagged {
    stream::select_all(streams.into_iter().enumerate().map(|(source, stream)| {
        stream
            .map(move |item| (source, Some(item)))
            .chain(stream::once(async move { (source, None) }))
            .boxed()
    }))
}

impl PersistentWatch {
    /// Watches every source (all at once) and returns with each one's state as its first
    /// snapshot shows it, in the sources' order: apply the source's later
    /// [`Event`](PersistentItem::Event)s to it. Errors: [`InvalidArgument`](Error::InvalidArgument) for no sources
    /// (before any I/O), a watch's own error ([`Closed`](Error::Closed), an invalid path,
    /// ...), or [`Timeout`](Error::Timeout) when a snapshot does not come within
    /// [`FIRST_SNAPSHOT`].
    pub async fn open(
        registry: Arc<dyn Registry>,
        sources: Vec<(NodePath, WatchScope)>,
    ) -> Result<(PersistentWatch, Vec<WatchedState>)> {
        if sources.is_empty() {
            return Err(Error::InvalidArgument(
                "a persistent watch needs at least one source".into(),
            ));
        }
        // Before the watches: a cut while they open is then seen, and read anew. The stream
        // starts with the current status; taken now, it is not mistaken for a change.
        let mut sessions = registry.session_events();
        let first = match sessions.next().now_or_never() {
            Some(Some(status)) => status,
            _ => registry.session(),
        };
        let (live, epoch) = (first.state.is_live(), first.epoch);
        let opened = try_join_all(sources.iter().map(|(path, scope)| {
            let registry = &registry;
            async move {
                let mut stream = registry.watch(path, WatchOptions::scoped(*scope)).await?;
                let first = first_snapshot(path, &mut stream).await?;
                Ok::<_, Error>((stream, first))
            }
        }))
        .await?;
        let (streams, firsts): (Vec<_>, Vec<_>) = opened.into_iter().unzip();
        let watch = PersistentWatch {
            awaiting: vec![false; sources.len()],
            registry,
            sources,
            streams: tag(streams),
            sessions,
            live,
            epoch,
            snapshots_due: None,
            reopen: false,
            reopen_at: Instant::now(),
            opened_at: Instant::now(),
            held: None,
            closed: false,
            backoff: Backoff::new(RETRY_INITIAL, RETRY_MAX),
        };
        let states = firsts
            .iter()
            .map(|first| {
                let mut state = WatchedState::new();
                state.apply(first);
                state
            })
            .collect();
        Ok((watch, states))
    }

    /// The watched sources, in the order [`PersistentItem::Event`] numbers them.
    pub fn sources(&self) -> &[(NodePath, WatchScope)] {
        &self.sources
    }

    /// True while what the items so far describe may be behind the server: the session is not
    /// live, a source is about to be watched anew or its new snapshot is not in yet, or the
    /// registry is closed.
    pub fn is_stale(&self) -> bool {
        self.closed
            || self.reopen
            || !self.live
            || self.awaiting.contains(&true)
            || !self.registry.session().state.is_live()
    }

    /// The next item; `None` once the registry is closed (nothing will come again). An error
    /// that retrying cannot mend (say [`PermissionDenied`](Error::PermissionDenied) on a
    /// source) is returned as it comes; the watch is then stale, and the next call tries again
    /// after a backoff, so an owner that gives up stops calling. A session change queued when
    /// a stream item is taken comes first (as a `Staleness`), as it changes what the item
    /// means. Cancellation-safe: a call dropped before it returns loses no item and no wait
    /// already served, so it may be one branch of a `select!`.
    pub async fn next(&mut self) -> Option<Result<PersistentItem>> {
        if self.closed {
            return None;
        }
        if let Some((source, item)) = self.held.take() {
            return self.take(source, item);
        }
        if self.reopen {
            match self.watch_again().await {
                Ok(()) => {}
                Err(Error::Closed) => {
                    self.closed = true;
                    return None;
                }
                Err(error) => return Some(Err(error)),
            }
        }
        let due = self.snapshots_due;
        tokio::select! {
            biased;
            status = self.sessions.next() => match status {
                Some(status) if self.take_status(status) => Some(Ok(PersistentItem::Staleness)),
                _ => {
                    self.closed = true;
                    None
                }
            },
            Some((source, item)) = self.streams.next() => {
                let mut changed = false;
                for _ in 0..QUEUED_SESSION_CHANGES {
                    match self.sessions.next().now_or_never() {
                        None => break,
                        Some(Some(status)) if self.take_status(status) => changed = true,
                        Some(_) => {
                            self.closed = true;
                            return None;
                        }
                    }
                }
                if self.reopen {
                    // New snapshots of every source will supersede it.
                    return Some(Ok(PersistentItem::Staleness));
                }
                if changed {
                    self.held = Some((source, item));
                    return Some(Ok(PersistentItem::Staleness));
                }
                self.take(source, item)
            },
            () = sleep_until_due(due) => {
                tracing::warn!(after = ?FIRST_SNAPSHOT, "a new watch's snapshot is overdue; watching every source again");
                self.schedule_reopen();
                Some(Ok(PersistentItem::Staleness))
            },
        }
    }

    /// Takes in a session change; false for `Closed`.
    fn take_status(&mut self, status: SessionStatus) -> bool {
        if status.state == SessionState::Closed {
            return false;
        }
        let was_live = std::mem::replace(&mut self.live, status.state.is_live());
        let new_session = std::mem::replace(&mut self.epoch, status.epoch) != status.epoch;
        if self.live && (!was_live || new_session) {
            // Back after a cut: what changed meanwhile may still be on its way (an etcd watch
            // resuming, a ZooKeeper re-read), and no backend says when it has all come. New
            // watches start with a snapshot read now.
            self.schedule_reopen();
        }
        true
    }

    /// What a stream item of `source` means to the owner (`None` for the end of a stream).
    fn take(
        &mut self,
        source: usize,
        item: Option<Result<WatchEvent>>,
    ) -> Option<Result<PersistentItem>> {
        match item {
            Some(Ok(event)) => {
                let replaces = matches!(event, WatchEvent::Snapshot(_) | WatchEvent::Resync { .. });
                let awaited = self.awaiting.get_mut(source);
                match awaited {
                    Some(awaiting) if *awaiting && !replaces => {
                        tracing::warn!(source = %self.path(source), ?event, "a new watch began without a snapshot; watching every source again");
                        self.schedule_reopen();
                        return Some(Ok(PersistentItem::Staleness));
                    }
                    Some(awaiting) if replaces => {
                        *awaiting = false;
                        tracing::debug!(source = %self.path(source), "source read anew");
                        if !self.awaiting.contains(&true) {
                            self.snapshots_due = None;
                        }
                    }
                    _ => {}
                }
                Some(Ok(PersistentItem::Event { source, event }))
            }
            Some(Err(Error::Closed)) => {
                self.closed = true;
                None
            }
            Some(Err(error)) => {
                self.schedule_reopen();
                if !error.is_retryable() {
                    return Some(Err(error));
                }
                tracing::warn!(source = %self.path(source), %error, "a watch failed; watching every source again");
                Some(Ok(PersistentItem::Staleness))
            }
            None => {
                tracing::debug!(source = %self.path(source), "a watch ended; watching every source again");
                self.schedule_reopen();
                Some(Ok(PersistentItem::Staleness))
            }
        }
    }

    /// Marks every source to be watched anew after the next backoff delay, which starts over
    /// when the current watches held a while.
    fn schedule_reopen(&mut self) {
        if self.reopen {
            return;
        }
        if self.opened_at.elapsed() >= RETRY_MAX {
            self.backoff.reset();
        }
        self.reopen = true;
        self.reopen_at = Instant::now() + self.backoff.next_delay();
    }

    fn path(&self, source: usize) -> &str {
        self.sources
            .get(source)
            .map_or("?", |(path, _)| path.as_str())
    }

    /// Watches every source anew at `reopen_at`, retrying what retrying may mend; a failure
    /// sets the next try a backoff delay later, so a cancelled call's wait is not served again.
    async fn watch_again(&mut self) -> Result<()> {
        loop {
            tokio::time::sleep_until(self.reopen_at).await;
            if self.registry.session().state == SessionState::Closed {
                return Err(Error::Closed);
            }
            let opened = try_join_all(
                self.sources
                    .iter()
                    .map(|(path, scope)| self.registry.watch(path, WatchOptions::scoped(*scope))),
            )
            .await;
            match opened {
                Ok(streams) => {
                    let now = Instant::now();
                    self.streams = tag(streams);
                    self.awaiting = vec![true; self.sources.len()];
                    self.snapshots_due = Some(now + FIRST_SNAPSHOT);
                    self.opened_at = now;
                    self.reopen = false;
                    return Ok(());
                }
                Err(error) => {
                    self.reopen_at = Instant::now() + self.backoff.next_delay();
                    if !error.is_retryable() {
                        return Err(error);
                    }
                    tracing::warn!(%error, "watching again failed; retrying");
                }
            }
        }
    }
}

/// Ready at `due`; never without one.
async fn sleep_until_due(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

impl std::fmt::Debug for PersistentWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistentWatch")
            .field("sources", &self.sources)
            .field("stale", &self.is_stale())
            .finish()
    }
}

/// The first item of a new watch of `path`, which must replace the state: a watch that began
/// otherwise would build a wrong state that says it is current.
async fn first_snapshot(path: &NodePath, stream: &mut WatchStream) -> Result<WatchEvent> {
    match tokio::time::timeout(FIRST_SNAPSHOT, stream.next()).await {
        Ok(Some(Ok(first @ (WatchEvent::Snapshot(_) | WatchEvent::Resync { .. })))) => Ok(first),
        Ok(Some(Ok(other))) => Err(Error::Backend {
            backend: "persistent watch",
            message: format!("the watch of {path} began with {other:?}, not a snapshot"),
            source: None,
        }),
        Ok(Some(Err(error))) => Err(error),
        Ok(None) => Err(Error::unavailable(format!("the watch of {path} ended"))),
        Err(_) => Err(Error::Timeout {
            operation: format!("first snapshot of {path}"),
            after: FIRST_SNAPSHOT,
        }),
    }
}
