//! `registry-bench`: our registry layer against raw `etcd-client` / `zookeeper-client` doing
//! the same work, interleaved over repetitions; prints a table and writes JSON.
//!
//! By default it starts its own etcd and ZooKeeper (loopback, temp dirs) through the
//! conformance harness; `--etcd` / `--zk` use running servers instead. `--quick` is the smoke
//! run CI uses. See `BENCHMARKS.md` for the latest results.

mod ours;
mod raw;
mod report;
mod scenarios;
mod util;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use conformance_tests::harness::{EtcdServer, ZkConfig, ZkServer};
use serde_json::json;

use ours::Backend;
use report::Row;
use scenarios::{Config, Env};
use util::{BenchResult, CountingAllocator, Ctx};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Which backends to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Which {
    /// etcd and ZooKeeper.
    All,
    /// etcd only.
    Etcd,
    /// ZooKeeper only.
    Zk,
}

/// The scenarios, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Client memory per registration and per watched node.
    Memory,
    /// Ephemeral create, register, delete and deregister latency.
    Register,
    /// get and children latency.
    Read,
    /// Write throughput with 16 and 64 writers on one client.
    Throughput,
    /// Watch event latency and fan-out.
    Watch,
    /// A burst of changes to one watcher.
    Burst,
    /// Cached lookup + pick from the live service view.
    Discovery,
    /// Owner killed -> watcher sees the node gone.
    Failure,
    /// Session lost with many registrations -> all back.
    Recovery,
}

const ALL_SCENARIOS: [Scenario; 9] = [
    Scenario::Memory,
    Scenario::Register,
    Scenario::Read,
    Scenario::Throughput,
    Scenario::Watch,
    Scenario::Burst,
    Scenario::Discovery,
    Scenario::Failure,
    Scenario::Recovery,
];

/// Benchmarks the registry layer against the raw etcd and ZooKeeper clients.
#[derive(Debug, Parser)]
#[command(name = "registry-bench", version)]
struct Cli {
    /// Smoke run: few samples and small bursts, well under a minute (what CI runs).
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Use this etcd (`host:port`) instead of starting one.
    #[arg(long, value_name = "ENDPOINT")]
    etcd: Option<String>,
    /// Use this ZooKeeper (`host:port`) instead of starting one; its tickTime should be at
    /// most 1 s so that 2 s sessions are allowed.
    #[arg(long, value_name = "CONNECT")]
    zk: Option<String>,
    /// Backends to run.
    #[arg(long, value_enum, default_value = "all")]
    backend: Which,
    /// Only these scenarios (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Scenario>,
    /// A/B repetitions of the latency, throughput and watch scenarios (default 5, quick 2).
    #[arg(long)]
    reps: Option<usize>,
    /// Registrations of the recovery scenario (default 10000, quick 500).
    #[arg(long, value_name = "N")]
    recovery: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A full run with many repetitions may outlast the harness's guard against hung tests.
    conformance_tests::harness::set_watchdog(None);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("registry-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The first `host:port` of an endpoint or connect string, resolved.
fn first_addr(target: &str) -> BenchResult<SocketAddr> {
    let first = target
        .split(',')
        .next()
        .unwrap_or(target)
        .trim()
        .trim_start_matches("http://");
    first
        .to_socket_addrs()
        .ctx(format!("resolve {first}"))?
        .next()
        .ok_or_else(|| format!("{first} resolves to no address"))
}

/// The server the harness started for one backend; stopped on drop.
enum Started {
    Etcd { _server: EtcdServer },
    Zk { _server: ZkServer },
}

/// Starts `backend`'s server on a free loopback port.
fn start_server(backend: Backend) -> BenchResult<(Started, String)> {
    match backend {
        Backend::Etcd => {
            eprintln!("starting etcd ...");
            let server = EtcdServer::start().ctx("start etcd")?;
            let endpoint = server.endpoint();
            Ok((Started::Etcd { _server: server }, endpoint))
        }
        Backend::Zk => {
            eprintln!("starting ZooKeeper ...");
            // A 200 ms tick allows the 2 s sessions of the failure scenario.
            let server = ZkServer::start(ZkConfig {
                tick_time: Duration::from_millis(200),
            })
            .ctx("start ZooKeeper")?;
            let connect = server.connect_string();
            Ok((Started::Zk { _server: server }, connect))
        }
    }
}

fn run(cli: Cli) -> BenchResult<()> {
    let mut cfg = Config::new(cli.quick, cli.reps);
    if let Some(n) = cli.recovery {
        cfg.recovery = n.max(1);
    }
    let scenarios: Vec<Scenario> = if cli.only.is_empty() {
        ALL_SCENARIOS.to_vec()
    } else {
        ALL_SCENARIOS
            .into_iter()
            .filter(|s| cli.only.contains(s))
            .collect()
    };
    let mut backends = Vec::new();
    if cli.backend != Which::Zk {
        backends.push((Backend::Etcd, cli.etcd.clone()));
    }
    if cli.backend != Which::Etcd {
        backends.push((Backend::Zk, cli.zk.clone()));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .ctx("start the tokio runtime")?;
    let started = Instant::now();
    // Servers first, then every backend's warm-up, then the rows. A JVM keeps compiling for a
    // while after it starts: started before etcd's rows, ZooKeeper cost them (16-writer
    // throughput 0.93x twice, 0.97-1.03x without it); started just before its own rows, it
    // cost ZooKeeper's (throughput 0.89-0.94x, against 0.96-1.00x when warmed earlier).
    let mut servers = Vec::new();
    let mut targets = Vec::new();
    for (backend, given) in backends {
        let target = match given {
            Some(target) => target,
            None => {
                let (server, target) = start_server(backend)?;
                servers.push(server);
                target
            }
        };
        targets.push((backend, target));
    }
    let mut rows = Vec::new();
    let result = runtime.block_on(async {
        for (backend, target) in &targets {
            warm_up(*backend, target, &cfg).await?;
        }
        for (backend, target) in &targets {
            run_backend(*backend, target, &cfg, &scenarios, &mut rows).await?;
        }
        Ok::<(), String>(())
    });
    // Background tasks (best-effort removals of dropped registrations) must not hold us up.
    runtime.shutdown_timeout(Duration::from_secs(2));
    result?;
    print!("{}", report::table(&rows));
    let notes = report::notes(&rows);
    if !notes.is_empty() {
        println!("\nNotes:\n{notes}");
    }
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    if let Some(path) = &cli.json {
        let settings = json!({
            "quick": cfg.quick,
            "reps": cfg.reps,
            "samples": cfg.samples,
            "burst": cfg.burst,
            "recovery": cfg.recovery,
            "memory": cfg.memory,
            "fanout": cfg.fanout,
            "scenarios": scenarios.iter().map(|s| format!("{s:?}").to_lowercase()).collect::<Vec<_>>(),
            "seconds": started.elapsed().as_secs_f64(),
        });
        let doc = report::document(&rows, settings);
        let text = serde_json::to_string_pretty(&doc).ctx("encode JSON")?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).ctx(format!("create {}", dir.display()))?;
        }
        std::fs::write(path, text).ctx(format!("write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Writes to `backend`'s server for the configured warm-up (see `scenarios::warm_up`).
async fn warm_up(backend: Backend, target: &str, cfg: &Config) -> BenchResult<()> {
    if cfg.warm_up.is_zero() {
        return Ok(());
    }
    let env = Env::connect(backend, target, first_addr(target)?, cfg.clone()).await?;
    eprintln!("[{}] warming the server up ...", backend.name());
    scenarios::warm_up(&env)
        .await
        .map_err(|e| format!("[{}] warm-up: {e}", backend.name()))?;
    env.ours.reg.close().await.ctx("close our client")
}

async fn run_backend(
    backend: Backend,
    target: &str,
    cfg: &Config,
    scenarios: &[Scenario],
    rows: &mut Vec<Row>,
) -> BenchResult<()> {
    let addr = first_addr(target)?;
    let env = Env::connect(backend, target, addr, cfg.clone()).await?;
    env.writer.delete_tree("/bench").await?;
    for scenario in scenarios {
        let started = Instant::now();
        eprintln!("[{}] {scenario:?} ...", backend.name());
        let result = match scenario {
            Scenario::Memory => scenarios::memory(&env, rows).await,
            Scenario::Register => scenarios::register(&env, rows).await,
            Scenario::Read => scenarios::reads(&env, rows).await,
            Scenario::Throughput => scenarios::throughput(&env, rows).await,
            Scenario::Watch => scenarios::watch(&env, rows).await,
            Scenario::Burst => scenarios::burst(&env, rows).await,
            Scenario::Discovery => scenarios::discovery(&env, rows).await,
            Scenario::Failure => scenarios::failure(&env, rows).await,
            Scenario::Recovery => scenarios::recovery(&env, rows).await,
        };
        result.map_err(|e| format!("[{}] {scenario:?}: {e}", backend.name()))?;
        eprintln!(
            "[{}] {scenario:?} done in {:.1} s",
            backend.name(),
            started.elapsed().as_secs_f64()
        );
    }
    env.ours.reg.close().await.ctx("close our client")?;
    Ok(())
}
