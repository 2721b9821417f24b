//! The service-registry contract shared by every backend.
//!
//! - [`Registry`]: the trait; its rustdoc is the specification, enforced by the
//!   `conformance-tests` crate against every backend.
//! - [`NodePath`], [`Node`], [`WatchEvent`], [`SessionState`], [`Error`]: the types it speaks.
//! - [`Registration`]: self-healing ephemeral nodes, written once on top of the trait.
//! - [`TreeCache`]: a live local copy of a subtree (Curator's `CuratorCache`), on the trait;
//!   [`PersistentWatch`]: watches that outlive broken streams and lost sessions, under it.
//! - [`memory`]: a complete in-memory backend for demos and fast tests.
//! - [`DualRegistry`] and [`migrate`]: moving a live tree from one backend to another.
#![warn(missing_docs)]

pub mod backoff;
pub mod cache;
pub mod capabilities;
pub mod dual;
pub mod error;
pub mod memory;
pub mod migrate;
pub mod node;
pub mod path;
pub mod persistent;
pub mod recipes;
pub mod registration;
pub mod registry;
pub mod session;
pub mod watch;

pub use bytes::Bytes;

pub use backoff::Backoff;
pub use cache::{CacheEvent, CachedTree, TreeCache};
pub use capabilities::Capabilities;
pub use dual::{DualOptions, DualRegistry};
pub use error::{BoxError, Error, InvalidPath, Result};
pub use memory::{MemoryOptions, MemoryRegistry, MemoryStore};
pub use node::{
    Children, CreateMode, DeleteScope, Expected, Node, Revision, SessionId, SkippedChild,
};
pub use path::{
    parse_sequence, sequential_name, NodePath, MAX_DEPTH, MAX_PATH_LEN, SEQUENCE_DIGITS,
};
pub use persistent::{PersistentItem, PersistentWatch};
pub use registration::{RegisterOptions, Registration, RegistrationStatus, RegistrationWatches};
pub use registry::{check_value, Registry, MAX_VALUE_LEN};
pub use session::{stop_session_task, CloseGate, SessionState, SessionStatus, SessionTracker};
pub use watch::{
    ResyncReason, Snapshot, WatchEvent, WatchOptions, WatchScope, WatchStream, WatchedState,
};
