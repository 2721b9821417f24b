//! Session states and `SessionTracker`, which every backend uses to publish them.

use std::sync::Mutex;

use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::{broadcast, watch};

use crate::node::SessionId;

/// The state of a client's session with the server (Curator's CONNECTED / SUSPENDED / LOST /
/// RECONNECTED, plus the start and the end).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionState {
    /// No session yet: the first connection is being made.
    Connecting,
    /// Connected; the session (and our ephemeral nodes) is intact. Also reported when a
    /// suspended connection comes back to the same session.
    Connected,
    /// The connection is lost; the session may still be alive on the server, so ephemeral
    /// nodes may still exist. Operations fail with retryable errors or wait.
    Suspended,
    /// The session is gone: every ephemeral node it owned is deleted (or will be, by the
    /// server). A new session is being opened.
    Lost,
    /// A new session replaced a lost one; the status carries a larger epoch. Registrations
    /// are re-created and watches resync after this.
    Reestablished,
    /// [`Registry::close`](crate::Registry::close) was called; terminal.
    Closed,
}

impl SessionState {
    /// Whether the client currently has a working session (connected or re-established).
    pub fn is_live(self) -> bool {
        matches!(self, SessionState::Connected | SessionState::Reestablished)
    }
}

/// A session state with the session it concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionStatus {
    /// The state.
    pub state: SessionState,
    /// 0 before the first session, 1 for the first, +1 for each re-established session.
    pub epoch: u64,
    /// The current session, once there is one.
    pub session_id: Option<SessionId>,
}

/// Publishes a backend's session transitions to any number of subscribers.
///
/// Guarantees: the epoch rules of [`SessionStatus`] are applied here, once, for every
/// backend; every subscriber sees transitions in order, starting with the state current when
/// it subscribed; a subscriber that falls more than 256 transitions behind skips to the current
/// state; streams end after `Closed`.
pub struct SessionTracker {
    current: Mutex<SessionStatus>,
    /// Each transition with its number (1, 2, ...), so a subscriber can tell an old one
    /// from a new one whatever way it came.
    events: broadcast::Sender<(u64, SessionStatus)>,
    latest: watch::Sender<SessionStatus>,
    /// `latest` with its number, for subscribers that skip ahead.
    numbered: watch::Sender<(u64, SessionStatus)>,
}

impl Default for SessionTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl SessionTracker {
    /// A tracker in state `Connecting`, epoch 0.
    pub fn new() -> Self {
        let initial = SessionStatus {
            state: SessionState::Connecting,
            epoch: 0,
            session_id: None,
        };
        let (events, _) = broadcast::channel(256);
        let (latest, _) = watch::channel(initial);
        let (numbered, _) = watch::channel((0, initial));
        SessionTracker {
            current: Mutex::new(initial),
            events,
            latest,
            numbered,
        }
    }

    /// The current status.
    pub fn status(&self) -> SessionStatus {
        *self.latest.borrow()
    }

    /// Records a transition and returns the new status. `Connected` with a session id
    /// different from the current one counts as a new session (epoch +1, reported as
    /// `Reestablished` unless it is the first); after `Closed`, nothing changes.
    pub fn transition(&self, state: SessionState, session_id: Option<SessionId>) -> SessionStatus {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if current.state == SessionState::Closed {
            return *current;
        }
        let mut next = SessionStatus {
            state,
            epoch: current.epoch,
            session_id: session_id.or(current.session_id),
        };
        match state {
            SessionState::Connected | SessionState::Reestablished => {
                let new_session = current.epoch == 0
                    || (session_id.is_some() && session_id != current.session_id)
                    || state == SessionState::Reestablished;
                if new_session {
                    next.epoch = current.epoch + 1;
                    next.state = if current.epoch == 0 {
                        SessionState::Connected
                    } else {
                        SessionState::Reestablished
                    };
                }
            }
            _ => {}
        }
        if next == *current {
            return next;
        }
        *current = next;
        let number = self.numbered.borrow().0 + 1;
        // Latest first: whoever receives the event must already read this state (or later).
        self.latest.send_replace(next);
        self.numbered.send_replace((number, next));
        let _ = self.events.send((number, next));
        tracing::debug!(state = ?next.state, epoch = next.epoch, session = ?next.session_id, "session transition");
        next
    }

    /// A receiver of the latest status (intermediate states may be skipped).
    pub fn watch(&self) -> watch::Receiver<SessionStatus> {
        self.latest.subscribe()
    }

    /// Every transition from now on, starting with the current status; ends after `Closed`.
    pub fn subscribe(&self) -> BoxStream<'static, SessionStatus> {
        let current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let rx = self.events.subscribe();
        let numbered = self.numbered.subscribe();
        // Read under the lock transitions take: the first status and the channel agree.
        let (number, first) = *numbered.borrow();
        drop(current);
        let rest = stream::unfold(
            (rx, numbered, first.state == SessionState::Closed, number),
            |(mut rx, numbered, done, last)| async move {
                if done {
                    return None;
                }
                // Each round takes one transition off the channel (or one lag), so it ends
                // with the transitions. Numbers up to the last handed out are old news.
                let (number, status) = loop {
                    match rx.recv().await {
                        Ok((number, _)) if number <= last => {}
                        Ok(numbered_status) => break numbered_status,
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            // A lagged receiver goes on from the oldest status still buffered,
                            // older than the latest handed out here: start afresh after it.
                            // Subscribed before the latest is read, so nothing after it is
                            // missed, and what both carry is skipped by its number.
                            rx = rx.resubscribe();
                            let now = *numbered.borrow();
                            if now.0 > last {
                                break now;
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                };
                let done = status.state == SessionState::Closed;
                Some((status, (rx, numbered, done, number)))
            },
        );
        stream::once(async move { first }).chain(rest).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn epochs_and_order() {
        let t = SessionTracker::new();
        let mut events = t.subscribe();
        t.transition(SessionState::Connected, Some(SessionId(7)));
        t.transition(SessionState::Suspended, None);
        t.transition(SessionState::Connected, Some(SessionId(7)));
        t.transition(SessionState::Lost, None);
        t.transition(SessionState::Connected, Some(SessionId(8)));
        t.transition(SessionState::Closed, None);
        let seen: Vec<_> = events.by_ref().map(|s| (s.state, s.epoch)).collect().await;
        use SessionState::*;
        assert_eq!(
            seen,
            [
                (Connecting, 0),
                (Connected, 1),
                (Suspended, 1),
                (Connected, 1),
                (Lost, 1),
                (Reestablished, 2),
                (Closed, 2)
            ]
        );
        assert_eq!(t.transition(Connected, Some(SessionId(9))).state, Closed);
    }

    #[tokio::test]
    async fn a_lagging_subscriber_jumps_ahead_and_never_goes_back() {
        let t = SessionTracker::new();
        let mut events = t.subscribe();
        assert_eq!(events.next().await.map(|s| s.epoch), Some(0));
        // Far more transitions than the buffer holds, each a new epoch.
        for i in 0..2000 {
            t.transition(SessionState::Lost, None);
            t.transition(SessionState::Connected, Some(SessionId(i)));
        }
        let first = events.next().await.map(|s| (s.state, s.epoch));
        assert_eq!(first, Some((SessionState::Reestablished, 2000)));
        // Nothing older follows the jump: the next is the next transition.
        let buffered = futures::FutureExt::now_or_never(events.next());
        assert_eq!(buffered.flatten().map(|s| (s.state, s.epoch)), None);
        t.transition(SessionState::Suspended, None);
        let next = events.next().await.map(|s| (s.state, s.epoch));
        assert_eq!(next, Some((SessionState::Suspended, 2000)));
        t.transition(SessionState::Closed, None);
        let rest: Vec<_> = events.map(|s| (s.state, s.epoch)).collect().await;
        assert_eq!(rest, [(SessionState::Closed, 2000)]);
    }

    /// A close whose work panicked still lets later closes return, with no `Ok`.
    #[tokio::test]
    async fn a_close_after_a_panicked_close_returns_closed() {
        let gate = std::sync::Arc::new(CloseGate::new());
        let first = tokio::spawn({
            let gate = gate.clone();
            async move {
                gate.close(|| async { panic!("the close work failed") })
                    .await
            }
        });
        assert!(first.await.is_err_and(|e| e.is_panic()));
        let second = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            gate.close(|| async { Ok(()) }),
        )
        .await;
        assert!(
            matches!(second, Ok(Err(crate::Error::Closed))),
            "{second:?}"
        );
    }
}

/// A client's closed flag, and the one run of its close: what a backend's
/// [`Registry::close`](crate::Registry::close) is made of.
///
/// Guarantees: [`close`](CloseGate::close) runs its work once, in a task of its own, so the
/// work runs to its end even when the caller stops waiting (a timeout); that caller gets the
/// work's outcome. Every later call waits until the work has ended, then returns `Ok`, so an
/// `Ok` always comes after the session's end was attempted and reported; if that work ended
/// without finishing (it panicked, or its runtime shut down), later calls return
/// [`Error::Closed`](crate::Error::Closed) instead, which no retry loop repeats.
#[derive(Debug)]
pub struct CloseGate {
    closed: std::sync::atomic::AtomicBool,
    /// `Some(finished)` once the work has ended.
    done: watch::Sender<Option<bool>>,
}

/// Marks a [`CloseGate`]'s work ended when dropped, saying whether it finished.
struct Finished {
    done: watch::Sender<Option<bool>>,
    completed: bool,
}

impl Drop for Finished {
    fn drop(&mut self) {
        self.done.send_replace(Some(self.completed));
    }
}

impl Default for CloseGate {
    fn default() -> Self {
        Self::new()
    }
}

impl CloseGate {
    /// Open.
    pub fn new() -> Self {
        CloseGate {
            closed: std::sync::atomic::AtomicBool::new(false),
            done: watch::channel(None).0,
        }
    }

    /// Whether a close has begun: operations then fail with
    /// [`Error::Closed`](crate::Error::Closed).
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Runs `work()` if no close began before, else waits for that one to end. `work` is
    /// called only by the first caller.
    pub async fn close<F, Fut>(&self, work: F) -> crate::Result<()>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = crate::Result<()>> + Send + 'static,
    {
        let mut done = self.done.subscribe();
        if self.closed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let finished = done.wait_for(Option::is_some).await.map(|d| *d);
            return match finished {
                Ok(Some(true)) => Ok(()),
                _ => Err(crate::Error::Closed),
            };
        }
        let finished = Finished {
            done: self.done.clone(),
            completed: false,
        };
        let work = work();
        let task = tokio::spawn(tracing::Instrument::in_current_span(async move {
            // Dropped however the work ends (done, panicked, cancelled at runtime shutdown),
            // so later callers never wait forever.
            // The whole guard moves in (not just the field the closure writes).
            let mut finished = finished;
            let outcome = work.await;
            finished.completed = true;
            outcome
        }));
        match task.await {
            Ok(outcome) => outcome,
            Err(failed) if failed.is_panic() => std::panic::resume_unwind(failed.into_panic()),
            // The runtime is shutting down.
            Err(_) => Err(crate::Error::Closed),
        }
    }
}

/// Tells a client's background tasks to stop (`shutdown` set) and waits until its session task
/// has ended (`task`, its join handle or a channel it answers on, resolves); the first step
/// of a backend's close. A second call finds the task taken and returns at once.
pub async fn stop_session_task<T: std::future::Future>(
    shutdown: &watch::Sender<bool>,
    task: &Mutex<Option<T>>,
) {
    shutdown.send_replace(true);
    let task = task.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(task) = task {
        let _ = task.await;
    }
}
