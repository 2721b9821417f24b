//! etcd over mutual TLS with auth (RBAC) on: the whole conformance suite, plus what only a
//! secured server can show: a wrong password, a missing client certificate, a read-only role.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use conformance_tests::harness::{SecureEtcd, TestPki};
use conformance_tests::{conformance_suite, Fault, Fixture};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, Permission, TlsOptions};
use registry_core::{Bytes, CreateMode, Error, Expected, NodePath, Registry, Result, SessionId};
use registry_etcd::{EtcdOptions, EtcdRegistry, EtcdTls};

const ROOT_PASSWORD: &str = "root-pw-1";
const READER_PASSWORD: &str = "reader-pw-1";

/// The secured server, started and set up (root user, auth on, a read-only role) once.
struct Secured {
    server: SecureEtcd,
}

fn secured() -> &'static Secured {
    static SECURED: OnceLock<Secured> = OnceLock::new();
    SECURED.get_or_init(|| {
        let server =
            SecureEtcd::start(true).unwrap_or_else(|e| panic!("cannot start TLS etcd: {e}"));
        // Called inside block_in_place: the setup's clients live and die on this runtime.
        tokio::runtime::Handle::current().block_on(enable_auth(&server));
        Secured { server }
    })
}

fn raw_tls(pki: &TestPki) -> TlsOptions {
    let read =
        |p: &std::path::Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    TlsOptions::new()
        .ca_certificate(Certificate::from_pem(read(&pki.ca_cert)))
        .identity(Identity::from_pem(read(&pki.client.0), read(&pki.client.1)))
}

async fn raw_root(server: &SecureEtcd) -> Client {
    let options = ConnectOptions::new()
        .with_tls(raw_tls(&server.pki))
        .with_user("root", ROOT_PASSWORD);
    Client::connect([format!("https://{}", server.endpoint())], Some(options))
        .await
        .unwrap_or_else(|e| panic!("root client: {e}; log:\n{}", server.log_tail()))
}

async fn enable_auth(server: &SecureEtcd) {
    let mut plain = Client::connect(
        [format!("https://{}", server.endpoint())],
        Some(ConnectOptions::new().with_tls(raw_tls(&server.pki))),
    )
    .await
    .unwrap_or_else(|e| panic!("TLS client: {e}; log:\n{}", server.log_tail()));
    plain
        .user_add("root", ROOT_PASSWORD, None)
        .await
        .unwrap_or_else(|e| panic!("user add: {e}"));
    plain
        .user_grant_role("root", "root")
        .await
        .unwrap_or_else(|e| panic!("grant root: {e}"));
    plain
        .auth_enable()
        .await
        .unwrap_or_else(|e| panic!("auth enable: {e}"));
    let mut root = raw_root(server).await;
    root.role_add("soa-config-ro")
        .await
        .unwrap_or_else(|e| panic!("role add: {e}"));
    for permission in [
        Permission::read("/soa/config/").with_prefix(),
        Permission::read_write("/soa/runtime/").with_prefix(),
    ] {
        root.role_grant_permission("soa-config-ro", permission)
            .await
            .unwrap_or_else(|e| panic!("grant permission: {e}"));
    }
    root.user_add("reader", READER_PASSWORD, None)
        .await
        .unwrap_or_else(|e| panic!("user add: {e}"));
    root.user_grant_role("reader", "soa-config-ro")
        .await
        .unwrap_or_else(|e| panic!("grant role: {e}"));
}

fn options(pki: &TestPki, endpoint: String, user: &str, password: &str) -> EtcdOptions {
    EtcdOptions::new([endpoint])
        .with_tls(EtcdTls {
            ca_cert: pki.ca_cert.clone(),
            client_identity: Some(pki.client.clone()),
        })
        .with_credentials(user, password)
        .with_session_ttl(Duration::from_secs(2))
}

struct SecureFixture;

#[async_trait]
impl Fixture for SecureFixture {
    fn name(&self) -> &'static str {
        "etcd-tls-auth"
    }

    async fn open(&self, namespace: &str) -> Result<Arc<dyn Registry>> {
        let s = tokio::task::block_in_place(secured);
        let options = options(&s.server.pki, s.server.endpoint(), "root", ROOT_PASSWORD)
            .with_namespace(NodePath::new(format!("/{namespace}"))?);
        Ok(Arc::new(EtcdRegistry::connect(options).await?))
    }

    fn supports(&self, fault: Fault) -> bool {
        fault == Fault::ExpireSession
    }

    async fn expire_session(&self, session: SessionId) -> Result<()> {
        let s = tokio::task::block_in_place(secured);
        let root = raw_root(&s.server).await;
        registry_etcd::revoke_session(&root, session, Duration::from_secs(5))
            .await
            .map_err(|e| Error::unavailable(e.to_string()))?;
        Ok(())
    }

    fn expiry_bound(&self) -> Duration {
        Duration::from_secs(4)
    }
}

fn fixture() -> Arc<dyn Fixture> {
    static FIXTURE: OnceLock<Arc<dyn Fixture>> = OnceLock::new();
    FIXTURE.get_or_init(|| Arc::new(SecureFixture)).clone()
}

conformance_suite!(fixture);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_an_auth_error() {
    let s = tokio::task::block_in_place(secured);
    let refused =
        EtcdRegistry::connect(options(&s.server.pki, s.server.endpoint(), "root", "wrong")).await;
    assert!(
        matches!(refused, Err(Error::AuthFailed(_))),
        "expected AuthFailed, got {:?}",
        refused.err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_client_certificate_is_refused_clearly() {
    let s = tokio::task::block_in_place(secured);
    let without_cert = EtcdOptions::new([s.server.endpoint()])
        .with_tls(EtcdTls {
            ca_cert: s.server.pki.ca_cert.clone(),
            client_identity: None,
        })
        .with_credentials("root", ROOT_PASSWORD)
        .with_connect_timeout(Duration::from_secs(2))
        .with_request_timeout(Duration::from_secs(2));
    let refused = EtcdRegistry::connect(without_cert).await;
    let Err(error) = refused else {
        panic!("connected without the client certificate the server requires");
    };
    let text = error.to_string();
    assert!(
        matches!(
            error,
            Error::Unavailable { .. } | Error::AuthFailed(_) | Error::Timeout { .. }
        ),
        "{error:?}"
    );
    assert!(
        text.contains("TLS"),
        "the error should point at TLS: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_role_cannot_write_config() {
    let s = tokio::task::block_in_place(secured);
    let root = EtcdRegistry::connect(options(
        &s.server.pki,
        s.server.endpoint(),
        "root",
        ROOT_PASSWORD,
    ))
    .await
    .unwrap_or_else(|e| panic!("root: {e}"));
    let config =
        NodePath::new("/soa/config/services/com.today.Goods").unwrap_or_else(|e| panic!("{e}"));
    match root
        .create(
            &config,
            Bytes::from("timeout/800ms"),
            CreateMode::Persistent,
        )
        .await
    {
        Ok(_) | Err(Error::AlreadyExists { .. }) => {}
        Err(e) => panic!("root create: {e}"),
    }
    let reader = EtcdRegistry::connect(options(
        &s.server.pki,
        s.server.endpoint(),
        "reader",
        READER_PASSWORD,
    ))
    .await
    .unwrap_or_else(|e| panic!("reader: {e}"));
    // Reading is allowed.
    let read = reader
        .get(&config)
        .await
        .unwrap_or_else(|e| panic!("reader get: {e}"));
    assert_eq!(read.value, Bytes::from("timeout/800ms"));
    // Writing is not, and says where.
    let denied = reader
        .set(&config, Bytes::from("timeout/1ms"), Expected::Any)
        .await;
    assert!(
        matches!(&denied, Err(Error::PermissionDenied { path }) if *path == config),
        "expected PermissionDenied at {config}, got {denied:?}"
    );
    assert_eq!(
        root.get(&config).await.map(|n| n.value).ok(),
        Some(Bytes::from("timeout/800ms")),
        "a denied write changed the value"
    );
    reader.close().await.unwrap_or_else(|e| panic!("{e}"));
    root.close().await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcds_url_connects_with_tls_and_credentials_and_never_shows_the_password() {
    let s = tokio::task::block_in_place(secured);
    let pki = &s.server.pki;
    let url = format!(
        "etcds://root:{ROOT_PASSWORD}@{}/url-test?ca={}&cert={}&key={}",
        s.server.endpoint(),
        pki.ca_cert.display(),
        pki.client.0.display(),
        pki.client.1.display()
    );
    let reg = registry::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("connect by URL: {e}"));
    let path = NodePath::new("/x").unwrap_or_else(|e| panic!("{e}"));
    reg.create(&path, Bytes::from("1"), CreateMode::Persistent)
        .await
        .unwrap_or_else(|e| panic!("create over etcds://: {e}"));
    let parsed = registry::RegistryUrl::parse(&url).unwrap_or_else(|e| panic!("{e}"));
    assert!(!format!("{parsed} {parsed:?}").contains(ROOT_PASSWORD));
    // A wrong password in the URL is an auth error whose text hides the password.
    let wrong = url.replace(ROOT_PASSWORD, "not-the-password");
    match registry::connect(&wrong).await {
        Err(Error::AuthFailed(message)) => assert!(!message.contains("not-the-password")),
        other => panic!("expected AuthFailed, got {:?}", other.err()),
    }
    reg.close().await.unwrap_or_else(|e| panic!("{e}"));
}
