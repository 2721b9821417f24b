//! Master election per `service:version`, Dapeng's rule: the instance whose runtime node has
//! the lowest sequence is master.

use std::sync::Arc;

use futures::StreamExt;
use registry_core::NodePath;
use tokio::sync::watch;

use crate::discovery::{ServiceSnapshot, ServiceView};
use crate::layout::Instance;
use crate::provider::{live_node, Provider};

/// The master of `version` among `instances`: lowest sequence (then oldest) of that version.
pub fn master_of<'i>(instances: &'i [Arc<Instance>], version: &str) -> Option<&'i Instance> {
    instances
        .iter()
        .filter(|i| i.version.as_deref() == Some(version) && i.sequence.is_some())
        .min_by_key(|i| (i.sequence, i.create_order))
        .map(Arc::as_ref)
}

fn is_master(snapshot: &ServiceSnapshot, version: &str, node: Option<&NodePath>) -> bool {
    !snapshot.stale
        && node.is_some_and(|node| {
            master_of(&snapshot.instances, version).is_some_and(|m| &m.path == node)
        })
}

/// Whether `provider` is master now, according to `view`: false while its node is missing
/// (session lost, being re-created), while its session is not live (suspended: the server may
/// expire it and let another instance take over) or the view is stale.
pub fn provider_is_master(view: &ServiceView, provider: &Provider) -> bool {
    is_master(
        &view.snapshot(),
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
    let version = provider.version().to_owned();
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
                let master = is_master(&current.load(), &version, node.as_ref());
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
