//! The `provider` and `consumer` binaries of the Dapeng-style demo (see `src/bin/`).
