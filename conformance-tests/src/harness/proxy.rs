//! `TcpProxy`: a loopback TCP proxy between a client and a server that tests can cut or
//! blackhole, to partition one client while the server stays alive.
//!
//! It runs on its own thread with its own runtime, so it outlives any single test's runtime
//! (fixtures are shared by every test of a binary).

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

use super::process::HarnessResult;

/// A listener on a free 127.0.0.1 port, non-blocking (for a runtime to take over), and its
/// address; `what` names the proxy in errors.
pub(crate) fn loopback_listener(what: &str) -> HarnessResult<(std::net::TcpListener, SocketAddr)> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| format!("{what} cannot bind: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("{what} cannot set non-blocking: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("{what} has no address: {e}"))?;
    Ok((listener, addr))
}

/// The next connection to `listener`. A failed accept (out of file descriptors, say) is
/// tried again after a pause, not in a busy loop; the loop ends with the proxy's runtime.
pub(crate) async fn accept(listener: &TcpListener) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((client, _)) => return client,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

/// A thread of its own running a proxy's work on its own runtime, so the proxy outlives any
/// single test's runtime. Dropping it stops the work and joins the thread.
pub(crate) struct ProxyThread {
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ProxyThread {
    /// Runs the future `work()` makes (inside the runtime, so it may take over listeners)
    /// until it ends or this is dropped.
    pub(crate) fn spawn<F, Fut>(name: String, work: F) -> HarnessResult<ProxyThread>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let (shutdown, shutdown_rx) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("{name} runtime: {e}"))?;
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::select! {
                        _ = shutdown_rx => {}
                        _ = work() => {}
                    }
                });
            })
            .map_err(|e| format!("{name} thread: {e}"))?;
        Ok(ProxyThread {
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }
}

impl Drop for ProxyThread {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

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
    /// The client's bytes reach the server; the server's are read and thrown away (a reply
    /// lost after the server applied the request). The stream the client sees is then
    /// broken: end it with [`cut`](TcpProxy::cut).
    DropReplies,
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
    /// Declared last: dropped after `drop` has cut every connection.
    _thread: ProxyThread,
}

impl TcpProxy {
    /// Starts a proxy to `upstream` in [`ProxyMode::Forward`].
    pub fn start(upstream: SocketAddr) -> HarnessResult<TcpProxy> {
        let (std_listener, addr) = loopback_listener("proxy")?;
        let (mode, _) = watch::channel(ProxyMode::Forward);
        let mode = Arc::new(mode);
        let mode_for_thread = mode.clone();
        let thread =
            ProxyThread::spawn(format!("tcp-proxy-{}", addr.port()), move || async move {
                let Ok(listener) = TcpListener::from_std(std_listener) else {
                    return;
                };
                accept_loop(listener, upstream, mode_for_thread).await
            })?;
        Ok(TcpProxy {
            addr,
            upstream,
            mode,
            _thread: thread,
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

    /// Forwards requests and throws replies away until [`cut`](TcpProxy::cut) or
    /// [`forward`](TcpProxy::forward) (see [`ProxyMode::DropReplies`]).
    pub fn drop_replies(&self) {
        self.mode.send_replace(ProxyMode::DropReplies);
    }

    /// Lets traffic flow again.
    pub fn forward(&self) {
        self.mode.send_replace(ProxyMode::Forward);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        // Then `_thread` stops the proxy.
        self.mode.send_replace(ProxyMode::Cut);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: Arc<watch::Sender<ProxyMode>>,
) {
    loop {
        let client = accept(&listener).await;
        let mut rx = mode.subscribe();
        tokio::spawn(async move {
            // Hold a blackholed connection without touching the upstream.
            loop {
                let now = *rx.borrow_and_update();
                match now {
                    ProxyMode::Cut => return,
                    ProxyMode::Forward | ProxyMode::DropReplies => break,
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
                _ = pump(cr, sw, rx.clone(), Direction::Request) => {}
                _ = pump(sr, cw, rx, Direction::Reply) => {}
            }
        });
    }
}

/// Which way a [`pump`] copies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client to server.
    Request,
    /// Server to client.
    Reply,
}

/// Copies bytes while the mode is Forward (replies: thrown away while DropReplies); stalls
/// while Blackhole; returns (dropping both halves, which closes the connection) on Cut, EOF
/// or error.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
    direction: Direction,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let passes = |mode: ProxyMode| {
        mode == ProxyMode::Forward
            || (mode == ProxyMode::DropReplies && direction == Direction::Request)
    };
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
            ProxyMode::Forward | ProxyMode::DropReplies => {}
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
                let now = *mode.borrow();
                if !passes(now) {
                    if now == ProxyMode::Cut {
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

    /// An echo server and the count of bytes it has received.
    fn echo_server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(16) {
                let Ok(mut s) = stream else { continue };
                let counted = counted.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        counted.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (addr, received)
    }

    fn timed_out(err: &std::io::Error) -> bool {
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )
    }

    /// Whether a read ended the way a reset or closed connection ends it.
    fn closed(read: &std::io::Result<usize>) -> bool {
        match read {
            Ok(n) => *n == 0,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            ),
        }
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
        let (echo, _) = echo_server();
        let proxy = TcpProxy::start(echo).unwrap();
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
        // The established connection is closed (EOF or reset), well within the read timeout;
        // a timeout would mean it was left open.
        let mut one = [0u8; 1];
        let after_cut = open.read(&mut one);
        assert!(closed(&after_cut), "{after_cut:?}");
        // So is a new one.
        let mut new = std::net::TcpStream::connect(proxy.addr()).unwrap();
        new.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let refused = new.read(&mut one);
        assert!(closed(&refused), "{refused:?}");

        proxy.blackhole();
        let err = roundtrip(proxy.addr(), Duration::from_millis(300)).unwrap_err();
        assert!(timed_out(&err), "blackhole should time out, got {err:?}");

        proxy.forward();
        assert_eq!(
            roundtrip(proxy.addr(), Duration::from_secs(2)).unwrap(),
            b"ping"
        );
    }

    #[test]
    fn drop_replies_delivers_requests_and_loses_replies() {
        let (echo, received) = echo_server();
        let proxy = TcpProxy::start(echo).unwrap();
        proxy.drop_replies();
        let err = roundtrip(proxy.addr(), Duration::from_millis(500)).unwrap_err();
        assert!(timed_out(&err), "a reply got through: {err:?}");
        assert_eq!(
            received.load(std::sync::atomic::Ordering::SeqCst),
            4,
            "the request did not reach the server"
        );
        proxy.forward();
        assert_eq!(
            roundtrip(proxy.addr(), Duration::from_secs(2)).unwrap(),
            b"ping"
        );
    }
}
