//! One gRPC watch stream per client, shared by all of its watches (as etcd's Go clientv3
//! does): a watch costs a create request on an open stream instead of a stream of its own.
//!
//! The hub is a task that owns the stream. A subscriber gets a bounded channel of its watch's
//! responses; the hub routes each response by watch id and never waits for a subscriber: one
//! whose channel is full is cancelled on the server and marked lagged. If the stream breaks,
//! every subscription ends (its owner resumes from its last revision) and the next subscription
//! opens a new stream. Dropping a [`Subscription`] cancels its watch on the server.
//!
//! Watch ids are chosen here (etcd >= 3.4 honours them), counting up from 1 for the hub's
//! lifetime, so an id is never reused on a stream and a late cancel cannot hit another watch.
//! A create the server rejects is answered with id -1, so creates are matched to their
//! `created` answers in order (etcd answers them in the order they were sent).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    WatchClient, WatchOptions, WatchRequestSender, WatchResponse, WatchResponseStream,
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
    Watch {
        id: i64,
        key: Vec<u8>,
        options: WatchOptions,
        sub: Sub,
    },
    /// The subscription is gone: cancel its watch.
    Cancel(i64),
}

/// The hub's side of one subscription.
struct Sub {
    /// Boxed: a channel allocates room for 32 items up front, and a response is ~100 bytes.
    responses: mpsc::Sender<Box<WatchResponse>>,
    lagged: Arc<AtomicBool>,
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
    pub(crate) fn start(
        client: WatchClient,
        open_timeout: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Handle {
        let (commands, received) = mpsc::unbounded_channel();
        let hub = Hub {
            client,
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
        let lagged = Arc::new(AtomicBool::new(false));
        let sub = Sub {
            responses: sender,
            lagged: lagged.clone(),
        };
        let command = Command::Watch {
            id,
            key: key.into_bytes(),
            options,
            sub,
        };
        self.commands.send(command).ok()?;
        Some(Subscription {
            id,
            responses,
            lagged,
            commands: self.commands.clone(),
        })
    }
}

/// One watch on the shared stream. Dropping it cancels the watch on the server.
pub(crate) struct Subscription {
    id: i64,
    responses: mpsc::Receiver<Box<WatchResponse>>,
    lagged: Arc<AtomicBool>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Subscription {
    /// The watch's next response; `None` once the watch has ended (see [`lagged`]).
    ///
    /// [`lagged`]: Subscription::lagged
    pub(crate) async fn recv(&mut self) -> Option<Box<WatchResponse>> {
        self.responses.recv().await
    }

    /// Whether the watch ended because this subscription fell [`SUBSCRIPTION_BUFFER`] behind
    /// (rather than because the stream broke).
    pub(crate) fn lagged(&self) -> bool {
        self.lagged.load(Ordering::Acquire)
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
    creating: VecDeque<(i64, Instant)>,
}

struct Hub {
    client: WatchClient,
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
                .map(|&(_, sent)| sent + self.open_timeout);
            tokio::select! {
                changed = self.shutdown.changed() => {
                    if changed.is_err() || *self.shutdown.borrow() {
                        tracing::debug!(watches = self.subs.len(), "watch hub stops");
                        return;
                    }
                }
                command = self.commands.recv() => match command {
                    Some(Command::Watch { id, key, options, sub }) => {
                        if !self.watch(id, key, options, sub).await {
                            return;
                        }
                    }
                    Some(Command::Cancel(id)) => self.cancel(id),
                    None => return,
                },
                response = next_response(&mut self.stream) => match response {
                    Some(Ok(response)) => self.dispatch(response),
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
    async fn watch(&mut self, id: i64, key: Vec<u8>, options: WatchOptions, sub: Sub) -> bool {
        if sub.responses.is_closed() {
            return true;
        }
        let options = options.with_watch_id(id);
        // Held before the create is sent, so no answer can come before its subscriber.
        self.subs.insert(id, sub);
        if let Some(stream) = &mut self.stream {
            stream.creating.push_back((id, Instant::now()));
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
                    creating: VecDeque::from([(id, Instant::now())]),
                });
                tracing::debug!("watch stream opened");
            }
            Ok(Err(error)) => self.unopened(&format!("watch stream open failed: {error}")),
            Err(_) => self.unopened("watch stream open timed out"),
        }
        true
    }

    /// The stream could not be opened: ends the watch that tried and every watch already
    /// waiting (each would wait as long again), so their owners back off and retry.
    fn unopened(&mut self, why: &str) {
        tracing::debug!(why, "watch stream not opened");
        self.subs.clear();
        // Bounded: only what was queued when the open failed.
        for _ in 0..self.commands.len() {
            match self.commands.try_recv() {
                Ok(Command::Watch { .. }) | Ok(Command::Cancel(_)) => {}
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

    /// Routes one response to its subscriber.
    fn dispatch(&mut self, response: WatchResponse) {
        let id = response.watch_id();
        if response.created() {
            let Some(stream) = &mut self.stream else {
                return;
            };
            let asked = stream.creating.pop_front().map(|(asked, _)| asked);
            if response.canceled() {
                // Rejected (etcd answers -1 then): the oldest create is the one.
                tracing::debug!(
                    ?asked,
                    reason = response.cancel_reason(),
                    "watch create rejected"
                );
                if let Some(sub) = asked.and_then(|asked| self.subs.remove(&asked)) {
                    let _ = sub.responses.try_send(Box::new(response));
                }
            } else if asked != Some(id) {
                // A server before 3.4 chose its own id: routing by id cannot work.
                tracing::warn!(
                    ?asked,
                    got = id,
                    "etcd ignored the client's watch id (etcd >= 3.4 is needed)"
                );
                self.broken("unexpected watch id");
            }
            // Otherwise the watch is in place; its owner needs no word of it.
            return;
        }
        let Some(sub) = self.subs.get(&id) else {
            // A cancelled watch's last words, or a stream-wide progress notification.
            return;
        };
        let ended = response.canceled();
        let lagged = match sub.responses.try_send(Box::new(response)) {
            Ok(()) if !ended => return,
            Ok(()) => false,
            Err(mpsc::error::TrySendError::Full(_)) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        };
        if let Some(sub) = self.subs.remove(&id) {
            sub.lagged.store(lagged, Ordering::Release);
        }
        if lagged {
            tracing::debug!(id, "watch subscriber lagged; cancelled");
        }
        // Also after the server's own cancel (compaction): etcd keeps the watch's id and
        // per-watch state on the stream until the client cancels it or the stream closes.
        self.send_cancel(id);
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
