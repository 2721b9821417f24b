//! `ServiceView::select` over the in-memory backend: what it precomputes per snapshot (weights,
//! compatible instances per caller version) stays right as callers and config vary.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use registry_core::{
    Bytes, Expected, MemoryOptions, MemoryRegistry, MemoryStore, NodePath, Registry,
};
use registry_soa::routes::CallContext;
use registry_soa::version::compatible;
use registry_soa::{Address, Provider, SelectOptions, ServiceView, SoaError};

const SERVICE: &str = "test.SelectService";

fn call(version: &str) -> CallContext {
    CallContext {
        service: SERVICE.into(),
        method: "get".into(),
        version: version.into(),
        ..Default::default()
    }
}

async fn until(
    view: &ServiceView,
    what: &str,
    pred: impl Fn(&registry_soa::ServiceSnapshot) -> bool,
) {
    let mut changes = view.changes();
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while !pred(&view.snapshot()) {
            if changes.changed().await.is_err() {
                return false;
            }
        }
        true
    })
    .await;
    assert_eq!(waited, Ok(true), "view never reached: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_follows_caller_versions_and_weights() {
    let store = MemoryStore::new();
    let registry: Arc<dyn Registry> = Arc::new(
        MemoryRegistry::connect(&store, MemoryOptions::default())
            .await
            .unwrap(),
    );
    // A snapshot ranks below its release: it serves 1.0.0-SNAPSHOT callers, not 1.0.0 ones.
    let versions = ["1.0.0", "1.2.0", "2.0.0", "custom", "1.0.0-SNAPSHOT"];
    let mut providers = Vec::new();
    for (i, version) in versions.iter().enumerate() {
        let address = Address {
            ip: [10, 0, 0, i as u8 + 1].into(),
            port: 9090,
        };
        providers.push(
            Provider::register(&registry, SERVICE, address, version)
                .await
                .unwrap(),
        );
    }
    let view = ServiceView::open(registry.clone(), SERVICE).await.unwrap();
    until(&view, "five instances", |s| s.instances.len() == 5).await;

    // More caller versions than a snapshot remembers: every one still gets a right answer.
    // The reference: the documented rule, checked per pair (an empty caller version takes any
    // there too, so the two cannot disagree).
    let allowed = |wanted: &str| -> Vec<u8> {
        (1..=5u8)
            .filter(|i| compatible(wanted, versions[usize::from(*i) - 1]))
            .collect()
    };
    let mut wanted: Vec<String> = vec!["".into(), "custom".into(), "1".into(), "2".into()];
    wanted.extend((0..30).map(|i| format!("1.{}.{}", i % 3, i)));
    wanted.extend([
        "2.0.0-SNAPSHOT".into(),
        "1.0.0-SNAPSHOT".into(),
        "3.0.0".into(),
    ]);
    wanted.push("other".into());
    for _ in 0..3 {
        for w in &wanted {
            let expected = allowed(w);
            for _ in 0..20 {
                match view.select(&call(w), &SelectOptions::default()) {
                    Ok(instance) => assert!(
                        expected.contains(&instance.address.ip.octets()[3]),
                        "caller {w:?} got {}",
                        instance.address
                    ),
                    Err(SoaError::VersionMismatch { .. }) => {
                        assert!(expected.is_empty(), "caller {w:?} got no instance")
                    }
                    Err(e) => panic!("caller {w:?}: {e}"),
                }
            }
        }
    }

    // Weights from config apply to the next snapshot: 1.0.0 callers split 1:3.
    let config = NodePath::new(format!("/soa/config/services/{SERVICE}")).unwrap();
    registry
        .set(
            &config,
            Bytes::from("weight/10.0.0.1/100;weight/10.0.0.2/300"),
            Expected::Any,
        )
        .await
        .unwrap();
    until(&view, "weights applied", |s| s.config.weights.len() == 2).await;
    let mut counts: HashMap<u8, u32> = HashMap::new();
    let n = 40_000;
    for _ in 0..n {
        let instance = view
            .select(&call("1.0.0"), &SelectOptions::default())
            .unwrap();
        *counts.entry(instance.address.ip.octets()[3]).or_default() += 1;
    }
    let share = f64::from(counts.get(&2).copied().unwrap_or(0)) / f64::from(n);
    assert!(
        (share - 0.75).abs() < 0.02,
        "weight-300 share {share}, counts {counts:?}"
    );
    assert_eq!(counts.len(), 2, "{counts:?}");

    // All weights 0: equal shares rather than nothing.
    registry
        .set(&config, Bytes::from("weight/0"), Expected::Any)
        .await
        .unwrap();
    until(&view, "zero weights applied", |s| {
        s.config.weights.len() == 1
    })
    .await;
    let mut seen = HashMap::new();
    for _ in 0..2000 {
        let instance = view.select(&call(""), &SelectOptions::default()).unwrap();
        *seen.entry(instance.address).or_insert(0u32) += 1;
    }
    assert_eq!(seen.len(), 5, "{seen:?}");

    // A selected instance is the snapshot's own, not a copy.
    let picked = view
        .select(&call("custom"), &SelectOptions::default())
        .unwrap();
    let snapshot = view.snapshot();
    assert!(snapshot.instances.contains(&picked));
    for p in providers {
        p.shutdown().await.unwrap();
    }
}

/// A registry on a store of its own, with a provider at `10.0.0.<n>:9090` per
/// `(n, version)`.
async fn with_providers(instances: &[(u8, &str)]) -> (Arc<dyn Registry>, Vec<Provider>) {
    let store = MemoryStore::new();
    let registry: Arc<dyn Registry> = Arc::new(
        MemoryRegistry::connect(&store, MemoryOptions::default())
            .await
            .unwrap(),
    );
    let mut providers = Vec::new();
    for (n, version) in instances {
        let address = Address {
            ip: [10, 0, 0, *n].into(),
            port: 9090,
        };
        providers.push(
            Provider::register(&registry, SERVICE, address, version)
                .await
                .unwrap(),
        );
    }
    (registry, providers)
}

/// Writes the service's `kind` config node (`routes`, `cookies`).
async fn write_rules(registry: &Arc<dyn Registry>, kind: &str, text: &str) {
    let node = NodePath::new(format!("/soa/config/{kind}/{SERVICE}")).unwrap();
    registry
        .set(&node, Bytes::from(text.to_owned()), Expected::Any)
        .await
        .unwrap();
}

/// The last octets of the instances 300 selections of `ctx` picked.
fn picked(view: &ServiceView, ctx: &CallContext) -> std::collections::BTreeSet<u8> {
    (0..300)
        .map(|_| {
            view.select(ctx, &SelectOptions::default())
                .unwrap()
                .address
                .ip
                .octets()[3]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_that_stop_parsing_keep_the_last_rules_in_force() {
    let (registry, _providers) = with_providers(&[(1, "1.0.0"), (2, "1.0.0")]).await;
    write_rules(&registry, "routes", "otherwise => ~ip'10.0.0.1'").await;
    let view = ServiceView::open(registry.clone(), SERVICE).await.unwrap();
    until(&view, "two instances", |s| s.instances.len() == 2).await;
    let plain = call("1.0.0");
    assert_eq!(picked(&view, &plain), [2].into());

    // A typo on a new line: the blacklist stays in force, and the error shows.
    write_rules(
        &registry,
        "routes",
        "otherwise => ~ip'10.0.0.1'\nmethod match 'x' => ip'1.2.3'",
    )
    .await;
    until(&view, "the parse error", |s| !s.errors.is_empty()).await;
    assert_eq!(view.snapshot().routes.len(), 1);
    assert_eq!(picked(&view, &plain), [2].into());

    // Fixed (here: no rules at all), it applies and the error goes.
    write_rules(&registry, "routes", "").await;
    until(&view, "no error", |s| s.errors.is_empty()).await;
    assert_eq!(picked(&view, &plain), [1, 2].into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_that_never_parsed_fail_selection_until_they_do() {
    let (registry, _providers) = with_providers(&[(1, "1.0.0"), (2, "1.0.0")]).await;
    // A consumer starting while a typo sits below a blacklist: no rules are known.
    write_rules(
        &registry,
        "routes",
        "otherwise => ~ip'10.0.0.1'\nmethod match 'x' => ip'1.2.3'",
    )
    .await;
    // Cookie rules the same way, as they feed routing.
    write_rules(&registry, "cookies", "method match =>").await;
    let view = ServiceView::open(registry.clone(), SERVICE).await.unwrap();
    until(&view, "two instances", |s| s.instances.len() == 2).await;
    assert_eq!(view.snapshot().unparsed_rules.len(), 2);
    let plain = call("1.0.0");
    for _ in 0..100 {
        match view.select(&plain, &SelectOptions::default()) {
            Err(SoaError::RulesUnparsed { path, error, .. }) => {
                assert_eq!(path.as_str(), format!("/soa/config/routes/{SERVICE}"));
                assert_eq!(error.line, 2, "{error}");
            }
            other => panic!("selected despite unparsed routes: {other:?}"),
        }
    }

    // Fixed, the rules apply and selection works.
    write_rules(&registry, "routes", "otherwise => ~ip'10.0.0.1'").await;
    write_rules(&registry, "cookies", "").await;
    until(&view, "rules parsed", |s| s.unparsed_rules.is_empty()).await;
    assert_eq!(picked(&view, &plain), [2].into());
    // From then on a typo keeps the last good rules, as before.
    write_rules(&registry, "routes", "otherwise =>").await;
    until(&view, "the parse error", |s| !s.errors.is_empty()).await;
    assert!(view.snapshot().unparsed_rules.is_empty());
    assert_eq!(picked(&view, &plain), [2].into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_active_picks_by_the_calls_started_through_the_view() {
    let (registry, _providers) = with_providers(&[(1, "1.0.0"), (2, "1.0.0")]).await;
    let config = NodePath::new(format!("/soa/config/services/{SERVICE}")).unwrap();
    registry
        .set(
            &config,
            Bytes::from("loadBalance/leastActive"),
            Expected::Any,
        )
        .await
        .unwrap();
    let view = ServiceView::open(registry.clone(), SERVICE).await.unwrap();
    until(&view, "two instances, leastActive", |s| {
        s.instances.len() == 2 && s.config.load_balance.default.is_some()
    })
    .await;
    let plain = call("1.0.0");
    let start = || view.start_call(&plain, &SelectOptions::default()).unwrap();
    // Calls held open spread evenly: each new one goes where fewer are in flight.
    let held: Vec<_> = (0..10).map(|_| start()).collect();
    let on = |octet: u8| {
        held.iter()
            .filter(|c| c.instance.address.ip.octets()[3] == octet)
            .count()
    };
    assert_eq!((on(1), on(2)), (5, 5));
    // One more call open on an instance: every call that starts and ends meanwhile avoids it.
    let busy = start();
    let busy_octet = busy.instance.address.ip.octets()[3];
    for _ in 0..100 {
        let call = start();
        assert_ne!(call.instance.address.ip.octets()[3], busy_octet);
    }
    drop(busy);
    let address = held[0].instance.address;
    assert_eq!(view.balancer().active_calls(address), 5);
    drop(held);
    assert_eq!(view.balancer().active_calls(address), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookies_added_by_rules_steer_routing() {
    let (registry, _providers) = with_providers(&[(1, "1.0.0"), (2, "1.0.0")]).await;
    write_rules(&registry, "cookies", "method match 'get' => c\"tier#gold\"").await;
    write_rules(
        &registry,
        "routes",
        "cookie_tier match 'gold' => ip'10.0.0.2'",
    )
    .await;
    let view = ServiceView::open(registry.clone(), SERVICE).await.unwrap();
    until(&view, "instances and rules", |s| {
        s.instances.len() == 2 && !s.routes.is_empty() && !s.cookies.is_empty()
    })
    .await;
    // The rule adds tier=gold, replacing the caller's own tier.
    let mut silver = call("1.0.0");
    silver.cookies.insert("tier".into(), "silver".into());
    assert_eq!(picked(&view, &call("1.0.0")), [2].into());
    assert_eq!(picked(&view, &silver), [2].into());
    // Another method gets no cookie: its own tier decides (no route matches silver).
    let mut other = silver.clone();
    other.method = "other".into();
    assert_eq!(picked(&view, &other), [1, 2].into());
    let mut gold = other.clone();
    gold.cookies.insert("tier".into(), "gold".into());
    assert_eq!(picked(&view, &gold), [2].into());
}

/// The cookies a rule adds reach the call that is sent, once: routing saw the call plus
/// them, not the call with them applied twice (a rule on an added cookie does not fire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_applying_cookies_adds_them_to_the_call_once() {
    let (registry, _providers) = with_providers(&[(1, "1.0.0"), (2, "1.0.0")]).await;
    write_rules(
        &registry,
        "cookies",
        "cookie_tier match 'gold' => c\"zone#b\"\nmethod match 'get' => c\"tier#gold\"",
    )
    .await;
    write_rules(&registry, "routes", "cookie_zone match 'b' => ip'10.0.0.1'").await;
    let view = ServiceView::open(registry.clone(), SERVICE).await.unwrap();
    until(&view, "instances and rules", |s| {
        s.instances.len() == 2 && !s.routes.is_empty() && s.cookies.len() == 2
    })
    .await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..300 {
        let mut sent = call("1.0.0");
        let instance = view
            .select_applying_cookies(&mut sent, &SelectOptions::default())
            .unwrap();
        seen.insert(instance.address.ip.octets()[3]);
        assert_eq!(
            sent.cookies,
            HashMap::from([("tier".to_owned(), "gold".to_owned())])
        );
    }
    // zone=b was never added, so its route never applied: both instances serve.
    assert_eq!(seen, [1, 2].into());
    // Nothing picked, nothing added.
    let mut none = call("9.0.0");
    assert!(view
        .select_applying_cookies(&mut none, &SelectOptions::default())
        .is_err());
    assert!(none.cookies.is_empty());
}

/// A call that leaves `service` empty is a call to the view's service: a blacklist on the
/// service applies to it (a blank value matches no rule, so it used to be skipped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_a_service_name_meets_the_services_rules() {
    let (registry, _providers) = with_providers(&[(1, "1.0.0"), (2, "1.0.0")]).await;
    write_rules(
        &registry,
        "routes",
        &format!("service match '{SERVICE}' ; method match 'get' => ~ip'10.0.0.1'"),
    )
    .await;
    let view = ServiceView::open(registry.clone(), SERVICE).await.unwrap();
    until(&view, "instances and routes", |s| {
        s.instances.len() == 2 && !s.routes.is_empty()
    })
    .await;
    let unnamed = CallContext {
        service: String::new(),
        ..call("1.0.0")
    };
    assert_eq!(picked(&view, &unnamed), [2].into());
    assert_eq!(picked(&view, &call("1.0.0")), [2].into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_keeps_to_its_own_instances_across_versions() {
    let (registry, _providers) =
        with_providers(&[(1, "1.0.0"), (2, "1.0.0"), (3, "1.1.0"), (4, "1.1.0")]).await;
    write_rules(
        &registry,
        "routes",
        "method match 'get' => ip'10.0.0.1', ip'10.0.0.3'\n\
         method match 'put' => ~ip'10.0.0.1', ~ip'10.0.0.3'\n\
         method match 'none' => ip'10.0.9.9'",
    )
    .await;
    let view = ServiceView::open(registry.clone(), SERVICE).await.unwrap();
    until(&view, "instances and routes", |s| {
        s.instances.len() == 4 && s.routes.len() == 3
    })
    .await;
    let of = |method: &str, version: &str| {
        let mut ctx = call(version);
        ctx.method = method.into();
        picked(&view, &ctx)
    };
    // Interleaved, so each (version, route) pair's remembered part is used after the others.
    for _ in 0..2 {
        assert_eq!(of("get", "1.0.0"), [1, 3].into());
        assert_eq!(of("put", "1.0.0"), [2, 4].into());
        assert_eq!(of("get", "1.1.0"), [3].into());
        assert_eq!(of("put", "1.1.0"), [4].into());
        assert_eq!(of("other", "1.1.0"), [3, 4].into());
    }
    let mut none = call("1.0.0");
    none.method = "none".into();
    assert!(matches!(
        view.select(&none, &SelectOptions::default()),
        Err(SoaError::RoutingExcludedAll { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_on_the_user_are_decided_per_call_among_routes_on_the_method() {
    let (registry, _providers) = with_providers(&[(1, "1.0.0"), (2, "1.0.0")]).await;
    write_rules(&registry, "routes", "method match 'get' => ip'10.0.0.1'").await;
    let view = ServiceView::open(registry.clone(), SERVICE).await.unwrap();
    until(&view, "instances and routes", |s| {
        s.instances.len() == 2 && s.routes.len() == 1
    })
    .await;
    let of = |user: Option<i64>| {
        let mut ctx = call("1.0.0");
        ctx.user_id = user;
        picked(&view, &ctx)
    };
    assert_eq!(of(None), [1].into());
    // A rule on the user: the same method and version now route by who calls.
    write_rules(
        &registry,
        "routes",
        "userId match 7 => ip'10.0.0.2'\nmethod match 'get' => ip'10.0.0.1'",
    )
    .await;
    until(&view, "two routes", |s| s.routes.len() == 2).await;
    for _ in 0..2 {
        assert_eq!(of(Some(7)), [2].into());
        assert_eq!(of(Some(8)), [1].into());
        assert_eq!(of(None), [1].into());
    }
}

/// An event that changes nothing the view shows (a provider creating the service's empty
/// config node, a write of the same empty text) does not wake `changes()` subscribers: the
/// next change they see is the next real one, one generation on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_changes_nothing_visible_is_not_a_change() {
    let store = MemoryStore::new();
    let registry: Arc<dyn Registry> = Arc::new(
        MemoryRegistry::connect(&store, MemoryOptions::default())
            .await
            .unwrap(),
    );
    let view = ServiceView::open(registry.clone(), SERVICE).await.unwrap();
    let before = view.snapshot();
    let mut changes = view.changes();
    let config = registry_soa::layout::ServicePaths::new(SERVICE)
        .unwrap()
        .config;
    // All three on the one node, so its watch reports them in this order: an empty config
    // says what a missing one says.
    registry
        .create(&config, Bytes::new(), registry_core::CreateMode::Persistent)
        .await
        .unwrap();
    registry
        .set(&config, Bytes::new(), Expected::Any)
        .await
        .unwrap();
    registry
        .set(&config, Bytes::from("timeout/800ms"), Expected::Any)
        .await
        .unwrap();
    let changed = tokio::time::timeout(Duration::from_secs(10), changes.changed()).await;
    assert!(matches!(changed, Ok(Ok(()))), "no change within 10 s");
    let after = view.snapshot();
    if after.config == before.config {
        panic!("woken by an event that changed nothing: {after:?}");
    }
    assert_eq!(after.generation, before.generation + 1, "{after:?}");
}
