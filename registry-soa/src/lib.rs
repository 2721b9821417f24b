//! The Dapeng-compatible SOA layer on top of any [`registry_core::Registry`]: the
//! `/soa/runtime` and `/soa/config` layout, the config and routes formats, version
//! compatibility, load balancing, providers, the live service view and master election.
#![warn(missing_docs)]

pub mod balance;
pub mod config;
pub mod discovery;
pub mod error;
pub mod layout;
pub mod master;
pub mod provider;
pub mod routes;
#[cfg(feature = "tower")]
pub mod tower;
pub mod version;

pub use discovery::{SelectOptions, ServiceSnapshot, ServiceView, StartedCall};
pub use error::{ParseError, SoaError};
pub use layout::{Address, Instance};
pub use provider::Provider;
