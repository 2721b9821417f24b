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
use crate::layout::{Address, Instance};
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

/// Dapeng compares the lowest node's `ip:port:version` with the instance's own, not the node:
/// a previous run's node of the same address still listed (its removal failed, or it was
/// re-created) does not keep the new run from mastership. The instance's own node must
/// exist under its live session all the same.
fn is_master(
    snapshot: &ServiceSnapshot,
    address: Address,
    version: &str,
    node: Option<&NodePath>,
) -> bool {
    !snapshot.stale
        && node.is_some()
        && master_of(&snapshot.instances)
            .is_some_and(|m| m.address == address && m.version.as_deref() == Some(version))
}

/// Whether `provider` is the service's master now (see [`master_of`]: one for all versions),
/// according to `view`: false while its node is missing
/// (session lost, being re-created), while its session is not live (suspended: the server may
/// expire it and let another instance take over) or the view is stale.
pub fn provider_is_master(view: &ServiceView, provider: &Provider) -> bool {
    is_master(
        &view.snapshot(),
        provider.address(),
        provider.version(),
        provider.live_node().as_ref(),
    )
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
    let (address, version) = (provider.address(), provider.version().to_owned());
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
                let master = is_master(&current.load(), address, &version, node.as_ref());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(address: &str, version: &str, sequence: u64) -> Arc<Instance> {
        let name = format!("{address}:{version}:{sequence:010}");
        Arc::new(Instance {
            address: address.parse().unwrap(),
            version: Some(version.to_owned()),
            sequence: Some(sequence),
            weight: None,
            create_order: sequence,
            path: NodePath::new(format!("/soa/runtime/services/S/{name}")).unwrap(),
        })
    }

    /// Dapeng compares the lowest node's `ip:port:version` with its own: a previous run's
    /// node of the same address, still listed below ours, leaves us master.
    #[test]
    fn master_is_decided_by_address_and_version_not_by_node() {
        let previous_run = instance("10.0.7.1:9090", "1.0.0", 3);
        let ours = instance("10.0.7.1:9090", "1.0.0", 9);
        let other = instance("10.0.7.2:9090", "1.0.0", 5);
        let mut snapshot = ServiceSnapshot::default();
        snapshot.instances = vec![previous_run, other.clone(), ours.clone()];
        let address = ours.address;
        assert!(is_master(&snapshot, address, "1.0.0", Some(&ours.path)));
        assert!(
            !is_master(&snapshot, address, "1.0.0", None),
            "no live node"
        );
        assert!(!is_master(&snapshot, address, "1.0.1", Some(&ours.path)));
        assert!(!is_master(
            &snapshot,
            other.address,
            "1.0.0",
            Some(&other.path)
        ));
        snapshot.stale = true;
        assert!(!is_master(&snapshot, address, "1.0.0", Some(&ours.path)));
    }
}
