//! A provider: registers `--address` as an instance of `--service` and stays registered until
//! SIGTERM or Ctrl-C, then deregisters before exiting (as a service drains its requests).
//!
//! `provider --url etcd://127.0.0.1:2379 --service com.today.Goods --address 10.0.0.1:9090`

use std::process::ExitCode;

use clap::Parser;
use registry_soa::{Address, Provider};
use soa_demo::say;

#[derive(Parser)]
struct Args {
    /// Registry URL: etcd://, zk:// (mem:// lives only inside this process).
    #[arg(long, env = "REGISTRY_URL")]
    url: String,
    /// Service name.
    #[arg(long)]
    service: String,
    /// ip:port this instance serves on.
    #[arg(long)]
    address: Address,
    /// Instance version.
    #[arg(long, default_value = "1.0.0")]
    version: String,
}

async fn run(args: Args) -> Result<(), String> {
    let registry = registry::connect(&args.url)
        .await
        .map_err(|e| e.to_string())?;
    let provider = Provider::register(&registry, &args.service, args.address, &args.version)
        .await
        .map_err(|e| e.to_string())?;
    let path = provider.path().map(|p| p.to_string()).unwrap_or_default();
    say(format_args!("registered {path}"));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    provider.shutdown().await.map_err(|e| e.to_string())?;
    say(format_args!("deregistered {path}"));
    registry.close().await.map_err(|e| e.to_string())?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    soa_demo::main_with("provider", run(Args::parse())).await
}
