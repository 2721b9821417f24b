//! `ServerProcess`: one real server process started by the harness, with the faults tests
//! inject (kill -9, SIGSTOP/SIGCONT, restart on the same data) and cleanup that cannot leak.
//!
//! Every server runs under a small `sh` guard that reads our end of a pipe: when this test
//! process exits for any reason (a panic, `cargo test` killed, a static never dropped), the
//! pipe closes and the guard kills the server. `Drop` kills it too.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// Result of harness operations; errors are messages meant for a failing test's output.
pub type HarnessResult<T> = Result<T, String>;

/// The command that installs every server the harness needs (named in errors).
pub const SETUP_COMMAND: &str =
    "apt-get update && apt-get install -y protobuf-compiler libprotobuf-dev etcd-server etcd-client zookeeper openssl procps (or run ./scripts/test.sh, which does this)";

/// How long a process may run servers before the harness ends it (see [`set_watchdog`]).
pub const WATCHDOG_DEFAULT: Duration = Duration::from_secs(30 * 60);

static WATCHDOG: std::sync::Mutex<Option<Duration>> = std::sync::Mutex::new(Some(WATCHDOG_DEFAULT));
static WATCHDOG_ARMED: std::sync::Once = std::sync::Once::new();

/// Sets how long this process may run after it starts its first server before the harness
/// ends it with exit code 124 and a message (`None`: never). A test binary whose test hangs
/// then fails instead of holding CI forever; its servers and temp dirs go with it (see
/// [`ServerProcess`]). [`WATCHDOG_DEFAULT`] unless set before the first server starts;
/// long-running tools (the bench) turn it off.
pub fn set_watchdog(limit: Option<Duration>) {
    *WATCHDOG.lock().unwrap_or_else(|p| p.into_inner()) = limit;
}

/// Starts the watchdog once, at the first server.
fn arm_watchdog() {
    WATCHDOG_ARMED.call_once(|| {
        let Some(limit) = *WATCHDOG.lock().unwrap_or_else(|p| p.into_inner()) else {
            return;
        };
        let armed = std::thread::Builder::new()
            .name("harness-watchdog".into())
            .spawn(move || {
                std::thread::sleep(limit);
                // Straight to stderr: libtest captures `eprintln!`, and would drop it at exit.
                let _ = std::io::Write::write_all(
                    &mut std::io::stderr(),
                    format!(
                        "conformance harness: this process has run servers for {limit:?}, longer \
                         than any test should; a test is hung, so the process ends here (exit \
                         124)\n"
                    )
                    .as_bytes(),
                );
                std::process::exit(124);
            });
        if let Err(e) = armed {
            eprintln!("conformance harness: no watchdog thread ({e}); a hung test will hang");
        }
    });
}

/// Fails with a message naming the setup command if `binary` is not an existing file.
pub fn require_binary(binary: &Path, what: &str) -> HarnessResult<()> {
    if binary.is_file() {
        Ok(())
    } else {
        Err(format!(
            "{what} not found at {}: install it with `{SETUP_COMMAND}`",
            binary.display()
        ))
    }
}

/// A temp dir for a server's data, removed on drop and also when the test process exits
/// without dropping it (servers shared through a `static` never are): a reaper process
/// removes it once our end of its stdin closes. etcd preallocates 64 MB of WAL per member, so
/// leaked dirs fill the disk over repeated runs.
pub struct ServerDir {
    dir: tempfile::TempDir,
    reaper: Option<Child>,
}

impl ServerDir {
    /// A new empty dir under the system's temp dir.
    pub fn new() -> HarnessResult<ServerDir> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        // Ignores the terminal's signals like the server guards, and waits a moment for them
        // to kill their servers (same EOF) before removing what those write to.
        let reaper = Command::new("sh")
            .arg("-c")
            .arg(r#"trap '' INT QUIT HUP TERM; cat >/dev/null; sleep 1; rm -rf -- "$1""#)
            .arg("dir-reaper")
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the temp dir reaper: {e}"))?;
        Ok(ServerDir {
            dir,
            reaper: Some(reaper),
        })
    }

    /// The dir.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for ServerDir {
    fn drop(&mut self) {
        if let Some(mut reaper) = self.reaper.take() {
            drop(reaper.stdin.take());
            // Reaped off the caller's thread: dropping a server must not wait a second.
            std::thread::spawn(move || {
                let _ = reaper.wait();
            });
        }
    }
}

/// A free TCP port on 127.0.0.1 for a server (see [`free_ports`]).
pub fn free_port() -> HarnessResult<u16> {
    free_ports(1)?
        .pop()
        .ok_or_else(|| "no free loopback port".to_owned())
}

/// Ports the kernel hands out by itself (to a bind to port 0, or as an outgoing connection's
/// local port): `/proc/sys/net/ipv4/ip_local_port_range`, Linux's default if unreadable.
fn ephemeral_range() -> (u16, u16) {
    let read = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let mut bounds = read
        .iter()
        .flat_map(|r| r.split_whitespace())
        .filter_map(|n| n.parse::<u16>().ok());
    match (bounds.next(), bounds.next()) {
        (Some(low), Some(high)) if low <= high => (low, high),
        _ => (32768, 60999),
    }
}

/// Where server ports are picked: a span just outside the kernel's ephemeral range, so that
/// a killed server's port cannot be given to a client connection or to another bind to port
/// 0 before the server restarts on it. `None` if no span of 4096 fits (then port 0 is bound).
fn server_port_span() -> Option<(u16, u16)> {
    const SPAN: u16 = 10_000;
    const LEAST: u16 = 4096;
    let (low, high) = ephemeral_range();
    // Below the range, above the well-known and registered ports servers like to use.
    let floor = 10_000u16;
    if low.saturating_sub(floor) >= LEAST {
        return Some((low.saturating_sub(SPAN).max(floor), low - 1));
    }
    let above = u16::MAX - high;
    (above >= LEAST).then(|| (high + 1, high.saturating_add(SPAN)))
}

/// Next candidate in the span: a process-wide cursor, starting at a place of this process's
/// own, so that concurrent test processes mostly pick apart (a clash fails the bind and the
/// next one is tried; a server that loses a race for its port is started again by
/// [`retry_port_races`]).
fn next_candidate((first, last): (u16, u16)) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CURSOR: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(last - first) + 1;
    let start = std::process::id().wrapping_mul(7919) % span;
    let _ = CURSOR.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    let offset = CURSOR.fetch_add(1, Ordering::Relaxed) % span;
    // `offset < span`, so the sum is at most `last`.
    first + u16::try_from(offset).unwrap_or(0)
}

/// `n` distinct free TCP ports on 127.0.0.1 for servers: all are held bound until every one
/// is picked, so none is handed out twice. They come from just outside the kernel's ephemeral
/// range (`/proc/sys/net/ipv4/ip_local_port_range`), where no client connection or bind to
/// port 0 lands: a server the harness kills keeps its port free for its restart.
pub fn free_ports(n: usize) -> HarnessResult<Vec<u16>> {
    let mut listeners = Vec::with_capacity(n);
    if let Some(span) = server_port_span() {
        let tries = usize::from(span.1 - span.0) + 1;
        for _ in 0..tries {
            if listeners.len() == n {
                break;
            }
            if let Ok(l) = TcpListener::bind((Ipv4Addr::LOCALHOST, next_candidate(span))) {
                listeners.push(l);
            }
        }
    }
    while listeners.len() < n {
        listeners.push(
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .map_err(|e| format!("cannot bind a free loopback port: {e}"))?,
        );
    }
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(|e| format!("cannot read the bound port: {e}"))
        })
        .collect()
}

/// Runs `start` again, up to 3 tries in all, when it failed because a port picked for it was
/// taken meanwhile: `free_ports` releases its ports before the server binds them, and another
/// test's server or connection may get one first. Such a failure's message carries the
/// server's log, which names the bind error.
pub fn retry_port_races<T>(mut start: impl FnMut() -> HarnessResult<T>) -> HarnessResult<T> {
    let mut tries = 1;
    loop {
        match start() {
            Err(e) if tries < 3 && e.to_lowercase().contains("address already in use") => {
                tries += 1;
            }
            outcome => return outcome,
        }
    }
}

/// Polls `probe` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut probe: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if probe() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether something accepts TCP connections at `addr`.
pub fn port_open(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// A server process: program, arguments and environment, kept so it can be restarted.
pub struct ServerProcess {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log_path: PathBuf,
    guard: Option<Child>,
    guard_stdin: Option<ChildStdin>,
    pid: Option<u32>,
    paused: bool,
}

impl ServerProcess {
    /// Starts `program args` with stdout and stderr appended to `log_path`.
    pub fn start(
        name: impl Into<String>,
        program: impl Into<PathBuf>,
        args: Vec<String>,
        env: Vec<(String, String)>,
        log_path: impl Into<PathBuf>,
    ) -> HarnessResult<Self> {
        let mut process = ServerProcess {
            name: name.into(),
            program: program.into(),
            args,
            env,
            log_path: log_path.into(),
            guard: None,
            guard_stdin: None,
            pid: None,
            paused: false,
        };
        process.spawn()?;
        Ok(process)
    }

    fn spawn(&mut self) -> HarnessResult<()> {
        require_binary(&self.program, &self.name)?;
        arm_watchdog();
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| format!("cannot open log {}: {e}", self.log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("cannot clone log handle: {e}"))?;
        // The guard starts the server, prints its pid, then waits for EOF on stdin (our exit)
        // and kills it; a SIGSTOPped server is continued first so SIGKILL is not delayed.
        // It ignores the terminal's signals (Ctrl-C reaches the whole process group): dying
        // with the test binary before its kill would orphan a JVM, which ignores SIGINT.
        let script = r#"trap '' INT QUIT HUP TERM; "$@" 1>&3 2>&4 & pid=$!; echo $pid; cat >/dev/null; kill -CONT $pid 2>/dev/null; kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null"#;
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!(
                "exec 3>>'{0}' 4>>'{0}'; {script}",
                self.log_path.display()
            ))
            .arg("server-guard")
            .arg(&self.program)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_err));
        for (k, v) in &self.env {
            command.env(k, v);
        }
        drop(log);
        let mut guard = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.name))?;
        let stdout = guard
            .stdout
            .take()
            .ok_or_else(|| "guard has no stdout".to_string())?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| format!("cannot read {} pid: {e}", self.name))?;
        let pid: u32 = line
            .trim()
            .parse()
            .map_err(|_| format!("{} guard printed {line:?} instead of a pid", self.name))?;
        self.guard_stdin = guard.stdin.take();
        self.guard = Some(guard);
        self.pid = Some(pid);
        self.paused = false;
        Ok(())
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Where its output goes.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `bytes` bytes of its log, for failure messages.
    pub fn log_tail(&self, bytes: usize) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let _ = f.read_to_string(&mut text);
        }
        let start = text.len().saturating_sub(bytes);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].to_string()
    }

    fn signal(&self, signal: &str) -> HarnessResult<()> {
        let pid = self
            .pid
            .ok_or_else(|| format!("{} is not running", self.name))?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            // A server already gone is reported by the status below, not by kill's own words.
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run kill: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("kill -{signal} {pid} ({}) failed", self.name))
        }
    }

    /// Crashes the server (SIGKILL) and waits until it is gone.
    pub fn kill(&mut self) -> HarnessResult<()> {
        if self.pid.is_none() {
            return Ok(());
        }
        if self.paused {
            let _ = self.signal("CONT");
        }
        let _ = self.signal("KILL");
        // Closing the guard's stdin makes it reap the server and exit.
        self.guard_stdin = None;
        if let Some(mut guard) = self.guard.take() {
            let _ = guard.wait();
        }
        self.pid = None;
        self.paused = false;
        Ok(())
    }

    /// Freezes the server (SIGSTOP): a GC-like stall or a partition as the client sees it.
    pub fn pause(&mut self) -> HarnessResult<()> {
        self.signal("STOP")?;
        self.paused = true;
        Ok(())
    }

    /// Continues a paused server (SIGCONT).
    pub fn resume(&mut self) -> HarnessResult<()> {
        self.signal("CONT")?;
        self.paused = false;
        Ok(())
    }

    /// Starts the server again with the same arguments (and so the same data directory).
    pub fn restart(&mut self) -> HarnessResult<()> {
        self.kill()?;
        self.spawn()
    }

    /// Whether the process is running (not necessarily ready).
    pub fn is_running(&self) -> bool {
        // An exited server not yet reaped by its guard is a zombie: its state letter, after
        // the command name's closing parenthesis, is `Z`.
        self.pid.is_some_and(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
            })
        })
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starts `program args` as server `name`, logging into `dir`.
    fn start_in(
        dir: &tempfile::TempDir,
        name: &str,
        program: &str,
        args: &[&str],
    ) -> HarnessResult<ServerProcess> {
        let args = args.iter().map(|a| a.to_string()).collect();
        ServerProcess::start(name, program, args, vec![], dir.path().join("log"))
    }

    #[test]
    fn pause_resume_kill_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = start_in(&dir, "sleeper", "/bin/sleep", &["1000"]).unwrap();
        let first = p.pid().unwrap();
        assert!(p.is_running());
        p.pause().unwrap();
        // Signal delivery is asynchronous: wait (bounded) for the stopped state.
        let stat = || std::fs::read_to_string(format!("/proc/{first}/stat")).unwrap_or_default();
        assert!(
            wait_until(Duration::from_secs(2), || stat().contains(") T ")),
            "not stopped: {}",
            stat()
        );
        p.resume().unwrap();
        p.restart().unwrap();
        assert!(
            !Path::new(&format!("/proc/{first}")).exists(),
            "old pid survived restart"
        );
        let second = p.pid().unwrap();
        drop(p);
        assert!(wait_until(Duration::from_secs(2), || !Path::new(&format!(
            "/proc/{second}"
        ))
        .exists()));
    }

    #[test]
    fn missing_binary_names_setup_command() {
        let dir = tempfile::tempdir().unwrap();
        let err = start_in(&dir, "etcd", "/nonexistent/etcd", &[])
            .err()
            .unwrap();
        assert!(err.contains("apt-get install"), "{err}");
    }

    #[test]
    fn a_server_that_exited_is_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let p = start_in(&dir, "quitter", "/bin/true", &[]).unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || !p.is_running()),
            "an exited server counts as running"
        );
    }

    #[test]
    fn server_ports_are_distinct_free_and_outside_the_ephemeral_range() {
        let (low, high) = ephemeral_range();
        let ports = free_ports(64).unwrap();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), 64, "{ports:?}");
        if server_port_span().is_some() {
            assert!(
                ports.iter().all(|p| !(low..=high).contains(p)),
                "a server port in the ephemeral range {low}-{high}: {ports:?}"
            );
        }
        for port in ports {
            TcpListener::bind((Ipv4Addr::LOCALHOST, port))
                .unwrap_or_else(|e| panic!("port {port} not free: {e}"));
        }
    }

    #[test]
    fn only_a_taken_port_is_tried_again_and_at_most_three_times() {
        let mut tries = 0;
        let taken: HarnessResult<()> = retry_port_races(|| {
            tries += 1;
            Err("listen tcp 127.0.0.1:1: bind: address already in use".to_owned())
        });
        assert!(taken.is_err());
        assert_eq!(tries, 3);
        let mut tries = 0;
        let other: HarnessResult<()> = retry_port_races(|| {
            tries += 1;
            Err("no such file".to_owned())
        });
        assert!(other.is_err());
        assert_eq!(tries, 1);
        let mut tries = 0;
        let second = retry_port_races(|| {
            tries += 1;
            if tries == 1 {
                Err("java.net.BindException: Address already in use".to_owned())
            } else {
                Ok(tries)
            }
        });
        assert_eq!(second, Ok(2));
    }

    /// Set for the child process of `a_hung_process_is_ended_by_the_watchdog`: its log dir.
    const WATCHDOG_CHILD: &str = "HARNESS_WATCHDOG_CHILD";

    /// Run by `a_hung_process_is_ended_by_the_watchdog` in a process of its own: starts a
    /// server under a 1 s watchdog, then hangs.
    #[test]
    #[ignore = "a child process of a_hung_process_is_ended_by_the_watchdog"]
    fn watchdog_child() {
        // Only as the parent's child: run in-process (`--include-ignored`), the 1 s watchdog
        // would end every other test of this binary.
        // The parent's dir: this process exits without dropping anything.
        let Some(dir) = std::env::var_os(WATCHDOG_CHILD) else {
            return;
        };
        set_watchdog(Some(Duration::from_secs(1)));
        let args = vec!["1000".to_owned()];
        let log = Path::new(&dir).join("log");
        let _server = ServerProcess::start("sleeper", "/bin/sleep", args, vec![], log).unwrap();
        std::thread::sleep(Duration::from_secs(60));
    }

    #[test]
    fn a_hung_process_is_ended_by_the_watchdog() {
        let started = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "harness::process::tests::watchdog_child",
            ])
            .env(WATCHDOG_CHILD, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(124), "{stderr}");
        assert!(stderr.contains("a test is hung"), "{stderr}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }
}
