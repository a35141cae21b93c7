//! `tunnel`: parses the command line and hands it to the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli: tunnel::cli::Cli = labcore::exit::parse_args();
    labcore::exit::run("tunnel", || tunnel::cli::run(cli))
}
