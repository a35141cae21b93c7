//! `backupd`: parses the command line and hands it to the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli: backupd::cli::Cli = labcore::exit::parse_args();
    labcore::exit::run("backupd", || backupd::cli::run(cli))
}
