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
    /// A sequential create moves past a name that a node already holds, so a node created
    /// under a name ahead of the counter is harmless (etcd, memory). When false, the create
    /// fails with `AlreadyExists` naming it until that node goes (ZooKeeper, whose counter
    /// stays at the taken name).
    pub sequential_skips_taken: bool,
}

impl Capabilities {
    /// Capabilities with every guarantee; backends switch off what they lack.
    pub fn full(backend: &'static str) -> Self {
        Capabilities {
            backend,
            exact_events: true,
            watch_from_revision: true,
            sequential_skips_taken: true,
        }
    }

    /// These capabilities with `exact_events` set.
    pub fn with_exact_events(mut self, yes: bool) -> Self {
        self.exact_events = yes;
        self
    }

    /// These capabilities with `sequential_skips_taken` set.
    pub fn with_sequential_skips_taken(mut self, yes: bool) -> Self {
        self.sequential_skips_taken = yes;
        self
    }

    /// These capabilities with `watch_from_revision` set.
    pub fn with_watch_from_revision(mut self, yes: bool) -> Self {
        self.watch_from_revision = yes;
        self
    }
}
