//! Dapeng's tree: where runtime instances and config live, and how instance nodes are named.

use std::fmt;
use std::net::Ipv4Addr;

use registry_core::{parse_sequence, Node, NodePath, SEQUENCE_DIGITS};

use crate::error::SoaError;

/// Parent of every service's instance nodes.
pub const RUNTIME_SERVICES: &str = "/soa/runtime/services";
/// The global config node, and parent of per-service config nodes.
pub const CONFIG_SERVICES: &str = "/soa/config/services";
/// Parent of per-service routing rules.
pub const CONFIG_ROUTES: &str = "/soa/config/routes";
/// Parent of per-service cookie-injection rules.
pub const CONFIG_COOKIES: &str = "/soa/config/cookies";
/// Parent of per-service rate-limit rules.
pub const CONFIG_FREQ: &str = "/soa/config/freq";

/// The paths of one service.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServicePaths {
    /// The service name, e.g. `com.today.service.goods.GoodsService`.
    pub service: String,
    /// `/soa/runtime/services/<service>`: its instances.
    pub runtime: NodePath,
    /// `/soa/config/services/<service>`: service and per-method config.
    pub config: NodePath,
    /// `/soa/config/routes/<service>`.
    pub routes: NodePath,
    /// `/soa/config/cookies/<service>`.
    pub cookies: NodePath,
    /// `/soa/config/freq/<service>`.
    pub freq: NodePath,
}

fn under(parent: &str, service: &str) -> Result<NodePath, SoaError> {
    NodePath::new(parent)
        .and_then(|p| p.join(service))
        .map_err(|_| SoaError::Invalid {
            what: "service name",
            value: service.to_owned(),
        })
}

impl ServicePaths {
    /// The paths of `service`; the name must be one valid path segment.
    pub fn new(service: &str) -> Result<ServicePaths, SoaError> {
        if service.is_empty() || service.contains(':') {
            return Err(SoaError::Invalid {
                what: "service name",
                value: service.to_owned(),
            });
        }
        Ok(ServicePaths {
            service: service.to_owned(),
            runtime: under(RUNTIME_SERVICES, service)?,
            config: under(CONFIG_SERVICES, service)?,
            routes: under(CONFIG_ROUTES, service)?,
            cookies: under(CONFIG_COOKIES, service)?,
            freq: under(CONFIG_FREQ, service)?,
        })
    }

    /// The persistent nodes a provider creates if missing.
    pub fn persistent_nodes(&self) -> [&NodePath; 5] {
        [
            &self.runtime,
            &self.config,
            &self.routes,
            &self.cookies,
            &self.freq,
        ]
    }
}

/// The global config node `/soa/config/services`.
pub fn global_config() -> NodePath {
    NodePath::new(CONFIG_SERVICES).unwrap_or_else(|_| NodePath::root())
}

/// An instance address `ip:port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address {
    /// IPv4 address (Dapeng registers IPv4).
    pub ip: Ipv4Addr,
    /// Port.
    pub port: u16,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

impl std::str::FromStr for Address {
    type Err = SoaError;
    fn from_str(s: &str) -> Result<Address, SoaError> {
        let invalid = || SoaError::Invalid {
            what: "address (expected ipv4:port)",
            value: s.to_owned(),
        };
        let (ip, port) = s.split_once(':').ok_or_else(invalid)?;
        Ok(Address {
            ip: ip.parse().map_err(|_| invalid())?,
            port: port_of(port).ok_or_else(invalid)?,
        })
    }
}

/// A port written in decimal digits only, with no leading 0 and not 0: `+9090` or `09090`
/// would name the same instance as `9090` under another node name, and port 0 is no
/// instance's.
fn port_of(text: &str) -> Option<u16> {
    if text.is_empty() || text.starts_with('0') || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|port| *port != 0)
}

/// One live instance of a service, read from its runtime node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// Where it listens.
    pub address: Address,
    /// Its version (`None` for the etcd write-up's `ip:port` keys, which carry none).
    pub version: Option<String>,
    /// The server-assigned sequence (`None` for `ip:port` keys).
    pub sequence: Option<u64>,
    /// The weight written in the node's value (the etcd write-up's keys), if any.
    pub weight: Option<u32>,
    /// Global creation order of the node: orders instances by age.
    pub create_order: u64,
    /// The node's path.
    pub path: NodePath,
}

/// The name prefix a provider registers: `ip:port:version:` (the server appends the sequence).
/// Refuses port 0 and `0.0.0.0`, which no consumer can call (and reads as no instance).
pub fn instance_prefix(address: Address, version: &str) -> Result<String, SoaError> {
    if address.port == 0 || address.ip.is_unspecified() {
        return Err(SoaError::Invalid {
            what: "address (port 0 and 0.0.0.0 cannot be called)",
            value: address.to_string(),
        });
    }
    if version.is_empty() || version.contains([':', '/']) {
        return Err(SoaError::Invalid {
            what: "version",
            value: version.to_owned(),
        });
    }
    Ok(format!("{address}:{version}:"))
}

/// Reads an instance from a runtime node: `ip:port:version:seq` (Dapeng, sequential) or
/// `ip:port` with an optional weight as value (the etcd write-up); `ip:port:version` is read
/// too. `None` for other names, for `0.0.0.0`, and for a port that is 0 or not written as
/// plain digits without a leading 0 (another spelling would name one instance twice).
pub fn parse_instance(node: &Node) -> Option<Instance> {
    let name = node.path.name();
    let parts: Vec<&str> = name.split(':').collect();
    let address = Address {
        // 0.0.0.0 is no instance's either (as `instance_prefix` says).
        ip: parts
            .first()?
            .parse()
            .ok()
            .filter(|ip: &std::net::Ipv4Addr| !ip.is_unspecified())?,
        port: port_of(parts.get(1)?)?,
    };
    let weight = std::str::from_utf8(&node.value)
        .ok()
        .and_then(|v| v.trim().parse().ok());
    let (version, sequence) = match parts.len() {
        2 => (None, None),
        3 => (Some(parts[2].to_owned()), None),
        4 if parts[3].len() == SEQUENCE_DIGITS => {
            (Some(parts[2].to_owned()), Some(parse_sequence(parts[3])?))
        }
        _ => return None,
    };
    Some(Instance {
        address,
        version,
        sequence,
        weight,
        create_order: node.create_order,
        path: node.path.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use registry_core::Bytes;

    fn node(path: &str, value: &str) -> Node {
        Node {
            path: NodePath::new(path).unwrap(),
            value: Bytes::from(value.to_owned()),
            version: 0,
            create_order: 7,
            modify_order: 7,
            ephemeral_owner: None,
        }
    }

    #[test]
    fn parses_both_instance_forms() {
        let dapeng = parse_instance(&node(
            "/soa/runtime/services/S/192.168.1.121:9081:1.0.0:0000000022",
            "",
        ))
        .unwrap();
        assert_eq!(dapeng.address.to_string(), "192.168.1.121:9081");
        assert_eq!(dapeng.version.as_deref(), Some("1.0.0"));
        assert_eq!(dapeng.sequence, Some(22));
        let etcd =
            parse_instance(&node("/soa/runtime/services/S/192.168.10.121:9071", "50")).unwrap();
        assert_eq!(etcd.weight, Some(50));
        assert_eq!(etcd.version, None);
        for bad in [
            "x:1",
            "1.2.3.4:port",
            "1.2.3.4:1:v:12",
            "1.2.3.4:1:v:s:0000000001",
            "1.2.3.4:0:1.0.0:0000000001",
            "1.2.3.4:0",
            // Another spelling of 1.2.3.4:9090, which must not pass for it.
            "1.2.3.4:+9090:1.0.0:0000000001",
            "1.2.3.4:+9090",
            "1.2.3.4:09090",
            "0.0.0.0:9090:1.0.0:0000000001",
        ] {
            assert!(
                parse_instance(&node(&format!("/s/{bad}"), "")).is_none(),
                "{bad}"
            );
        }
    }

    #[test]
    fn paths_and_prefixes() {
        let p = ServicePaths::new("com.today.Goods").unwrap();
        assert_eq!(p.routes.as_str(), "/soa/config/routes/com.today.Goods");
        assert!(ServicePaths::new("a/b").is_err());
        assert!(ServicePaths::new("").is_err());
        let a: Address = "10.0.0.1:9090".parse().unwrap();
        assert_eq!(instance_prefix(a, "1.0.0").unwrap(), "10.0.0.1:9090:1.0.0:");
        assert!(instance_prefix(a, "1:0").is_err());
        assert!("10.0.0.1:0".parse::<Address>().is_err());
        assert!("10.0.0.1:+9090".parse::<Address>().is_err());
        assert!("10.0.0.1:".parse::<Address>().is_err());
        for uncallable in ["10.0.0.1:0", "0.0.0.0:9090"] {
            let (ip, port) = uncallable.split_once(':').unwrap();
            let address = Address {
                ip: ip.parse().unwrap(),
                port: port.parse().unwrap(),
            };
            assert!(instance_prefix(address, "1.0.0").is_err(), "{uncallable}");
        }
    }
}
