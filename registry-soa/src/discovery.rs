//! `ServiceView`: a live, lock-free view of one service (instances, its config, the global
//! config, routes, cookies), fed by watches, with instance selection.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::stream::{self, StreamExt};
use registry_core::{
    Backoff, NodePath, Registry, SessionState, WatchEvent, WatchOptions, WatchStream, WatchedState,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::balance::{Balancer, Candidate};
use crate::config::{parse_config, resolve, weight_of, LoadBalance, ServiceConfig};
use crate::error::{ParseError, SoaError};
use crate::layout::{global_config, parse_instance, Instance, ServicePaths};
use crate::routes::{
    apply_cookies, parse_cookie_rules, parse_routes, route, CallContext, CookieRule, Route,
};
use crate::version::compatible;

/// Everything known about a service at one moment. Immutable; replaced as a whole.
#[derive(Clone, Debug, Default)]
pub struct ServiceSnapshot {
    /// Live instances, oldest first; one per address and version, even if several nodes
    /// name it.
    pub instances: Vec<Instance>,
    /// The service's config (`/soa/config/services/<service>`).
    pub config: ServiceConfig,
    /// The global config (`/soa/config/services`).
    pub global: ServiceConfig,
    /// Routing rules.
    pub routes: Vec<Route>,
    /// Cookie-injection rules.
    pub cookies: Vec<CookieRule>,
    /// Malformed config properties, rule texts that did not parse (their rules are not
    /// applied; the rest is).
    pub errors: Vec<(NodePath, ParseError)>,
    /// True while the registry is unreachable: this is the last known state.
    pub stale: bool,
    /// Grows with every change applied.
    pub generation: u64,
}

/// Per-call choices that override config.
#[derive(Clone, Debug, Default)]
pub struct SelectOptions {
    /// Strategy for this call (highest precedence).
    pub load_balance: Option<LoadBalance>,
    /// Key for consistent hashing.
    pub hash_key: Option<String>,
}

/// A live view of one service. Reads ([`snapshot`](ServiceView::snapshot),
/// [`select`](ServiceView::select)) take no lock; a background task applies watch events.
///
/// Guarantees: every change of any watched node reaches the view; while the registry is
/// unreachable the last known state keeps being served with `stale` set; dropping the view
/// stops its task and watches.
pub struct ServiceView {
    service: String,
    current: Arc<ArcSwap<ServiceSnapshot>>,
    changes: watch::Receiver<u64>,
    balancer: Balancer,
    task: JoinHandle<()>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Instances,
    Config,
    Global,
    Routes,
    Cookies,
}

struct Sources {
    paths: ServicePaths,
    global: NodePath,
}

impl Sources {
    fn all(&self) -> [(Source, NodePath, WatchOptions); 5] {
        [
            (
                Source::Instances,
                self.paths.runtime.clone(),
                WatchOptions::children(),
            ),
            (
                Source::Config,
                self.paths.config.clone(),
                WatchOptions::node(),
            ),
            // Node scope: the global node's children are the per-service configs.
            (Source::Global, self.global.clone(), WatchOptions::node()),
            (
                Source::Routes,
                self.paths.routes.clone(),
                WatchOptions::node(),
            ),
            (
                Source::Cookies,
                self.paths.cookies.clone(),
                WatchOptions::node(),
            ),
        ]
    }
}

fn text(state: &WatchedState, path: &NodePath) -> String {
    state
        .get(path)
        .map(|n| String::from_utf8_lossy(&n.value).into_owned())
        .unwrap_or_default()
}

fn build(
    states: &[WatchedState; 5],
    sources: &Sources,
    stale: bool,
    generation: u64,
) -> ServiceSnapshot {
    let [instances, config, global, routes, cookies] = states;
    let mut errors = Vec::new();
    let mut config_of = |state: &WatchedState, path: &NodePath| {
        let (parsed, errs) = parse_config(&text(state, path));
        errors.extend(errs.into_iter().map(|e| (path.clone(), e)));
        parsed
    };
    let service_config = config_of(config, &sources.paths.config);
    let global_config = config_of(global, &sources.global);
    let routes = match parse_routes(&text(routes, &sources.paths.routes)) {
        Ok(r) => r,
        Err(e) => {
            errors.push((sources.paths.routes.clone(), e));
            Vec::new()
        }
    };
    let cookies = match parse_cookie_rules(&text(cookies, &sources.paths.cookies)) {
        Ok(c) => c,
        Err(e) => {
            errors.push((sources.paths.cookies.clone(), e));
            Vec::new()
        }
    };
    let mut list: Vec<Instance> = instances.nodes().filter_map(parse_instance).collect();
    list.sort_by_key(|i| i.create_order);
    // One instance seen twice (registered on both sides of a DualRegistry, or its old node
    // not yet gone after re-registration) is one instance: keep the oldest node.
    let mut seen = std::collections::HashSet::new();
    list.retain(|i| seen.insert((i.address, i.version.clone())));
    ServiceSnapshot {
        instances: list,
        config: service_config,
        global: global_config,
        routes,
        cookies,
        errors,
        stale,
        generation,
    }
}

impl ServiceView {
    /// Starts watching `service` and returns once every watch delivered its first snapshot.
    pub async fn open(registry: Arc<dyn Registry>, service: &str) -> Result<ServiceView, SoaError> {
        let sources = Sources {
            paths: ServicePaths::new(service)?,
            global: global_config(),
        };
        let mut streams = Vec::new();
        let mut states: [WatchedState; 5] = Default::default();
        for (i, (_, path, options)) in sources.all().into_iter().enumerate() {
            let mut stream = registry.watch(&path, options).await?;
            match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
                Ok(Some(Ok(first))) => states[i].apply(&first),
                Ok(Some(Err(e))) => return Err(e.into()),
                _ => {
                    return Err(SoaError::Registry(registry_core::Error::unavailable(
                        format!("no snapshot of {path}"),
                    )))
                }
            }
            streams.push(stream);
        }
        let first = build(&states, &sources, !registry.session().state.is_live(), 1);
        let current = Arc::new(ArcSwap::from_pointee(first));
        let (publish, changes) = watch::channel(1);
        let task = tokio::spawn(run(
            registry,
            sources,
            states,
            streams,
            current.clone(),
            publish,
        ));
        Ok(ServiceView {
            service: service.to_owned(),
            current,
            changes,
            balancer: Balancer::new(),
            task,
        })
    }

    /// The current state (a cheap, lock-free load).
    pub fn snapshot(&self) -> Arc<ServiceSnapshot> {
        self.current.load_full()
    }

    /// The shared cell the view publishes into (for helpers that outlive a borrow).
    pub(crate) fn snapshot_source(&self) -> Arc<ArcSwap<ServiceSnapshot>> {
        self.current.clone()
    }

    /// A receiver that changes (to the snapshot's generation) whenever the view does.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// The balancer's state (round-robin positions, calls in flight) for this service.
    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// Picks an instance for a call: cookie rules, then version compatibility, then routing,
    /// then the load-balancing strategy by precedence (call > method > service > global >
    /// random) over weights (ip:port > ip > every instance > the instance's own > 100).
    pub fn select(
        &self,
        call: &CallContext,
        options: &SelectOptions,
    ) -> Result<Instance, SoaError> {
        let snap = self.current.load();
        if snap.instances.is_empty() {
            return Err(SoaError::NoInstance {
                service: self.service.clone(),
            });
        }
        let mut ctx = call.clone();
        apply_cookies(&snap.cookies, &mut ctx);
        let compatible: Vec<Instance> = snap
            .instances
            .iter()
            .filter(|i| {
                i.version
                    .as_deref()
                    .is_none_or(|v| call.version.is_empty() || compatible(&call.version, v))
            })
            .cloned()
            .collect();
        if compatible.is_empty() {
            return Err(SoaError::VersionMismatch {
                service: self.service.clone(),
                version: call.version.clone(),
            });
        }
        let routed = route(&snap.routes, &ctx, &compatible);
        if routed.is_empty() {
            return Err(SoaError::RoutingExcludedAll {
                service: self.service.clone(),
            });
        }
        let strategy = resolve(
            options.load_balance,
            &call.method,
            &snap.config.load_balance,
            &snap.global.load_balance,
            LoadBalance::Random,
        );
        let candidates: Vec<Candidate> = routed
            .iter()
            .map(|i| Candidate {
                address: i.address,
                weight: weight_of(i.address, i.weight, &snap.config, &snap.global),
            })
            .collect();
        let index = self
            .balancer
            .pick(strategy, &candidates, options.hash_key.as_deref())
            .ok_or_else(|| SoaError::NoInstance {
                service: self.service.clone(),
            })?;
        Ok(routed[index].clone())
    }
}

impl Drop for ServiceView {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(
    registry: Arc<dyn Registry>,
    sources: Sources,
    mut states: [WatchedState; 5],
    streams: Vec<WatchStream>,
    current: Arc<ArcSwap<ServiceSnapshot>>,
    publish: watch::Sender<u64>,
) {
    let mut generation = 1;
    let mut sessions = registry.session_events();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut tagged = tag(streams);
    loop {
        tokio::select! {
            status = sessions.next() => {
                let Some(status) = status else { return };
                if status.state == SessionState::Closed {
                    return;
                }
                let stale = !status.state.is_live();
                if current.load().stale != stale {
                    generation += 1;
                    current.store(Arc::new(ServiceSnapshot { stale, generation, ..(**current.load()).clone() }));
                    publish.send_replace(generation);
                }
            }
            item = tagged.next() => {
                let (index, event) = match item {
                    Some((index, Ok(event))) => (index, event),
                    Some((_, Err(_))) | None => {
                        // A watch ended: serve what we have, marked stale, and watch again.
                        generation += 1;
                        current.store(Arc::new(ServiceSnapshot { stale: true, generation, ..(**current.load()).clone() }));
                        publish.send_replace(generation);
                        tokio::time::sleep(backoff.next_delay()).await;
                        match reopen(&registry, &sources).await {
                            Some(streams) => {
                                states = Default::default();
                                tagged = tag(streams);
                            }
                            None => continue,
                        }
                        continue;
                    }
                };
                backoff.reset();
                if let WatchEvent::Snapshot(_) | WatchEvent::Resync { .. } = event {
                    tracing::debug!(source = ?sources.all()[index].0, "view resynced");
                }
                states[index].apply(&event);
                generation += 1;
                let stale = !registry.session().state.is_live();
                current.store(Arc::new(build(&states, &sources, stale, generation)));
                publish.send_replace(generation);
            }
        }
    }
}

type Tagged =
    stream::SelectAll<stream::BoxStream<'static, (usize, registry_core::Result<WatchEvent>)>>;

fn tag(streams: Vec<WatchStream>) -> Tagged {
    stream::select_all(
        streams
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.map(move |item| (i, item)).boxed()),
    )
}

async fn reopen(registry: &Arc<dyn Registry>, sources: &Sources) -> Option<Vec<WatchStream>> {
    let mut streams = Vec::new();
    for (_, path, options) in sources.all() {
        match registry.watch(&path, options).await {
            Ok(s) => streams.push(s),
            Err(error) => {
                tracing::warn!(%error, path = %path, "re-watching the service failed; retrying");
                return None;
            }
        }
    }
    Some(streams)
}
