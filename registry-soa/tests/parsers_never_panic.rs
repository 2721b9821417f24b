//! Property tests: every parser answers Ok or a positioned Err for any input, never panics.

use proptest::prelude::*;
use registry_soa::config::parse_config;
use registry_soa::routes::{parse_cookie_rules, parse_routes};

/// Inputs built from the grammar's own pieces reach deep into the parser.
fn grammar_soup() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "method",
        "userId",
        "cookie_x",
        "match",
        "otherwise",
        "=>",
        ";",
        ",",
        "~",
        "'a'",
        "\"b\"",
        "r'l.*'",
        "r'('",
        "5",
        "-3",
        "1..9",
        "9..1",
        "ip'10.0.0.1/8'",
        "ip'1.2.3.4:80'",
        "ip'300.1.1.1'",
        "%'1024n+2..4'",
        "%'0n+1'",
        "v'1.0.0'",
        "c'k#v'",
        "\n",
        " ",
        "'",
        "%",
        "timeout/800ms",
        "weight/1.2.3.4/5",
        "loadBalance/x",
        "/",
        ":",
    ]);
    prop::collection::vec(pieces, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn routes_parser_total(text in any::<String>()) {
        if let Err(e) = parse_routes(&text) {
            prop_assert!(e.line >= 1 && e.column >= 1);
        }
        let _ = parse_cookie_rules(&text);
        let _ = parse_config(&text);
    }

    #[test]
    fn grammar_soup_is_total(text in grammar_soup()) {
        match parse_routes(&text) {
            Ok(routes) => prop_assert!(routes.iter().all(|r| !r.targets.is_empty())),
            Err(e) => prop_assert!(e.line >= 1 && e.column >= 1 && !e.message.is_empty()),
        }
        let _ = parse_cookie_rules(&text);
        let (_, errors) = parse_config(&text);
        prop_assert!(errors.iter().all(|e| e.line >= 1));
    }
}

/// Regression corpus (tests/corpus/routes.txt): each line parses or fails, as recorded.
#[test]
fn routes_corpus() {
    let mut checked = 0;
    for (n, line) in include_str!("corpus/routes.txt").lines().enumerate() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (expect, raw) = line.split_once('\t').unwrap_or((line, ""));
        let text = raw.replace("\\n", "\n");
        let got = parse_routes(&text);
        match expect {
            "ok" => assert!(got.is_ok(), "line {}: {text:?} refused: {got:?}", n + 1),
            "err" => {
                let e = got.expect_err(&format!("line {}: {text:?} accepted", n + 1));
                assert!(
                    e.line >= 1 && e.column >= 1,
                    "line {}: unpositioned {e:?}",
                    n + 1
                );
            }
            other => panic!("line {}: expectation {other:?}", n + 1),
        }
        checked += 1;
    }
    assert!(checked >= 15, "corpus too small: {checked}");
}

/// Huge and deeply repetitive inputs finish quickly (no quadratic blow-up, no unbounded memory).
#[test]
fn huge_inputs_finish_quickly() {
    let started = std::time::Instant::now();
    let big_rule = format!(
        "method match {} => ip'1.1.1.1'",
        vec!["'a'"; 20_000].join(",")
    );
    let many_lines = "method match 'x' => ip'1.1.1.1'\n".repeat(20_000);
    let garbage = "=>".repeat(200_000);
    for text in [&big_rule, &many_lines, &garbage] {
        let _ = parse_routes(text);
        let _ = parse_cookie_rules(text);
        let _ = parse_config(text);
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}
