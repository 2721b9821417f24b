//! The in-memory backend: a complete implementation of the contract (placeholder; filled in
//! by the foundation work).

/// A shared in-memory tree that several clients connect to.
#[derive(Clone, Default)]
pub struct MemoryStore {}

/// A client of a [`MemoryStore`].
#[derive(Clone)]
pub struct MemoryRegistry {}
