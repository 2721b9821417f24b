//! `PeerLinks`: an etcd cluster's peer traffic through one proxy per member, so a test can
//! cut one member off from the others (a network partition) while its clients still reach
//! it.
//!
//! Each member advertises its proxy as its peer URL, so every peer connection to a member
//! passes its proxy. Cutting member M off closes (and refuses) every connection into M's
//! proxy, and every connection into the others' proxies that M opened. etcd names the
//! sender of each peer request in an `X-Server-From` header (its member ID, in hex); a
//! connection whose first request has none (rafthttp's RTT probe, version checks) is
//! refused only into M. Such a connection may carry M's raft messages later; the others
//! ignore M's votes while they hear their leader (etcd runs raft with CheckQuorum), and
//! their answers to M cannot reach it.
//!
//! The proxies run on their own thread with their own runtime, so they outlive any single
//! test's runtime.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::etcd::header;
use super::process::HarnessResult;
use super::proxy::{accept, loopback_listener, ProxyThread};

/// The longest a new connection may take to send its first request's head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest first request head read; etcd's are well under 1 KiB.
const HEAD_LIMIT: usize = 64 * 1024;

/// Which member is cut off, and the ID its peer requests carry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Cutoff {
    member: usize,
    id: String,
}

/// One proxy per member, in front of its peer listener.
///
/// Guarantees: once [`cut_off`](PeerLinks::cut_off) has returned and the relays have seen it
/// (at once, on their own thread), no connection into that member carries another byte, nor
/// any it opened whose first request names it as sender, and new ones are refused; the
/// others' links to each other stay up. Connections it opens without naming itself (see
/// the module doc) still reach the others, who ignore its raft messages while they hear
/// their leader. After [`heal`](PeerLinks::heal), new connections pass again. Dropping it
/// closes every connection and stops its thread.
pub struct PeerLinks {
    /// Where each member's peers connect (its advertised peer address).
    addrs: Vec<SocketAddr>,
    cutoff: Arc<watch::Sender<Option<Cutoff>>>,
    /// Stops the proxies (closing every connection) when dropped.
    _thread: ProxyThread,
}

impl PeerLinks {
    /// Starts a proxy to each of `upstreams` (the members' peer listeners, in member order).
    pub fn start(upstreams: &[SocketAddr]) -> HarnessResult<PeerLinks> {
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for _ in upstreams {
            let (listener, addr) = loopback_listener("peer proxy")?;
            listeners.push(listener);
            addrs.push(addr);
        }
        let (cutoff, _) = watch::channel(None);
        let cutoff = Arc::new(cutoff);
        let upstreams = upstreams.to_vec();
        let for_thread = cutoff.clone();
        let thread = ProxyThread::spawn("etcd-peer-links".into(), move || async move {
            let mut loops = Vec::new();
            for (member, (listener, upstream)) in listeners.into_iter().zip(upstreams).enumerate() {
                let Ok(listener) = TcpListener::from_std(listener) else {
                    return;
                };
                loops.push(accept_loop(listener, upstream, member, for_thread.clone()));
            }
            futures::future::join_all(loops).await;
        })?;
        Ok(PeerLinks {
            addrs,
            cutoff,
            _thread: thread,
        })
    }

    /// The address member `index` advertises to its peers.
    pub fn addr(&self, index: usize) -> Option<SocketAddr> {
        self.addrs.get(index).copied()
    }

    /// Cuts member `index`, whose peer requests carry `id` (hex), off from the others.
    pub fn cut_off(&self, index: usize, id: &str) {
        self.cutoff.send_replace(Some(Cutoff {
            member: index,
            id: id.to_owned(),
        }));
    }

    /// Lets every peer link through again.
    pub fn heal(&self) {
        self.cutoff.send_replace(None);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    member: usize,
    cutoff: Arc<watch::Sender<Option<Cutoff>>>,
) {
    loop {
        let client = accept(&listener).await;
        tokio::spawn(relay(client, upstream, member, cutoff.subscribe()));
    }
}

/// Forwards one connection into `member` until it ends or a cut-off covers it.
async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    member: usize,
    mut cutoff: watch::Receiver<Option<Cutoff>>,
) {
    let Ok(Some(head)) = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client)).await else {
        return;
    };
    let sender = sender_of(&head);
    let covered = |now: &Option<Cutoff>| {
        now.as_ref()
            .is_some_and(|c| c.member == member || sender.as_deref() == Some(c.id.as_str()))
    };
    if covered(&cutoff.borrow_and_update()) {
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    if server.write_all(&head).await.is_err() {
        return;
    }
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Returning drops both connections, which closes them.
    tokio::select! {
        _ = tokio::io::copy(&mut client_read, &mut server_write) => {}
        _ = tokio::io::copy(&mut server_read, &mut client_write) => {}
        _ = async {
            while cutoff.changed().await.is_ok() {
                if covered(&cutoff.borrow_and_update()) {
                    return;
                }
            }
        } => {}
    }
}

/// Reads until the end of the first request's head; `None` if the connection ends first or
/// the head is too long. May read past the head: everything read is returned.
async fn read_head(client: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > HEAD_LIMIT {
            return None;
        }
        let n = client.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Some(head)
}

/// The member ID in a request head's `X-Server-From` header.
fn sender_of(head: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(head);
    let head = text.split("\r\n\r\n").next()?;
    header(head, "x-server-from").map(str::to_ascii_lowercase)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sender_is_read_from_the_first_request_head() {
        let head = b"GET /raft/stream/message/8e9e05c52164694d HTTP/1.1\r\nHost: x\r\n\
            X-Server-From: 8E9E05C52164694D\r\n\r\nbody X-Server-From: 1";
        assert_eq!(sender_of(head).as_deref(), Some("8e9e05c52164694d"));
        assert_eq!(
            sender_of(b"GET /raft/probing HTTP/1.1\r\nHost: x\r\n\r\n"),
            None
        );
    }
}
