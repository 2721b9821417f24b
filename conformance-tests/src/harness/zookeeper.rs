//! `ZkServer` and `ZkEnsemble`: real ZooKeeper servers on free loopback ports in temp dirs.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use super::process::{free_ports, require_binary, wait_until, HarnessResult, ServerProcess};

const JAVA: &str = "/usr/bin/java";
const ZOOKEEPER_JAR: &str = "/usr/share/java/zookeeper.jar";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings of a test server.
#[derive(Clone, Debug)]
pub struct ZkConfig {
    /// ZooKeeper's tick; session timeouts are bounded to 2..20 ticks.
    pub tick_time: Duration,
}

impl Default for ZkConfig {
    fn default() -> Self {
        ZkConfig {
            tick_time: Duration::from_millis(2000),
        }
    }
}

/// Sends a four-letter word (`ruok`, `srvr`, `wchc`, `cons`, `dump`) and returns the answer.
pub fn four_letter(addr: SocketAddr, word: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(word.as_bytes()).ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    Some(answer)
}

/// Debian's own classpath (the jar's manifest names its dependencies) plus one logging
/// backend, named: every jar in /usr/share/java would let SLF4J pick whichever backend sorts
/// first there, which depends on what else the machine has installed (Maven's, or
/// `slf4j-jcl` beside `jcl-over-slf4j`, which refuses to start).
fn classpath() -> HarnessResult<String> {
    require_binary(Path::new(JAVA), "java (Java 17 runs ZooKeeper)")?;
    require_binary(Path::new(ZOOKEEPER_JAR), "ZooKeeper's jar")?;
    // From libslf4j-java, which ZooKeeper's package depends on; logs to stderr (server.log).
    let logger = "/usr/share/java/slf4j-simple.jar";
    require_binary(
        Path::new(logger),
        "SLF4J's simple logger (package libslf4j-java)",
    )?;
    Ok(format!("/etc/zookeeper/conf:{ZOOKEEPER_JAR}:{logger}"))
}

struct Server {
    id: usize,
    client: SocketAddr,
    process: ServerProcess,
}

/// One or more ZooKeeper servers (standalone for one, a quorum ensemble for more).
///
/// Guarantees: servers listen only on 127.0.0.1; data lives in a temp dir removed on drop;
/// every process is killed on drop and when the test process exits.
pub struct ZkEnsemble {
    servers: Vec<Server>,
    dir: super::process::ServerDir,
}

impl ZkEnsemble {
    /// Starts `size` servers and waits until each answers `ruok` (and, for an ensemble, until
    /// one of them leads).
    pub fn start(size: usize, config: ZkConfig) -> HarnessResult<ZkEnsemble> {
        Self::start_with_sasl(size, config, &[])
    }

    /// [`start`](ZkEnsemble::start) with SASL DIGEST-MD5 on: `users` (name, password) go in a
    /// JAAS `Server` section and the SASL auth provider is enabled. Empty `users`: no SASL.
    pub fn start_with_sasl(
        size: usize,
        config: ZkConfig,
        users: &[(&str, &str)],
    ) -> HarnessResult<ZkEnsemble> {
        super::process::retry_port_races(|| Self::try_start(size, config.clone(), users))
    }

    fn try_start(
        size: usize,
        config: ZkConfig,
        users: &[(&str, &str)],
    ) -> HarnessResult<ZkEnsemble> {
        let classpath = classpath()?;
        let dir = super::process::ServerDir::new()?;
        let tick = config.tick_time.as_millis().max(1);
        let ports: Vec<(u16, u16, u16)> = free_ports(size * 3)?
            .chunks_exact(3)
            .map(|p| (p[0], p[1], p[2]))
            .collect();
        let mut servers = Vec::new();
        for (i, (client, quorum, election)) in ports.iter().enumerate() {
            let id = i + 1;
            let data = dir.path().join(format!("zk{id}"));
            std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
            let mut cfg = format!(
                "tickTime={tick}\ndataDir={}\nclientPort={client}\nclientPortAddress=127.0.0.1\nadmin.enableServer=false\n4lw.commands.whitelist=*\nmaxSessionTimeout={}\n",
                data.display(),
                tick * 20
            );
            let main_class = if size == 1 {
                "org.apache.zookeeper.server.ZooKeeperServerMain"
            } else {
                std::fs::write(data.join("myid"), id.to_string())
                    .map_err(|e| format!("myid: {e}"))?;
                cfg.push_str("initLimit=10\nsyncLimit=5\n");
                for (j, (_, q, e)) in ports.iter().enumerate() {
                    cfg.push_str(&format!("server.{}=127.0.0.1:{q}:{e}\n", j + 1));
                }
                let _ = (quorum, election);
                "org.apache.zookeeper.server.quorum.QuorumPeerMain"
            };
            let mut jvm_sasl = Vec::new();
            if !users.is_empty() {
                let entries: String = users
                    .iter()
                    .map(|(user, password)| format!("\n  user_{user}=\"{password}\""))
                    .collect();
                let jaas = format!(
                    "Server {{\n  org.apache.zookeeper.server.auth.DigestLoginModule required{entries};\n}};\n"
                );
                let jaas_path = data.join("jaas.conf");
                std::fs::write(&jaas_path, jaas).map_err(|e| format!("jaas.conf: {e}"))?;
                jvm_sasl.push(format!(
                    "-Djava.security.auth.login.config={}",
                    jaas_path.display()
                ));
                cfg.push_str(
                    "authProvider.1=org.apache.zookeeper.server.auth.SASLAuthenticationProvider\n",
                );
            }
            let cfg_path = data.join("zoo.cfg");
            std::fs::write(&cfg_path, cfg).map_err(|e| format!("zoo.cfg: {e}"))?;
            let process = ServerProcess::start(
                format!("zookeeper {id}"),
                JAVA,
                [
                    "-Xmx256m".into(),
                    "-Dzookeeper.extendedTypesEnabled=true".into(),
                    format!("-Dzookeeper.log.dir={}", data.display()),
                ]
                .into_iter()
                .chain(jvm_sasl)
                .chain([
                    "-cp".into(),
                    classpath.clone(),
                    main_class.into(),
                    cfg_path.display().to_string(),
                ])
                .collect(),
                vec![],
                data.join("server.log"),
            )?;
            servers.push(Server {
                id,
                client: SocketAddr::from((Ipv4Addr::LOCALHOST, *client)),
                process,
            });
        }
        let ensemble = ZkEnsemble { servers, dir };
        for i in 0..size {
            ensemble.wait_ready(i)?;
        }
        Ok(ensemble)
    }

    fn server(&self, index: usize) -> HarnessResult<&Server> {
        self.servers
            .get(index)
            .ok_or_else(|| format!("no ZooKeeper server {index}"))
    }

    fn server_mut(&mut self, index: usize) -> HarnessResult<&mut Server> {
        self.servers
            .get_mut(index)
            .ok_or_else(|| format!("no ZooKeeper server {index}"))
    }

    /// Waits until server `index` serves as leader or follower and, in an ensemble, a leader
    /// has every follower synced: right after SIGCONT a server still reports the mode it had
    /// before the pause, although the leader dropped it and it must sync again, and pausing
    /// another member meanwhile would cost the quorum.
    pub fn wait_serving(&self, index: usize) -> HarnessResult<()> {
        self.wait_ready(index)?;
        let followers = self.servers.len().saturating_sub(1);
        if followers == 0 {
            return Ok(());
        }
        let synced = || {
            self.servers.iter().any(|s| {
                four_letter(s.client, "mntr").is_some_and(|m| {
                    let value = |key: &str| {
                        m.lines()
                            .find_map(|l| l.strip_prefix(key)?.strip_prefix('\t'))
                            .map(str::trim)
                    };
                    value("zk_server_state") == Some("leader")
                        && value("zk_synced_followers").and_then(|v| v.parse().ok())
                            == Some(followers)
                })
            })
        };
        if wait_until(READY_TIMEOUT, synced) {
            Ok(())
        } else {
            Err(format!(
                "no ZooKeeper leader with all {followers} followers synced within {READY_TIMEOUT:?}"
            ))
        }
    }

    fn wait_ready(&self, index: usize) -> HarnessResult<()> {
        let server = self.server(index)?;
        let serving = || four_letter(server.client, "srvr").is_some_and(|a| a.contains("Mode: "));
        // A server that exited (a port taken meanwhile) is not waited for.
        let mut ready = false;
        wait_until(READY_TIMEOUT, || {
            ready = serving();
            ready || !server.process.is_running()
        });
        if ready {
            Ok(())
        } else {
            let state = if server.process.is_running() {
                format!("not serving within {READY_TIMEOUT:?}")
            } else {
                "exited before it served".to_owned()
            };
            Err(format!(
                "ZooKeeper {} {state}; log tail:\n{}",
                server.id,
                server.process.log_tail(3000)
            ))
        }
    }

    /// `127.0.0.1:P1,127.0.0.1:P2,...`: every server, for a client's connect string.
    pub fn connect_string(&self) -> String {
        self.servers
            .iter()
            .map(|s| s.client.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client address of server `index`.
    pub fn client_addr(&self, index: usize) -> HarnessResult<SocketAddr> {
        Ok(self.server(index)?.client)
    }

    /// Index of the server that says `Mode: leader` (or `standalone`).
    pub fn leader(&self) -> Option<usize> {
        self.servers.iter().position(|s| {
            four_letter(s.client, "srvr")
                .is_some_and(|a| a.contains("Mode: leader") || a.contains("Mode: standalone"))
        })
    }

    /// A four-letter word sent to server `index`.
    pub fn four_letter(&self, index: usize, word: &str) -> Option<String> {
        four_letter(self.server(index).ok()?.client, word)
    }

    /// Crashes server `index` (SIGKILL).
    pub fn kill(&mut self, index: usize) -> HarnessResult<()> {
        self.server_mut(index)?.process.kill()
    }

    /// Freezes server `index` (SIGSTOP).
    pub fn pause(&mut self, index: usize) -> HarnessResult<()> {
        self.server_mut(index)?.process.pause()
    }

    /// Continues server `index` (SIGCONT).
    pub fn resume(&mut self, index: usize) -> HarnessResult<()> {
        self.server_mut(index)?.process.resume()
    }

    /// Restarts server `index` on its data and waits until it serves.
    pub fn restart(&mut self, index: usize) -> HarnessResult<()> {
        self.server_mut(index)?.process.restart()?;
        self.wait_ready(index)
    }

    /// The temp dir holding data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A standalone ZooKeeper server: what most tests use.
pub struct ZkServer {
    ensemble: ZkEnsemble,
}

impl ZkServer {
    /// A standalone server with SASL DIGEST-MD5 for `users` (see
    /// [`ZkEnsemble::start_with_sasl`]).
    pub fn start_with_sasl(config: ZkConfig, users: &[(&str, &str)]) -> HarnessResult<ZkServer> {
        Ok(ZkServer {
            ensemble: ZkEnsemble::start_with_sasl(1, config, users)?,
        })
    }

    /// Starts a standalone server and waits until it serves.
    pub fn start(config: ZkConfig) -> HarnessResult<ZkServer> {
        Ok(ZkServer {
            ensemble: ZkEnsemble::start(1, config)?,
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn connect_string(&self) -> String {
        self.ensemble.connect_string()
    }

    /// Its client address.
    pub fn addr(&self) -> SocketAddr {
        self.ensemble.servers[0].client
    }

    /// A four-letter word's answer.
    pub fn four_letter(&self, word: &str) -> Option<String> {
        four_letter(self.addr(), word)
    }

    /// Crashes it.
    pub fn kill(&mut self) -> HarnessResult<()> {
        self.ensemble.kill(0)
    }

    /// Freezes it.
    pub fn pause(&mut self) -> HarnessResult<()> {
        self.ensemble.pause(0)
    }

    /// Continues it.
    pub fn resume(&mut self) -> HarnessResult<()> {
        self.ensemble.resume(0)
    }

    /// Restarts it on the same data and waits until it serves.
    pub fn restart(&mut self) -> HarnessResult<()> {
        self.ensemble.restart(0)
    }
}
