//! `EtcdServer` and `EtcdCluster`: real etcd members on free loopback ports in temp dirs.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};

use std::time::Duration;

use super::partition::PeerLinks;
use super::process::{free_ports, wait_until, HarnessResult, ServerProcess};

/// Where Debian installs etcd.
pub const ETCD_BINARY: &str = "/usr/bin/etcd";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends a plain HTTP GET to `addr` and returns the body, or `None` if nothing answered.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    // Without "Connection: close" the peer listener keeps the connection open.
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    // Read to the end; the peer listener may reset the connection after a whole response.
    let read = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n")?;
    let complete = match content_length(head) {
        Some(length) => body.len() >= length,
        None => read.is_ok(),
    };
    complete.then(|| body.to_owned())
}

/// The Content-Length a response head declares.
fn content_length(head: &str) -> Option<usize> {
    header(head, "content-length")?.parse().ok()
}

/// The value of header `name` (any case) in an HTTP message head.
pub(crate) fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (found, value) = line.split_once(':')?;
        found
            .trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim())
    })
}

struct Member {
    name: String,
    client: SocketAddr,
    /// Its peer listener (not the address it advertises, when peer links pass proxies).
    peer: SocketAddr,
    process: ServerProcess,
}

fn member_args(
    name: &str,
    dir: &std::path::Path,
    client: SocketAddr,
    peer: SocketAddr,
    advertised_peer: SocketAddr,
    cluster: &str,
) -> Vec<String> {
    vec![
        "--name".into(),
        name.into(),
        "--data-dir".into(),
        dir.join(format!("{name}.etcd")).display().to_string(),
        "--listen-client-urls".into(),
        format!("http://{client}"),
        "--advertise-client-urls".into(),
        format!("http://{client}"),
        "--listen-peer-urls".into(),
        format!("http://{peer}"),
        "--initial-advertise-peer-urls".into(),
        format!("http://{advertised_peer}"),
        "--initial-cluster".into(),
        cluster.into(),
        "--initial-cluster-state".into(),
        "new".into(),
        "--heartbeat-interval".into(),
        "50".into(),
        "--election-timeout".into(),
        "500".into(),
    ]
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A gauge from `member`'s /metrics.
fn gauge(member: &Member, name: &str) -> Option<usize> {
    let body = http_get(member.client, "/metrics")?;
    let line = body
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? as usize)
}

impl Member {
    fn healthy(&self) -> bool {
        http_get(self.client, "/health").is_some_and(|b| b.contains("\"health\":\"true\""))
    }
}

/// A cluster of etcd members (one for [`EtcdServer`]), each killable, pausable, restartable.
///
/// Guarantees: members listen only on 127.0.0.1; data lives in a temp dir removed on drop;
/// every process is killed on drop and when the test process exits.
pub struct EtcdCluster {
    members: Vec<Member>,
    /// Set when started with [`start_partitionable`](EtcdCluster::start_partitionable).
    peer_links: Option<PeerLinks>,
    dir: super::process::ServerDir,
}

impl EtcdCluster {
    /// Starts `size` members and waits until every one reports healthy.
    pub fn start(size: usize) -> HarnessResult<EtcdCluster> {
        Self::start_with_args(size, &[])
    }

    /// [`start`](EtcdCluster::start) with `extra` appended to every member's arguments (e.g.
    /// `["--auth-token-ttl", "2"]`); they stay in force across restarts.
    pub fn start_with_args(size: usize, extra: &[&str]) -> HarnessResult<EtcdCluster> {
        Self::start_members(size, extra, false)
    }

    /// [`start`](EtcdCluster::start) with every peer link through a proxy, so that
    /// [`cut_off`](EtcdCluster::cut_off) can partition a member from the others.
    pub fn start_partitionable(size: usize) -> HarnessResult<EtcdCluster> {
        Self::start_members(size, &[], true)
    }

    fn start_members(
        size: usize,
        extra: &[&str],
        partitionable: bool,
    ) -> HarnessResult<EtcdCluster> {
        super::process::retry_port_races(|| Self::try_start_members(size, extra, partitionable))
    }

    fn try_start_members(
        size: usize,
        extra: &[&str],
        partitionable: bool,
    ) -> HarnessResult<EtcdCluster> {
        super::process::require_binary(std::path::Path::new(ETCD_BINARY), "etcd")?;
        let dir = super::process::ServerDir::new()?;
        let ports: Vec<(SocketAddr, SocketAddr)> = free_ports(size * 2)?
            .chunks_exact(2)
            .map(|p| (loopback(p[0]), loopback(p[1])))
            .collect();
        let peer_links = if partitionable {
            let peers: Vec<SocketAddr> = ports.iter().map(|(_, peer)| *peer).collect();
            Some(PeerLinks::start(&peers)?)
        } else {
            None
        };
        let advertised = |i: usize, peer: SocketAddr| {
            peer_links
                .as_ref()
                .and_then(|links| links.addr(i))
                .unwrap_or(peer)
        };
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("n{i}=http://{}", advertised(i, *peer)))
            .collect::<Vec<_>>()
            .join(",");
        let path = dir.path().to_path_buf();
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("n{i}");
            let process = ServerProcess::start(
                format!("etcd {name}"),
                ETCD_BINARY,
                member_args(&name, &path, *client, *peer, advertised(i, *peer), &cluster)
                    .into_iter()
                    .chain(extra.iter().map(|&a| a.to_owned()))
                    .collect(),
                vec![],
                path.join(format!("{name}.log")),
            )?;
            members.push(Member {
                name,
                client: *client,
                peer: *peer,
                process,
            });
        }
        let cluster = EtcdCluster {
            members,
            peer_links,
            dir,
        };
        for i in 0..size {
            cluster.wait_healthy(i)?;
        }
        Ok(cluster)
    }

    /// Waits until member `index` reports healthy (it has a leader and serves).
    pub fn wait_serving(&self, index: usize) -> HarnessResult<()> {
        self.wait_healthy(index)
    }

    fn wait_healthy(&self, index: usize) -> HarnessResult<()> {
        let member = self.member(index)?;
        // A member that exited (a port taken meanwhile) is not waited for.
        let mut healthy = false;
        wait_until(READY_TIMEOUT, || {
            healthy = member.healthy();
            healthy || !member.process.is_running()
        });
        if healthy {
            Ok(())
        } else {
            let state = if member.process.is_running() {
                format!("not healthy within {READY_TIMEOUT:?}")
            } else {
                "exited before it was healthy".to_owned()
            };
            Err(format!(
                "etcd {} {state}; log tail:\n{}",
                member.name,
                member.process.log_tail(3000)
            ))
        }
    }

    fn member(&self, index: usize) -> HarnessResult<&Member> {
        self.members
            .get(index)
            .ok_or_else(|| format!("no etcd member {index}"))
    }

    fn member_mut(&mut self, index: usize) -> HarnessResult<&mut Member> {
        self.members
            .get_mut(index)
            .ok_or_else(|| format!("no etcd member {index}"))
    }

    /// Client addresses (`127.0.0.1:PORT`) of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.to_string()).collect()
    }

    /// The client address of member `index`.
    pub fn client_addr(&self, index: usize) -> HarnessResult<SocketAddr> {
        Ok(self.member(index)?.client)
    }

    /// Crashes member `index` (SIGKILL).
    pub fn kill(&mut self, index: usize) -> HarnessResult<()> {
        self.member_mut(index)?.process.kill()
    }

    /// Freezes member `index` (SIGSTOP).
    pub fn pause(&mut self, index: usize) -> HarnessResult<()> {
        self.member_mut(index)?.process.pause()
    }

    /// Continues member `index` (SIGCONT).
    pub fn resume(&mut self, index: usize) -> HarnessResult<()> {
        self.member_mut(index)?.process.resume()
    }

    /// Restarts member `index` on its data and waits until it is healthy.
    pub fn restart(&mut self, index: usize) -> HarnessResult<()> {
        let member = self.member_mut(index)?;
        member.process.restart()?;
        // A restarted member must not re-bootstrap the cluster.
        self.wait_healthy(index)
    }

    /// Index of the member that reports itself as leader, if any.
    pub fn leader(&self) -> Option<usize> {
        (0..self.members.len()).find(|&i| self.is_leader(i))
    }

    /// Whether member `index` says it leads (`etcd_server_is_leader`). A member cut off
    /// from its peers may still say so for a few election timeouts.
    pub fn is_leader(&self, index: usize) -> bool {
        self.members
            .get(index)
            .is_some_and(|m| gauge(m, "etcd_server_is_leader") == Some(1))
    }

    /// Cuts member `index` off from the others: no peer traffic passes between it and them
    /// until [`heal`](EtcdCluster::heal), while clients still reach every member. Only for a
    /// cluster started with [`start_partitionable`](EtcdCluster::start_partitionable).
    pub fn cut_off(&self, index: usize) -> HarnessResult<()> {
        let links = self
            .peer_links
            .as_ref()
            .ok_or("cut_off needs a cluster started with start_partitionable")?;
        let id = self.member_id(index)?;
        links.cut_off(index, &id);
        Ok(())
    }

    /// Ends a [`cut_off`](EtcdCluster::cut_off): peer links pass again.
    pub fn heal(&self) {
        if let Some(links) = &self.peer_links {
            links.heal();
        }
    }

    /// Member `index`'s ID in hex, as etcd writes it in peer requests, asked of its own peer
    /// listener (`GET /members` there lists the members as JSON).
    pub fn member_id(&self, index: usize) -> HarnessResult<String> {
        let member = self.member(index)?;
        let body = http_get(member.peer, "/members")
            .ok_or_else(|| format!("etcd {} does not list its members", member.name))?;
        let listed: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| format!("etcd {} member list {body:?}: {e}", member.name))?;
        listed
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["name"] == member.name.as_str())
            .and_then(|m| m["id"].as_u64())
            .map(|id| format!("{id:x}"))
            .ok_or_else(|| format!("etcd {} is not in its member list {body}", member.name))
    }

    /// `etcd_debugging_mvcc_watch_stream_total` of member `index` alone: the gRPC watch
    /// streams clients hold open on it.
    pub fn watch_streams_on(&self, index: usize) -> Option<usize> {
        gauge(
            self.member(index).ok()?,
            "etcd_debugging_mvcc_watch_stream_total",
        )
    }

    /// `etcd_debugging_mvcc_watcher_total` summed over running members: the server-side
    /// watchers.
    pub fn watcher_total(&self) -> Option<usize> {
        self.gauge_total("etcd_debugging_mvcc_watcher_total")
    }

    /// `etcd_debugging_mvcc_watch_stream_total` summed over running members: the gRPC watch
    /// streams open on the servers.
    pub fn watch_stream_total(&self) -> Option<usize> {
        self.gauge_total("etcd_debugging_mvcc_watch_stream_total")
    }

    fn gauge_total(&self, name: &str) -> Option<usize> {
        let mut total = 0usize;
        for m in &self.members {
            total += gauge(m, name)?;
        }
        Some(total)
    }

    /// The temp dir holding data and logs.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// One etcd member: the server most tests use.
pub struct EtcdServer {
    cluster: EtcdCluster,
}

impl EtcdServer {
    /// Starts a single-member etcd and waits until it is healthy.
    pub fn start() -> HarnessResult<EtcdServer> {
        Ok(EtcdServer {
            cluster: EtcdCluster::start(1)?,
        })
    }

    /// [`start`](EtcdServer::start) with `extra` appended to etcd's arguments, also when it
    /// restarts.
    pub fn start_with_args(extra: &[&str]) -> HarnessResult<EtcdServer> {
        Ok(EtcdServer {
            cluster: EtcdCluster::start_with_args(1, extra)?,
        })
    }

    /// `127.0.0.1:PORT` of its client listener.
    pub fn endpoint(&self) -> String {
        self.cluster.endpoints().remove(0)
    }

    /// Its client listener address.
    pub fn addr(&self) -> SocketAddr {
        self.cluster.members[0].client
    }

    /// Crashes it.
    pub fn kill(&mut self) -> HarnessResult<()> {
        self.cluster.kill(0)
    }

    /// Freezes it.
    pub fn pause(&mut self) -> HarnessResult<()> {
        self.cluster.pause(0)
    }

    /// Continues it.
    pub fn resume(&mut self) -> HarnessResult<()> {
        self.cluster.resume(0)
    }

    /// Restarts it on the same data and waits until it is healthy.
    pub fn restart(&mut self) -> HarnessResult<()> {
        self.cluster.restart(0)
    }

    /// Server-side watchers, from /metrics.
    pub fn watcher_total(&self) -> Option<usize> {
        self.cluster.watcher_total()
    }

    /// Server-side gRPC watch streams, from /metrics.
    pub fn watch_stream_total(&self) -> Option<usize> {
        self.cluster.watch_stream_total()
    }
}
