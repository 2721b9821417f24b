//! One gRPC watch stream per client, shared by all of its watches (as etcd's Go clientv3
//! does): a watch costs a create request on an open stream instead of a stream of its own.
//!
//! The hub is a task that owns the stream. A subscriber gets a bounded channel of its watch's
//! responses; the hub routes each response by watch id and never waits for a subscriber: one
//! whose channel is full is cancelled on the server and marked lagged. If the stream breaks,
//! every subscription ends (its owner resumes from its last revision) and the next subscription
//! opens a new stream. Dropping a [`Subscription`] cancels its watch on the server.
//!
//! The stream carries the login token it was opened with, and etcd checks it on every create:
//! once that token has expired (unused for `--auth-token-ttl`) or been forgotten (a restart),
//! every create on the stream is refused, though the client's unary calls log in again by
//! themselves. So a create refused for its token, or for want of permission (what earlier etcd
//! releases say for a stale token), makes the hub log in again and drop the stream (its other
//! watches resume), then send that create again, once, on a new stream with the new token. A
//! second refusal is the server's answer and goes to the subscriber.
//!
//! Watch ids are chosen here (etcd >= 3.4 honours them), counting up from 1 for the hub's
//! lifetime, so an id is never reused on a stream and a late cancel cannot hit another watch.
//! A create the server rejects is answered with id -1, so creates are matched to their
//! `created` answers in order (etcd answers them in the order they were sent).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, WatchClient, WatchOptions, WatchRequestSender, WatchResponse, WatchResponseStream,
};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;

/// Responses buffered per subscription before the hub counts it as lagging. Its owner only
/// moves them to its own larger buffer, so this fills only when that task is starved.
pub(crate) const SUBSCRIPTION_BUFFER: usize = 256;

/// What a [`Handle`] asks of the hub task.
enum Command {
    /// Start a watch; the hub holds `sub` under `id` before sending the create.
    Watch(Create, Sub),
    /// The subscription is gone: cancel its watch.
    Cancel(i64),
}

/// A watch create, kept until the server answers it so that it can be sent again.
struct Create {
    id: i64,
    key: Vec<u8>,
    options: WatchOptions,
    /// Sent again after a fresh login: a refusal now is final.
    relogged: bool,
}

/// The hub's side of one subscription.
struct Sub {
    /// Boxed: a channel allocates room for 32 items up front, and a response is ~100 bytes.
    responses: mpsc::Sender<Box<WatchResponse>>,
    ended: Arc<Mutex<Option<Ended>>>,
}

impl Sub {
    fn end(self, why: Ended) {
        *self.ended.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }
}

/// Why the hub ended a subscription, when it was not the stream breaking.
#[derive(Debug)]
pub(crate) enum Ended {
    /// It fell [`SUBSCRIPTION_BUFFER`] behind.
    Lagged,
    /// Its create was refused for its token and logging in again failed with this.
    Login(etcd_client::Error),
}

/// A request for the stream's writer task.
enum Request {
    Create(Vec<u8>, WatchOptions),
    Cancel(i64),
}

/// The way to a client's hub task; cheap to clone.
#[derive(Clone)]
pub(crate) struct Handle {
    commands: mpsc::UnboundedSender<Command>,
    /// The next watch id; ids start at 1 (0 asks etcd to choose).
    next_id: Arc<AtomicI64>,
}

impl Handle {
    /// Starts a hub task for `client`; it ends when `shutdown` turns true or its sender drops.
    /// `login` is the client to log in again with (`None`: no credentials, no token).
    pub(crate) fn start(
        client: WatchClient,
        login: Option<Client>,
        open_timeout: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Handle {
        let (commands, received) = mpsc::unbounded_channel();
        let hub = Hub {
            client,
            login,
            open_timeout,
            commands: received,
            shutdown,
            stream: None,
            subs: HashMap::new(),
        };
        tokio::spawn(hub.run().instrument(tracing::debug_span!("etcd_watch_hub")));
        Handle {
            commands,
            next_id: Arc::new(AtomicI64::new(1)),
        }
    }

    /// Whether the hub task has ended (the registry closed, or the runtime that ran it).
    pub(crate) fn is_closed(&self) -> bool {
        self.commands.is_closed()
    }

    /// Watches `key` with `options` on the shared stream. `None` if the hub has ended.
    pub(crate) fn subscribe(&self, key: String, options: WatchOptions) -> Option<Subscription> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, responses) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let ended = Arc::new(Mutex::new(None));
        let sub = Sub {
            responses: sender,
            ended: ended.clone(),
        };
        let create = Create {
            id,
            key: key.into_bytes(),
            options,
            relogged: false,
        };
        self.commands.send(Command::Watch(create, sub)).ok()?;
        Some(Subscription {
            id,
            responses,
            ended,
            commands: self.commands.clone(),
        })
    }
}

/// One watch on the shared stream. Dropping it cancels the watch on the server.
pub(crate) struct Subscription {
    id: i64,
    responses: mpsc::Receiver<Box<WatchResponse>>,
    ended: Arc<Mutex<Option<Ended>>>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Subscription {
    /// The watch's next response; `None` once the watch has ended (see [`ended`]).
    ///
    /// [`ended`]: Subscription::ended
    pub(crate) async fn recv(&mut self) -> Option<Box<WatchResponse>> {
        self.responses.recv().await
    }

    /// Why the hub ended the watch; `None` if the stream broke (or it has not ended).
    pub(crate) fn ended(&self) -> Option<Ended> {
        self.ended.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // Fails only when the hub has ended, and with it the stream and its watches.
        let _ = self.commands.send(Command::Cancel(self.id));
    }
}

/// The open stream: requests go through a writer task so that the hub never waits on them
/// (a send can wait for etcd, which may be waiting for the hub to read).
struct Stream {
    requests: mpsc::UnboundedSender<Request>,
    responses: WatchResponseStream,
    /// Creates sent and not yet answered, oldest first, with when they were sent.
    creating: VecDeque<(Create, Instant)>,
}

struct Hub {
    client: WatchClient,
    /// Logs in again when a create is refused for its token (with credentials only).
    login: Option<Client>,
    open_timeout: Duration,
    commands: mpsc::UnboundedReceiver<Command>,
    shutdown: watch::Receiver<bool>,
    stream: Option<Stream>,
    subs: HashMap<i64, Sub>,
}

/// The next response of the stream, or never when there is none.
async fn next_response(
    stream: &mut Option<Stream>,
) -> Option<Result<WatchResponse, etcd_client::Error>> {
    match stream {
        Some(stream) => stream.responses.next().await,
        None => std::future::pending().await,
    }
}

/// `timeout` after `start`; `None` (no deadline) when that is beyond what an `Instant` holds,
/// as with a huge timeout (allowed: it means "never"), where `+` would panic.
pub(crate) fn deadline_after(start: Instant, timeout: Duration) -> Option<Instant> {
    start.checked_add(timeout)
}

/// Sleeps until `deadline`, or forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl Hub {
    async fn run(mut self) {
        if *self.shutdown.borrow() {
            return;
        }
        loop {
            // The oldest unanswered create bounds how long a stream may stay silent.
            let deadline = self
                .stream
                .as_ref()
                .and_then(|s| s.creating.front())
                .and_then(|&(_, sent)| deadline_after(sent, self.open_timeout));
            tokio::select! {
                changed = self.shutdown.changed() => {
                    if changed.is_err() || *self.shutdown.borrow() {
                        tracing::debug!(watches = self.subs.len(), "watch hub stops");
                        return;
                    }
                }
                command = self.commands.recv() => match command {
                    Some(Command::Watch(create, sub)) => {
                        if !self.watch(create, sub).await {
                            return;
                        }
                    }
                    Some(Command::Cancel(id)) => self.cancel(id),
                    None => return,
                },
                response = next_response(&mut self.stream) => match response {
                    Some(Ok(response)) => {
                        if let Some((create, sub)) = self.dispatch(response) {
                            if !self.relogin(create, sub).await {
                                return;
                            }
                        }
                    }
                    Some(Err(error)) => self.broken(&format!("watch stream failed: {error}")),
                    None => self.broken("watch stream ended"),
                },
                () = until(deadline) => {
                    self.broken("a watch create was not answered in time");
                }
            }
        }
    }

    /// Adds a watch, opening the stream with it if there is none. `false` on shutdown.
    async fn watch(&mut self, create: Create, sub: Sub) -> bool {
        if sub.responses.is_closed() {
            return true;
        }
        let (id, key) = (create.id, create.key.clone());
        let options = create.options.clone().with_watch_id(id);
        // Held before the create is sent, so no answer can come before its subscriber.
        self.subs.insert(id, sub);
        if let Some(stream) = &mut self.stream {
            stream.creating.push_back((create, Instant::now()));
            if stream.requests.send(Request::Create(key, options)).is_err() {
                self.broken("watch stream writer ended");
            }
            return true;
        }
        let mut client = self.client.clone();
        let opened = tokio::select! {
            opened = tokio::time::timeout(self.open_timeout, client.watch(key, Some(options))) => opened,
            _ = self.shutdown.changed() => return false,
        };
        match opened {
            Ok(Ok(stream)) => {
                let (sender, responses) = stream.split();
                let (requests, pending) = mpsc::unbounded_channel();
                tokio::spawn(write(sender, pending).in_current_span());
                self.stream = Some(Stream {
                    requests,
                    responses,
                    creating: VecDeque::from([(create, Instant::now())]),
                });
                tracing::debug!("watch stream opened");
            }
            Ok(Err(error)) => self.unopened(&format!("watch stream open failed: {error}")),
            Err(_) => self.unopened("watch stream open timed out"),
        }
        true
    }

    /// `create` was refused for its token (or permission) on a stream opened with an older
    /// login: logs in again, drops the stream (its other watches resume and come back on the
    /// new one) and sends `create` again on a new stream, marked so that a second refusal is
    /// final. If the login fails, the subscriber gets that error. `false` on shutdown.
    async fn relogin(&mut self, mut create: Create, sub: Sub) -> bool {
        let Some(login) = &self.login else {
            return true;
        };
        let login = login.clone();
        tracing::info!(
            id = create.id,
            "watch create refused for its login token; logging in again"
        );
        let renewed = tokio::select! {
            renewed = tokio::time::timeout(self.open_timeout, login.refresh_token()) => renewed,
            _ = self.shutdown.changed() => return false,
        };
        match renewed {
            Ok(Ok(())) => {
                self.broken("logged in again; the stream carries the old token");
                create.relogged = true;
                self.watch(create, sub).await
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "logging in again for a watch failed");
                sub.end(Ended::Login(error));
                true
            }
            Err(_) => {
                // Unanswered: the watch's owner resumes (and comes back here) after a while.
                tracing::debug!("logging in again for a watch timed out");
                true
            }
        }
    }

    /// The stream could not be opened: ends the watch that tried and every watch already
    /// waiting (each would wait as long again), so their owners back off and retry.
    fn unopened(&mut self, why: &str) {
        tracing::debug!(why, "watch stream not opened");
        self.subs.clear();
        // Bounded: only what was queued when the open failed.
        for _ in 0..self.commands.len() {
            match self.commands.try_recv() {
                Ok(Command::Watch(..)) | Ok(Command::Cancel(_)) => {}
                Err(_) => break,
            }
        }
    }

    /// The stream broke: ends every watch on it (their owners resume) and drops it.
    fn broken(&mut self, why: &str) {
        tracing::debug!(why, watches = self.subs.len(), "watch stream broken");
        self.stream = None;
        self.subs.clear();
    }

    /// Cancels `id` on the server if it is still watched.
    fn cancel(&mut self, id: i64) {
        if self.subs.remove(&id).is_some() {
            self.send_cancel(id);
        }
        // Give back the room of a burst of watches (thousands of registrations) once it is over.
        if self.subs.capacity() > 64 && self.subs.len() < self.subs.capacity() / 4 {
            self.subs.shrink_to_fit();
        }
    }

    fn send_cancel(&mut self, id: i64) {
        if let Some(stream) = &self.stream {
            if stream.requests.send(Request::Cancel(id)).is_err() {
                self.broken("watch stream writer ended");
            }
        }
    }

    /// Routes one response to its subscriber. Returns a create refused for its login token,
    /// with its subscriber, for [`relogin`](Hub::relogin).
    fn dispatch(&mut self, response: WatchResponse) -> Option<(Create, Sub)> {
        let id = response.watch_id();
        if response.created() {
            let stream = self.stream.as_mut()?;
            let asked = stream.creating.pop_front().map(|(asked, _)| asked);
            let asked_id = asked.as_ref().map(|c| c.id);
            if response.canceled() {
                // Rejected (etcd answers -1 then): the oldest create is the one.
                tracing::debug!(
                    asked = ?asked_id,
                    reason = response.cancel_reason(),
                    "watch create rejected"
                );
                let create = asked?;
                let sub = self.subs.remove(&create.id)?;
                if self.login.is_some()
                    && !create.relogged
                    && crate::error::token_refusal(response.cancel_reason())
                {
                    return Some((create, sub));
                }
                let _ = sub.responses.try_send(Box::new(response));
            } else if asked_id != Some(id) {
                // A server before 3.4 chose its own id: routing by id cannot work.
                tracing::warn!(
                    asked = ?asked_id,
                    got = id,
                    "etcd ignored the client's watch id (etcd >= 3.4 is needed)"
                );
                self.broken("unexpected watch id");
            } else if let Some(sub) = self.subs.get(&id) {
                // The watch is in place: its owner learns it is (a watch that holds resumes
                // quickly after its next break).
                let _ = sub.responses.try_send(Box::new(response));
            }
            return None;
        }
        let Some(sub) = self.subs.get(&id) else {
            // A cancelled watch's last words, or a stream-wide progress notification.
            return None;
        };
        let ended = response.canceled();
        let lagged = match sub.responses.try_send(Box::new(response)) {
            Ok(()) if !ended => return None,
            Ok(()) => false,
            Err(mpsc::error::TrySendError::Full(_)) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        };
        if let Some(sub) = self.subs.remove(&id) {
            if lagged {
                tracing::debug!(id, "watch subscriber lagged; cancelled");
                sub.end(Ended::Lagged);
            }
        }
        // Also after the server's own cancel (compaction): etcd keeps the watch's id and
        // per-watch state on the stream until the client cancels it or the stream closes.
        self.send_cancel(id);
        None
    }
}

/// Sends the hub's requests on the stream, in order, until the hub drops the stream.
async fn write(mut sender: WatchRequestSender, mut requests: mpsc::UnboundedReceiver<Request>) {
    while let Some(request) = requests.recv().await {
        let sent = match request {
            Request::Create(key, options) => sender.watch(key, Some(options)).await,
            Request::Cancel(id) => sender.cancel(id).await,
        };
        if let Err(error) = sent {
            tracing::debug!(%error, "watch request not sent");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_timeout_is_no_deadline_rather_than_a_panic() {
        let now = Instant::now();
        assert_eq!(deadline_after(now, Duration::MAX), None);
        assert_eq!(
            deadline_after(now, Duration::from_secs(3)),
            Some(now + Duration::from_secs(3))
        );
    }
}
