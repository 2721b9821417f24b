//! Master election, Dapeng's rule: the instance whose runtime node has the lowest sequence
//! among all of the service's nodes is master. Dapeng keys mastership by `service:version`
//! but elects across versions (`ServerZk.checkIsMaster` sorts every child of the service), so
//! a service has at most one master even while two versions run side by side in a rolling
//! upgrade; an instance of another version than the oldest one's is master of nothing.

use std::sync::Arc;

use futures::StreamExt;
use registry_core::NodePath;
use tokio::sync::watch;

use crate::discovery::{ServiceSnapshot, ServiceView};
use crate::layout::Instance;
use crate::provider::{live_node, Provider};

/// The service's master among `instances`: the lowest sequence (then the oldest node) of any
/// version, as Dapeng elects it. Instances without a sequence (etcd's `ip:port` variant) take
/// no part; `None` when no instance has one.
pub fn master_of(instances: &[Arc<Instance>]) -> Option<&Instance> {
    instances
        .iter()
        .filter(|i| i.sequence.is_some())
        .min_by_key(|i| (i.sequence, i.create_order))
        .map(Arc::as_ref)
}

fn is_master(snapshot: &ServiceSnapshot, node: Option<&NodePath>) -> bool {
    !snapshot.stale
        && node.is_some_and(|node| master_of(&snapshot.instances).is_some_and(|m| &m.path == node))
}

/// Whether `provider` is the service's master now (see [`master_of`]: one for all versions),
/// according to `view`: false while its node is missing
/// (session lost, being re-created), while its session is not live (suspended: the server may
/// expire it and let another instance take over) or the view is stale.
pub fn provider_is_master(view: &ServiceView, provider: &Provider) -> bool {
    is_master(&view.snapshot(), provider.live_node().as_ref())
}

/// Follows mastership of `provider`: the receiver changes whenever it becomes or stops being
/// master (checked on every view change, registration change and session change of the
/// provider's registry). Ends with the view or when the provider's registry closes, and then
/// always reads `false`: nothing follows mastership any more.
pub fn watch_mastership(view: &ServiceView, provider: &Provider) -> watch::Receiver<bool> {
    // Subscribed before the first read: a change in between wakes the task below.
    let mut changes = view.changes();
    let mut status = provider.registration().watch_status();
    let registry = provider.registry().clone();
    let mut sessions = registry.session_events();
    let (tx, rx) = watch::channel(provider_is_master(view, provider));
    let current = view.snapshot_source();
    let span = tracing::debug_span!("mastership", provider = %provider.address());
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            // Whichever way the loop ends, the receiver must not go on reading `true`.
            struct StepDown(watch::Sender<bool>);
            impl Drop for StepDown {
                fn drop(&mut self) {
                    self.0.send_replace(false);
                }
            }
            let tx = StepDown(tx);
            let tx = &tx.0;
            loop {
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    changed = status.changed() => if changed.is_err() { return },
                    session = sessions.next() => if session.is_none() { return },
                }
                let node = live_node(&*registry, &status.borrow());
                let master = is_master(&current.load(), node.as_ref());
                tx.send_if_modified(|m| {
                    let changed = *m != master;
                    *m = master;
                    changed
                });
                if tx.is_closed() {
                    return;
                }
            }
        },
        span,
    ));
    rx
}
