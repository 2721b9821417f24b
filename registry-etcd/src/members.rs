//! Takes a member that stops answering out of the client's rotation, and back once it answers.
//!
//! Requests and watches share one balanced channel over all endpoints. A member that stops
//! answering with its connections open (paused, a stalled disk) stays in that rotation: its
//! connection looks ready, so about one request in N waits out its timeout for as long as the
//! stall lasts (HTTP/2 pings drop the connection, but the reconnect succeeds at the TCP level).
//! So a timed-out request makes the client ask every member for its status; a member that
//! does not answer within the probe timeout leaves the rotation, and is asked again about
//! every second until it answers. When no member answers there is nothing to prefer: all stay.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use futures::future::join_all;
use tokio::sync::{watch, Notify};
use tracing::Instrument;

/// How often members out of the rotation are asked again.
const RECHECK: Duration = Duration::from_secs(1);
/// Longest wait for a member's status: a live member answers in milliseconds.
const MAX_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Least time between two rounds of probes, however many requests time out.
const MIN_ROUND_GAP: Duration = Duration::from_millis(200);

/// The handle requests report timeouts to.
pub(crate) struct MemberHealth {
    suspect: Notify,
}

impl MemberHealth {
    /// A request got no answer in time: the members are probed (once for any number of
    /// reports that arrive while a round runs).
    pub(crate) fn suspect(&self) {
        self.suspect.notify_one();
    }
}

/// Starts watching the members of `client`'s rotation, until `shutdown`. `None` (and no task)
/// with one endpoint: there is no other member to prefer.
pub(crate) fn spawn(
    client: Client,
    endpoints: &[String],
    connect: ConnectOptions,
    request_timeout: Duration,
    shutdown: watch::Receiver<bool>,
) -> Option<Arc<MemberHealth>> {
    if endpoints.len() < 2 {
        return None;
    }
    let health = Arc::new(MemberHealth {
        suspect: Notify::new(),
    });
    let members = endpoints
        .iter()
        .map(|endpoint| Member {
            endpoint: endpoint.clone(),
            probe: None,
            out: false,
        })
        .collect();
    let task = Watcher {
        client,
        connect,
        probe_timeout: request_timeout.min(MAX_PROBE_TIMEOUT),
        members,
    };
    let span = tracing::info_span!("etcd_members", members = endpoints.len());
    tokio::spawn(task.run(health.clone(), shutdown).instrument(span));
    Some(health)
}

struct Member {
    endpoint: String,
    /// A client of this member alone, kept between rounds while it answers.
    probe: Option<Client>,
    /// Taken out of the rotation.
    out: bool,
}

struct Watcher {
    client: Client,
    connect: ConnectOptions,
    probe_timeout: Duration,
    members: Vec<Member>,
}

impl Watcher {
    async fn run(mut self, health: Arc<MemberHealth>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let any_out = self.members.iter().any(|m| m.out);
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = health.suspect.notified() => {}
                _ = tokio::time::sleep(RECHECK), if any_out => {}
            }
            if *shutdown.borrow() {
                return;
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = self.round() => {}
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(MIN_ROUND_GAP) => {}
            }
        }
    }

    /// Probes every member at once and updates the rotation.
    async fn round(&mut self) {
        let (connect, timeout) = (&self.connect, self.probe_timeout);
        let probes = self.members.iter_mut().map(|m| m.probe(connect, timeout));
        let mut answered = join_all(probes).await;
        if !answered.contains(&true) {
            tracing::debug!("no etcd member answered; all stay in the rotation");
            answered.fill(true);
        }
        // Members come back before others leave, so the rotation is never empty between.
        for (index, answered) in answered.iter().enumerate() {
            if *answered {
                self.set_out(index, false).await;
            }
        }
        for (index, answered) in answered.iter().enumerate() {
            if !*answered {
                self.set_out(index, true).await;
            }
        }
    }

    /// Takes member `index` out of the rotation or puts it back, if it is not so already.
    /// Bounded: etcd-client queues changes (at most 64) until a request comes.
    async fn set_out(&mut self, index: usize, out: bool) {
        let Some(member) = self.members.get_mut(index) else {
            return;
        };
        if member.out == out {
            return;
        }
        let uri = uri_of(&member.endpoint);
        let change = async {
            if out {
                self.client.remove_endpoint(&uri).await
            } else {
                self.client.add_endpoint(&uri).await
            }
        };
        match tokio::time::timeout(self.probe_timeout, change).await {
            Ok(Ok(())) if out => {
                tracing::warn!(endpoint = %member.endpoint, "etcd member not answering; out of the rotation");
                member.out = true;
            }
            Ok(Ok(())) => {
                tracing::info!(endpoint = %member.endpoint, "etcd member answers again; back in the rotation");
                member.out = false;
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, endpoint = %member.endpoint, out, "rotation change failed")
            }
            Err(_) => {
                tracing::debug!(endpoint = %member.endpoint, out, "rotation change not taken in time")
            }
        }
    }
}

impl Member {
    /// Whether the member answers a status request within `timeout`. A member that does not
    /// loses its probe client: a stalled connection is not reused.
    async fn probe(&mut self, connect: &ConnectOptions, timeout: Duration) -> bool {
        let endpoint = &self.endpoint;
        let probe = &mut self.probe;
        let ask = async {
            if probe.is_none() {
                *probe = Client::connect([endpoint], Some(connect.clone()))
                    .await
                    .ok();
            }
            match probe.as_mut() {
                Some(client) => client.status().await.is_ok(),
                None => false,
            }
        };
        let answered = tokio::time::timeout(timeout, ask).await.unwrap_or(false);
        if !answered {
            self.probe = None;
        }
        answered
    }
}

/// The URI the balanced channel knows `endpoint` by: etcd-client puts `http://` before an
/// endpoint without a scheme (TLS endpoints carry `https://` by the time they get here).
fn uri_of(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_without_a_scheme_are_known_by_their_http_uri() {
        assert_eq!(uri_of("127.0.0.1:2379"), "http://127.0.0.1:2379");
        assert_eq!(uri_of("https://127.0.0.1:2379"), "https://127.0.0.1:2379");
    }
}
