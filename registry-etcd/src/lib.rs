//! The etcd backend of the [`Registry`] contract.
//!
//! - A node's key is its path under an optional namespace, so `etcdctl get --prefix
//!   /soa/runtime/services` shows the tree; values are the raw bytes. Keys written by other
//!   tools are first-class; parents that have no key of their own behave as empty persistent
//!   nodes (`version` 0, `create_order` 0), except that `set` on one fails with `NotFound`
//!   (create it first) and watches report only nodes that have keys.
//! - `version` is etcd's version - 1; `create_order` is `create_revision`.
//! - A session is a block of leases (TTL from the options, at least 2 s) kept alive every
//!   TTL/3 on its own thread; ephemeral nodes are keys under them, at most
//!   [`keys_per_lease`](EtcdOptions::keys_per_lease) per lease, and every lease of a block
//!   maps to the session ID ([`session_of_lease`]). Losing any lease loses the session: the
//!   rest are revoked, a new block is granted, reported as `Lost` then `Reestablished`, and
//!   registrations come back through [`registry_core::Registration`].
//! - Creates are Txns comparing `create_revision == 0`. A non-sequential create is first
//!   tried as one Txn that also compares the parent's key as existing and lease-less (see
//!   `persistent_parents`), so nothing is read first. Otherwise missing parents are created
//!   first, one Txn each (so each gets its own, earlier revision), and the node's Txn
//!   compares every ancestor's `create_revision` with what was read, which also rejects a
//!   parent that became ephemeral. Sequential names come from a per-parent counter key
//!   updated in the same Txn as the create: under contention, every creator that lost the
//!   race retries (one more round trip each), so N concurrent creators under one parent cost
//!   O(N²) Txns in the worst case and O(N) when spread over time.
//! - Deletes are one Txn comparing the key's existence, the expected version and (for a
//!   single node) that nothing lives below; its else branch reads what names the error.
//!   Only an implicit parent (no key of its own) is read first.
//! - Watches: see [`watch`].
//! - Every request and stream requires a leader: a member cut off from its cluster refuses
//!   them ("no leader") and ends the streams it holds, so watches and keep-alives move to a
//!   member that hears its leader instead of going silent. A refused request did not happen
//!   and is tried again within its deadline.
//! - With credentials, a login token etcd refuses (expired or forgotten by a restart) is
//!   renewed and the refused request retried; see [`EtcdOptions::credentials`].
#![warn(missing_docs)]

mod batch;
mod error;
mod hub;
mod keys;
mod members;
pub mod options;
mod session;
pub mod watch;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, GetResponse, KvClient, PutOptions, Txn,
    TxnOp, TxnOpResponse, TxnResponse,
};
use futures::stream::BoxStream;
use registry_core::{
    check_value, Capabilities, Children, CloseGate, CreateMode, DeleteScope, Error, Expected, Node,
    NodePath, RegisterOptions, Registration, RegistrationWatches, Registry, Result, Revision,
    SessionId, SessionState, SessionStatus, WatchOptions, WatchStream,
};
use tokio::sync::watch as channel;

pub use options::{EtcdOptions, EtcdTls};
pub use session::{revoke_session, session_of_lease};

use error::{map, BACKEND};
use keys::{implicit, Keys};
use session::Session;

/// HTTP/2 ping interval: etcd's default minimum; a dead connection is noticed within this
/// plus the request timeout, while the lease keep-alive notices a lost lease sooner.
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(5);

/// Bound on optimistic-concurrency retries of one create or delete.
const MAX_CREATE_ROUNDS: usize = 256;

/// Compares, and ops per branch, one Txn may hold (etcd's default `--max-txn-ops`).
pub(crate) const MAX_TXN_OPS: usize = 128;

/// Largest response the client decodes: etcd sends up to `math.MaxInt32` bytes. tonic's
/// default of 4 MiB failed `children` and watch reads of a few large values for good.
pub(crate) const MAX_RESPONSE_BYTES: usize = i32::MAX as usize;

/// What the registry's handles, its session task and its watch tasks share.
pub(crate) struct Shared {
    pub(crate) client: Client,
    /// The client's KV service alone: cheaper to clone per request than the whole client.
    kv: KvClient,
    pub(crate) keys: Keys,
    pub(crate) options: EtcdOptions,
    pub(crate) session: Arc<Session>,
    pub(crate) shutdown: channel::Sender<bool>,
    /// Ephemeral creates, coalesced into shared Txns (see `batch`).
    creates: batch::Queue,
    closed: CloseGate,
    session_task: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    /// The watch stream all watches share, started with the first watch.
    watch_hub: Mutex<Option<hub::Handle>>,
    /// One children watch per parent for all registrations under it.
    registration_watches: RegistrationWatches,
    /// Takes silent members out of the rotation (with several endpoints).
    members: Option<Arc<members::MemberHealth>>,
}

impl Shared {
    /// The client's watch hub, started on first use (and again if its task has ended, e.g.
    /// with the runtime that ran it). It holds a client handle, not `Shared`: no cycle.
    pub(crate) fn watch_hub(&self) -> hub::Handle {
        let mut hub = self.watch_hub.lock().unwrap_or_else(|p| p.into_inner());
        match &*hub {
            Some(handle) if !handle.is_closed() => handle.clone(),
            _ => {
                let handle = hub::Handle::start(
                    self.client
                        .watch_client()
                        .max_decoding_message_size(MAX_RESPONSE_BYTES),
                    self.options
                        .credentials
                        .is_some()
                        .then(|| self.client.clone()),
                    self.options.request_timeout,
                    self.shutdown.subscribe(),
                );
                *hub = Some(handle.clone());
                handle
            }
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.is_closed() {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    /// Runs one KV request with the request deadline. `send` builds and sends it anew for
    /// each attempt (a sent request is consumed). One that could not even be sent (the
    /// connection to the chosen member failed) is tried again, since it cannot have happened;
    /// the balanced channel then picks another member. One a member refused for having no
    /// leader (cut off, or an election under way) cannot have happened either: it is tried
    /// again until the deadline, as etcd itself would wait for a leader without
    /// require-leader.
    pub(crate) async fn request<T, F, Fut>(
        &self,
        operation: &str,
        path: &NodePath,
        mut send: F,
    ) -> Result<T>
    where
        F: FnMut(KvClient) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        self.check_open()?;
        let timeout = self.options.request_timeout;
        // None: a timeout too large for an Instant, which means no deadline.
        let deadline = hub::deadline_after(tokio::time::Instant::now(), timeout);
        let mut attempt = 0u32;
        let mut refused = 0u32;
        loop {
            // Refusals are retried until the deadline, which may be none: close ends them.
            self.check_open()?;
            let sent = send(self.kv.clone());
            let outcome = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, sent).await,
                None => Ok(sent.await),
            };
            match outcome {
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(e)) if attempt < 5 && error::not_sent(&e) => {
                    attempt += 1;
                    tracing::debug!(%e, attempt, "etcd request not sent; trying another member");
                    tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
                }
                Ok(Err(e)) if error::no_leader(&e) => {
                    refused = refused.saturating_add(1);
                    // That member may stay cut off: the next requests avoid it.
                    if let Some(members) = &self.members {
                        members.suspect();
                    }
                    tracing::debug!(%e, refused, "etcd member has no leader; trying again");
                    let pause = Duration::from_millis(20 * u64::from(refused.min(10)));
                    let too_late = deadline.is_some_and(|deadline| {
                        deadline.saturating_duration_since(tokio::time::Instant::now()) <= pause
                    });
                    if too_late {
                        return Err(map(e, operation, Some(path)));
                    }
                    tokio::time::sleep(pause).await;
                }
                Ok(Err(e)) => return Err(map(e, operation, Some(path))),
                Err(_) => {
                    // Perhaps a member that stopped answering: the next ones avoid it.
                    if let Some(members) = &self.members {
                        members.suspect();
                    }
                    return Err(Error::Timeout {
                        operation: format!("etcd {operation} {path}"),
                        after: timeout,
                    });
                }
            }
        }
    }

    /// Runs a Txn through [`request`](Shared::request).
    pub(crate) async fn txn(
        &self,
        txn: Txn,
        operation: &str,
        path: &NodePath,
    ) -> Result<TxnResponse> {
        self.request(operation, path, |mut kv| {
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
    }

    /// The lease to put a new ephemeral key under, in flight until the guard is dropped (see
    /// [`session::InFlight`]). While the session is not live: `Unavailable` if it is only
    /// suspended (it may well still be alive), `SessionExpired` once it is lost (until the
    /// next one is up).
    pub(crate) async fn lease_for(&self) -> Result<(i64, session::InFlight<'_>)> {
        match self.session.tracker.status().state {
            state if state.is_live() => {}
            SessionState::Suspended => {
                return Err(Error::unavailable(
                    "etcd session suspended (no keep-alive answer); its leases may still be alive",
                ))
            }
            _ => return Err(Error::SessionExpired),
        }
        let ttl = self.options.effective_session_ttl();
        Ok(self
            .session
            .lease_for(&self.client, ttl, self.options.request_timeout)
            .await)
    }

    /// A write under `lease` failed with `error`: if the lease is gone, says so at once.
    pub(crate) fn lease_failed(&self, error: &Error, lease: i64) {
        if lease != 0 && matches!(error, Error::SessionExpired) {
            self.session.report_lease_gone(lease);
        }
    }

    /// A read-only Txn, retried on a retryable failure (another member may answer).
    async fn read(&self, ops: Vec<TxnOp>, operation: &str, path: &NodePath) -> Result<TxnResponse> {
        self.retried_read(operation, path, |mut kv| {
            let txn = Txn::new().and_then(ops.clone());
            async move { kv.txn(txn).await }
        })
        .await
    }

    /// One range read, retried like [`read`](Shared::read). Cheaper than a Txn for etcd and
    /// for us (a Txn's responses are copied out of it), so common reads try it first.
    async fn range(
        &self,
        key: String,
        options: Option<GetOptions>,
        operation: &str,
        path: &NodePath,
    ) -> Result<GetResponse> {
        self.retried_read(operation, path, |mut kv| {
            let (key, options) = (key.clone(), options.clone());
            async move { kv.get(key, options).await }
        })
        .await
    }

    /// A read through [`request`](Shared::request), tried again on a retryable failure.
    async fn retried_read<T, F, Fut>(
        &self,
        operation: &str,
        path: &NodePath,
        mut send: F,
    ) -> Result<T>
    where
        F: FnMut(KvClient) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let mut last = None;
        for attempt in 0..3u32 {
            match self.request(operation, path, &mut send).await {
                Ok(r) => return Ok(r),
                Err(e) if e.is_retryable() => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt + 1))).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::unavailable("etcd read failed")))
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

/// A client of etcd implementing [`Registry`]. Cheap to clone (a handle); the session ends
/// when [`close`](Registry::close) is called (or, without it, the leases expire after the TTL
/// once every handle, registration and stream is gone).
#[derive(Clone)]
pub struct EtcdRegistry {
    shared: Arc<Shared>,
}

fn gets(response: &TxnResponse) -> Vec<etcd_client::GetResponse> {
    response
        .op_responses()
        .into_iter()
        .filter_map(|op| match op {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        })
        .collect()
}

fn revision_of(response: &TxnResponse) -> i64 {
    response.header().map_or(0, |h| h.revision())
}

/// The etcd version (which counts from 1) of a key whose node has `version`; `None` beyond
/// etcd's `i64` range, where no key can have it, so the expectation is never met.
fn etcd_version(version: u64) -> Option<i64> {
    i64::try_from(version).ok().and_then(|v| v.checked_add(1))
}

/// `after` as etcd's `i64`, within [`Revision::MAX_WATCH_AFTER`] (the watch starts at
/// `after + 1`); the contract's typed error otherwise.
fn watch_after(after: Revision) -> Result<i64> {
    let after = after.check_watch_after()?;
    // Within i64 by the check.
    Ok(i64::try_from(after.0).unwrap_or(i64::MAX - 1))
}

/// The session TTL in whole seconds as etcd's lease grant takes it (`i64`).
fn lease_ttl_secs(ttl: Duration) -> Result<i64> {
    i64::try_from(ttl.as_secs())
        .ok()
        .filter(|secs| *secs <= MAX_LEASE_TTL_SECS)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "etcd session TTL {ttl:?} is out of etcd's range (at most {MAX_LEASE_TTL_SECS} s)"
            ))
        })
}

/// The longest lease etcd grants (`MaxLeaseTTL` in its lease package); a longer one is refused
/// by the server, after a round trip.
const MAX_LEASE_TTL_SECS: i64 = 9_000_000_000;

/// The exclusive lease bounds `(above, below)` for leases in `first..=last`: etcd compares
/// only with `>` and `<`, and a bound that would overflow `i64` is not needed (`None`).
/// The compares that hold while `key` exists and belongs to `owner` (`None`: a persistent
/// node, under no lease).
fn owner_compares(key: &str, owner: Option<SessionId>) -> Vec<Compare> {
    let (first, last) = session::leases_of(owner.unwrap_or(SessionId(0)));
    // The owner is caller data (any i64): bounds that would overflow are left out.
    let (above, below) = lease_bounds(first, last);
    let mut compares: Vec<Compare> = above
        .map(|a| Compare::lease(key, CompareOp::Greater, a))
        .into_iter()
        .chain(below.map(|b| Compare::lease(key, CompareOp::Less, b)))
        .collect();
    // A key under one of the owner's leases exists: the lease compares say it all (each
    // compare costs the server a range read). A missing key compares as lease 0, which no
    // session's lease is, so lease 0 needs the key's existence compared too.
    if first <= 0 {
        compares.push(Compare::version(key, CompareOp::Greater, 0));
    }
    compares
}

/// The node a put with `prev_kv` wrote: etcd bumped the version, kept create revision and
/// lease.
fn written(
    path: &NodePath,
    value: Bytes,
    prev: Option<etcd_client::KeyValue>,
    revision: i64,
) -> Result<Node> {
    let prev = prev.ok_or_else(|| Error::Backend {
        backend: BACKEND,
        message: format!("set {path}: etcd returned no previous key-value"),
        source: None,
    })?;
    Ok(keys::node_from(
        path.clone(),
        value,
        prev.version().saturating_add(1),
        prev.create_revision(),
        revision,
        prev.lease(),
    ))
}

fn lease_bounds(first: i64, last: i64) -> (Option<i64>, Option<i64>) {
    (first.checked_sub(1), last.checked_add(1))
}

impl EtcdRegistry {
    /// Connects to etcd and opens a session (grants its first lease). Fails with
    /// [`Error::Unavailable`] if no endpoint answers within the connect timeout. The client
    /// lives on the runtime this runs on (see [`Registry`]).
    pub async fn connect(options: EtcdOptions) -> Result<EtcdRegistry> {
        if options.endpoints.is_empty() {
            return Err(Error::InvalidArgument("etcd: no endpoint given".into()));
        }
        let mut options = options;
        // Files read and endpoints checked before any I/O to a server.
        let tls = options.tls.as_ref().map(tls_options).transpose()?;
        let tls_on = tls.is_some();
        options.endpoints = endpoints_for(&options.endpoints, tls.is_some())?;
        let ttl = options.effective_session_ttl();
        // The session casts this TTL to i64 for every lease grant: checked once, here.
        lease_ttl_secs(ttl)?;
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            // etcd refuses pings more often than its --grpc-keepalive-min-time (5 s default).
            .with_keep_alive(HTTP2_PING_INTERVAL, options.request_timeout)
            .with_keep_alive_while_idle(true)
            // A member cut off from its cluster still answers, from a store that no longer
            // changes: with this, it refuses requests and new streams ("no leader") and ends
            // open ones after a few election timeouts, so watches, keep-alives and requests
            // move to a member that hears its leader.
            .with_require_leader(true);
        if let Some((user, password)) = &options.credentials {
            // etcd's login token expires when unused for --auth-token-ttl (simple tokens,
            // 300 s by default) and is forgotten when etcd restarts: a request refused for its
            // token logs in again and is retried once, by every client built from these options
            // (the session keeper's and the member probes' too).
            connect = connect
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = tls {
            connect = connect.with_tls(tls);
        }
        // Saturating: Duration's `+` panics on overflow, and huge timeouts are allowed.
        let deadline = options
            .connect_timeout
            .saturating_add(options.request_timeout);
        let client = match tokio::time::timeout(
            deadline,
            Client::connect(options.endpoints.clone(), Some(connect.clone())),
        )
        .await
        {
            Ok(result) => result.map_err(|e| tls_hint(map(e, "connect", None), tls_on))?,
            Err(_) => {
                return Err(Error::Timeout {
                    operation: format!("etcd connect to {:?}", options.endpoints),
                    after: deadline,
                })
            }
        };
        let mut granting = client.clone();
        let lease = match tokio::time::timeout(
            options.request_timeout,
            session::grant_session(&mut granting, ttl),
        )
        .await
        {
            // The channel connects lazily: this grant is the first contact with a member, so
            // one that reached none is a failure to connect.
            Ok(result) => result.map_err(|e| {
                let operation = if error::not_sent(&e) {
                    format!("connect to {}", options.endpoints.join(", "))
                } else {
                    "lease grant".to_owned()
                };
                tls_hint(map(e, &operation, None), tls_on)
            })?,
            Err(_) => {
                return Err(Error::Timeout {
                    operation: format!(
                        "etcd connect to {} (no answer to the first lease grant)",
                        options.endpoints.join(", ")
                    ),
                    after: options.request_timeout,
                })
            }
        };
        let session = Arc::new(Session::new(lease, options.keys_per_lease));
        session
            .tracker
            .transition(SessionState::Connected, Some(SessionId(lease)));
        let (shutdown, shutdown_rx) = channel::channel(false);
        let span = tracing::info_span!("etcd_session", endpoints = ?options.endpoints);
        let connect_options = connect.clone();
        let task = session::spawn_keeper(
            options.endpoints.clone(),
            connect,
            session.clone(),
            ttl,
            session::Timeouts {
                connect: options.connect_timeout,
                request: options.request_timeout,
            },
            shutdown_rx,
            span,
        )
        .map_err(|e| Error::unavailable(format!("cannot start the etcd keep-alive thread: {e}")))?;
        tracing::info!(lease, "etcd session opened");
        let members = members::spawn(
            client.clone(),
            &options.endpoints,
            connect_options,
            options.request_timeout,
            shutdown.subscribe(),
        );
        let (creates, queued) = batch::queue();
        let shared = Arc::new(Shared {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            client,
            keys: Keys::new(options.namespace.as_ref()),
            options,
            session,
            shutdown,
            creates,
            closed: CloseGate::new(),
            session_task: Mutex::new(Some(task)),
            watch_hub: Mutex::new(None),
            registration_watches: RegistrationWatches::new(),
            members,
        });
        batch::spawn(Arc::downgrade(&shared), queued, shared.shutdown.subscribe());
        Ok(EtcdRegistry { shared })
    }

    /// The underlying etcd-client (for operations the contract does not cover).
    pub fn client(&self) -> Client {
        self.shared.client.clone()
    }

    /// The etcd version to compare `path`'s key with for an `expected` node version. One no
    /// key can have (see [`etcd_version`]) is never met: the error is what a failed compare
    /// reports, a mismatch with the node there or `NotFound`, as on every backend.
    async fn etcd_expected(&self, path: &NodePath, expected: u64) -> Result<i64> {
        if let Some(version) = etcd_version(expected) {
            return Ok(version);
        }
        Err(match self.read_node(path).await? {
            (Some(node), _) => Error::VersionMismatch {
                path: path.clone(),
                expected,
                actual: node.version,
            },
            (None, _) => Error::NotFound { path: path.clone() },
        })
    }

    /// Reads a node: its key, or an implicit node if only keys below it exist.
    async fn read_node(&self, path: &NodePath) -> Result<(Option<Node>, i64)> {
        if path.is_root() {
            return Ok((Some(implicit(NodePath::root())), 0));
        }
        let keys = &self.shared.keys;
        // Most reads find the node itself: one range. Otherwise one Txn tells an implicit
        // node (keys below it) from a missing one at a single revision.
        let own = self
            .shared
            .range(keys.node(path), None, "get", path)
            .await?;
        if let Some(node) = own.kvs().first().and_then(|kv| keys.node_of(kv)) {
            return Ok((Some(node), own.header().map_or(0, |h| h.revision())));
        }
        let response = self
            .shared
            .read(
                vec![
                    TxnOp::get(keys.node(path), None),
                    TxnOp::get(keys.below(path), Some(below_one())),
                ],
                "get",
                path,
            )
            .await?;
        let revision = revision_of(&response);
        let gets = gets(&response);
        let own = gets
            .first()
            .and_then(|g| g.kvs().first())
            .and_then(|kv| keys.node_of(kv));
        let below = gets.get(1).is_some_and(|g| !g.kvs().is_empty());
        Ok((
            own.or_else(|| below.then(|| implicit(path.clone()))),
            revision,
        ))
    }

    async fn create_once(
        &self,
        path: &NodePath,
        value: &Bytes,
        mode: CreateMode,
    ) -> Result<Option<Node>> {
        let keys = &self.shared.keys;
        let parent = path.parent().ok_or_else(|| Error::root("create"))?;
        let ancestors: Vec<NodePath> = path
            .ancestors()
            .into_iter()
            .filter(|a| !a.is_root())
            .collect();
        let mut ops: Vec<TxnOp> = ancestors
            .iter()
            .map(|a| TxnOp::get(keys.node(a), None))
            .collect();
        if mode.is_sequential() {
            ops.push(TxnOp::get(keys.sequence(&parent), None));
        }
        let response = self.shared.read(ops, "create", path).await?;
        let gets = gets(&response);
        let mut compares = Vec::new();
        for (ancestor, get) in ancestors.iter().zip(&gets) {
            match get.kvs().first() {
                Some(kv) if kv.lease() != 0 => {
                    return Err(Error::EphemeralParent {
                        path: path.clone(),
                        parent: ancestor.clone(),
                    })
                }
                Some(kv) => compares.push(Compare::create_revision(
                    keys.node(ancestor),
                    CompareOp::Equal,
                    kv.create_revision(),
                )),
                None => {
                    // Each missing parent gets its own Txn, so it is older than its child. It
                    // holds only while the ancestors read above are still the persistent keys
                    // they were: a node is never put under a deleted or ephemeral ancestor,
                    // which is what lets a create compare its parent alone.
                    let key = keys.node(ancestor);
                    let mut checks = compares.clone();
                    checks.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
                    let made = self
                        .shared
                        .txn(
                            Txn::new()
                                .when(checks)
                                .and_then([TxnOp::put(key, Vec::new(), None)]),
                            "create parent",
                            ancestor,
                        )
                        .await?;
                    let _ = made.succeeded();
                    return Ok(None);
                }
            }
        }
        // For a sequential create: the counter's key, its version as read, and its increment.
        let mut sequence = None;
        let (target, mut puts) = if mode.is_sequential() {
            let counter_get = gets.get(ancestors.len());
            let counter_kv = counter_get.and_then(|g| g.kvs().first());
            let counter: u64 = counter_kv
                .and_then(|kv| std::str::from_utf8(kv.value()).ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let seq_key = keys.sequence(&parent);
            let seq_version = counter_kv.map_or(0, |kv| kv.version());
            compares.push(Compare::version(
                seq_key.clone(),
                CompareOp::Equal,
                seq_version,
            ));
            let target = parent.join(&registry_core::sequential_name(path.name(), counter))?;
            // The counter key is server data (other tools may write it): no overflow.
            let next = counter.checked_add(1).ok_or_else(|| Error::Backend {
                backend: BACKEND,
                message: format!("sequence counter of {parent} is at its maximum ({counter})"),
                source: None,
            })?;
            let bump = TxnOp::put(seq_key.clone(), next.to_string(), None);
            sequence = Some((seq_key, seq_version, bump.clone()));
            (target, vec![bump])
        } else {
            (path.clone(), Vec::new())
        };
        let key = keys.node(&target);
        compares.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
        let (lease, _in_flight) = self.lease_for(mode).await?;
        puts.push(TxnOp::put(key.clone(), value.to_vec(), put_options(lease)));
        let response = self
            .shared
            .txn(
                Txn::new()
                    .when(compares)
                    .and_then(puts)
                    .or_else([TxnOp::get(key, Some(GetOptions::new().with_keys_only()))]),
                "create",
                &target,
            )
            .await
            .inspect_err(|e| self.shared.lease_failed(e, lease))?;
        if response.succeeded() {
            return Ok(Some(created(target, value, &response, lease)));
        }
        let exists = gets_of_else(&response);
        match sequence {
            None if exists => return Err(Error::AlreadyExists { path: target }),
            // The generated name is taken (a node created under it by name): move the counter
            // past it, unless another creator already did, so the next round tries the next.
            Some((seq_key, seq_version, bump)) if exists => {
                self.shared
                    .txn(
                        Txn::new()
                            .when([Compare::version(seq_key, CompareOp::Equal, seq_version)])
                            .and_then([bump]),
                        "create",
                        &target,
                    )
                    .await?;
            }
            _ => {}
        }
        Ok(None)
    }
}

/// The client TLS settings of `tls`: the CA to verify the server with and, for mutual TLS,
/// the client identity. Unreadable or empty files are an input error.
fn tls_options(tls: &EtcdTls) -> Result<etcd_client::TlsOptions> {
    let read = |path: &std::path::Path, what: &str| {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::InvalidArgument(format!("etcd TLS {what} {}: {e}", path.display()))
        })?;
        if !bytes.windows(10).any(|w| w == b"-----BEGIN") {
            return Err(Error::InvalidArgument(format!(
                "etcd TLS {what} {}: not a PEM file",
                path.display()
            )));
        }
        Ok(bytes)
    };
    let mut options = etcd_client::TlsOptions::new().ca_certificate(
        etcd_client::Certificate::from_pem(read(&tls.ca_cert, "CA certificate")?),
    );
    if let Some((cert, key)) = &tls.client_identity {
        options = options.identity(etcd_client::Identity::from_pem(
            read(cert, "client certificate")?,
            read(key, "client key")?,
        ));
    }
    Ok(options)
}

/// A connection failure over TLS says so: the usual causes are the CA, or a client
/// certificate the server requires and did not get.
fn tls_hint(error: Error, tls: bool) -> Error {
    match error {
        Error::Unavailable { message, source } if tls => Error::Unavailable {
            message: format!(
                "{message} (over TLS: check the CA certificate, and the client certificate if the server requires one)"
            ),
            source,
        },
        other => other,
    }
}

/// Endpoints with the scheme TLS (or its absence) needs: `https://` with TLS, `http://`
/// without; a scheme that contradicts the settings is refused rather than silently changed.
fn endpoints_for(endpoints: &[String], tls: bool) -> Result<Vec<String>> {
    endpoints
        .iter()
        .map(|e| match (e.split_once("://"), tls) {
            (None, true) => Ok(format!("https://{e}")),
            (None, false) => Ok(e.clone()),
            (Some(("https", _)), true) | (Some(("http", _)), false) => Ok(e.clone()),
            (Some(("http", _)), true) => Err(Error::InvalidArgument(format!(
                "etcd endpoint {e} is plaintext http but TLS is configured"
            ))),
            (Some(("https", _)), false) => Err(Error::InvalidArgument(format!(
                "etcd endpoint {e} is https but no TLS settings (CA certificate) were given"
            ))),
            (Some((scheme, _)), _) => Err(Error::InvalidArgument(format!(
                "etcd endpoint {e}: unknown scheme {scheme:?}"
            ))),
        })
        .collect()
}

impl EtcdRegistry {
    /// One create on its own: ancestors read, then a Txn; retried while it loses races.
    pub(crate) async fn create_unbatched(
        &self,
        path: &NodePath,
        value: &Bytes,
        mode: CreateMode,
    ) -> Result<Node> {
        if !mode.is_sequential() {
            if let Some(node) = self.create_checked(path, value, mode).await? {
                tracing::debug!(path = %node.path, ?mode, "created");
                return Ok(node);
            }
        }
        for _ in 0..MAX_CREATE_ROUNDS {
            if let Some(node) = self.create_once(path, value, mode).await? {
                tracing::debug!(path = %node.path, ?mode, "created");
                return Ok(node);
            }
        }
        Err(Error::unavailable(format!(
            "etcd create {path}: too much contention, gave up after {MAX_CREATE_ROUNDS} rounds"
        )))
    }
}

impl EtcdRegistry {
    /// The lease an ephemeral create puts its key under (0 for a persistent one), in flight
    /// while the guard lives.
    async fn lease_for(&self, mode: CreateMode) -> Result<(i64, Option<session::InFlight<'_>>)> {
        if !mode.is_ephemeral() {
            return Ok((0, None));
        }
        let (lease, in_flight) = self.shared.lease_for().await?;
        Ok((lease, Some(in_flight)))
    }

    /// A non-sequential create in one Txn, when the parent already has a key: it compares
    /// that the parent exists and is persistent (see [`persistent_parents`]), and that the
    /// node does not exist, so nothing needs reading first. `None` if the parent is missing
    /// (the caller creates the missing ancestors and retries the long way).
    async fn create_checked(
        &self,
        path: &NodePath,
        value: &Bytes,
        mode: CreateMode,
    ) -> Result<Option<Node>> {
        let keys = &self.shared.keys;
        let parents: Vec<String> = path
            .parent()
            .filter(|p| !p.is_root())
            .map(|p| keys.node(&p))
            .into_iter()
            .collect();
        let key = keys.node(path);
        let (lease, _in_flight) = self.lease_for(mode).await?;
        let response = self
            .shared
            .request("create", path, |mut kv| {
                let mut compares = persistent_parents(&parents);
                compares.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
                let mut gets: Vec<TxnOp> = parents
                    .iter()
                    .map(|a| TxnOp::get(a.clone(), Some(GetOptions::new().with_keys_only())))
                    .collect();
                gets.push(TxnOp::get(
                    key.clone(),
                    Some(GetOptions::new().with_keys_only()),
                ));
                let txn = Txn::new()
                    .when(compares)
                    .and_then([TxnOp::put(key.clone(), value.to_vec(), put_options(lease))])
                    .or_else(gets);
                async move { kv.txn(txn).await }
            })
            .await
            .inspect_err(|e| self.shared.lease_failed(e, lease))?;
        if response.succeeded() {
            return Ok(Some(created(path.clone(), value, &response, lease)));
        }
        // The failure branch read the parent and the node at the revision the compares
        // failed at; decide as the long way would from that state.
        let gets = gets(&response);
        for (parent, get) in path.parent().filter(|p| !p.is_root()).iter().zip(&gets) {
            match get.kvs().first() {
                None => return Ok(None),
                Some(kv) if kv.lease() != 0 => {
                    return Err(Error::EphemeralParent {
                        path: path.clone(),
                        parent: parent.clone(),
                    })
                }
                Some(_) => {}
            }
        }
        if gets.get(parents.len()).is_some_and(|g| !g.kvs().is_empty()) {
            return Err(Error::AlreadyExists { path: path.clone() });
        }
        Ok(None)
    }
}

impl EtcdRegistry {
    /// A delete of a node with a key of its own in one Txn: it compares the key's existence,
    /// the expected `version` (etcd's) and, for [`DeleteScope::Node`], that nothing lives
    /// below, so nothing is read first. On a failed compare the else branch reads the key and
    /// what is below at that same revision, which names the error. `false` if the node has no
    /// key but keys below it (an implicit node), or the reads name no failed compare: the
    /// caller takes the long way.
    async fn delete_at_once(
        &self,
        path: &NodePath,
        expected: Expected,
        version: Option<i64>,
        scope: DeleteScope,
    ) -> Result<bool> {
        let keys = &self.shared.keys;
        let (key, below) = (keys.node(path), keys.below(path));
        let mut compares = vec![Compare::version(key.clone(), CompareOp::Greater, 0)];
        compares.extend(version.map(|v| Compare::version(key.clone(), CompareOp::Equal, v)));
        let mut ops = vec![TxnOp::delete(key.clone(), None)];
        match scope {
            DeleteScope::Recursive => ops.push(TxnOp::delete(
                below.clone(),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )),
            // Over an empty range etcd compares against a zero key, so this holds exactly
            // when nothing lives below the node.
            DeleteScope::Node => compares
                .push(Compare::create_revision(below.clone(), CompareOp::Equal, 0).with_prefix()),
        }
        let reads = [
            TxnOp::get(key, Some(GetOptions::new().with_keys_only())),
            TxnOp::get(below, Some(below_one())),
        ];
        let txn = Txn::new().when(compares).and_then(ops).or_else(reads);
        let response = self.shared.txn(txn, "delete", path).await?;
        if response.succeeded() {
            return Ok(true);
        }
        let gets = gets(&response);
        let own = gets.first().and_then(|g| g.kvs().first());
        let anything_below = gets.get(1).is_some_and(|g| !g.kvs().is_empty());
        match own {
            None if anything_below => Ok(false),
            None => Err(Error::NotFound { path: path.clone() }),
            Some(kv) => match expected {
                Expected::Version(v) if version != Some(kv.version()) => {
                    Err(Error::VersionMismatch {
                        path: path.clone(),
                        expected: v,
                        actual: keys::version_of(kv.version()),
                    })
                }
                _ if scope == DeleteScope::Node && anything_below => {
                    Err(Error::NotEmpty { path: path.clone() })
                }
                // Every compare held at the revision read (a short response): look again.
                _ => Ok(false),
            },
        }
    }
}

/// Options reading whether anything lives below a node: one key, without its value.
fn below_one() -> GetOptions {
    GetOptions::new()
        .with_prefix()
        .with_keys_only()
        .with_limit(1)
}

/// Compares that hold while each of `parents` (keys) exists and is persistent.
///
/// A create compares its parent only, not every ancestor: for keys this layer writes, every
/// node's ancestors stay in place (a key, a missing ancestor's included, is put only while
/// the ancestors above it are the persistent keys read, a single-node delete needs nothing
/// below, a recursive one takes the subtree with it), so an existing persistent parent has
/// existing persistent ancestors. Keys written by other tools carry no such promise. Each
/// compare costs the server a range read; on a 4-level path the parent alone measured ~25 us
/// faster per create.
pub(crate) fn persistent_parents(parents: &[String]) -> Vec<Compare> {
    parents
        .iter()
        .flat_map(|a| {
            [
                Compare::create_revision(a.clone(), CompareOp::Greater, 0),
                Compare::lease(a.clone(), CompareOp::Equal, 0),
            ]
        })
        .collect()
}

/// How a created key is put: under `lease` if it is not 0.
pub(crate) fn put_options(lease: i64) -> Option<PutOptions> {
    (lease != 0).then(|| PutOptions::new().with_lease(lease))
}

/// The node a successful create Txn wrote at `path`.
pub(crate) fn created(path: NodePath, value: &Bytes, response: &TxnResponse, lease: i64) -> Node {
    let revision = revision_of(response);
    keys::node_from(path, value.clone(), 1, revision, revision, lease)
}

fn gets_of_else(response: &TxnResponse) -> bool {
    gets(response).first().is_some_and(|g| !g.kvs().is_empty())
}

#[async_trait]
impl Registry for EtcdRegistry {
    fn capabilities(&self) -> Capabilities {
        Capabilities::full(BACKEND)
    }

    fn session(&self) -> SessionStatus {
        self.shared.session.tracker.status()
    }

    fn session_events(&self) -> BoxStream<'static, SessionStatus> {
        self.shared.session.tracker.subscribe()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path, ?mode))]
    async fn create(&self, path: &NodePath, value: Bytes, mode: CreateMode) -> Result<Node> {
        check_value(path, &value)?;
        if path.is_root() {
            return Err(Error::root("create"));
        }
        if mode.is_sequential() {
            // Before any I/O, and before a missing parent is written.
            path.check_sequential_prefix()?;
        }
        self.shared.check_open()?;
        if mode != CreateMode::Ephemeral {
            return self.create_unbatched(path, &value, mode).await;
        }
        if let Some(_slot) = self.shared.creates.alone() {
            return self.create_unbatched(path, &value, mode).await;
        }
        let (reply, result) = tokio::sync::oneshot::channel();
        self.shared.creates.send(batch::Pending {
            path: path.clone(),
            value,
            reply,
        })?;
        result.await.map_err(|_| Error::Closed)?
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path))]
    async fn get(&self, path: &NodePath) -> Result<Node> {
        self.shared.check_open()?;
        self.read_node(path)
            .await?
            .0
            .ok_or_else(|| Error::NotFound { path: path.clone() })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path))]
    async fn exists(&self, path: &NodePath) -> Result<bool> {
        self.shared.check_open()?;
        Ok(self.read_node(path).await?.0.is_some())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path, ?expected))]
    async fn set(&self, path: &NodePath, value: Bytes, expected: Expected) -> Result<Node> {
        check_value(path, &value)?;
        if path.is_root() {
            return Err(Error::root("write"));
        }
        self.shared.check_open()?;
        let expected = match expected {
            Expected::Any => None,
            Expected::Version(v) => Some((v, self.etcd_expected(path, v).await?)),
        };
        let key = self.shared.keys.node(path);
        // ignore_lease keeps an ephemeral node's lease, and makes etcd refuse to write a
        // missing key ("key not found", mapped to NotFound); prev_kv gives what the written
        // node is made of without reading it back.
        let put_options = || PutOptions::new().with_ignore_lease().with_prev_key();
        let (prev, revision) = match expected {
            // A plain put: a Txn costs etcd 3.4 about half its write throughput.
            None => {
                let mut response = self
                    .shared
                    .request("set", path, |mut kv| {
                        let (key, value) = (key.clone(), value.to_vec());
                        async move { kv.put(key, value, Some(put_options())).await }
                    })
                    .await?;
                let revision = response.header().map_or(0, |h| h.revision());
                (response.take_prev_key(), revision)
            }
            Some((v, etcd_expected)) => {
                let response = self
                    .shared
                    .request("set", path, |mut kv| {
                        let txn = Txn::new()
                            .when([Compare::version(
                                key.clone(),
                                CompareOp::Equal,
                                etcd_expected,
                            )])
                            .and_then([TxnOp::put(
                                key.clone(),
                                value.to_vec(),
                                Some(put_options()),
                            )])
                            .or_else([TxnOp::get(
                                key.clone(),
                                Some(GetOptions::new().with_keys_only()),
                            )]);
                        async move { kv.txn(txn).await }
                    })
                    .await?;
                let first = response.op_responses().into_iter().next();
                if !response.succeeded() {
                    let actual = match first {
                        Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.version()),
                        _ => None,
                    };
                    return Err(match actual {
                        Some(actual) => Error::VersionMismatch {
                            path: path.clone(),
                            expected: v,
                            actual: keys::version_of(actual),
                        },
                        None => Error::NotFound { path: path.clone() },
                    });
                }
                let prev = match first {
                    Some(TxnOpResponse::Put(mut put)) => put.take_prev_key(),
                    _ => None,
                };
                (prev, revision_of(&response))
            }
        };
        written(path, value, prev, revision)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %node.path, owner = ?node.ephemeral_owner))]
    async fn set_owned(&self, node: &Node, value: Bytes) -> Result<Option<Node>> {
        let path = &node.path;
        check_value(path, &value)?;
        if path.is_root() {
            return Err(Error::root("write"));
        }
        self.shared.check_open()?;
        let key = self.shared.keys.node(path);
        // One Txn: the owner is compared, not read first.
        let compares = owner_compares(&key, node.ephemeral_owner);
        let response = self
            .shared
            .request("set", path, |mut kv| {
                let txn = Txn::new().when(compares.clone()).and_then([TxnOp::put(
                    key.clone(),
                    value.to_vec(),
                    Some(PutOptions::new().with_ignore_lease().with_prev_key()),
                )]);
                async move { kv.txn(txn).await }
            })
            .await?;
        if !response.succeeded() {
            return Ok(None);
        }
        let revision = revision_of(&response);
        let prev = match response.op_responses().into_iter().next() {
            Some(TxnOpResponse::Put(mut put)) => put.take_prev_key(),
            _ => None,
        };
        written(path, value, prev, revision).map(Some)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path, ?expected, ?scope))]
    async fn delete(&self, path: &NodePath, expected: Expected, scope: DeleteScope) -> Result<()> {
        if path.is_root() {
            return Err(Error::root("delete"));
        }
        self.shared.check_open()?;
        let version = match expected {
            Expected::Version(v) => Some(self.etcd_expected(path, v).await?),
            Expected::Any => None,
        };
        if self.delete_at_once(path, expected, version, scope).await? {
            tracing::debug!(path = %path, ?scope, "deleted");
            return Ok(());
        }
        let keys = &self.shared.keys;
        // An implicit node (keys below it, none of its own): each round reads, checks, and
        // deletes if nothing changed in between; a concurrent write makes us look again
        // (bounded), never a spurious error.
        for _ in 0..MAX_CREATE_ROUNDS {
            let (node, _) = self.read_node(path).await?;
            let node = node.ok_or_else(|| Error::NotFound { path: path.clone() })?;
            if let Expected::Version(v) = expected {
                if v != node.version {
                    return Err(Error::VersionMismatch {
                        path: path.clone(),
                        expected: v,
                        actual: node.version,
                    });
                }
            }
            let key = keys.node(path);
            let below = keys.below(path);
            // Read from etcd as an i64 (see `keys::node_from`), so this holds.
            let modify_order = i64::try_from(node.modify_order).map_err(|_| Error::Backend {
                backend: BACKEND,
                message: format!("delete {path}: revision {} out of range", node.modify_order),
                source: None,
            })?;
            let mut compares = vec![Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                modify_order,
            )];
            let mut ops = vec![TxnOp::delete(key, None)];
            match scope {
                DeleteScope::Recursive => ops.push(TxnOp::delete(
                    below,
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                )),
                DeleteScope::Node => {
                    // Over an empty range etcd compares against a zero key, so this holds
                    // exactly when nothing lives below the node.
                    compares.push(
                        Compare::create_revision(below.clone(), CompareOp::Equal, 0).with_prefix(),
                    );
                }
            }
            let response = self
                .shared
                .txn(Txn::new().when(compares).and_then(ops), "delete", path)
                .await?;
            if response.succeeded() {
                tracing::debug!(path = %path, ?scope, "deleted");
                return Ok(());
            }
            if scope == DeleteScope::Node {
                let (now, _) = self.read_node(path).await?;
                if now.is_some_and(|now| now.modify_order == node.modify_order) {
                    return Err(Error::NotEmpty { path: path.clone() });
                }
            }
        }
        Err(Error::unavailable(format!(
            "etcd delete {path}: too much contention, gave up after {MAX_CREATE_ROUNDS} rounds"
        )))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %node.path, owner = ?node.ephemeral_owner))]
    async fn delete_owned(&self, node: &Node) -> Result<bool> {
        let path = &node.path;
        if path.is_root() {
            return Err(Error::root("delete"));
        }
        self.shared.check_open()?;
        let keys = &self.shared.keys;
        let (key, below) = (keys.node(path), keys.below(path));
        let mut compares = owner_compares(&key, node.ephemeral_owner);
        // A key under one of the owner's leases is ephemeral, and this layer puts no key
        // under an ephemeral one (see `persistent_parents`): only where the lease compares
        // admit lease 0 (a persistent node) is the check that nothing lives below needed.
        let (first, _) = session::leases_of(node.ephemeral_owner.unwrap_or(SessionId(0)));
        if first <= 0 {
            compares
                .push(Compare::create_revision(below.clone(), CompareOp::Equal, 0).with_prefix());
        }
        // One Txn instead of read-then-delete: the owner is compared, not read first.
        let mut otherwise = vec![TxnOp::get(
            key.clone(),
            Some(GetOptions::new().with_keys_only()),
        )];
        if first <= 0 {
            // A persistent node may be implicit (keys below, none of its own): tell it apart.
            otherwise.push(TxnOp::get(
                below.clone(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_keys_only()
                        .with_limit(1),
                ),
            ));
        }
        let response = self
            .shared
            .request("delete", path, |mut kv| {
                let txn = Txn::new()
                    .when(compares.clone())
                    .and_then([TxnOp::delete(key.clone(), None)])
                    .or_else(otherwise.clone());
                async move { kv.txn(txn).await }
            })
            .await?;
        if response.succeeded() {
            tracing::debug!(path = %path, "deleted own node");
            return Ok(true);
        }
        let gets = gets(&response);
        let below_exists = gets.get(1).is_some_and(|g| !g.kvs().is_empty());
        match gets.first().and_then(|g| g.kvs().first()) {
            // Ours, so what failed is the check that nothing lives below it.
            Some(kv) if keys::owner_of(kv.lease()) == node.ephemeral_owner => {
                Err(Error::NotEmpty { path: path.clone() })
            }
            // An implicit node, persistent as asked, with children: `delete` says the same.
            None if below_exists => Err(Error::NotEmpty { path: path.clone() }),
            _ => Ok(false),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path))]
    async fn children(&self, path: &NodePath) -> Result<Children> {
        self.shared.check_open()?;
        let keys = &self.shared.keys;
        let below_options = || Some(GetOptions::new().with_prefix());
        // Keys below prove the node exists: one range. Without any, one Txn tells an empty
        // node from a missing one at a single revision.
        let listed = self
            .shared
            .range(keys.below(path), below_options(), "children", path)
            .await?;
        let (mut listed, revision) = if !listed.kvs().is_empty() || path.is_root() {
            let revision = listed.header().map_or(0, |h| h.revision());
            (listed, revision)
        } else {
            let ops = vec![
                TxnOp::get(keys.below(path), below_options()),
                TxnOp::get(keys.node(path), Some(GetOptions::new().with_keys_only())),
            ];
            let response = self.shared.read(ops, "children", path).await?;
            let mut gets = gets(&response).into_iter();
            let (Some(listed), Some(own)) = (gets.next(), gets.next()) else {
                return Err(Error::unavailable(format!(
                    "etcd children {path}: short Txn response"
                )));
            };
            if own.kvs().is_empty() && listed.kvs().is_empty() {
                return Err(Error::NotFound { path: path.clone() });
            }
            (listed, revision_of(&response))
        };
        let below = listed.take_kvs();
        // Keys come sorted, but `/a/b/c` does not follow `/a/b` (`/a/b-x` sorts between), so
        // deeper keys only name their child here; it is implicit if it has no key of its own.
        let prefix = if path.is_root() {
            "/".to_owned()
        } else {
            format!("{path}/")
        };
        let mut nodes: Vec<Node> = Vec::with_capacity(below.len());
        let mut implied: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        // Unnamable children, and whether each is a key under a lease and nothing else.
        let mut skipped: std::collections::BTreeMap<String, bool> = Default::default();
        for kv in below {
            let lease = kv.lease();
            let node = match keys.node_of_owned(kv) {
                Ok(node) => node,
                // A key another tool wrote that names no valid path: the child it falls
                // under, if that one's name is valid (the fault is deeper), else skipped.
                Err(key) => {
                    let rest = key
                        .strip_prefix(keys.below(path).as_bytes())
                        .unwrap_or_default();
                    let name = rest.split(|b| *b == b'/').next().unwrap_or_default();
                    match std::str::from_utf8(name)
                        .ok()
                        .filter(|n| path.join(n).is_ok())
                    {
                        Some(name) => {
                            implied.insert(name.to_owned());
                        }
                        None => {
                            // Only its own key can be under a lease; keys below imply a
                            // persistent parent.
                            let leased = name.len() == rest.len() && lease != 0;
                            let name = String::from_utf8_lossy(name).into_owned();
                            *skipped.entry(name).or_insert(leased) &= leased;
                        }
                    }
                    continue;
                }
            };
            match node
                .path
                .as_str()
                .strip_prefix(&prefix)
                .map(|rest| rest.split_once('/'))
            {
                Some(None) => nodes.push(node),
                Some(Some((name, _))) if !implied.contains(name) => {
                    implied.insert(name.to_owned());
                }
                _ => {}
            }
        }
        if !implied.is_empty() {
            let named: std::collections::HashSet<&str> =
                nodes.iter().map(|n| n.path.name()).collect();
            let missing: Vec<NodePath> = implied
                .iter()
                .filter(|name| !named.contains(name.as_str()))
                .filter_map(|name| path.join(name).ok())
                .collect();
            nodes.extend(missing.into_iter().map(implicit));
        }
        nodes.sort_by(|a, b| {
            a.create_order
                .cmp(&b.create_order)
                .then_with(|| a.path.cmp(&b.path))
        });
        Ok(Children {
            nodes,
            revision: Revision(u64::try_from(revision).unwrap_or(0)),
            skipped: skipped
                .into_iter()
                .map(|(name, ephemeral)| registry_core::SkippedChild { name, ephemeral })
                .collect(),
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(path = %path, scope = ?options.scope))]
    async fn watch(&self, path: &NodePath, options: WatchOptions) -> Result<WatchStream> {
        // Checked before anything else: the watch starts at `after + 1`.
        let after = options.after.map(watch_after).transpose()?;
        self.shared.check_open()?;
        Ok(watch::open(
            self.shared.clone(),
            path.clone(),
            &options,
            after,
        ))
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
        self.shared.check_open()?;
        let watches = &self.shared.registration_watches;
        Registration::start_shared(Arc::new(self.clone()), watches, path, value, options).await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn close(&self) -> Result<()> {
        // Run to its end even if this caller stops waiting: a session stopped halfway would
        // keep its leases and never read `Closed`.
        let shared = self.shared.clone();
        self.shared
            .closed
            .close(move || async move { close_session(&shared).await })
            .await
    }
}

/// `close`'s work: stops the session task, revokes the leases, and reports `Closed`.
async fn close_session(shared: &Shared) -> Result<()> {
    registry_core::stop_session_task(&shared.shutdown, &shared.session_task).await;
    let session = &shared.session;
    let leases = session.retire();
    let left = session::revoke_all(&shared.client, &leases, shared.options.request_timeout).await;
    let revoked = leases.len() - left.len();
    if revoked == leases.len() {
        tracing::info!(
            session = session.id(),
            "etcd session closed; leases revoked"
        );
    } else {
        tracing::warn!(
            session = session.id(),
            leases = leases.len(),
            revoked,
            "etcd session closed; leases not revoked expire after their TTL"
        );
    }
    shared
        .session
        .tracker
        .transition(SessionState::Closed, None);
    if revoked < leases.len() {
        return Err(Error::unavailable(format!(
            "etcd close: {} of the session's {} leases could not be revoked; their ephemeral \
                 nodes go when the leases expire",
            leases.len() - revoked,
            leases.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(r: Result<i64>) -> String {
        match r {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn expected_versions_convert_without_overflow() {
        assert_eq!(etcd_version(0), Some(1));
        assert_eq!(etcd_version(41), Some(42));
        assert_eq!(etcd_version(i64::MAX as u64 - 1), Some(i64::MAX));
        // The old `v as i64 + 1` overflowed (debug panic) or wrapped to a bogus compare.
        for v in [i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX] {
            assert_eq!(etcd_version(v), None, "{v}");
        }
    }

    #[test]
    fn watch_revisions_convert_without_wrapping() {
        assert_eq!(watch_after(Revision(0)).unwrap(), 0);
        assert_eq!(watch_after(Revision(7)).unwrap(), 7);
        let last_ok = i64::MAX as u64 - 1;
        assert_eq!(watch_after(Revision(last_ok)).unwrap(), i64::MAX - 1);
        // The old `r.0 as i64` made these negative (or i64::MAX, whose `+ 1` overflows).
        for r in [i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX] {
            assert!(
                invalid(watch_after(Revision(r))).contains(&r.to_string()),
                "{r}"
            );
        }
    }

    #[test]
    fn lease_ttls_and_bounds_never_overflow() {
        assert_eq!(lease_ttl_secs(Duration::from_secs(5)).unwrap(), 5);
        assert!(invalid(lease_ttl_secs(Duration::MAX)).contains("TTL"));
        assert_eq!(
            lease_ttl_secs(Duration::from_secs(9_000_000_000)).unwrap(),
            9_000_000_000
        );
        assert!(invalid(lease_ttl_secs(Duration::from_secs(9_000_000_001))).contains("TTL"));
        let huge = EtcdOptions::new(["127.0.0.1:1"]).with_session_ttl(Duration::MAX);
        assert!(lease_ttl_secs(huge.effective_session_ttl()).is_err());
        assert_eq!(lease_bounds(10, 20), (Some(9), Some(21)));
        assert_eq!(lease_bounds(i64::MIN, i64::MIN), (None, Some(i64::MIN + 1)));
        assert_eq!(lease_bounds(i64::MAX, i64::MAX), (Some(i64::MAX - 1), None));
    }

    #[tokio::test]
    async fn huge_ttl_is_an_input_error_before_any_io() {
        // Port 1: nothing listens, so an error other than InvalidArgument means I/O happened.
        let options = EtcdOptions::new(["127.0.0.1:1"]).with_session_ttl(Duration::MAX);
        match EtcdRegistry::connect(options).await {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("TTL"), "{m}"),
            Err(other) => panic!("expected InvalidArgument, got {other:?}"),
            Ok(_) => panic!("connected to 127.0.0.1:1"),
        }
    }
}
