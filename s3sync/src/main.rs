//! The `s3sync` binary: parses the command line and runs it (see the library for the rest).

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli: s3sync::cli::Cli = labcore::exit::parse_args();
    labcore::exit::run("s3sync", || s3sync::run(cli))
}
