//! `SoaError` and `ParseError`: what the SOA layer reports, typed.

use std::fmt;

use registry_core::{Error as RegistryError, NodePath};

/// The lines of a config or routes text: split at `\n`, `\r\n` and a lone `\r`, as
/// Dapeng's lexer and config reader split them. [`ParseError::line`] counts these.
pub(crate) fn text_lines(text: &str) -> impl Iterator<Item = &str> {
    // As `str::lines`: a final line end ends the last line; it does not start another.
    let mut rest = (!text.is_empty()).then(|| {
        let text = text.strip_suffix('\n').unwrap_or(text);
        text.strip_suffix('\r').unwrap_or(text)
    });
    std::iter::from_fn(move || {
        let current = rest?;
        match current.find(['\r', '\n']) {
            Some(at) => {
                let skip = if current[at..].starts_with("\r\n") {
                    2
                } else {
                    1
                };
                rest = Some(&current[at + skip..]);
                Some(&current[..at])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

/// A syntax error in a config or routes text, with its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line (lines end at `\n`, `\r\n` or a lone `\r`).
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
    /// The service's routes or cookie rules at `path` have not parsed since the view opened,
    /// so which instances they allow is unknown; selecting fails until they parse.
    #[error("rules of {service} at {path} do not parse ({error}); no instance is selected until they do")]
    RulesUnparsed {
        /// The service.
        service: String,
        /// The routes or cookie-rules node.
        path: NodePath,
        /// Why they do not parse.
        error: ParseError,
    },
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

#[cfg(test)]
mod tests {
    use super::text_lines;

    #[test]
    fn lines_end_at_lf_crlf_and_lone_cr() {
        let lines = |t| text_lines(t).collect::<Vec<_>>();
        assert_eq!(lines("a\nb\r\nc\rd"), ["a", "b", "c", "d"]);
        assert_eq!(lines("a\r\n\r\nb\n"), ["a", "", "b"]);
        assert_eq!(lines("a\r"), ["a"]);
        assert_eq!(lines("a\n\n"), ["a", ""]);
        assert!(lines("").is_empty());
        // As `str::lines` for text without a lone CR.
        for t in ["x\ny", "x\r\ny\r\n", "\n", "\nx", "x\n\n\ny"] {
            assert_eq!(lines(t), t.lines().collect::<Vec<_>>(), "{t:?}");
        }
    }
}
