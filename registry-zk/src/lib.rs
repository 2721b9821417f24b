//! The ZooKeeper backend of the [`Registry`] contract.
//!
//! - Paths are znode paths under an optional namespace (a chroot, created if missing);
//!   values are the raw bytes; created nodes get the ACL of [`ZkOptions`]' [`ZkAcl`]. Nodes
//!   written by other clients are first-class.
//! - `version` is the znode version read as an unsigned 32-bit counter (ZooKeeper's `int`
//!   goes negative after 2^31 writes; read unsigned it keeps growing, and wraps to 0 only
//!   after 2^32). An expected version of `u32::MAX` or above never matches (the server reads
//!   -1 as "any version"): `VersionMismatch`, or `NotFound` without a node.
//! - `create_order` is the `czxid`; children are sorted by `czxid` (the server returns them
//!   unordered). `children` costs one `getChildren`, then the children's values in pipelined
//!   `multiRead` requests of [`MULTI_READ_NODES`] on servers from 3.6 on (see
//!   [`ZkOptions::multi_read`]), else one pipelined `getData` per child.
//!   `Children::revision` is the parent's `pzxid`.
//! - Sequential creates use ZooKeeper's own sequential modes (so one whose generated name
//!   was taken by name fails with `AlreadyExists`: the server's counter does not skip it). Missing parents are created one
//!   by one, tolerating "node exists" from concurrent creators; a recursive delete removes
//!   the deepest nodes first and starts over if a concurrent creator added a child. With an
//!   expected version, a tree whose paths total under 512 KiB goes in one transaction (all
//!   or nothing); a bigger one has its version checked first, then is deleted bottom-up.
//! - One session per client. `Disconnected` is reported as `Suspended`; `Expired`,
//!   `AuthFailed` and `Closed` end the zookeeper-client `Client`, so a new one is built (with
//!   capped, jittered backoff, forever) and reported as `Lost` then `Reestablished`.
//! - Every request has a deadline. After a connection loss or a timeout, reads are sent
//!   again; unconditional writes only after a connection loss (an unconditional delete that
//!   then finds no node succeeds: its first attempt removed it), since zookeeper-client keeps
//!   a timed-out request queued and sends it once connected, so a resend would be applied
//!   too. Such a resend is at least once, as with Curator's retry policies: what another
//!   client wrote between the two attempts (a value, a node re-created at the path) is
//!   overwritten or removed by the repeat. Creates and versioned writes are not sent again, since a first attempt that was
//!   applied would make the second report a conflict with itself, so they report
//!   `Unavailable` or `Timeout` and the caller reads to learn the outcome.
//! - Watches: see [`watch`]. Events are converging snapshots (`exact_events` is false) and a
//!   watch cannot start after a past revision (`watch_from_revision` is false).
#![warn(missing_docs)]

mod error;
pub mod options;
mod server_version;
mod version;
pub mod watch;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::Future;
use registry_core::{
    check_value, Backoff, Capabilities, Children, CloseGate, CreateMode, DeleteScope, Error,
    Expected, Node, NodePath, RegisterOptions, Registration, Registry, Result, Revision, SessionId,
    SessionState, SessionStatus, SessionTracker, WatchOptions, WatchStream,
};
use tokio::sync::watch as channel;
use tokio::task::JoinHandle;
use tracing::Instrument;
use zookeeper_client as zk;

pub use options::{ZkAcl, ZkOptions};

use error::{map, BACKEND};

/// What the registry's handles, its session task and its watch tasks share.
pub(crate) struct Shared {
    client: RwLock<Option<zk::Client>>,
    options: ZkOptions,
    pub(crate) tracker: SessionTracker,
    pub(crate) shutdown: channel::Sender<bool>,
    closed: CloseGate,
    session_task: Mutex<Option<JoinHandle<()>>>,
    /// Whether `children` reads values with `multiRead` (see [`ZkOptions::multi_read`]).
    multi_read: AtomicBool,
}

impl Shared {
    /// The state of a registry whose first session is `client`'s, reported `Connected`; the
    /// receiver is the session task's shutdown signal.
    fn new(client: &zk::Client, options: ZkOptions) -> (Arc<Shared>, channel::Receiver<bool>) {
        let options_multi_read = options.multi_read;
        let tracker = SessionTracker::new();
        tracker.transition(SessionState::Connected, Some(session_id(client)));
        let (shutdown, shutdown_rx) = channel::channel(false);
        let shared = Arc::new(Shared {
            client: RwLock::new(Some(client.clone())),
            options,
            tracker,
            shutdown,
            closed: CloseGate::new(),
            session_task: Mutex::new(None),
            multi_read: AtomicBool::new(options_multi_read == Some(true)),
        });
        (shared, shutdown_rx)
    }

    /// The current client; `Closed` after close.
    pub(crate) fn client(&self) -> Result<zk::Client> {
        self.with_client(zk::Client::clone)
    }

    /// Runs `f` on the current client without cloning it (a clone allocates); `Closed` after
    /// close.
    fn with_client<R>(&self, f: impl FnOnce(&zk::Client) -> R) -> Result<R> {
        if self.closed.is_closed() {
            return Err(Error::Closed);
        }
        let client = self.client.read().unwrap_or_else(|p| p.into_inner());
        client.as_ref().map(f).ok_or(Error::Closed)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

/// A client of ZooKeeper implementing [`Registry`]. Cheap to clone (a handle).
#[derive(Clone)]
pub struct ZkRegistry {
    shared: Arc<Shared>,
}

fn session_id(client: &zk::Client) -> SessionId {
    SessionId(client.session_id().0)
}

/// A connector with the options' timeouts and credentials.
fn connector(options: &ZkOptions) -> zk::Connector {
    let mut connector = zk::Client::connector()
        .with_session_timeout(options.session_ttl)
        .with_connection_timeout(options.connection_attempt_timeout());
    if let Some((scheme, auth)) = &options.auth {
        connector = connector.with_auth(scheme, auth);
    }
    if let Some((user, password)) = &options.sasl_digest_md5 {
        connector =
            connector.with_sasl(zk::SaslOptions::digest_md5(user.clone(), password.clone()));
    }
    connector
}

/// The state `states` ends in (Closed, Expired or AuthFailed).
async fn terminal_state(states: &mut zk::StateWatcher) -> zk::SessionState {
    let mut state = states.state();
    // Checked before each wait: `changed` never returns after a terminal state.
    while !state.is_terminated() {
        state = states.changed().await;
    }
    state
}

/// Ends the session whose last client was just dropped (which sends the close request);
/// true once the server has confirmed it, so its ephemeral nodes are gone.
///
/// `Closed` is the server's answer to the close request. The client reports `Expired` both
/// when the server said so and when it gave up reconnecting by itself (and a ping sent while
/// a large session's close is still deleting its ephemerals makes it reconnect), so after
/// anything but `Closed` the session is resumed with its ID: the server either refuses it as
/// expired, which confirms the end, or takes it back, and that client is closed in turn.
async fn end_session(
    options: &ZkOptions,
    session: zk::SessionInfo,
    mut states: zk::StateWatcher,
) -> bool {
    let (wait, cluster) = (options.request_timeout, options.connect_string());
    // Bounded: each round ends the session or resumes it once more.
    for _ in 0..3 {
        if let Ok(zk::SessionState::Closed) =
            tokio::time::timeout(wait, terminal_state(&mut states)).await
        {
            return true;
        }
        let resume = connector(options)
            .with_session(session.clone())
            .connect(&cluster);
        match tokio::time::timeout(options.connect_timeout.min(wait), resume).await {
            Ok(Err(zk::Error::SessionExpired)) => return true,
            Ok(Ok(client)) => {
                tracing::debug!("zookeeper session resumed to close it again");
                states = client.state_watcher();
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "zookeeper session end not confirmed");
                return false;
            }
            Err(_) => return false,
        }
    }
    false
}

/// The missing ancestors of `path` (and `path` itself with `itself`), top-down: found with
/// `exists` from the bottom up, stopping at the first that exists. ZooKeeper checks the
/// right to create under a node's parent before whether the node exists, so creating an
/// existing one can be refused where creating the missing ones is allowed.
async fn missing_down_to<F, Fut>(
    path: &NodePath,
    itself: bool,
    mut exists: F,
) -> Result<Vec<NodePath>>
where
    F: FnMut(NodePath) -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let mut missing = Vec::new();
    let bottom_up = itself
        .then(|| path.clone())
        .into_iter()
        .chain(path.ancestors().into_iter().rev());
    for candidate in bottom_up {
        if candidate.is_root() || exists(candidate.clone()).await? {
            break;
        }
        missing.push(candidate);
    }
    missing.reverse();
    Ok(missing)
}

/// Opens a session, creating the chroot first if there is one.
async fn open_client(options: &ZkOptions) -> Result<zk::Client> {
    let root = NodePath::root();
    let connect = async {
        let client = connector(options)
            .connect(&options.connect_string())
            .await
            .map_err(|e| map(e, "connect", &root))?;
        let Some(chroot) = &options.namespace else {
            return Ok(client);
        };
        // An existing chroot is only read: a client that may not create at `/` can use it,
        // and it is not written at every connect.
        let reader = &client;
        let missing = missing_down_to(chroot, true, |path| async move {
            reader
                .check_stat(path.as_str())
                .await
                .map(|stat| stat.is_some())
                .map_err(|e| map(e, "read chroot", &path))
        })
        .await?;
        for path in &missing {
            let created = client
                .create(
                    path.as_str(),
                    &[],
                    &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all()),
                )
                .await;
            match created {
                Ok(_) | Err(zk::Error::NodeExists) => {}
                Err(e) => return Err(map(e, "create chroot", path)),
            }
        }
        client
            .chroot(chroot.as_str())
            .map_err(|_| Error::InvalidArgument(format!("zookeeper chroot {chroot} rejected")))
    };
    let deadline = options.connect_timeout + options.request_timeout;
    tokio::time::timeout(deadline, connect)
        .await
        .map_err(|_| Error::Timeout {
            operation: format!("zookeeper connect to {}", options.connect_string()),
            after: deadline,
        })?
}

/// The state a fresh `states` starts in if it is one the session task must still act on.
///
/// `Client::state_watcher` marks the current state as seen, so `changed` would not report
/// a disconnection or an expiry that happened before the watcher was made (after a terminal
/// state it never returns at all). A connected state was already reported with the client.
fn missed_state(states: &mut zk::StateWatcher) -> Option<zk::SessionState> {
    let state = states.state();
    let connected = matches!(
        state,
        zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly
    );
    (!connected).then_some(state)
}

/// Follows the client's session states; replaces the client when its session ends.
async fn run_session(
    shared: std::sync::Weak<Shared>,
    mut client: zk::Client,
    mut shutdown: channel::Receiver<bool>,
) {
    let mut states = client.state_watcher();
    let mut missed = missed_state(&mut states);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
    loop {
        let state = match missed.take() {
            Some(state) => state,
            None => tokio::select! {
                _ = shutdown.changed() => return,
                state = states.changed() => state,
            },
        };
        let Some(owner) = shared.upgrade() else {
            return;
        };
        match state {
            zk::SessionState::Disconnected => {
                tracing::warn!("zookeeper connection lost; session suspended");
                owner.tracker.transition(SessionState::Suspended, None);
            }
            zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                owner
                    .tracker
                    .transition(SessionState::Connected, Some(session_id(&client)));
            }
            zk::SessionState::Expired | zk::SessionState::Closed | zk::SessionState::AuthFailed => {
                if *shutdown.borrow() || owner.closed.is_closed() {
                    return;
                }
                tracing::warn!(?state, "zookeeper session ended; opening a new one");
                owner.tracker.transition(SessionState::Lost, None);
                let options = owner.options.clone();
                drop(owner);
                client = loop {
                    let attempt = tokio::select! {
                        _ = shutdown.changed() => return,
                        attempt = open_client(&options) => attempt,
                    };
                    match attempt {
                        Ok(new) => break new,
                        Err(error) => {
                            tracing::warn!(%error, "zookeeper reconnect failed; retrying");
                            tokio::select! {
                                _ = shutdown.changed() => return,
                                _ = tokio::time::sleep(backoff.next_delay()) => {}
                            }
                        }
                    }
                };
                backoff.reset();
                let Some(owner) = shared.upgrade() else {
                    return;
                };
                if owner.closed.is_closed() {
                    return;
                }
                *owner.client.write().unwrap_or_else(|p| p.into_inner()) = Some(client.clone());
                states = client.state_watcher();
                missed = missed_state(&mut states);
                owner
                    .tracker
                    .transition(SessionState::Reestablished, Some(session_id(&client)));
                tracing::info!(session = %session_id(&client), "zookeeper session re-established");
            }
        }
    }
}

impl ZkRegistry {
    /// Connects and opens a session. Fails with a retryable error if no server answers within
    /// the connect timeout. The client lives on the runtime this runs on (see [`Registry`]).
    pub async fn connect(options: ZkOptions) -> Result<ZkRegistry> {
        if !options.has_identity()
            && (options.acl_for(true) != ZkAcl::Open || options.acl_for(false) != ZkAcl::Open)
        {
            return Err(Error::InvalidArgument(
                "zookeeper: creator ACLs need an identity; add with_auth(\"digest\", \"user:password\") or with_sasl_digest_md5"
                    .into(),
            ));
        }
        if options.endpoints.iter().all(|e| e.trim().is_empty()) {
            return Err(Error::InvalidArgument(
                "zookeeper: no endpoint given".into(),
            ));
        }
        let client = open_client(&options).await?;
        let (shared, shutdown_rx) = Shared::new(&client, options);
        if shared.options.multi_read.is_none() {
            // Asked in the background: until the answer, children are read one by one.
            let (weak, endpoints) = (Arc::downgrade(&shared), shared.options.endpoints.clone());
            let timeout = shared.options.connection_attempt_timeout();
            let mut shutdown = shared.shutdown.subscribe();
            let span = tracing::debug_span!("zk_server_release");
            tokio::spawn(
                async move {
                    // Ends with the registry: close stops every background task.
                    let supported = tokio::select! {
                        _ = shutdown.wait_for(|closed| *closed) => return,
                        supported = server_version::multi_read_supported(&endpoints, timeout) => supported,
                    };
                    if let Some(shared) = weak.upgrade() {
                        shared.multi_read.store(supported, Ordering::Relaxed);
                    }
                }
                .instrument(span),
            );
        }
        let span = tracing::info_span!("zk_session", servers = %shared.options.connect_string());
        let task = tokio::spawn(
            run_session(Arc::downgrade(&shared), client, shutdown_rx).instrument(span),
        );
        *shared
            .session_task
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(ZkRegistry { shared })
    }

    /// The current session's id and password, for handing a session over (or, in tests,
    /// expiring it from another connection). `None` after close.
    pub fn session_info(&self) -> Option<zk::SessionInfo> {
        self.shared.client().ok().map(|c| c.session().clone())
    }

    /// Runs one request with the deadline, sending it again after a connection loss or a
    /// timeout as `resend` allows. `request` sends at once (zookeeper-client queues the
    /// request when called) and its future must not borrow the client.
    async fn call<T, F, Fut>(
        &self,
        operation: &str,
        path: &NodePath,
        resend: Resend<T>,
        request: F,
    ) -> Result<T>
    where
        F: Fn(&zk::Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, zk::Error>>,
    {
        let timeout = self.shared.options.request_timeout;
        let attempts = if matches!(resend, Resend::Never) {
            1
        } else {
            3
        };
        let mut last = None;
        // Whether an earlier attempt may have been applied: its connection broke with it in
        // flight. A SessionExpired answer means it was not (the server answers in order, and
        // refuses everything of an expired session), so then a missing node was missing.
        let mut maybe_applied = false;
        for attempt in 0..attempts {
            let sent = self.shared.with_client(&request)?;
            let (error, timed_out) = match tokio::time::timeout(timeout, sent).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(zk::Error::NoNode)) if maybe_applied => match resend {
                    Resend::Removal(done) => return Ok(done),
                    _ => (map(zk::Error::NoNode, operation, path), false),
                },
                Ok(Err(e)) => {
                    maybe_applied |= matches!(
                        e,
                        zk::Error::ConnectionLoss
                            | zk::Error::UnexpectedError(_)
                            | zk::Error::UnmarshalError { .. }
                    );
                    (map(e, operation, path), false)
                }
                Err(_) => {
                    let error = Error::Timeout {
                        operation: format!("zookeeper {operation} {path}"),
                        after: timeout,
                    };
                    (error, true)
                }
            };
            // A write that timed out is still queued in the client and goes out once
            // connected: sent again, it would be applied twice.
            let write = matches!(resend, Resend::Write | Resend::Removal(_));
            if !error.is_retryable() || attempt + 1 == attempts || (timed_out && write) {
                return Err(error);
            }
            last = Some(error);
            tokio::time::sleep(Duration::from_millis(50 * (attempt as u64 + 1))).await;
        }
        Err(last.unwrap_or_else(|| Error::unavailable(format!("zookeeper {operation} {path}"))))
    }

    /// Of the descendants a recursive delete of `path` could not list, the first that has
    /// children of its own (a stat needs no rights), as the error that names it.
    async fn hidden_subtree(
        &self,
        path: &NodePath,
        unreadable: &[String],
    ) -> Result<Option<Error>> {
        for raw in unreadable {
            let stat = self
                .call("stat unlistable node", path, Resend::Read, |c| {
                    c.check_stat(raw)
                })
                .await?;
            if stat.is_some_and(|s| s.num_children > 0) {
                return Ok(Some(Error::PermissionDenied {
                    path: NodePath::new(raw.as_str()).unwrap_or_else(|_| path.clone()),
                }));
            }
        }
        Ok(None)
    }

    async fn stat(&self, path: &NodePath) -> Result<Option<zk::Stat>> {
        self.call("exists", path, Resend::Read, |c| {
            c.check_stat(path.as_str())
        })
        .await
    }

    /// The version to write or delete `node` at, if the node at its path has its owner.
    /// ZooKeeper cannot compare an owner in a write: the stat (no value sent back) is read,
    /// then the write goes at the version read, so a node replaced after the stat at another
    /// version fails the write instead of taking it.
    async fn owned_version(&self, node: &Node) -> Result<Option<Expected>> {
        let Some(stat) = self.stat(&node.path).await? else {
            return Ok(None);
        };
        let owner = watch::owner_session(stat.ephemeral_owner);
        Ok((owner == node.ephemeral_owner)
            .then(|| Expected::Version(version::from_zk(stat.version))))
    }

    async fn mismatch(&self, path: &NodePath, expected: u64) -> Error {
        match self.stat(path).await {
            Ok(Some(stat)) => Error::VersionMismatch {
                path: path.clone(),
                expected,
                actual: version::from_zk(stat.version),
            },
            Ok(None) => Error::NotFound { path: path.clone() },
            Err(e) => e,
        }
    }

    async fn create_parents(&self, path: &NodePath) -> Result<()> {
        let missing = missing_down_to(path, false, |ancestor| async move {
            Ok(self.stat(&ancestor).await?.is_some())
        })
        .await?;
        for ancestor in missing {
            let p = ancestor.as_str().to_owned();
            // A create's future borrows its client and path: hand it owned ones.
            let created = self
                .call("create parent", &ancestor, Resend::Never, |c| {
                    let (c, p) = (c.clone(), p.clone());
                    async move {
                        c.create(
                            &p,
                            &[],
                            &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all()),
                        )
                        .await
                    }
                })
                .await;
            match created {
                Ok(_) | Err(Error::AlreadyExists { .. }) => {}
                Err(Error::EphemeralParent { parent, .. }) => {
                    return Err(Error::EphemeralParent {
                        path: path.clone(),
                        parent,
                    })
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Deletes `path` at `version` (any version for `None`) and every node of `below` (raw
    /// paths, parents before children) in one transaction: all or nothing. Not resent here
    /// (see [`Resend`]): the caller decides, as only an unconditional one may be repeated.
    async fn delete_tree_at(
        &self,
        path: &NodePath,
        version: Option<i32>,
        below: &[String],
    ) -> Result<()> {
        let client = self.shared.client()?;
        let mut writer = client.new_multi_writer();
        let bad = |e: zk::Error| map(e, "delete", path);
        if let Some(version) = version {
            writer
                .add_check_version(path.as_str(), version)
                .map_err(bad)?;
        }
        for victim in below.iter().rev() {
            writer.add_delete(victim, None).map_err(bad)?;
        }
        writer.add_delete(path.as_str(), version).map_err(bad)?;
        let timeout = self.shared.options.request_timeout;
        match tokio::time::timeout(timeout, writer.commit()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(map(e.into(), "delete", path)),
            Err(_) => Err(Error::Timeout {
                operation: format!("zookeeper delete {path}"),
                after: timeout,
            }),
        }
    }

    async fn children_of(&self, path: &NodePath) -> Result<(Vec<String>, zk::Stat)> {
        self.call("children", path, Resend::Read, |c| {
            c.get_children(path.as_str())
        })
        .await
    }

    /// [`read_each`](ZkRegistry::read_each) on the current client, sent again (up to twice)
    /// after a retryable failure, as [`call`](ZkRegistry::call) does: after a refused
    /// multiRead the server drops the connection, which fails the reads in flight.
    async fn read_each_again(&self, children: &[NodePath]) -> Result<Vec<Node>> {
        let mut attempt = 0u64;
        loop {
            let client = self.shared.client()?;
            match self.read_each(&client, children).await {
                Err(error) if error.is_retryable() && attempt < 2 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                }
                done => return done,
            }
        }
    }

    /// `children`' nodes, one `getData` each (a child gone since the listing is left out).
    async fn read_each(&self, client: &zk::Client, children: &[NodePath]) -> Result<Vec<Node>> {
        let mut nodes = Vec::with_capacity(children.len());
        let reads = children.iter().map(|c| client.get_data(c.as_str()));
        let timeout = self.shared.options.request_timeout;
        let stalled = |i: usize| format!("zookeeper get {}", children[i]);
        in_order(reads, CHILD_READS_IN_FLIGHT, timeout, stalled, |i, read| {
            let child = &children[i];
            match read {
                Ok((data, stat)) => nodes.push(watch::node_of(child.clone(), data, &stat)),
                Err(zk::Error::NoNode) => {}
                Err(e) => return Err(map(e, "children", child)),
            }
            Ok(())
        })
        .await?;
        Ok(nodes)
    }

    /// `children`' nodes, [`MULTI_READ_NODES`] to a `multiRead` request (a child gone since
    /// the listing is left out).
    async fn read_multi(
        &self,
        client: &zk::Client,
        children: &[NodePath],
    ) -> std::result::Result<Vec<Node>, MultiRead> {
        let chunks: Vec<&[NodePath]> = children.chunks(MULTI_READ_NODES).collect();
        let reads = chunks.iter().map(|chunk| {
            let mut reader = client.new_multi_reader();
            for child in *chunk {
                // Refused only for a path the client cannot send, which a `NodePath` is not.
                if let Err(e) = reader.add_get_data(child.as_str()) {
                    return futures::future::Either::Left(futures::future::ready(Err(e)));
                }
            }
            futures::future::Either::Right(reader.commit())
        });
        let mut nodes = Vec::with_capacity(children.len());
        let timeout = self.shared.options.request_timeout;
        let stalled = |i: usize| format!("zookeeper multiRead from {}", chunks[i][0]);
        in_order(reads, MULTI_READS_IN_FLIGHT, timeout, stalled, |i, read| {
            let chunk = chunks[i];
            let results = match read {
                Ok(results) => results,
                Err(zk::Error::Unimplemented) => return Err(MultiRead::Refused),
                Err(e) => return Err(MultiRead::Failed(map(e, "children", &chunk[0]))),
            };
            if results.len() != chunk.len() {
                return Err(MultiRead::Failed(Error::unavailable(format!(
                    "zookeeper multiRead from {}: {} results for {} reads",
                    chunk[0],
                    results.len(),
                    chunk.len()
                ))));
            }
            for (child, result) in chunk.iter().zip(results) {
                match result {
                    zk::MultiReadResult::Data { data, stat } => {
                        nodes.push(watch::node_of(child.clone(), data, &stat));
                    }
                    zk::MultiReadResult::Error {
                        err: zk::Error::NoNode,
                    } => {}
                    zk::MultiReadResult::Error { err } => {
                        return Err(MultiRead::Failed(map(err, "children", child)))
                    }
                    other => {
                        return Err(MultiRead::Failed(Error::unavailable(format!(
                            "zookeeper multiRead of {child}: unexpected result {other:?}"
                        ))))
                    }
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| match e {
            Stalled::Timeout(error) => MultiRead::Failed(error),
            Stalled::Handled(e) => e,
        })?;
        Ok(nodes)
    }
}

/// Why [`ZkRegistry::read_multi`] read nothing.
enum MultiRead {
    /// The server does not know `multiRead` (before 3.6).
    Refused,
    /// Any other failure, as `children` reports it.
    Failed(Error),
}

/// How [`in_order`] ended early: no answer for a whole timeout, or `handle` said stop.
enum Stalled<E> {
    Timeout(Error),
    Handled(E),
}

impl From<Stalled<Error>> for Error {
    fn from(stalled: Stalled<Error>) -> Error {
        match stalled {
            Stalled::Timeout(error) | Stalled::Handled(error) => error,
        }
    }
}

/// Sends `requests` (each is sent when made) with up to `in_flight` out at once, and hands
/// each answer, in order, to `handle` with its index: ZooKeeper answers a session's requests
/// in order, and each handled answer makes the next request. Measured cheaper in client CPU than a
/// buffered stream with a timer per request. One timer for all: it fires only when no answer
/// came for a whole `timeout` (a `Timeout` naming `stalled(index)`), so 100k requests take as
/// long as the server needs.
async fn in_order<I, Fut, T, E>(
    requests: I,
    in_flight: usize,
    timeout: Duration,
    stalled: impl Fn(usize) -> String,
    mut handle: impl FnMut(usize, T) -> std::result::Result<(), E>,
) -> std::result::Result<(), Stalled<E>>
where
    I: Iterator<Item = Fut>,
    Fut: Future<Output = T>,
{
    let mut requests = requests.enumerate();
    let mut out = VecDeque::with_capacity(in_flight);
    out.extend(requests.by_ref().take(in_flight));
    let stall = tokio::time::sleep(timeout);
    tokio::pin!(stall);
    let mut progress = tokio::time::Instant::now();
    // Bounded: one round per request, each waiting at most one `timeout` without progress.
    while let Some((index, answer)) = out.pop_front() {
        tokio::pin!(answer);
        let answer = loop {
            tokio::select! {
                biased;
                answer = &mut answer => break answer,
                () = &mut stall => {
                    if progress.elapsed() >= timeout {
                        return Err(Stalled::Timeout(Error::Timeout {
                            operation: stalled(index),
                            after: timeout,
                        }));
                    }
                    stall.as_mut().reset(progress + timeout);
                }
            }
        };
        progress = tokio::time::Instant::now();
        // Handled before the next is sent: after a refusal nothing more goes out.
        handle(index, answer).map_err(Stalled::Handled)?;
        out.extend(requests.next());
    }
    Ok(())
}

/// Whether [`ZkRegistry::call`] sends a request again after a connection loss or a timeout,
/// which leave unknown whether the first attempt was applied.
enum Resend<T> {
    /// Never: a create or a versioned write applied by its first attempt would make the
    /// second report a conflict with itself (exists, version mismatch).
    Never,
    /// Reads: up to twice more, after a connection loss or a timeout.
    Read,
    /// Writes whose repetition by itself leaves the same state (another client's write
    /// between the attempts is undone: at least once): up to twice more, after a connection
    /// loss only (the client failed that attempt and does not send it again). A timed-out
    /// attempt is still queued and is sent once connected.
    Write,
    /// Like `Write`, for an unconditional delete: "no node" after a resend is `T`, since the
    /// first attempt may have removed it.
    Removal(T),
}

/// Bytes of paths a recursive delete removes in one transaction: half of ZooKeeper's
/// default 1 MB `jute.maxbuffer`, which a bigger request would break (the server drops the
/// connection). A bigger tree is checked first (if versioned), then deleted bottom-up.
const ATOMIC_DELETE_BYTES: usize = 512 * 1024;

/// Child reads of one `children` call in flight at once.
const CHILD_READS_IN_FLIGHT: usize = 256;

/// Most child values one `multiRead` request of `children` asks for: a bound on the size of
/// its answer (values up to ZooKeeper's 1 MB each), while 100 children cost four requests.
pub const MULTI_READ_NODES: usize = 32;

/// `multiRead` requests of one `children` call in flight at once.
const MULTI_READS_IN_FLIGHT: usize = CHILD_READS_IN_FLIGHT / MULTI_READ_NODES;

static CREATOR_WRITES_ANYONE_READS: [zk::Acl; 2] = [
    zk::Acl::new_const(zk::Permission::READ, "world", "anyone"),
    zk::Acl::new_const(zk::Permission::ALL, "auth", ""),
];

fn acls(acl: ZkAcl) -> zk::Acls<'static> {
    match acl {
        ZkAcl::Open => zk::Acls::anyone_all(),
        ZkAcl::CreatorWritesAnyoneReads => zk::Acls::new(&CREATOR_WRITES_ANYONE_READS),
        ZkAcl::CreatorOnly => zk::Acls::creator_all(),
    }
}

fn zk_mode(mode: CreateMode) -> zk::CreateMode {
    match mode {
        CreateMode::Persistent => zk::CreateMode::Persistent,
        CreateMode::Ephemeral => zk::CreateMode::Ephemeral,
        CreateMode::PersistentSequential => zk::CreateMode::PersistentSequential,
        CreateMode::EphemeralSequential => zk::CreateMode::EphemeralSequential,
    }
}

/// Whether `parent`'s child `name` is ZooKeeper's own `/zookeeper` (quotas, config), which no
/// `NodePath` names: at the root of a client without a chroot it is the server's, not a node
/// anyone wrote, so it is left out without a word (under a chroot it is a user's node).
pub(crate) fn servers_own(parent: &NodePath, name: &str, chrooted: bool) -> bool {
    !chrooted && parent.is_root() && name == "zookeeper"
}

/// `parent`'s child `name` as a `NodePath`; `None`, with a warning, if it is not one (another
/// client may create nodes deeper or with longer paths than a `NodePath` allows), so such a
/// child is left out of a listing, but not silently.
fn child_path(parent: &NodePath, name: &str) -> Option<NodePath> {
    match parent.join(name) {
        Ok(child) => Some(child),
        Err(error) => {
            tracing::warn!(%parent, child = name, %error, "child left out: not a valid path");
            None
        }
    }
}

fn root_node() -> Node {
    Node::empty(NodePath::root(), None)
}

#[async_trait]
impl Registry for ZkRegistry {
    fn capabilities(&self) -> Capabilities {
        Capabilities::full(BACKEND)
            .with_exact_events(false)
            .with_watch_from_revision(false)
            .with_sequential_skips_taken(false)
    }

    fn session(&self) -> SessionStatus {
        self.shared.tracker.status()
    }

    fn session_events(&self) -> BoxStream<'static, SessionStatus> {
        self.shared.tracker.subscribe()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path, ?mode))]
    async fn create(&self, path: &NodePath, value: Bytes, mode: CreateMode) -> Result<Node> {
        check_value(path, &value)?;
        let parent = path.parent().ok_or_else(|| Error::root("create"))?;
        if mode.is_sequential() {
            // The server appends 10 digits: a name valid only without them would be created,
            // then rejected here, left behind. Input errors come before any I/O.
            path.check_sequential_prefix()?;
        }
        self.shared.client()?;
        let acl = self.shared.options.acl_for(mode.is_ephemeral());
        for round in 0..2 {
            let created = self
                .call("create", path, Resend::Never, |c| {
                    let (c, p, data) = (c.clone(), path.as_str().to_owned(), value.clone());
                    async move {
                        c.create(&p, &data, &zk_mode(mode).with_acls(acls(acl)))
                            .await
                    }
                })
                .await;
            match created {
                Ok((stat, sequence)) => {
                    let target = if mode.is_sequential() {
                        parent.join(&format!("{}{sequence}", path.name()))?
                    } else {
                        path.clone()
                    };
                    let mut node = watch::node_of(target, value.clone(), &stat);
                    if stat.czxid <= 0 {
                        // Old servers return no stat from create: read it.
                        node = self.get(&node.path).await?;
                    }
                    tracing::debug!(path = %node.path, ?mode, "created");
                    return Ok(node);
                }
                Err(Error::NotFound { .. }) if round == 0 => self.create_parents(path).await?,
                Err(Error::AlreadyExists { .. }) if mode.is_sequential() => {
                    // The server's counter (the parent's cversion) names a node created under
                    // that exact name; it does not move past it, so say which name is taken.
                    let taken = match self.stat(&parent).await? {
                        Some(stat) => parent.join(&registry_core::sequential_name(
                            path.name(),
                            u64::try_from(stat.cversion).unwrap_or(0),
                        ))?,
                        None => path.clone(),
                    };
                    return Err(Error::AlreadyExists { path: taken });
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::NotFound { path: parent })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path))]
    async fn get(&self, path: &NodePath) -> Result<Node> {
        if path.is_root() {
            self.shared.client()?;
            return Ok(root_node());
        }
        let (data, stat) = self
            .call("get", path, Resend::Read, |c| c.get_data(path.as_str()))
            .await?;
        Ok(watch::node_of(path.clone(), data, &stat))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path))]
    async fn exists(&self, path: &NodePath) -> Result<bool> {
        if path.is_root() {
            self.shared.client()?;
            return Ok(true);
        }
        Ok(self.stat(path).await?.is_some())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path, ?expected))]
    async fn set(&self, path: &NodePath, value: Bytes, expected: Expected) -> Result<Node> {
        check_value(path, &value)?;
        if path.is_root() {
            return Err(Error::root("write"));
        }
        let (version, wanted) = match expected {
            Expected::Any => (None, 0),
            Expected::Version(v) => match version::to_zk(v) {
                Some(sent) => (Some(sent), v),
                // Not expressible (see `version::to_zk`): never met, as the server would say.
                None => return Err(self.mismatch(path, v).await),
            },
        };
        let resend = match version {
            None => Resend::Write,
            Some(_) => Resend::Never,
        };
        let written = self
            .call("set", path, resend, |c| {
                c.set_data(path.as_str(), &value, version)
            })
            .await;
        match written {
            Ok(stat) => Ok(watch::node_of(path.clone(), value, &stat)),
            Err(Error::VersionMismatch { .. }) => Err(self.mismatch(path, wanted).await),
            Err(e) => Err(e),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path, ?expected, ?scope))]
    async fn delete(&self, path: &NodePath, expected: Expected, scope: DeleteScope) -> Result<()> {
        if path.is_root() {
            return Err(Error::root("delete"));
        }
        let (version, wanted) = match expected {
            Expected::Any => (None, 0),
            Expected::Version(v) => match version::to_zk(v) {
                Some(sent) => (Some(sent), v),
                // Not expressible (see `version::to_zk`): never met, as the server would say.
                None => return Err(self.mismatch(path, v).await),
            },
        };
        // Unconditional transactions cut off by a lost connection: one may have been
        // applied, and then the node found missing is the one it deleted.
        let mut cut_off = 0u64;
        // Descendants this client may not list, this round: taken as leaves, and named if
        // one is not.
        let mut unreadable: Vec<String> = Vec::new();
        // Bounded: each round removes what it found; only concurrent creators cause another.
        for _ in 0..16 {
            unreadable.clear();
            if scope == DeleteScope::Recursive {
                // Raw paths: another client may have created nodes deeper or with longer paths
                // than a `NodePath` allows; they are deleted all the same.
                let mut order: Vec<String> = Vec::new();
                let mut pending = vec![path.as_str().to_owned()];
                while let Some(p) = pending.pop() {
                    let listed = self
                        .call("list below", path, Resend::Read, |c| c.get_children(&p))
                        .await;
                    match listed {
                        Ok((names, _)) => {
                            for name in names {
                                let child = format!("{p}/{name}");
                                pending.push(child.clone());
                                order.push(child);
                            }
                        }
                        Err(Error::NotFound { .. }) => {}
                        // Deleting a node takes the right to delete in its parent, not to
                        // read it: one another identity keeps unreadable (its own
                        // registration, say) is taken as a leaf, and the delete decides.
                        Err(Error::PermissionDenied { .. }) if p != path.as_str() => {
                            unreadable.push(p);
                        }
                        Err(e) => return Err(e),
                    }
                }
                if let Some(v) = version {
                    match self.stat(path).await? {
                        None => return Err(Error::NotFound { path: path.clone() }),
                        Some(stat) if stat.version != v => {
                            return Err(self.mismatch(path, wanted).await)
                        }
                        Some(_) => {}
                    }
                }
                // Each operation also carries the namespace, a header and a version.
                let per_op = 20
                    + self
                        .shared
                        .options
                        .namespace
                        .as_ref()
                        .map_or(0, |n| n.as_str().len());
                let request: usize = order.iter().map(|n| n.len() + per_op).sum();
                if request < ATOMIC_DELETE_BYTES {
                    // One transaction: all or nothing, even for a call cut short (dropped,
                    // or a version that changed meanwhile).
                    match self.delete_tree_at(path, version, &order).await {
                        Ok(()) => {
                            tracing::debug!(path = %path, ?scope, "deleted");
                            return Ok(());
                        }
                        Err(Error::VersionMismatch { .. }) => {
                            return Err(self.mismatch(path, wanted).await)
                        }
                        // A node appeared or went meanwhile: list the tree again, unless the
                        // node itself is gone.
                        Err(Error::NotEmpty { .. }) if !unreadable.is_empty() => {
                            if let Some(denied) = self.hidden_subtree(path, &unreadable).await? {
                                return Err(denied);
                            }
                            continue;
                        }
                        Err(Error::NotFound { .. }) | Err(Error::NotEmpty { .. }) => {
                            if version.is_none() && self.stat(path).await?.is_none() {
                                return if cut_off > 0 {
                                    Ok(())
                                } else {
                                    Err(Error::NotFound { path: path.clone() })
                                };
                            }
                            continue;
                        }
                        Err(e) if version.is_none() && e.is_retryable() && cut_off < 3 => {
                            cut_off += 1;
                            tracing::debug!(path = %path, %e, "recursive delete cut off; again");
                            tokio::time::sleep(Duration::from_millis(50 * cut_off)).await;
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
                for victim in order.iter().rev() {
                    // Errors name the path being deleted: `victim` may not be a `NodePath`.
                    match self
                        .call("delete below", path, Resend::Removal(()), |c| {
                            c.delete(victim, None)
                        })
                        .await
                    {
                        Ok(()) | Err(Error::NotFound { .. }) | Err(Error::NotEmpty { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            let resend = match version {
                None => Resend::Removal(()),
                Some(_) => Resend::Never,
            };
            let deleted = self
                .call("delete", path, resend, |c| c.delete(path.as_str(), version))
                .await;
            match deleted {
                Ok(()) => {
                    tracing::debug!(path = %path, ?scope, "deleted");
                    return Ok(());
                }
                Err(Error::NotEmpty { .. }) if scope == DeleteScope::Recursive => {
                    if let Some(denied) = self.hidden_subtree(path, &unreadable).await? {
                        return Err(denied);
                    }
                    continue;
                }
                Err(Error::VersionMismatch { .. }) => {
                    return Err(self.mismatch(path, wanted).await)
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::unavailable(format!(
            "zookeeper delete {path}: children kept appearing"
        )))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %node.path, owner = ?node.ephemeral_owner))]
    async fn delete_owned(&self, node: &Node) -> Result<bool> {
        if node.path.is_root() {
            return Err(Error::root("delete"));
        }
        let Some(version) = self.owned_version(node).await? else {
            return Ok(false);
        };
        match self.delete(&node.path, version, DeleteScope::Node).await {
            Ok(()) => Ok(true),
            Err(Error::NotFound { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %node.path, owner = ?node.ephemeral_owner))]
    async fn set_owned(&self, node: &Node, value: Bytes) -> Result<Option<Node>> {
        check_value(&node.path, &value)?;
        if node.path.is_root() {
            return Err(Error::root("write"));
        }
        let Some(version) = self.owned_version(node).await? else {
            return Ok(None);
        };
        match self.set(&node.path, value, version).await {
            Ok(written) => Ok(Some(written)),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path))]
    async fn children(&self, path: &NodePath) -> Result<Children> {
        let (names, stat) = self.children_of(path).await?;
        let client = self.shared.client()?;
        let mut skipped = Vec::new();
        let chrooted = self.shared.options.namespace.is_some();
        let children: Vec<NodePath> = names
            .into_iter()
            .filter(|name| !servers_own(path, name, chrooted))
            .filter_map(|name| {
                let child = child_path(path, &name);
                if child.is_none() {
                    skipped.push(name);
                }
                child
            })
            .collect();
        let mut nodes = None;
        if children.len() > 1 && self.shared.multi_read.load(Ordering::Relaxed) {
            match self.read_multi(&client, &children).await {
                Err(MultiRead::Refused) => {
                    tracing::warn!(
                        "zookeeper server refused multiRead (older than 3.6): reading children one by one from now on"
                    );
                    self.shared.multi_read.store(false, Ordering::Relaxed);
                }
                Err(MultiRead::Failed(error)) => return Err(error),
                Ok(read) => nodes = Some(read),
            }
        }
        let mut nodes = match nodes {
            Some(nodes) => nodes,
            None => self.read_each_again(&children).await?,
        };
        nodes.sort_by_key(|n| n.create_order);
        // Whether each is ephemeral, asked together (the client pipelines them): a folder of
        // provider URLs too long for a NodePath may hold hundreds.
        let stats: Vec<_> = {
            use futures::StreamExt;
            futures::stream::iter(skipped.into_iter().map(|name| async move {
                let raw = if path.is_root() {
                    format!("/{name}")
                } else {
                    format!("{path}/{name}")
                };
                let stat = self
                    .call("stat unnamable child", path, Resend::Read, |c| {
                        c.check_stat(&raw)
                    })
                    .await;
                (name, stat)
            }))
            .buffer_unordered(CHILD_READS_IN_FLIGHT)
            .collect()
            .await
        };
        let mut unnamable = Vec::with_capacity(stats.len());
        for (name, stat) in stats {
            // `None`: gone since the listing, so not a child to report.
            if let Some(stat) = stat? {
                let ephemeral = watch::owner_session(stat.ephemeral_owner).is_some();
                unnamable.push(registry_core::SkippedChild { name, ephemeral });
            }
        }
        unnamable.sort();
        Ok(Children {
            nodes,
            revision: Revision(u64::try_from(stat.pzxid).unwrap_or(0)),
            skipped: unnamable,
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path, scope = ?options.scope))]
    async fn watch(&self, path: &NodePath, options: WatchOptions) -> Result<WatchStream> {
        options.after.map(Revision::check_watch_after).transpose()?;
        self.shared.client()?;
        // ZooKeeper cannot leave out writes: they are dropped here.
        Ok(options.filter(watch::open(
            self.shared.clone(),
            path.clone(),
            options.scope,
            options.after.is_some(),
        )))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path))]
    async fn register(
        &self,
        path: &NodePath,
        value: Bytes,
        options: RegisterOptions,
    ) -> Result<Registration> {
        // Input errors first, also on a closed (or closing) client.
        Registration::check_input(path, &value, &options)?;
        self.shared.client()?;
        Registration::start(Arc::new(self.clone()), path, value, options).await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn close(&self) -> Result<()> {
        // Run to its end even if this caller stops waiting: a session stopped halfway would
        // keep its client (and so its ephemeral nodes) and never read `Closed`.
        let shared = self.shared.clone();
        self.shared
            .closed
            .close(move || async move { close_session(&shared).await })
            .await
    }
}

/// `close`'s work: stops the session task, ends the session and reports `Closed`.
async fn close_session(shared: &Shared) -> Result<()> {
    registry_core::stop_session_task(&shared.shutdown, &shared.session_task).await;
    // The session closes (and ZooKeeper deletes its ephemerals) when the last clone of the
    // client is dropped; watch tasks drop theirs on shutdown. Its state says when the server
    // has confirmed it.
    let client = shared
        .client
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let options = &shared.options;
    let ended = match client {
        None => true,
        Some(client) => {
            let session = client.session().clone();
            let states = client.state_watcher();
            drop(client);
            end_session(options, session, states).await
        }
    };
    shared.tracker.transition(SessionState::Closed, None);
    if !ended {
        tracing::warn!("zookeeper session end not confirmed; its ephemerals go when it expires");
        return Err(Error::unavailable(format!(
            "zookeeper close: the server did not confirm the session's end within {:?}; \
             its ephemeral nodes go when the session expires",
            options.request_timeout
        )));
    }
    tracing::info!("zookeeper session closed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves ZooKeeper's connect handshake only: the first connection gets session 0x1234
    /// (and an answer to the client's first ping) and is closed once `expire` fires; every
    /// later one is told the session expired (session id 0).
    async fn expiring_server(
        listener: tokio::net::TcpListener,
        expire: tokio::sync::oneshot::Receiver<()>,
    ) {
        let mut expire = Some(expire);
        for attempt in 0u32.. {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let mut len = [0; 4];
            if socket.read_exact(&mut len).await.is_err() {
                continue;
            }
            let mut request = vec![0; u32::from_be_bytes(len) as usize];
            if socket.read_exact(&mut request).await.is_err() {
                continue;
            }
            let session: i64 = if attempt == 0 { 0x1234 } else { 0 };
            let mut body = Vec::new();
            body.extend_from_slice(&0i32.to_be_bytes()); // protocol version
            body.extend_from_slice(&4000i32.to_be_bytes()); // session timeout, ms
            body.extend_from_slice(&session.to_be_bytes());
            body.extend_from_slice(&16i32.to_be_bytes());
            body.extend_from_slice(&[7; 16]); // password
            body.push(0); // not read-only
            let mut frame = (body.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(&body);
            let _ = socket.write_all(&frame).await;
            if let Some(expire) = expire.take() {
                // The client pings once connected and waits for the answer: reply header
                // with the ping's xid (-2), zxid 0, no error.
                let mut ping = [0; 12];
                if socket.read_exact(&mut ping).await.is_ok() {
                    let mut pong = 16u32.to_be_bytes().to_vec();
                    pong.extend_from_slice(&(-2i32).to_be_bytes());
                    pong.extend_from_slice(&[0; 12]);
                    let _ = socket.write_all(&pong).await;
                }
                let _ = expire.await;
            }
            // Closing the connection makes the client reconnect and hear "expired".
        }
    }

    /// A client whose session ended before the session task made its state watcher: the
    /// watcher starts with that state marked as seen, and the task must still report `Lost`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_ended_before_the_task_watches_it_is_reported_lost() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (expire, expire_rx) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(expiring_server(listener, expire_rx));
        let options = ZkOptions::new([addr.clone()])
            .with_session_ttl(Duration::from_secs(4))
            .with_connect_timeout(Duration::from_secs(1));
        let client = connector(&options).connect(&addr).await.unwrap();
        let _ = expire.send(());
        let ended = tokio::time::timeout(
            Duration::from_secs(10),
            terminal_state(&mut client.state_watcher()),
        )
        .await
        .unwrap();
        assert_eq!(ended, zk::SessionState::Expired);

        let (shared, shutdown_rx) = Shared::new(&client, options);
        let mut events = shared.tracker.subscribe();
        let task = tokio::spawn(run_session(Arc::downgrade(&shared), client, shutdown_rx));
        let lost = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(status) = events.next().await {
                if status.state == SessionState::Lost {
                    return;
                }
            }
        })
        .await;
        shared.shutdown.send_replace(true);
        task.await.unwrap();
        server.abort();
        assert!(lost.is_ok(), "the ended session was never reported lost");
    }
}
