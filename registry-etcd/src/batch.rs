//! Coalescing of concurrent ephemeral creates into shared Txns.
//!
//! After a lost lease every registration is put again at once; one Txn per node would cost
//! two round trips each. Ephemeral creates queue here instead: while up to
//! [`BATCHES_IN_FLIGHT`] Txns are out, new creates accumulate, and the next Txn takes up to
//! [`MAX_BATCH`] of them, within [`MAX_BATCH_BYTES`]. A create that finds a Txn slot free
//! (and no batch waiting for one) runs at once in its caller's task, so an idle client pays
//! nothing for the queue.
//! A batch is one Txn whose compares hold while every parent of its nodes exists and is
//! persistent and every node's key is absent, and whose puts carry the session's leases.
//! If a node's key exists, that create fails with `AlreadyExists` and the rest go again as a
//! batch (a registration re-checking a node it already re-created must not cost the others
//! their batch). If any other compare fails (a parent is missing or changed) the batch's
//! creates run one by one, with their usual errors.
//!
//! Nodes created by one batch share a `create_revision`, so their `create_order` ties: they
//! were created together, and the contract orders only a node created after another.

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use registry_core::{CreateMode, Error, Node, NodePath, Result};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::{created, gets, persistent_parents, put_options, EtcdRegistry, Shared, MAX_TXN_OPS};

/// Most creates in one Txn (with their parents' compares, within etcd's `--max-txn-ops`).
pub(crate) const MAX_BATCH: usize = 64;

/// Batches out at once; more creates wait and form the next, larger batch.
pub(crate) const BATCHES_IN_FLIGHT: usize = 4;

/// Request bytes one batch may take (estimated by [`request_bytes`]): well under etcd's
/// default `--max-request-bytes` of 1.5 MiB, which refuses the whole Txn, whereas each of its
/// creates (values up to 512 KiB) fits alone.
pub(crate) const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// About what one create adds to a batch's request: its key (compared, put and probed) and
/// value, and the ops around them.
fn request_bytes(pending: &Pending) -> usize {
    3 * (pending.path.as_str().len() + 64) + pending.value.len()
}

/// One queued create and where its result goes.
pub(crate) struct Pending {
    pub(crate) path: NodePath,
    pub(crate) value: Bytes,
    pub(crate) reply: oneshot::Sender<Result<Node>>,
}

/// The queue's sending side (bounded by the number of callers awaiting a reply) and the
/// permits of the Txns in flight.
pub(crate) struct Queue {
    sender: mpsc::UnboundedSender<Pending>,
    permits: Arc<Semaphore>,
}

/// What the batcher task takes over.
pub(crate) struct Queued {
    receiver: mpsc::UnboundedReceiver<Pending>,
    permits: Arc<Semaphore>,
}

/// A new queue, and what [`spawn`] needs.
pub(crate) fn queue() -> (Queue, Queued) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let permits = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    (
        Queue {
            sender,
            permits: permits.clone(),
        },
        Queued { receiver, permits },
    )
}

impl Queue {
    /// A permit to create at once in the caller's task, if a Txn slot is free and the batcher
    /// waits for none: a lone create then skips two task hops, while creates that pile up
    /// still go through the queue and coalesce.
    pub(crate) fn alone(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Queues a create; `Err` if the batcher is gone (the client was dropped).
    pub(crate) fn send(&self, pending: Pending) -> Result<()> {
        self.sender.send(pending).map_err(|_| Error::Closed)
    }
}

/// Starts the batcher of `shared`'s client; it ends when the client is closed (`shutdown`
/// set; creates still queued then fail with `Closed`) or dropped.
pub(crate) fn spawn(
    shared: Weak<Shared>,
    queued: Queued,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let Queued {
        mut receiver,
        permits,
    } = queued;
    let task = async move {
        // A create that did not fit the last batch starts the next one.
        let mut carried: Option<Pending> = None;
        loop {
            let first = match carried.take() {
                Some(first) => first,
                None => tokio::select! {
                    first = receiver.recv() => match first {
                        Some(first) => first,
                        None => return,
                    },
                    _ = shutdown.wait_for(|closed| *closed) => return,
                },
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let mut bytes = request_bytes(&first);
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                let Ok(next) = receiver.try_recv() else {
                    break;
                };
                let size = request_bytes(&next);
                if bytes + size > MAX_BATCH_BYTES {
                    carried = Some(next);
                    break;
                }
                bytes += size;
                batch.push(next);
            }
            let Some(shared) = shared.upgrade() else {
                return;
            };
            tokio::spawn(
                async move {
                    let _permit = permit;
                    run(EtcdRegistry { shared }, batch).await;
                }
                .in_current_span(),
            );
        }
    };
    tokio::spawn(task.instrument(tracing::debug_span!("etcd_create_batcher")));
}

async fn run(registry: EtcdRegistry, mut batch: Vec<Pending>) {
    // Bounded: a second round only follows one that took out the nodes that exist.
    for _ in 0..2 {
        if batch.len() < 2 {
            break;
        }
        match together(&registry, &batch).await {
            Ok(Together::Created(nodes)) => {
                tracing::debug!(creates = batch.len(), "batched ephemeral creates");
                for (pending, node) in batch.into_iter().zip(nodes) {
                    let _ = pending.reply.send(Ok(node));
                }
                return;
            }
            Ok(Together::Exist(exists)) => {
                let mut rest = Vec::with_capacity(batch.len());
                for (pending, exists) in batch.into_iter().zip(exists) {
                    if exists {
                        let path = pending.path.clone();
                        let _ = pending.reply.send(Err(Error::AlreadyExists { path }));
                    } else {
                        rest.push(pending);
                    }
                }
                batch = rest;
            }
            Ok(Together::Cannot) => {
                tracing::debug!(
                    creates = batch.len(),
                    "batch cannot go as one Txn; one by one"
                );
                break;
            }
            // Refused by the server, so nothing was written: each create goes alone and gets
            // its own error (a permission denied on one path is not the others').
            Err(error) if !error.is_retryable() && !matches!(error, Error::Closed) => {
                tracing::debug!(%error, creates = batch.len(), "batch refused; one by one");
                break;
            }
            Err(error) => {
                // The Txn's fate is unknown: every create in it may or may not have happened.
                for pending in batch {
                    let _ = pending.reply.send(Err(same_kind(&error)));
                }
                return;
            }
        }
    }
    let alone = batch.into_iter().map(|pending| {
        let registry = registry.clone();
        async move {
            let result = registry
                .create_unbatched(&pending.path, &pending.value, CreateMode::Ephemeral)
                .await;
            let _ = pending.reply.send(result);
        }
    });
    futures::future::join_all(alone).await;
}

/// An error like `error`, for each caller of a failed batch.
fn same_kind(error: &Error) -> Error {
    match error {
        Error::SessionExpired => Error::SessionExpired,
        Error::Closed => Error::Closed,
        Error::Timeout { operation, after } => Error::Timeout {
            operation: operation.clone(),
            after: *after,
        },
        other => Error::unavailable(format!("batched create: {other}")),
    }
}

/// What one Txn for a whole batch did.
enum Together {
    /// Every node was created, in batch order.
    Created(Vec<Node>),
    /// Nothing was created because these (`true`, in batch order) already exist.
    Exist(Vec<bool>),
    /// Nothing was created, and the batch cannot go as one (duplicates, too many ops, a
    /// missing or ephemeral parent): each must go alone.
    Cannot,
}

/// Creates every node of `batch` in one Txn.
async fn together(registry: &EtcdRegistry, batch: &[Pending]) -> Result<Together> {
    let shared = &registry.shared;
    let keys = &shared.keys;
    let distinct: BTreeSet<&NodePath> = batch.iter().map(|p| &p.path).collect();
    if distinct.len() != batch.len() {
        return Ok(Together::Cannot);
    }
    let parents: Vec<String> = batch
        .iter()
        .filter_map(|p| p.path.parent())
        .filter(|a| !a.is_root())
        .collect::<BTreeSet<NodePath>>()
        .iter()
        .map(|a| keys.node(a))
        .collect();
    if 2 * parents.len() + batch.len() > MAX_TXN_OPS {
        return Ok(Together::Cannot);
    }
    // Each key its own lease slot: a batch may span two of the session's leases.
    let mut leases = Vec::with_capacity(batch.len());
    // In flight until the batch's Txn has completed.
    let mut in_flight = Vec::with_capacity(batch.len());
    for _ in batch {
        let (lease, slot) = shared.lease_for().await?;
        leases.push(lease);
        in_flight.push(slot);
    }
    // The parents are compared, not read first: one round trip.
    let mut compares = persistent_parents(&parents);
    let mut puts = Vec::with_capacity(batch.len());
    // On failure, which keys exist (keys only: cheap).
    let mut probes = Vec::with_capacity(batch.len());
    for (pending, &lease) in batch.iter().zip(&leases) {
        let key = keys.node(&pending.path);
        compares.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
        puts.push(TxnOp::put(
            key.clone(),
            pending.value.to_vec(),
            put_options(lease),
        ));
        probes.push(TxnOp::get(key, Some(GetOptions::new().with_keys_only())));
    }
    let response = shared
        .txn(
            Txn::new().when(compares).and_then(puts).or_else(probes),
            "create batch",
            &batch[0].path,
        )
        .await
        .inspect_err(|e| shared.lease_failed(e, leases[0]))?;
    if !response.succeeded() {
        let exists: Vec<bool> = gets(&response)
            .iter()
            .map(|g| !g.kvs().is_empty())
            .collect();
        return Ok(if exists.len() == batch.len() && exists.contains(&true) {
            Together::Exist(exists)
        } else {
            Together::Cannot
        });
    }
    Ok(Together::Created(
        batch
            .iter()
            .zip(leases)
            .map(|(pending, lease)| created(pending.path.clone(), &pending.value, &response, lease))
            .collect(),
    ))
}
