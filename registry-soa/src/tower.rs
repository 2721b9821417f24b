//! The live instance list as a `tower::discover::Discover` (feature `tower`), so tower and
//! tonic balancers can use it.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;

use futures::stream::{self, BoxStream, StreamExt};
use tower::discover::Change;

use crate::discovery::ServiceView;
use crate::layout::{Address, Instance};

/// A stream of `Change::Insert(address, service)` / `Change::Remove(address)` that follows
/// `view`: first an insert per current instance, then the difference after every change (an
/// insert for a known address replaces its service when another node took that address).
/// It implements `tower::discover::Discover` (keys are addresses; `make` builds the service for
/// a new instance) and is `Unpin`, as tower's balancers require, so it goes to them as is. It
/// ends when the view is dropped.
pub fn discover<S, F>(
    view: &ServiceView,
    make: F,
) -> BoxStream<'static, Result<Change<Address, S>, Infallible>>
where
    S: Send + 'static,
    F: Fn(&Instance) -> S + Send + 'static,
{
    let source = view.snapshot_source();
    let changes = view.changes();
    let state = (
        changes,
        HashMap::<Address, Arc<Instance>>::new(),
        VecDeque::new(),
        make,
        true,
    );
    stream::unfold(
        state,
        move |(mut changes, mut known, mut pending, make, mut first)| {
            let source = source.clone();
            async move {
                loop {
                    if let Some(change) = pending.pop_front() {
                        return Some((Ok(change), (changes, known, pending, make, first)));
                    }
                    if !first && changes.changed().await.is_err() {
                        return None;
                    }
                    first = false;
                    let snapshot = source.load();
                    let now: HashMap<Address, Arc<Instance>> = snapshot
                        .instances
                        .iter()
                        .map(|i| (i.address, i.clone()))
                        .collect();
                    for address in known.keys().filter(|a| !now.contains_key(a)) {
                        pending.push_back(Change::Remove(*address));
                    }
                    for (address, instance) in &now {
                        // Another node at a known address (a provider restarted there, say
                        // with a new version), or the same node with another value (a weight
                        // rewritten in place): its service replaces the old one's.
                        if known.get(address).is_none_or(|k| **k != **instance) {
                            pending.push_back(Change::Insert(*address, make(instance)));
                        }
                    }
                    known = now;
                }
            }
        },
    )
    .boxed()
}
