//! One crate to depend on: the [`Registry`] contract and its types (re-exported from
//! `registry-core`), and [`connect`], which opens any backend compiled in from a URL.
//!
//! Backends are Cargo features: `etcd` and `zk`; the in-memory backend is always there. A URL
//! for a backend that was not compiled in fails with an error naming the feature to enable.
#![warn(missing_docs)]

pub mod url;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

pub use registry_core::*;
pub use url::{BackendKind, Credentials, Endpoint, RegistryUrl, TlsFiles};

/// Opens a registry client from a URL such as `etcd://127.0.0.1:2379/ns?session_ttl=5s`,
/// `zk://127.0.0.1:2181/chroot` or `mem://name` (see [`url`] for the forms).
///
/// Guarantees: a malformed URL or one naming a backend that was not compiled in fails with
/// [`Error::InvalidArgument`] before any I/O; the error never contains the URL's password.
/// `mem://name` clients of one process share the store called `name`; `mem://` gets a private
/// store.
pub async fn connect(url: &str) -> Result<Arc<dyn Registry>> {
    let url = RegistryUrl::parse(url)?;
    connect_url(&url).await
}

/// [`connect`] for an already parsed URL.
pub async fn connect_url(url: &RegistryUrl) -> Result<Arc<dyn Registry>> {
    match url.kind {
        BackendKind::Memory => {
            let store = match &url.memory_name {
                Some(name) => shared_store(name),
                None => MemoryStore::new(),
            };
            let mut options = MemoryOptions::default();
            if let Some(ttl) = url.session_ttl {
                options = options.with_session_ttl(ttl);
            }
            Ok(Arc::new(MemoryRegistry::connect(&store, options).await?))
        }
        BackendKind::Etcd => connect_etcd(url).await,
        BackendKind::ZooKeeper => connect_zk(url).await,
    }
}

fn shared_store(name: &str) -> MemoryStore {
    static STORES: OnceLock<Mutex<HashMap<String, MemoryStore>>> = OnceLock::new();
    let stores = STORES.get_or_init(Default::default);
    let mut stores = stores.lock().unwrap_or_else(|p| p.into_inner());
    stores.entry(name.to_owned()).or_default().clone()
}

#[cfg_attr(all(feature = "etcd", feature = "zk"), allow(dead_code))]
fn missing_feature(url: &RegistryUrl) -> Error {
    Error::InvalidArgument(format!(
        "{url} needs the `{}` feature of the `registry` crate (this build has: {})",
        url.kind.feature().unwrap_or("?"),
        compiled_backends().join(", ")
    ))
}

/// The URL schemes this build can connect to.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut out = vec!["mem"];
    if cfg!(feature = "etcd") {
        out.push("etcd");
    }
    if cfg!(feature = "zk") {
        out.push("zk");
    }
    out
}

#[cfg(not(feature = "etcd"))]
async fn connect_etcd(url: &RegistryUrl) -> Result<Arc<dyn Registry>> {
    Err(missing_feature(url))
}

#[cfg(not(feature = "zk"))]
async fn connect_zk(url: &RegistryUrl) -> Result<Arc<dyn Registry>> {
    Err(missing_feature(url))
}

#[cfg(feature = "etcd")]
async fn connect_etcd(url: &RegistryUrl) -> Result<Arc<dyn Registry>> {
    let endpoints = url.endpoints.iter().map(|e| e.to_string());
    let mut options = registry_etcd::EtcdOptions::new(endpoints);
    if let Some(ns) = &url.namespace {
        options = options.with_namespace(ns.clone());
    }
    if let Some(ttl) = url.session_ttl {
        options = options.with_session_ttl(ttl);
    }
    if let Some(timeout) = url.request_timeout {
        options = options.with_request_timeout(timeout);
    }
    if let Some(c) = &url.credentials {
        options = options.with_credentials(c.user.clone(), c.password.clone());
    }
    if let Some(tls) = &url.tls {
        options = options.with_tls(registry_etcd::EtcdTls {
            ca_cert: tls.ca_cert.clone(),
            client_identity: tls.client_identity.clone(),
        });
    }
    Ok(Arc::new(
        registry_etcd::EtcdRegistry::connect(options).await?,
    ))
}

#[cfg(feature = "zk")]
async fn connect_zk(url: &RegistryUrl) -> Result<Arc<dyn Registry>> {
    let mut options = registry_zk::ZkOptions::new(url.endpoints.iter().map(|e| e.to_string()));
    if let Some(chroot) = &url.namespace {
        options = options.with_namespace(chroot.clone());
    }
    if let Some(timeout) = url.session_ttl {
        options = options.with_session_ttl(timeout);
    }
    if let Some(timeout) = url.request_timeout {
        options = options.with_request_timeout(timeout);
    }
    if let Some(c) = &url.credentials {
        options = options.with_auth("digest", format!("{}:{}", c.user, c.password));
    }
    Ok(Arc::new(registry_zk::ZkRegistry::connect(options).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_feature_names_it_and_hides_the_password() {
        let url = RegistryUrl::parse("etcd://root:pw@127.0.0.1:2379/ns").unwrap();
        let Error::InvalidArgument(message) = missing_feature(&url) else {
            panic!("not InvalidArgument");
        };
        assert!(message.contains("`etcd` feature"), "{message}");
        assert!(!message.contains("pw@"), "{message}");
        let zk = RegistryUrl::parse("zk://127.0.0.1:2181").unwrap();
        assert!(
            matches!(missing_feature(&zk), Error::InvalidArgument(m) if m.contains("`zk` feature"))
        );
    }
}
