//! The `provider`, `consumer` and `migration` binaries of the Dapeng-style demo (see
//! `src/bin/`), and what they share: logging to stderr, lines to stdout, exit codes.

use std::future::Future;
use std::io::Write;
use std::process::ExitCode;

/// Prints a line; a closed stdout (the reader went away) is not a reason to fail.
pub fn say(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Runs a binary's body with logs on stderr (`RUST_LOG`), printing its error as
/// `<name>: <error>` and exiting 1 on failure.
pub async fn main_with(name: &str, body: impl Future<Output = Result<(), String>>) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match body.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}
