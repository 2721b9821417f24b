//! `EtcdOptions`: how to reach etcd and how the session behaves.

use std::fmt;
use std::time::Duration;

use registry_core::NodePath;

/// etcd's smallest lease TTL.
pub const MIN_SESSION_TTL: Duration = Duration::from_secs(2);

/// Default of [`EtcdOptions::keys_per_lease`].
pub const DEFAULT_KEYS_PER_LEASE: usize = 256;

/// TLS settings: PEM files of the CA that signed the server certificate and, for mutual TLS,
/// the client certificate and key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    /// CA certificate (PEM) to verify the server with.
    pub ca_cert: std::path::PathBuf,
    /// Client certificate and key (PEM) for mutual TLS.
    pub client_identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// Options of [`EtcdRegistry::connect`](crate::EtcdRegistry::connect), as a builder.
///
/// Defaults: session TTL 5 s (kept alive every TTL/3), request timeout 3 s, connect timeout 3 s,
/// [`DEFAULT_KEYS_PER_LEASE`], no namespace, no credentials. `Debug` never shows the password.
#[derive(Clone)]
pub struct EtcdOptions {
    /// `host:port` or `http://host:port` of every member to use. With several, requests
    /// are balanced over them and a member that stops answering leaves the rotation until it
    /// answers again; keep-alives go to one member at a time and move on from one that falls
    /// silent for half the TTL.
    pub endpoints: Vec<String>,
    /// Key prefix every path lives under (a chroot): `/ns` maps `/a` to key `/ns/a`. The root
    /// counts as no namespace.
    pub namespace: Option<NodePath>,
    /// The session's TTL: its leases expire this long after the last keep-alive the
    /// server received. Raised to [`MIN_SESSION_TTL`] if smaller.
    pub session_ttl: Duration,
    /// Deadline of each request.
    pub request_timeout: Duration,
    /// Deadline of establishing a connection.
    pub connect_timeout: Duration,
    /// User name and password for etcd's auth. The client logs in when it connects and again
    /// whenever etcd refuses its login token (unused for etcd's `--auth-token-ttl`, or
    /// forgotten by a restart), then retries what was refused, once; watches are re-created
    /// with the new token. So while these credentials are valid no operation fails with
    /// `AuthFailed`; a login etcd refuses (wrong password, user removed) does, and a missing
    /// permission fails with `PermissionDenied` as before.
    pub credentials: Option<(String, String)>,
    /// TLS to the server (the server's certificate is verified against the CA; endpoints
    /// without a scheme become `https://`). Never falls back to plaintext.
    pub tls: Option<EtcdTls>,
    /// Ephemeral keys put under one lease before the session grants its next one (at least
    /// 1). etcd before 3.4.27 / 3.5.10, and any etcd with auth on for a non-root user, spends
    /// time linear in a lease's keys on every put under it (etcd-io/etcd#15993), so one lease
    /// for 10k registrations makes re-registering them take seconds. Counted at creation;
    /// before granting another lease the session counts the newest one's keys on the server
    /// and keeps using it while it is less than half full, so creating and deleting keys
    /// (locks, churning registrations) does not grow the session's leases.
    pub keys_per_lease: usize,
}

impl EtcdOptions {
    /// Options for these endpoints with the defaults.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        EtcdOptions {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            namespace: None,
            session_ttl: Duration::from_secs(5),
            request_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(3),
            credentials: None,
            tls: None,
            keys_per_lease: DEFAULT_KEYS_PER_LEASE,
        }
    }

    /// Sets [`EtcdOptions::keys_per_lease`] (0 counts as 1).
    pub fn with_keys_per_lease(mut self, keys: usize) -> Self {
        self.keys_per_lease = keys.max(1);
        self
    }

    /// Connects over TLS (see [`EtcdOptions::tls`]).
    pub fn with_tls(mut self, tls: EtcdTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Puts every path under `namespace`.
    pub fn with_namespace(mut self, namespace: NodePath) -> Self {
        self.namespace = (!namespace.is_root()).then_some(namespace);
        self
    }

    /// Sets [`EtcdOptions::session_ttl`].
    pub fn with_session_ttl(mut self, ttl: Duration) -> Self {
        self.session_ttl = ttl;
        self
    }

    /// Sets the per-request deadline.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the connection deadline.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Authenticates as `user` (see [`EtcdOptions::credentials`] for how the login is kept).
    pub fn with_credentials(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.credentials = Some((user.into(), password.into()));
        self
    }

    /// The TTL actually used: at least [`MIN_SESSION_TTL`], whole seconds rounded up.
    pub fn effective_session_ttl(&self) -> Duration {
        let secs = self.session_ttl.max(MIN_SESSION_TTL).as_secs_f64().ceil() as u64;
        Duration::from_secs(secs)
    }
}

impl fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("namespace", &self.namespace)
            .field("session_ttl", &self.session_ttl)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .field("tls", &self.tls)
            .field("keys_per_lease", &self.keys_per_lease)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_floor_and_redaction() {
        let o = EtcdOptions::new(["127.0.0.1:2379"])
            .with_session_ttl(Duration::from_millis(500))
            .with_credentials("root", "s3cret");
        assert_eq!(o.effective_session_ttl(), MIN_SESSION_TTL);
        assert_eq!(
            o.clone()
                .with_session_ttl(Duration::from_millis(5500))
                .effective_session_ttl(),
            Duration::from_secs(6)
        );
        assert!(!format!("{o:?}").contains("s3cret"));
    }

    #[tokio::test]
    async fn tls_input_errors_come_before_any_io() {
        let missing = EtcdOptions::new(["127.0.0.1:1"]).with_tls(EtcdTls {
            ca_cert: "/nonexistent/ca.pem".into(),
            client_identity: None,
        });
        let r = crate::EtcdRegistry::connect(missing).await;
        assert!(
            matches!(&r, Err(registry_core::Error::InvalidArgument(m)) if m.contains("/nonexistent/ca.pem")),
            "{:?}",
            r.err()
        );
        let plain = EtcdOptions::new(["https://127.0.0.1:1"]);
        let r = crate::EtcdRegistry::connect(plain).await;
        assert!(
            matches!(&r, Err(registry_core::Error::InvalidArgument(m)) if m.contains("no TLS settings")),
            "{:?}",
            r.err()
        );
    }
}
