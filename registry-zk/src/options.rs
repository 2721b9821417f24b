//! `ZkOptions`: how to reach ZooKeeper and how the session behaves.

use std::fmt;
use std::time::Duration;

use registry_core::NodePath;

/// Options of [`ZkRegistry::connect`](crate::ZkRegistry::connect), as a builder.
///
/// Defaults: session timeout 10 s, request timeout 3 s, connect timeout 5 s, no chroot, no
/// auth. `Debug` never shows auth bytes.
#[derive(Clone)]
pub struct ZkOptions {
    /// `host:port,host:port` of the servers.
    pub connect_string: String,
    /// Every path lives under this node (created if missing).
    pub chroot: Option<NodePath>,
    /// Session timeout asked of the server (it clamps to 2..20 ticks).
    pub session_timeout: Duration,
    /// Deadline of each request.
    pub request_timeout: Duration,
    /// Deadline of establishing a session.
    pub connect_timeout: Duration,
    /// Authentication (scheme, bytes), e.g. `("digest", b"user:password")`.
    pub auth: Option<(String, Vec<u8>)>,
}

impl ZkOptions {
    /// Options for these servers with the defaults.
    pub fn new(connect_string: impl Into<String>) -> Self {
        ZkOptions {
            connect_string: connect_string.into(),
            chroot: None,
            session_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(5),
            auth: None,
        }
    }

    /// Puts every path under `chroot`.
    pub fn with_chroot(mut self, chroot: NodePath) -> Self {
        self.chroot = (!chroot.is_root()).then_some(chroot);
        self
    }

    /// Sets the session timeout.
    pub fn with_session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }

    /// Sets the per-request deadline.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the session-establishment deadline.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Authenticates with `scheme` and `auth` after every (re)connect.
    pub fn with_auth(mut self, scheme: impl Into<String>, auth: impl Into<Vec<u8>>) -> Self {
        self.auth = Some((scheme.into(), auth.into()));
        self
    }
}

impl fmt::Debug for ZkOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZkOptions")
            .field("connect_string", &self.connect_string)
            .field("chroot", &self.chroot)
            .field("session_timeout", &self.session_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("auth_scheme", &self.auth.as_ref().map(|(s, _)| s))
            .finish()
    }
}
