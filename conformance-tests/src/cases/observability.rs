//! Cases on what an operator sees: the tracing spans of operations.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use registry_core::{Bytes, CreateMode, DeleteScope, Expected, RegisterOptions, WatchOptions};
use tracing::instrument::WithSubscriber;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::{Interest, Subscriber};
use tracing::{Event, Metadata};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

use crate::fixture::Fixture;
use crate::support::{p, CaseEnv, Outcome};

/// The operations whose spans the contract names.
const TRACED: [&str; 11] = [
    "create",
    "get",
    "exists",
    "set",
    "set_owned",
    "delete",
    "delete_owned",
    "children",
    "watch",
    "register",
    "close",
];

/// A span as it was opened.
#[derive(Clone, Debug)]
struct SeenSpan {
    name: String,
    level: tracing::Level,
    /// The `path` field, if any.
    path: Option<String>,
}

type Seen = Arc<Mutex<Vec<SeenSpan>>>;

/// Records every new span.
struct SpanRecorder(Seen);

struct PathField(Option<String>);

impl tracing::field::Visit for PathField {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "path" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl<S: Subscriber> Layer<S> for SpanRecorder {
    fn on_new_span(&self, attrs: &Attributes<'_>, _id: &Id, _ctx: Context<'_, S>) {
        let mut path = PathField(None);
        attrs.record(&mut path);
        let meta = attrs.metadata();
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(SeenSpan {
                name: meta.name().to_owned(),
                level: *meta.level(),
                path: path.0,
            });
    }
}

/// Installed by the case as the process's global default (for the rest of the process): asks
/// to be consulted at every callsite and records nothing. Without a global default, a callsite first reached on another test's
/// thread (no subscriber) is cached process-wide as "never", and the case's scoped recorder
/// would miss it (tokio-rs/tracing#2874).
struct AskEveryTime;

impl Subscriber for AskEveryTime {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::sometimes()
    }
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        false
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// Every operation of the trait runs in a `debug` span named after it, carrying the node's
/// path, as the trait's documentation promises operators.
pub async fn operations_traced(fx: &dyn Fixture) -> Outcome {
    let mut env = CaseEnv::new(fx, "operations_traced");
    let c = env.client().await;
    let at = env.at();
    // Fails only if a default is already set, which then answers for every callsite itself.
    let _ = tracing::subscriber::set_global_default(AskEveryTime);
    let seen: Seen = Arc::default();
    let dispatch =
        tracing::Dispatch::new(tracing_subscriber::registry().with(SpanRecorder(seen.clone())));
    let path = p("/traced/node");
    let reg_path = p("/traced/10.0.0.1:9090");
    let traced = async {
        c.create(&path, Bytes::from("a"), CreateMode::Persistent)
            .await
            .map_err(|e| format!("create: {e}"))?;
        c.get(&path).await.map_err(|e| format!("get: {e}"))?;
        c.exists(&path).await.map_err(|e| format!("exists: {e}"))?;
        let node = c
            .set(&path, Bytes::from("b"), Expected::Any)
            .await
            .map_err(|e| format!("set: {e}"))?;
        c.children(&p("/traced"))
            .await
            .map_err(|e| format!("children: {e}"))?;
        drop(
            c.watch(&path, WatchOptions::node())
                .await
                .map_err(|e| format!("watch: {e}"))?,
        );
        let node = c
            .set_owned(&node, Bytes::from("c"))
            .await
            .map_err(|e| format!("set_owned: {e}"))?
            .ok_or("set_owned: the node was not written")?;
        c.delete_owned(&node)
            .await
            .map_err(|e| format!("delete_owned: {e}"))?;
        c.create(&path, Bytes::new(), CreateMode::Persistent)
            .await
            .map_err(|e| format!("create again: {e}"))?;
        c.delete(&path, Expected::Any, DeleteScope::Node)
            .await
            .map_err(|e| format!("delete: {e}"))?;
        let reg = c
            .register(&reg_path, Bytes::new(), RegisterOptions::new())
            .await
            .map_err(|e| format!("register: {e}"))?;
        reg.deregister()
            .await
            .map_err(|e| format!("deregister: {e}"))?;
        // A registration dropped unawaited removes its node in a task of its own, traced too.
        drop(
            c.register(
                &p("/traced/10.0.0.2:9090"),
                Bytes::new(),
                RegisterOptions::new(),
            )
            .await
            .map_err(|e| format!("register another: {e}"))?,
        );
        c.close().await.map_err(|e| format!("close: {e}"))
    };
    if let Err(e) = traced.with_subscriber(dispatch).await {
        panic!("{at} {e}");
    }
    let seen = seen
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    // By name, not target: a third-party backend or decorator opens spans under its own.
    let ours: Vec<_> = seen
        .iter()
        .filter(|span| TRACED.contains(&span.name.as_str()))
        .collect();
    let names: BTreeSet<&str> = ours.iter().map(|span| span.name.as_str()).collect();
    let missing: Vec<&str> = TRACED
        .iter()
        .copied()
        .filter(|op| !names.contains(op))
        .collect();
    assert!(
        missing.is_empty(),
        "{at} no span for {missing:?}; spans seen: {names:?}"
    );
    for op in TRACED {
        let spans: Vec<_> = ours.iter().filter(|span| span.name == op).collect();
        let wrong: Vec<_> = spans
            .iter()
            .filter(|span| {
                span.level != tracing::Level::DEBUG || (op != "close" && span.path.is_none())
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "{at} span {op} not at debug level with the node's path: {wrong:?}"
        );
    }
    assert!(
        ours.iter()
            .any(|span| span.name == "get" && span.path.as_deref() == Some("/traced/node")),
        "{at} no get span names /traced/node: {ours:?}"
    );
    assert!(
        seen.iter().any(|span| span.name == "deregistration"
            && span.level == tracing::Level::INFO
            && span.path.as_deref() == Some("/traced/10.0.0.2:9090")),
        "{at} no info span for the dropped registration's removal: {seen:?}"
    );
    env.finish().await
}
