//! `regctl` as an operator uses it, against real servers started by the harness.

use std::process::{Command, Output};
use std::time::Duration;

use conformance_tests::harness::{EtcdServer, ZkConfig, ZkServer};

fn regctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_regctl"))
        .args(args)
        .output()
        .unwrap()
}

/// A regctl process that is killed (and reaped) when dropped, so one left running by a
/// failed assertion does not outlive its test.
struct Running(std::process::Child);

impl std::ops::Deref for Running {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn operates_a_tree_and_migrates_it_from_zookeeper_to_etcd() {
    let zk = ZkServer::start(ZkConfig {
        tick_time: Duration::from_millis(200),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let etcd = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let from = format!("zk://{}", zk.connect_string());
    let to = format!("etcd://{}", etcd.endpoint());
    let svc = "/soa/config/services/com.today.Goods";

    // By hand on ZooKeeper: put creates, get reads, stat, ls, tree.
    let put = regctl(&[
        "--url",
        &from,
        "put",
        svc,
        "timeout/800ms;loadBalance/leastActive",
    ]);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    assert!(regctl(&[
        "--url",
        &from,
        "put",
        "/soa/config/routes/com.today.Goods",
        "otherwise => ip'10.0.0.1'"
    ])
    .status
    .success());
    assert_eq!(
        stdout(&regctl(&["--url", &from, "get", svc])).trim(),
        "timeout/800ms;loadBalance/leastActive"
    );
    assert!(stdout(&regctl(&["--url", &from, "stat", svc])).contains("version 0"));
    assert_eq!(
        stdout(&regctl(&["--url", &from, "ls", "/soa/config"]))
            .lines()
            .collect::<Vec<_>>(),
        ["services", "routes"]
    );
    let tree = stdout(&regctl(&["--url", &from, "tree", "/soa"]));
    assert!(
        tree.lines().any(|l| l.trim() == "com.today.Goods"),
        "{tree}"
    );
    // Compare-and-set through the CLI.
    let stale = regctl(&["--url", &from, "put", svc, "x", "--version", "7"]);
    assert_eq!(
        stale.status.code(),
        Some(5),
        "version mismatch is a failed precondition"
    );

    // Migration: differences first, then a copy, then none; copying again changes nothing.
    let diff = regctl(&["diff", "--from", &from, "--to", &to, "/soa"]);
    assert_eq!(diff.status.code(), Some(1));
    assert!(stdout(&diff).contains(&format!("missing {svc}")));
    let dry = regctl(&["copy", "--from", &from, "--to", &to, "/soa", "--dry-run"]);
    assert!(stdout(&dry).contains("would copy"), "{}", stdout(&dry));
    assert_eq!(
        regctl(&["diff", "--from", &from, "--to", &to, "/soa"])
            .status
            .code(),
        Some(1),
        "dry run wrote"
    );
    let copy = regctl(&["copy", "--from", &from, "--to", &to, "/soa"]);
    assert!(
        copy.status.success(),
        "{}",
        String::from_utf8_lossy(&copy.stderr)
    );
    let diff = regctl(&["diff", "--from", &from, "--to", &to, "/soa"]);
    assert_eq!(diff.status.code(), Some(0), "{}", stdout(&diff));
    let again = stdout(&regctl(&[
        "--output", "json", "copy", "--from", &from, "--to", &to, "/soa",
    ]));
    let summary: serde_json::Value = serde_json::from_str(again.trim()).unwrap();
    assert_eq!(
        (summary["created"].as_u64(), summary["updated"].as_u64()),
        (Some(0), Some(0)),
        "{again}"
    );
    assert_eq!(
        stdout(&regctl(&["--url", &to, "get", svc])).trim(),
        "timeout/800ms;loadBalance/leastActive"
    );

    // rm, and errors a script can rely on.
    assert!(regctl(&["--url", &to, "rm", "-r", "/soa/config/routes"])
        .status
        .success());
    assert_eq!(
        regctl(&["--url", &to, "get", "/soa/config/routes/com.today.Goods"])
            .status
            .code(),
        Some(4),
        "not found has a code of its own"
    );
    let bad = regctl(&["--url", &to, "get", "soa//x"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid path"));
    let no_url = Command::new(env!("CARGO_BIN_EXE_regctl"))
        .args(["get", "/x"])
        .env_remove("REGISTRY_URL")
        .output()
        .unwrap();
    assert_eq!(no_url.status.code(), Some(2));
}

#[test]
fn export_and_import_round_trip_binary_values() {
    let etcd = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let zk = ZkServer::start(ZkConfig {
        tick_time: Duration::from_millis(200),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let from = format!("etcd://{}", etcd.endpoint());
    let to = format!("zk://{}", zk.connect_string());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let reg = registry::connect(&from).await.unwrap();
        let binary = registry::NodePath::new("/soa/config/freq/com.today.Goods").unwrap();
        reg.create(
            &binary,
            registry::Bytes::from_static(&[0, 159, 146, 150]),
            registry::CreateMode::Persistent,
        )
        .await
        .unwrap();
        reg.close().await.unwrap();
    });
    assert!(regctl(&[
        "--url",
        &from,
        "put",
        "/soa/config/services/com.today.Goods",
        "weight/600"
    ])
    .status
    .success());
    // `get` prints the bytes as stored.
    let got = regctl(&["--url", &from, "get", "/soa/config/freq/com.today.Goods"]);
    assert_eq!(got.stdout, [0, 159, 146, 150, b'\n'], "{got:?}");
    let tmp = tempfile_dir();
    let dir = tmp.path();
    let file = dir.join("soa.json");
    let export = regctl(&[
        "--url",
        &from,
        "export",
        "/soa",
        "--file",
        file.to_str().unwrap(),
    ]);
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("value_base64") && text.contains("weight/600"),
        "{text}"
    );
    // Without --file the document alone goes to stdout (the summary to stderr), and import
    // reads it from stdin: `export | import`.
    let piped = regctl(&["--url", &from, "export", "/soa"]);
    assert!(piped.status.success(), "{piped:?}");
    let document: serde_json::Value = serde_json::from_slice(&piped.stdout)
        .unwrap_or_else(|e| panic!("stdout is not the document ({e}): {piped:?}"));
    let exported = serde_json::from_str::<serde_json::Value>(&text).unwrap();
    assert_eq!(document, exported);
    assert!(
        String::from_utf8_lossy(&piped.stderr).contains("exported"),
        "{piped:?}"
    );
    let mut import = Command::new(env!("CARGO_BIN_EXE_regctl"))
        .args([
            "--url", "mem://", "--output", "json", "import", "--file", "-",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = import.stdin.take().unwrap();
        stdin.write_all(&piped.stdout).unwrap();
    }
    let imported = import.wait_with_output().unwrap();
    assert!(imported.status.success(), "{imported:?}");
    let summary: serde_json::Value = serde_json::from_slice(&imported.stdout).unwrap();
    assert_eq!(
        summary["created"].as_u64(),
        exported["nodes"].as_array().map(|n| n.len() as u64),
        "{summary}"
    );
    // A delete refused for children names the flag that does it.
    let refused = regctl(&["--url", &from, "rm", "/soa"]);
    assert_eq!(refused.status.code(), Some(5), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("rm -r"),
        "{refused:?}"
    );
    let import = regctl(&["--url", &to, "import", "--file", file.to_str().unwrap()]);
    assert!(
        import.status.success(),
        "{}",
        String::from_utf8_lossy(&import.stderr)
    );
    assert_eq!(
        regctl(&["diff", "--from", &from, "--to", &to, "/soa"])
            .status
            .code(),
        Some(0)
    );
    // A malformed file is refused before anything is written.
    std::fs::write(
        dir.join("bad.json"),
        r#"{"nodes":[{"path":"/ok","value":"1"},{"path":"no-slash","value":"2"}]}"#,
    )
    .unwrap();
    let bad = regctl(&[
        "--url",
        &to,
        "import",
        "--file",
        dir.join("bad.json").to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert_eq!(
        regctl(&["--url", &to, "get", "/ok"]).status.code(),
        Some(4),
        "a refused import wrote"
    );

    // A path held by a live session's ephemeral node is refused before anything is written
    // (a value written into it would go with that session).
    let held =
        registry::NodePath::new("/soa/runtime/services/com.today.Goods/10.0.0.1:9090").unwrap();
    let live = runtime.block_on(async {
        let reg = registry::connect(&to).await.unwrap();
        reg.create(
            &held,
            registry::Bytes::from("live"),
            registry::CreateMode::Ephemeral,
        )
        .await
        .unwrap();
        reg
    });
    // Refused before anything is written: `/ok`, first in the document, stays missing.
    let refused_import = |name: &str, below_held: &str| {
        let file = dir.join(format!("{name}.json"));
        std::fs::write(
            &file,
            format!(
                r#"{{"nodes":[{{"path":"/ok","value":"1"}},{{"path":"{held}{below_held}","value":"2"}}]}}"#
            ),
        )
        .unwrap();
        let refused = regctl(&["--url", &to, "import", "--file", file.to_str().unwrap()]);
        assert_eq!(refused.status.code(), Some(5), "{name}: {refused:?}");
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("live session's ephemeral node"),
            "{name}: {refused:?}"
        );
        assert_eq!(
            regctl(&["--url", &to, "get", "/ok"]).status.code(),
            Some(4),
            "{name}: a refused import wrote"
        );
    };
    refused_import("held", "");
    // So is a path below one: it used to write the nodes before it, then fail there.
    refused_import("below", "/x");
    // Importing the same document again writes nothing: no version moves.
    let again = regctl(&[
        "--url",
        &to,
        "--output",
        "json",
        "import",
        "--file",
        file.to_str().unwrap(),
    ]);
    let summary: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(
        (summary["created"].as_u64(), summary["updated"].as_u64()),
        (Some(0), Some(0)),
        "{summary}"
    );
    assert_eq!(
        summary["unchanged"],
        exported["nodes"].as_array().unwrap().len()
    );
    let stat = regctl(&[
        "--url",
        &to,
        "--output",
        "json",
        "stat",
        "/soa/config/services/com.today.Goods",
    ]);
    let stat: serde_json::Value = serde_json::from_slice(&stat.stdout).unwrap();
    assert_eq!(stat["version"], 0, "{stat}");
    // Non-UTF-8 values read as `export` writes them.
    let stat = regctl(&[
        "--url",
        &to,
        "--output",
        "json",
        "get",
        "/soa/config/freq/com.today.Goods",
    ]);
    let stat: serde_json::Value = serde_json::from_slice(&stat.stdout).unwrap();
    assert_eq!(stat["value_base64"], "AJ+Slg==", "{stat}");
    runtime.block_on(async {
        let node = live.get(&held).await.unwrap();
        assert_eq!(node.value, registry::Bytes::from("live"));
        assert_eq!(node.ephemeral_owner, live.session().session_id);
        live.close().await.unwrap();
    });
}

/// A directory of the test's own, removed when dropped (a fixed name under /tmp piled up
/// one directory per run).
fn tempfile_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("regctl-test-")
        .tempdir()
        .unwrap()
}

/// Lines of a running regctl, read on a thread so the test can wait with a deadline.
fn lines_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Reads lines until one starts with `prefix`, up to 30 s; returns all lines read.
fn wait_line(rx: &std::sync::mpsc::Receiver<String>, prefix: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = line.starts_with(prefix);
                seen.push(line);
                if done {
                    return seen;
                }
            }
            Err(_) => break,
        }
    }
    panic!("no line starting with {prefix:?} within 30 s; saw {seen:?}");
}

#[test]
fn mirror_follows_the_source_through_restarts_of_both_sides_until_interrupted() {
    let mut zk = ZkServer::start(ZkConfig {
        tick_time: Duration::from_millis(200),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let mut etcd = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let from = format!("zk://{}", zk.connect_string());
    let to = format!("etcd://{}", etcd.endpoint());
    let svc = "/soa/config/services/com.today.Goods";
    assert!(regctl(&["--url", &from, "put", svc, "weight/100"])
        .status
        .success());

    let mut mirror = Running(
        Command::new(env!("CARGO_BIN_EXE_regctl"))
            .args(["mirror", "--from", &from, "--to", &to, "/soa"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = lines_of(&mut mirror);
    wait_line(&lines, "synced");
    assert_eq!(
        stdout(&regctl(&["--url", &to, "get", svc])).trim(),
        "weight/100"
    );

    // A change while both sides are up.
    assert!(regctl(&["--url", &from, "put", svc, "weight/200"])
        .status
        .success());
    wait_line(&lines, &format!("put {svc}"));
    assert_eq!(
        stdout(&regctl(&["--url", &to, "get", svc])).trim(),
        "weight/200"
    );

    // The target restarts; changes made meanwhile arrive once it is back.
    etcd.kill().unwrap();
    assert!(regctl(&["--url", &from, "put", svc, "weight/300"])
        .status
        .success());
    etcd.restart().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stdout(&regctl(&["--url", &to, "get", svc])).trim() != "weight/300" {
        assert!(
            std::time::Instant::now() < deadline,
            "the change made while the target was down never arrived"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The source restarts too; the mirror re-syncs and keeps following.
    zk.kill().unwrap();
    zk.restart().unwrap();
    assert!(regctl(&["--url", &from, "put", svc, "weight/400"])
        .status
        .success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stdout(&regctl(&["--url", &to, "get", svc])).trim() != "weight/400" {
        assert!(
            std::time::Instant::now() < deadline,
            "a change made after the source restarted never arrived"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let _ = Command::new("kill")
        .args(["-INT", &mirror.id().to_string()])
        .status();
    wait_line(&lines, "mirror stopped");
    let status = mirror.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        regctl(&["diff", "--from", &from, "--to", &to, "/soa"])
            .status
            .code(),
        Some(0)
    );
}

// The cases below run on `mem://` (a fresh store per process), so they need no server.

/// Waits up to 10 s for `child` to exit; kills it and panics if it does not.
fn exit_code_within_10s(child: &mut std::process::Child, what: &str) -> Option<i32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("{what}: still running after 10 s");
}

#[cfg(target_os = "linux")]
#[test]
fn output_that_cannot_be_written_fails_the_command_and_ends_a_watch() {
    let full = || std::process::Stdio::from(std::fs::File::create("/dev/full").unwrap());
    // A script must not see exit 0 when the output it asked for was lost.
    let put = Command::new(env!("CARGO_BIN_EXE_regctl"))
        .args(["--url", "mem://", "put", "/x", "v"])
        .stdout(full())
        .output()
        .unwrap();
    assert_eq!(put.status.code(), Some(3), "{put:?}");
    assert!(
        String::from_utf8_lossy(&put.stderr).contains("writing the output"),
        "{put:?}"
    );
    // A watch whose output goes nowhere stops instead of running forever.
    let mut watch = Running(
        Command::new(env!("CARGO_BIN_EXE_regctl"))
            .args(["--url", "mem://", "watch", "/x"])
            .stdout(full())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert_eq!(exit_code_within_10s(&mut watch, "watch"), Some(3));
    // Nor does a mirror: its log is the operator's only view of it.
    let mut mirror = Running(
        Command::new(env!("CARGO_BIN_EXE_regctl"))
            .args(["mirror", "--from", "mem://", "--to", "mem://", "/x"])
            .stdout(full())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert_eq!(exit_code_within_10s(&mut mirror, "mirror"), Some(3));
    // A file export that cannot be written is an output failure, not bad input.
    let export = regctl(&[
        "--url",
        "mem://",
        "export",
        "--file",
        "/dev/full/nested.json",
        "/",
    ]);
    assert_eq!(export.status.code(), Some(3), "{export:?}");
}

#[test]
fn bad_input_is_refused_before_connecting() {
    // Nothing listens on port 1: had regctl connected first, it would fail with exit 3.
    let url = "etcd://127.0.0.1:1";
    for args in [
        &["get", "relative"][..],
        &["ls", "/a//b"],
        &["tree", "no-slash"],
        &["stat", "/trailing/"],
        &["put", "/a/../b", "v"],
        &["create", "bad", "v"],
        &["rm", "-r", "//"],
        &["watch", "x"],
        &["export", "--file", "/tmp/regctl-never-written.json", "x"],
        // The root, which no backend lets anyone write or delete.
        &["put", "/", "v"],
        &["create", "/", "v"],
        &["create", "--sequential", "/", "v"],
        &["rm", "-r", "/"],
    ] {
        let out = regctl(&[&["--url", url][..], args].concat());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
    let tmp = tempfile_dir();
    for (name, document) in [
        ("root", r#"{"nodes":[{"path":"/","value":"x"}]}"#),
        (
            "twice",
            r#"{"nodes":[{"path":"/a","value":"1"},{"path":"/a","value":"2"}]}"#,
        ),
    ] {
        let file = tmp.path().join(format!("{name}.json"));
        std::fs::write(&file, document).unwrap();
        let out = regctl(&["--url", url, "import", "--file", file.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{name}: {out:?}");
    }
    // A URL that reads two ways is never guessed, credentials or not: this one would send
    // the password to 127.0.0.1:2.
    let out = regctl(&[
        "--url",
        "etcd://root:pw@127.0.0.1:1/ns@127.0.0.1:2",
        "ls",
        "/",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // Both sides' URLs are read before either is connected to.
    for command in ["diff", "copy", "mirror"] {
        let out = regctl(&[command, "--from", url, "--to", "etcd://", "/a"]);
        assert_eq!(out.status.code(), Some(2), "{command}: {out:?}");
    }
}

#[test]
fn help_never_prints_a_password_from_the_environment() {
    for args in [&["--help"][..], &["ls", "--help"], &["help", "ls"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_regctl"))
            .args(args)
            .env("REGISTRY_URL", "etcd://root:s3cret@127.0.0.1:1")
            .output()
            .unwrap();
        let said = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
        assert!(said.contains("REGISTRY_URL"), "{args:?}: {said}");
        assert!(!said.contains("s3cret"), "{args:?}: {said}");
    }
}

#[test]
fn an_unreachable_server_is_named_with_the_root_cause() {
    // Nothing listens on port 1: the operator reads which endpoint failed, and why.
    let out = regctl(&["--url", "etcd://127.0.0.1:1", "ls", "/"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("connect to 127.0.0.1:1"), "{said}");
    assert!(said.contains("Connection refused"), "{said}");
    // A two-registry command says which side it could not reach.
    let out = regctl(&[
        "diff",
        "--from",
        "mem://",
        "--to",
        "etcd://127.0.0.1:1",
        "/",
    ]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("target etcd://127.0.0.1:1"), "{said}");
}

#[test]
fn json_output_covers_watch_import_and_export() {
    let tmp = tempfile_dir();
    let dir = tmp.path();
    let file = dir.join("in.json");
    std::fs::write(
        &file,
        r#"{"nodes":[{"path":"/soa/config/a","value":"1"},{"path":"/soa/config/b","value_base64":"AJ8="}]}"#,
    )
    .unwrap();
    let json = |o: &Output| -> serde_json::Value {
        serde_json::from_str(stdout(o).trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", stdout(o)))
    };
    let import = regctl(&[
        "--url",
        "mem://",
        "--output",
        "json",
        "import",
        "--file",
        file.to_str().unwrap(),
    ]);
    assert!(import.status.success(), "{import:?}");
    assert_eq!(json(&import)["created"], 2);
    let export = regctl(&[
        "--url",
        "mem://",
        "--output",
        "json",
        "export",
        "/soa",
        "--file",
        dir.join("out.json").to_str().unwrap(),
    ]);
    // The store of this process is empty: a root it does not hold is not exported as an
    // empty document (a mistyped path did that, successfully).
    assert_eq!(export.status.code(), Some(4), "{export:?}");
    assert!(
        String::from_utf8_lossy(&export.stderr).contains("does not exist"),
        "{export:?}"
    );

    let mut watch = Running(
        Command::new(env!("CARGO_BIN_EXE_regctl"))
            .args(["--url", "mem://", "--output", "json", "watch", "/x"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = lines_of(&mut watch);
    let first = lines.recv_timeout(Duration::from_secs(10));
    let _ = watch.kill();
    let _ = watch.wait();
    let first = first.expect("no line from watch within 10 s");
    let event: serde_json::Value =
        serde_json::from_str(&first).unwrap_or_else(|e| panic!("not JSON ({e}): {first:?}"));
    assert_eq!(event["event"], "snapshot", "{first}");
    assert!(event["nodes"].is_array(), "{first}");
}

#[test]
fn tree_of_a_missing_node_prints_nothing_and_fails() {
    let tree = regctl(&["--url", "mem://", "tree", "/nope"]);
    assert_eq!(tree.status.code(), Some(4));
    assert_eq!(
        stdout(&tree),
        "",
        "a missing node was printed as if it existed"
    );
}

#[test]
fn a_held_node_whose_session_ends_fails_the_command() {
    let etcd = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let url = format!("etcd://{}?session_ttl=2s", etcd.endpoint());
    let mut hold = Running(
        Command::new(env!("CARGO_BIN_EXE_regctl"))
            .args([
                "--url",
                &url,
                "create",
                "--ephemeral",
                "--hold",
                "/held",
                "v",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = lines_of(&mut hold);
    wait_line(&lines, "/held");
    // The operator's node goes with its session: revoking the lease ends that session.
    let leases = conformance_tests::support::etcdctl(&etcd.endpoint(), &["lease", "list"]);
    let ids: Vec<&str> = leases
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(!ids.is_empty(), "no lease to revoke: {leases}");
    for id in ids {
        conformance_tests::support::etcdctl(&etcd.endpoint(), &["lease", "revoke", id]);
    }
    assert_eq!(exit_code_within_10s(&mut hold, "hold"), Some(3));
    let mut said = String::new();
    std::io::Read::read_to_string(&mut hold.stderr.take().unwrap(), &mut said).unwrap();
    assert!(said.contains("the node is gone with it"), "{said}");
}

#[test]
fn a_mirror_stopped_out_of_sync_says_so_and_fails() {
    let etcd = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let to = format!("etcd://{}", etcd.endpoint());
    assert!(regctl(&["--url", &to, "put", "/soa/config/a", "1"])
        .status
        .success());
    // Without --prune, a source lacking the path is refused before it starts: the first sync
    // once the path appears there would delete what only the target has.
    let refused = regctl(&["mirror", "--from", "mem://", "--to", &to, "/soa/config"]);
    assert_eq!(refused.status.code(), Some(5), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("/soa/config/a"),
        "{refused:?}"
    );
    // With it, a source without the path: the mirror refuses to empty the target and keeps
    // retrying.
    let mut mirror = Running(
        Command::new(env!("CARGO_BIN_EXE_regctl"))
            .args([
                "mirror",
                "--from",
                "mem://",
                "--to",
                &to,
                "/soa/config",
                "--prune",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = lines_of(&mut mirror);
    wait_line(&lines, "retrying");
    // SIGTERM, as systemd or `timeout` sends: the mirror still stops and reports.
    let _ = Command::new("kill")
        .args(["-TERM", &mirror.id().to_string()])
        .status();
    let seen = wait_line(&lines, "mirror stopped");
    assert!(
        seen.last().is_some_and(|l| l.contains("out of sync")),
        "{seen:?}"
    );
    assert_eq!(exit_code_within_10s(&mut mirror, "mirror"), Some(3));
    assert_eq!(
        stdout(&regctl(&["--url", &to, "get", "/soa/config/a"])).trim(),
        "1"
    );
}

#[test]
fn put_without_a_value_reads_any_bytes_from_standard_input() {
    use std::io::Write as _;
    let put = |input: &[u8]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_regctl"))
            .args(["--url", "mem://", "--output", "json", "put", "/bin"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        // A writer that outlives a refusal would block on a full pipe: ignore its error.
        let input = input.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().unwrap();
        let _ = writer.join();
        out
    };
    let out = put(&[0xff, 0x00, b'\n']);
    assert!(out.status.success(), "{out:?}");
    let written: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(written["value_base64"], "/wAK", "{written}");
    // Bounded: past the limit is refused as bad input, not read on and on.
    let out = put(&vec![b'x'; registry::MAX_VALUE_LEN + 4096]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn copy_and_mirror_refuse_a_registry_written_from_itself() {
    // One process's named store is one registry: a mirror into itself would rewrite its own
    // writes, and one into a tree inside its source would copy its copies without end.
    for (from, to, root) in [
        ("mem://one", "mem://one", "/soa"),
        ("etcd://127.0.0.1:1", "etcd://127.0.0.1:1/backup", "/"),
        ("etcd://127.0.0.1:1/a", "etcd://127.0.0.1:1", "/a"),
        (
            "zk://127.0.0.1:1,127.0.0.1:2/x",
            "zk://127.0.0.1:2/x/soa",
            "/soa",
        ),
    ] {
        for command in ["copy", "mirror"] {
            let out = regctl(&[command, "--from", from, "--to", to, root]);
            assert_eq!(out.status.code(), Some(2), "{command} {from} {to}: {out:?}");
            let said = String::from_utf8_lossy(&out.stderr);
            assert!(said.contains("may hold the same nodes"), "{said}");
        }
    }
    // Two stores, and disjoint trees of one registry, pass the check: the first copy finds
    // no source root (4), the second no server (3).
    for (from, to, code) in [
        ("mem://one", "mem://two", 4),
        ("etcd://127.0.0.1:1/a", "etcd://127.0.0.1:1/b", 3),
    ] {
        let out = regctl(&["copy", "--from", from, "--to", to, "/soa"]);
        assert_eq!(out.status.code(), Some(code), "{from} {to}: {out:?}");
    }
}

#[test]
fn an_ephemeral_create_must_hold_its_node() {
    // Without --hold the node would be gone by the time the command reported it.
    let out = regctl(&["--url", "mem://", "create", "/e", "--ephemeral"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--hold"),
        "{out:?}"
    );
}

#[test]
fn missing_and_unreachable_exit_differently() {
    // `get || create` must not create during an outage.
    let missing = regctl(&["--url", "mem://", "get", "/nope"]);
    assert_eq!(missing.status.code(), Some(4), "{missing:?}");
    let unreachable = regctl(&["--url", "etcd://127.0.0.1:1", "get", "/nope"]);
    assert_eq!(unreachable.status.code(), Some(3), "{unreachable:?}");
    let out = regctl(&["diff", "--from", "mem://", "--to", "mem://", "/nope"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "a root neither side has: {out:?}"
    );
}

/// Two namespaces of one etcd, distinct trees (`--from`, `--to` URLs), the first holding
/// `/soa/a` = `1`.
fn two_namespaces() -> (EtcdServer, String, String) {
    let etcd = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let (from, to) = (
        format!("etcd://{}/src", etcd.endpoint()),
        format!("etcd://{}/dst", etcd.endpoint()),
    );
    assert!(regctl(&["--url", &from, "put", "/soa/a", "1"])
        .status
        .success());
    (etcd, from, to)
}

#[test]
fn a_mirror_that_would_delete_what_only_the_target_has_needs_prune() {
    // The target's tree has a node of its own.
    let (_etcd, from, to) = two_namespaces();
    assert!(regctl(&["--url", &to, "put", "/soa/b", "2"])
        .status
        .success());
    // Swapped URLs look just like this: refused, nothing deleted.
    let refused = regctl(&["mirror", "--from", &from, "--to", &to, "/soa"]);
    assert_eq!(refused.status.code(), Some(5), "{refused:?}");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("/soa/b") && said.contains("--prune"),
        "{said}"
    );
    assert_eq!(
        stdout(&regctl(&["--url", &to, "get", "/soa/b"])).trim(),
        "2"
    );

    let mut mirror = Running(
        Command::new(env!("CARGO_BIN_EXE_regctl"))
            .args(["mirror", "--from", &from, "--to", &to, "/soa", "--prune"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = lines_of(&mut mirror);
    wait_line(&lines, "synced");
    let _ = Command::new("kill")
        .args(["-TERM", &mirror.id().to_string()])
        .status();
    assert_eq!(exit_code_within_10s(&mut mirror, "mirror"), Some(0));
    assert_eq!(
        regctl(&["--url", &to, "get", "/soa/b"]).status.code(),
        Some(4)
    );
    assert_eq!(
        stdout(&regctl(&["--url", &to, "get", "/soa/a"])).trim(),
        "1"
    );
}

#[test]
fn a_mirror_stopped_with_a_held_path_fails_with_differences() {
    // The target holds the source's path as a live session's ephemeral node, which the
    // mirror leaves alone.
    let (_etcd, from, to) = two_namespaces();
    let mut hold = Running(
        Command::new(env!("CARGO_BIN_EXE_regctl"))
            .args([
                "--url",
                &to,
                "create",
                "--ephemeral",
                "--hold",
                "/soa/a",
                "e",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let held = lines_of(&mut hold);
    wait_line(&held, "/soa/a");

    let mut mirror = Running(
        Command::new(env!("CARGO_BIN_EXE_regctl"))
            .args(["mirror", "--from", &from, "--to", &to, "/soa"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = lines_of(&mut mirror);
    let synced = wait_line(&lines, "synced");
    assert!(
        synced.last().is_some_and(|l| l.contains("1 held")),
        "{synced:?}"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &mirror.id().to_string()])
        .status();
    let seen = wait_line(&lines, "mirror stopped");
    assert!(
        seen.last()
            .is_some_and(|l| l.contains("in sync") && l.contains("1 held")),
        "{seen:?}"
    );
    // Not a finished copy: the target's /soa/a is still the session's value.
    assert_eq!(exit_code_within_10s(&mut mirror, "mirror"), Some(1));
    let mut said = String::new();
    std::io::Read::read_to_string(&mut mirror.stderr.take().unwrap(), &mut said).unwrap();
    assert!(said.contains("1 held"), "{said}");
    assert_eq!(
        stdout(&regctl(&["--url", &to, "get", "/soa/a"])).trim(),
        "e"
    );
}
