//! Prints the backend-by-case table of the last conformance run and writes `summary.json`
//! and `junit.xml` next to the results (see `conformance_tests::report`).

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(conformance_tests::report::results_dir);
    match conformance_tests::report::summarize(&dir) {
        Ok(table) if table.lines().count() > 1 => {
            println!("Conformance results ({}):\n{table}", dir.display());
        }
        Ok(_) => println!("No conformance results under {}", dir.display()),
        Err(e) => {
            eprintln!(
                "cannot write the conformance summary in {}: {e}",
                dir.display()
            );
            std::process::exit(1);
        }
    }
}
