//! `edge`: parses the command line and hands it to the library.

use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: each proxied request allocates and frees buffers and
/// boxed futures of several KiB, which glibc serves from its shared bins (with consolidation),
/// at about 8% of the edge's CPU per request; mimalloc keeps free lists per thread and size.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli: edge::cli::Cli = labcore::exit::parse_args();
    labcore::exit::run("edge", || edge::cli::run(cli))
}
