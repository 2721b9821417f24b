//! The session: one lease, kept alive every TTL/3 on its own task, replaced when lost.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use registry_core::{Backoff, SessionId, SessionState, SessionTracker};
use tokio::sync::watch;
use tokio::time::Instant;

/// What the session task shares with the registry.
pub(crate) struct Session {
    pub(crate) lease: AtomicI64,
    pub(crate) tracker: SessionTracker,
    /// The last lease a request found gone, so the loss is handled at once rather than at the
    /// next keep-alive. A value (not a notification) so a report about an older lease can
    /// never end a newer one.
    pub(crate) lease_gone: watch::Sender<i64>,
}

impl Session {
    pub(crate) fn lease(&self) -> i64 {
        self.lease.load(Ordering::SeqCst)
    }

    /// A request saw "lease not found" for `lease`.
    pub(crate) fn report_lease_gone(&self, lease: i64) {
        if self.lease() == lease {
            self.lease_gone.send_replace(lease);
        }
    }
}

enum Outcome {
    /// The connection broke; the lease may still be alive.
    Broken,
    /// The server says the lease is gone.
    Lost,
    /// Close was asked for.
    Shutdown,
}

async fn keep_alive(
    client: &mut Client,
    lease: i64,
    ttl: Duration,
    session: &Session,
    last_ok: &mut Instant,
    shutdown: &mut watch::Receiver<bool>,
) -> Outcome {
    let interval = ttl / 3;
    let opened = tokio::time::timeout(
        interval.max(Duration::from_secs(1)),
        client.lease_keep_alive(lease),
    )
    .await;
    let (mut keeper, mut stream) = match opened {
        Ok(Ok(pair)) => pair,
        Ok(Err(error)) => {
            tracing::debug!(%error, "keep-alive stream failed to open");
            return Outcome::Broken;
        }
        Err(_) => return Outcome::Broken,
    };
    let mut gone = session.lease_gone.subscribe();
    if *gone.borrow_and_update() == lease {
        return Outcome::Lost;
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return Outcome::Shutdown,
            changed = gone.changed() => {
                if changed.is_ok() && *gone.borrow_and_update() == lease {
                    return Outcome::Lost;
                }
            }
            _ = tick.tick() => {
                if keeper.keep_alive().await.is_err() {
                    return Outcome::Broken;
                }
                // No answer within the TTL: the server has expired the lease by now.
                if last_ok.elapsed() > ttl {
                    return Outcome::Broken;
                }
            }
            message = stream.message() => match message {
                Ok(Some(response)) if response.ttl() <= 0 => return Outcome::Lost,
                Ok(Some(_)) => {
                    *last_ok = Instant::now();
                    if session.tracker.status().state == SessionState::Suspended {
                        session.tracker.transition(SessionState::Connected, Some(SessionId(lease)));
                    }
                }
                Ok(None) | Err(_) => return Outcome::Broken,
            },
        }
    }
}

/// Whether the server still holds `lease` (a busy server may answer keep-alives late while
/// the lease lives on). Unreachable counts as gone: silent past the TTL, the lease has expired
/// as far as any other client can tell.
async fn still_granted(client: &mut Client, lease: i64, timeout: Duration) -> bool {
    match tokio::time::timeout(timeout, client.lease_time_to_live(lease, None)).await {
        Ok(Ok(response)) if response.ttl() > 0 => {
            tracing::info!(
                lease,
                ttl = response.ttl(),
                "etcd lease outlived a slow keep-alive"
            );
            true
        }
        _ => false,
    }
}

/// Grants a lease, retrying with backoff until it works or close is asked for.
pub(crate) async fn grant(
    client: &mut Client,
    ttl: Duration,
    timeout: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<i64> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match tokio::time::timeout(timeout, client.lease_grant(ttl.as_secs() as i64, None)).await {
            Ok(Ok(response)) => return Some(response.id()),
            Ok(Err(error)) => tracing::warn!(%error, "lease grant failed; retrying"),
            Err(_) => tracing::warn!("lease grant timed out; retrying"),
        }
        tokio::select! {
            _ = shutdown.changed() => return None,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
        if *shutdown.borrow() {
            return None;
        }
    }
}

/// Runs the session on a thread of its own, with its own runtime and its own connection, so a
/// busy application (or thousands of watch and registration tasks) can never delay a
/// keep-alive past the TTL. The returned receiver fires when the thread has finished.
pub(crate) fn spawn_keeper(
    endpoints: Vec<String>,
    connect: etcd_client::ConnectOptions,
    session: Arc<Session>,
    ttl: Duration,
    request_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
    span: tracing::Span,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("etcd-keepalive".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    tracing::error!(%error, "cannot start the keep-alive runtime");
                    return;
                }
            };
            runtime.block_on(tracing::Instrument::instrument(
                async move {
                    let mut backoff =
                        Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
                    let client = loop {
                        match Client::connect(endpoints.clone(), Some(connect.clone())).await {
                            Ok(client) => break client,
                            Err(error) => {
                                tracing::warn!(%error, "keep-alive connection failed; retrying")
                            }
                        }
                        tokio::select! {
                            _ = shutdown.changed() => return,
                            _ = tokio::time::sleep(backoff.next_delay()) => {}
                        }
                    };
                    run(client, session, ttl, request_timeout, shutdown).await;
                },
                span,
            ));
            let _ = done.send(());
        })?;
    Ok(finished)
}

/// Keeps the session's lease alive until shutdown; reports suspension, loss and the new
/// session that replaces a lost one.
pub(crate) async fn run(
    mut client: Client,
    session: Arc<Session>,
    ttl: Duration,
    request_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let mut last_ok = Instant::now();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let lease = session.lease();
        let outcome = keep_alive(
            &mut client,
            lease,
            ttl,
            &session,
            &mut last_ok,
            &mut shutdown,
        )
        .await;
        let lost = match outcome {
            Outcome::Shutdown => return,
            Outcome::Lost => true,
            Outcome::Broken => {
                if session.tracker.status().state.is_live() {
                    tracing::warn!(lease, "etcd connection lost; session suspended");
                    session.tracker.transition(SessionState::Suspended, None);
                }
                if last_ok.elapsed() <= ttl {
                    false
                } else if still_granted(&mut client, lease, request_timeout).await {
                    // The server vouched for the lease: that counts as hearing from it, or
                    // the next keep-alive round would give up before its first answer.
                    last_ok = Instant::now();
                    false
                } else {
                    true
                }
            }
        };
        if lost {
            tracing::warn!(lease, "etcd lease lost; opening a new session");
            session.tracker.transition(SessionState::Lost, None);
            let Some(new) = grant(&mut client, ttl, request_timeout, &mut shutdown).await else {
                return;
            };
            session.lease.store(new, Ordering::SeqCst);
            last_ok = Instant::now();
            backoff.reset();
            session
                .tracker
                .transition(SessionState::Reestablished, Some(SessionId(new)));
            tracing::info!(lease = new, "etcd session re-established");
            continue;
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}
