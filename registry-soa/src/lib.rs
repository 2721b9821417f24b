//! The Dapeng-compatible SOA layer on top of any [`registry_core::Registry`]: the
//! `/soa/runtime` and `/soa/config` layout, the config and routes formats, version
//! compatibility and load balancing.
#![warn(missing_docs)]

pub mod balance;
pub mod config;
pub mod error;
pub mod layout;
pub mod routes;
pub mod version;

pub use error::{ParseError, SoaError};
