//! `TcpProxy`: a loopback TCP proxy between a client and a server that tests can cut or
//! blackhole, to partition one client while the server stays alive.
//!
//! It runs on its own thread with its own runtime, so it outlives any single test's runtime
//! (fixtures are shared by every test of a binary).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

use super::process::HarnessResult;

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// Bytes flow both ways.
    Forward,
    /// Every open connection is reset and new ones are closed at once (a refused route).
    Cut,
    /// Connections stay open but no byte moves in either direction (a silent partition:
    /// only timeouts and keep-alives notice).
    Blackhole,
}

/// A proxy listening on a free 127.0.0.1 port and forwarding to `upstream`.
///
/// Guarantees: after [`cut`](TcpProxy::cut) returns, no connection opened before it carries
/// another byte; after [`forward`](TcpProxy::forward), new connections reach the upstream.
/// Dropping the proxy closes every connection and stops its thread.
pub struct TcpProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    mode: Arc<watch::Sender<ProxyMode>>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TcpProxy {
    /// Starts a proxy to `upstream` in [`ProxyMode::Forward`].
    pub fn start(upstream: SocketAddr) -> HarnessResult<TcpProxy> {
        let std_listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| format!("proxy cannot bind: {e}"))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| format!("proxy cannot set non-blocking: {e}"))?;
        let addr = std_listener
            .local_addr()
            .map_err(|e| format!("proxy has no address: {e}"))?;
        let (mode, _) = watch::channel(ProxyMode::Forward);
        let mode = Arc::new(mode);
        let (shutdown, shutdown_rx) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("proxy runtime: {e}"))?;
        let mode_for_thread = mode.clone();
        let thread = std::thread::Builder::new()
            .name(format!("tcp-proxy-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(std_listener) else {
                        return;
                    };
                    tokio::select! {
                        _ = shutdown_rx => {}
                        _ = accept_loop(listener, upstream, mode_for_thread) => {}
                    }
                });
            })
            .map_err(|e| format!("proxy thread: {e}"))?;
        Ok(TcpProxy {
            addr,
            upstream,
            mode,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where traffic goes.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// The current mode.
    pub fn mode(&self) -> ProxyMode {
        *self.mode.borrow()
    }

    /// Resets every connection and refuses new ones until [`forward`](TcpProxy::forward).
    pub fn cut(&self) {
        self.mode.send_replace(ProxyMode::Cut);
    }

    /// Freezes every connection (no bytes move) until [`forward`](TcpProxy::forward).
    pub fn blackhole(&self) {
        self.mode.send_replace(ProxyMode::Blackhole);
    }

    /// Lets traffic flow again.
    pub fn forward(&self) {
        self.mode.send_replace(ProxyMode::Forward);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.mode.send_replace(ProxyMode::Cut);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: Arc<watch::Sender<ProxyMode>>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let mut rx = mode.subscribe();
        tokio::spawn(async move {
            // Hold a blackholed connection without touching the upstream.
            loop {
                let now = *rx.borrow_and_update();
                match now {
                    ProxyMode::Cut => return,
                    ProxyMode::Forward => break,
                    ProxyMode::Blackhole => {
                        if rx.changed().await.is_err() {
                            return;
                        }
                    }
                }
            }
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::select! {
                _ = pump(cr, sw, rx.clone()) => {}
                _ = pump(sr, cw, rx) => {}
            }
        });
    }
}

/// Copies bytes while the mode is Forward; stalls while Blackhole; returns (dropping both
/// halves, which closes the connection) on Cut, EOF or error.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let now = *mode.borrow_and_update();
        match now {
            ProxyMode::Cut => return,
            ProxyMode::Blackhole => {
                if mode.changed().await.is_err() {
                    return;
                }
                continue;
            }
            ProxyMode::Forward => {}
        }
        tokio::select! {
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            read = from.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                // A read that raced a mode change is dropped: the partition started first.
                if *mode.borrow() != ProxyMode::Forward {
                    if *mode.borrow() == ProxyMode::Cut {
                        return;
                    }
                    continue;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;

    fn echo_server() -> SocketAddr {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(16) {
                let Ok(mut s) = stream else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    fn roundtrip(addr: SocketAddr, timeout: Duration) -> std::io::Result<Vec<u8>> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf)?;
        Ok(buf.to_vec())
    }

    #[test]
    fn forwards_cuts_blackholes_and_restores() {
        let proxy = TcpProxy::start(echo_server()).unwrap();
        assert_eq!(
            roundtrip(proxy.addr(), Duration::from_secs(2)).unwrap(),
            b"ping"
        );

        let mut open = std::net::TcpStream::connect(proxy.addr()).unwrap();
        open.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        open.write_all(b"1234").unwrap();
        let mut buf = [0u8; 4];
        open.read_exact(&mut buf).unwrap();

        proxy.cut();
        // The established connection is closed: read returns EOF or an error, not data.
        let mut one = [0u8; 1];
        let after_cut = open.read(&mut one);
        assert!(matches!(after_cut, Ok(0) | Err(_)), "{after_cut:?}");
        assert!(roundtrip(proxy.addr(), Duration::from_millis(500)).is_err());

        proxy.blackhole();
        let err = roundtrip(proxy.addr(), Duration::from_millis(300)).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "blackhole should time out, got {err:?}"
        );

        proxy.forward();
        assert_eq!(
            roundtrip(proxy.addr(), Duration::from_secs(2)).unwrap(),
            b"ping"
        );
    }
}
