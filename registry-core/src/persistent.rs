//! Watches that outlive broken streams and lost sessions: what Curator's `PersistentWatcher`
//! is, for several sources at once, built only on [`Registry`]. [`TreeCache`](crate::TreeCache)
//! and the SOA layer's service view follow the tree through it.

use std::sync::Arc;
use std::time::Duration;

use futures::future::try_join_all;
use futures::stream::{self, BoxStream, SelectAll, StreamExt};

use crate::{
    Backoff, Error, NodePath, Registry, Result, SessionState, SessionStatus, WatchEvent,
    WatchOptions, WatchScope, WatchStream,
};

/// How long [`PersistentWatch::open`] waits for each source's first snapshot.
pub const FIRST_SNAPSHOT: Duration = Duration::from_secs(30);

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
    /// was lost or is back, or a watch broke and every source is about to be watched anew.
    Staleness,
}

/// Watches of a fixed list of sources, each a path and a scope, kept open for as long as the
/// registry is: when a stream breaks or ends, or the session is live again after a cut, every
/// source is watched anew (with a backoff while that fails), each starting with a snapshot
/// that replaces what the source held, so that nothing changed meanwhile is missed.
///
/// Guarantees: items of one source come in the order its watch reports them; each source's
/// first item after a new watch is a `Snapshot` (or `Resync`); [`is_stale`](Self::is_stale)
/// is true whenever the sources' states, with every item so far applied, may be behind the
/// server. No task of its own: it moves only while its owner awaits [`next`](Self::next), and
/// dropping it releases its watches.
pub struct PersistentWatch {
    registry: Arc<dyn Registry>,
    sources: Vec<(NodePath, WatchScope)>,
    streams: Tagged,
    sessions: BoxStream<'static, SessionStatus>,
    live: bool,
    /// Sources watched anew whose snapshot has not come: their states mix old and new.
    awaiting: Vec<bool>,
    /// Every source is to be watched anew before the next item.
    reopen: bool,
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
    /// Watches every source (all at once) and returns with each one's first snapshot, in the
    /// sources' order. Errors: [`InvalidArgument`](Error::InvalidArgument) for no sources
    /// (before any I/O), a watch's own error ([`Closed`](Error::Closed), an invalid path,
    /// ...), or [`Timeout`](Error::Timeout) when a snapshot does not come within
    /// [`FIRST_SNAPSHOT`].
    pub async fn open(
        registry: Arc<dyn Registry>,
        sources: Vec<(NodePath, WatchScope)>,
    ) -> Result<(PersistentWatch, Vec<WatchEvent>)> {
        if sources.is_empty() {
            return Err(Error::InvalidArgument(
                "a persistent watch needs at least one source".into(),
            ));
        }
        // Before the watches: a cut while they open is then seen, and read anew.
        let sessions = registry.session_events();
        let live = registry.session().state.is_live();
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
            reopen: false,
            closed: false,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
        };
        Ok((watch, firsts))
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
    /// after a backoff, so an owner that gives up stops calling. Session changes come before
    /// stream items queued with them, as they change what those mean.
    pub async fn next(&mut self) -> Option<Result<PersistentItem>> {
        if self.closed {
            return None;
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
        tokio::select! {
            biased;
            status = self.sessions.next() => {
                let Some(status) = status.filter(|s| s.state != SessionState::Closed) else {
                    self.closed = true;
                    return None;
                };
                let was_live = std::mem::replace(&mut self.live, status.state.is_live());
                if self.live && !was_live {
                    // Back after a cut: what changed meanwhile may still be on its way (an
                    // etcd watch resuming, a ZooKeeper re-read), and no backend says when it
                    // has all come. New watches start with a snapshot read now.
                    self.backoff.reset();
                    self.reopen = true;
                }
                Some(Ok(PersistentItem::Staleness))
            }
            Some((source, item)) = self.streams.next() => match item {
                Some(Ok(event)) => {
                    self.backoff.reset();
                    if let WatchEvent::Snapshot(_) | WatchEvent::Resync { .. } = event {
                        tracing::debug!(source = %self.path(source), "source read anew");
                        if let Some(awaiting) = self.awaiting.get_mut(source) {
                            *awaiting = false;
                        }
                    }
                    Some(Ok(PersistentItem::Event { source, event }))
                }
                Some(Err(Error::Closed)) => {
                    self.closed = true;
                    None
                }
                Some(Err(error)) => {
                    self.reopen = true;
                    if !error.is_retryable() {
                        return Some(Err(error));
                    }
                    tracing::warn!(source = %self.path(source), %error, "a watch failed; watching every source again");
                    Some(Ok(PersistentItem::Staleness))
                }
                None => {
                    tracing::debug!(source = %self.path(source), "a watch ended; watching every source again");
                    self.reopen = true;
                    Some(Ok(PersistentItem::Staleness))
                }
            },
        }
    }

    fn path(&self, source: usize) -> &str {
        self.sources
            .get(source)
            .map_or("?", |(path, _)| path.as_str())
    }

    /// Watches every source anew after a backoff, retrying what retrying may mend.
    async fn watch_again(&mut self) -> Result<()> {
        loop {
            tokio::time::sleep(self.backoff.next_delay()).await;
            let opened = try_join_all(
                self.sources
                    .iter()
                    .map(|(path, scope)| self.registry.watch(path, WatchOptions::scoped(*scope))),
            )
            .await;
            match opened {
                Ok(streams) => {
                    self.streams = tag(streams);
                    self.awaiting = vec![true; self.sources.len()];
                    self.reopen = false;
                    return Ok(());
                }
                Err(error) if error.is_retryable() => {
                    tracing::warn!(%error, "watching again failed; retrying");
                }
                Err(error) => return Err(error),
            }
        }
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
