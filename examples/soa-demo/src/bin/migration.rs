//! The README's ZooKeeper-to-etcd runbook, step by step, on a live Dapeng tree: providers keep
//! serving and a consumer keeps selecting instances the whole time; it fails if any selection
//! found no instance or the target does not end equal to the source.
//!
//! `migration` runs on two in-memory stores (no server needed);
//! `migration --from zk://127.0.0.1:2181 --to etcd://127.0.0.1:2379` runs it for real. It
//! writes the demo service's config, routes and instances under `/soa` on both sides and
//! removes the instances (not the config) at the end.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use registry::migrate::{self, CopyOptions, Mirror};
use registry::{
    Bytes, DualOptions, DualRegistry, Expected, NodePath, Registry, WatchOptions, WatchedState,
};
use registry_soa::routes::CallContext;
use registry_soa::{Address, Provider, SelectOptions, ServiceView, SoaError};
use soa_demo::say;

#[derive(Parser)]
struct Args {
    /// The registry to move from (ZooKeeper in production).
    #[arg(long, default_value = "mem://zookeeper")]
    from: String,
    /// The registry to move to (etcd in production).
    #[arg(long, default_value = "mem://etcd")]
    to: String,
    /// The demo service.
    #[arg(long, default_value = "com.today.service.goods.GoodsService")]
    service: String,
    /// Provider instances (ip:port), each moved in turn.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10.0.2.1:9090,10.0.2.2:9090"
    )]
    instances: Vec<Address>,
}

/// Longest any one step may take.
const STEP: Duration = Duration::from_secs(20);

/// A consumer: selects from whichever view it reads now and counts what it found.
struct Consumer {
    view: Mutex<Arc<ServiceView>>,
    call: CallContext,
    selections: AtomicU64,
    empty: AtomicU64,
}

impl Consumer {
    fn select_once(&self) {
        let view = self.view.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let counter = match view.select(&self.call, &SelectOptions::default()) {
            Err(SoaError::NoInstance { .. }) => &self.empty,
            _ => &self.selections,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn read_from(&self, view: Arc<ServiceView>) {
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = view;
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Waits (at most [`STEP`]) until `view` shows `n` instances.
async fn until_instances(view: &ServiceView, n: usize) -> Result<(), String> {
    let mut changes = view.changes();
    let reached = tokio::time::timeout(STEP, async {
        while view.snapshot().instances.len() != n {
            if changes.changed().await.is_err() {
                return false;
            }
        }
        true
    })
    .await;
    match reached {
        Ok(true) => Ok(()),
        _ => Err(format!(
            "the view did not reach {n} instances within {STEP:?} (has {})",
            view.snapshot().instances.len()
        )),
    }
}

async fn run(args: Args) -> Result<(), String> {
    let (from_url, to_url) = (args.from.as_str(), args.to.as_str());
    let open = |url: &str| {
        let url = url.to_owned();
        async move { registry::connect(&url).await.map_err(err) }
    };
    let source = open(from_url).await?;
    let target = open(to_url).await?;
    let service = args.service.as_str();
    let config = NodePath::new(format!("/soa/config/services/{service}")).map_err(err)?;
    let routes = NodePath::new(format!("/soa/config/routes/{service}")).map_err(err)?;
    let root = NodePath::new("/soa/config").map_err(err)?;

    // The world before: providers (they create the service's nodes), config and routes on
    // the source only.
    let mut providers = Vec::new();
    for &address in &args.instances {
        let client = open(from_url).await?;
        providers.push(
            Provider::register(&client, service, address, "1.0.0")
                .await
                .map_err(err)?,
        );
    }
    source
        .set(
            &config,
            Bytes::from("timeout/800ms;loadBalance/roundRobin"),
            Expected::Any,
        )
        .await
        .map_err(err)?;
    source
        .set(
            &routes,
            Bytes::from("method match 'getGoods' => ~ip'10.9.9.9'"),
            Expected::Any,
        )
        .await
        .map_err(err)?;
    let n = providers.len();
    let source_view = Arc::new(
        ServiceView::open(source.clone(), service)
            .await
            .map_err(err)?,
    );
    until_instances(&source_view, n).await?;
    say(format_args!(
        "before: {n} instance(s) of {service} on {from_url}"
    ));

    // A consumer selects nonstop from whichever view it currently reads, and once more after
    // every step.
    let consumer = Arc::new(Consumer {
        view: Mutex::new(source_view.clone()),
        call: CallContext {
            service: service.to_owned(),
            method: "getGoods".into(),
            version: "1.0.0".into(),
            ..Default::default()
        },
        selections: AtomicU64::new(0),
        empty: AtomicU64::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let selector = {
        let (consumer, stop) = (consumer.clone(), stop.clone());
        tokio::spawn(async move {
            // Bounded: the steps below finish well within this.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
            while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
                consumer.select_once();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };

    // 1. Copy the config (persistent nodes only; instances belong to their providers).
    let dry = CopyOptions { dry_run: true };
    let would = migrate::copy(&*source, &*target, &root, dry, |_, _| {})
        .await
        .map_err(err)?;
    say(format_args!(
        "1. copy --dry-run: would create {}, update {}",
        would.created, would.updated
    ));
    let copied = migrate::copy(&*source, &*target, &root, CopyOptions::default(), |_, _| {})
        .await
        .map_err(err)?;
    say(format_args!(
        "   copy: created {}, updated {}, unchanged {}",
        copied.created, copied.updated, copied.unchanged
    ));

    // 2. Mirror it, so operators keep editing config on the source during the move.
    let mirror = Mirror::start(source.clone(), target.clone(), root.clone());
    mirror.wait_synced(STEP).await.map_err(err)?;
    let edited = Bytes::from("timeout/900ms;loadBalance/roundRobin");
    let mut on_target = target
        .watch(&config, WatchOptions::node())
        .await
        .map_err(err)?;
    source
        .set(&config, edited.clone(), Expected::Any)
        .await
        .map_err(err)?;
    let mut state = WatchedState::new();
    let mirrored = tokio::time::timeout(STEP, async {
        while let Some(event) = on_target.next().await {
            state.apply(&event?);
            if state.get(&config).is_some_and(|n| n.value == edited) {
                return Ok(true);
            }
        }
        Ok::<_, registry::Error>(false)
    })
    .await;
    if !matches!(mirrored, Ok(Ok(true))) {
        return Err(format!(
            "the config edit did not reach {to_url} within {STEP:?}: {mirrored:?}"
        ));
    }
    say(format_args!(
        "2. mirror: a config edit on {from_url} reached {to_url}"
    ));

    // 3. Providers move to dual registration one at a time (source stays primary).
    for slot in 0..n {
        let old = providers.remove(slot);
        let address = old.address();
        old.shutdown().await.map_err(err)?;
        let dual: Arc<dyn Registry> = Arc::new(DualRegistry::new(
            open(from_url).await?,
            open(to_url).await?,
            DualOptions::new(),
        ));
        providers.insert(
            slot,
            Provider::register(&dual, service, address, "1.0.0")
                .await
                .map_err(err)?,
        );
        until_instances(&source_view, n).await?;
        consumer.select_once();
        say(format_args!("3. provider {address}: registered on both"));
    }

    // 4. The consumer switches once the target shows every instance.
    let target_view = Arc::new(
        ServiceView::open(target.clone(), service)
            .await
            .map_err(err)?,
    );
    until_instances(&target_view, n).await?;
    consumer.read_from(target_view.clone());
    consumer.select_once();
    say(format_args!(
        "4. consumer: reads {to_url} ({n} instance(s), {} route rule(s))",
        target_view.snapshot().routes.len()
    ));

    // 5. Providers drop the source, one at a time.
    for slot in 0..n {
        let old = providers.remove(slot);
        let address = old.address();
        old.shutdown().await.map_err(err)?;
        let client = open(to_url).await?;
        providers.insert(
            slot,
            Provider::register(&client, service, address, "1.0.0")
                .await
                .map_err(err)?,
        );
        until_instances(&target_view, n).await?;
        consumer.select_once();
        say(format_args!(
            "5. provider {address}: registered on {to_url} only"
        ));
    }

    // 6. Stop mirroring; the config must be equal on both sides.
    let status = mirror.stop().await;
    let differences = migrate::diff(&*source, &*target, &root)
        .await
        .map_err(err)?;
    say(format_args!(
        "6. mirror stopped after {} change(s); differences under {root}: {}",
        status.applied,
        differences.len()
    ));
    stop.store(true, Ordering::Relaxed);
    selector.await.map_err(err)?;
    let (selections, empty) = (
        consumer.selections.load(Ordering::Relaxed),
        consumer.empty.load(Ordering::Relaxed),
    );
    say(format_args!(
        "consumer: {selections} selection(s), {empty} found no instance"
    ));

    for provider in providers {
        provider.shutdown().await.map_err(err)?;
    }
    source.close().await.map_err(err)?;
    target.close().await.map_err(err)?;
    if !differences.is_empty() {
        return Err(format!("{to_url} differs from {from_url}: {differences:?}"));
    }
    if empty > 0 || selections == 0 {
        return Err(format!(
            "{empty} of {} selections found no instance",
            selections + empty
        ));
    }
    say(format_args!(
        "done: {service} moved from {from_url} to {to_url} with no gap"
    ));
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    soa_demo::main_with("migration", run(Args::parse())).await
}
