//! A TLS etcd for security tests: a throwaway PKI made with `openssl` at test time, and an
//! etcd member that serves only TLS and (optionally) demands client certificates.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::etcd::{http_get, ETCD_BINARY};
use super::process::{free_ports, require_binary, wait_until, HarnessResult, ServerProcess};

/// Where Debian installs openssl.
pub const OPENSSL_BINARY: &str = "/usr/bin/openssl";

/// PEM files of a CA, a server certificate for 127.0.0.1/localhost and a client certificate.
#[derive(Clone, Debug)]
pub struct TestPki {
    /// The CA certificate both sides trust.
    pub ca_cert: PathBuf,
    /// The server's certificate (SAN IP:127.0.0.1, DNS:localhost) and key.
    pub server: (PathBuf, PathBuf),
    /// A client certificate (CN `client`) and key.
    pub client: (PathBuf, PathBuf),
}

fn openssl(dir: &Path, args: &[&str]) -> HarnessResult<()> {
    let out = Command::new(OPENSSL_BINARY)
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("openssl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl TestPki {
    /// Generates the PKI in `dir` (P-256 keys, valid for a day).
    pub fn generate(dir: &Path) -> HarnessResult<TestPki> {
        require_binary(Path::new(OPENSSL_BINARY), "openssl")?;
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec![
            "req", "-x509", "-days", "1", "-keyout", "ca.key", "-out", "ca.pem",
        ];
        ca.extend(ec);
        ca.extend([
            "-subj",
            "/CN=registry-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(dir, &ca)?;
        for (name, cn, ext) in [
            (
                "server",
                "localhost",
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n",
            ),
            (
                "client",
                "client",
                "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
            ),
        ] {
            let ext_file = dir.join(format!("{name}.ext"));
            std::fs::write(&ext_file, ext).map_err(|e| format!("{}: {e}", ext_file.display()))?;
            let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
            let subj = format!("/CN={cn}");
            let mut req = vec!["req", "-keyout", key.as_str(), "-out", csr.as_str(), "-subj", subj.as_str()];
            req.extend(ec);
            openssl(dir, &req)?;
            let ext_name = format!("{name}.ext");
            openssl(
                dir,
                &[
                    "x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key",
                    "-CAcreateserial", "-days", "1", "-out", &pem, "-extfile", &ext_name,
                ],
            )?;
        }
        Ok(TestPki {
            ca_cert: dir.join("ca.pem"),
            server: (dir.join("server.pem"), dir.join("server.key")),
            client: (dir.join("client.pem"), dir.join("client.key")),
        })
    }
}

/// A single etcd member serving clients only over TLS; health is read from a separate plain
/// metrics listener. Killed on drop; data and PKI live in a temp dir removed on drop.
pub struct SecureEtcd {
    process: ServerProcess,
    client: SocketAddr,
    /// The PKI its certificates come from.
    pub pki: TestPki,
    _dir: super::process::ServerDir,
}

impl SecureEtcd {
    /// Starts it; with `client_cert_auth`, clients without a certificate signed by the CA are
    /// refused. Auth (users, roles) is for the test to enable through a client.
    pub fn start(client_cert_auth: bool) -> HarnessResult<SecureEtcd> {
        super::process::retry_port_races(|| Self::try_start(client_cert_auth))
    }

    fn try_start(client_cert_auth: bool) -> HarnessResult<SecureEtcd> {
        require_binary(Path::new(ETCD_BINARY), "etcd")?;
        let dir = super::process::ServerDir::new()?;
        let pki = TestPki::generate(dir.path())?;
        let loopback = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let ports = free_ports(3)?;
        let port = |i: usize| ports.get(i).copied().ok_or("too few free ports");
        let (client, peer, metrics) = (loopback(port(0)?), loopback(port(1)?), loopback(port(2)?));
        let mut args: Vec<String> = vec![
            "--name".into(),
            "secure".into(),
            "--data-dir".into(),
            dir.path().join("secure.etcd").display().to_string(),
            "--listen-client-urls".into(),
            format!("https://{client}"),
            "--advertise-client-urls".into(),
            format!("https://{client}"),
            "--listen-peer-urls".into(),
            format!("http://{peer}"),
            "--initial-advertise-peer-urls".into(),
            format!("http://{peer}"),
            "--initial-cluster".into(),
            format!("secure=http://{peer}"),
            "--listen-metrics-urls".into(),
            format!("http://{metrics}"),
            "--cert-file".into(),
            pki.server.0.display().to_string(),
            "--key-file".into(),
            pki.server.1.display().to_string(),
            "--trusted-ca-file".into(),
            pki.ca_cert.display().to_string(),
        ];
        if client_cert_auth {
            args.push("--client-cert-auth".into());
        }
        let process = ServerProcess::start(
            "etcd (TLS)",
            ETCD_BINARY,
            args,
            vec![],
            dir.path().join("secure.log"),
        )?;
        let healthy =
            || http_get(metrics, "/health").is_some_and(|b| b.contains("\"health\":\"true\""));
        // One that exited (a port taken meanwhile) is not waited for.
        let mut up = false;
        wait_until(Duration::from_secs(30), || {
            up = healthy();
            up || !process.is_running()
        });
        if !up {
            return Err(format!(
                "TLS etcd not healthy within 30 s (running: {}); log tail:\n{}",
                process.is_running(),
                process.log_tail(3000)
            ));
        }
        Ok(SecureEtcd {
            process,
            client,
            pki,
            _dir: dir,
        })
    }

    /// `127.0.0.1:PORT` of its TLS client listener.
    pub fn endpoint(&self) -> String {
        self.client.to_string()
    }

    /// The last bytes of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        self.process.log_tail(3000)
    }
}
