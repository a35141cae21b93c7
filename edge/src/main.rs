//! `edge`: parses the command line and hands it to the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli: edge::cli::Cli = labcore::exit::parse_args();
    labcore::exit::run("edge", || edge::cli::run(cli))
}
