//! Hostile input to the path parser: property tests over arbitrary and grammar-built strings,
//! and a corpus of interesting inputs kept as regression tests (tests/corpus/paths.txt).

use proptest::prelude::*;
use registry_core::{Error, NodePath, MAX_DEPTH, MAX_PATH_LEN};

/// Decodes the corpus escapes: `\n`, `\t`, `\0`, `\\` and `\u{hex}`.
fn unescape(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('0') => out.push('\0'),
            Some('\\') => out.push('\\'),
            Some('u') => {
                let hex: String = chars.by_ref().skip(1).take_while(|c| *c != '}').collect();
                let code = u32::from_str_radix(&hex, 16).expect("corpus: bad \\u{..}");
                out.push(char::from_u32(code).expect("corpus: not a char"));
            }
            other => panic!("corpus: unknown escape \\{other:?}"),
        }
    }
    out
}

/// Every property a parsed path or a refusal must have.
fn check(input: &str) -> Result<NodePath, String> {
    match NodePath::new(input) {
        Ok(path) => {
            assert_eq!(path.as_str(), input, "a parsed path must be the input");
            assert!(path.as_str().len() <= MAX_PATH_LEN);
            assert!(path.depth() <= MAX_DEPTH);
            assert_eq!(NodePath::new(path.as_str()).ok(), Some(path.clone()));
            if let Some(parent) = path.parent() {
                assert_eq!(parent.join(path.name()).ok(), Some(path.clone()));
            }
            Ok(path)
        }
        Err(Error::InvalidPath { path, reason }) => {
            // The error keeps a bounded excerpt, never the whole (possibly huge) input.
            assert!(
                path.len() <= 1024,
                "error holds {} bytes of input",
                path.len()
            );
            Err(reason.to_string())
        }
        Err(other) => panic!("{input:?}: not an InvalidPath error: {other:?}"),
    }
}

#[test]
fn corpus_of_paths() {
    let corpus = include_str!("corpus/paths.txt");
    let mut checked = 0;
    for (n, line) in corpus.lines().enumerate() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (expect, raw) = line.split_once('\t').unwrap_or((line, ""));
        let input = unescape(raw);
        let got = check(&input);
        match expect {
            "ok" => assert!(got.is_ok(), "line {}: {input:?} refused: {got:?}", n + 1),
            "err" => assert!(got.is_err(), "line {}: {input:?} accepted", n + 1),
            other => panic!("line {}: expectation {other:?}", n + 1),
        }
        checked += 1;
    }
    assert!(checked >= 20, "corpus too small: {checked}");
}

#[test]
fn huge_inputs_are_refused_quickly_with_a_bounded_error() {
    let started = std::time::Instant::now();
    for input in [
        format!("/{}", "a".repeat(10 << 20)),
        "/a".repeat(1 << 20),
        format!("/{}", "\u{0}".repeat(1 << 20)),
        "/".repeat(1 << 20),
    ] {
        assert!(check(&input).is_err());
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

fn path_soup() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "/",
        "//",
        "a",
        "soa",
        ".",
        "..",
        "zookeeper",
        ":",
        "-",
        "_",
        "\u{0}",
        "\n",
        "\u{7f}",
        "\u{9f}",
        "\u{e000}",
        "\u{fff0}",
        "\u{ffff}",
        "é",
        "你",
        "😀",
        "\u{202e}",
        " ",
        "%2F",
        "*",
    ]);
    prop::collection::vec(pieces, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn any_string_parses_or_is_refused_with_a_reason(input in any::<String>()) {
        let _ = check(&input);
    }

    #[test]
    fn grammar_soup_parses_or_is_refused_with_a_reason(input in path_soup()) {
        let _ = check(&input);
    }

    #[test]
    fn joined_names_stay_valid(names in prop::collection::vec("[a-z0-9.:_-]{1,12}", 1..10)) {
        let mut path = NodePath::root();
        for name in &names {
            match path.join(name) {
                Ok(next) => path = next,
                Err(Error::InvalidPath { .. }) => break,
                Err(other) => panic!("join {name:?}: {other:?}"),
            }
        }
        let _ = check(path.as_str());
    }
}
