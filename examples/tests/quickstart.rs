//! The README's first set-up command runs the quickstart: it must keep working, on the
//! in-memory backend alone, and end on its own.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn quickstart_runs_to_the_end_on_the_in_memory_backend() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quickstart"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: the demo takes about a second; a hang fails the test instead of the run.
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("quickstart still running after 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "quickstart failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The story it tells: instances appear, a lost session's instance comes back, a graceful
    // shutdown removes one, and two are left.
    for line in [
        "registered /soa/runtime/services/",
        "expires",
        "shuts down gracefully",
        "2 live instance(s) at the end",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
}
