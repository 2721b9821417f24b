//! The session: a block of leases under one session ID, kept alive every TTL/3 on a thread of
//! its own, replaced as a whole when any of them is lost. With several endpoints the
//! keep-alives go to one member at a time and move to the next when it breaks or falls silent
//! for half the TTL, so one stalled member cannot cost the session.
//!
//! etcd spends time linear in a lease's keys on every put under it (etcd-io/etcd#15993, fixed
//! only for auth-less or root use in 3.4.27 / 3.5.10), so one lease for thousands of
//! registrations makes re-registering them after a loss take seconds. Like Cilium's and
//! Kubernetes' lease managers, a session grants another lease once
//! [`keys_per_lease`](crate::EtcdOptions::keys_per_lease) keys went under its newest one.
//!
//! Lease IDs are chosen by the client so that every lease of a session maps back to the
//! session ID (see [`session_of_lease`]): `| 0 | 35 random bits | 16-bit tag | 12-bit index |`.
//! The tag is a hash of the random bits, so an ID etcd picked for another client is read as a
//! session of its own unless it matches by chance (1 in 65536); index 0 is the session ID.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, LeaseGrantOptions, LeaseKeepAliveResponse};
use futures::stream::{BoxStream, FuturesUnordered, SelectAll};
use futures::StreamExt;
use registry_core::{Backoff, SessionId, SessionState, SessionTracker};
use tokio::sync::watch;
use tokio::time::Instant;

/// Bits of a lease ID that number the lease within its session.
const INDEX_BITS: u32 = 12;
/// Bits of the tag that marks a lease ID as one of a session's block.
const TAG_BITS: u32 = 16;
/// Leases one session holds at most; past that, new keys go round robin over them.
pub(crate) const MAX_LEASES: i64 = 1 << INDEX_BITS;
const INDEX_MASK: i64 = MAX_LEASES - 1;
const RANDOM_BITS: u32 = 63 - INDEX_BITS - TAG_BITS;

/// The tag of a block whose random bits are `high`.
fn tag_of(high: i64) -> i64 {
    ((high as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - TAG_BITS)) as i64
}

/// The first lease ID (the session ID) of a new, random block.
fn new_block() -> i64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    hasher.write_u32(std::process::id());
    let high = (hasher.finish() as i64 & ((1 << RANDOM_BITS) - 1)).max(1);
    (high << (INDEX_BITS + TAG_BITS)) | (tag_of(high) << INDEX_BITS)
}

/// The first lease of the block `lease` belongs to, if it is one of a session's block.
fn block_of(lease: i64) -> Option<i64> {
    let high = lease >> (INDEX_BITS + TAG_BITS);
    let tag = (lease >> INDEX_BITS) & ((1 << TAG_BITS) - 1);
    (lease > 0 && high != 0 && tag == tag_of(high)).then_some(lease & !INDEX_MASK)
}

/// The session a key under `lease` belongs to: the first lease of its block for leases this
/// backend granted, the lease itself for any other (another tool's `etcdctl lease grant`).
/// What [`Node::ephemeral_owner`](registry_core::Node::ephemeral_owner) reports on etcd.
pub fn session_of_lease(lease: i64) -> SessionId {
    SessionId(block_of(lease).unwrap_or(lease))
}

/// The leases a key owned by `owner` may be under: `(first, last)` of its block.
pub(crate) fn leases_of(owner: SessionId) -> (i64, i64) {
    match block_of(owner.0) {
        Some(first) if first == owner.0 => (first, first + INDEX_MASK),
        _ => (owner.0, owner.0),
    }
}

/// The leases of the current session.
struct Leases {
    /// In grant order; the first one's ID is the session ID.
    ids: Vec<i64>,
    /// Index (within the block) the next lease gets.
    next_index: i64,
    /// Keys put under the newest lease (counted at creation; deletes are not subtracted, so
    /// before another lease is granted the newest one's keys are counted on the server).
    on_newest: usize,
    /// Lease slots handed out whose create has not completed (see [`InFlight`]): keys the
    /// server cannot count yet.
    in_flight: usize,
    /// Round-robin position once the block is full.
    cursor: usize,
    /// The session is being revoked (lost or closed): a grant that completes now is not
    /// taken in, so the revocation's list of leases is complete.
    retired: bool,
}

impl Leases {
    /// The lease keys go under now (`ids` is never empty).
    fn newest(&self) -> i64 {
        self.ids.last().copied().unwrap_or_default()
    }
}

/// What a create should put its keys under.
enum Slot {
    Lease(i64),
    /// The newest lease is full: grant `id` for session `session`.
    Grow {
        session: i64,
        id: i64,
    },
}

/// What the session task shares with the registry.
pub(crate) struct Session {
    leases: Mutex<Leases>,
    keys_per_lease: usize,
    /// One grant at a time: creates waiting for room share it.
    growing: tokio::sync::Mutex<()>,
    /// Marked when a lease joins, so the keeper keeps it alive too.
    joined: watch::Sender<()>,
    pub(crate) tracker: SessionTracker,
    /// The last lease a request found gone, so the loss is handled at once rather than at the
    /// next keep-alive. A value (not a notification) so a report about an older session can
    /// never end a newer one.
    pub(crate) lease_gone: watch::Sender<i64>,
}

impl Session {
    /// A session whose first lease, `session`, is granted.
    pub(crate) fn new(session: i64, keys_per_lease: usize) -> Session {
        Session {
            leases: Mutex::new(Leases {
                ids: vec![session],
                next_index: 1,
                on_newest: 0,
                in_flight: 0,
                cursor: 0,
                retired: false,
            }),
            keys_per_lease: keys_per_lease.max(1),
            growing: tokio::sync::Mutex::new(()),
            joined: watch::channel(()).0,
            tracker: SessionTracker::new(),
            lease_gone: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session ID: the first lease.
    pub(crate) fn id(&self) -> i64 {
        self.lock().ids[0]
    }

    /// Every lease of the session.
    pub(crate) fn leases(&self) -> Vec<i64> {
        self.lock().ids.clone()
    }

    /// Every lease of the session, to revoke: from now on a grant that completes is revoked
    /// by its granter instead of joining (else a key put under it would outlive the session
    /// by up to a TTL).
    pub(crate) fn retire(&self) -> Vec<i64> {
        let mut leases = self.lock();
        leases.retired = true;
        leases.ids.clone()
    }

    /// Whether `lease` is in the current session's block.
    fn in_block(&self, lease: i64) -> bool {
        block_of(lease) == Some(self.id())
    }

    /// A request saw "lease not found" for `lease`.
    pub(crate) fn report_lease_gone(&self, lease: i64) {
        if self.in_block(lease) {
            self.lease_gone.send_replace(lease);
        }
    }

    /// Starts over with one lease after a loss.
    fn restart(&self, session: i64) {
        let mut leases = self.lock();
        let in_flight = leases.in_flight;
        *leases = Leases {
            ids: vec![session],
            next_index: 1,
            on_newest: 0,
            in_flight,
            cursor: 0,
            retired: false,
        };
        drop(leases);
        self.joined.send_replace(());
    }

    /// Room for a key: under the newest lease while it has room, round robin once the block
    /// is full, else a lease to grant first.
    fn slot(&self) -> Slot {
        let mut leases = self.lock();
        // Being revoked: no grant for it; the create fails or its key goes with the rest.
        if leases.retired {
            return Slot::Lease(leases.newest());
        }
        if leases.on_newest < self.keys_per_lease {
            leases.on_newest += 1;
            return Slot::Lease(leases.newest());
        }
        if leases.next_index >= MAX_LEASES {
            let lease = leases.ids[leases.cursor % leases.ids.len()];
            leases.cursor = leases.cursor.wrapping_add(1);
            return Slot::Lease(lease);
        }
        Slot::Grow {
            session: leases.ids[0],
            id: leases.ids[0] + leases.next_index,
        }
    }

    /// `id` of session `session` was granted (`granted`) or is taken by someone else; a
    /// granted one becomes the newest, holding the key it was granted for.
    fn grown(&self, session: i64, id: i64, granted: bool) -> bool {
        let mut leases = self.lock();
        if leases.retired || leases.ids[0] != session || leases.ids[0] + leases.next_index != id {
            return false;
        }
        leases.next_index += 1;
        if granted {
            leases.ids.push(id);
            leases.on_newest = 1;
            drop(leases);
            self.joined.send_replace(());
        }
        granted
    }

    /// The lease to put a new ephemeral key under, held in flight until the returned guard
    /// is dropped (once the create has completed, whatever its outcome); grants the
    /// session's next lease when the newest is full. A failed grant puts it under the newest
    /// anyway.
    pub(crate) async fn lease_for(
        &self,
        client: &Client,
        ttl: Duration,
        timeout: Duration,
    ) -> (i64, InFlight<'_>) {
        let lease = self.choose_lease(client, ttl, timeout).await;
        self.lock().in_flight += 1;
        (lease, InFlight(self))
    }

    async fn choose_lease(&self, client: &Client, ttl: Duration, timeout: Duration) -> i64 {
        // Bounded: each round grants, skips a taken ID, or sees another grant finish.
        for _ in 0..8 {
            if let Slot::Lease(lease) = self.slot() {
                return lease;
            }
            let _growing = self.growing.lock().await;
            let (session, id) = match self.slot() {
                Slot::Lease(lease) => return lease,
                Slot::Grow { session, id } => (session, id),
            };
            // The newest lease counted every key put under it, and every attempt: deleted
            // keys and failed creates leave room that only the server can tell.
            if let Some(lease) = self.room_on_newest(client, timeout).await {
                return lease;
            }
            let mut client = client.clone();
            let options = LeaseGrantOptions::new().with_id(id);
            match tokio::time::timeout(
                timeout,
                client.lease_grant(ttl.as_secs() as i64, Some(options)),
            )
            .await
            {
                Ok(Ok(_)) => {
                    if self.grown(session, id, true) {
                        tracing::debug!(session, lease = id, "etcd session grew a lease");
                        return id;
                    }
                    // The session was replaced meanwhile: this lease belongs to no one.
                    let _ = tokio::time::timeout(timeout, client.lease_revoke(id)).await;
                }
                Ok(Err(error)) if error.to_string().contains("already exists") => {
                    self.grown(session, id, false);
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "granting another lease failed; the newest one takes more keys");
                    break;
                }
                Err(_) => {
                    tracing::warn!(
                        "granting another lease timed out; the newest one takes more keys"
                    );
                    break;
                }
            }
        }
        self.take()
    }

    /// The newest lease if, counted on the server with the creates still in flight, it is
    /// less than half full after all; it then counts as holding that many (and this key).
    /// Half, not full: a create whose caller gave up is no longer counted in flight but may
    /// still land, so a lease can take a few keys over its share, not many.
    async fn room_on_newest(&self, client: &Client, timeout: Duration) -> Option<i64> {
        let newest = self.lock().newest();
        let mut client = client.clone();
        let options = etcd_client::LeaseTimeToLiveOptions::new().with_keys();
        let keys =
            match tokio::time::timeout(timeout, client.lease_time_to_live(newest, Some(options)))
                .await
            {
                // A lease already gone (a session being lost) has no room.
                Ok(Ok(answer)) if answer.ttl() > 0 => answer.keys().len(),
                // Not known: grant another, as before.
                _ => return None,
            };
        let mut leases = self.lock();
        let held = keys.saturating_add(leases.in_flight);
        if leases.retired
            || leases.newest() != newest
            || held.saturating_mul(2) >= self.keys_per_lease
        {
            return None;
        }
        tracing::debug!(
            lease = newest,
            keys,
            in_flight = leases.in_flight,
            "the newest lease has room again"
        );
        leases.on_newest = held + 1;
        Some(newest)
    }

    /// The newest lease, whatever it holds.
    fn take(&self) -> i64 {
        let mut leases = self.lock();
        leases.on_newest += 1;
        leases.newest()
    }
}

/// A lease slot whose create has not completed: counted as a key of its lease until dropped,
/// since the server cannot count it yet.
pub(crate) struct InFlight<'a>(&'a Session);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut leases = self.0.lock();
        leases.in_flight = leases.in_flight.saturating_sub(1);
    }
}

enum Outcome {
    /// The connection broke; the leases may still be alive.
    Broken,
    /// The member stopped answering keep-alives with its connection still open (paused, a
    /// stalled disk); the leases may still be alive.
    Silent,
    /// The server says a lease is gone.
    Lost,
    /// Close was asked for.
    Shutdown,
}

type Answers = SelectAll<
    BoxStream<
        'static,
        (
            i64,
            Option<Result<LeaseKeepAliveResponse, etcd_client::Error>>,
        ),
    >,
>;

/// Opens a keep-alive stream for every lease of the session not kept yet.
async fn keep_new(
    client: &mut Client,
    session: &Session,
    timeout: Duration,
    last_ok: &mut Instant,
    kept: &mut HashSet<i64>,
    keepers: &mut Vec<etcd_client::LeaseKeeper>,
    answers: &mut Answers,
) -> Result<(), Outcome> {
    for lease in session.leases() {
        if kept.contains(&lease) {
            continue;
        }
        let (keeper, stream) =
            match tokio::time::timeout(timeout, client.lease_keep_alive(lease)).await {
                Ok(Ok(pair)) => pair,
                // The server answered: the lease is gone (revoked or expired while the stream
                // was down). Not a broken connection to wait out for a whole TTL.
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(message)))
                    if message.contains("lease not found") =>
                {
                    tracing::warn!(lease, "etcd lease gone");
                    return Err(Outcome::Lost);
                }
                Ok(Err(error)) => {
                    tracing::debug!(%error, lease, "keep-alive stream failed to open");
                    return Err(Outcome::Broken);
                }
                Err(_) => return Err(Outcome::Broken),
            };
        // Opening a stream waits for the server's first keep-alive answer.
        *last_ok = Instant::now();
        kept.insert(lease);
        keepers.push(keeper);
        // A stream that ends says so once, rather than leaving the set unnoticed.
        answers.push(
            stream
                .map(move |answer| (lease, Some(answer)))
                .chain(futures::stream::once(async move { (lease, None) }))
                .boxed(),
        );
    }
    Ok(())
}

/// Keeps the session's leases alive over `client` until that fails. With `silence_limit`,
/// gives up on the member once no answer came for that long.
async fn keep_alive(
    client: &mut Client,
    ttl: Duration,
    silence_limit: Option<Duration>,
    session: &Session,
    last_ok: &mut Instant,
    shutdown: &mut watch::Receiver<bool>,
) -> Outcome {
    let interval = ttl / 3;
    let open_timeout = interval.max(Duration::from_secs(1));
    let mut joined = session.joined.subscribe();
    joined.borrow_and_update();
    let mut gone = session.lease_gone.subscribe();
    if session.in_block(*gone.borrow_and_update()) {
        return Outcome::Lost;
    }
    let (mut kept, mut keepers, mut answers) = (HashSet::new(), Vec::new(), SelectAll::new());
    if let Err(outcome) = keep_new(
        client,
        session,
        open_timeout,
        last_ok,
        &mut kept,
        &mut keepers,
        &mut answers,
    )
    .await
    {
        return outcome;
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A member just moved to (after another's silence) gets half the limit to answer, so a
    // second silent member is still left before the leases expire.
    let started = Instant::now();
    loop {
        let silent_since = *last_ok;
        // Checked: the limit comes from the TTL, which may be huge (no deadline then).
        let deadline = silence_limit.and_then(|limit| {
            let since = crate::hub::deadline_after(silent_since, limit)?;
            Some(since.max(crate::hub::deadline_after(started, limit / 2)?))
        });
        let silence = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        // Two thirds of the TTL without an answer (an answer a whole keep-alive interval
        // late): the server may expire the leases before the next one comes, so the session
        // must stop counting as live now (a master steps down before another can take over),
        // also with one endpoint and nowhere to move on to.
        let suspend_at = session
            .tracker
            .status()
            .state
            .is_live()
            .then(|| crate::hub::deadline_after(silent_since, ttl * 2 / 3))
            .flatten();
        let suspend = async {
            match suspend_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // An answer that is already there counts before the silence deadline does.
            biased;
            _ = shutdown.changed() => return Outcome::Shutdown,
            answer = answers.next() => match answer {
                Some((lease, Some(Ok(response)))) if response.ttl() <= 0 => {
                    tracing::warn!(lease, "etcd lease expired");
                    return Outcome::Lost;
                }
                Some((_, Some(Ok(_)))) => {
                    *last_ok = Instant::now();
                    if session.tracker.status().state == SessionState::Suspended {
                        session.tracker.transition(SessionState::Connected, Some(SessionId(session.id())));
                    }
                }
                _ => return Outcome::Broken,
            },
            _ = silence => {
                tracing::warn!(silent_ms = silent_since.elapsed().as_millis() as u64, "etcd member stopped answering keep-alives");
                return Outcome::Silent;
            }
            _ = suspend => {
                tracing::warn!(session = session.id(), "no keep-alive answer for two thirds of the TTL; session suspended");
                session.tracker.transition(SessionState::Suspended, None);
            }
            changed = gone.changed() => {
                if changed.is_ok() && session.in_block(*gone.borrow_and_update()) {
                    return Outcome::Lost;
                }
            }
            changed = joined.changed() => {
                if changed.is_ok() {
                    if let Err(outcome) = keep_new(client, session, open_timeout, last_ok, &mut kept, &mut keepers, &mut answers).await {
                        return outcome;
                    }
                }
            }
            _ = tick.tick() => {
                for keeper in &mut keepers {
                    if keeper.keep_alive().await.is_err() {
                        return Outcome::Broken;
                    }
                }
                // No answer within the TTL: the server has expired the leases by now.
                if last_ok.elapsed() > ttl {
                    return Outcome::Broken;
                }
            }
        }
    }
}

/// If the server still holds the session (a busy server may answer keep-alives late while
/// the leases live on): the time left, and when it was asked, which the time left counts
/// from (the answer may take a while to come back). Unreachable counts as gone: silent past
/// the TTL, the leases have expired as far as any other client can tell.
async fn still_granted(
    client: &mut Client,
    lease: i64,
    timeout: Duration,
) -> Option<(Duration, Instant)> {
    let asked = Instant::now();
    match tokio::time::timeout(timeout, client.lease_time_to_live(lease, None)).await {
        Ok(Ok(response)) if response.ttl() > 0 => {
            tracing::info!(
                lease,
                ttl = response.ttl(),
                "etcd lease outlived a slow keep-alive"
            );
            Some((remaining(response.ttl()), asked))
        }
        _ => None,
    }
}

/// A lease's remaining seconds as etcd reports them (rounded down).
fn remaining(ttl_secs: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl_secs).unwrap_or(0))
}

/// When a lease of `ttl` with `remaining` left at `asked` was last renewed: what the keeper
/// counts its silence from, so that it gives the session up when the server does, not a
/// whole TTL after the server vouched for it.
fn renewed_at(asked: Instant, ttl: Duration, remaining: Duration) -> Instant {
    asked
        .checked_sub(ttl.saturating_sub(remaining))
        .unwrap_or(asked)
}

/// Grants the first lease of a new session, with an ID of a new block (another if that one
/// is taken).
pub(crate) async fn grant_session(
    client: &mut Client,
    ttl: Duration,
) -> Result<i64, etcd_client::Error> {
    let mut taken = None;
    // Bounded: a random 35-bit block is taken by chance only.
    for _ in 0..4 {
        let id = new_block();
        match client
            .lease_grant(
                ttl.as_secs() as i64,
                Some(LeaseGrantOptions::new().with_id(id)),
            )
            .await
        {
            Ok(response) => return Ok(response.id()),
            Err(error) if error.to_string().contains("already exists") => taken = Some(error),
            Err(error) => return Err(error),
        }
    }
    Err(taken.unwrap_or_else(|| etcd_client::Error::LeaseKeepAliveError("no lease ID free".into())))
}

/// Grants a new session, retrying with backoff until it works or close is asked for.
async fn grant(
    link: &mut Link,
    ttl: Duration,
    timeout: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<i64> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match tokio::time::timeout(timeout, grant_session(&mut link.client, ttl)).await {
            Ok(Ok(lease)) => return Some(lease),
            Ok(Err(error)) => tracing::warn!(%error, "lease grant failed; retrying"),
            Err(_) => tracing::warn!("lease grant timed out; retrying"),
        }
        if !link.move_on(shutdown, None).await {
            return None;
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

/// Revokes `leases` at once and returns those that may still be granted (a lease etcd no
/// longer has counts as revoked: its keys went with it); one that is not revoked expires after
/// its TTL. Each revoke gets `timeout`; one that fails at once (a dead member) is tried again,
/// up to 5 times, since repeating a revoke is harmless.
pub(crate) async fn revoke_all(client: &Client, leases: &[i64], timeout: Duration) -> Vec<i64> {
    let revokes = leases.iter().map(|&lease| {
        let mut client = client.clone();
        async move {
            for attempt in 1..=5u64 {
                match tokio::time::timeout(timeout, client.lease_revoke(lease)).await {
                    Ok(Ok(_)) => return None,
                    Ok(Err(etcd_client::Error::GRpcStatus(status)))
                        if status.message().contains("lease not found") =>
                    {
                        return None
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(lease, attempt, %error, "lease revoke failed");
                        tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                    }
                    Err(_) => break,
                }
            }
            tracing::debug!(lease, "lease not revoked; it expires after its TTL");
            Some(lease)
        }
    });
    futures::future::join_all(revokes)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Ends session `session` from any client, as its TTL running out would: revokes every lease
/// of its block that etcd still holds (each within `timeout`), deleting all of its keys.
/// Returns how many leases were revoked (0: the session was already gone).
pub async fn revoke_session(
    client: &Client,
    session: SessionId,
    timeout: Duration,
) -> Result<usize, etcd_client::Error> {
    let listed = client.clone().leases().await?;
    let leases: Vec<i64> = listed
        .leases()
        .iter()
        .map(|lease| lease.id())
        .filter(|&lease| session_of_lease(lease) == session)
        .collect();
    let left = revoke_all(client, &leases, timeout).await;
    Ok(leases.len() - left.len())
}

/// The keeper's connection. With several endpoints it talks to one member at a time: a
/// member that stops answering with its connection open (paused, a stalled disk) would hold a
/// balanced channel's keep-alive stream until HTTP/2 pings give up, which can take longer
/// than the TTL, while one member at a time can be left as soon as it falls silent.
struct Link {
    endpoints: Vec<String>,
    connect: etcd_client::ConnectOptions,
    /// Bounds a connect, which authenticates when credentials are set.
    timeout: Duration,
    member: usize,
    client: Client,
}

impl Link {
    /// Connects to the member at `first` (failing that, the next ones in turn), retrying with
    /// backoff; `None` once close is asked for.
    async fn open(
        endpoints: Vec<String>,
        connect: etcd_client::ConnectOptions,
        timeout: Duration,
        first: usize,
        shutdown: &mut watch::Receiver<bool>,
        deadline: Option<Instant>,
    ) -> Result<Link, Reached> {
        match connect_from(&endpoints, &connect, timeout, first, shutdown, deadline).await {
            Reached::Member(member, client) => Ok(Link {
                endpoints,
                connect,
                timeout,
                member,
                client: *client,
            }),
            other => Err(other),
        }
    }

    /// Whether there is another member to move to.
    fn has_others(&self) -> bool {
        self.endpoints.len() > 1
    }

    /// Moves to the next member that takes a connection (with one endpoint, or none by
    /// `deadline`, stays); `false` once close is asked for.
    async fn move_on(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        deadline: Option<Instant>,
    ) -> bool {
        if !self.has_others() {
            return true;
        }
        let next = self.member + 1;
        let (endpoints, connect) = (&self.endpoints, &self.connect);
        match connect_from(endpoints, connect, self.timeout, next, shutdown, deadline).await {
            Reached::Member(member, client) => {
                (self.member, self.client) = (member, *client);
                tracing::info!(endpoint = %self.endpoints[member], "keep-alives moved to another etcd member");
                true
            }
            Reached::Deadline => true,
            Reached::Shutdown => false,
        }
    }

    /// Whether the server still holds `lease`, asked of every member at once: after a
    /// leader's loss a member may hang forwarding lease requests to it for seconds while
    /// another answers. The link moves to the first member that vouches. Unreachable
    /// everywhere counts as gone (see [`still_granted`]).
    async fn still_granted(
        &mut self,
        lease: i64,
        timeout: Duration,
    ) -> Option<(Duration, Instant)> {
        if !self.has_others() {
            return still_granted(&mut self.client, lease, timeout).await;
        }
        let asks: FuturesUnordered<_> = self
            .endpoints
            .iter()
            .enumerate()
            .map(|(member, endpoint)| {
                let connect = self.connect.clone();
                async move {
                    let mut client = Client::connect([endpoint], Some(connect)).await.ok()?;
                    let asked = Instant::now();
                    let ttl = client.lease_time_to_live(lease, None).await.ok()?.ttl();
                    (ttl > 0).then_some((member, client, (remaining(ttl), asked)))
                }
            })
            .collect();
        let mut vouched = asks.filter_map(std::future::ready).boxed();
        match tokio::time::timeout(timeout, vouched.next()).await {
            Ok(Some((member, client, vouched))) => {
                tracing::info!(lease, ttl = vouched.0.as_secs(), endpoint = %self.endpoints[member], "etcd lease outlived a slow keep-alive");
                (self.member, self.client) = (member, client);
                Some(vouched)
            }
            _ => None,
        }
    }
}

/// How trying to reach a member ended.
enum Reached {
    /// A client of this member (its index); boxed, being large.
    Member(usize, Box<Client>),
    /// Close was asked for.
    Shutdown,
    /// None took a connection by the deadline.
    Deadline,
}

/// A client of one member, trying them in turn from `first` (of all of them, with one
/// endpoint), with backoff between attempts, until `deadline` if there is one. With
/// credentials a connect logs in, so with no member reachable every attempt fails: the
/// deadline lets the session be declared lost meanwhile (see [`run`]).
async fn connect_from(
    endpoints: &[String],
    connect: &etcd_client::ConnectOptions,
    timeout: Duration,
    first: usize,
    shutdown: &mut watch::Receiver<bool>,
    deadline: Option<Instant>,
) -> Reached {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let until_deadline = || async {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    };
    for attempt in 0..usize::MAX {
        let member = first.wrapping_add(attempt) % endpoints.len().max(1);
        let targets = match endpoints.get(member) {
            Some(one) if endpoints.len() > 1 => vec![one.clone()],
            _ => endpoints.to_vec(),
        };
        let client = Client::connect(targets, Some(connect.clone()));
        tokio::select! {
            outcome = tokio::time::timeout(timeout, client) => match outcome {
                Ok(Ok(client)) => return Reached::Member(member, Box::new(client)),
                Ok(Err(error)) => tracing::warn!(%error, "keep-alive connection failed; retrying"),
                Err(_) => tracing::warn!("keep-alive connection timed out; retrying"),
            },
            _ = until_deadline() => return Reached::Deadline,
        }
        tokio::select! {
            _ = shutdown.changed() => return Reached::Shutdown,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = until_deadline() => return Reached::Deadline,
        }
    }
    Reached::Deadline
}

/// The keeper's shortest wait for a connection, however short the TTL.
const MIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the keeper waits for a connection and for a request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    /// For a connection to a member.
    pub connect: Duration,
    /// For one request.
    pub request: Duration,
}

/// Runs the session on a thread of its own, with its own runtime and its own connection, so a
/// busy application (or thousands of watch and registration tasks) can never delay a
/// keep-alive past the TTL. The returned receiver fires when the thread has finished.
pub(crate) fn spawn_keeper(
    endpoints: Vec<String>,
    connect: etcd_client::ConnectOptions,
    session: Arc<Session>,
    ttl: Duration,
    timeouts: Timeouts,
    mut shutdown: watch::Receiver<bool>,
    span: tracing::Span,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let (done, finished) = tokio::sync::oneshot::channel();
    // Built here, not in the thread: a runtime that cannot start fails the connect, where a
    // thread that ended at once would leave the session unkept and still reported live.
    let runtime = KeeperRuntime(Some(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
    ));
    std::thread::Builder::new()
        .name("etcd-keepalive".into())
        .spawn(move || {
            let Some(runtime) = runtime.0.as_ref() else {
                return;
            };
            runtime.block_on(tracing::Instrument::instrument(
                async move {
                    // Members taken in turn from one picked by the session ID, so clients
                    // spread their keep-alives over the cluster.
                    let first = session.id().unsigned_abs() as usize % endpoints.len().max(1);
                    // A connect authenticates when credentials are set: a request of its own.
                    // Within a third of the TTL, so a silent member cannot use up the time
                    // the leases have left.
                    let connect_timeout = timeouts
                        .connect
                        .saturating_add(timeouts.request)
                        .min(ttl / 3)
                        .max(MIN_CONNECT_TIMEOUT);
                    // The session was granted just now: unless a member takes the keeper's
                    // connection, it is suspended at two thirds of the TTL and lost at the
                    // TTL, as a silent one would be (with credentials a connect fails for as
                    // long as no member is reachable).
                    let granted = Instant::now();
                    let opened = {
                        let open = Link::open(
                            endpoints.clone(),
                            connect.clone(),
                            connect_timeout,
                            first,
                            &mut shutdown,
                            Some(granted + ttl),
                        );
                        tokio::pin!(open);
                        tokio::select! {
                            opened = &mut open => opened,
                            _ = tokio::time::sleep_until(granted + ttl * 2 / 3) => {
                                tracing::warn!(session = session.id(), "no etcd member reached for two thirds of the TTL; session suspended");
                                session.tracker.transition(SessionState::Suspended, None);
                                open.await
                            }
                        }
                    };
                    let (link, lost_already) = match opened {
                        Ok(link) => (link, false),
                        Err(Reached::Deadline) => {
                            tracing::warn!(session = session.id(), "no etcd member reached within the TTL; session lost");
                            session.tracker.transition(SessionState::Lost, None);
                            let reopened = Link::open(
                                endpoints,
                                connect,
                                connect_timeout,
                                first,
                                &mut shutdown,
                                None,
                            );
                            match reopened.await {
                                Ok(link) => (link, true),
                                Err(_) => return,
                            }
                        }
                        Err(_) => return,
                    };
                    let start = Start {
                        lost_already,
                        heard_at: granted,
                    };
                    run(link, session, ttl, timeouts.request, shutdown, start).await;
                },
                span,
            ));
            let _ = done.send(());
        })?;
    Ok(finished)
}

/// The keeper's runtime, shut down without waiting when dropped: a thread that fails to
/// spawn drops it on the connecting task, where a plain runtime's drop would panic.
struct KeeperRuntime(Option<tokio::runtime::Runtime>);

impl Drop for KeeperRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// How the keeper's first connection went.
struct Start {
    /// The session was lost before the keeper could reach a member: replace it first.
    lost_already: bool,
    /// When the server last renewed the session's leases (their grant, at first).
    heard_at: Instant,
}

/// Keeps the session's leases alive until shutdown; reports suspension, loss and the new
/// session that replaces a lost one.
async fn run(
    mut link: Link,
    session: Arc<Session>,
    ttl: Duration,
    request_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
    start: Start,
) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    // The leases' time runs from their grant, not from the keeper's first connection.
    let mut last_ok = start.heard_at;
    let mut lost_already = start.lost_already;
    // Silent for half the TTL, a member is left while the other half is time to reach
    // another one before the leases expire (see `keep_alive` for a second silent one).
    let silence_limit = link.has_others().then_some(ttl / 2);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let outcome = if std::mem::take(&mut lost_already) {
            Outcome::Lost
        } else {
            keep_alive(
                &mut link.client,
                ttl,
                silence_limit,
                &session,
                &mut last_ok,
                &mut shutdown,
            )
            .await
        };
        let id = session.id();
        let lost = match outcome {
            Outcome::Shutdown => return,
            Outcome::Lost => true,
            Outcome::Broken | Outcome::Silent => {
                if session.tracker.status().state.is_live() {
                    tracing::warn!(session = id, "etcd connection lost; session suspended");
                    session.tracker.transition(SessionState::Suspended, None);
                }
                // Another member may answer where this one did not; tried until the leases'
                // time is up, then the server is asked whether they are still granted.
                if !link.move_on(&mut shutdown, Some(last_ok + ttl)).await {
                    return;
                }
                if last_ok.elapsed() <= ttl {
                    false
                } else if let Some((left, asked)) = link.still_granted(id, request_timeout).await {
                    // The server vouched for the session: that counts as hearing from it when
                    // the leases were last renewed, or the next keep-alive round would give up
                    // before its first answer.
                    last_ok = renewed_at(asked, ttl, left);
                    false
                } else {
                    true
                }
            }
        };
        if lost {
            tracing::warn!(session = id, "etcd session lost; opening a new one");
            session.tracker.transition(SessionState::Lost, None);
            // The rest of the block goes too, so no key of the lost session outlives it.
            let leases = session.retire();
            let mut left = revoke_all(&link.client, &leases, request_timeout).await;
            tracing::debug!(
                session = id,
                leases = leases.len(),
                revoked = leases.len() - left.len(),
                "lost session's leases revoked"
            );
            let Some(new) = grant(&mut link, ttl, request_timeout, &mut shutdown).await else {
                return;
            };
            // The new lease's TTL runs from here, kept alive or not.
            let granted_at = Instant::now();
            // The cluster answers again. A lease it could not revoke before may still be
            // granted (a new leader renews every lease by its TTL): revoked now, so the lost
            // session's keys do not outlive `Reestablished` and stand in the way of the
            // registrations re-created under the new one.
            if !left.is_empty() {
                // Within a third of the TTL, so the new lease is kept alive in time.
                let bound = request_timeout.min(ttl / 3);
                left = tokio::time::timeout(bound, revoke_all(&link.client, &left, bound))
                    .await
                    .unwrap_or(left);
                if !left.is_empty() {
                    tracing::warn!(
                        session = id,
                        leases = ?left,
                        "lost session's leases not revoked; they expire after their TTL"
                    );
                }
            }
            session.restart(new);
            last_ok = granted_at;
            backoff.reset();
            session
                .tracker
                .transition(SessionState::Reestablished, Some(SessionId(new)));
            tracing::info!(session = new, "etcd session re-established");
            continue;
        }
        // The leases' time is running out: the next member is tried at once.
        if matches!(outcome, Outcome::Silent) {
            continue;
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vouched_lease_counts_from_its_last_renewal() {
        let now = Instant::now() + Duration::from_secs(60);
        let ttl = Duration::from_secs(10);
        assert_eq!(
            renewed_at(now, ttl, remaining(3)),
            now - Duration::from_secs(7)
        );
        assert_eq!(renewed_at(now, ttl, remaining(10)), now);
        // A lease granted with more than the session's TTL (or a bad answer) counts as new.
        assert_eq!(renewed_at(now, ttl, remaining(30)), now);
        assert_eq!(remaining(-1), Duration::ZERO);
    }

    #[test]
    fn every_lease_of_a_block_maps_to_its_session() {
        for _ in 0..100 {
            let first = new_block();
            assert!(first > 0);
            assert_eq!(session_of_lease(first), SessionId(first));
            assert_eq!(session_of_lease(first + 1), SessionId(first));
            assert_eq!(session_of_lease(first + INDEX_MASK), SessionId(first));
            assert_ne!(session_of_lease(first + MAX_LEASES), SessionId(first));
            assert_eq!(leases_of(SessionId(first)), (first, first + INDEX_MASK));
            assert_ne!(new_block(), first);
        }
    }

    #[test]
    fn leases_of_other_tools_are_their_own_sessions() {
        // IDs as etcd itself hands them out: consecutive, with a member prefix.
        let start = 0x694d_7a1b_2c3d_4e00_i64;
        let own = (0..1000)
            .filter(|i| session_of_lease(start + i) == SessionId(start + i))
            .count();
        assert!(own >= 990, "{own} of 1000 read as their own session");
        assert_eq!(leases_of(SessionId(start + 5)), (start + 5, start + 5));
        assert_eq!(session_of_lease(7), SessionId(7));
        assert_eq!(session_of_lease(-3), SessionId(-3));
    }

    #[test]
    fn keys_spread_over_leases() {
        let session = Session::new(new_block(), 2);
        let first = session.id();
        assert!(matches!(session.slot(), Slot::Lease(l) if l == first));
        assert!(matches!(session.slot(), Slot::Lease(l) if l == first));
        let Slot::Grow { session: s, id } = session.slot() else {
            panic!("a full lease must grow");
        };
        assert_eq!((s, id), (first, first + 1));
        // Taken by another client: the next index is tried.
        assert!(!session.grown(s, id, false));
        let Slot::Grow { id, .. } = session.slot() else {
            panic!("still full");
        };
        assert_eq!(id, first + 2);
        assert!(session.grown(first, id, true));
        assert_eq!(session.leases(), vec![first, first + 2]);
        // A grant for a session that was replaced meanwhile is not taken in.
        session.restart(first + MAX_LEASES);
        assert!(!session.grown(first, first + 3, true));
        assert_eq!(session.leases(), vec![first + MAX_LEASES]);
        assert_eq!(session.take(), first + MAX_LEASES);
    }

    #[test]
    fn a_grant_that_completes_after_the_leases_were_listed_for_revoking_is_not_taken_in() {
        let first = new_block();
        let session = Session::new(first, 1);
        assert!(matches!(session.slot(), Slot::Lease(l) if l == first));
        let Slot::Grow { session: s, id } = session.slot() else {
            panic!("a full lease must grow");
        };
        assert_eq!(session.retire(), vec![first]);
        // Not taken in: its granter revokes it, and the list being revoked stays complete.
        assert!(!session.grown(s, id, true));
        assert_eq!(session.leases(), vec![first]);
        // And no other grant starts.
        assert!(matches!(session.slot(), Slot::Lease(l) if l == first));
        // A new session takes grants again.
        session.restart(first + MAX_LEASES);
        assert!(session.grown(first + MAX_LEASES, first + MAX_LEASES + 1, true));
    }

    #[test]
    fn a_full_block_takes_turns() {
        let first = new_block();
        let session = Session::new(first, 1);
        assert!(session.grown(first, first + 1, true));
        session.lock().next_index = MAX_LEASES;
        let turns: Vec<i64> = (0..4)
            .map(|_| match session.slot() {
                Slot::Lease(lease) => lease,
                Slot::Grow { .. } => panic!("a full block cannot grow"),
            })
            .collect();
        assert_eq!(turns, vec![first, first + 1, first, first + 1]);
    }
}
