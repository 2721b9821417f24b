//! The raw clients (`etcd-client`, `zookeeper-client`) doing what an application without our
//! layer would do, behind one small interface so scenarios read the same for both backends.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_client::{
    Client as EtcdClient, Compare, CompareOp, DeleteOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, WatchFilterType, WatchOptions as EtcdWatchOptions, WatchStream as EtcdWatchStream,
};
use futures::{stream, StreamExt};
use tokio::sync::mpsc::UnboundedSender;
use zookeeper_client as zk;

use crate::util::{within, BenchResult, Ctx, Task};

/// Requests in flight at once for bulk work (setup, cleanup, bulk creates).
pub const IN_FLIGHT: usize = 64;

/// Nodes one request of [`Raw::create_children_batched`] writes: an etcd Txn of puts (within
/// etcd's default `--max-txn-ops` of 128) or a ZooKeeper multi of creates.
pub const BATCH: usize = 100;

/// Requests of [`Raw::create_children_batched`] in flight at once.
pub const BATCHES_IN_FLIGHT: usize = 8;

/// Longest one raw etcd request may take (ours: its `request_timeout`); streams are exempt.
const RAW_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a background loop of the bench runs (keep-alives, watchers).
const MAX_TASK_LIFE: Duration = Duration::from_secs(3600);

/// Events one watcher task handles at most.
const MAX_WATCH_EVENTS: usize = 10_000_000;

/// What a node watcher saw: watcher index, the new value (`None`: node gone), when.
pub type Seen = (usize, Option<Bytes>, Instant);

/// Puts a raw etcd session makes under one lease before it grants the next, as our layer's
/// session does (`EtcdOptions::keys_per_lease`): etcd 3.4 spends apply time linear in a
/// lease's keys on every put under it (etcd-io/etcd#15993), so one lease taking every put
/// would slow the raw side more and more as a run goes on.
const PUTS_PER_LEASE: usize = 256;

/// A raw etcd session: a block of leases, each kept alive every TTL/3, a new one granted
/// after [`PUTS_PER_LEASE`] puts under the newest.
pub struct LeaseBlock {
    client: EtcdClient,
    ttl: Duration,
    state: tokio::sync::Mutex<BlockState>,
    /// The lease each key was put under, for the owner-checked delete.
    owners: std::sync::Mutex<HashMap<String, i64>>,
    /// Set by a keep-alive that finds its lease gone: the session is lost.
    lost: tokio::sync::watch::Sender<bool>,
}

struct BlockState {
    /// Every lease granted, newest last.
    leases: Vec<i64>,
    /// Puts under the newest lease.
    on_newest: usize,
    /// Their keep-alive tasks.
    _keepers: Vec<Task>,
}

impl LeaseBlock {
    async fn open(client: &EtcdClient, ttl: Duration) -> BenchResult<LeaseBlock> {
        let lost = tokio::sync::watch::Sender::new(false);
        let (lease, keeper) = grant_and_keep(client, ttl, lost.clone()).await?;
        Ok(LeaseBlock {
            client: client.clone(),
            ttl,
            state: tokio::sync::Mutex::new(BlockState {
                leases: vec![lease],
                on_newest: 0,
                _keepers: vec![keeper],
            }),
            owners: std::sync::Mutex::new(HashMap::new()),
            lost,
        })
    }

    /// The lease for the next put of `key`, granting a new one when the newest is full.
    async fn lease_for(&self, key: &str) -> BenchResult<i64> {
        let mut state = self.state.lock().await;
        if state.on_newest >= PUTS_PER_LEASE {
            let (lease, keeper) = grant_and_keep(&self.client, self.ttl, self.lost.clone()).await?;
            state.leases.push(lease);
            state._keepers.push(keeper);
            state.on_newest = 0;
        }
        state.on_newest += 1;
        let lease = *state.leases.last().ok_or("a lease block without a lease")?;
        drop(state);
        if let Ok(mut owners) = self.owners.lock() {
            owners.insert(key.to_owned(), lease);
        }
        Ok(lease)
    }

    /// The lease `key` was last put under by this session, no longer remembered: the key is
    /// being removed.
    fn forget(&self, key: &str) -> Option<i64> {
        self.owners.lock().ok()?.remove(key)
    }

    /// Every lease of the block.
    async fn leases(&self) -> Vec<i64> {
        self.state.lock().await.leases.clone()
    }

    /// Resolves once a keep-alive has found a lease of the block gone.
    async fn until_lost(&self) {
        let mut lost = self.lost.subscribe();
        let _ = lost.wait_for(|lost| *lost).await;
    }
}

/// A raw client of one backend.
pub enum Raw {
    /// etcd: a client and its session, a block of leases kept alive.
    Etcd {
        /// The client (boxed: it is large).
        client: Box<EtcdClient>,
        /// The session's leases.
        session: Box<LeaseBlock>,
    },
    /// ZooKeeper: one client (one session).
    Zk(zk::Client),
}

fn zk_persistent() -> zk::CreateOptions<'static> {
    zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all())
}

fn zk_ephemeral() -> zk::CreateOptions<'static> {
    zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all())
}

fn parent_of(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

/// What a watcher of one node sees in an etcd event: the new value, `None` once it is gone.
fn value_of(event: &etcd_client::Event) -> Option<Bytes> {
    match event.event_type() {
        EventType::Put => event
            .kv()
            .map(|kv| Bytes::copy_from_slice(kv.value()))
            .or_else(|| Some(Bytes::new())),
        EventType::Delete => None,
    }
}

/// Opens an etcd watch and waits until the server confirms it.
async fn etcd_watch(
    client: &EtcdClient,
    key: &str,
    options: Option<EtcdWatchOptions>,
) -> BenchResult<EtcdWatchStream> {
    let mut stream = client
        .clone()
        .watch(key, options)
        .await
        .ctx(format!("etcd watch {key}"))?;
    created(&mut stream, key).await?;
    Ok(stream)
}

/// Waits for the server to confirm the next watch created on `stream`; its watch ID.
async fn created(stream: &mut EtcdWatchStream, key: &str) -> BenchResult<i64> {
    within(Duration::from_secs(10), "etcd watch creation", async {
        for _ in 0..10_000 {
            match stream.message().await {
                Ok(Some(m)) if m.created() => return Ok(m.watch_id()),
                Ok(Some(_)) => {}
                Ok(None) => return Err(format!("etcd watch {key} ended before it was created")),
                Err(e) => return Err(format!("etcd watch {key}: {e}")),
            }
        }
        Err(format!(
            "etcd watch {key}: no creation among 10000 messages"
        ))
    })
    .await
}

impl Raw {
    /// Connects to etcd and opens a session of `ttl` (see [`LeaseBlock`]).
    pub async fn connect_etcd(endpoint: &str, ttl: Duration) -> BenchResult<Raw> {
        let client = within(Duration::from_secs(10), "raw etcd connect", async {
            // A deadline per request, as ours has: a stalled server fails the run, not hangs it.
            let options = etcd_client::ConnectOptions::new().with_timeout(RAW_REQUEST_TIMEOUT);
            EtcdClient::connect([endpoint], Some(options))
                .await
                .ctx(format!("raw etcd connect {endpoint}"))
        })
        .await?;
        let session = Box::new(LeaseBlock::open(&client, ttl).await?);
        Ok(Raw::Etcd {
            client: Box::new(client),
            session,
        })
    }

    /// Replaces the etcd session with a new one (after the old one was lost), as an
    /// application would; no-op on ZooKeeper.
    pub async fn renew_etcd_session(&mut self, ttl: Duration) -> BenchResult<()> {
        if let Raw::Etcd { client, session } = self {
            **session = LeaseBlock::open(client, ttl).await?;
        }
        Ok(())
    }

    /// Connects to ZooKeeper with the given session timeout.
    pub async fn connect_zk(connect: &str, session_timeout: Duration) -> BenchResult<Raw> {
        Ok(Raw::Zk(zk_connect(connect, session_timeout).await?))
    }

    /// The ZooKeeper client, if this is one.
    pub fn zk(&self) -> Option<&zk::Client> {
        match self {
            Raw::Zk(c) => Some(c),
            Raw::Etcd { .. } => None,
        }
    }

    /// The etcd client, if this is one.
    pub fn etcd(&self) -> Option<EtcdClient> {
        match self {
            Raw::Etcd { client, .. } => Some(EtcdClient::clone(client)),
            Raw::Zk(_) => None,
        }
    }

    /// Resolves once the etcd session's keep-alive finds it lost (at once on ZooKeeper).
    pub async fn until_etcd_session_lost(&self) {
        if let Raw::Etcd { session, .. } = self {
            session.until_lost().await;
        }
    }

    /// The etcd session's leases (none on ZooKeeper).
    pub async fn etcd_leases(&self) -> Vec<i64> {
        match self {
            Raw::Etcd { session, .. } => session.leases().await,
            Raw::Zk(_) => Vec::new(),
        }
    }

    /// Creates `path` and its ancestors as persistent nodes (ZooKeeper); nothing on etcd,
    /// where keys need no parents.
    pub async fn mkdir(&self, path: &str) -> BenchResult<()> {
        match self {
            Raw::Etcd { .. } => Ok(()),
            Raw::Zk(c) => c
                .mkdir(path, &zk_persistent())
                .await
                .ctx(format!("zk mkdir {path}")),
        }
    }

    /// Writes a persistent node, creating it (and, on ZooKeeper, its parents) if missing.
    pub async fn put(&self, path: &str, value: &[u8]) -> BenchResult<()> {
        match self {
            Raw::Etcd { client, .. } => {
                client
                    .clone()
                    .put(path, value, None)
                    .await
                    .ctx(format!("etcd put {path}"))?;
                Ok(())
            }
            Raw::Zk(c) => match c.create(path, value, &zk_persistent()).await {
                Ok(_) => Ok(()),
                Err(zk::Error::NodeExists) => self.set(path, value).await,
                Err(zk::Error::NoNode) => {
                    self.mkdir(parent_of(path)).await?;
                    c.create(path, value, &zk_persistent())
                        .await
                        .map(|_| ())
                        .ctx(format!("zk create {path}"))
                }
                Err(e) => Err(format!("zk create {path}: {e}")),
            },
        }
    }

    /// Writes an existing node's value (etcd: a put).
    pub async fn set(&self, path: &str, value: &[u8]) -> BenchResult<()> {
        match self {
            Raw::Etcd { client, .. } => client
                .clone()
                .put(path, value, None)
                .await
                .map(|_| ())
                .ctx(format!("etcd put {path}")),
            Raw::Zk(c) => c
                .set_data(path, value, None)
                .await
                .map(|_| ())
                .ctx(format!("zk set {path}")),
        }
    }

    /// Registers: etcd a put under the session's newest lease, ZooKeeper an ephemeral create
    /// (the parent must exist).
    pub async fn register(&self, path: &str, value: &[u8]) -> BenchResult<()> {
        match self {
            Raw::Etcd { client, session } => {
                let lease = session.lease_for(path).await?;
                client
                    .clone()
                    .put(path, value, Some(PutOptions::new().with_lease(lease)))
                    .await
                    .map(|_| ())
                    .ctx(format!("etcd put {path} with lease"))
            }
            Raw::Zk(c) => c
                .create(path, value, &zk_ephemeral())
                .await
                .map(|_| ())
                .ctx(format!("zk create ephemeral {path}")),
        }
    }

    /// Registers with the checks our `create(Ephemeral)` makes, written against the raw
    /// client: on etcd the same Txn (parent exists and is persistent, key absent; put under
    /// the session lease; else read both, to name the failure); on ZooKeeper an ephemeral
    /// create, which checks this itself. Fails if a check does.
    pub async fn register_checked(&self, path: &str, value: &[u8]) -> BenchResult<()> {
        match self {
            Raw::Etcd { client, session } => {
                let lease = session.lease_for(path).await?;
                let parent = parent_of(path);
                let keys_only = || Some(GetOptions::new().with_keys_only());
                let txn = Txn::new()
                    .when([
                        Compare::create_revision(parent, CompareOp::Greater, 0),
                        Compare::lease(parent, CompareOp::Equal, 0),
                        Compare::create_revision(path, CompareOp::Equal, 0),
                    ])
                    .and_then([TxnOp::put(
                        path,
                        value,
                        Some(PutOptions::new().with_lease(lease)),
                    )])
                    .or_else([
                        TxnOp::get(parent, keys_only()),
                        TxnOp::get(path, keys_only()),
                    ]);
                if etcd_txn_succeeded(client, txn, "checked create", path).await? {
                    Ok(())
                } else {
                    Err(format!("etcd checked create {path}: a check failed"))
                }
            }
            Raw::Zk(_) => self.register(path, value).await,
        }
    }

    /// Deletes a node only while this client's session owns it, as our `deregister()` does:
    /// on etcd one Txn comparing the key's lease with the one this session put it under; on
    /// ZooKeeper a stat, then a delete at the version read if the stat names this session as
    /// the owner. Fails if the node is missing or not this session's.
    pub async fn delete_owned(&self, path: &str) -> BenchResult<()> {
        let refused = || {
            Err(format!(
                "owner-checked delete {path}: not this session's node"
            ))
        };
        match self {
            Raw::Etcd { client, session } => {
                let Some(lease) = session.forget(path) else {
                    return refused();
                };
                let txn = Txn::new()
                    .when([Compare::lease(path, CompareOp::Equal, lease)])
                    .and_then([TxnOp::delete(path, None)])
                    .or_else([TxnOp::get(path, Some(GetOptions::new().with_keys_only()))]);
                if etcd_txn_succeeded(client, txn, "owner-checked delete", path).await? {
                    Ok(())
                } else {
                    refused()
                }
            }
            Raw::Zk(c) => {
                let stat = c.check_stat(path).await.ctx(format!("zk stat {path}"))?;
                match stat {
                    Some(stat) if stat.ephemeral_owner == c.session_id().0 => c
                        .delete(path, Some(stat.version))
                        .await
                        .ctx(format!("zk delete {path} at version {}", stat.version)),
                    _ => refused(),
                }
            }
        }
    }

    /// Deletes a node with the checks our `delete(Any, Node)` makes: on etcd the same Txn
    /// (the key exists and nothing lives below it; else read both, to name the failure); on
    /// ZooKeeper a delete, which checks this itself. Fails if a check does.
    pub async fn delete_checked(&self, path: &str) -> BenchResult<()> {
        match self {
            Raw::Etcd { client, .. } => {
                let below = format!("{path}/");
                let txn = Txn::new()
                    .when([
                        Compare::version(path, CompareOp::Greater, 0),
                        Compare::create_revision(below.as_str(), CompareOp::Equal, 0).with_prefix(),
                    ])
                    .and_then([TxnOp::delete(path, None)])
                    .or_else([
                        TxnOp::get(path, Some(GetOptions::new().with_keys_only())),
                        TxnOp::get(
                            below.as_str(),
                            Some(
                                GetOptions::new()
                                    .with_prefix()
                                    .with_keys_only()
                                    .with_limit(1),
                            ),
                        ),
                    ]);
                if etcd_txn_succeeded(client, txn, "checked delete", path).await? {
                    Ok(())
                } else {
                    Err(format!("etcd checked delete {path}: a check failed"))
                }
            }
            Raw::Zk(_) => self.delete(path).await,
        }
    }

    /// Deletes one node.
    pub async fn delete(&self, path: &str) -> BenchResult<()> {
        match self {
            Raw::Etcd { client, session } => {
                session.forget(path);
                client
                    .clone()
                    .delete(path, None)
                    .await
                    .map(|_| ())
                    .ctx(format!("etcd delete {path}"))
            }
            Raw::Zk(c) => c.delete(path, None).await.ctx(format!("zk delete {path}")),
        }
    }

    /// Reads a node's value.
    pub async fn get(&self, path: &str) -> BenchResult<Bytes> {
        match self {
            Raw::Etcd { client, .. } => {
                let r = client
                    .clone()
                    .get(path, None)
                    .await
                    .ctx(format!("etcd get {path}"))?;
                Ok(r.kvs()
                    .first()
                    .map(|kv| Bytes::copy_from_slice(kv.value()))
                    .unwrap_or_default())
            }
            Raw::Zk(c) => {
                let (data, _) = c.get_data(path).await.ctx(format!("zk get {path}"))?;
                Ok(Bytes::from(data))
            }
        }
    }

    /// Reads every child with its value (etcd: one prefix get; ZooKeeper: the list, then
    /// every child's data pipelined) and returns how many there are.
    pub async fn children(&self, path: &str) -> BenchResult<usize> {
        match self {
            Raw::Etcd { client, .. } => {
                let r = client
                    .clone()
                    .get(format!("{path}/"), Some(GetOptions::new().with_prefix()))
                    .await
                    .ctx(format!("etcd get prefix {path}/"))?;
                Ok(r.kvs().len())
            }
            Raw::Zk(c) => {
                let (names, _) = c
                    .get_children(path)
                    .await
                    .ctx(format!("zk children {path}"))?;
                let reads = names.iter().map(|n| c.get_data(&format!("{path}/{n}")));
                let values = futures::future::join_all(reads).await;
                let mut count = 0;
                for v in values {
                    v.ctx(format!("zk get a child of {path}"))?;
                    count += 1;
                }
                Ok(count)
            }
        }
    }

    /// ZooKeeper only: reads every child with its value as `children` does on a 3.6+
    /// server: the list, then the values in `multiRead`s of
    /// [`MULTI_READ_NODES`](registry_zk::MULTI_READ_NODES), all sent at once.
    pub async fn children_multi_read(&self, path: &str) -> BenchResult<usize> {
        let Raw::Zk(c) = self else {
            return Err("multiRead is ZooKeeper's".into());
        };
        let (names, _) = c
            .get_children(path)
            .await
            .ctx(format!("zk children {path}"))?;
        let paths: Vec<String> = names.iter().map(|n| format!("{path}/{n}")).collect();
        let mut reads = Vec::new();
        for chunk in paths.chunks(registry_zk::MULTI_READ_NODES) {
            let mut reader = c.new_multi_reader();
            for child in chunk {
                reader
                    .add_get_data(child)
                    .ctx(format!("zk multiRead {child}"))?;
            }
            reads.push(reader.commit());
        }
        let mut count = 0;
        for results in futures::future::join_all(reads).await {
            for result in results.ctx(format!("zk multiRead below {path}"))? {
                if let zk::MultiReadResult::Data { .. } = result {
                    count += 1;
                }
            }
        }
        Ok(count)
    }

    /// How many children `path` has (one cheap request).
    pub async fn count_children(&self, path: &str) -> BenchResult<usize> {
        match self {
            Raw::Etcd { client, .. } => {
                let r = client
                    .clone()
                    .get(
                        format!("{path}/"),
                        Some(GetOptions::new().with_prefix().with_count_only()),
                    )
                    .await
                    .ctx(format!("etcd count {path}/"))?;
                Ok(usize::try_from(r.count()).unwrap_or(0))
            }
            Raw::Zk(c) => Ok(c
                .check_stat(path)
                .await
                .ctx(format!("zk stat {path}"))?
                .map_or(0, |s| usize::try_from(s.num_children).unwrap_or(0))),
        }
    }

    /// Creates `n` persistent children `c0..c<n>` of `parent`, [`IN_FLIGHT`] at a time.
    pub async fn create_children(&self, parent: &str, n: usize, value: &[u8]) -> BenchResult<()> {
        self.mkdir(parent).await?;
        let mut writes = stream::iter(0..n)
            .map(|i| {
                let path = format!("{parent}/c{i}");
                async move { self.put(&path, value).await }
            })
            .buffer_unordered(IN_FLIGHT);
        while let Some(r) = writes.next().await {
            r?;
        }
        Ok(())
    }

    /// Creates `n` persistent children `c0..c<n>` of `parent`, [`BATCH`] per request and
    /// [`BATCHES_IN_FLIGHT`] requests at a time: a watcher of `parent` then gets changes
    /// faster than one write per node could make them, so it is its own delivery that bounds
    /// its event rate.
    pub async fn create_children_batched(
        &self,
        parent: &str,
        n: usize,
        value: &[u8],
    ) -> BenchResult<()> {
        self.mkdir(parent).await?;
        let mut writes = stream::iter((0..n).step_by(BATCH))
            .map(|first| self.create_batch(parent, first..n.min(first + BATCH), value))
            .buffer_unordered(BATCHES_IN_FLIGHT);
        while let Some(r) = writes.next().await {
            r?;
        }
        Ok(())
    }

    /// Creates the persistent children `c<i>` of `parent` for every `i` in `names` in one
    /// request.
    async fn create_batch(
        &self,
        parent: &str,
        names: std::ops::Range<usize>,
        value: &[u8],
    ) -> BenchResult<()> {
        let what = format!("create {parent}/c{}..c{}", names.start, names.end);
        match self {
            Raw::Etcd { client, .. } => {
                let puts: Vec<TxnOp> = names
                    .map(|i| TxnOp::put(format!("{parent}/c{i}"), value, None))
                    .collect();
                client
                    .clone()
                    .txn(Txn::new().and_then(puts))
                    .await
                    .ctx(format!("etcd {what}"))?;
            }
            Raw::Zk(c) => {
                let mut multi = c.new_multi_writer();
                for i in names {
                    multi
                        .add_create(&format!("{parent}/c{i}"), value, &zk_persistent())
                        .ctx(format!("zk {what}"))?;
                }
                multi.commit().await.ctx(format!("zk {what}"))?;
            }
        }
        Ok(())
    }

    /// Deletes `path` and everything below it.
    pub async fn delete_tree(&self, path: &str) -> BenchResult<()> {
        match self {
            Raw::Etcd { client, .. } => {
                let mut c = client.clone();
                c.delete(format!("{path}/"), Some(DeleteOptions::new().with_prefix()))
                    .await
                    .ctx(format!("etcd delete prefix {path}/"))?;
                c.delete(path, None)
                    .await
                    .ctx(format!("etcd delete {path}"))?;
                Ok(())
            }
            Raw::Zk(c) => {
                let mut levels = vec![vec![path.to_owned()]];
                for _ in 0..64 {
                    let Some(last) = levels.last() else { break };
                    let lists = stream::iter(last.clone())
                        .map(|p| async move {
                            match c.list_children(&p).await {
                                Ok(names) => Ok(names
                                    .into_iter()
                                    .map(|n| format!("{}/{n}", p.trim_end_matches('/')))
                                    .collect::<Vec<_>>()),
                                Err(zk::Error::NoNode) => Ok(Vec::new()),
                                Err(e) => Err(format!("zk list {p}: {e}")),
                            }
                        })
                        .buffer_unordered(256)
                        .collect::<Vec<_>>()
                        .await;
                    let mut next = Vec::new();
                    for l in lists {
                        next.extend(l?);
                    }
                    if next.is_empty() {
                        break;
                    }
                    levels.push(next);
                }
                for level in levels.into_iter().rev() {
                    let mut deletes = stream::iter(level)
                        .map(|p| async move {
                            match c.delete(&p, None).await {
                                Ok(()) | Err(zk::Error::NoNode) => Ok(()),
                                Err(e) => Err(format!("zk delete {p}: {e}")),
                            }
                        })
                        .buffer_unordered(256);
                    while let Some(r) = deletes.next().await {
                        r?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Watches one node; every change is sent as `(index, value, when)` (`None` when the
    /// node is gone). Returns once the watch is in place. ZooKeeper re-arms its one-shot
    /// watch by reading the node again, which also fetches the new value.
    pub async fn watch_node(
        &self,
        path: &str,
        index: usize,
        tx: UnboundedSender<Seen>,
    ) -> BenchResult<Task> {
        match self {
            Raw::Etcd { client, .. } => {
                let mut stream = etcd_watch(client, path, None).await?;
                Ok(Task::spawn(async move {
                    for _ in 0..MAX_WATCH_EVENTS {
                        let Ok(Some(message)) = stream.message().await else {
                            return;
                        };
                        let now = Instant::now();
                        for event in message.events() {
                            if tx.send((index, value_of(event), now)).is_err() {
                                return;
                            }
                        }
                    }
                }))
            }
            Raw::Zk(c) => {
                let (_, _, mut watcher) = c
                    .get_and_watch_data(path)
                    .await
                    .ctx(format!("zk watch {path}"))?;
                let client = c.clone();
                let path = path.to_owned();
                Ok(Task::spawn(async move {
                    for _ in 0..MAX_WATCH_EVENTS {
                        let _ = watcher.changed().await;
                        match client.get_and_watch_data(&path).await {
                            Ok((data, _, next)) => {
                                if tx
                                    .send((index, Some(Bytes::from(data)), Instant::now()))
                                    .is_err()
                                {
                                    return;
                                }
                                watcher = next;
                            }
                            Err(zk::Error::NoNode) => {
                                let _ = tx.send((index, None, Instant::now()));
                                return;
                            }
                            Err(_) => return,
                        }
                    }
                }))
            }
        }
    }

    /// `n` watchers of one node, as `watch_node` with indices `0..n`, for the fan-out
    /// scenario. etcd's watchers share one gRPC stream (one watch ID each), as a careful raw
    /// user, etcd's Go client and our layer do; each ZooKeeper watcher is a `watch_node` (the
    /// client shares the server's watch per path itself). Returns once every watch is in
    /// place.
    pub async fn watch_node_many(
        &self,
        path: &str,
        n: usize,
        tx: UnboundedSender<Seen>,
    ) -> BenchResult<Vec<Task>> {
        let Raw::Etcd { client, .. } = self else {
            let mut tasks = Vec::with_capacity(n);
            for index in 0..n {
                tasks.push(self.watch_node(path, index, tx.clone()).await?);
            }
            return Ok(tasks);
        };
        let mut stream = client
            .clone()
            .watch(path, None)
            .await
            .ctx(format!("etcd watch {path}"))?;
        // Watch ID -> watcher index: each watch is added once the one before is confirmed.
        let mut index_of: HashMap<i64, usize> = HashMap::with_capacity(n);
        for index in 0..n {
            if index > 0 {
                stream
                    .watch(path, None)
                    .await
                    .ctx(format!("etcd watch {path}"))?;
            }
            index_of.insert(created(&mut stream, path).await?, index);
        }
        Ok(vec![Task::spawn(async move {
            for _ in 0..MAX_WATCH_EVENTS {
                let Ok(Some(message)) = stream.message().await else {
                    return;
                };
                let now = Instant::now();
                let Some(&index) = index_of.get(&message.watch_id()) else {
                    continue;
                };
                for event in message.events() {
                    if tx.send((index, value_of(event), now)).is_err() {
                        return;
                    }
                }
            }
        })])
    }

    /// Watches the deletions of `parent`'s children (etcd's `NoPut` filter), as our
    /// registrations' shared watch does, reading and dropping them. Returns once the watch is
    /// in place. etcd only: ZooKeeper cannot leave writes out.
    pub async fn watch_deletions(&self, parent: &str) -> BenchResult<Task> {
        let Raw::Etcd { client, .. } = self else {
            return Err("a deletions-only watch needs etcd".into());
        };
        let options = EtcdWatchOptions::new()
            .with_prefix()
            .with_filters([WatchFilterType::NoPut]);
        let mut stream = etcd_watch(client, &format!("{parent}/"), Some(options)).await?;
        Ok(Task::spawn(async move {
            for _ in 0..MAX_WATCH_EVENTS {
                if !matches!(stream.message().await, Ok(Some(_))) {
                    return;
                }
            }
        }))
    }

    /// Watches the children of `parent`, reading each new child's value; sends the number of
    /// distinct children seen so far (and when) whenever it grows. Returns once the watch is
    /// in place. On ZooKeeper each child's value is read with a data watch, kept for the
    /// task's life, as Curator's `PathChildrenCache` does and as our layer must to report a
    /// child's new value (etcd's prefix watch covers values already).
    pub async fn watch_children(
        &self,
        parent: &str,
        tx: UnboundedSender<(usize, Instant)>,
    ) -> BenchResult<Task> {
        match self {
            Raw::Etcd { client, .. } => {
                let mut stream = etcd_watch(
                    client,
                    &format!("{parent}/"),
                    Some(EtcdWatchOptions::new().with_prefix()),
                )
                .await?;
                Ok(Task::spawn(async move {
                    let mut seen: HashSet<Vec<u8>> = HashSet::new();
                    for _ in 0..MAX_WATCH_EVENTS {
                        let Ok(Some(message)) = stream.message().await else {
                            return;
                        };
                        let before = seen.len();
                        for event in message.events() {
                            if event.event_type() == EventType::Put {
                                if let Some(kv) = event.kv() {
                                    seen.insert(kv.key().to_vec());
                                }
                            }
                        }
                        if seen.len() != before && tx.send((seen.len(), Instant::now())).is_err() {
                            return;
                        }
                    }
                }))
            }
            Raw::Zk(c) => {
                let (names, watcher) = c
                    .list_and_watch_children(parent)
                    .await
                    .ctx(format!("zk watch children {parent}"))?;
                let client = c.clone();
                let parent = parent.to_owned();
                Ok(Task::spawn(async move {
                    let mut values: HashMap<String, Vec<u8>> = HashMap::new();
                    // Dropping one would ask the server to remove its watch.
                    let mut data_watches = Vec::new();
                    let mut names = names;
                    let mut watcher = watcher;
                    for _ in 0..MAX_WATCH_EVENTS {
                        let fresh: Vec<String> = names
                            .into_iter()
                            .filter(|n| !values.contains_key(n))
                            .collect();
                        let reads = stream::iter(fresh)
                            .map(|n| {
                                let read = client.get_and_watch_data(&format!("{parent}/{n}"));
                                async move { (n, read.await) }
                            })
                            .buffer_unordered(256)
                            .collect::<Vec<_>>()
                            .await;
                        let before = values.len();
                        for (n, r) in reads {
                            if let Ok((data, _, watch)) = r {
                                values.insert(n, data);
                                data_watches.push(watch);
                            }
                        }
                        if values.len() != before
                            && tx.send((values.len(), Instant::now())).is_err()
                        {
                            return;
                        }
                        let _ = watcher.changed().await;
                        match client.list_and_watch_children(&parent).await {
                            Ok((n, w)) => {
                                names = n;
                                watcher = w;
                            }
                            Err(_) => return,
                        }
                    }
                }))
            }
        }
    }
}

/// Connects a ZooKeeper client.
pub async fn zk_connect(connect: &str, session_timeout: Duration) -> BenchResult<zk::Client> {
    within(Duration::from_secs(15), "raw zookeeper connect", async {
        zk::Client::connector()
            .with_session_timeout(session_timeout)
            .connect(connect)
            .await
            .ctx(format!("raw zookeeper connect {connect}"))
    })
    .await
}

/// Sends `txn` (the `what` of `path`); whether its compares held.
async fn etcd_txn_succeeded(
    client: &EtcdClient,
    txn: Txn,
    what: &str,
    path: &str,
) -> BenchResult<bool> {
    let response = client
        .clone()
        .txn(txn)
        .await
        .ctx(format!("etcd {what} {path}"))?;
    Ok(response.succeeded())
}

/// Grants a lease of `ttl` and keeps it alive every TTL/3 on a task, which sets `lost` when
/// the server answers that the lease is gone (or the stream ends).
async fn grant_and_keep(
    client: &EtcdClient,
    ttl: Duration,
    lost: tokio::sync::watch::Sender<bool>,
) -> BenchResult<(i64, Task)> {
    let mut granting = client.clone();
    let lease = granting
        .lease_grant(ttl.as_secs().max(1) as i64, None)
        .await
        .ctx("raw etcd lease grant")?
        .id();
    let (mut keeper, mut answers) = granting
        .lease_keep_alive(lease)
        .await
        .ctx("raw etcd keep-alive")?;
    let interval = ttl / 3;
    let task = Task::spawn(async move {
        let until = Instant::now() + MAX_TASK_LIFE;
        let mut tick = tokio::time::interval(interval);
        while Instant::now() < until {
            tokio::select! {
                _ = tick.tick() => {
                    if keeper.keep_alive().await.is_err() {
                        break;
                    }
                }
                answer = answers.message() => match answer {
                    Ok(Some(a)) if a.ttl() > 0 => {}
                    _ => break,
                },
            }
        }
        lost.send_replace(true);
    });
    Ok((lease, task))
}

/// What a raw application holds to follow the children of a node: every child's value and
/// the watches that tell it about changes.
pub struct HeldChildren {
    _values: HashMap<String, Vec<u8>>,
    _etcd: Option<EtcdWatchStream>,
    _zk: Vec<zk::OneshotWatcher>,
}

impl Raw {
    /// Reads every child of `parent` with its value and keeps watching all of them, the way
    /// our children-scope watch does; returns what the application has to hold.
    pub async fn hold_children(&self, parent: &str) -> BenchResult<HeldChildren> {
        match self {
            Raw::Etcd { client, .. } => {
                let prefix = format!("{parent}/");
                let r = client
                    .clone()
                    .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
                    .await
                    .ctx(format!("etcd get prefix {prefix}"))?;
                let revision = r.header().map_or(0, |h| h.revision());
                let values = r
                    .kvs()
                    .iter()
                    .map(|kv| {
                        (
                            String::from_utf8_lossy(kv.key()).into_owned(),
                            kv.value().to_vec(),
                        )
                    })
                    .collect();
                let stream = etcd_watch(
                    client,
                    &prefix,
                    Some(
                        EtcdWatchOptions::new()
                            .with_prefix()
                            .with_start_revision(revision + 1),
                    ),
                )
                .await?;
                Ok(HeldChildren {
                    _values: values,
                    _etcd: Some(stream),
                    _zk: Vec::new(),
                })
            }
            Raw::Zk(c) => {
                let (names, watcher) = c
                    .list_and_watch_children(parent)
                    .await
                    .ctx(format!("zk watch children {parent}"))?;
                let reads = stream::iter(names)
                    .map(|n| {
                        let read = c.get_and_watch_data(&format!("{parent}/{n}"));
                        async move { (n, read.await) }
                    })
                    .buffer_unordered(256)
                    .collect::<Vec<_>>()
                    .await;
                let mut values = HashMap::new();
                let mut watchers = vec![watcher];
                for (n, r) in reads {
                    let (data, _, w) = r.ctx(format!("zk get {parent}/{n}"))?;
                    values.insert(n, data);
                    watchers.push(w);
                }
                Ok(HeldChildren {
                    _values: values,
                    _etcd: None,
                    _zk: watchers,
                })
            }
        }
    }
}
