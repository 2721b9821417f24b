//! A consumer: follows `--service` and prints its instances (and a selected one) after every
//! change, until Ctrl-C (or after `--changes N` changes).
//!
//! `consumer --url zk://127.0.0.1:2181 --service com.today.Goods --method getGoods`

use std::process::ExitCode;

use clap::Parser;
use registry_soa::master::master_of;
use registry_soa::routes::CallContext;
use registry_soa::{SelectOptions, ServiceView};
use soa_demo::say;

#[derive(Parser)]
struct Args {
    /// Registry URL: etcd://, zk:// (mem:// lives only inside this process).
    #[arg(long, env = "REGISTRY_URL")]
    url: String,
    /// Service name.
    #[arg(long)]
    service: String,
    /// Method to select an instance for.
    #[arg(long, default_value = "ping")]
    method: String,
    /// Version the consumer was built against.
    #[arg(long, default_value = "1.0.0")]
    version: String,
    /// Stop after this many changes.
    #[arg(long)]
    changes: Option<u64>,
}

async fn run(args: Args) -> Result<(), String> {
    let registry = registry::connect(&args.url)
        .await
        .map_err(|e| e.to_string())?;
    let view = ServiceView::open(registry.clone(), &args.service)
        .await
        .map_err(|e| e.to_string())?;
    let call = CallContext {
        service: args.service.clone(),
        method: args.method.clone(),
        version: args.version.clone(),
        ..Default::default()
    };
    let mut changes = view.changes();
    let mut seen = 0u64;
    loop {
        let snap = view.snapshot();
        let list: Vec<String> = snap
            .instances
            .iter()
            .map(|i| format!("{}@{}", i.address, i.version.as_deref().unwrap_or("-")))
            .collect();
        let master = master_of(&snap.instances)
            .map(|m| m.address.to_string())
            .unwrap_or_else(|| "-".into());
        // The call as it would be sent: with the cookies the service's cookie rules add.
        let mut sent = call.clone();
        let chosen = match view.select_applying_cookies(&mut sent, &SelectOptions::default()) {
            Ok(i) => i.address.to_string(),
            Err(e) => format!("({e})"),
        };
        let mut cookies: Vec<String> = sent
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        cookies.sort();
        say(format_args!(
            "instances [{}] master {master} selected {chosen}{}{}",
            list.join(", "),
            if cookies.is_empty() {
                String::new()
            } else {
                format!(" cookies {}", cookies.join(","))
            },
            if snap.stale { " (stale)" } else { "" }
        ));
        if args.changes.is_some_and(|n| seen >= n) {
            break;
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            _ = tokio::signal::ctrl_c() => break,
        }
        seen += 1;
    }
    registry.close().await.map_err(|e| e.to_string())?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    soa_demo::main_with("consumer", run(Args::parse())).await
}
