//! `SoaError` and `ParseError`: what the SOA layer reports, typed.

use std::fmt;

use registry_core::Error as RegistryError;

/// A syntax error in a config or routes text, with its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    /// What was wrong and what was expected.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.message
        )
    }
}

impl std::error::Error for ParseError {}

/// Failures of the SOA layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SoaError {
    /// A service name, address or version is malformed; nothing was written.
    #[error("invalid {what}: {value:?}")]
    Invalid {
        /// What kind of value.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// The service has no live instance.
    #[error("no instance of {service}")]
    NoInstance {
        /// The service.
        service: String,
    },
    /// Instances exist but none is compatible with the requested version.
    #[error("no instance of {service} is compatible with version {version}")]
    VersionMismatch {
        /// The service.
        service: String,
        /// The version asked for.
        version: String,
    },
    /// The routing rules excluded every instance.
    #[error("routing excluded every instance of {service}")]
    RoutingExcludedAll {
        /// The service.
        service: String,
    },
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}
