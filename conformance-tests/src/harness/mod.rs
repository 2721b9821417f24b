//! The real-server harness: starts etcd and ZooKeeper processes on free loopback ports in
//! temp dirs, and injects faults (kill, pause, restart, connection cuts).

pub mod cluster;
pub mod etcd;
pub mod partition;
pub mod process;
pub mod proxy;
pub mod secure;
pub mod zookeeper;

pub use cluster::Cluster;
pub use etcd::{EtcdCluster, EtcdServer};
pub use process::{
    free_port, port_open, require_binary, set_watchdog, wait_until, HarnessResult, ServerProcess,
    SETUP_COMMAND, WATCHDOG_DEFAULT,
};
pub use proxy::{ProxyMode, TcpProxy};
pub use secure::{SecureEtcd, TestPki};
pub use zookeeper::{four_letter, ZkConfig, ZkEnsemble, ZkServer};
