//! Machine-readable results: every case run appends one JSON line to
//! `<results dir>/<backend>.jsonl`; the `conformance-report` binary turns a run's lines into a
//! printed backend-by-case table, `summary.json` and `junit.xml`.
//!
//! The results dir is `$CONFORMANCE_RESULTS_DIR`, else `$CARGO_TARGET_DIR/conformance`, else
//! the `conformance` folder of the target dir the test binary was built in.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

/// How a case ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every assertion held.
    Passed,
    /// Skipped for a declared missing capability.
    Skipped(String),
    /// An assertion failed, or the case hung.
    Failed(String),
}

/// Where results of this run go.
pub fn results_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CONFORMANCE_RESULTS_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir).join("conformance");
    }
    // The target dir is the ancestor of this binary where cargo put its CACHEDIR.TAG.
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.ancestors()
                .find(|dir| dir.join("CACHEDIR.TAG").is_file())
                .map(Path::to_path_buf)
        })
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("conformance")
}

/// Appends one case's result. Failing to write is reported on stderr, never a test failure.
pub fn record(backend: &str, case: &str, verdict: &Verdict, took: Duration) {
    let (outcome, detail) = match verdict {
        Verdict::Passed => ("passed", None),
        Verdict::Skipped(why) => ("skipped", Some(why.as_str())),
        Verdict::Failed(why) => ("failed", Some(why.as_str())),
    };
    let line = json!({
        "backend": backend,
        "case": case,
        "outcome": outcome,
        "detail": detail,
        "millis": took.as_millis() as u64,
    });
    let dir = results_dir();
    let written = fs::create_dir_all(&dir).and_then(|_| {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{backend}.jsonl")))?;
        // One write per line: appends of this size do not interleave.
        file.write_all(format!("{line}\n").as_bytes())
    });
    if let Err(e) = written {
        eprintln!(
            "conformance: cannot record {backend}::{case} in {}: {e}",
            dir.display()
        );
    }
}

/// One recorded result: outcome (`passed`, `failed`, `skipped`), its detail, and duration.
pub type CaseResult = (String, Option<String>, u64);

/// Recorded results: backend -> case -> result.
pub type Results = BTreeMap<String, BTreeMap<String, CaseResult>>;

/// Every recorded result in `dir`. A case run twice keeps its last result.
pub fn load(dir: &Path) -> Results {
    let mut out = Results::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "jsonl") {
            continue;
        }
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let (Some(backend), Some(case), Some(outcome)) = (
                v["backend"].as_str(),
                v["case"].as_str(),
                v["outcome"].as_str(),
            ) else {
                continue;
            };
            out.entry(backend.to_owned()).or_default().insert(
                case.to_owned(),
                (
                    outcome.to_owned(),
                    v["detail"].as_str().map(str::to_owned),
                    v["millis"].as_u64().unwrap_or(0),
                ),
            );
        }
    }
    out
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Writes `summary.json` and `junit.xml` into `dir` and returns the printed table.
pub fn summarize(dir: &Path) -> std::io::Result<String> {
    let results = load(dir);
    let backends: Vec<&String> = results.keys().collect();
    let mut cases: Vec<&String> = results.values().flat_map(|m| m.keys()).collect();
    cases.sort();
    cases.dedup();
    let width = cases.iter().map(|c| c.len()).max().unwrap_or(4).max(4);
    let mut table = format!("{:width$}", "case");
    for b in &backends {
        table.push_str(&format!("  {b:>9}"));
    }
    table.push('\n');
    for case in &cases {
        table.push_str(&format!("{case:width$}"));
        for b in &backends {
            let cell = match results[*b].get(*case).map(|r| r.0.as_str()) {
                Some("passed") => "ok",
                Some("skipped") => "skipped",
                Some("failed") => "FAILED",
                _ => "-",
            };
            table.push_str(&format!("  {cell:>9}"));
        }
        table.push('\n');
    }
    let mut summary = serde_json::Map::new();
    let mut junit = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"conformance\">\n",
    );
    for (backend, runs) in &results {
        let count = |o: &str| runs.values().filter(|r| r.0 == o).count();
        let (passed, failed, skipped) = (count("passed"), count("failed"), count("skipped"));
        table.push_str(&format!(
            "{backend}: {passed} passed, {failed} failed, {skipped} skipped\n"
        ));
        summary.insert(backend.clone(), json!({"passed": passed, "failed": failed, "skipped": skipped, "cases": runs.iter().map(|(c, r)| (c.clone(), json!({"outcome": r.0, "detail": r.1, "millis": r.2}))).collect::<serde_json::Map<_, _>>()}));
        junit.push_str(&format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failed}\" skipped=\"{skipped}\">\n",
            xml_escape(backend),
            runs.len()
        ));
        for (case, (outcome, detail, millis)) in runs {
            junit.push_str(&format!(
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
                xml_escape(backend),
                xml_escape(case),
                *millis as f64 / 1000.0
            ));
            match outcome.as_str() {
                "failed" => junit.push_str(&format!(
                    ">\n      <failure message=\"{}\"/>\n    </testcase>\n",
                    xml_escape(detail.as_deref().unwrap_or(""))
                )),
                "skipped" => junit.push_str(&format!(
                    ">\n      <skipped message=\"{}\"/>\n    </testcase>\n",
                    xml_escape(detail.as_deref().unwrap_or(""))
                )),
                _ => junit.push_str("/>\n"),
            }
        }
        junit.push_str("  </testsuite>\n");
    }
    junit.push_str("</testsuites>\n");
    let all = |o: &str| {
        results
            .values()
            .flat_map(|r| r.values())
            .filter(|r| r.0 == o)
            .count()
    };
    // Why each skip happened, one line per backend and reason (the capability it lacks).
    let mut skips: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    for (backend, runs) in &results {
        for (case, (outcome, detail, _)) in runs {
            if outcome == "skipped" {
                let reason = detail.as_deref().unwrap_or("no reason given");
                skips.entry((backend, reason)).or_default().push(case);
            }
        }
    }
    for ((backend, reason), cases) in &skips {
        table.push_str(&format!(
            "skipped on {backend} ({reason}): {}\n",
            cases.join(", ")
        ));
    }
    table.push_str(&format!(
        "conformance: {} passed, {} failed, {} skipped\n",
        all("passed"),
        all("failed"),
        all("skipped")
    ));
    fs::create_dir_all(dir)?;
    fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&Value::Object(summary))?,
    )?;
    fs::write(dir.join("junit.xml"), junit)?;
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_junit_show_each_backend_and_case() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("CONFORMANCE_RESULTS_DIR", dir.path());
        record(
            "alpha",
            "case_a",
            &Verdict::Passed,
            Duration::from_millis(5),
        );
        record(
            "alpha",
            "case_b",
            &Verdict::Failed("boom <x>".into()),
            Duration::from_millis(7),
        );
        record(
            "beta",
            "case_a",
            &Verdict::Skipped("no faults".into()),
            Duration::ZERO,
        );
        std::env::remove_var("CONFORMANCE_RESULTS_DIR");
        let table = summarize(dir.path()).unwrap();
        assert!(
            table.contains("alpha: 1 passed, 1 failed, 0 skipped"),
            "{table}"
        );
        assert!(
            table.contains("beta: 0 passed, 0 failed, 1 skipped"),
            "{table}"
        );
        assert!(
            table.contains("skipped on beta (no faults): case_a"),
            "{table}"
        );
        assert!(
            table.lines().any(|l| l.starts_with("case_b")
                && l.contains("FAILED")
                && l.trim_end().ends_with('-')),
            "{table}"
        );
        let junit = std::fs::read_to_string(dir.path().join("junit.xml")).unwrap();
        assert!(
            junit.contains("<failure message=\"boom &lt;x&gt;\"/>"),
            "{junit}"
        );
        let summary: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("summary.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(summary["alpha"]["failed"], 1);
    }
}
