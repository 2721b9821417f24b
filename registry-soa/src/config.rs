//! Service and global config: Dapeng's `key/value` format, typed, with precedence.
//!
//! One property per line or per `;`. Properties:
//! `timeout/800ms,createSupplier:100ms` (service default, then per-method overrides; `ms`, `s`,
//! or a bare number of milliseconds), `processTime/...` (same shape),
//! `loadBalance/leastActive,createSupplier:random` (case-insensitive), and
//! `weight/600`, `weight/192.168.4.107/500`, `weight/192.168.4.107/9095/700`. A malformed
//! property is reported with its position and skipped; the rest still applies.
//!
//! Beyond Dapeng's Java reader, which a mixed fleet should write for: keys match ignoring
//! case and surrounding spaces (Java ignores `Timeout/...` and ` timeout/...`), `s` means
//! seconds (Java drops every non-digit, so `2s` is 2 ms there: write `ms`), and both `;` and
//! line ends separate properties (Dapeng's readers differ on which they split at).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::error::ParseError;
use crate::layout::Address;

/// A load-balancing strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoadBalance {
    /// Weighted random.
    Random,
    /// Smooth weighted round robin.
    RoundRobin,
    /// Fewest calls in flight (weighted tie-break).
    LeastActive,
    /// Consistent hash on a call key.
    ConsistentHash,
}

impl std::str::FromStr for LoadBalance {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "random" => Ok(LoadBalance::Random),
            "roundrobin" => Ok(LoadBalance::RoundRobin),
            "leastactive" => Ok(LoadBalance::LeastActive),
            "consistenthash" => Ok(LoadBalance::ConsistentHash),
            other => Err(format!(
                "unknown load balance {other:?}; expected random, roundRobin, leastActive or consistentHash"
            )),
        }
    }
}

/// A setting with a default and per-method overrides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodSetting<T> {
    /// The value for every method without its own.
    pub default: Option<T>,
    /// Per-method values.
    pub methods: HashMap<String, T>,
}

impl<T> Default for MethodSetting<T> {
    fn default() -> Self {
        MethodSetting {
            default: None,
            methods: HashMap::new(),
        }
    }
}

impl<T: Clone> MethodSetting<T> {
    /// The method's own value, else the default.
    pub fn for_method(&self, method: &str) -> Option<T> {
        self.methods
            .get(method)
            .cloned()
            .or_else(|| self.default.clone())
    }
}

/// A weight rule: for every instance, every port of an ip, or one instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightRule {
    /// The ip it applies to (`None`: every instance).
    pub ip: Option<Ipv4Addr>,
    /// The port it applies to (`None`: every port).
    pub port: Option<u16>,
    /// The weight.
    pub weight: u32,
}

impl WeightRule {
    /// 0 for every instance, 1 for an ip, 2 for an ip:port; `None` if it does not apply.
    pub fn specificity(&self, address: Address) -> Option<u8> {
        match (self.ip, self.port) {
            (None, _) => Some(0),
            (Some(ip), None) if ip == address.ip => Some(1),
            (Some(ip), Some(port)) if ip == address.ip && port == address.port => Some(2),
            _ => None,
        }
    }
}

/// The typed content of a config node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Call timeout.
    pub timeout: MethodSetting<Duration>,
    /// Expected processing time.
    pub process_time: MethodSetting<Duration>,
    /// Load-balancing strategy.
    pub load_balance: MethodSetting<LoadBalance>,
    /// Weight rules in the order written.
    pub weights: Vec<WeightRule>,
}

/// Default weight of an instance no rule names.
pub const DEFAULT_WEIGHT: u32 = 100;
/// Default timeout when nothing is configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(1000);

/// Parses `800ms`, `2s`, or a bare number of milliseconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim().to_ascii_lowercase();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000)
    } else {
        (t.as_str(), 1)
    };
    let n: u64 = number.trim().parse().ok()?;
    n.checked_mul(scale).map(Duration::from_millis)
}

/// Parses a config text. Every malformed property is returned as an error with its position;
/// the well-formed ones are applied.
pub fn parse_config(text: &str) -> (ServiceConfig, Vec<ParseError>) {
    let mut config = ServiceConfig::default();
    let mut errors = Vec::new();
    for (line_index, line) in crate::error::text_lines(text).enumerate() {
        let mut column = 1;
        for property in line.split(';') {
            // In characters, as `column`: leading white space may be wider than a byte.
            let start = column + property.chars().take_while(|c| c.is_whitespace()).count();
            column += property.chars().count() + 1;
            let property = property.trim();
            if property.is_empty() {
                continue;
            }
            if let Err(message) = apply(&mut config, property) {
                errors.push(ParseError {
                    line: line_index + 1,
                    column: start,
                    message: format!("{message} in {property:?}"),
                });
            }
        }
    }
    (config, errors)
}

fn method_setting<T>(
    value: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<MethodSetting<T>, String> {
    let mut setting = MethodSetting::default();
    // Java's `split(",")` drops trailing empty items: `800ms,` is `800ms` to Dapeng too.
    let mut items: Vec<&str> = value.split(',').collect();
    while items.len() > 1 && items.last().is_some_and(|i| i.trim().is_empty()) {
        items.pop();
    }
    for (i, item) in items.into_iter().enumerate() {
        let item = item.trim();
        match item.split_once(':') {
            Some((method, v)) if i > 0 || !method.is_empty() => {
                let method = method.trim();
                if method.is_empty() {
                    return Err("empty method name".into());
                }
                setting.methods.insert(method.to_owned(), parse(v)?);
            }
            _ if i == 0 => setting.default = Some(parse(item)?),
            _ => return Err(format!("expected method:value, found {item:?}")),
        }
    }
    Ok(setting)
}

fn merge<T>(into: &mut MethodSetting<T>, from: MethodSetting<T>) {
    if from.default.is_some() {
        into.default = from.default;
    }
    into.methods.extend(from.methods);
}

fn apply(config: &mut ServiceConfig, property: &str) -> Result<(), String> {
    let (key, value) = property.split_once('/').ok_or("expected key/value")?;
    let duration = |v: &str| {
        parse_duration(v)
            .ok_or_else(|| format!("{:?} is not a duration like 800ms or 2s", v.trim()))
    };
    match key.trim().to_ascii_lowercase().as_str() {
        "timeout" => merge(&mut config.timeout, method_setting(value, duration)?),
        "processtime" => merge(&mut config.process_time, method_setting(value, duration)?),
        "loadbalance" => merge(
            &mut config.load_balance,
            method_setting(value, |v| v.parse::<LoadBalance>())?,
        ),
        "weight" => {
            let parts: Vec<&str> = value.split('/').map(str::trim).collect();
            let weight = |w: &str| {
                w.parse::<u32>()
                    .map_err(|_| format!("weight {w:?} is not a whole number"))
            };
            let ip = |i: &str| {
                i.parse::<Ipv4Addr>()
                    .map_err(|_| format!("{i:?} is not an IPv4 address"))
            };
            let rule = match parts.as_slice() {
                [w] => WeightRule {
                    ip: None,
                    port: None,
                    weight: weight(w)?,
                },
                [i, w] => WeightRule {
                    ip: Some(ip(i)?),
                    port: None,
                    weight: weight(w)?,
                },
                [i, p, w] => WeightRule {
                    ip: Some(ip(i)?),
                    port: Some(
                        p.parse()
                            .map_err(|_| format!("port {p:?} is not a number"))?,
                    ),
                    weight: weight(w)?,
                },
                _ => return Err("expected weight/W, weight/IP/W or weight/IP/PORT/W".into()),
            };
            config.weights.push(rule);
        }
        other => return Err(format!("unknown key {other:?}")),
    }
    Ok(())
}

/// Resolves a setting by precedence: the call's own value, then the service's method value,
/// the service's default, the global method value, the global default, and `fallback`.
pub fn resolve<T: Clone>(
    call: Option<T>,
    method: &str,
    service: &MethodSetting<T>,
    global: &MethodSetting<T>,
    fallback: T,
) -> T {
    call.or_else(|| service.methods.get(method).cloned())
        .or_else(|| service.default.clone())
        .or_else(|| global.for_method(method))
        .unwrap_or(fallback)
}

/// The weight of an instance: the most specific rule of the service config, then of the
/// global config (a service rule wins a tie), then the instance's own weight, then 100.
pub fn weight_of(
    address: Address,
    own: Option<u32>,
    service: &ServiceConfig,
    global: &ServiceConfig,
) -> u32 {
    let best = |config: &ServiceConfig| {
        config
            .weights
            .iter()
            .filter_map(|r| r.specificity(address).map(|s| (s, r.weight)))
            .max_by_key(|(s, _)| *s)
    };
    match (best(service), best(global)) {
        (Some((s, w)), Some((g, _))) if s >= g => w,
        (Some(_), Some((_, w))) => w,
        (Some((_, w)), None) | (None, Some((_, w))) => w,
        (None, None) => own.unwrap_or(DEFAULT_WEIGHT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_end_at_a_lone_cr_too() {
        let (c, errors) = parse_config("timeout/800ms\rloadBalance/random\r\nweight/600\rbad");
        assert_eq!(c.timeout.default, Some(Duration::from_millis(800)));
        assert_eq!(c.load_balance.default, Some(LoadBalance::Random));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!((errors[0].line, errors[0].column), (4, 1));
    }

    #[test]
    fn trailing_commas_are_dropped_as_java_split_drops_them() {
        let (c, errors) =
            parse_config("timeout/800ms,;loadBalance/leastActive,createSupplier:random,,");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(c.timeout.default, Some(Duration::from_millis(800)));
        assert_eq!(
            c.load_balance.for_method("createSupplier"),
            Some(LoadBalance::Random)
        );
        // Not an empty item inside, nor a value of commas only.
        assert_eq!(parse_config("timeout/800ms,,a:1s").1.len(), 1);
        assert_eq!(parse_config("timeout/,").1.len(), 1);
    }

    #[test]
    fn parses_dapeng_properties() {
        let text = "timeout/800ms,createSupplier:100ms,modifySupplier:2s\nloadBalance/LeastActive,createSupplier:random;weight/600\nweight/192.168.4.107/500;weight/192.168.4.107/9095/700";
        let (c, errors) = parse_config(text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(c.timeout.default, Some(Duration::from_millis(800)));
        assert_eq!(
            c.timeout.for_method("createSupplier"),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            c.timeout.for_method("modifySupplier"),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            c.timeout.for_method("other"),
            Some(Duration::from_millis(800))
        );
        assert_eq!(c.load_balance.default, Some(LoadBalance::LeastActive));
        assert_eq!(
            c.load_balance.for_method("createSupplier"),
            Some(LoadBalance::Random)
        );
        let a: Address = "192.168.4.107:9095".parse().unwrap();
        let b: Address = "192.168.4.107:9096".parse().unwrap();
        let c2: Address = "192.168.4.108:9095".parse().unwrap();
        let global = ServiceConfig::default();
        assert_eq!(weight_of(a, None, &c, &global), 700);
        assert_eq!(weight_of(b, None, &c, &global), 500);
        assert_eq!(weight_of(c2, Some(50), &c, &global), 600);
        assert_eq!(weight_of(c2, Some(50), &global, &global), 50);
        assert_eq!(weight_of(c2, None, &global, &global), 100);
    }

    #[test]
    fn malformed_properties_are_reported_and_the_rest_applies() {
        let (c, errors) =
            parse_config("timeout/8x;loadBalance/random\nweight/1.2.3/5;bogus\nprocessTime/20ms");
        assert_eq!(c.load_balance.default, Some(LoadBalance::Random));
        assert_eq!(c.process_time.default, Some(Duration::from_millis(20)));
        let positions: Vec<_> = errors.iter().map(|e| (e.line, e.column)).collect();
        assert_eq!(positions, [(1, 1), (2, 1), (2, 16)], "{errors:?}");
        assert!(errors[0].message.contains("duration"));
        assert!(errors[1].message.contains("IPv4"));
        assert!(errors[2].message.contains("key/value"));
    }

    /// Columns count characters, also past wide white space (they used to count its bytes).
    #[test]
    fn error_columns_count_characters() {
        let (_, errors) = parse_config("timeout/1ms;\u{3000}\u{3000}bogus");
        let positions: Vec<_> = errors.iter().map(|e| (e.line, e.column)).collect();
        assert_eq!(positions, [(1, 15)], "{errors:?}");
    }

    #[test]
    fn precedence_call_method_service_global_default() {
        let (service, _) = parse_config("timeout/800ms,get:100ms");
        let (global, _) = parse_config("timeout/3s,put:50ms");
        let r = |call, m| resolve(call, m, &service.timeout, &global.timeout, DEFAULT_TIMEOUT);
        assert_eq!(
            r(Some(Duration::from_millis(5)), "get"),
            Duration::from_millis(5)
        );
        assert_eq!(r(None, "get"), Duration::from_millis(100));
        assert_eq!(r(None, "put"), Duration::from_millis(800));
        let empty = ServiceConfig::default();
        assert_eq!(
            resolve(
                None,
                "put",
                &empty.timeout,
                &global.timeout,
                DEFAULT_TIMEOUT
            ),
            Duration::from_millis(50)
        );
        assert_eq!(
            resolve(None, "x", &empty.timeout, &empty.timeout, DEFAULT_TIMEOUT),
            DEFAULT_TIMEOUT
        );
    }
}
