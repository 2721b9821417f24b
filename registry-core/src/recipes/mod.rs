//! Recipes on ordered children, written once on the [`Registry`](crate::Registry) trait:
//! a distributed [`Mutex`] and leader [`Election`], both with fencing tokens.
//!
//! Both follow ZooKeeper's classic recipes: each contender creates an ephemeral-sequential
//! node under the recipe's path; the oldest node (lowest `create_order`) wins; every other
//! contender watches only its predecessor, so a release wakes exactly one waiter (no herd).
//! The fencing token is the winning node's `create_order`: strictly increasing across holders.

mod contender;
pub mod election;
pub mod lock;

pub use election::{Election, Leader, Leadership};
pub use lock::{Mutex, MutexGuard};
