//! etcd backend (placeholder).
