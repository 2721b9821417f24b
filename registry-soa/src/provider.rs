//! `Provider`: one service instance registered the way Dapeng registers it.

use std::sync::Arc;

use bytes::Bytes;
use registry_core::{
    CreateMode, Error, NodePath, RegisterOptions, Registration, RegistrationStatus, Registry,
};

use crate::error::SoaError;
use crate::layout::{instance_prefix, parse_instance, Address, ServicePaths};

/// A registered instance: an ephemeral-sequential `ip:port:version:<seq>` node under
/// `/soa/runtime/services/<service>`, healed by [`Registration`].
///
/// Guarantees: the service's runtime node exists once `register` returns, and its config
/// nodes (config, routes, cookies, freq) too unless the registry denies the permission to
/// create them (an ACL that keeps them for the admin console), which is logged;
/// [`shutdown`](Provider::shutdown) removes exactly this instance's node (by its full path),
/// never a neighbour whose address merely contains ours.
///
/// Like Dapeng's provider, `register` first removes the ephemeral instance nodes of the same
/// `ip:port` that other sessions own: only one process listens on an address, so such a node
/// is a previous run's whose session has not expired yet (a quick restart). Dapeng removes
/// those of the same version only; here any version goes, since a deploy usually restarts an
/// address with a new one. Left alone, consumers would count the instance twice (or call the
/// dead run's version) and the dead node, holding the lowest sequence, would keep mastership
/// from every instance until it expired.
pub struct Provider {
    registry: Arc<dyn Registry>,
    registration: Registration,
    paths: ServicePaths,
    address: Address,
    version: String,
}

impl Provider {
    /// Registers `address` as an instance of `service` at `version`.
    pub async fn register(
        registry: &Arc<dyn Registry>,
        service: &str,
        address: Address,
        version: &str,
    ) -> Result<Provider, SoaError> {
        let paths = ServicePaths::new(service)?;
        let prefix = instance_prefix(address, version)?;
        for node in paths.persistent_nodes() {
            match registry
                .create(node, Bytes::new(), CreateMode::Persistent)
                .await
            {
                Ok(_) | Err(Error::AlreadyExists { .. }) => {}
                // ZooKeeper checks the parent's CREATE permission before the node's existence:
                // config nodes an ACL reserves for the admin console refuse a create even
                // when they exist. As for Dapeng's provider (which creates only what is
                // missing), registering needs only the runtime node: a denied config node is
                // the admin console's to create. Other failures still fail the registration.
                Err(error @ Error::PermissionDenied { .. }) if node != &paths.runtime => {
                    if !matches!(registry.exists(node).await, Ok(true)) {
                        tracing::warn!(path = %node, %error, "may not create a config node; registering without it");
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        remove_stale_nodes(registry, &paths, address, version).await;
        let node = paths.runtime.join(&prefix).map_err(SoaError::Registry)?;
        let registration = registry
            .register(&node, Bytes::new(), RegisterOptions::new().sequential())
            .await?;
        tracing::info!(service, %address, version, path = ?registration.path(), "instance registered");
        Ok(Provider {
            registry: registry.clone(),
            registration,
            paths,
            address,
            version: version.to_owned(),
        })
    }

    /// The instance's current node (its sequence changes when it is re-created).
    pub fn path(&self) -> Option<NodePath> {
        self.registration.path()
    }

    /// Whether the node exists under the current session right now.
    pub fn is_registered(&self) -> bool {
        matches!(
            self.registration.status(),
            RegistrationStatus::Registered(_)
        )
    }

    /// The instance's node if it exists under the registry's current, live session right now:
    /// a node of a lost session is gone on the server even while the registration has not
    /// noticed yet.
    pub(crate) fn live_node(&self) -> Option<NodePath> {
        live_node(&*self.registry, &self.registration.status())
    }

    /// The registry the instance is registered with.
    pub(crate) fn registry(&self) -> &Arc<dyn Registry> {
        &self.registry
    }

    /// The registration behind this instance (status, waits).
    pub fn registration(&self) -> &Registration {
        &self.registration
    }

    /// The service's paths.
    pub fn paths(&self) -> &ServicePaths {
        &self.paths
    }

    /// Where the instance listens.
    pub fn address(&self) -> Address {
        self.address
    }

    /// Its version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Removes the instance (and only it) before the caller drains in-flight requests.
    pub async fn shutdown(self) -> Result<(), SoaError> {
        tracing::info!(address = %self.address, "instance deregistering");
        Ok(self.registration.deregister().await?)
    }
}

/// Removes the instance nodes of `address`, whatever their version, that other sessions own
/// (see [`Provider`]).
/// Best effort, as in Dapeng: a failure is logged and registration goes on, and each node
/// goes only while its owner still holds it (a node re-created meanwhile stays).
async fn remove_stale_nodes(
    registry: &Arc<dyn Registry>,
    paths: &ServicePaths,
    address: Address,
    version: &str,
) {
    let listed = match registry.children(&paths.runtime).await {
        Ok(listed) => listed,
        Err(error) => {
            tracing::warn!(%address, version, %error, "could not look for a previous run's nodes");
            return;
        }
    };
    // Without a session of our own (not yet, or lost) no node can be told to be another's.
    let Some(ours) = registry.session().session_id else {
        return;
    };
    for node in &listed.nodes {
        let stale = node.ephemeral_owner.is_some_and(|owner| owner != ours)
            && parse_instance(node).is_some_and(|i| i.address == address && i.sequence.is_some());
        if !stale {
            continue;
        }
        match registry.delete_owned(node).await {
            Ok(removed) => {
                tracing::info!(path = %node.path, owner = ?node.ephemeral_owner, removed, "removed a previous run's node")
            }
            Err(error) => {
                tracing::warn!(path = %node.path, %error, "could not remove a previous run's node")
            }
        }
    }
}

/// The node of `status` if the registry's session is live and owns it.
pub(crate) fn live_node(registry: &dyn Registry, status: &RegistrationStatus) -> Option<NodePath> {
    let RegistrationStatus::Registered(node) = status else {
        return None;
    };
    let session = registry.session();
    (session.state.is_live()
        && node.ephemeral_owner.is_some()
        && node.ephemeral_owner == session.session_id)
        .then(|| node.path.clone())
}
