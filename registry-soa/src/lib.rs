//! Dapeng-compatible SOA layer (placeholder).
