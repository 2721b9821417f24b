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
