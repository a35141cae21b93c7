//! `pgprov`: parses the command line and hands it to the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli: pgprov::cli::Cli = labcore::exit::parse_args();
    labcore::exit::run("pgprov", || pgprov::cli::run(cli))
}
