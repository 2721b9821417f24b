//! The in-memory backend: a complete implementation of the contract, for demos and fast tests.
//!
//! A [`MemoryStore`] is the "server": one tree, one revision counter, sessions, watchers.
//! Any number of [`MemoryRegistry`] clients connect to it, each with its own session. Fault
//! hooks on the store ([`MemoryStore::expire_session`], [`MemoryStore::interrupt_connection`])
//! let tests and demos exercise every session case without a real server.
//!
//! Watches deliver exact events (every committed change, in order). An operation's changes
//! reach a stream whole if it had fewer than [`WATCH_BUFFER`] events buffered when the
//! operation began, so one that stands for more (a recursive delete, a lost session's
//! ephemerals) reaches a consumer that keeps reading. A consumer that falls further behind has
//! its buffer dropped and gets a [`WatchEvent::Resync`] with [`ResyncReason::Lagged`] instead,
//! so writers never block and a stream holds at most the buffer and one operation's changes. The last [`HISTORY_LEN`] changes (at most
//! [`HISTORY_BYTES`] of them) are kept so a watch can start after a past revision.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::mpsc;

use crate::capabilities::Capabilities;
use crate::error::{Error, Result};
use crate::node::{Children, CreateMode, DeleteScope, Expected, Node, Revision, SessionId};
use crate::path::{sequential_name, NodePath};
use crate::registration::{RegisterOptions, Registration};
use crate::registry::{check_value, Registry};
use crate::session::{SessionState, SessionStatus, SessionTracker};
use crate::watch::{ResyncReason, Snapshot, WatchEvent, WatchOptions, WatchScope, WatchStream};

/// Events buffered per watch stream before the consumer counts as lagging.
pub const WATCH_BUFFER: usize = 4096;

/// Changes kept for watches that start after a past revision.
pub const HISTORY_LEN: usize = 100_000;

/// Bytes the kept changes may hold (their values, paths and entries): 100 000 changes of
/// 512 KiB values would otherwise pin 51 GB. The oldest changes go first.
pub const HISTORY_BYTES: usize = 64 << 20;

const BACKEND: &str = "memory";

/// Options of [`MemoryRegistry::connect`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryOptions {
    /// How long the store keeps a session whose client is cut off (default 5 s).
    pub session_ttl: Duration,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        MemoryOptions {
            session_ttl: Duration::from_secs(5),
        }
    }
}

impl MemoryOptions {
    /// These options with another session TTL.
    pub fn with_session_ttl(mut self, ttl: Duration) -> Self {
        self.session_ttl = ttl;
        self
    }
}

enum Signal {
    Event(WatchEvent),
    Resync(ResyncReason),
}

struct Watcher {
    root: NodePath,
    /// Its scope, and which events it leaves out (filtered here, as etcd's server does).
    options: WatchOptions,
    client: u64,
    tx: mpsc::UnboundedSender<Signal>,
    /// Signals sent and not yet received (see [`Watcher::offer`]).
    buffered: Arc<AtomicUsize>,
    lagged: Arc<AtomicBool>,
    /// The operation whose changes it takes whole, whatever their number.
    admitted_op: u64,
    /// Changes up to this revision are not its to deliver (a watch started after a revision
    /// the store has not reached yet waits for it, as etcd's does).
    after: u64,
}

impl Watcher {
    /// Queues `signal` of operation `op`, unless the consumer had [`WATCH_BUFFER`] signals
    /// buffered when the operation first reached it: then it lags. An operation is admitted
    /// whole, so the queue holds at most the buffer and one operation's changes.
    fn offer(&mut self, op: u64, signal: Signal) {
        if self.lagged.load(Ordering::SeqCst) {
            return;
        }
        if self.admitted_op != op {
            if self.buffered.load(Ordering::SeqCst) >= WATCH_BUFFER {
                self.lagged.store(true, Ordering::SeqCst);
                return;
            }
            self.admitted_op = op;
        }
        // Counted before it can be received, so the consumer's decrement never comes first.
        self.buffered.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(signal).is_err() {
            self.buffered.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

struct SessionEntry {
    client: u64,
}

struct ClientEntry {
    inner: Weak<ClientInner>,
    /// While cut off (`None`: connected): when the cut began (the session's TTL runs from
    /// here) and when the latest of the overlapping cuts ends (only that one's end reconnects).
    cut: Option<Cut>,
}

#[derive(Clone, Copy)]
struct Cut {
    since: tokio::time::Instant,
    until: tokio::time::Instant,
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<NodePath, Node>,
    revision: u64,
    sequences: HashMap<NodePath, u64>,
    history: VecDeque<(u64, WatchEvent)>,
    /// Bytes of values in `history`.
    history_bytes: usize,
    sessions: HashMap<SessionId, SessionEntry>,
    next_client: u64,
    clients: HashMap<u64, ClientEntry>,
    next_watcher: u64,
    watchers: HashMap<u64, Watcher>,
    /// Counts the holders of the store's lock: one operation's changes share its value.
    op: u64,
}

/// The shared tree several [`MemoryRegistry`] clients connect to. Cheap to clone (a handle).
///
/// Guarantees: every operation is atomic and linearizable; revisions count every committed
/// change from 1; sequence counters are per parent, starting at 0; session ids are unique
/// within the process.
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

fn root_node() -> Node {
    Node::empty(NodePath::root(), None)
}

impl State {
    fn node(&self, path: &NodePath) -> Option<Node> {
        if path.is_root() {
            return Some(root_node());
        }
        self.nodes.get(path).cloned()
    }

    /// Nodes strictly below `path`, in path order.
    fn descendants<'a>(&'a self, path: &'a NodePath) -> impl Iterator<Item = &'a Node> + 'a {
        crate::path::range_below(&self.nodes, path).map(|(_, n)| n)
    }

    fn in_scope(&self, root: &NodePath, scope: WatchScope) -> Vec<Node> {
        match scope {
            WatchScope::Node => self.nodes.get(root).cloned().into_iter().collect(),
            WatchScope::Children => self
                .descendants(root)
                .filter(|n| n.path.is_child_of(root))
                .cloned()
                .collect(),
            WatchScope::Subtree => self
                .nodes
                .get(root)
                .cloned()
                .into_iter()
                .chain(self.descendants(root).cloned())
                .collect(),
        }
    }

    fn snapshot(&self, root: &NodePath, scope: WatchScope) -> Snapshot {
        Snapshot {
            nodes: self.in_scope(root, scope),
            revision: Revision(self.revision),
        }
    }

    fn commit(&mut self, event: WatchEvent) {
        let path = match &event {
            WatchEvent::Created(n) | WatchEvent::Updated(n) | WatchEvent::Deleted(n) => {
                n.path.clone()
            }
            _ => return,
        };
        for watcher in self.watchers.values_mut() {
            if !watcher.options.scope.covers(&watcher.root, &path)
                || !watcher.options.keeps(&event)
                || self.revision <= watcher.after
            {
                continue;
            }
            let connected = self
                .clients
                .get(&watcher.client)
                .is_some_and(|c| c.cut.is_none());
            if !connected {
                continue;
            }
            watcher.offer(self.op, Signal::Event(event.clone()));
        }
        self.history_bytes += event_bytes(&event);
        self.history.push_back((self.revision, event));
        while self.history.len() > HISTORY_LEN || self.history_bytes > HISTORY_BYTES {
            let Some((_, oldest)) = self.history.pop_front() else {
                break;
            };
            self.history_bytes -= event_bytes(&oldest);
        }
    }

    fn insert(&mut self, path: NodePath, value: Bytes, owner: Option<SessionId>) -> Node {
        self.revision += 1;
        let node = Node {
            path: path.clone(),
            value,
            version: 0,
            create_order: self.revision,
            modify_order: self.revision,
            ephemeral_owner: owner,
        };
        self.nodes.insert(path, node.clone());
        self.commit(WatchEvent::Created(node.clone()));
        node
    }

    /// Deletes `path` (and with [`DeleteScope::Recursive`] everything below it) if its version
    /// matches `expected`; the root is refused by the callers.
    /// Writes the value of the node at `path` if its version matches `expected`.
    fn write(&mut self, path: &NodePath, value: Bytes, expected: Expected) -> Result<Node> {
        let mut node = self
            .nodes
            .get(path)
            .cloned()
            .ok_or_else(|| not_found(path))?;
        check_expected(path, &node, expected)?;
        self.revision += 1;
        node.value = value;
        node.version += 1;
        node.modify_order = self.revision;
        self.nodes.insert(path.clone(), node.clone());
        self.commit(WatchEvent::Updated(node.clone()));
        Ok(node)
    }

    fn delete(&mut self, path: &NodePath, expected: Expected, scope: DeleteScope) -> Result<()> {
        let node = self.nodes.get(path).ok_or_else(|| not_found(path))?;
        check_expected(path, node, expected)?;
        let below: Vec<NodePath> = self.descendants(path).map(|n| n.path.clone()).collect();
        if !below.is_empty() && scope == DeleteScope::Node {
            return Err(Error::NotEmpty { path: path.clone() });
        }
        // Children before parents, so no event ever shows an orphan.
        for victim in below.iter().rev() {
            self.remove(victim);
        }
        self.remove(path);
        Ok(())
    }

    fn remove(&mut self, path: &NodePath) {
        if let Some(mut node) = self.nodes.remove(path) {
            // A node made again at this path starts its children's counter over, as a
            // ZooKeeper node does; a kept counter would also grow the map for good.
            self.sequences.remove(path);
            self.revision += 1;
            node.modify_order = self.revision;
            self.commit(WatchEvent::Deleted(node));
        }
    }

    fn remove_ephemerals_of(&mut self, session: SessionId) {
        let owned: Vec<NodePath> = self
            .nodes
            .values()
            .filter(|n| n.ephemeral_owner == Some(session))
            .map(|n| n.path.clone())
            .collect();
        for path in owned {
            self.remove(&path);
        }
    }

    fn open_session(&mut self, client: u64) -> SessionId {
        // Unique across every store of the process, so a session id names one session even
        // where several stores are in use (test fixtures, named mem:// stores).
        static NEXT_SESSION: AtomicI64 = AtomicI64::new(0);
        let id = SessionId(NEXT_SESSION.fetch_add(1, Ordering::Relaxed) + 1);
        self.sessions.insert(id, SessionEntry { client });
        id
    }

    /// Marks the client's watchers for a resync and wakes them.
    fn resync_watchers_of(&mut self, client: u64, reason: ResyncReason) {
        let op = self.op;
        for watcher in self.watchers.values_mut().filter(|w| w.client == client) {
            watcher.offer(op, Signal::Resync(reason.clone()));
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.op += 1;
        state
    }

    /// Fault hook: expires `session` as a server would. Its ephemeral nodes are deleted, and
    /// its client reports `Lost`, then `Reestablished` with a new session.
    pub fn expire_session(&self, session: SessionId) -> Result<()> {
        let client = {
            let mut state = self.lock();
            let entry = state.sessions.remove(&session).ok_or_else(|| {
                Error::InvalidArgument(format!("no live session {session} in this store"))
            })?;
            state.remove_ephemerals_of(session);
            // A cut-off client learns of the expiry when it reconnects, as from a server.
            state
                .clients
                .get(&entry.client)
                .filter(|c| c.cut.is_none())
                .and_then(|c| c.inner.upgrade())
        };
        tracing::info!(%session, "memory store: session expired");
        if let Some(client) = client {
            client.session_lost(self);
        }
        Ok(())
    }

    /// Fault hook: cuts the connection of the client holding `session` for `duration`.
    ///
    /// Returns at once (it needs a tokio runtime). While cut, the client reports `Suspended`,
    /// its operations fail with [`Error::Unavailable`] and its watches receive nothing. If
    /// the cut reaches the session TTL, the store expires the session at the TTL, and on
    /// reconnection the client reports `Lost` then `Reestablished`; otherwise `Connected` with
    /// the same session. Either way its watches then deliver a `Resync`. A cut made while
    /// the client is already cut off extends it: the client reconnects when the last one
    /// ends, and the TTL counts from the start of the first.
    pub fn interrupt_connection(&self, session: SessionId, duration: Duration) -> Result<()> {
        // Checked before anything changes: the reconnection is a task, and a cut nobody ends
        // would hold the client off for good.
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::InvalidArgument("interrupt_connection needs a tokio runtime".to_owned())
        })?;
        let now = tokio::time::Instant::now();
        let ends = now.checked_add(duration).ok_or_else(|| {
            Error::InvalidArgument(format!("an interruption of {duration:?} never ends"))
        })?;
        let (client, cut) = {
            let mut state = self.lock();
            let entry = state.sessions.get(&session).ok_or_else(|| {
                Error::InvalidArgument(format!("no live session {session} in this store"))
            })?;
            let client_id = entry.client;
            let client = state
                .clients
                .get_mut(&client_id)
                .ok_or_else(|| Error::InvalidArgument(format!("no client for {session}")))?;
            let cut = match client.cut {
                Some(cut) => Cut {
                    since: cut.since,
                    until: cut.until.max(ends),
                },
                None => Cut {
                    since: now,
                    until: ends,
                },
            };
            client.cut = Some(cut);
            let inner = client.inner.upgrade();
            // Under the store's lock, as the reconnection's `Connected` is: a reconnection
            // ending just now cannot report `Connected` after this cut's `Suspended`.
            if let Some(inner) = &inner {
                inner.tracker.transition(SessionState::Suspended, None);
            }
            (inner, cut)
        };
        let Some(client) = client else {
            return Ok(());
        };
        let store = self.clone();
        // A TTL too long for the clock never expires.
        let expires = cut.since.checked_add(client.options.session_ttl);
        let span = tracing::debug_span!("memory_interruption", session = session.0, ?duration);
        runtime.spawn(tracing::Instrument::instrument(
            async move {
                if let Some(expires) = expires.filter(|e| cut.until >= *e) {
                    tokio::time::sleep_until(expires).await;
                    store.drop_session(session);
                }
                tokio::time::sleep_until(cut.until).await;
                client.reconnect(&store, cut.until);
            },
            span,
        ));
        Ok(())
    }

    fn drop_session(&self, session: SessionId) {
        let mut state = self.lock();
        if state.sessions.remove(&session).is_some() {
            state.remove_ephemerals_of(session);
        }
    }

    /// How many watch streams are open against this store (dropped streams are not counted).
    pub fn watcher_count(&self) -> usize {
        self.lock().watchers.len()
    }

    /// The live sessions and the ephemeral nodes each owns.
    pub fn sessions(&self) -> Vec<(SessionId, Vec<NodePath>)> {
        let state = self.lock();
        let mut out: Vec<_> = state
            .sessions
            .keys()
            .map(|id| {
                let owned = state
                    .nodes
                    .values()
                    .filter(|n| n.ephemeral_owner == Some(*id))
                    .map(|n| n.path.clone())
                    .collect();
                (*id, owned)
            })
            .collect();
        out.sort_by_key(|(id, _)| *id);
        out
    }
}

struct ClientInner {
    id: u64,
    store: MemoryStore,
    options: MemoryOptions,
    tracker: SessionTracker,
    session: Mutex<Option<SessionId>>,
    closed: AtomicBool,
    /// Parent watches shared by this client's registrations, as the etcd backend does.
    registration_watches: crate::RegistrationWatches,
}

impl ClientInner {
    fn session_id(&self) -> Option<SessionId> {
        *self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After the store dropped our session: report it and open a new one.
    fn session_lost(&self, store: &MemoryStore) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        self.tracker.transition(SessionState::Lost, None);
        {
            let mut state = store.lock();
            // Checked again under the lock `close` releases the session with: a session
            // opened after that would outlive the client.
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            let id = state.open_session(self.id);
            *self.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
            // Under the store's lock, as a cut's `Suspended` is: a cut of the new session
            // made just now cannot be followed by this `Reestablished`.
            self.tracker
                .transition(SessionState::Reestablished, Some(id));
        }
    }

    /// Ends the cut that ends at `ends`, unless a later cut still holds the client off.
    fn reconnect(&self, store: &MemoryStore, ends: tokio::time::Instant) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        let session_expired = {
            let mut state = store.lock();
            let Some(client) = state.clients.get_mut(&self.id) else {
                return;
            };
            // Another cut still holds the client off, or an equal one already ended.
            if client.cut.is_none_or(|cut| cut.until > ends) {
                return;
            }
            client.cut = None;
            // Expired at the TTL, or by `expire_session` while cut off.
            let session_expired = !self
                .session_id()
                .is_some_and(|id| state.sessions.contains_key(&id));
            let reason = if session_expired {
                ResyncReason::SessionReestablished
            } else {
                ResyncReason::Reconnected
            };
            state.resync_watchers_of(self.id, reason);
            if !session_expired {
                self.tracker
                    .transition(SessionState::Connected, self.session_id());
            }
            session_expired
        };
        if session_expired {
            self.session_lost(store);
        }
    }
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        // A client dropped without close() behaves as a crashed process whose session the
        // server expires: here, at once. After close() the session is gone or expiring.
        let mut state = self.store.lock();
        if let Some(session) = self
            .session_id()
            .filter(|_| !self.closed.load(Ordering::SeqCst))
        {
            if state.sessions.remove(&session).is_some() {
                state.remove_ephemerals_of(session);
            }
        }
        state.watchers.retain(|_, w| w.client != self.id);
        state.clients.remove(&self.id);
    }
}

/// A client of a [`MemoryStore`], with its own session. Cheap to clone (a handle).
#[derive(Clone)]
pub struct MemoryRegistry {
    inner: Arc<ClientInner>,
}

impl MemoryRegistry {
    /// Connects to `store` and opens a session.
    pub async fn connect(store: &MemoryStore, options: MemoryOptions) -> Result<MemoryRegistry> {
        let tracker = SessionTracker::new();
        let mut state = store.lock();
        state.next_client += 1;
        let id = state.next_client;
        let session = state.open_session(id);
        let inner = Arc::new(ClientInner {
            id,
            store: store.clone(),
            options,
            tracker,
            session: Mutex::new(Some(session)),
            closed: AtomicBool::new(false),
            registration_watches: crate::RegistrationWatches::new(),
        });
        state.clients.insert(
            id,
            ClientEntry {
                inner: Arc::downgrade(&inner),
                cut: None,
            },
        );
        // Under the store's lock, as `session_lost` reports: an expiry of this session made
        // right after the lock is released then comes after `Connected`, not before it.
        inner
            .tracker
            .transition(SessionState::Connected, Some(session));
        drop(state);
        tracing::debug!(%session, "memory client connected");
        Ok(MemoryRegistry { inner })
    }

    /// The store this client is connected to.
    pub fn store(&self) -> &MemoryStore {
        &self.inner.store
    }

    /// Locks the store for an operation, failing if this client is closed or cut off.
    fn state(&self) -> Result<MutexGuard<'_, State>> {
        let state = self.inner.store.lock();
        // Checked under the lock `close` takes after setting it: an operation that got the
        // lock first is done before `close` goes on, one that gets it later sees `Closed`
        // (checked before the lock, a watch could register after `close` had ended them all).
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let connected = state
            .clients
            .get(&self.inner.id)
            .is_some_and(|c| c.cut.is_none());
        if !connected {
            return Err(Error::unavailable(
                "memory client is cut off from its store (fault injected)",
            ));
        }
        Ok(state)
    }

    fn live_session(&self, state: &State) -> Result<SessionId> {
        self.inner
            .session_id()
            .filter(|id| state.sessions.contains_key(id))
            .ok_or(Error::SessionExpired)
    }
}

/// The value bytes a change in the history holds.
/// What one kept change costs: its entry, and the value and path it holds (paths up to
/// 1 KiB count as much as small values do: 100 000 of them are 100 MB).
fn event_bytes(event: &WatchEvent) -> usize {
    let own = std::mem::size_of::<(u64, WatchEvent)>();
    match event {
        WatchEvent::Created(n) | WatchEvent::Updated(n) | WatchEvent::Deleted(n) => {
            own + n.value.len() + n.path.as_str().len()
        }
        _ => own,
    }
}

fn not_found(path: &NodePath) -> Error {
    Error::NotFound { path: path.clone() }
}

fn check_expected(path: &NodePath, node: &Node, expected: Expected) -> Result<()> {
    match expected {
        Expected::Version(v) if v != node.version => Err(Error::VersionMismatch {
            path: path.clone(),
            expected: v,
            actual: node.version,
        }),
        _ => Ok(()),
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    fn capabilities(&self) -> Capabilities {
        Capabilities::full(BACKEND)
    }

    fn session(&self) -> SessionStatus {
        self.inner.tracker.status()
    }

    fn session_events(&self) -> BoxStream<'static, SessionStatus> {
        self.inner.tracker.subscribe()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path, ?mode))]
    async fn create(&self, path: &NodePath, value: Bytes, mode: CreateMode) -> Result<Node> {
        check_value(path, &value)?;
        let parent = path.parent().ok_or_else(|| Error::root("create"))?;
        if mode.is_sequential() {
            // Bad input is named before the client's state is: every generated name has the
            // same length (10 digits), so counter 0's is checked.
            path.check_sequential_prefix()?;
        }
        let mut state = self.state()?;
        let owner = if mode.is_ephemeral() {
            Some(self.live_session(&state)?)
        } else {
            None
        };
        let ancestors = path.ancestors();
        for ancestor in ancestors.iter().filter(|a| !a.is_root()) {
            if let Some(node) = state.nodes.get(ancestor) {
                if node.is_ephemeral() {
                    return Err(Error::EphemeralParent {
                        path: path.clone(),
                        parent: ancestor.clone(),
                    });
                }
            }
        }
        let target = if mode.is_sequential() {
            // Never overwrite a node that already holds a generated name (e.g. one created
            // explicitly): skip past it, as the counter must stay strictly increasing and
            // sequential creates never fail with AlreadyExists. Each skip passes an existing
            // node, so the loop ends within the number of nodes.
            let mut counter = state.sequences.get(&parent).copied().unwrap_or(0);
            let target = loop {
                let candidate = parent.join(&sequential_name(path.name(), counter))?;
                counter = counter.checked_add(1).ok_or_else(|| {
                    Error::InvalidArgument(format!("sequence counter of {parent} is exhausted"))
                })?;
                if !state.nodes.contains_key(&candidate) {
                    break candidate;
                }
            };
            state.sequences.insert(parent.clone(), counter);
            target
        } else {
            if state.nodes.contains_key(path) {
                return Err(Error::AlreadyExists { path: path.clone() });
            }
            path.clone()
        };
        for ancestor in ancestors.into_iter().filter(|a| !a.is_root()) {
            if !state.nodes.contains_key(&ancestor) {
                state.insert(ancestor, Bytes::new(), None);
            }
        }
        Ok(state.insert(target, value, owner))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path))]
    async fn get(&self, path: &NodePath) -> Result<Node> {
        self.state()?.node(path).ok_or_else(|| not_found(path))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path))]
    async fn exists(&self, path: &NodePath) -> Result<bool> {
        Ok(self.state()?.node(path).is_some())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path, ?expected))]
    async fn set(&self, path: &NodePath, value: Bytes, expected: Expected) -> Result<Node> {
        check_value(path, &value)?;
        if path.is_root() {
            return Err(Error::root("write"));
        }
        self.state()?.write(path, value, expected)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %node.path, owner = ?node.ephemeral_owner))]
    async fn set_owned(&self, node: &Node, value: Bytes) -> Result<Option<Node>> {
        check_value(&node.path, &value)?;
        if node.path.is_root() {
            return Err(Error::root("write"));
        }
        let mut state = self.state()?;
        let owned = state
            .nodes
            .get(&node.path)
            .is_some_and(|now| now.ephemeral_owner == node.ephemeral_owner);
        if !owned {
            return Ok(None);
        }
        state.write(&node.path, value, Expected::Any).map(Some)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path, ?expected, ?scope))]
    async fn delete(&self, path: &NodePath, expected: Expected, scope: DeleteScope) -> Result<()> {
        if path.is_root() {
            return Err(Error::root("delete"));
        }
        self.state()?.delete(path, expected, scope)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %node.path, owner = ?node.ephemeral_owner))]
    async fn delete_owned(&self, node: &Node) -> Result<bool> {
        if node.path.is_root() {
            return Err(Error::root("delete"));
        }
        let mut state = self.state()?;
        let owned = state
            .nodes
            .get(&node.path)
            .is_some_and(|now| now.ephemeral_owner == node.ephemeral_owner);
        if !owned {
            return Ok(false);
        }
        state.delete(&node.path, Expected::Any, DeleteScope::Node)?;
        Ok(true)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path))]
    async fn children(&self, path: &NodePath) -> Result<Children> {
        let state = self.state()?;
        if state.node(path).is_none() {
            return Err(not_found(path));
        }
        Ok(Children {
            nodes: crate::path::children_in(&state.nodes, path)
                .into_iter()
                .cloned()
                .collect(),
            revision: Revision(state.revision),
            skipped: Vec::new(),
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path, scope = ?options.scope))]
    async fn watch(&self, path: &NodePath, options: WatchOptions) -> Result<WatchStream> {
        options.after.map(Revision::check_watch_after).transpose()?;
        let mut state = self.state()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let buffered = Arc::new(AtomicUsize::new(0));
        let lagged = Arc::new(AtomicBool::new(false));
        let mut first: VecDeque<WatchEvent> = VecDeque::new();
        match options.after {
            None => first.push_back(WatchEvent::Snapshot(state.snapshot(path, options.scope))),
            Some(Revision(after)) => {
                let oldest = state
                    .history
                    .front()
                    .map_or(state.revision + 1, |(r, _)| *r);
                let replayable = after >= state.revision || oldest <= after + 1;
                if replayable {
                    first.extend(
                        state
                            .history
                            .iter()
                            .filter(|(rev, e)| {
                                *rev > after
                                    && options.keeps(e)
                                    && matches!(e, WatchEvent::Created(n) | WatchEvent::Updated(n) | WatchEvent::Deleted(n)
                                        if options.scope.covers(path, &n.path))
                            })
                            .map(|(_, e)| e.clone()),
                    );
                } else {
                    first.push_back(WatchEvent::Resync {
                        snapshot: state.snapshot(path, options.scope),
                        reason: ResyncReason::StartNotReplayable,
                    });
                }
            }
        }
        state.next_watcher += 1;
        let id = state.next_watcher;
        state.watchers.insert(
            id,
            Watcher {
                root: path.clone(),
                options: options.clone(),
                client: self.inner.id,
                tx,
                buffered: buffered.clone(),
                lagged: lagged.clone(),
                admitted_op: 0,
                after: options.after.map_or(0, |Revision(after)| after),
            },
        );
        drop(state);
        tracing::debug!(path = %path, scope = ?options.scope, "memory watch opened");
        let feed = WatchFeed {
            _client: self.inner.clone(),
            store: self.inner.store.clone(),
            id,
            root: path.clone(),
            scope: options.scope,
            rx,
            buffered,
            lagged,
            first,
        };
        Ok(stream::unfold(feed, |mut feed| async move {
            let event = feed.next().await?;
            Some((Ok(event), feed))
        })
        .boxed())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path))]
    async fn register(
        &self,
        path: &NodePath,
        value: Bytes,
        options: RegisterOptions,
    ) -> Result<Registration> {
        let watches = &self.inner.registration_watches;
        Registration::start_shared(Arc::new(self.clone()), watches, path, value, options).await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn close(&self) -> Result<()> {
        let unreachable = {
            let mut state = self.inner.store.lock();
            // Under the store's lock: a second close returns only once the first has removed
            // the session's ephemeral nodes.
            if self.inner.closed.swap(true, Ordering::SeqCst) {
                return Ok(());
            }
            let cut = state.clients.get(&self.inner.id).and_then(|c| c.cut);
            let session = self.inner.session_id();
            let unreachable = match (cut, session) {
                // The store cannot be told: the session expires at its TTL, as on a server.
                (Some(cut), Some(session)) => Some((session, cut.since)),
                (None, Some(session)) => {
                    if state.sessions.remove(&session).is_some() {
                        state.remove_ephemerals_of(session);
                    }
                    None
                }
                (_, None) => None,
            };
            // Dropping the senders ends each stream after what it already buffered.
            state.watchers.retain(|_, w| w.client != self.inner.id);
            unreachable
        };
        self.inner.tracker.transition(SessionState::Closed, None);
        tracing::debug!("memory client closed");
        let Some((session, since)) = unreachable else {
            return Ok(());
        };
        let store = self.inner.store.clone();
        // A TTL too long for the clock never expires.
        if let Some(expires) = since.checked_add(self.inner.options.session_ttl) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(async move {
                        tokio::time::sleep_until(expires).await;
                        store.drop_session(session);
                    });
                }
                // Polled outside Tokio, nothing can time the TTL: the session ends now rather
                // than never (and `tokio::spawn` would panic).
                Err(_) => {
                    store.drop_session(session);
                    return Err(Error::unavailable(
                        "memory client closed while cut off from its store, outside a Tokio \
                         runtime: its session ended at once",
                    ));
                }
            }
        }
        Err(Error::unavailable(
            "memory client closed while cut off from its store: its session expires at its TTL",
        ))
    }
}

/// One watch stream's state; unregisters its watcher when dropped.
struct WatchFeed {
    /// Keeps the client (and its session) alive while the stream is, as on a server: a
    /// stream whose handle was dropped must not end silently.
    _client: Arc<ClientInner>,
    store: MemoryStore,
    id: u64,
    root: NodePath,
    scope: WatchScope,
    rx: mpsc::UnboundedReceiver<Signal>,
    buffered: Arc<AtomicUsize>,
    lagged: Arc<AtomicBool>,
    first: VecDeque<WatchEvent>,
}

impl WatchFeed {
    async fn next(&mut self) -> Option<WatchEvent> {
        if let Some(event) = self.first.pop_front() {
            return Some(event);
        }
        if self.lagged.load(Ordering::SeqCst) {
            return Some(self.resync(ResyncReason::Lagged));
        }
        let signal = self.rx.recv().await?;
        self.buffered.fetch_sub(1, Ordering::SeqCst);
        match signal {
            Signal::Event(event) => {
                if self.lagged.load(Ordering::SeqCst) {
                    return Some(self.resync(ResyncReason::Lagged));
                }
                Some(event)
            }
            Signal::Resync(reason) => Some(self.resync(reason)),
        }
    }

    /// Drops everything buffered and takes a fresh snapshot, atomically with the writers.
    fn resync(&mut self, reason: ResyncReason) -> WatchEvent {
        let mut state = self.store.lock();
        while self.rx.try_recv().is_ok() {
            self.buffered.fetch_sub(1, Ordering::SeqCst);
        }
        self.lagged.store(false, Ordering::SeqCst);
        // The snapshot covers everything up to now: a watch asked to start at a later
        // revision follows from the snapshot, or the changes in between would never arrive.
        let revision = state.revision;
        if let Some(watcher) = state.watchers.get_mut(&self.id) {
            watcher.after = revision;
        }
        let snapshot = state.snapshot(&self.root, self.scope);
        WatchEvent::Resync { snapshot, reason }
    }
}

impl Drop for WatchFeed {
    fn drop(&mut self) {
        self.store.lock().watchers.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> NodePath {
        NodePath::new(s).unwrap()
    }

    async fn connect(store: &MemoryStore) -> MemoryRegistry {
        MemoryRegistry::connect(store, MemoryOptions::default())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn sequential_create_never_overwrites_an_existing_name() {
        let store = MemoryStore::default();
        let client = connect(&store).await;
        let mode = CreateMode::PersistentSequential;
        let first = client.create(&p("/q/job-"), Bytes::new(), mode).await;
        assert_eq!(first.unwrap().path, p("/q/job-0000000000"));
        // Names the counter will reach next, taken explicitly.
        for name in [
            "/q/job-0000000001",
            "/q/job-0000000002",
            "/q/job-0000000004",
        ] {
            let taken = Bytes::from_static(b"taken");
            client
                .create(&p(name), taken, CreateMode::Persistent)
                .await
                .unwrap();
        }
        let next = client
            .create(&p("/q/job-"), Bytes::from_static(b"new"), mode)
            .await;
        assert_eq!(next.unwrap().path, p("/q/job-0000000003"));
        let after = client.create(&p("/q/job-"), Bytes::new(), mode).await;
        assert_eq!(after.unwrap().path, p("/q/job-0000000005"));
        for name in [
            "/q/job-0000000001",
            "/q/job-0000000002",
            "/q/job-0000000004",
        ] {
            let node = client.get(&p(name)).await.unwrap();
            assert_eq!(&node.value[..], b"taken", "{name} was overwritten");
            assert_eq!(node.version, 0, "{name} was overwritten");
        }
        let children = client.children(&p("/q")).await.unwrap();
        assert_eq!(children.nodes.len(), 6);
    }

    async fn next_within(stream: &mut WatchStream) -> WatchEvent {
        tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("no watch item within 5 s")
            .expect("the watch ended")
            .expect("a watch error")
    }

    /// A watch started after a revision not reached yet follows on from a resync's snapshot:
    /// the changes after it arrive, none is skipped as "before the start".
    #[tokio::test]
    async fn a_watch_after_a_later_revision_misses_nothing_after_a_resync() {
        let store = MemoryStore::default();
        let client = connect(&store).await;
        let other = connect(&store).await;
        client
            .create(&p("/a"), Bytes::new(), CreateMode::Persistent)
            .await
            .unwrap();
        let at = client.children(&p("/a")).await.unwrap().revision;
        let later = Revision(at.0 + 5);
        let mut watch = client
            .watch(&p("/a"), WatchOptions::subtree().after(later))
            .await
            .unwrap();
        let session = client.session().session_id.unwrap();
        store
            .interrupt_connection(session, Duration::from_millis(50))
            .unwrap();
        assert!(matches!(
            next_within(&mut watch).await,
            WatchEvent::Resync { .. }
        ));
        other
            .create(&p("/a/x"), Bytes::new(), CreateMode::Persistent)
            .await
            .unwrap();
        match next_within(&mut watch).await {
            WatchEvent::Created(node) => assert_eq!(node.path, p("/a/x")),
            other => panic!("expected the creation of /a/x, got {other:?}"),
        }
    }

    /// A sequential create whose generated name would be too long is refused as bad input,
    /// whatever the client's state: not as a retryable error while cut off.
    #[tokio::test]
    async fn a_too_long_sequential_name_is_refused_before_the_client_state() {
        let store = MemoryStore::default();
        let client = connect(&store).await;
        let session = client.session().session_id.unwrap();
        store
            .interrupt_connection(session, Duration::from_secs(60))
            .unwrap();
        let long = p(&format!("/{}", "x".repeat(crate::path::MAX_PATH_LEN - 5)));
        let refused = client
            .create(&long, Bytes::new(), CreateMode::EphemeralSequential)
            .await
            .unwrap_err();
        assert!(
            matches!(refused, Error::InvalidPath { .. }),
            "got {refused:?}"
        );
    }

    /// The kept history is bounded in bytes counting paths too: changes to nodes with long
    /// paths and empty values used to be kept 100 000 deep whatever they held.
    #[tokio::test]
    async fn history_bytes_count_paths() {
        let store = MemoryStore::default();
        let client = connect(&store).await;
        let long = p(&format!("/{}", "x".repeat(crate::path::MAX_PATH_LEN - 1)));
        let first = client
            .create(&long, Bytes::new(), CreateMode::Persistent)
            .await
            .unwrap();
        // Enough to pass HISTORY_BYTES by their paths alone, within HISTORY_LEN.
        let writes = HISTORY_BYTES / crate::path::MAX_PATH_LEN + 1000;
        assert!(writes < HISTORY_LEN);
        for _ in 0..writes {
            client
                .set(&long, Bytes::new(), Expected::Any)
                .await
                .unwrap();
        }
        let mut stream = client
            .watch(
                &long,
                WatchOptions::node().after(Revision(first.modify_order)),
            )
            .await
            .unwrap();
        match stream.next().await {
            Some(Ok(WatchEvent::Resync {
                reason: ResyncReason::StartNotReplayable,
                ..
            })) => {}
            other => panic!("the oldest changes were kept: {other:?}"),
        }
    }

    /// Closed while cut off, from outside any Tokio runtime: no panic, and with nothing to
    /// time the TTL the session ends at once rather than never.
    #[test]
    fn close_while_cut_off_outside_tokio_ends_the_session() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = MemoryStore::default();
        let client = runtime.block_on(async {
            let client = connect(&store).await;
            client
                .create(&p("/e"), Bytes::new(), CreateMode::Ephemeral)
                .await
                .unwrap();
            let session = client.session().session_id.unwrap();
            store
                .interrupt_connection(session, Duration::from_secs(60))
                .unwrap();
            client
        });
        let closed = std::thread::spawn(move || futures::executor::block_on(client.close()))
            .join()
            .expect("close panicked outside Tokio");
        assert!(
            matches!(closed, Err(Error::Unavailable { .. })),
            "{closed:?}"
        );
        let reader = runtime.block_on(connect(&store));
        assert!(!runtime.block_on(reader.exists(&p("/e"))).unwrap());
    }
}
