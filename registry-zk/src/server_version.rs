//! Which ZooKeeper release the servers run, asked with the `srvr` four-letter word (enabled
//! by default on every release that has a whitelist), so `children` can use `multiRead`
//! (3.6 and later) without sending it to a server that does not know it: an older server
//! answers an unknown request by closing the connection.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The first release with `multiRead`.
const MULTI_READ_SINCE: (u32, u32) = (3, 6);

/// Bytes of a `srvr` answer read at most; its version line comes first.
const ANSWER_BYTES: u64 = 4096;

/// Whether every server of `endpoints` that answered `srvr` within `timeout` runs a release
/// with `multiRead`, and at least one answered. A server that did not answer is left out: if
/// it turns out older, the client stops using `multiRead` when it first refuses one.
pub(crate) async fn multi_read_supported(endpoints: &[String], timeout: Duration) -> bool {
    let addresses: Vec<String> = endpoints
        .iter()
        .flat_map(|e| e.split(','))
        .filter_map(address)
        .collect();
    let asks = addresses.iter().map(|a| async move {
        let version = tokio::time::timeout(timeout, srvr_version(a))
            .await
            .ok()
            .flatten();
        tracing::debug!(server = %a, ?version, "zookeeper server release");
        version
    });
    let versions: Vec<(u32, u32)> = futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect();
    !versions.is_empty() && versions.iter().all(|v| *v >= MULTI_READ_SINCE)
}

/// `host:port` of one element of a connect string (ZooKeeper's default port 2181 if it has
/// none, a chroot suffix dropped); `None` for an empty element.
fn address(element: &str) -> Option<String> {
    let element = element.trim();
    let host_port = element.split('/').next().unwrap_or_default();
    if host_port.is_empty() {
        return None;
    }
    // An IPv6 address is bracketed: its port follows the `]`.
    let after_host = host_port.rsplit(']').next().unwrap_or(host_port);
    Some(if after_host.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:2181")
    })
}

/// The `major.minor` release `address` reports to `srvr`; `None` if it cannot be asked or
/// says something else (the command not whitelisted, a TLS-only port).
async fn srvr_version(address: &str) -> Option<(u32, u32)> {
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    stream.write_all(b"srvr").await.ok()?;
    let mut answer = Vec::new();
    stream
        .take(ANSWER_BYTES)
        .read_to_end(&mut answer)
        .await
        .ok()?;
    parse_release(&String::from_utf8_lossy(&answer))
}

/// The `major.minor` of a `srvr` answer's `Zookeeper version: 3.8.0-<commit>, built on ...`.
fn parse_release(answer: &str) -> Option<(u32, u32)> {
    let line = answer
        .lines()
        .find_map(|l| l.trim().strip_prefix("Zookeeper version:"))?;
    let mut parts = line.trim().split(['.', '-', ',']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_are_read_from_srvr_answers() {
        let answer = "Zookeeper version: 3.8.0-5a02a05eddb59aee6ac762f7ea82e92a68eb9c0f, built on 2022-02-25 08:49 UTC\nLatency min/avg/max: 0/0.0/0\n";
        assert_eq!(parse_release(answer), Some((3, 8)));
        assert_eq!(
            parse_release("Zookeeper version: 3.4.14-4c25d480e66aadd371de8bd2fd8da255ac140bcf, built on 03/06/2019 16:18 GMT\n"),
            Some((3, 4))
        );
        assert_eq!(
            parse_release("srvr is not executed because it is not in the whitelist.\n"),
            None
        );
        assert_eq!(parse_release(""), None);
        assert_eq!(parse_release("Zookeeper version: x.y\n"), None);
    }

    #[test]
    fn connect_string_elements_become_addresses() {
        assert_eq!(address("127.0.0.1:2181"), Some("127.0.0.1:2181".into()));
        assert_eq!(address(" zk1 "), Some("zk1:2181".into()));
        assert_eq!(address("zk1:2182/app"), Some("zk1:2182".into()));
        assert_eq!(address("[::1]:2183"), Some("[::1]:2183".into()));
        assert_eq!(address("[::1]"), Some("[::1]:2181".into()));
        assert_eq!(address(""), None);
        assert_eq!(address("/chroot"), None);
    }

    /// A server that answers one `srvr` with `release`'s version line.
    async fn answering(release: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut asked = [0u8; 4];
            stream.read_exact(&mut asked).await.unwrap();
            assert_eq!(&asked, b"srvr");
            let answer = format!("Zookeeper version: {release}-abc, built on 2022-02-25 08:49 UTC\nMode: standalone\n");
            stream.write_all(answer.as_bytes()).await.unwrap();
        });
        address
    }

    #[tokio::test]
    async fn multi_read_needs_every_answering_server_at_3_6() {
        let both_new = [answering("3.8.0").await, answering("3.6.1").await];
        assert!(multi_read_supported(&both_new, Duration::from_secs(5)).await);
        // A rolling upgrade: one server still on 3.5, which would drop the connection.
        let mixed = [answering("3.8.0").await, answering("3.5.9").await];
        assert!(!multi_read_supported(&mixed, Duration::from_secs(5)).await);
        // One connect string element listing both.
        let joined = format!("{},{}", answering("3.7.0").await, answering("3.4.14").await);
        assert!(!multi_read_supported(&[joined], Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn servers_that_cannot_be_asked_do_not_enable_multi_read() {
        // A port nothing listens on: bound, then released.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = listener.local_addr().unwrap().to_string();
        drop(listener);
        assert!(!multi_read_supported(&[closed], Duration::from_secs(2)).await);
        assert!(!multi_read_supported(&[], Duration::from_secs(2)).await);
    }
}
