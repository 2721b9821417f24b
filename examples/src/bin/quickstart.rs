//! The README's demo: Dapeng-style providers register instances and a consumer watches them,
//! on the embedded in-memory backend (no server needed).
//!
//! Run: `cargo run -p registry-examples --bin quickstart`

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use registry_core::memory::{MemoryOptions, MemoryRegistry, MemoryStore};
use registry_core::{
    Bytes, CreateMode, Error, NodePath, RegisterOptions, Registry, WatchEvent, WatchOptions,
    WatchStream, WatchedState,
};

const SERVICE: &str = "/soa/runtime/services/com.today.service.goods.GoodsService";

fn describe(event: &WatchEvent) -> String {
    match event {
        WatchEvent::Snapshot(s) => format!("snapshot: {} instance(s)", s.nodes.len()),
        WatchEvent::Created(n) => format!("+ {}", n.path.name()),
        WatchEvent::Updated(n) => format!("~ {}", n.path.name()),
        WatchEvent::Deleted(n) => format!("- {}", n.path.name()),
        WatchEvent::Resync { snapshot, reason } => {
            format!("resync ({reason:?}): {} instance(s)", snapshot.nodes.len())
        }
    }
}

/// Waits for the consumer's next event, applies it to its view and prints both.
async fn next(
    stream: &mut WatchStream,
    view: &mut WatchedState,
    expect: &'static str,
) -> Result<(), Error> {
    let wait = Duration::from_secs(5);
    let item = tokio::time::timeout(wait, stream.next())
        .await
        .map_err(|_| Error::Timeout {
            operation: format!("waiting for: {expect}"),
            after: wait,
        })?
        .ok_or(Error::Closed)??;
    view.apply(&item);
    let names: Vec<_> = view.nodes().map(|n| n.path.name().to_owned()).collect();
    println!("consumer: {:<44} now {:?}", describe(&item), names);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    let store = MemoryStore::new();
    let service = NodePath::new(SERVICE)?;

    // An operator writes the service's config, as Dapeng's admin console would.
    let admin: Arc<dyn Registry> =
        Arc::new(MemoryRegistry::connect(&store, MemoryOptions::default()).await?);
    let config = NodePath::new("/soa/config/services/com.today.service.goods.GoodsService")?;
    admin
        .create(
            &config,
            Bytes::from("timeout/800ms;loadBalance/leastActive"),
            CreateMode::Persistent,
        )
        .await?;
    admin
        .create(&service, Bytes::new(), CreateMode::Persistent)
        .await?;

    // The consumer watches the service's instances before any provider starts.
    let consumer: Arc<dyn Registry> =
        Arc::new(MemoryRegistry::connect(&store, MemoryOptions::default()).await?);
    let mut instances = consumer.watch(&service, WatchOptions::children()).await?;
    let mut view = WatchedState::new();
    next(&mut instances, &mut view, "snapshot").await?;

    // Three providers register `ip:port:version:` + a sequence, as Dapeng names instances.
    let mut providers = Vec::new();
    let mut registrations = Vec::new();
    for ip in ["192.168.1.101", "192.168.1.102", "192.168.1.103"] {
        let provider = MemoryRegistry::connect(&store, MemoryOptions::default()).await?;
        let prefix = service.join(&format!("{ip}:9081:1.0.0:"))?;
        let registration = provider
            .register(&prefix, Bytes::new(), RegisterOptions::new().sequential())
            .await?;
        println!(
            "provider {ip}: registered {}",
            registration
                .path()
                .map(|p| p.to_string())
                .unwrap_or_default()
        );
        registrations.push(registration);
        providers.push(provider);
        next(&mut instances, &mut view, "instance registered").await?;
    }
    let master = view
        .nodes()
        .min_by_key(|n| n.create_order)
        .map(|n| n.path.name().to_owned());
    println!(
        "master of GoodsService:1.0.0 (lowest sequence): {}",
        master.unwrap_or_default()
    );

    // The first provider's session expires (a long GC pause): its instance disappears, then
    // its registration heals itself under a new session with a new sequence number.
    let victim = providers[0].session().session_id.ok_or(Error::Closed)?;
    println!("-- session {victim} of 192.168.1.101 expires");
    store.expire_session(victim)?;
    next(&mut instances, &mut view, "instance gone").await?;
    next(&mut instances, &mut view, "instance back").await?;

    // The second provider shuts down gracefully: deregister first, then drain requests.
    println!("-- 192.168.1.102 shuts down gracefully");
    let graceful = registrations.remove(1);
    graceful.deregister().await?;
    next(&mut instances, &mut view, "instance deregistered").await?;

    let config_now = consumer.get(&config).await?;
    println!(
        "consumer: config of GoodsService = {:?}",
        String::from_utf8_lossy(&config_now.value)
    );
    println!("consumer: {} live instance(s) at the end", view.len());
    for provider in &providers {
        provider.close().await?;
    }
    consumer.close().await?;
    admin.close().await?;
    Ok(())
}
