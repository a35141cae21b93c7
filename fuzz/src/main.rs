//! fuzz: runs labkit's fuzz targets (see [`targets`]) inside an empty root ([`sandbox`]).
//!
//! `fuzz` lists the targets. `fuzz TARGET` replays the target's corpus (`fuzz/corpus/TARGET/`)
//! and then runs blind mutations of it ([`mutate`]) from a fixed seed for a time or a count:
//! the suite's short run. Built by `cargo afl build --features afl`, `fuzz TARGET --afl` is
//! afl's persistent-mode target instead (scripts/fuzz runs that). A crash prints the input in
//! hex and exits 70; the last line of a clean run says how many executions were done.

mod mutate;
mod sandbox;
mod targets;

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::targets::{TARGETS, Target};

const USAGE: &str =
    "usage: fuzz [TARGET [--corpus DIR] [--dict FILE] [--seconds N] [--runs N] [--seed N] [--afl]]";

/// Longest mutated input.
const MAX_LEN: usize = 64 * 1024;

struct Options {
    target: &'static Target,
    corpus: PathBuf,
    dict: PathBuf,
    seconds: f64,
    runs: u64,
    seed: u64,
    afl: bool,
}

fn usage(message: &str) -> ExitCode {
    eprintln!("fuzz: {message}\n{USAGE}");
    ExitCode::from(64)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(name) = args.first() else {
        for target in TARGETS {
            println!("{:<20} {}", target.name, target.about);
        }
        return ExitCode::SUCCESS;
    };
    let Some(target) = targets::find(name) else {
        return usage(&format!("no target {name:?} (run fuzz alone for the list)"));
    };
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut options = Options {
        target,
        corpus: here.join("corpus").join(target.name),
        dict: here.join("dict").join(format!("{}.dict", target.name)),
        seconds: 3.0,
        runs: u64::MAX,
        seed: 1,
        afl: false,
    };
    let mut rest = args[1..].iter();
    while let Some(flag) = rest.next() {
        if flag == "--afl" {
            options.afl = true;
            continue;
        }
        let Some(value) = rest.next() else {
            return usage(&format!("{flag} needs a value"));
        };
        let bad = || usage(&format!("{flag} {value:?} is not a number"));
        match flag.as_str() {
            "--corpus" => options.corpus = value.into(),
            "--dict" => options.dict = value.into(),
            "--seconds" => match value.parse() {
                Ok(n) if n >= 0.0 => options.seconds = n,
                _ => return bad(),
            },
            "--runs" => match value.parse() {
                Ok(n) => options.runs = n,
                Err(_) => return bad(),
            },
            "--seed" => match value.parse() {
                Ok(n) => options.seed = n,
                Err(_) => return bad(),
            },
            _ => return usage(&format!("unknown flag {flag}")),
        }
    }
    if options.afl {
        return afl(target);
    }
    replay_and_mutate(&options)
}

/// Enters the sandbox and lays out its root, or says why not (exit 69).
fn enter_sandbox() -> Result<(), ExitCode> {
    let made = sandbox::enter().and_then(|()| {
        targets::prepare_root().map_err(|e| format!("laying out the sandbox's root: {e}"))
    });
    made.map_err(|err| {
        eprintln!("fuzz: cannot make an empty root to fuzz in ({err}): run as root");
        ExitCode::from(69)
    })
}

#[cfg(feature = "afl")]
fn afl(target: &'static Target) -> ExitCode {
    if let Err(code) = enter_sandbox() {
        return code;
    }
    afl::fuzz(true, |data| (target.run)(data));
    ExitCode::SUCCESS
}

#[cfg(not(feature = "afl"))]
fn afl(_: &'static Target) -> ExitCode {
    usage("--afl needs a build by `cargo afl build --features afl` (scripts/fuzz does it)")
}

/// Reads every file of `dir`, sorted by name, so runs are repeatable.
fn read_corpus(dir: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.sort();
    paths
        .iter()
        .filter(|p| p.is_file())
        .map(std::fs::read)
        .collect()
}

/// Runs one input; on a panic prints it and gives the exit code.
fn run_one(target: &Target, input: &[u8], origin: &str) -> Result<(), ExitCode> {
    match panic::catch_unwind(AssertUnwindSafe(|| (target.run)(input))) {
        Ok(()) => Ok(()),
        Err(_) => {
            let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
            eprintln!(
                "fuzz: {}: CRASH on {origin} ({} bytes), input in hex:\n{hex}",
                target.name,
                input.len()
            );
            Err(ExitCode::from(70))
        }
    }
}

fn replay_and_mutate(options: &Options) -> ExitCode {
    let target = options.target;
    let corpus = match read_corpus(&options.corpus) {
        Ok(corpus) if !corpus.is_empty() => corpus,
        Ok(_) => {
            eprintln!("fuzz: corpus {} is empty", options.corpus.display());
            return ExitCode::from(66);
        }
        Err(err) => {
            eprintln!("fuzz: reading corpus {}: {err}", options.corpus.display());
            return ExitCode::from(66);
        }
    };
    let dict = match std::fs::read_to_string(&options.dict) {
        Ok(text) => mutate::parse_dict(&text),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(err) => {
            eprintln!("fuzz: reading dictionary {}: {err}", options.dict.display());
            return ExitCode::from(66);
        }
    };
    if let Err(code) = enter_sandbox() {
        return code;
    }
    let started = Instant::now();
    for (i, input) in corpus.iter().enumerate() {
        if let Err(code) = run_one(target, input, &format!("corpus file {i}")) {
            return code;
        }
    }
    let budget = Duration::from_secs_f64(options.seconds);
    let mut rng = mutate::Rng::new(options.seed);
    let mut mutated = 0u64;
    while mutated < options.runs && started.elapsed() < budget {
        let input = mutate::mutate(&mut rng, &corpus, &dict, MAX_LEN);
        let origin = format!("mutation {mutated} of seed {}", options.seed);
        if let Err(code) = run_one(target, &input, &origin) {
            return code;
        }
        mutated += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    let total = corpus.len() as u64 + mutated;
    println!(
        "fuzz: {}: {total} executions ({} from the corpus, {mutated} mutated) in {secs:.1} s, \
         {:.0}/s, no crash",
        target.name,
        corpus.len(),
        total as f64 / secs.max(1e-9)
    );
    ExitCode::SUCCESS
}
