//! Helpers every case uses: per-case namespaces, bounded waits, tree reads and comparisons.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rand::Rng;
use registry_core::{
    Bytes, CreateMode, Error, Node, NodePath, Registry, SessionId, WatchEvent, WatchStream,
    WatchedState,
};

use crate::fixture::Fixture;

/// How long a case waits for an event that should come promptly.
pub const EVENT_WAIT: Duration = Duration::from_secs(15);

/// The result of a case that did not fail (failures panic with a message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every assertion held.
    Passed,
    /// The backend or fixture lacks a declared capability the case needs.
    Skipped(String),
}

/// A path from a literal in a case (cases only use valid literals).
pub fn p(path: &str) -> NodePath {
    match NodePath::new(path) {
        Ok(p) => p,
        Err(e) => panic!("case uses an invalid path literal {path:?}: {e}"),
    }
}

/// One case's world: a fresh namespace and the clients opened in it.
pub struct CaseEnv<'f> {
    /// The fixture.
    pub fx: &'f dyn Fixture,
    /// The case name (for messages).
    pub case: &'static str,
    /// The namespace every client of this case lives in.
    pub namespace: String,
    clients: Vec<Arc<dyn Registry>>,
}

impl<'f> CaseEnv<'f> {
    /// A new namespace named after the case plus a random suffix.
    pub fn new(fx: &'f dyn Fixture, case: &'static str) -> Self {
        let suffix: u32 = rand::thread_rng().gen();
        CaseEnv {
            fx,
            case,
            namespace: format!("{case}_{suffix:08x}"),
            clients: Vec::new(),
        }
    }

    /// Opens another client (its own session) in this case's namespace.
    pub async fn client(&mut self) -> Arc<dyn Registry> {
        let client = self
            .fx
            .open(&self.namespace)
            .await
            .unwrap_or_else(|e| panic!("[{}::{}] open client: {e}", self.fx.name(), self.case));
        self.clients.push(client.clone());
        client
    }

    /// A message prefix naming backend and case.
    pub fn at(&self) -> String {
        format!("[{}::{}]", self.fx.name(), self.case)
    }

    /// Closes every client of the case.
    pub async fn finish(self) -> Outcome {
        for c in &self.clients {
            let _ = c.close().await;
        }
        Outcome::Passed
    }
}

/// The session id of a client that must have one.
pub fn session_of(client: &Arc<dyn Registry>) -> SessionId {
    client
        .session()
        .session_id
        .unwrap_or_else(|| panic!("client has no session: {:?}", client.session()))
}

/// The next item of a watch stream, within [`EVENT_WAIT`].
pub async fn next_event(stream: &mut WatchStream, what: &str) -> WatchEvent {
    match tokio::time::timeout(EVENT_WAIT, stream.next()).await {
        Err(_) => panic!("no watch event within {EVENT_WAIT:?} while waiting for {what}"),
        Ok(None) => panic!("watch stream ended while waiting for {what}"),
        Ok(Some(Err(e))) => panic!("watch stream error while waiting for {what}: {e}"),
        Ok(Some(Ok(event))) => event,
    }
}

/// Creates `paths` (64 at a time) with empty values in `mode`, panicking with `at` on a
/// failure. A create that timed out under load may have happened: `AlreadyExists` counts as
/// done, and retryable errors are tried again (5 attempts).
pub async fn create_all(
    client: &Arc<dyn Registry>,
    paths: impl Iterator<Item = NodePath>,
    mode: CreateMode,
    at: &str,
) {
    let mut creates = futures::stream::iter(paths)
        .map(|path| async move {
            for attempt in 0..5 {
                match client.create(&path, Bytes::new(), mode).await {
                    Ok(_) | Err(Error::AlreadyExists { .. }) => return Ok(()),
                    Err(e) if e.is_retryable() && attempt < 4 => {}
                    Err(e) => return Err((path, e)),
                }
            }
            Ok(())
        })
        .buffer_unordered(64);
    while let Some(created) = creates.next().await {
        if let Err((path, e)) = created {
            panic!("{at} create {path}: {e}");
        }
    }
}

/// Applies events to `state` until `done(state)` holds, within `bound`.
pub async fn apply_until(
    stream: &mut WatchStream,
    state: &mut WatchedState,
    bound: Duration,
    what: &str,
    mut done: impl FnMut(&WatchedState) -> bool,
) {
    let deadline = tokio::time::Instant::now() + bound;
    while !done(state) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Err(_) => panic!(
                "{what}: not reached within {bound:?}; state: {:?}",
                summary(state.nodes())
            ),
            Ok(None) => panic!("{what}: stream ended"),
            Ok(Some(Err(e))) => panic!("{what}: stream error {e}"),
            Ok(Some(Ok(event))) => state.apply(&event),
        }
    }
}

/// Polls `check` every 20 ms until it returns true, within `bound`.
pub async fn eventually<F, Fut>(bound: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("{what}: not true within {bound:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits up to `bound` for the next session status in `state` from `events`; whether it came
/// (false also when the stream ended first).
pub async fn session_reaches(
    events: &mut futures::stream::BoxStream<'static, registry_core::SessionStatus>,
    state: registry_core::SessionState,
    bound: Duration,
) -> bool {
    let reached = tokio::time::timeout(bound, async {
        while let Some(status) = events.next().await {
            if status.state == state {
                return true;
            }
        }
        false
    });
    matches!(reached.await, Ok(true))
}

/// Waits (up to 10 s) until `reader` lists `n` children of `dir`: contenders have queued.
pub async fn until_queued(reader: &Arc<dyn Registry>, dir: &NodePath, n: usize, what: &str) {
    eventually(Duration::from_secs(10), what, || {
        let reader = reader.clone();
        async move { reader.children(dir).await.is_ok_and(|c| c.nodes.len() == n) }
    })
    .await;
}

/// Waits until `reader` no longer sees `path`, within the fixture's expiry bound.
pub async fn wait_gone(fx: &dyn Fixture, at: &str, reader: &Arc<dyn Registry>, path: &NodePath) {
    eventually(fx.expiry_bound(), &format!("{at} {path} removed"), || {
        let (reader, path) = (reader.clone(), path.clone());
        async move { matches!(reader.exists(&path).await, Ok(false)) }
    })
    .await;
}

/// What two reads of a node must agree on (not modify_order, which some backends report
/// differently between reads and events).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeSummary {
    /// Path.
    pub path: String,
    /// Value.
    pub value: Bytes,
    /// Version.
    pub version: u64,
    /// Creation order.
    pub create_order: u64,
    /// Owner session.
    pub owner: Option<i64>,
}

/// Summaries of nodes, sorted by path.
pub fn summary<'a>(nodes: impl Iterator<Item = &'a Node>) -> Vec<NodeSummary> {
    let mut out: Vec<_> = nodes
        .map(|n| NodeSummary {
            path: n.path.to_string(),
            value: n.value.clone(),
            version: n.version,
            create_order: n.create_order,
            owner: n.ephemeral_owner.map(|s| s.0),
        })
        .collect();
    out.sort();
    out
}

/// Reads `root` and everything below it (root included if it exists), by walking children.
pub async fn read_subtree(client: &Arc<dyn Registry>, root: &NodePath) -> Result<Vec<Node>, Error> {
    let mut out = Vec::new();
    match client.get(root).await {
        Ok(node) => out.push(node),
        Err(Error::NotFound { .. }) => return Ok(out),
        Err(e) => return Err(e),
    }
    let mut pending = vec![root.clone()];
    while let Some(path) = pending.pop() {
        match client.children(&path).await {
            Ok(children) => {
                for child in children.nodes {
                    pending.push(child.path.clone());
                    out.push(child);
                }
            }
            Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The nodes a fresh read shows for a watch of `scope` on `root`.
pub async fn read_scope(
    client: &Arc<dyn Registry>,
    root: &NodePath,
    scope: registry_core::WatchScope,
) -> Result<Vec<Node>, Error> {
    use registry_core::WatchScope;
    match scope {
        WatchScope::Node => match client.get(root).await {
            Ok(n) => Ok(vec![n]),
            Err(Error::NotFound { .. }) => Ok(vec![]),
            Err(e) => Err(e),
        },
        WatchScope::Children => match client.children(root).await {
            Ok(c) => Ok(c.nodes),
            Err(Error::NotFound { .. }) => Ok(vec![]),
            Err(e) => Err(e),
        },
        WatchScope::Subtree => read_subtree(client, root).await,
    }
}

/// Differences between two summaries, for failure messages.
pub fn diff(expected: &[NodeSummary], found: &[NodeSummary]) -> String {
    let e: BTreeMap<_, _> = expected.iter().map(|n| (n.path.clone(), n)).collect();
    let f: BTreeMap<_, _> = found.iter().map(|n| (n.path.clone(), n)).collect();
    let mut out = Vec::new();
    for (path, n) in &e {
        match f.get(path) {
            None => out.push(format!("missing {path}")),
            Some(m) if m != n => out.push(format!("differs {path}: expected {n:?}, found {m:?}")),
            _ => {}
        }
    }
    for path in f.keys().filter(|p| !e.contains_key(*p)) {
        out.push(format!("extra {path}"));
    }
    out.join("\n")
}

/// Election under an outage: `candidates` campaign (re-campaigning after any failure, as a
/// service would) while `outage` runs (e.g. the server paused past the session timeout).
/// Asserts that at no sampled moment two candidates believe they lead, that every new
/// leader's fencing token is larger than the last, and that a leader exists again within
/// `recovery` after the outage. Returns how long the recovery took.
pub async fn election_survives_outage(
    candidates: Vec<Arc<dyn Registry>>,
    outage: impl Future<Output = ()>,
    recovery: Duration,
) -> Duration {
    use registry_core::recipes::{Election, Leadership};
    use std::sync::Mutex as StdMutex;

    let path = p("/election/outage");
    // No task outlives the longest a case may run, even if nobody aborts it.
    let deadline = tokio::time::Instant::now() + crate::CASE_TIMEOUT;
    let leaders: Arc<StdMutex<Vec<Option<Arc<Leadership>>>>> =
        Arc::new(StdMutex::new((0..candidates.len()).map(|_| None).collect()));
    let tokens: Arc<StdMutex<Vec<u64>>> = Arc::default();
    let mut tasks = Vec::new();
    for (i, client) in candidates.into_iter().enumerate() {
        let (leaders, tokens, path) = (leaders.clone(), tokens.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            let election = Election::new(client, path);
            while tokio::time::Instant::now() < deadline {
                let campaign = election.campaign(Bytes::from(i.to_string()));
                match tokio::time::timeout_at(deadline, campaign).await {
                    Ok(Ok(leadership)) => {
                        let leadership = Arc::new(leadership);
                        tokens
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(leadership.token());
                        leaders.lock().unwrap_or_else(|e| e.into_inner())[i] =
                            Some(leadership.clone());
                        // Hold until lost, then campaign again.
                        let _ = tokio::time::timeout_at(deadline, leadership.lost()).await;
                        leaders.lock().unwrap_or_else(|e| e.into_inner())[i] = None;
                    }
                    Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
                    Err(_) => return,
                }
            }
        }));
    }
    let count_leaders = |leaders: &StdMutex<Vec<Option<Arc<Leadership>>>>| {
        leaders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|l| l.as_ref().is_some_and(|l| l.is_leader()))
            .count()
    };
    eventually(Duration::from_secs(15), "a first leader", || async {
        count_leaders(&leaders) == 1
    })
    .await;
    let sampler = {
        let leaders = leaders.clone();
        tokio::spawn(async move {
            while tokio::time::Instant::now() < deadline {
                let n = count_leaders(&leaders);
                assert!(n <= 1, "{n} candidates believe they lead at once");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    outage.await;
    let resumed = tokio::time::Instant::now();
    eventually(recovery, "a leader after the outage", || async {
        count_leaders(&leaders) == 1
    })
    .await;
    let took = resumed.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    sampler.abort();
    if let Err(e) = sampler.await {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    for t in tasks {
        t.abort();
    }
    let tokens = tokens.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens not increasing: {tokens:?}"
    );
    took
}

/// Creates an ephemeral node through `owner`, then closes `owner` while its only route to the
/// server, `proxy`, is blackholed: the close must say `Unavailable` (the server could not be
/// told), release the client (`Closed` after, a second close `Ok`), and the node must then
/// go, as seen by `observer`, within `expiry` (the session's TTL with margin).
pub async fn close_while_unreachable(
    owner: &dyn Registry,
    proxy: &crate::harness::TcpProxy,
    observer: &dyn Registry,
    expiry: Duration,
) {
    let node = &p("/close/ephemeral");
    owner
        .create(node, Bytes::new(), CreateMode::Ephemeral)
        .await
        .unwrap_or_else(|e| panic!("create {node}: {e}"));
    proxy.blackhole();
    let closed = tokio::time::timeout(Duration::from_secs(10), owner.close())
        .await
        .unwrap_or_else(|_| panic!("close hung on an unreachable server"));
    assert!(
        matches!(closed, Err(Error::Unavailable { .. })),
        "close reported {closed:?} though the server could not be told"
    );
    assert!(matches!(owner.get(node).await, Err(Error::Closed)));
    assert!(owner.close().await.is_ok(), "a second close is not Ok");
    let started = std::time::Instant::now();
    while observer
        .exists(node)
        .await
        .unwrap_or_else(|e| panic!("exists {node}: {e}"))
    {
        assert!(
            started.elapsed() < expiry,
            "{node} outlived its session by more than {expiry:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `/usr/bin/etcdctl` (v3 API) against `endpoint`; its stdout. Fails the test, naming
/// the setup command, if etcdctl is missing, and with its stderr if it fails.
pub fn etcdctl(endpoint: &str, args: &[&str]) -> String {
    const ETCDCTL: &str = "/usr/bin/etcdctl";
    crate::harness::require_binary(std::path::Path::new(ETCDCTL), "etcdctl")
        .unwrap_or_else(|e| panic!("{e}"));
    let out = std::process::Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {ETCDCTL}: {e}"));
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts that copying `root` out of `source` fails, naming a child no path can name, and
/// writes nothing: a migration must not report success for a tree it did not see whole.
pub async fn assert_copy_refuses_unnamable(source: &dyn Registry, root: &str) {
    let root = NodePath::new(root).unwrap_or_else(|e| panic!("{e}"));
    let (copied, target) = copy_into_memory(source, root.as_str()).await;
    match copied {
        Err(registry_core::Error::Backend { message, .. }) => {
            assert!(message.contains("cannot name"), "{root}: {message}")
        }
        other => panic!("{root}: copy of a tree with an unnamable child: {other:?}"),
    }
    let written = target.exists(&root).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(!written, "{root}: the refused copy wrote it");
}

/// Asserts that `root`'s listing leaves out exactly one ephemeral child no path can name,
/// `name`, and that a copy of `root` goes past it, creating `created` nodes: an ephemeral
/// node is no migration's to copy.
pub async fn assert_copy_passes_unnamable_ephemeral(
    source: &dyn Registry,
    root: &str,
    name: String,
    created: usize,
) {
    let root_path = NodePath::new(root).unwrap_or_else(|e| panic!("{e}"));
    let listed = source
        .children(&root_path)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        listed.skipped,
        [registry_core::SkippedChild {
            name,
            ephemeral: true
        }]
    );
    let (copied, _) = copy_into_memory(source, root).await;
    let copied = copied.unwrap_or_else(|e| panic!("copy past an ephemeral unnamable child: {e}"));
    assert_eq!(copied.created, created, "{copied:?}");
}

/// Copies `root` out of `source` into a fresh in-memory registry: what the copy said, and
/// the registry it wrote to.
pub async fn copy_into_memory(
    source: &dyn Registry,
    root: &str,
) -> (
    registry_core::Result<registry_core::migrate::CopySummary>,
    registry_core::MemoryRegistry,
) {
    let root = NodePath::new(root).unwrap_or_else(|e| panic!("{e}"));
    let store = registry_core::MemoryStore::new();
    let target = registry_core::MemoryRegistry::connect(&store, Default::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let copied =
        registry_core::migrate::copy(source, &target, &root, Default::default(), |_, _| {}).await;
    (copied, target)
}
