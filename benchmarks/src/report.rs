//! Result rows, the printed table and the JSON document.

use serde_json::{json, Value};

/// What a row must reach, stated in the issue.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// None stated.
    None,
    /// ours >= factor * raw.
    RatioAtLeast(f64),
    /// ours <= raw + delta (same unit).
    AtMostRawPlus(f64),
    /// ours >= value.
    AtLeast(f64),
    /// ours <= value.
    AtMost(f64),
}

impl Target {
    /// How the target reads in the table.
    pub fn describe(self, unit: &str) -> String {
        match self {
            Target::None => String::new(),
            Target::RatioAtLeast(f) => format!(">= {f}x raw"),
            Target::AtMostRawPlus(d) => format!("<= raw + {} {unit}", fmt_num(d)),
            Target::AtLeast(v) => format!(">= {} {unit}", fmt_num(v)),
            Target::AtMost(v) => format!("<= {} {unit}", fmt_num(v)),
        }
    }

    /// Whether `ours` (against `raw`) meets it; `None` without a target or a value.
    pub fn met(self, raw: Option<f64>, ours: Option<f64>) -> Option<bool> {
        let ours = ours?;
        match self {
            Target::None => None,
            Target::RatioAtLeast(f) => raw.map(|r| ours >= f * r),
            Target::AtMostRawPlus(d) => raw.map(|r| ours <= r + d),
            Target::AtLeast(v) => Some(ours >= v),
            Target::AtMost(v) => Some(ours <= v),
        }
    }
}

/// One line of the result table: a scenario's metric on one backend.
#[derive(Clone, Debug)]
pub struct Row {
    /// What was measured, e.g. `register latency p50`.
    pub scenario: String,
    /// `etcd` or `zookeeper`.
    pub backend: &'static str,
    /// The raw client's value (median over repetitions, or the percentile over samples).
    pub raw: Option<f64>,
    /// Our layer's value.
    pub ours: Option<f64>,
    /// Unit of both values.
    pub unit: &'static str,
    /// What ours must reach.
    pub target: Target,
    /// How it was measured, when the scenario name does not say it all.
    pub note: String,
    /// For rows measured in back-to-back slices (throughput): the median over rounds of
    /// ours / raw within each round. When set it is the row's ratio and what a ratio target
    /// is judged by, as it cancels the server's slow phases that ours / raw of the medians
    /// does not (see `scenarios::throughput`).
    pub paired_ratio: Option<f64>,
}

impl Row {
    /// The paired ratio if measured, else ours / raw.
    pub fn ratio(&self) -> Option<f64> {
        if self.paired_ratio.is_some() {
            return self.paired_ratio;
        }
        match (self.raw, self.ours) {
            (Some(r), Some(o)) if r != 0.0 => Some(o / r),
            _ => None,
        }
    }

    /// Whether the target is met.
    pub fn met(&self) -> Option<bool> {
        match (self.target, self.paired_ratio) {
            (Target::RatioAtLeast(factor), Some(ratio)) => Some(ratio >= factor),
            _ => self.target.met(self.raw, self.ours),
        }
    }

    fn json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "backend": self.backend,
            "raw": self.raw,
            "ours": self.ours,
            "ratio": self.ratio(),
            "paired_ratio": self.paired_ratio,
            "unit": self.unit,
            "target": self.target.describe(self.unit),
            "met": self.met(),
            "note": self.note,
        })
    }
}

/// A number with as many digits as are meaningful; millions in `M`, so rates on either side
/// of a target such as 10 M/s read alike.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(fmt_num).unwrap_or_else(|| "-".into())
}

/// The rows as a Markdown table (also what is printed).
pub fn table(rows: &[Row]) -> String {
    let header = [
        "scenario",
        "backend",
        "raw median",
        "ours median",
        "ratio",
        "unit",
        "target",
        "met?",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.scenario.clone(),
                r.backend.to_owned(),
                opt(r.raw),
                opt(r.ours),
                r.ratio().map(|x| format!("{x:.2}")).unwrap_or("-".into()),
                r.unit.to_owned(),
                r.target.describe(r.unit),
                match r.met() {
                    Some(true) => "yes".into(),
                    Some(false) => "NO".into(),
                    None => "".into(),
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cols: Vec<&str>| {
        let padded: Vec<String> = cols
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(header.to_vec());
    out.push_str(&line(widths.iter().map(|_| "---").collect()).replace(' ', "-"));
    for row in &cells {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// The notes of rows that have one, as a list under the table (once per scenario, without
/// its percentile suffix).
pub fn notes(rows: &[Row]) -> String {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = String::new();
    for r in rows.iter().filter(|r| !r.note.is_empty()) {
        let base = r
            .scenario
            .trim_end_matches(" p50")
            .trim_end_matches(" p99")
            .to_owned();
        if seen.insert((base.clone(), r.backend)) {
            out.push_str(&format!("- {base} ({}): {}\n", r.backend, r.note));
        }
    }
    out
}

/// The whole run as JSON, for comparing runs.
pub fn document(rows: &[Row], settings: Value) -> Value {
    json!({
        "tool": "registry-bench",
        "version": env!("CARGO_PKG_VERSION"),
        "machine": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
        },
        "settings": settings,
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            Target::RatioAtLeast(0.95).met(Some(100.0), Some(96.0)),
            Some(true)
        );
        assert_eq!(
            Target::AtMostRawPlus(20.0).met(Some(100.0), Some(121.0)),
            Some(false)
        );
        assert_eq!(Target::AtLeast(1e7).met(None, Some(2e7)), Some(true));
        assert_eq!(Target::None.met(Some(1.0), Some(1.0)), None);
    }

    #[test]
    fn numbers_read_alike_on_both_sides_of_a_million() {
        assert_eq!(fmt_num(8_552_425.0), "8.55M");
        assert_eq!(fmt_num(13_860_000.0), "13.86M");
        assert_eq!(fmt_num(999_999.0), "999999");
        assert_eq!(fmt_num(58.44), "58.4");
        assert_eq!(fmt_num(1.234), "1.23");
    }

    #[test]
    fn table_is_markdown() {
        let rows = [Row {
            scenario: "get latency p50".into(),
            backend: "etcd",
            raw: Some(100.0),
            ours: Some(110.0),
            unit: "us",
            target: Target::AtMostRawPlus(20.0),
            note: String::new(),
            paired_ratio: None,
        }];
        let t = table(&rows);
        assert!(t.lines().nth(1).is_some_and(|l| l.starts_with("|---")));
        assert!(t.contains("| yes "));
    }

    #[test]
    fn a_paired_ratio_is_the_ratio_a_target_is_judged_by() {
        let mut row = Row {
            scenario: "write throughput, 64 writers".into(),
            backend: "zookeeper",
            raw: Some(100.0),
            ours: Some(90.0),
            unit: "ops/s",
            target: Target::RatioAtLeast(0.95),
            note: String::new(),
            paired_ratio: None,
        };
        assert_eq!(row.met(), Some(false));
        row.paired_ratio = Some(0.97);
        assert_eq!(row.ratio(), Some(0.97));
        assert_eq!(row.met(), Some(true));
        row.paired_ratio = Some(0.94);
        assert_eq!(row.met(), Some(false));
    }
}
