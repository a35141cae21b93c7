//! `cargo xtask`: labkit's project automation.
//!
//! - `cargo xtask man [--out DIR]` writes a man page for every tool and every subcommand
//!   (default `man/`, committed; a test fails when it is stale).
//! - `cargo xtask completions [--out DIR]` writes bash, zsh and fish completions for every
//!   tool (default `target/completions`; the install script and the Debian package use them).
//! - `cargo xtask quickstart [--bin-dir DIR]` brings the reference lab up on this machine until
//!   Ctrl-C (`scripts/quickstart` builds the tools and xtask in release, once, and runs
//!   `target/release/xtask quickstart`).
//! - `cargo xtask layers` prints each crate's module cycles and exits 1 if there is one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xtask::quickstart;

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
    /// Bring the reference lab up on this machine, on loopback ports, until Ctrl-C.
    Quickstart {
        /// Folder with the tools' binaries
        #[arg(long, default_value = "target/release")]
        bin_dir: PathBuf,
    },
    /// Find module cycles in every crate (modules must form layers).
    Layers,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let root = xtask::workspace_root();
    if let Task::Quickstart { bin_dir } = cli.command {
        return quickstart(&root, &root.join(bin_dir));
    }
    if let Task::Layers = cli.command {
        return layers(&root);
    }
    let result = match cli.command {
        Task::Man { out } => xtask::write_man_pages(&root.join(out)),
        Task::Completions { out } => xtask::write_completions(&root.join(out)),
        Task::Quickstart { .. } | Task::Layers => unreachable!("handled above"),
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

fn layers(root: &Path) -> ExitCode {
    let mut clean = true;
    for krate in xtask::CRATES {
        let graph = match xtask::layers::graph(&root.join(krate).join("src")) {
            Ok(graph) => graph,
            Err(err) => {
                eprintln!("cargo xtask: error: reading {krate}/src: {err}");
                return ExitCode::from(74);
            }
        };
        for cycle in xtask::layers::cycles(&graph) {
            clean = false;
            println!("{krate}: cycle among {}", cycle.join(", "));
            print!("{}", xtask::layers::describe(&graph, &cycle));
        }
    }
    if clean {
        println!("no module cycles");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn quickstart(root: &Path, bin_dir: &Path) -> ExitCode {
    let mut stop = match quickstart::StopSignals::install() {
        Ok(stop) => stop,
        Err(err) => {
            eprintln!("quickstart: error: {err}");
            return ExitCode::from(71);
        }
    };
    let mut stderr = std::io::stderr();
    let lab = match quickstart::start(root, bin_dir, &mut stderr) {
        Ok(lab) => lab,
        Err(err) => {
            eprintln!("quickstart: error: {err}");
            return ExitCode::from(70);
        }
    };
    println!("{}", quickstart::summary(&lab));
    let _ = std::io::stdout().flush();
    let signal = stop.wait();
    eprintln!("quickstart: {signal}: stopping the lab");
    lab.stop();
    eprintln!("quickstart: stopped; nothing is left running");
    ExitCode::SUCCESS
}
