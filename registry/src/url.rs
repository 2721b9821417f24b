//! `RegistryUrl`: parsing and printing of registry URLs (`etcd://`, `zk://`, `mem://`).
//!
//! ```text
//! etcd://[user:password@]h1:2379,h2:2379[/namespace][?session_ttl=5s&timeout=3s]
//! etcds://[user:password@]h1:2379[/namespace]?ca=/etc/etcd/ca.pem[&cert=client.pem&key=client-key.pem]
//! zk://h1:2181,h2:2181[/namespace][?session_ttl=10s&timeout=3s]
//! mem://[name]
//! ```
//! Every malformed URL gets an [`Error::InvalidArgument`] that says what and where. Credentials
//! are never printed: `Display` and `Debug` show `***` for the password. The last `@` ends the
//! credentials (a password may hold `/`, `?` and `@`); a namespace or parameter may not hold
//! `@`, and a URL that reads either way is refused rather than guessed. User name, password,
//! namespace and parameter values are percent-decoded (`p%40ss` is `p@ss`, `%26` a `&` in a
//! file name; a literal `%` is `%25`), and a `%` not followed by two hex digits is refused.
//! Ports are decimal digits; a parameter given twice (under any of its names) is refused.
//! Durations are positive.

use std::fmt;
use std::time::Duration;

use registry_core::{Error, NodePath};

/// Which backend a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// `mem://`: the embedded in-memory backend.
    Memory,
    /// `etcd://`: etcd v3.
    Etcd,
    /// `zk://`: ZooKeeper.
    ZooKeeper,
}

impl BackendKind {
    /// The URL scheme.
    pub fn scheme(self) -> &'static str {
        match self {
            BackendKind::Memory => "mem",
            BackendKind::Etcd => "etcd",
            BackendKind::ZooKeeper => "zk",
        }
    }

    /// The Cargo feature of the `registry` crate that compiles this backend in (none for
    /// memory).
    pub fn feature(self) -> Option<&'static str> {
        match self {
            BackendKind::Memory => None,
            BackendKind::Etcd => Some("etcd"),
            BackendKind::ZooKeeper => Some("zk"),
        }
    }
}

/// A `host:port` endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// User name and password from the URL's userinfo.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub user: String,
    /// Password (never printed).
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"***")
            .finish()
    }
}

/// A parsed registry URL.
///
/// Guarantees: `endpoints` is non-empty for etcd and ZooKeeper and empty for memory;
/// `namespace` is a valid [`NodePath`] (not the root) when present; every query parameter was
/// recognised for the backend and well-formed.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryUrl {
    /// The backend.
    pub kind: BackendKind,
    /// Servers to connect to.
    pub endpoints: Vec<Endpoint>,
    /// The namespace (etcd key prefix) or chroot (ZooKeeper) every path lives under.
    pub namespace: Option<NodePath>,
    /// For `mem://name`: the name of the process-wide store to share.
    pub memory_name: Option<String>,
    /// Credentials from `user:password@`.
    pub credentials: Option<Credentials>,
    /// Session TTL: the `session_ttl` parameter (also read from the backends' own names,
    /// etcd's `ttl` and ZooKeeper's `session_timeout`).
    pub session_ttl: Option<Duration>,
    /// Per-request timeout (`timeout`).
    pub request_timeout: Option<Duration>,
    /// TLS (`etcds://`, with `ca=` and optionally `cert=` and `key=`).
    pub tls: Option<TlsFiles>,
}

/// PEM files for a TLS connection, from an `etcds://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate to verify the server with (`ca=`).
    pub ca_cert: std::path::PathBuf,
    /// Client certificate and key for mutual TLS (`cert=` and `key=`, both or neither).
    pub client_identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

fn invalid(url: &str, what: impl fmt::Display) -> Error {
    Error::InvalidArgument(format!("invalid registry URL {:?}: {what}", redact(url)))
}

/// Hides the credentials of a URL string that may not even parse: everything before the last
/// `@` after the scheme except the user name (all of it if the scheme is not plain); with no
/// `@`, any endpoint's "port" that is not digits (a `user:password` missing its `@host`).
/// Query values are hidden too: a user may well try `?password=...`, which is refused, and
/// the refusal must not print it.
fn redact(url: &str) -> String {
    let shown = redact_userinfo(url);
    match shown.split_once('?') {
        Some((base, query)) => {
            let keys: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) => format!("{key}=***"),
                    None => pair.to_owned(),
                })
                .collect();
            format!("{base}?{}", keys.join("&"))
        }
        None => shown,
    }
}

/// [`redact`] before the query's values.
fn redact_userinfo(url: &str) -> String {
    let (prefix, rest) = match url.split_once("://") {
        Some((scheme, rest)) if plain_scheme(scheme) => (format!("{scheme}://"), rest),
        _ => (String::new(), url),
    };
    match rest.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _)) if !prefix.is_empty() && !user.contains(['/', '?']) => {
                format!("{prefix}{user}:***@{hosts}")
            }
            _ => format!("{prefix}***@{hosts}"),
        },
        None => {
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            let (hosts, _) = rest.split_at(end);
            // A password may hold `/`, `?` and `,` too: from the first endpoint whose "port"
            // is no port on, nothing is shown.
            let mut shown = Vec::new();
            for host in hosts.split(',') {
                if shown_endpoint(host) != host {
                    return format!("{prefix}{}***", shown.join(""));
                }
                shown.push(format!("{host},"));
            }
            url.to_owned()
        }
    }
}

/// An endpoint as an error may show it: after the first `:`, only a port (1-65535 in
/// digits); anything else there may be a password whose `@host` was left out, and is
/// hidden. (A password that reads as a port cannot be told from one.)
fn shown_endpoint(text: &str) -> String {
    if text.starts_with('[') {
        return text.to_owned();
    }
    let is_port = |port: &str| {
        port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok_and(|p| p != 0)
    };
    match text.split_once(':') {
        Some((host, port)) if !port.is_empty() && !is_port(port) => format!("{host}:***"),
        _ => text.to_owned(),
    }
}

/// Whether `scheme` looks like a URL scheme (so it can be shown without hiding anything).
fn plain_scheme(scheme: &str) -> bool {
    !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Parses `5s`, `500ms`, `2m`, `1.5s`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return None,
    };
    if seconds > 86_400.0 * 365.0 {
        return None;
    }
    Some(Duration::from_secs_f64(seconds))
}

fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.subsec_nanos() % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else {
        // Not whole milliseconds (`1.5ms`): fractional seconds keep it exact.
        format!("{}s", d.as_secs_f64())
    }
}

fn parse_endpoint(url: &str, endpoint: &str) -> Result<Endpoint, Error> {
    // Messages show `text`, parsing reads `endpoint`.
    let text = &shown_endpoint(endpoint);
    let (host, port) = if let Some(rest) = endpoint.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| invalid(url, format!("endpoint {text:?} has '[' without ']'")))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(invalid(
                url,
                format!("endpoint {text:?}: brackets hold an IPv6 address"),
            ));
        }
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| invalid(url, format!("endpoint {text:?} needs :port")))?;
        (host, port)
    } else {
        let (host, port) = endpoint
            .rsplit_once(':')
            .ok_or_else(|| invalid(url, format!("endpoint {text:?} needs host:port")))?;
        if host.contains(':') {
            return Err(invalid(
                url,
                format!("endpoint {text:?}: an IPv6 address needs brackets, as in [::1]:2379"),
            ));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(invalid(url, format!("endpoint {text:?} has an empty host")));
    }
    // A host name (letters, digits, '-', '.', '_') or an IP address; anything else would
    // only fail later, at connect, or (ZooKeeper) after the connect timeout.
    let name = |c: char| c.is_ascii_alphanumeric() || "-._".contains(c);
    if !(host.chars().all(name) || host.parse::<std::net::Ipv6Addr>().is_ok()) {
        return Err(invalid(
            url,
            format!("endpoint {text:?} has an invalid host (a name or an IP address)"),
        ));
    }
    // `u16::from_str` also takes a sign (`+2379`).
    let digits = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    let port: u16 = digits
        .then(|| port.parse().ok())
        .flatten()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            invalid(
                url,
                // `text` hides it: a password of digits would be printed.
                if digits {
                    format!("endpoint {text:?} has a port out of range (1-65535)")
                } else {
                    format!(
                        "endpoint {text:?} has a port that is not digits (a user:password goes \
                         before an @)"
                    )
                },
            )
        })?;
    Ok(Endpoint {
        host: host.to_owned(),
        port,
    })
}

/// What [`RegistryUrl`]'s `Display` escapes in a namespace: what would end it or start an
/// escape.
const IN_PATH: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'%')
    .add(b'?')
    .add(b'#')
    .add(b'@');
/// ... in a parameter value: also what would end it.
const IN_VALUE: &percent_encoding::AsciiSet = &IN_PATH.add(b'&').add(b'=');
/// ... in a user name: also what would end it.
const IN_USER: &percent_encoding::AsciiSet = &IN_VALUE.add(b'/').add(b':');

fn encode<'a>(text: &'a str, set: &'static percent_encoding::AsciiSet) -> impl fmt::Display + 'a {
    percent_encoding::utf8_percent_encode(text, set)
}

/// `text` with `%XX` sequences decoded; `what` names the part for the error.
fn decode(url: &str, what: &str, text: &str) -> Result<String, Error> {
    let bytes = text.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(i, b)| {
        *b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return Err(invalid(
            url,
            format!("{what}: '%' must start a %XX escape (a literal '%' is %25)"),
        ));
    }
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| invalid(url, format!("{what} is not UTF-8 once %-decoded")))
}

impl RegistryUrl {
    /// Parses a registry URL; see the [module docs](self) for the forms.
    pub fn parse(url: &str) -> Result<RegistryUrl, Error> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid(url, "expected SCHEME://..., e.g. etcd://127.0.0.1:2379"))?;
        let kind = match scheme.to_ascii_lowercase().as_str() {
            "mem" | "memory" => BackendKind::Memory,
            "etcd" | "etcds" => BackendKind::Etcd,
            "zk" | "zookeeper" => BackendKind::ZooKeeper,
            other if plain_scheme(other) => {
                return Err(invalid(
                    url,
                    format!("unknown scheme {other:?}; expected etcd, zk or mem"),
                ))
            }
            _ => {
                return Err(invalid(
                    url,
                    "does not start with a scheme; expected etcd://, zk:// or mem://",
                ))
            }
        };
        // Credentials end at the last '@', so a password may hold '/', '?' or '@'; nothing
        // after this point (and no error message) ever sees them.
        let (userinfo, rest) = match rest.rsplit_once('@') {
            Some((userinfo, rest)) => (Some(userinfo), rest),
            None => (None, rest),
        };
        if let Some(userinfo) = userinfo {
            if kind == BackendKind::Memory {
                return Err(invalid(url, "mem:// takes no user:password@"));
            }
            // `h:2181/ns@x:1` also reads as host h:2181 with an '@' in its namespace, and
            // `u:pw@h:2181/ns@x:1` as credentials for h:2181 likewise: taking the last '@' would
            // send the connection, and the password, elsewhere. So wherever host:port could
            // begin (the start, or after an earlier '@') and be followed by a namespace or
            // parameters, refuse to guess.
            let starts = std::iter::once(0).chain(userinfo.match_indices('@').map(|(i, _)| i + 1));
            for start in starts {
                let candidate = &userinfo[start..];
                let Some(end) = candidate.find(['/', '?']) else {
                    continue;
                };
                let head = &candidate[..end];
                if !head.is_empty() && head.split(',').all(|e| parse_endpoint(url, e).is_ok()) {
                    return Err(invalid(
                        url,
                        "ambiguous '@': host:port comes before a later '@', so the URL could \
                         have a namespace or parameter holding '@' (not allowed) or a password \
                         holding '@', '/' or '?' (percent-encode it: %40, %2F, %3F)",
                    ));
                }
            }
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], Some(&before_query[i..])),
            None => (before_query, None),
        };
        let mut parsed = RegistryUrl {
            kind,
            endpoints: Vec::new(),
            namespace: None,
            memory_name: None,
            credentials: None,
            session_ttl: None,
            request_timeout: None,
            tls: None,
        };
        let secure = scheme.eq_ignore_ascii_case("etcds");
        let (mut ca, mut cert, mut key_file) = (None, None, None);
        if kind == BackendKind::Memory {
            if path.is_some_and(|p| p != "/") {
                return Err(invalid(url, "mem:// takes no path"));
            }
            if !authority.is_empty() {
                if !authority
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    return Err(invalid(url, "a mem:// store name is [A-Za-z0-9_-]"));
                }
                parsed.memory_name = Some(authority.to_owned());
            }
        } else {
            let hosts = match userinfo {
                Some(userinfo) => {
                    let (user, password) = userinfo
                        .split_once(':')
                        .ok_or_else(|| invalid(url, "credentials must be user:password@"))?;
                    if user.is_empty() {
                        return Err(invalid(url, "empty user name"));
                    }
                    let user = decode(url, "user name", user)?;
                    // ZooKeeper's digest is `user:password`, split at the first ':'.
                    if kind == BackendKind::ZooKeeper && user.contains(':') {
                        return Err(invalid(
                            url,
                            "a ZooKeeper digest user name cannot hold ':' (it ends the user name)",
                        ));
                    }
                    parsed.credentials = Some(Credentials {
                        user,
                        password: decode(url, "password", password)?,
                    });
                    authority
                }
                None => authority,
            };
            if hosts.is_empty() {
                return Err(invalid(
                    url,
                    "no endpoint; expected host:port[,host:port...]",
                ));
            }
            for endpoint in hosts.split(',') {
                parsed.endpoints.push(parse_endpoint(url, endpoint)?);
            }
            if let Some(path) = path.filter(|p| *p != "/") {
                let namespace = NodePath::new(decode(url, "namespace", path)?)
                    .map_err(|e| invalid(url, format!("namespace: {e}")))?;
                parsed.namespace = Some(namespace);
            }
        }
        let mut seen: Vec<&str> = Vec::new();
        for pair in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| invalid(url, format!("parameter {pair:?} needs a value")))?;
            // One setting under several names: the last one winning silently hides a typo.
            let setting = match key {
                "ttl" | "session_timeout" => "session_ttl",
                other => other,
            };
            if seen.contains(&setting) {
                return Err(invalid(url, format!("{setting} is given twice")));
            }
            seen.push(setting);
            let value = &decode(url, key, value)?;
            if value.is_empty() {
                return Err(invalid(
                    url,
                    format!("parameter {key:?} has an empty value"),
                ));
            }
            let duration = || {
                parse_duration(value)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        invalid(
                            url,
                            format!("{key}={value:?} is not a positive duration like 5s or 500ms"),
                        )
                    })
            };
            match (kind, key) {
                (_, "session_ttl")
                | (BackendKind::Etcd | BackendKind::Memory, "ttl")
                | (BackendKind::ZooKeeper, "session_timeout") => {
                    parsed.session_ttl = Some(duration()?)
                }
                (BackendKind::Etcd | BackendKind::ZooKeeper, "timeout") => {
                    parsed.request_timeout = Some(duration()?)
                }
                (BackendKind::Etcd, "ca" | "cert" | "key") if !secure => {
                    return Err(invalid(url, format!("{key}= needs the etcds:// scheme")))
                }
                (BackendKind::Etcd, "ca") => ca = Some(std::path::PathBuf::from(value)),
                (BackendKind::Etcd, "cert") => cert = Some(std::path::PathBuf::from(value)),
                (BackendKind::Etcd, "key") => key_file = Some(std::path::PathBuf::from(value)),
                _ => {
                    return Err(invalid(
                        url,
                        format!("unknown parameter {key:?} for {}://", kind.scheme()),
                    ))
                }
            }
        }
        if secure {
            let ca_cert =
                ca.ok_or_else(|| invalid(url, "etcds:// needs ca=PATH (the CA's PEM file)"))?;
            let client_identity = match (cert, key_file) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                _ => return Err(invalid(url, "cert= and key= go together")),
            };
            parsed.tls = Some(TlsFiles {
                ca_cert,
                client_identity,
            });
        }
        Ok(parsed)
    }
}

impl std::str::FromStr for RegistryUrl {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        RegistryUrl::parse(s)
    }
}

impl fmt::Display for RegistryUrl {
    /// The URL with the password replaced by `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls.is_some() {
            "etcds"
        } else {
            self.kind.scheme()
        };
        write!(f, "{scheme}://")?;
        if let Some(c) = &self.credentials {
            write!(f, "{}:***@", encode(&c.user, IN_USER))?;
        }
        if let Some(name) = &self.memory_name {
            f.write_str(name)?;
        }
        let hosts: Vec<String> = self.endpoints.iter().map(|e| e.to_string()).collect();
        f.write_str(&hosts.join(","))?;
        if let Some(ns) = &self.namespace {
            write!(f, "{}", encode(ns.as_str(), IN_PATH))?;
        }
        let mut params = Vec::new();
        if let Some(t) = self.session_ttl {
            params.push(format!("session_ttl={}", format_duration(t)));
        }
        if let Some(t) = self.request_timeout {
            params.push(format!("timeout={}", format_duration(t)));
        }
        if let Some(tls) = &self.tls {
            let file =
                |path: &std::path::Path| encode(&path.to_string_lossy(), IN_VALUE).to_string();
            params.push(format!("ca={}", file(&tls.ca_cert)));
            if let Some((cert, key)) = &tls.client_identity {
                params.push(format!("cert={}", file(cert)));
                params.push(format!("key={}", file(key)));
            }
        }
        if !params.is_empty() {
            write!(f, "?{}", params.join("&"))?;
        }
        Ok(())
    }
}

impl fmt::Debug for RegistryUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RegistryUrl({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(url: &str) -> String {
        match RegistryUrl::parse(url) {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("{url}: expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn parses_each_backend() {
        let u = RegistryUrl::parse("etcd://h1:2379,10.0.0.2:2380/soa?ttl=5s&timeout=3s").unwrap();
        assert_eq!(u.kind, BackendKind::Etcd);
        assert_eq!(u.endpoints.len(), 2);
        assert_eq!(u.endpoints[1].to_string(), "10.0.0.2:2380");
        assert_eq!(u.namespace.as_ref().map(|n| n.as_str()), Some("/soa"));
        assert_eq!(u.session_ttl, Some(Duration::from_secs(5)));
        assert_eq!(u.request_timeout, Some(Duration::from_secs(3)));

        let z = RegistryUrl::parse("zk://127.0.0.1:2181/chroot/x?session_ttl=10s").unwrap();
        assert_eq!(z.kind, BackendKind::ZooKeeper);
        assert_eq!(z.namespace.unwrap().as_str(), "/chroot/x");
        assert_eq!(z.session_ttl, Some(Duration::from_secs(10)));
        // The backends' own names for it are read too.
        for (url, secs) in [
            ("etcd://h:1?ttl=7s", 7),
            ("zk://h:1?session_timeout=8s", 8),
            ("mem://?ttl=9s", 9),
        ] {
            let parsed = RegistryUrl::parse(url).unwrap();
            assert_eq!(parsed.session_ttl, Some(Duration::from_secs(secs)), "{url}");
        }

        let m = RegistryUrl::parse("mem://").unwrap();
        assert_eq!(m.kind, BackendKind::Memory);
        assert!(m.endpoints.is_empty() && m.memory_name.is_none());
        assert_eq!(
            RegistryUrl::parse("mem://demo")
                .unwrap()
                .memory_name
                .as_deref(),
            Some("demo")
        );

        let v6 = RegistryUrl::parse("etcd://[::1]:2379").unwrap();
        assert_eq!(v6.endpoints[0].host, "::1");
        assert_eq!(v6.to_string(), "etcd://[::1]:2379");
    }

    #[test]
    fn round_trips_through_display() {
        for url in [
            "etcd://h1:2379,h2:2379/ns?session_ttl=5s&timeout=500ms",
            "zk://a:2181/c?session_ttl=10s",
            "mem://x",
        ] {
            let parsed = RegistryUrl::parse(url).unwrap();
            assert_eq!(parsed.to_string(), url);
            assert_eq!(RegistryUrl::parse(&parsed.to_string()).unwrap(), parsed);
        }
    }

    #[test]
    fn credentials_are_never_printed() {
        let u = RegistryUrl::parse("etcd://root:s3cret@h:2379/ns").unwrap();
        assert_eq!(u.credentials.as_ref().unwrap().password, "s3cret");
        for shown in [
            u.to_string(),
            format!("{u:?}"),
            format!("{:?}", u.credentials),
        ] {
            assert!(!shown.contains("s3cret"), "{shown}");
        }
        let e = err("etcd://root:s3cret@h:notaport");
        assert!(!e.contains("s3cret") && e.contains("root:***@"), "{e}");
        // Nor a secret in the query, where etcdctl users may put it: refused, unprinted.
        for url in [
            "etcd://h:2379?user=root&password=s3cret",
            "etcd://root:x@h:2379/ns?password=s3cret",
            "zk://h:2181?digest=root:s3cret",
        ] {
            let e = err(url);
            assert!(
                !e.contains("s3cret") && (e.contains("password=***") || e.contains("digest=***")),
                "{e}"
            );
            assert!(e.contains("unknown parameter"), "{e}");
        }
    }

    #[test]
    fn rejects_precisely() {
        assert!(err("127.0.0.1:2379").contains("SCHEME://"));
        assert!(err("consul://h:1").contains("unknown scheme"));
        assert!(err("etcd://").contains("no endpoint"));
        assert!(err("etcd://h").contains("host:port"));
        assert!(err("etcd://h:0").contains("out of range"));
        assert!(err("etcd://h:99999").contains("out of range"));
        assert!(err("etcd://:2379").contains("empty host"));
        assert!(err("etcd://h:1,").contains("host:port"));
        assert!(err("etcd://h:1/a//b").contains("namespace"));
        assert!(err("etcd://h:1?ttl=5").contains("duration"));
        assert!(err("etcd://h:1?ttl").contains("needs a value"));
        assert!(err("etcd://h:1?session_timeout=5s").contains("unknown parameter"));
        assert!(err("zk://h:1?ttl=5s").contains("unknown parameter"));
        assert!(err("mem://a/b").contains("no path"));
        assert!(err("mem://a b").contains("store name"));
        assert!(err("etcd://:pw@h:1").contains("empty user"));
    }

    #[test]
    fn etcds_carries_tls_files_and_round_trips() {
        let url = RegistryUrl::parse(
            "etcds://app:s3cret@10.0.0.1:2379/ns?ca=/pki/ca.pem&cert=/pki/c.pem&key=/pki/k.pem",
        )
        .unwrap();
        let tls = url.tls.clone().unwrap();
        assert_eq!(tls.ca_cert, std::path::PathBuf::from("/pki/ca.pem"));
        assert_eq!(
            tls.client_identity,
            Some(("/pki/c.pem".into(), "/pki/k.pem".into()))
        );
        let shown = url.to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.starts_with("etcds://app:***@"), "{shown}");
        assert!(!format!("{url:?}").contains("s3cret"));
        assert!(err("etcds://h:1").contains("needs ca="));
        assert!(err("etcds://h:1?ca=/a&cert=/b").contains("go together"));
        assert!(err("etcd://h:1?ca=/a").contains("etcds://"));
        assert!(err("zk://h:1?ca=/a").contains("unknown parameter"));
    }

    #[test]
    fn an_at_sign_outside_credentials_never_redirects_the_connection() {
        // Read as credentials `h` / `2181/soa`, this would connect to evil:2379.
        assert!(err("zk://h:2181/soa@evil:2379").contains("ambiguous '@'"));
        assert!(err("etcd://h1:1,h2:2/ns?ttl=5s@x:3").contains("ambiguous '@'"));
        assert!(err("etcds://h:2379?ca=/home/a@b/ca.pem").contains("ambiguous '@'"));
        // With credentials too: read at the last '@', this sent the password to evil:2379.
        assert!(err("zk://digest:pw@h:2181/soa@evil:2379").contains("ambiguous '@'"));
        assert!(err("etcd://root:pw@h:1/ns?timeout=5s@evil:2").contains("ambiguous '@'"));
        assert!(err("etcd://root:pw@h1:1,h2:2?ca=a@evil:2").contains("ambiguous '@'"));
        // A password may still hold '/', '?' and '@'.
        let u = RegistryUrl::parse("etcd://root:pa/ss?@h:1/ns").unwrap();
        assert_eq!(u.credentials.unwrap().password, "pa/ss?");
        assert_eq!(u.endpoints[0].to_string(), "h:1");
        let u = RegistryUrl::parse("zk://user:p@ss/word@h:2181/soa").unwrap();
        assert_eq!(u.credentials.unwrap().password, "p@ss/word");
        assert_eq!(u.endpoints[0].to_string(), "h:2181");
    }

    #[test]
    fn hosts_are_names_or_addresses() {
        for url in ["zk://a{b:1", "zk://[zz]:1", "etcd://h%20:1", "zk://hé:2181"] {
            assert!(err(url).contains("endpoint"), "{url}");
        }
        for url in [
            "zk://[::1]:2181",
            "etcd://my_host-1.example.com:2379",
            "zk://10.0.0.1:1",
        ] {
            assert!(RegistryUrl::parse(url).is_ok(), "{url}");
        }
    }

    #[test]
    fn zookeeper_user_names_cannot_hold_a_colon() {
        assert!(err("zk://us%3Aer:pw@h:2181").contains("cannot hold ':'"));
        let u = RegistryUrl::parse("etcd://us%3Aer:pw@h:2379").unwrap();
        assert_eq!(u.credentials.unwrap().user, "us:er");
    }

    #[test]
    fn memory_urls_take_no_credentials() {
        assert!(err("mem://user:pw@demo").contains("no user:password"));
        // Otherwise the store name came from after the '@' in a parameter.
        assert!(err("mem://demo?ttl=5s@other").contains("no user:password"));
    }

    #[test]
    fn empty_and_zero_parameters_are_refused() {
        assert!(err("etcd://h:1?timeout=0s").contains("positive duration"));
        assert!(err("zk://h:1?session_ttl=0ms").contains("positive duration"));
        assert!(err("etcds://h:1?ca=").contains("empty value"));
        assert!(err("etcds://h:1?ca=/ca.pem&cert=&key=/k.pem").contains("empty value"));
    }

    #[test]
    fn sub_millisecond_durations_print_exactly() {
        for url in ["etcd://h:1?timeout=1.5ms", "zk://h:1?session_ttl=0.25ms"] {
            let parsed = RegistryUrl::parse(url).unwrap();
            let shown = parsed.to_string();
            assert_eq!(
                RegistryUrl::parse(&shown).unwrap(),
                parsed,
                "{url} -> {shown}"
            );
        }
    }

    #[test]
    fn escapes_are_decoded_and_printed_back() {
        let u =
            RegistryUrl::parse("etcds://us%3Aer:p%40ss%25@h:1/a%20b?ca=/pki/x%26y.pem&timeout=2s")
                .unwrap();
        let c = u.credentials.clone().unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("us:er", "p@ss%"));
        assert_eq!(u.namespace.as_ref().unwrap().as_str(), "/a b");
        assert_eq!(
            u.tls.as_ref().unwrap().ca_cert,
            std::path::PathBuf::from("/pki/x&y.pem")
        );
        let shown = u.to_string();
        assert_eq!(
            shown,
            "etcds://us%3Aer:***@h:1/a%20b?timeout=2s&ca=/pki/x%26y.pem"
        );
        let mut back = RegistryUrl::parse(&shown.replace("***", "p%40ss%25")).unwrap();
        assert_eq!(back.credentials.take().unwrap().password, "p@ss%");
        back.credentials = u.credentials.clone();
        assert_eq!(back, u);
        assert!(err("etcd://u:100%@h:1").contains("%25"));
        assert!(err("etcd://u:%zz@h:1").contains("%25"));
        assert!(err("etcd://h:1/ns%ff").contains("UTF-8"));
    }

    #[test]
    fn ports_are_digits_and_parameters_come_once() {
        assert!(err("etcd://h:+2379").contains("not digits"));
        assert!(err("etcd://h:").contains("not digits"));
        assert!(err("etcd://h:65536").contains("out of range"));
        // A forgotten `@host` must not print the password it leaves as the "port".
        let said = err("etcd://root:s3cret/ns");
        assert!(
            said.contains("before an @") && !said.contains("s3cret"),
            "{said}"
        );
        assert_eq!(
            RegistryUrl::parse("etcd://h:02379").unwrap().endpoints[0].port,
            2379
        );
        assert!(err("etcd://h:1?ttl=5s&ttl=9s").contains("given twice"));
        assert!(err("etcd://h:1?ttl=5s&session_ttl=9s").contains("session_ttl is given twice"));
        assert!(err("etcds://h:1?ca=/a&ca=/b").contains("ca is given twice"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        for bad in ["", "s", "5", "5h", "-1s", "1e9s", "99999999999m"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
