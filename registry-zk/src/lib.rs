//! ZooKeeper backend (placeholder).
