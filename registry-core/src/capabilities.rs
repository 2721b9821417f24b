//! `Capabilities`: what a backend can and cannot guarantee beyond the common contract.

/// What a backend guarantees beyond the common contract. The conformance suite skips a case
/// only through these flags, and prints why.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Short backend name (`memory`, `etcd`, `zookeeper`).
    pub backend: &'static str,
    /// Every committed change is delivered as its own event (etcd, memory). When false, a watch
    /// delivers converging snapshots: the net change between two reads, so a change undone in
    /// between is never seen (ZooKeeper's one-shot watches).
    pub exact_events: bool,
    /// A watch can start after a past revision ([`WatchOptions::after`](crate::WatchOptions::after))
    /// and replay every change since.
    pub watch_from_revision: bool,
}

impl Capabilities {
    /// Capabilities with every guarantee; backends switch off what they lack.
    pub fn full(backend: &'static str) -> Self {
        Capabilities {
            backend,
            exact_events: true,
            watch_from_revision: true,
        }
    }

    /// These capabilities with `exact_events` set.
    pub fn with_exact_events(mut self, yes: bool) -> Self {
        self.exact_events = yes;
        self
    }

    /// These capabilities with `watch_from_revision` set.
    pub fn with_watch_from_revision(mut self, yes: bool) -> Self {
        self.watch_from_revision = yes;
        self
    }
}
