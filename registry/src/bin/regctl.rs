//! `regctl`: operate a registry tree by hand, and move one between backends.
//!
//! The registry comes from `--url` or `REGISTRY_URL` (`etcd://`, `zk://`, `mem://`).
//! Exit codes: 0 success, 1 `diff` found differences, 2 bad input, 3 the registry failed (or
//! the output could not be written; a closed pipe ends the command quietly), 4 the node (or
//! tree) named is not there, 5 the registry refused a precondition (the node exists, is at
//! another version, has children, or is a live session's). So `get || create` creates only
//! what is missing, never what an outage hid.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use registry::migrate::{self, CopyOptions, CopySummary, Mirror, MirrorChange};
use registry::{
    connect, connect_url, Bytes, CreateMode, DeleteScope, Error, Expected, Node, NodePath,
    Registry, RegistryUrl, SessionState, WatchEvent, WatchOptions, WatchScope,
};

#[derive(Parser)]
#[command(
    name = "regctl",
    about = "Operate a service registry (etcd, ZooKeeper, memory)"
)]
struct Cli {
    /// Registry URL, e.g. etcd://127.0.0.1:2379 or zk://127.0.0.1:2181/chroot.
    #[arg(long, env = "REGISTRY_URL", hide_env_values = true, global = true)]
    url: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Scope {
    Node,
    Children,
    Subtree,
}

#[derive(Subcommand)]
enum Command {
    /// Direct children of a node, oldest first.
    Ls {
        /// The node whose children to list.
        path: String,
    },
    /// A node and everything below it, indented.
    Tree {
        /// The subtree's root.
        path: String,
    },
    /// A node's value.
    Get {
        /// The node to read.
        path: String,
    },
    /// A node's metadata.
    Stat {
        /// The node to read.
        path: String,
    },
    /// Writes a value, creating the node (persistent) if it is missing.
    #[command(alias = "set")]
    Put {
        /// The node to write.
        path: String,
        /// The new value (UTF-8 text); without it, standard input is read whole (any bytes,
        /// as `etcdctl put` does).
        value: Option<String>,
        /// Write only if the node is at this version.
        #[arg(long)]
        version: Option<u64>,
    },
    /// Creates a node.
    Create {
        /// The node to create (with --sequential, the name's prefix).
        path: String,
        /// Its value (UTF-8 text).
        #[arg(default_value = "")]
        value: String,
        /// Owned by this command's session, so it lives only while the command runs: needs
        /// --hold (without it the node would be gone when the command reports it created).
        #[arg(long, requires = "hold")]
        ephemeral: bool,
        /// Appends a 10-digit counter to the name.
        #[arg(long)]
        sequential: bool,
        /// Keep running (and an ephemeral alive) until Ctrl-C or SIGTERM; exits 3 if the
        /// session ends first, as the ephemeral node went with it.
        #[arg(long)]
        hold: bool,
    },
    /// Deletes a node.
    Rm {
        /// The node to delete.
        path: String,
        /// With everything below it.
        #[arg(short, long)]
        recursive: bool,
    },
    /// Prints the snapshot, then one line per event, until Ctrl-C or SIGTERM. Values are quoted with
    /// escapes (non-UTF-8 ones as 0x-hex), so each event is exactly one line.
    Watch {
        /// The node watched (and, by scope, what is below it).
        path: String,
        #[arg(long, value_enum, default_value_t = Scope::Subtree)]
        scope: Scope,
    },
    /// Lists persistent nodes missing, extra or different in --to compared with --from.
    Diff {
        /// The registry URL taken as the truth.
        #[arg(long)]
        from: String,
        /// The registry URL compared with it.
        #[arg(long)]
        to: String,
        /// The subtree's root.
        path: String,
    },
    /// Writes the persistent nodes of a subtree as JSON (values base64 when not UTF-8).
    Export {
        /// The subtree's root.
        path: String,
        /// The file to write; without it (or `-`) the JSON goes to standard output and the
        /// summary to standard error, so `export | import` works.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
    },
    /// Creates or updates the nodes of an exported JSON document; idempotent (equal nodes are
    /// not written again).
    Import {
        /// The file to read; without it (or `-`), standard input.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
    },
    /// Copies persistent nodes (ephemerals belong to their owners) from --from to --to;
    /// idempotent, so re-running after an interruption finishes the job.
    Copy {
        /// The registry URL to copy from.
        #[arg(long)]
        from: String,
        /// The registry URL to copy to.
        #[arg(long)]
        to: String,
        /// The subtree's root.
        path: String,
        /// Report what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Makes --to equal to --from under PATH (persistent nodes only in --to are deleted),
    /// then applies every change of --from to --to until Ctrl-C or SIGTERM (exit 3 if not in
    /// sync then); starts over (full sync) whenever either side fails or restarts. Refuses
    /// to delete anything while PATH is missing in --from, and to start when --to has
    /// persistent nodes --from lacks, unless --prune (swapped URLs would empty the source).
    Mirror {
        /// The registry URL to follow.
        #[arg(long)]
        from: String,
        /// The registry URL kept equal to it.
        #[arg(long)]
        to: String,
        /// The subtree's root.
        path: String,
        /// Let the first sync delete the persistent nodes that only --to has.
        #[arg(long)]
        prune: bool,
    },
}

enum Failure {
    Input(String),
    Registry(Error),
    /// The registry failed, told in the command's terms.
    Refused(String),
    /// A precondition failed (as [`Failure::Registry`] with such an error), told in the
    /// command's terms.
    Precondition(String),
    /// The trees differ: `diff` listed the differences on stdout, or a mirror stopped with
    /// paths it could not copy (the message says which).
    Differences(Option<String>),
    /// Stdout could not be written: a script would otherwise get exit 0 and no output.
    Output(std::io::Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidPath { .. } | Error::InvalidArgument(_) | Error::ValueTooLarge { .. } => {
                Failure::Input(e.to_string())
            }
            other => Failure::Registry(other),
        }
    }
}

/// `path`, unless it is the root, which no backend lets `operation` touch: refused before
/// connecting, as any bad input.
fn not_root(path: NodePath, operation: &str) -> Result<NodePath, Failure> {
    if path.is_root() {
        return Err(Error::root(operation).into());
    }
    Ok(path)
}

fn say(line: impl std::fmt::Display) -> Result<(), Failure> {
    writeln!(std::io::stdout(), "{line}").map_err(Failure::Output)
}

/// A `--file` that names a file; none, or `-`, means standard input or output.
fn named(file: Option<std::path::PathBuf>) -> Option<std::path::PathBuf> {
    file.filter(|f| f.as_os_str() != "-")
}

fn path(raw: &str) -> Result<NodePath, Failure> {
    NodePath::new(raw).map_err(Failure::from)
}

/// A value on one line of text, read one way only: UTF-8 quoted with escapes (a newline in
/// it cannot start a line of its own), anything else `0x` and hex (watch lines; `get` prints
/// the bytes themselves).
fn value_text(value: &Bytes) -> String {
    match std::str::from_utf8(value) {
        Ok(s) => format!("{s:?}"),
        Err(_) => format!(
            "0x{}",
            value.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    }
}

/// A path in a line of words: quoted with escapes when it holds white space or control
/// characters, as is otherwise.
fn path_text(path: &NodePath) -> String {
    let plain = !path
        .as_str()
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '"');
    if plain {
        path.to_string()
    } else {
        format!("{:?}", path.as_str())
    }
}

/// The paths of a snapshot's nodes, as `path_text` words on one line.
fn paths_text(nodes: &[Node]) -> String {
    nodes
        .iter()
        .map(|n| path_text(&n.path))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A value's JSON field as `export` writes it: `value` when UTF-8, else `value_base64`.
fn value_field(value: &Bytes) -> (&'static str, serde_json::Value) {
    use base64::Engine;
    match std::str::from_utf8(value) {
        Ok(text) => ("value", text.into()),
        Err(_) => (
            "value_base64",
            base64::engine::general_purpose::STANDARD
                .encode(value)
                .into(),
        ),
    }
}

fn node_json(n: &Node) -> serde_json::Value {
    let (key, value) = value_field(&n.value);
    serde_json::json!({
        "path": n.path.as_str(),
        key: value,
        "utf8": std::str::from_utf8(&n.value).is_ok(),
        "version": n.version,
        "create_order": n.create_order,
        "modify_order": n.modify_order,
        "ephemeral_owner": n.ephemeral_owner.map(|s| s.0),
    })
}

fn watch_json(event: &WatchEvent) -> serde_json::Value {
    let nodes = |s: &registry::Snapshot| -> Vec<serde_json::Value> {
        s.nodes.iter().map(node_json).collect()
    };
    match event {
        WatchEvent::Snapshot(s) => {
            serde_json::json!({"event": "snapshot", "revision": s.revision.0, "nodes": nodes(s)})
        }
        WatchEvent::Resync { snapshot, reason } => serde_json::json!({
            "event": "resync",
            "reason": format!("{reason:?}"),
            "revision": snapshot.revision.0,
            "nodes": nodes(snapshot),
        }),
        WatchEvent::Created(n) => serde_json::json!({"event": "created", "node": node_json(n)}),
        WatchEvent::Updated(n) => serde_json::json!({"event": "updated", "node": node_json(n)}),
        WatchEvent::Deleted(n) => serde_json::json!({"event": "deleted", "node": node_json(n)}),
    }
}

async fn open(url: &Option<String>) -> Result<Arc<dyn Registry>, Failure> {
    let url = url
        .as_deref()
        .ok_or_else(|| Failure::Input("no registry: pass --url or set REGISTRY_URL".into()))?;
    Ok(connect(url).await?)
}

/// Connects to both sides of a two-registry command, parsing both URLs first (a typo in one
/// must not cost a connection to the other); a failure to connect says which side failed.
/// A command that writes `--to` from `--from` under `writes` is refused when the two trees
/// may be one, or one inside the other (see [`may_overlap`]).
async fn connect_both(
    from: &str,
    to: &str,
    writes: Option<&NodePath>,
) -> Result<(Arc<dyn Registry>, Arc<dyn Registry>), Failure> {
    let (from, to) = (RegistryUrl::parse(from)?, RegistryUrl::parse(to)?);
    if let Some(root) = writes {
        if may_overlap(&from, &to, root) {
            return Err(Failure::Input(format!(
                "--from {from} and --to {to} may hold the same nodes under {root} (same \
                 registry, and one tree inside the other): writing one from the other would \
                 feed on its own writes, or delete the source"
            )));
        }
    }
    // The URLs' `Display` leaves their passwords out.
    let failed = |side: &str, url: &RegistryUrl, error: Error| {
        Failure::Refused(format!("{side} {url}: {}", with_root_cause(&error)))
    };
    let source = connect_url(&from)
        .await
        .map_err(|e| failed("source", &from, e))?;
    match connect_url(&to).await {
        Ok(target) => Ok((source, target)),
        Err(error) => {
            let _ = source.close().await;
            Err(failed("target", &to, error))
        }
    }
}

/// Whether the subtrees at `root` of two registry URLs may share nodes: the same backend,
/// a shared endpoint (as written: names are not resolved) or the same named memory store,
/// and one tree's full path (namespace or chroot, then `root`) at or below the other's.
fn may_overlap(from: &RegistryUrl, to: &RegistryUrl, root: &NodePath) -> bool {
    let same_registry = from.kind == to.kind
        && match (&from.memory_name, &to.memory_name) {
            (Some(a), Some(b)) => a == b,
            _ => from.endpoints.iter().any(|e| to.endpoints.contains(e)),
        };
    if !same_registry {
        return false;
    }
    let full = |url: &RegistryUrl| -> String {
        let namespace = url.namespace.as_ref().map_or("", |n| n.as_str());
        let namespace = namespace.trim_end_matches('/');
        if root.is_root() {
            format!("{namespace}/")
        } else {
            format!("{namespace}{root}/")
        }
    };
    let (a, b) = (full(from), full(to));
    a.starts_with(&b) || b.starts_with(&a)
}

/// A value from standard input, read whole but no further than one byte over the limit
/// (which `check_value` then refuses).
fn read_value() -> Result<Bytes, Failure> {
    use std::io::Read;
    let mut value = Vec::new();
    std::io::stdin()
        .take(registry::MAX_VALUE_LEN as u64 + 1)
        .read_to_end(&mut value)
        .map_err(|e| Failure::Input(format!("reading the value from standard input: {e}")))?;
    Ok(Bytes::from(value))
}

/// Resolves at the first SIGINT (Ctrl-C) or SIGTERM (`kill`, systemd, `timeout`), so a
/// command holding an ephemeral node or a mirror closes its clients either way.
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn mirror_text(change: &MirrorChange) -> String {
    match change {
        MirrorChange::Synced {
            nodes,
            written,
            deleted,
            held,
            kept,
            too_large,
        } => format!(
            "synced {nodes} nodes ({written} written, {deleted} deleted, {held} held by live sessions, {kept} kept for live instances below, {too_large} too large)"
        ),
        MirrorChange::Put(p) => format!("put {p}"),
        MirrorChange::Deleted(p) => format!("deleted {p}"),
        MirrorChange::Kept(p) => format!("kept {p} (live instances below it)"),
        MirrorChange::Held(p) => format!("held {p} (a live session's ephemeral node in the target)"),
        MirrorChange::TooLarge(p) => format!(
            "too large {p} (a value over {} bytes, not written)",
            registry::MAX_VALUE_LEN
        ),
        MirrorChange::Retrying { error, after } => {
            format!("retrying in {} ms: {error}", after.as_millis())
        }
    }
}

fn mirror_json(change: &MirrorChange) -> serde_json::Value {
    match change {
        MirrorChange::Synced {
            nodes,
            written,
            deleted,
            held,
            kept,
            too_large,
        } => {
            serde_json::json!({"event": "synced", "nodes": nodes, "written": written, "deleted": deleted, "held": held, "kept": kept, "too_large": too_large})
        }
        MirrorChange::Put(p) => serde_json::json!({"event": "put", "path": p.as_str()}),
        MirrorChange::Deleted(p) => serde_json::json!({"event": "deleted", "path": p.as_str()}),
        MirrorChange::Kept(p) => serde_json::json!({"event": "kept", "path": p.as_str()}),
        MirrorChange::Held(p) => serde_json::json!({"event": "held", "path": p.as_str()}),
        MirrorChange::TooLarge(p) => serde_json::json!({"event": "too_large", "path": p.as_str()}),
        MirrorChange::Retrying { error, after } => {
            serde_json::json!({"event": "retrying", "error": error, "after_ms": after.as_millis() as u64})
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let json = cli.output == Output::Json;
    match cli.command {
        Command::Ls { path: p } => {
            let target = path(&p)?;
            let reg = open(&cli.url).await?;
            let children = reg.children(&target).await?;
            if json {
                say(serde_json::Value::Array(
                    children.nodes.iter().map(node_json).collect(),
                ))?;
            } else {
                for n in &children.nodes {
                    say(n.path.name())?;
                }
            }
            // Not on stdout, which lists what commands can address; but never silent.
            for child in &children.skipped {
                complain(format_args!(
                    "{target} also has a{} child no path here can name: {:?}",
                    if child.ephemeral { "n ephemeral" } else { "" },
                    child.name
                ));
            }
        }
        Command::Tree { path: p } => {
            let root = path(&p)?;
            let reg = open(&cli.url).await?;
            let mut pending = vec![(root.clone(), 0usize)];
            let mut all = Vec::new();
            while let Some((node, depth)) = pending.pop() {
                // Read before printing: a missing root prints nothing, and a node deleted
                // since its parent was listed (an instance going away) is skipped.
                let children = match reg.children(&node).await {
                    Ok(children) => children,
                    Err(Error::NotFound { .. }) if depth > 0 => continue,
                    Err(error) => return Err(error.into()),
                };
                all.push(serde_json::json!({"path": node.as_str(), "depth": depth}));
                if !json {
                    say(format!(
                        "{}{}",
                        "  ".repeat(depth),
                        if depth == 0 {
                            node.as_str()
                        } else {
                            node.name()
                        }
                    ))?;
                }
                pending.extend(
                    children
                        .nodes
                        .into_iter()
                        .rev()
                        .map(|n| (n.path, depth + 1)),
                );
            }
            if json {
                say(serde_json::Value::Array(all))?;
            }
        }
        Command::Get { path: p } => {
            let target = path(&p)?;
            let reg = open(&cli.url).await?;
            let n = reg.get(&target).await?;
            if json {
                say(node_json(&n))?;
            } else {
                // The bytes as stored (as `etcdctl get --print-value-only` prints them), so
                // `regctl get P > file` keeps a binary value intact.
                let mut out = std::io::stdout().lock();
                out.write_all(&n.value)
                    .and_then(|()| out.write_all(b"\n"))
                    .map_err(Failure::Output)?;
            }
        }
        Command::Stat { path: p } => {
            let target = path(&p)?;
            let reg = open(&cli.url).await?;
            let n = reg.get(&target).await?;
            if json {
                say(node_json(&n))?;
            } else {
                say(format!("path {}\nversion {}\ncreate_order {}\nmodify_order {}\nephemeral_owner {}\nlength {}", n.path, n.version, n.create_order, n.modify_order, n.ephemeral_owner.map(|s| s.to_string()).unwrap_or_else(|| "-".into()), n.value.len()))?;
            }
        }
        Command::Put {
            path: p,
            value,
            version,
        } => {
            let target = not_root(path(&p)?, "write")?;
            let value = match value {
                Some(text) => Bytes::from(text),
                None => read_value()?,
            };
            registry::check_value(&target, &value)?;
            let reg = open(&cli.url).await?;
            let expected = version.map_or(Expected::Any, Expected::Version);
            let written = match reg.set(&target, value.clone(), expected).await {
                Err(Error::NotFound { .. }) if version.is_none() => {
                    reg.create(&target, value, CreateMode::Persistent).await?
                }
                other => other?,
            };
            say(if json {
                node_json(&written).to_string()
            } else {
                format!("{} version {}", written.path, written.version)
            })?;
        }
        Command::Create {
            path: p,
            value,
            ephemeral,
            sequential,
            hold,
        } => {
            let target = not_root(path(&p)?, "create")?;
            registry::check_value(&target, value.as_bytes())?;
            let reg = open(&cli.url).await?;
            let mode = match (ephemeral, sequential) {
                (false, false) => CreateMode::Persistent,
                (true, false) => CreateMode::Ephemeral,
                (false, true) => CreateMode::PersistentSequential,
                (true, true) => CreateMode::EphemeralSequential,
            };
            let n = reg.create(&target, Bytes::from(value), mode).await?;
            let shown = say(if json {
                node_json(&n).to_string()
            } else {
                n.path.to_string()
            });
            let mut lost = None;
            if hold && shown.is_ok() {
                // An ephemeral node goes with its session: holding on after that would
                // tell the operator it is still there. A persistent one stays either way.
                let mut sessions = reg.session_events();
                let owner = n.ephemeral_owner;
                let session_ended = async {
                    // Bounded by the session: it ends in `Lost` or `Closed`, or (missed while
                    // the node was printed) is already another one.
                    while let Some(status) = sessions.next().await {
                        let ended =
                            matches!(status.state, SessionState::Lost | SessionState::Closed)
                                || (status.state.is_live() && status.session_id != owner);
                        if ended {
                            return status.state;
                        }
                    }
                    SessionState::Closed
                };
                let session_ended = async {
                    match owner {
                        Some(_) => session_ended.await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = interrupted() => {}
                    state = session_ended => lost = Some(state),
                }
            }
            // Closed even when the output failed, so an ephemeral goes now, not after its TTL.
            let closed = reg.close().await;
            shown?;
            if let Some(state) = lost {
                return Err(Failure::Refused(format!(
                    "the session holding {} ended ({state:?}); the node is gone with it",
                    n.path
                )));
            }
            closed?;
        }
        Command::Rm { path: p, recursive } => {
            let target = not_root(path(&p)?, "delete")?;
            let reg = open(&cli.url).await?;
            let scope = if recursive {
                DeleteScope::Recursive
            } else {
                DeleteScope::Node
            };
            match reg.delete(&target, Expected::Any, scope).await {
                Err(error @ Error::NotEmpty { .. }) => {
                    return Err(Failure::Precondition(format!("{error} (`rm -r`)")));
                }
                other => other?,
            }
        }
        Command::Watch { path: p, scope } => {
            let target = path(&p)?;
            let reg = open(&cli.url).await?;
            let scope = match scope {
                Scope::Node => WatchScope::Node,
                Scope::Children => WatchScope::Children,
                Scope::Subtree => WatchScope::Subtree,
            };
            let mut stream = reg.watch(&target, WatchOptions::scoped(scope)).await?;
            // One future for the whole loop: a new one per item could miss a Ctrl-C that
            // arrives between two of them.
            let interrupted = interrupted();
            tokio::pin!(interrupted);
            loop {
                let item = tokio::select! {
                    item = stream.next() => item,
                    _ = &mut interrupted => break,
                };
                let Some(item) = item else { break };
                let item = item?;
                if json {
                    say(watch_json(&item))?;
                    continue;
                }
                let line = match item {
                    WatchEvent::Snapshot(s) => format!("snapshot {}", paths_text(&s.nodes)),
                    WatchEvent::Created(n) => {
                        format!("created {} {}", path_text(&n.path), value_text(&n.value))
                    }
                    WatchEvent::Updated(n) => {
                        format!("updated {} {}", path_text(&n.path), value_text(&n.value))
                    }
                    WatchEvent::Deleted(n) => format!("deleted {}", path_text(&n.path)),
                    // The whole new state, as a snapshot line: a reader must replace what it had.
                    WatchEvent::Resync { snapshot, reason } => {
                        format!("resync {reason:?} {}", paths_text(&snapshot.nodes))
                    }
                };
                say(line)?;
            }
        }
        Command::Diff { from, to, path: p } => {
            let root = path(&p)?;
            let (src, dst) = connect_both(&from, &to, None).await?;
            let differences = migrate::diff(&*src, &*dst, &root).await?;
            if json {
                // One document, also when empty, as every non-streaming command prints.
                let list: Vec<serde_json::Value> = differences
                    .iter()
                    .map(|d| serde_json::json!({"kind": d.kind.as_str(), "path": d.path.as_str()}))
                    .collect();
                say(serde_json::json!({"differences": list}))?;
            } else {
                for d in &differences {
                    say(format!("{} {}", d.kind.as_str(), d.path))?;
                }
            }
            if !differences.is_empty() {
                return Err(Failure::Differences(None));
            }
        }
        Command::Export { path: p, file } => {
            let root = path(&p)?;
            let reg = open(&cli.url).await?;
            let nodes = migrate::persistent_tree(&*reg, &root).await?;
            // A mistyped path would otherwise export an empty document, successfully.
            if nodes.is_empty() && !root.is_root() && !reg.exists(&root).await? {
                return Err(Error::NotFound { path: root }.into());
            }
            let list: Vec<serde_json::Value> = nodes
                .values()
                .map(|n| {
                    let (key, value) = value_field(&n.value);
                    serde_json::json!({"path": n.path.as_str(), key: value})
                })
                .collect();
            let document = serde_json::json!({"root": root.as_str(), "nodes": list});
            let text = serde_json::to_string_pretty(&document)
                .map_err(|e| Failure::Input(e.to_string()))?;
            match named(file) {
                Some(file) => {
                    std::fs::write(&file, text).map_err(|e| {
                        Failure::Output(std::io::Error::new(
                            e.kind(),
                            format!("{}: {e}", file.display()),
                        ))
                    })?;
                    say(if json {
                        serde_json::json!({"exported": nodes.len(), "file": file.display().to_string()})
                            .to_string()
                    } else {
                        format!("exported {} nodes to {}", nodes.len(), file.display())
                    })?;
                }
                // The document is the output; the summary must not mix into it.
                None => {
                    say(text)?;
                    complain(format_args!("exported {} nodes", nodes.len()));
                }
            }
        }
        Command::Import { file } => {
            use base64::Engine;
            let (source, text) = match named(file) {
                Some(file) => {
                    let source = file.display().to_string();
                    let text = std::fs::read_to_string(&file)
                        .map_err(|e| Failure::Input(format!("{source}: {e}")))?;
                    (source, text)
                }
                None => {
                    // A terminal would wait, silent, for a document typed by hand.
                    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                        return Err(Failure::Input(
                            "import reads an exported document: pass --file, or pipe one in".into(),
                        ));
                    }
                    let mut text = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                        .map_err(|e| Failure::Input(format!("standard input: {e}")))?;
                    ("standard input".to_owned(), text)
                }
            };
            let document: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Failure::Input(format!("{source}: {e}")))?;
            let entries = document["nodes"]
                .as_array()
                .ok_or_else(|| Failure::Input(format!("{source}: no \"nodes\" array")))?;
            // Validate everything before writing anything.
            let mut nodes = BTreeMap::new();
            for (i, entry) in entries.iter().enumerate() {
                let raw = entry["path"]
                    .as_str()
                    .ok_or_else(|| Failure::Input(format!("node {i}: no path")))?;
                let value = match (entry["value"].as_str(), entry["value_base64"].as_str()) {
                    (Some(text), None) => Bytes::from(text.to_owned()),
                    (None, Some(b64)) => Bytes::from(
                        base64::engine::general_purpose::STANDARD
                            .decode(b64)
                            .map_err(|e| {
                                Failure::Input(format!("node {i} ({raw}): bad base64: {e}"))
                            })?,
                    ),
                    _ => {
                        return Err(Failure::Input(format!(
                            "node {i} ({raw}): needs exactly one of value, value_base64"
                        )))
                    }
                };
                let target = not_root(path(raw)?, "write")?;
                registry::check_value(&target, &value)?;
                if nodes.insert(target, value).is_some() {
                    // Which of the two was meant cannot be told: the last would silently win.
                    return Err(Failure::Input(format!(
                        "node {i} ({raw}): the document holds this path twice"
                    )));
                }
            }
            let reg = open(&cli.url).await?;
            // Every target read first, with the parents the import would create under: a path
            // held as a live session's ephemeral node (whose value would go with that
            // session, and which can have no children) refuses the import before anything is
            // written.
            let parents: std::collections::BTreeSet<NodePath> = nodes
                .keys()
                .flat_map(|p| p.ancestors())
                .filter(|a| !a.is_root() && !nodes.contains_key(a))
                .collect();
            let mut seen = BTreeMap::new();
            for p in nodes.keys().chain(&parents) {
                let found = match reg.get(p).await {
                    Ok(node) if node.is_ephemeral() => {
                        complain(format_args!(
                            "the target holds {p} as a live session's ephemeral node; import writes persistent nodes only and wrote nothing"
                        ));
                        return Err(Error::AlreadyExists { path: p.clone() }.into());
                    }
                    Ok(node) => Some(node),
                    Err(Error::NotFound { .. }) => None,
                    Err(e) => return Err(e.into()),
                };
                seen.insert(p.clone(), found);
            }
            let (mut created, mut updated, mut unchanged) = (0, 0, 0);
            for (p, value) in &nodes {
                let found = seen.get(p).and_then(Option::as_ref);
                // An equal node is not written again: no version bump, no event to watchers.
                if found.is_some_and(|n| n.value == *value) {
                    unchanged += 1;
                    continue;
                }
                let version = found.map(|n| n.version);
                migrate::put_persistent(&*reg, p, value.clone(), Some(version)).await?;
                if version.is_some() {
                    updated += 1;
                } else {
                    created += 1;
                }
            }
            say(if json {
                serde_json::json!({"created": created, "updated": updated, "unchanged": unchanged})
                    .to_string()
            } else {
                format!("imported: {created} created, {updated} updated, {unchanged} unchanged")
            })?;
        }
        Command::Copy {
            from,
            to,
            path: p,
            dry_run,
        } => {
            let root = path(&p)?;
            let (src, dst) = connect_both(&from, &to, Some(&root)).await?;
            let bar = if json {
                ProgressBar::hidden()
            } else {
                // Draws only when stderr is a terminal, so scripts see the summary alone.
                ProgressBar::new(0).with_style(
                    ProgressStyle::with_template("{bar:40} {pos}/{len} nodes {elapsed}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                )
            };
            let options = CopyOptions { dry_run };
            let CopySummary {
                created,
                updated,
                unchanged,
                gone,
            } = migrate::copy(&*src, &*dst, &root, options, |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            })
            .await
            .map_err(|error| match error {
                Error::AlreadyExists { path } => Failure::Precondition(format!(
                    "the target holds {path} as a live session's ephemeral node; copy writes persistent nodes only and wrote nothing"
                )),
                // The source's value, not the operator's input: refused, and nothing written.
                Error::ValueTooLarge { .. } => {
                    Failure::Refused(format!("{error}; copy wrote nothing"))
                }
                other => other.into(),
            })?;
            bar.finish_and_clear();
            let mut summary = format!(
                "{} {created} created, {updated} updated, {unchanged} unchanged",
                if dry_run { "would copy:" } else { "copied:" }
            );
            if gone > 0 {
                summary.push_str(&format!(", {gone} gone from the source meanwhile"));
            }
            let shown = say(if json {
                serde_json::json!({"dry_run": dry_run, "created": created, "updated": updated, "unchanged": unchanged, "gone": gone}).to_string()
            } else {
                summary
            });
            let _ = (src.close().await, dst.close().await);
            shown?;
        }
        Command::Mirror {
            from,
            to,
            path: p,
            prune,
        } => {
            let root = path(&p)?;
            let (src, dst) = connect_both(&from, &to, Some(&root)).await?;
            if !prune {
                if let Err(refusal) = refuse_pruning(&*src, &*dst, &root).await {
                    let _ = (src.close().await, dst.close().await);
                    return Err(refusal);
                }
            }
            // The log is the operator's only view of the mirror: once it cannot be written
            // (`| head` went away), the mirror stops rather than run unseen.
            let (unwritable, mut output_failed) = tokio::sync::mpsc::unbounded_channel();
            let mirror =
                Mirror::start_with_observer(src.clone(), dst.clone(), root, move |change| {
                    let line = if json {
                        mirror_json(&change).to_string()
                    } else {
                        mirror_text(&change)
                    };
                    if let Err(Failure::Output(error)) = say(line) {
                        let _ = unwritable.send(error);
                    }
                });
            let output_error = tokio::select! {
                _ = interrupted() => None,
                error = output_failed.recv() => error,
            };
            let status = mirror.stop().await;
            if let Some(error) = output_error {
                let _ = (src.close().await, dst.close().await);
                return Err(Failure::Output(error));
            }
            let shown = say(if json {
                serde_json::json!({
                    "event": "stopped", "synced": status.synced, "applied": status.applied,
                    "syncs": status.syncs, "held": status.held, "kept": status.kept,
                    "too_large": status.too_large, "last_error": status.last_error,
                })
                .to_string()
            } else {
                format!(
                    "mirror stopped {}: {} changes applied, {} full syncs, {} held, {} kept, {} too large",
                    if status.synced { "in sync" } else { "out of sync" },
                    status.applied,
                    status.syncs,
                    status.held,
                    status.kept,
                    status.too_large
                )
            });
            let _ = (src.close().await, dst.close().await);
            shown?;
            // A script must not take a mirror that never caught up for a finished one.
            if !status.synced {
                return Err(Failure::Refused(match status.last_error {
                    Some(error) => format!("the mirror was not in sync when stopped: {error}"),
                    None => "the mirror was not in sync when stopped".to_owned(),
                }));
            }
            // In sync but for these: the target still differs, which a script checking the
            // exit code alone must not miss.
            if status.held + status.kept + status.too_large > 0 {
                return Err(Failure::Differences(Some(format!(
                    "the mirror stopped with paths it could not copy: {} held by live \
                     sessions, {} kept for live instances below, {} too large; `regctl diff` \
                     lists them",
                    status.held, status.kept, status.too_large
                ))));
            }
        }
    }
    Ok(())
}

/// Refuses a mirror whose first sync would delete persistent nodes only `dst` has under
/// `root`, as `etcdctl make-mirror` never deletes what the destination already held: more
/// likely swapped URLs than a wish. With `root` missing in `src` every node `dst` has there
/// counts: the mirror waits for the root, and its first sync once the root appears (a
/// provider registering through a `DualRegistry` makes it) would delete them.
async fn refuse_pruning(
    src: &dyn Registry,
    dst: &dyn Registry,
    root: &NodePath,
) -> Result<(), Failure> {
    let extra: Vec<NodePath> = if src.exists(root).await? {
        migrate::diff(src, dst, root)
            .await?
            .into_iter()
            .filter(|d| d.kind == migrate::DifferenceKind::Extra)
            .map(|d| d.path)
            .collect()
    } else {
        migrate::persistent_tree(dst, root)
            .await?
            .into_keys()
            .collect()
    };
    if extra.is_empty() {
        return Ok(());
    }
    let first: Vec<String> = extra.iter().take(3).map(path_text).collect();
    Err(Failure::Precondition(format!(
        "--to has {} persistent node(s) under {root} that --from lacks (first: {}); the \
         mirror would delete them. Check that --from and --to are not swapped, and pass \
         --prune to delete them",
        extra.len(),
        first.join(" ")
    )))
}

/// The error and its root cause ("Connection refused" is what an operator needs; the
/// layers between say nothing more), unless its message already says it.
fn with_root_cause(error: &Error) -> String {
    let text = error.to_string();
    let mut root = None;
    let mut cause = std::error::Error::source(error);
    // Bounded: a chain is short, but nothing guarantees it ends.
    for _ in 0..16 {
        let Some(next) = cause else { break };
        root = Some(next.to_string());
        cause = next.source();
    }
    match root {
        Some(root) if !root.is_empty() && !text.contains(&root) => format!("{text}: {root}"),
        _ => text,
    }
}

/// The exit code of a registry error: 4 for a missing node, 5 for a failed precondition, 3
/// for the rest (the registry failed or could not be reached), so a script can tell "not
/// there" from "could not look".
fn registry_exit_code(error: &Error) -> u8 {
    match error {
        Error::NotFound { .. } => 4,
        Error::AlreadyExists { .. }
        | Error::VersionMismatch { .. }
        | Error::NotEmpty { .. }
        | Error::EphemeralParent { .. } => 5,
        _ => 3,
    }
}

/// `eprintln!` would panic if stderr is gone.
fn complain(message: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr(), "regctl: {message}");
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Differences(message)) => {
            if let Some(message) = message {
                complain(message);
            }
            ExitCode::from(1)
        }
        Err(Failure::Input(message)) => {
            complain(message);
            ExitCode::from(2)
        }
        Err(Failure::Registry(error)) => {
            complain(with_root_cause(&error));
            ExitCode::from(registry_exit_code(&error))
        }
        Err(Failure::Refused(message)) => {
            complain(message);
            ExitCode::from(3)
        }
        Err(Failure::Precondition(message)) => {
            complain(message);
            ExitCode::from(5)
        }
        Err(Failure::Output(error)) => {
            // A reader that went away (`| head`) needs no message.
            if error.kind() != std::io::ErrorKind::BrokenPipe {
                complain(format!("writing the output: {error}"));
            }
            ExitCode::from(3)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_lines_hold_one_event_each_and_read_one_way() {
        // A value cannot forge a line of its own, nor pass for another.
        assert_eq!(
            value_text(&Bytes::from("v1\ndeleted /x/a")),
            r#""v1\ndeleted /x/a""#
        );
        assert_eq!(value_text(&Bytes::from("ff")), r#""ff""#);
        assert_eq!(value_text(&Bytes::from_static(&[0xff])), "0xff");
        let spaced = NodePath::new("/a b").unwrap();
        assert_eq!(path_text(&spaced), r#""/a b""#);
        let plain = NodePath::new("/soa/10.0.0.1:9090").unwrap();
        assert_eq!(path_text(&plain), "/soa/10.0.0.1:9090");
    }
}
