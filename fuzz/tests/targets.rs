//! The suite's short fuzz run: each target replays its corpus and then runs blind mutations
//! from a fixed seed for a few seconds, in the real binary (so inside its own empty root).
//! `scripts/fuzz TARGET SECONDS` is the long, coverage-guided run.

use std::path::Path;
use std::process::Command;

/// Seconds of mutation per target: ten targets stay under a minute of CPU in the suite.
const SECONDS: &str = "3";

fn fuzz() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fuzz"))
}

/// Runs `target` and checks it ended cleanly after more executions than its corpus holds.
fn survives(target: &str) {
    let out = fuzz()
        .args([target, "--seconds", SECONDS, "--seed", "1"])
        .output()
        .expect("running the fuzz binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{target} failed ({}):\n{stderr}{stdout}",
        out.status
    );
    let corpus = std::fs::read_dir(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(target),
    )
    .expect("the target's corpus")
    .count();
    let words: Vec<&str> = stdout.split_whitespace().collect();
    let executions: usize = words
        .windows(2)
        .find(|w| w[1] == "executions")
        .and_then(|w| w[0].parse().ok())
        .unwrap_or_else(|| panic!("no execution count in {stdout:?}"));
    assert!(
        executions > corpus,
        "{target} ran only its corpus: {stdout}"
    );
    println!("{stdout}");
}

macro_rules! targets {
    ($($test:ident => $name:literal),+ $(,)?) => {
        $(
            #[test]
            fn $test() {
                survives($name);
            }
        )+

        #[test]
        fn every_target_has_a_test_and_a_corpus() {
            let out = fuzz().output().expect("running the fuzz binary");
            assert!(out.status.success());
            let listed: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(String::from))
                .collect();
            let tested = [$($name),+];
            assert_eq!(listed, tested, "the binary's targets and this file's tests differ");
            let mut folders: Vec<String> =
                std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"))
                    .expect("the corpus folder")
                    .map(|e| e.expect("listing the corpus").file_name().to_string_lossy().into_owned())
                    .collect();
            folders.sort();
            let mut sorted = listed.clone();
            sorted.sort();
            assert_eq!(folders, sorted, "corpus folders and targets differ");
        }
    };
}

targets! {
    tunnel_frames_survive_their_corpus_and_mutations => "tunnel_frames",
    udp_frames_survive_their_corpus_and_mutations => "udp_frames",
    proxy_headers_survive_their_corpus_and_mutations => "proxy_header",
    the_noise_handshake_survives_its_corpus_and_mutations => "noise_handshake",
    the_websocket_handshake_survives_its_corpus_and_mutations => "websocket_handshake",
    connect_replies_survive_their_corpus_and_mutations => "connect_reply",
    tunnel_configs_survive_their_corpus_and_mutations => "tunnel_config",
    caddyfiles_survive_their_corpus_and_mutations => "caddyfile",
    edge_configs_survive_their_corpus_and_mutations => "edge_config",
    archives_extract_nothing_outside_the_target => "archive",
}

#[test]
fn an_unknown_target_is_a_usage_error() {
    let out = fuzz()
        .arg("nope")
        .output()
        .expect("running the fuzz binary");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no target \"nope\""));
}

#[test]
fn a_missing_corpus_is_missing_input() {
    let out = fuzz()
        .args([
            "caddyfile",
            "--corpus",
            "/nonexistent/corpus",
            "--runs",
            "0",
        ])
        .output()
        .expect("running the fuzz binary");
    assert_eq!(out.status.code(), Some(66));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/corpus"));
}
