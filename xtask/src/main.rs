//! `cargo xtask`: labkit's project automation.
//!
//! - `cargo xtask man [--out DIR]` writes a man page for every tool and every subcommand
//!   (default `man/`, committed; a test fails when it is stale).
//! - `cargo xtask completions [--out DIR]` writes bash, zsh and fish completions for every
//!   tool (default `target/completions`; the install script and the Debian package use them).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// labkit's project automation.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Generate the man pages.
    Man {
        /// Output folder
        #[arg(long, default_value = "man")]
        out: PathBuf,
    },
    /// Generate shell completions (bash, zsh, fish).
    Completions {
        /// Output folder
        #[arg(long, default_value = "target/completions")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let root = xtask::workspace_root();
    let result = match cli.command {
        Task::Man { out } => xtask::write_man_pages(&root.join(out)),
        Task::Completions { out } => xtask::write_completions(&root.join(out)),
    };
    match result {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("cargo xtask: error: {err}");
            ExitCode::from(74)
        }
    }
}
