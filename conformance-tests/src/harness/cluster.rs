//! `Cluster`: what fault cases need of a set of server processes, whichever server it is.

use std::net::SocketAddr;

use super::{EtcdCluster, HarnessResult, ZkEnsemble};

/// A running set of server processes (etcd members or ZooKeeper servers) that a fault case
/// owns: it can crash, freeze, continue and restart each one. Every method that changes a
/// process returns once the change took effect (`restart` once the member serves again).
pub trait Cluster: Send {
    /// How many members.
    fn size(&self) -> usize;
    /// The client address of member `index`.
    fn client_addr(&self, index: usize) -> HarnessResult<SocketAddr>;
    /// The member currently leading (for a single server: 0 while it serves).
    fn leader(&self) -> Option<usize>;
    /// SIGKILL.
    fn kill(&mut self, index: usize) -> HarnessResult<()>;
    /// SIGSTOP.
    fn pause(&mut self, index: usize) -> HarnessResult<()>;
    /// SIGCONT.
    fn resume(&mut self, index: usize) -> HarnessResult<()>;
    /// Waits until member `index` serves (has a leader, or is one), as after a resume.
    fn wait_serving(&self, index: usize) -> HarnessResult<()>;
    /// Starts a killed member again on its data and waits until it serves.
    fn restart(&mut self, index: usize) -> HarnessResult<()>;
}

macro_rules! cluster_impl {
    ($ty:ty, $size:expr) => {
        impl Cluster for $ty {
            fn size(&self) -> usize {
                let size: fn(&$ty) -> usize = $size;
                size(self)
            }
            fn client_addr(&self, index: usize) -> HarnessResult<SocketAddr> {
                <$ty>::client_addr(self, index)
            }
            fn leader(&self) -> Option<usize> {
                <$ty>::leader(self)
            }
            fn kill(&mut self, index: usize) -> HarnessResult<()> {
                <$ty>::kill(self, index)
            }
            fn pause(&mut self, index: usize) -> HarnessResult<()> {
                <$ty>::pause(self, index)
            }
            fn resume(&mut self, index: usize) -> HarnessResult<()> {
                <$ty>::resume(self, index)
            }
            fn wait_serving(&self, index: usize) -> HarnessResult<()> {
                <$ty>::wait_serving(self, index)
            }
            fn restart(&mut self, index: usize) -> HarnessResult<()> {
                <$ty>::restart(self, index)
            }
        }
    };
}

cluster_impl!(EtcdCluster, |c| c.endpoints().len());
cluster_impl!(ZkEnsemble, |c| c.connect_string().split(',').count());
