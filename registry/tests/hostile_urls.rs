//! Hostile input to URL parsing: property tests and a corpus (tests/corpus/urls.txt) kept as
//! regression tests. Every input parses or is refused with `InvalidArgument`; a password never
//! appears in an error, in `Display` or in `Debug`.

use proptest::prelude::*;
use registry::{Error, RegistryUrl};

const SECRET: &str = "pw-SECRET-42";

fn check(input: &str) -> Result<RegistryUrl, String> {
    match RegistryUrl::parse(input) {
        Ok(url) => {
            let shown = format!("{url} {url:?}");
            assert!(!shown.contains(SECRET), "password printed: {shown}");
            if url.credentials.is_none() {
                // Printing gives a URL that parses back to the same thing.
                assert_eq!(
                    RegistryUrl::parse(&url.to_string()).ok(),
                    Some(url.clone()),
                    "{input:?}"
                );
            }
            Ok(url)
        }
        Err(Error::InvalidArgument(message)) => {
            assert!(!message.contains(SECRET), "password in an error: {message}");
            assert!(
                message.len() < 4096 + input.len(),
                "error message grows too much"
            );
            Err(message)
        }
        Err(other) => panic!("{input:?}: not InvalidArgument: {other:?}"),
    }
}

#[test]
fn corpus_of_urls() {
    let mut checked = 0;
    for (n, line) in include_str!("corpus/urls.txt").lines().enumerate() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (expect, input) = line.split_once('\t').unwrap_or((line, ""));
        let got = check(input);
        match expect {
            "ok" => assert!(got.is_ok(), "line {}: {input:?} refused: {got:?}", n + 1),
            "err" => assert!(got.is_err(), "line {}: {input:?} accepted", n + 1),
            other => panic!("line {}: expectation {other:?}", n + 1),
        }
        checked += 1;
    }
    assert!(checked >= 20, "corpus too small: {checked}");
}

fn url_soup() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "etcd://",
        "etcds://",
        "zk://",
        "mem://",
        "h",
        "127.0.0.1",
        ":2379",
        ":0",
        ":99999",
        ",",
        "@",
        "user:",
        "[",
        "]",
        "::1",
        "/",
        "/ns",
        "..",
        "?",
        "&",
        "=",
        "ttl",
        "timeout",
        "session_timeout",
        "ca",
        "cert",
        "key",
        "5s",
        "500ms",
        "1.5m",
        "-1s",
        "%",
        "#",
        " ",
        "\u{0}",
        "é",
    ]);
    prop::collection::vec(pieces, 0..30).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn any_string_parses_or_is_refused(input in any::<String>()) {
        let _ = check(&input);
    }

    #[test]
    fn grammar_soup_parses_or_is_refused(input in url_soup()) {
        let _ = check(&input);
    }

    #[test]
    fn a_password_never_leaks_whatever_follows(
        scheme in prop::sample::select(vec!["etcd://", "etcds://", "zk://", "mem://", "http://", ""]),
        rest in url_soup(),
    ) {
        let _ = check(&format!("{scheme}user:{SECRET}@{rest}"));
    }

    #[test]
    fn a_password_that_lost_its_host_never_leaks(
        scheme in prop::sample::select(vec!["etcd://", "etcds://", "zk://", "mem://"]),
        before in prop::sample::select(vec!["", "h:1,", "[::1]:2,"]),
        rest in url_soup(),
    ) {
        // `user:password` with the `@host` forgotten reads as host:port; a password may
        // hold what ends a host list or a path.
        for secret in [
            SECRET.to_owned(),
            format!("a/{SECRET}"),
            format!("a,{SECRET}"),
            format!("a?{SECRET}"),
            format!("99999{SECRET}"),
        ] {
            let _ = check(&format!("{scheme}{before}user:{secret}{rest}"));
        }
    }
}
