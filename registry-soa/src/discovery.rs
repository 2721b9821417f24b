//! `ServiceView`: a live, lock-free view of one service (instances, its config, the global
//! config, routes, cookies), fed by watches, with instance selection.

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use registry_core::{
    NodePath, PersistentItem, PersistentWatch, Registry, WatchScope, WatchedState,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::balance::{random_below, Balancer, CallGuard, Candidate};
use crate::config::{parse_config, resolve, weight_of, LoadBalance, ServiceConfig};
use crate::error::{ParseError, SoaError};
use crate::layout::{global_config, parse_instance, Instance, ServicePaths};
use crate::routes::{
    first_cookie_rule, parse_cookie_rules, parse_routes, CallContext, CookieRule, Route,
};
use crate::version::Numbers;

/// Everything known about a service at one moment. Immutable; replaced as a whole.
#[derive(Clone, Debug, Default)]
pub struct ServiceSnapshot {
    /// Live instances, oldest first; one per address and version, even if several nodes
    /// name it. Shared: [`ServiceView::select`] hands these out without copying.
    pub instances: Vec<Arc<Instance>>,
    /// The service's config (`/soa/config/services/<service>`).
    pub config: ServiceConfig,
    /// The global config (`/soa/config/services`).
    pub global: ServiceConfig,
    /// Routing rules. When the routes text stops parsing, the last rules that parsed stay
    /// in force (an operator's typo must not lift a blacklist) and the error is in `errors`;
    /// when none has parsed since the view opened, see `unparsed_rules`.
    pub routes: Vec<Route>,
    /// Cookie-injection rules; like `routes`, the last ones that parsed while the text does
    /// not.
    pub cookies: Vec<CookieRule>,
    /// Malformed config properties (left out; the rest of the config applies) and rule texts
    /// that do not parse (the last rules that did stay in force).
    pub errors: Vec<(NodePath, ParseError)>,
    /// Rule texts (routes, cookie rules) that have not parsed since the view opened, with
    /// their errors: no rules of theirs are known to be in force, so
    /// [`select`](ServiceView::select) fails with [`SoaError::RulesUnparsed`] until they parse
    /// (routing to every instance could send calls where a blacklist forbids them).
    pub unparsed_rules: Vec<(NodePath, ParseError)>,
    /// True while the registry is unreachable, and after it is reachable again until the
    /// view has read every source anew: this is the last known state.
    pub stale: bool,
    /// Grows with every change of what the fields above say (an event that changes none of
    /// them leaves it, and the view, as they were).
    pub generation: u64,
    /// What `select` needs, derived from the fields above when they change.
    selection: Arc<Selection>,
}

impl ServiceSnapshot {
    /// Whether `other` shows readers the same service (everything but the generation).
    fn same_content(&self, other: &ServiceSnapshot) -> bool {
        self.stale == other.stale
            && self.instances == other.instances
            && self.config == other.config
            && self.global == other.global
            && self.routes == other.routes
            && self.cookies == other.cookies
            && self.errors == other.errors
            && self.unparsed_rules == other.unparsed_rules
    }
}

/// The caller's version, parsed once per call.
enum Wanted<'a> {
    Any,
    Numbers(Numbers<'a>),
    Text(&'a str),
}

impl<'a> Wanted<'a> {
    fn of(version: &'a str) -> Self {
        if version.is_empty() {
            return Wanted::Any;
        }
        Numbers::parse(version).map_or(Wanted::Text(version), Wanted::Numbers)
    }
}

/// Callers' versions whose compatible instances a snapshot remembers; more are computed per call.
const REMEMBERED_VERSIONS: usize = 16;

/// Per-instance facts `select` needs (in the order of the snapshot's instances), computed
/// once per snapshot so that a call only filters and picks: no parsing, weight rules or copies
/// on the call path.
#[derive(Debug, Default)]
struct Selection {
    /// Address and effective weight of each instance.
    candidates: Vec<Candidate>,
    /// The compatible instances per caller version seen so far, filled in order, so a call
    /// neither parses nor compares versions. Set-once slots: reading takes no lock and no
    /// atomic write.
    compatible: [OnceLock<(String, Compatible)>; REMEMBERED_VERSIONS],
    /// How many routes the snapshot has (each compatible set remembers what each admits).
    routes: usize,
    /// Per call identity (service, method, version) seen so far: the cookie rules and routes
    /// whose matchers on the identity hold, so a call compares three strings and evaluates
    /// only the other matchers (none, for per-method rules). Set-once slots, like
    /// `compatible`; empty without routes.
    plans: Option<PlansByCall>,
}

/// Remembered plans of calls, one set-once slot per call identity.
type PlansByCall = [OnceLock<(CallIdentity, Plan)>; REMEMBERED_CALLS];

/// The rules that may apply to calls of one identity, in order: index, and whether matchers
/// beyond the identity remain to be checked per call.
#[derive(Debug)]
struct Plan {
    cookies: Vec<(usize, bool)>,
    routes: Vec<(usize, bool)>,
    /// The route when nothing is left to check per call (per-method rules): decided once.
    fixed: Option<Option<usize>>,
}

impl Plan {
    /// The route of `call` (of this plan's identity) among `routes`, `cookies` applied.
    fn route(&self, call: &CallContext, cookies: &[CookieRule], routes: &[Route]) -> Option<usize> {
        if let Some(fixed) = self.fixed {
            return fixed;
        }
        // Cookie rules only add cookies that routing reads: routing sees them added,
        // without a copy of the call.
        let added = self
            .cookies
            .iter()
            .filter_map(|(i, check)| Some((cookies.get(*i)?, *check)))
            .find(|(r, check)| !check || r.condition.holds_beyond_identity(call, &[]))
            .map_or(&[][..], |(r, _)| &r.cookies[..]);
        self.routes
            .iter()
            .find(|(i, check)| {
                !check
                    || routes
                        .get(*i)
                        .is_some_and(|r| r.condition.holds_beyond_identity(call, added))
            })
            .map(|(i, _)| *i)
    }
}

/// Calls (service, method, version) whose route a snapshot remembers; more are evaluated per
/// call.
const REMEMBERED_CALLS: usize = 32;

/// What decides the route of a call when the rules read nothing else.
#[derive(Debug, PartialEq, Eq)]
struct CallIdentity {
    service: String,
    method: String,
    version: String,
}

impl CallIdentity {
    fn is(&self, call: &CallContext) -> bool {
        self.method == call.method && self.version == call.version && self.service == call.service
    }
}

/// The instances compatible with one caller version, with running weight totals for a
/// weighted-random pick by binary search.
#[derive(Debug)]
struct Compatible {
    /// Indices into the snapshot's instances.
    indices: Vec<usize>,
    /// `cumulative[k]`: the sum of the weights of `indices[..=k]`.
    cumulative: Vec<u64>,
    /// Per route of the snapshot, the part of these instances it admits, once a call needed
    /// it: a route's targets depend on the instance only, so a call that routes only picks.
    routed: Box<[OnceLock<Compatible>]>,
}

impl Compatible {
    /// These instances with running totals of `candidates`' weights; `routes` empty slots.
    fn of(indices: Vec<usize>, candidates: &[Candidate], routes: usize) -> Compatible {
        let cumulative = indices
            .iter()
            .scan(0u64, |sum, i| {
                *sum += candidates.get(*i).map_or(0, |c| u64::from(c.weight));
                Some(*sum)
            })
            .collect();
        Compatible {
            indices,
            cumulative,
            routed: (0..routes).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The part of these instances that `route` (the snapshot's route number `index`) admits.
    fn routed(
        &self,
        index: usize,
        route: &Route,
        instances: &[Arc<Instance>],
        candidates: &[Candidate],
    ) -> Option<&Compatible> {
        let slot = self.routed.get(index)?;
        Some(slot.get_or_init(|| {
            let admitted = self
                .indices
                .iter()
                .copied()
                .filter(|i| {
                    instances
                        .get(*i)
                        .is_some_and(|instance| route.admits(instance))
                })
                .collect();
            Compatible::of(admitted, candidates, 0)
        }))
    }

    /// Weighted random among these instances (uniform when every weight is 0).
    fn pick_random(&self) -> Option<usize> {
        let total = self.cumulative.last().copied()?;
        let k = if total == 0 {
            usize::try_from(random_below(self.indices.len() as u64)).ok()?
        } else {
            let point = random_below(total);
            self.cumulative.partition_point(|c| *c <= point)
        };
        self.indices.get(k).copied()
    }
}

impl Selection {
    fn new(
        instances: &[Arc<Instance>],
        config: &ServiceConfig,
        global: &ServiceConfig,
        routes: &[Route],
    ) -> Self {
        Selection {
            routes: routes.len(),
            plans: (!routes.is_empty()).then(Default::default),
            candidates: instances
                .iter()
                .map(|i| Candidate {
                    address: i.address,
                    weight: weight_of(i.address, i.weight, config, global),
                })
                .collect(),
            compatible: Default::default(),
        }
    }

    /// The index of the route `call` takes among `routes`, `cookies`' rules applied first.
    fn route_of(
        &self,
        call: &CallContext,
        cookies: &[CookieRule],
        routes: &[Route],
    ) -> Option<usize> {
        let slots = self.plans.as_ref()?;
        let mut made = false;
        for slot in slots {
            let (identity, plan) = slot.get_or_init(|| {
                made = true;
                let plan_of = |conditions: &mut dyn Iterator<Item = &crate::routes::Condition>| {
                    conditions
                        .enumerate()
                        .filter(|(_, c)| c.holds_on_identity(call))
                        .map(|(i, c)| (i, c.reads_beyond_identity()))
                        .collect()
                };
                let mut plan = Plan {
                    cookies: plan_of(&mut cookies.iter().map(|r| &r.condition)),
                    routes: plan_of(&mut routes.iter().map(|r| &r.condition)),
                    fixed: None,
                };
                plan.cookies
                    .retain(|(i, _)| cookies.get(*i).is_some_and(CookieRule::can_apply));
                if !plan
                    .cookies
                    .iter()
                    .chain(&plan.routes)
                    .any(|(_, check)| *check)
                {
                    plan.fixed = Some(plan.route(call, cookies, routes));
                }
                let identity = CallIdentity {
                    service: call.service.clone(),
                    method: call.method.clone(),
                    version: call.version.clone(),
                };
                (identity, plan)
            });
            if made || identity.is(call) {
                return plan.route(call, cookies, routes);
            }
        }
        // More identities than remembered: every matcher, every call.
        let added = first_cookie_rule(cookies, call).map_or(&[][..], |r| &r.cookies[..]);
        routes
            .iter()
            .position(|r| r.condition.holds_with(call, added))
    }

    /// Runs `f` on the instances (of `instances`, the snapshot's) that can serve callers built
    /// against `version`, remembered per version in the first free slot.
    fn with_compatible<R>(
        &self,
        instances: &[Arc<Instance>],
        version: &str,
        f: impl FnOnce(&Compatible) -> R,
    ) -> R {
        for slot in &self.compatible {
            let (known, compatible) = slot.get_or_init(|| {
                (
                    version.to_owned(),
                    self.compute_compatible(instances, version),
                )
            });
            if known == version {
                return f(compatible);
            }
        }
        f(&self.compute_compatible(instances, version))
    }

    fn compute_compatible(&self, instances: &[Arc<Instance>], version: &str) -> Compatible {
        let wanted = Wanted::of(version);
        let indices: Vec<usize> = (0..instances.len())
            .filter(|i| Self::serves(instances, *i, &wanted))
            .collect();
        Compatible::of(indices, &self.candidates, self.routes)
    }

    /// Whether instance `index` can serve a caller built against `wanted`: an instance
    /// without a version serves everyone; dotted numbers need the same major and not older
    /// than the caller's; other texts serve only the identical version.
    fn serves(instances: &[Arc<Instance>], index: usize, wanted: &Wanted<'_>) -> bool {
        let Some(instance) = instances.get(index) else {
            return false;
        };
        match (instance.version.as_deref(), wanted) {
            (None, _) | (_, Wanted::Any) => true,
            // Parsed again per caller version remembered, not per call: it borrows the text.
            (Some(own), Wanted::Numbers(w)) => Numbers::parse(own).is_some_and(|own| own.serves(w)),
            (Some(own), Wanted::Text(w)) => own == *w,
        }
    }
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
/// unreachable the last known state keeps being served with `stale` set, and a view fresh
/// again after that holds every change made meanwhile (each source is watched anew, and the
/// view is fresh once all of them have been read); a watch the registry refuses (say a source's
/// ACL) leaves the view serving its last state, stale, while it keeps trying with a backoff
/// (an operator may lift the refusal); once the registry is closed the view stays stale;
/// dropping the view stops its task and watches.
pub struct ServiceView {
    service: String,
    current: Arc<ArcSwap<ServiceSnapshot>>,
    changes: watch::Receiver<u64>,
    balancer: Balancer,
    task: JoinHandle<()>,
}

struct Sources {
    paths: ServicePaths,
    global: NodePath,
}

impl Sources {
    /// What each source's watch covers, in the order `build` reads their states: instances,
    /// the service's config, the global config, routes, cookie rules.
    fn all(&self) -> Vec<(NodePath, WatchScope)> {
        vec![
            (self.paths.runtime.clone(), WatchScope::Children),
            (self.paths.config.clone(), WatchScope::Node),
            // Node scope: the global node's children are the per-service configs.
            (self.global.clone(), WatchScope::Node),
            (self.paths.routes.clone(), WatchScope::Node),
            (self.paths.cookies.clone(), WatchScope::Node),
        ]
    }
}

fn text(state: &WatchedState, path: &NodePath) -> String {
    state
        .get(path)
        .map(|n| String::from_utf8_lossy(&n.value).into_owned())
        .unwrap_or_default()
}

/// The view's snapshot of `states`; `previous` supplies the last rules that parsed.
fn build(
    states: &[WatchedState; 5],
    sources: &Sources,
    previous: Option<&ServiceSnapshot>,
    stale: bool,
    generation: u64,
) -> ServiceSnapshot {
    let [instances, config, global, routes, cookies] = states;
    let mut errors = Vec::new();
    let mut config_of = |state: &WatchedState, path: &NodePath| {
        let (parsed, errs) = parse_config(&text(state, path));
        for error in errs {
            // Said once per new error, not on every rebuild: the property falls back to the
            // global setting or the default, which nobody would notice otherwise.
            let known =
                previous.is_some_and(|p| p.errors.iter().any(|(at, e)| at == path && *e == error));
            if !known {
                tracing::warn!(%path, %error, "config property does not parse; the global setting or the default applies");
            }
            errors.push((path.clone(), error));
        }
        parsed
    };
    let service_config = config_of(config, &sources.paths.config);
    let global_config = config_of(global, &sources.global);
    let mut unparsed_rules = Vec::new();
    // The last rules that parsed, if any did since the view opened.
    let mut last_good = |path: &NodePath, error: ParseError| {
        let parsed_before = previous.filter(|p| {
            !p.unparsed_rules
                .iter()
                .any(|(unparsed, _)| unparsed == path)
        });
        if parsed_before.is_some() {
            tracing::warn!(%path, %error, "rules do not parse; the last rules that did stay in force");
        } else {
            tracing::error!(%path, %error, "rules do not parse and none did before; selecting fails until they do");
            unparsed_rules.push((path.clone(), error.clone()));
        }
        errors.push((path.clone(), error));
        parsed_before
    };
    let routes = match parse_routes(&text(routes, &sources.paths.routes)) {
        Ok(r) => r,
        Err(e) => last_good(&sources.paths.routes, e)
            .map(|p| p.routes.clone())
            .unwrap_or_default(),
    };
    let cookies = match parse_cookie_rules(&text(cookies, &sources.paths.cookies)) {
        Ok(c) => c,
        Err(e) => last_good(&sources.paths.cookies, e)
            .map(|p| p.cookies.clone())
            .unwrap_or_default(),
    };
    let mut list: Vec<Instance> = instances.nodes().filter_map(parse_instance).collect();
    list.sort_by_key(|i| i.create_order);
    // One instance seen twice (registered on both sides of a DualRegistry, or its old node
    // not yet gone after re-registration) is one instance: keep the oldest node.
    let mut seen = std::collections::HashSet::new();
    list.retain(|i| seen.insert((i.address, i.version.clone())));
    let instances: Vec<Arc<Instance>> = list.into_iter().map(Arc::new).collect();
    let selection = Arc::new(Selection::new(
        &instances,
        &service_config,
        &global_config,
        &routes,
    ));
    ServiceSnapshot {
        instances,
        config: service_config,
        global: global_config,
        routes,
        cookies,
        errors,
        unparsed_rules,
        stale,
        generation,
        selection,
    }
}

impl ServiceView {
    /// Starts watching `service` and returns once every watch delivered its first snapshot
    /// (they open at once). Errors: an invalid service name, a watch's own error, or a
    /// timeout when a snapshot does not come within
    /// [`FIRST_SNAPSHOT`](registry_core::persistent::FIRST_SNAPSHOT).
    pub async fn open(registry: Arc<dyn Registry>, service: &str) -> Result<ServiceView, SoaError> {
        let sources = Sources {
            paths: ServicePaths::new(service)?,
            global: global_config(),
        };
        let (watch, states) = PersistentWatch::open(registry, sources.all()).await?;
        let mut states = states.into_iter();
        // One state per source, in order; an absent one reads as empty.
        let states: [WatchedState; 5] = std::array::from_fn(|_| states.next().unwrap_or_default());
        let first = build(&states, &sources, None, watch.is_stale(), 1);
        let current = Arc::new(ArcSwap::from_pointee(first));
        let (publish, changes) = watch::channel(1);
        let span = tracing::info_span!("service_view", service);
        let task =
            tokio::spawn(run(watch, sources, states, current.clone(), publish).instrument(span));
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

    /// A receiver that changes (to the snapshot's generation) whenever the view does: an
    /// instance, a config, a rule, an error or staleness; never for an event that leaves them
    /// all as they were.
    /// It starts from now: take it before reading the snapshot it is to keep up with, so
    /// that no change falls in between.
    pub fn changes(&self) -> watch::Receiver<u64> {
        let mut changes = self.changes.clone();
        // From now on: a change before this call would wake the first `changed()` at once.
        changes.borrow_and_update();
        changes
    }

    /// The balancer's state (round-robin positions, calls in flight) for this service.
    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// Picks an instance for a call: cookie rules, then version compatibility, then routing,
    /// then the load-balancing strategy by precedence (call > method > service > global >
    /// random) over weights (ip:port > ip > every instance > the instance's own > 100).
    ///
    /// Lock-free and allocation-free for random and consistent-hash picks when no cookie rule
    /// applies (the work that depends only on the snapshot is done once per change, and rules
    /// read the call's values in place); the instance is shared with the snapshot, not copied.
    /// It does not count the call in flight: use [`start_call`](ServiceView::start_call)
    /// where `leastActive` may apply. The cookies a cookie rule adds are seen by routing but
    /// not added to `call`: [`select_applying_cookies`](ServiceView::select_applying_cookies)
    /// adds them, for the call to send. A call whose `service` is empty is taken as one to
    /// this view's service, so rules on `service` see its name (that call is copied first).
    pub fn select(
        &self,
        call: &CallContext,
        options: &SelectOptions,
    ) -> Result<Arc<Instance>, SoaError> {
        self.select_in(&self.current.load(), call, options)
    }

    /// [`select`](ServiceView::select), then adds to `call` the cookies of the first cookie
    /// rule that holds for it, as Dapeng's consumer injects them into the call it sends (a
    /// `c"thread-log-level#DEBUG"` rule switches the provider's logging for that call). Both
    /// come from one snapshot, and routing sees the call as it was plus those cookies, as
    /// [`select`](ServiceView::select) does: the rules are not applied twice. Nothing is
    /// added when no instance is picked. An empty `service` is set to this view's. Send the call's cookies with it; count it in flight
    /// with [`balancer().start_call`](Balancer::start_call) where `leastActive` may apply.
    pub fn select_applying_cookies(
        &self,
        call: &mut CallContext,
        options: &SelectOptions,
    ) -> Result<Arc<Instance>, SoaError> {
        let snap = self.current.load();
        if call.service.is_empty() {
            call.service = self.service.clone();
        }
        let instance = self.select_named(&snap, call, options)?;
        crate::routes::apply_cookies(&snap.cookies, call);
        Ok(instance)
    }

    fn select_in(
        &self,
        snap: &ServiceSnapshot,
        call: &CallContext,
        options: &SelectOptions,
    ) -> Result<Arc<Instance>, SoaError> {
        if call.service.is_empty() {
            // The call is to this view's service: rules on `service` must see it (a blank
            // value matches no rule, so a blacklist on the service would be skipped).
            let named = CallContext {
                service: self.service.clone(),
                ..call.clone()
            };
            return self.select_named(snap, &named, options);
        }
        self.select_named(snap, call, options)
    }

    fn select_named(
        &self,
        snap: &ServiceSnapshot,
        call: &CallContext,
        options: &SelectOptions,
    ) -> Result<Arc<Instance>, SoaError> {
        let selection = &*snap.selection;
        let instances = &snap.instances;
        if instances.is_empty() {
            return Err(SoaError::NoInstance {
                service: self.service.clone(),
            });
        }
        if let Some((path, error)) = snap.unparsed_rules.first() {
            return Err(SoaError::RulesUnparsed {
                service: self.service.clone(),
                path: path.clone(),
                error: error.clone(),
            });
        }
        let strategy = resolve(
            options.load_balance,
            &call.method,
            &snap.config.load_balance,
            &snap.global.load_balance,
            LoadBalance::Random,
        );
        let rule_index = selection.route_of(call, &snap.cookies, &snap.routes);
        let rule = rule_index.and_then(|i| snap.routes.get(i));
        let index = selection.with_compatible(instances, &call.version, |compatible| {
            if compatible.indices.is_empty() {
                return Err(SoaError::VersionMismatch {
                    service: self.service.clone(),
                    version: call.version.clone(),
                });
            }
            if let (LoadBalance::Random, _) | (LoadBalance::ConsistentHash, None) =
                (strategy, &options.hash_key)
            {
                // The common cases need no filtering: pick from the remembered totals, of
                // the routed part when a route applies.
                let from = match (rule_index, rule) {
                    (Some(index), Some(route)) => compatible
                        .routed(index, route, instances, &selection.candidates)
                        .ok_or_else(|| SoaError::NoInstance {
                            service: self.service.clone(),
                        })?,
                    _ => compatible,
                };
                if from.indices.is_empty() {
                    return Err(SoaError::RoutingExcludedAll {
                        service: self.service.clone(),
                    });
                }
                return Ok(from.pick_random());
            }
            let routed = compatible
                .indices
                .iter()
                .filter_map(|i| Some((*i, instances.get(*i)?, *selection.candidates.get(*i)?)))
                .filter(move |(_, instance, _)| rule.is_none_or(|r| r.admits(instance)))
                .map(|(i, _, candidate)| (i, candidate));
            if routed.clone().next().is_none() {
                return Err(SoaError::RoutingExcludedAll {
                    service: self.service.clone(),
                });
            }
            Ok(self
                .balancer
                .pick_among(strategy, routed, options.hash_key.as_deref()))
        })?;
        index
            .and_then(|index| instances.get(index).cloned())
            .ok_or_else(|| SoaError::NoInstance {
                service: self.service.clone(),
            })
    }
}

/// A call started on an instance [`ServiceView::start_call`] chose: counted in flight on the
/// instance's address (what `leastActive` balances on) until dropped.
#[derive(Debug)]
pub struct StartedCall {
    /// The instance to call (shared with the snapshot it was chosen from).
    pub instance: Arc<Instance>,
    _in_flight: CallGuard,
}

impl ServiceView {
    /// [`select`](ServiceView::select), then counts the call in flight on the chosen instance
    /// until the returned [`StartedCall`] is dropped: drop it when the call ends. `leastActive`
    /// picks by these counts; with plain `select`, calls count only through
    /// [`balancer().start_call`](Balancer::start_call), else every instance looks idle and a
    /// `leastActive` pick is weighted random.
    pub fn start_call(
        &self,
        call: &CallContext,
        options: &SelectOptions,
    ) -> Result<StartedCall, SoaError> {
        let instance = self.select(call, options)?;
        let in_flight = self.balancer.start_call(instance.address);
        Ok(StartedCall {
            instance,
            _in_flight: in_flight,
        })
    }
}

impl Drop for ServiceView {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The view's task: applies the sources' items and publishes what changes. Ends when the
/// registry closes (the view then stays stale) or the view is dropped.
async fn run(
    mut watch: PersistentWatch,
    sources: Sources,
    mut states: [WatchedState; 5],
    current: Arc<ArcSwap<ServiceSnapshot>>,
    publish: watch::Sender<u64>,
) {
    let mut generation = 1;
    let mark_stale = |stale: bool, generation: &mut u64| {
        if current.load().stale != stale {
            *generation += 1;
            current.store(Arc::new(ServiceSnapshot {
                stale,
                generation: *generation,
                ..(**current.load()).clone()
            }));
            publish.send_replace(*generation);
        }
    };
    while let Some(item) = watch.next().await {
        let (source, event) = match item {
            Ok(PersistentItem::Event { source, event }) => (source, event),
            Ok(PersistentItem::Staleness) => {
                mark_stale(watch.is_stale(), &mut generation);
                continue;
            }
            Err(error) => {
                // A refusal (say of a source's ACL) may be lifted by an operator: the view
                // keeps serving what it knew, stale, and keeps trying with a backoff.
                tracing::warn!(%error, "watching the service was refused; retrying");
                mark_stale(true, &mut generation);
                continue;
            }
        };
        let Some(state) = states.get_mut(source) else {
            continue;
        };
        state.apply(&event);
        let next = build(
            &states,
            &sources,
            Some(&current.load()),
            watch.is_stale(),
            generation + 1,
        );
        // An event that changes nothing a reader sees (a provider creating the service's
        // empty config nodes, a resync that finds what we had) is not a change: `changes()`
        // subscribers would otherwise wake for nothing.
        if next.same_content(&current.load()) {
            continue;
        }
        generation += 1;
        current.store(Arc::new(next));
        publish.send_replace(generation);
    }
    mark_stale(true, &mut generation);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::{parse_cookie_rules, parse_routes};

    /// The plan-based route of a call (remembered per identity, then other matchers) is
    /// always the route a full evaluation finds, for calls seen first, again, and beyond the
    /// remembered identities.
    #[test]
    fn remembered_plans_route_as_a_full_evaluation_does() {
        // The first rule names a cookie twice: Dapeng skips it, and so must the plans.
        let cookies = parse_cookie_rules(
            "method match 'get' => c\"tier#silver\", c\"tier#gold\"\n\
             method match r'ge.*' ; userId match 1..50 => c\"tier#gold\"\n\
             version match '2.0.0' => c\"tier#new\"\n\
             cookie_tier match 'silver' => c\"zone#b\"",
        )
        .unwrap();
        let routes = parse_routes(
            "cookie_tier match 'gold' => ip'10.0.0.1'\n\
             userId match %'4n+1' ; method match 'put' => ip'10.0.0.2'\n\
             cookie_zone match 'b' => ip'10.0.0.3'\n\
             method match 'get','list' ; version match '1.0.0' => ~ip'10.0.0.4'\n\
             otherwise => ip'10.0.0.0/24'",
        )
        .unwrap();
        let selection = Selection::new(
            &[],
            &ServiceConfig::default(),
            &ServiceConfig::default(),
            &routes,
        );
        let mut calls = Vec::new();
        for method in ["get", "put", "list", "gex"] {
            for version in ["1.0.0", "2.0.0", ""] {
                for user in [None, Some(1), Some(5), Some(60)] {
                    for tier in [None, Some("silver"), Some("gold")] {
                        let mut call = CallContext {
                            service: "S".into(),
                            method: method.into(),
                            version: version.into(),
                            user_id: user,
                            ..Default::default()
                        };
                        if let Some(tier) = tier {
                            call.cookies.insert("tier".into(), tier.into());
                        }
                        calls.push(call);
                    }
                }
            }
        }
        // More identities than remembered, each seen twice: filling, hitting, falling back.
        for _ in 0..2 {
            for (n, call) in calls.iter().enumerate() {
                let added = first_cookie_rule(&cookies, call).map_or(&[][..], |r| &r.cookies[..]);
                let full = routes
                    .iter()
                    .position(|r| r.condition.holds_with(call, added));
                let mut service_call = call.clone();
                service_call.service = format!("S{}", n % 3);
                let added =
                    first_cookie_rule(&cookies, &service_call).map_or(&[][..], |r| &r.cookies[..]);
                let full_other = routes
                    .iter()
                    .position(|r| r.condition.holds_with(&service_call, added));
                assert_eq!(
                    selection.route_of(call, &cookies, &routes),
                    full,
                    "{call:?}"
                );
                assert_eq!(
                    selection.route_of(&service_call, &cookies, &routes),
                    full_other,
                    "{service_call:?}"
                );
            }
        }
    }
}
