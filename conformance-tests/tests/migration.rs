//! The README's migration runbook, run end to end on a real ZooKeeper and a real etcd while a
//! consumer keeps selecting instances: copy config, mirror it, providers on dual
//! registration, consumers switch to etcd, providers drop ZooKeeper, stop the mirror.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conformance_tests::harness::{EtcdServer, ZkConfig, ZkServer};
use conformance_tests::support::eventually;
use registry_core::migrate::{self, CopyOptions, Mirror};
use registry_core::{Bytes, CreateMode, DualOptions, DualRegistry, Expected, NodePath, Registry};
use registry_etcd::{EtcdOptions, EtcdRegistry};
use registry_soa::routes::CallContext;
use registry_soa::{Address, Provider, SelectOptions, ServiceView, SoaError};
use registry_zk::{ZkOptions, ZkRegistry};

const SERVICE: &str = "com.today.service.goods.GoodsService";
const PROVIDERS: [&str; 3] = ["10.0.2.1:9090", "10.0.2.2:9090", "10.0.2.3:9090"];

fn path(s: &str) -> NodePath {
    NodePath::new(s).unwrap()
}

fn call() -> CallContext {
    CallContext {
        service: SERVICE.into(),
        method: "getGoods".into(),
        version: "1.0.0".into(),
        ..Default::default()
    }
}

/// What the consumer saw: selections, and calls that found no instance.
#[derive(Default)]
struct Seen {
    selections: AtomicU64,
    empty: AtomicU64,
    other_errors: Mutex<Vec<String>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runbook_moves_a_live_dapeng_tree_from_zookeeper_to_etcd() {
    let zk = ZkServer::start(ZkConfig {
        tick_time: Duration::from_millis(200),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let etcd = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let (zk_addr, etcd_addr) = (zk.connect_string(), etcd.endpoint());
    let open_zk = || {
        let addr = zk_addr.clone();
        async move {
            let options = ZkOptions::new([addr]).with_session_ttl(Duration::from_secs(4));
            Arc::new(ZkRegistry::connect(options).await.unwrap()) as Arc<dyn Registry>
        }
    };
    let open_etcd = || {
        let addr = etcd_addr.clone();
        async move {
            let options = EtcdOptions::new([addr]).with_session_ttl(Duration::from_secs(2));
            Arc::new(EtcdRegistry::connect(options).await.unwrap()) as Arc<dyn Registry>
        }
    };

    // Before: everything on ZooKeeper. Config, routes, and three live providers.
    let zk_operator = open_zk().await;
    let etcd_operator = open_etcd().await;
    let config = path(&format!("/soa/config/services/{SERVICE}"));
    let routes = path(&format!("/soa/config/routes/{SERVICE}"));
    let mut providers = Vec::new();
    for address in PROVIDERS {
        let client = open_zk().await;
        let address: Address = address.parse().unwrap();
        providers.push(
            Provider::register(&client, SERVICE, address, "1.0.0")
                .await
                .unwrap(),
        );
    }
    zk_operator
        .set(
            &config,
            Bytes::from("timeout/800ms;loadBalance/roundRobin"),
            Expected::Any,
        )
        .await
        .unwrap();
    zk_operator
        .set(
            &routes,
            Bytes::from("method match 'getGoods' => ~ip'10.9.9.9'"),
            Expected::Any,
        )
        .await
        .unwrap();
    zk_operator
        .create(
            &path("/soa/config/services/global-note"),
            Bytes::from("kept as is"),
            CreateMode::Persistent,
        )
        .await
        .unwrap();

    // Two consumers select continuously, each from its current view: `plain` switches from
    // ZooKeeper to etcd once every provider is on both; `merging` switches early, to etcd
    // merged with ZooKeeper, then to etcd alone at the end.
    let zk_view = Arc::new(
        ServiceView::open(zk_operator.clone(), SERVICE)
            .await
            .unwrap(),
    );
    wait_instances(&zk_view, 3).await;
    let plain = Arc::new(Mutex::new(zk_view.clone()));
    let merging = Arc::new(Mutex::new(zk_view.clone()));
    let consumers = [plain.clone(), merging.clone()];
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let selector = {
        let (seen, stop) = (seen.clone(), stop.clone());
        tokio::spawn(async move {
            // Bounded by the test: stop is set before the end; 10 minutes at most anyway.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
            while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
                for consumer in &consumers {
                    let view = consumer.lock().unwrap().clone();
                    match view.select(&call(), &SelectOptions::default()) {
                        Ok(_) => seen.selections.fetch_add(1, Ordering::Relaxed),
                        Err(SoaError::NoInstance { .. }) => {
                            seen.empty.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(other) => {
                            seen.other_errors.lock().unwrap().push(other.to_string());
                            0
                        }
                    };
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };

    // 1. Copy config.
    let soa_config = path("/soa/config");
    let copied = migrate::copy(
        &*zk_operator,
        &*etcd_operator,
        &soa_config,
        CopyOptions::default(),
        |_, _| {},
    )
    .await
    .unwrap();
    assert!(copied.created >= 5, "{copied:?}");

    // 2. Mirror it; an operator keeps changing config on ZooKeeper meanwhile.
    let mirror = Mirror::start(
        zk_operator.clone(),
        etcd_operator.clone(),
        soa_config.clone(),
    );
    mirror.wait_synced(Duration::from_secs(20)).await.unwrap();
    zk_operator
        .set(
            &config,
            Bytes::from("timeout/900ms;loadBalance/roundRobin"),
            Expected::Any,
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "config change mirrored", || {
        let etcd_operator = etcd_operator.clone();
        let config = config.clone();
        async move {
            etcd_operator
                .get(&config)
                .await
                .is_ok_and(|n| n.value == "timeout/900ms;loadBalance/roundRobin")
        }
    })
    .await;

    // 3. Providers move to dual registration (ZooKeeper primary, etcd secondary), one by one;
    // each restarts while the others serve.
    for slot in 0..providers.len() {
        let old = providers.remove(slot);
        let address = old.address();
        old.shutdown().await.unwrap();
        let dual: Arc<dyn Registry> = Arc::new(DualRegistry::new(
            open_zk().await,
            open_etcd().await,
            DualOptions::new(),
        ));
        providers.insert(
            slot,
            Provider::register(&dual, SERVICE, address, "1.0.0")
                .await
                .unwrap(),
        );
        wait_instances(&zk_view, 3).await;
        if slot == 0 {
            // One provider is on etcd so far: merged with ZooKeeper, etcd shows all three.
            let merged: Arc<dyn Registry> = Arc::new(DualRegistry::new(
                open_etcd().await,
                open_zk().await,
                DualOptions::new().with_merge_reads(true),
            ));
            let merged_view = Arc::new(ServiceView::open(merged, SERVICE).await.unwrap());
            wait_instances(&merged_view, 3).await;
            *merging.lock().unwrap() = merged_view;
        }
    }

    // 4. Consumers switch to etcd, once it shows every instance.
    let etcd_view = Arc::new(ServiceView::open(open_etcd().await, SERVICE).await.unwrap());
    wait_instances(&etcd_view, 3).await;
    assert_eq!(
        etcd_view.snapshot().routes.len(),
        1,
        "routes did not reach etcd"
    );
    *plain.lock().unwrap() = etcd_view.clone();
    drop(zk_view);

    // 5. Providers drop ZooKeeper, one by one.
    for slot in 0..providers.len() {
        let old = providers.remove(slot);
        let address = old.address();
        old.shutdown().await.unwrap();
        let etcd_only = open_etcd().await;
        providers.insert(
            slot,
            Provider::register(&etcd_only, SERVICE, address, "1.0.0")
                .await
                .unwrap(),
        );
        wait_instances(&etcd_view, 3).await;
    }

    // 6. Stop the mirror; the merging consumer drops ZooKeeper too.
    *merging.lock().unwrap() = etcd_view.clone();
    let status = mirror.stop().await;
    assert!(status.applied >= 1, "{status:?}");
    stop.store(true, Ordering::Relaxed);
    selector.await.unwrap();

    let empty = seen.empty.load(Ordering::Relaxed);
    let selections = seen.selections.load(Ordering::Relaxed);
    assert_eq!(
        empty, 0,
        "the consumer saw no instance {empty} times ({selections} selections)"
    );
    assert!(selections > 100, "only {selections} selections");
    assert!(
        seen.other_errors.lock().unwrap().is_empty(),
        "{:?}",
        seen.other_errors.lock().unwrap()
    );
    // ZooKeeper holds no instance any more; etcd's tree equals the source's.
    let runtime = path(&format!("/soa/runtime/services/{SERVICE}"));
    assert!(zk_operator
        .children(&runtime)
        .await
        .unwrap()
        .nodes
        .is_empty());
    assert_eq!(
        etcd_operator.children(&runtime).await.unwrap().nodes.len(),
        3
    );
    let differences = migrate::diff(&*zk_operator, &*etcd_operator, &path("/soa"))
        .await
        .unwrap();
    assert!(
        differences.is_empty(),
        "etcd differs from the source: {differences:?}"
    );
}

async fn wait_instances(view: &ServiceView, n: usize) {
    let mut changes = view.changes();
    let reached = tokio::time::timeout(Duration::from_secs(20), async {
        while view.snapshot().instances.len() != n {
            if changes.changed().await.is_err() {
                return false;
            }
        }
        true
    })
    .await;
    assert_eq!(
        reached,
        Ok(true),
        "view did not reach {n} instances within 20 s (has {})",
        view.snapshot().instances.len()
    );
}
