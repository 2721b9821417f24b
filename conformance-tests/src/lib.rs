//! The conformance suite: cases written once over a [`Fixture`], expanded into named tests
//! per backend, and the real-server harness that starts etcd and ZooKeeper for them.
#![warn(missing_docs)]

pub mod fixture;

pub use fixture::{Fault, Fixture};

pub mod harness;
