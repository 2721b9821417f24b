//! `ZkOptions`: how to reach ZooKeeper and how the session behaves.

use std::fmt;
use std::time::Duration;

use registry_core::NodePath;

/// Who may do what with a node this client creates (its ZooKeeper ACL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZkAcl {
    /// Anyone may do anything (ZooKeeper's `OPEN_ACL_UNSAFE`).
    Open,
    /// Anyone may read; only clients authenticated as the creator may write, delete, add
    /// children or change the ACL.
    CreatorWritesAnyoneReads,
    /// Only clients authenticated as the creator may do anything, reading included.
    CreatorOnly,
}

/// Options of [`ZkRegistry::connect`](crate::ZkRegistry::connect), as a builder.
///
/// Defaults: session TTL 10 s, request timeout 3 s, connect timeout 5 s, no namespace, no
/// auth, `multiRead` for children when the servers have it. `Debug` never shows auth bytes.
#[derive(Clone)]
pub struct ZkOptions {
    /// `host:port` of every server to use (an element may itself be a ZooKeeper connect
    /// string `h1:2181,h2:2181`: they are joined with commas).
    pub endpoints: Vec<String>,
    /// Every path lives under this node (ZooKeeper's chroot). Created at connect if missing,
    /// with open ACLs, which needs the right to create in its nearest existing ancestor; an
    /// existing chroot is only read, so a client with no rights outside it can use it.
    pub namespace: Option<NodePath>,
    /// The session's TTL: ZooKeeper's session timeout, asked of the server (which clamps it
    /// to 2..20 ticks); the session expires this long after the server last heard from it.
    pub session_ttl: Duration,
    /// Deadline of each request.
    pub request_timeout: Duration,
    /// Deadline of establishing a session. Each try of one server, and the silence after
    /// which a connection counts as lost, is shorter: at most a quarter of `session_ttl`.
    pub connect_timeout: Duration,
    /// Authentication (scheme, bytes), e.g. `("digest", b"user:password")`, sent again after
    /// every reconnect and on every new session.
    pub auth: Option<(String, Vec<u8>)>,
    /// SASL DIGEST-MD5 user and password (the server needs a JAAS `Server` section and the
    /// SASL auth provider); authenticates every connection. Its ACL identity is
    /// `sasl:<user>`.
    pub sasl_digest_md5: Option<(String, String)>,
    /// ACL of ephemeral nodes (registrations). Default: [`ZkAcl::CreatorWritesAnyoneReads`]
    /// with auth (others can discover an instance but not remove or change it), else
    /// [`ZkAcl::Open`].
    pub ephemeral_acl: Option<ZkAcl>,
    /// ACL of persistent nodes created explicitly (config, routes, a provider's service
    /// nodes). Default: [`ZkAcl::Open`]. Parents created on the way are always open.
    ///
    /// ZooKeeper checks the right to delete a node (and to create one) on its *parent*: an
    /// instance is safe from other identities' deletes only under a service node whose ACL
    /// denies them, e.g. one its providers created with
    /// [`ZkAcl::CreatorWritesAnyoneReads`] (all providers of a service then share one
    /// identity; consumers and other services can still read).
    pub persistent_acl: Option<ZkAcl>,
    /// Whether `children` reads the children's values in `multiRead` requests (ZooKeeper
    /// 3.6 and later; up to [`MULTI_READ_NODES`](crate::MULTI_READ_NODES) nodes each) instead
    /// of one `getData` per child. `None` (the default): when at least one server answers
    /// the `srvr` four-letter word at connect, and every one that answers runs 3.6 or later
    /// (until the answers come, children are read one by one). A server that refuses one
    /// anyway (ZooKeeper then drops the connection; the session survives) turns it off for
    /// the client, and the read is made the other way, sent again after the reconnect.
    pub multi_read: Option<bool>,
}

impl ZkOptions {
    /// Options for these servers with the defaults.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        ZkOptions {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            namespace: None,
            session_ttl: Duration::from_secs(10),
            request_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(5),
            auth: None,
            sasl_digest_md5: None,
            ephemeral_acl: None,
            persistent_acl: None,
            multi_read: None,
        }
    }

    /// The endpoints as ZooKeeper's connect string, `h1:2181,h2:2181`.
    pub fn connect_string(&self) -> String {
        self.endpoints.join(",")
    }

    /// Authenticates with SASL DIGEST-MD5 (see [`ZkOptions::sasl_digest_md5`]).
    pub fn with_sasl_digest_md5(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.sasl_digest_md5 = Some((user.into(), password.into()));
        self
    }

    /// Whether connections authenticate (digest auth or SASL), so creator ACLs can apply.
    pub fn has_identity(&self) -> bool {
        self.auth.is_some() || self.sasl_digest_md5.is_some()
    }

    /// Sets the ACL of ephemeral nodes (see [`ZkOptions::ephemeral_acl`]).
    pub fn with_ephemeral_acl(mut self, acl: ZkAcl) -> Self {
        self.ephemeral_acl = Some(acl);
        self
    }

    /// Sets the ACL of explicitly created persistent nodes (see
    /// [`ZkOptions::persistent_acl`]).
    pub fn with_persistent_acl(mut self, acl: ZkAcl) -> Self {
        self.persistent_acl = Some(acl);
        self
    }

    /// The ACL a node created with `ephemeral` gets.
    pub fn acl_for(&self, ephemeral: bool) -> ZkAcl {
        let chosen = if ephemeral {
            self.ephemeral_acl
        } else {
            self.persistent_acl
        };
        chosen.unwrap_or(if ephemeral && self.has_identity() {
            ZkAcl::CreatorWritesAnyoneReads
        } else {
            ZkAcl::Open
        })
    }

    /// Uses `multiRead` for `children` always (`true`) or never (`false`), instead of
    /// asking the servers' release (see [`ZkOptions::multi_read`]).
    pub fn with_multi_read(mut self, multi_read: bool) -> Self {
        self.multi_read = Some(multi_read);
        self
    }

    /// Puts every path under `namespace` (see [`ZkOptions::namespace`]).
    pub fn with_namespace(mut self, namespace: NodePath) -> Self {
        self.namespace = (!namespace.is_root()).then_some(namespace);
        self
    }

    /// Sets [`ZkOptions::session_ttl`].
    pub fn with_session_ttl(mut self, ttl: Duration) -> Self {
        self.session_ttl = ttl;
        self
    }

    /// How long one server gets to answer a connection attempt, and how long a connection
    /// may stay silent before the client moves to another server: at most a quarter of the
    /// session TTL. zookeeper-client shuffles the servers after each connection, so the first
    /// try after a server went silent can be that server again; a quarter leaves two more
    /// tries before the session expires (its default, 2/5, left room for one).
    pub(crate) fn connection_attempt_timeout(&self) -> Duration {
        self.connect_timeout.min(self.session_ttl / 4)
    }

    /// Sets the per-request deadline.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the session-establishment deadline. Each try of one server is bounded by the
    /// smaller of this and a quarter of the session TTL.
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
            .field("endpoints", &self.endpoints)
            .field("namespace", &self.namespace)
            .field("session_ttl", &self.session_ttl)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("auth_scheme", &self.auth.as_ref().map(|(s, _)| s))
            .field("sasl_user", &self.sasl_digest_md5.as_ref().map(|(u, _)| u))
            .field("ephemeral_acl", &self.acl_for(true))
            .field("persistent_acl", &self.acl_for(false))
            .field("multi_read", &self.multi_read)
            .finish()
    }
}
