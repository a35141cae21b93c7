//! The fuzz targets: one name, one function taking arbitrary bytes, per decoder that reads
//! network bytes or a config file. A target returns normally on any input; a panic is a bug
//! (in the decoder, or an oracle here or in the crate's `fuzz` module saw a wrong answer).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// One target.
pub struct Target {
    /// Its name on the command line and its corpus folder's name.
    pub name: &'static str,
    /// What it reads.
    pub about: &'static str,
    /// Runs one input.
    pub run: fn(&[u8]),
}

/// Every target, in the order `scripts/fuzz` lists them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "tunnel_frames",
        about: "tunnel protocol messages: hello, auth, ack, commands, UDP header",
        run: tunnel::fuzz::frames,
    },
    Target {
        name: "udp_frames",
        about: "tunnel UDP framing on a data channel, read in pieces",
        run: tunnel::fuzz::udp_frames,
    },
    Target {
        name: "proxy_header",
        about: "PROXY protocol v1/v2 header",
        run: tunnel::fuzz::proxy_header,
    },
    Target {
        name: "noise_handshake",
        about: "tunnel server's Noise handshake and encrypted stream (loopback)",
        run: tunnel::fuzz::noise_handshake,
    },
    Target {
        name: "websocket_handshake",
        about: "tunnel server's WebSocket handshake and message stream (loopback)",
        run: tunnel::fuzz::websocket_handshake,
    },
    Target {
        name: "connect_reply",
        about: "tunnel client's HTTP CONNECT reply from a proxy (loopback)",
        run: tunnel::fuzz::connect_reply,
    },
    Target {
        name: "tunnel_config",
        about: "tunnel TOML config, parsed and resolved",
        run: tunnel::fuzz::config,
    },
    Target {
        name: "caddyfile",
        about: "edge Caddyfile, parsed and resolved",
        run: edge::fuzz::caddyfile,
    },
    Target {
        name: "edge_config",
        about: "edge TOML config, parsed and resolved",
        run: edge::fuzz::config,
    },
    Target {
        name: "archive",
        about: "backupd folder archive (tar) extracted into an empty folder",
        run: archive,
    },
];

/// The target called `name`.
pub fn find(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// Inside the sandbox's root: where archives are extracted, and a folder they must not touch.
const DEST: &str = "/dest";
const OUTSIDE: &str = "/outside";
const OUTSIDE_FILE: &str = "/outside/file";

/// Lays out the sandbox's root for [`archive`]: a folder and a file outside the target, with
/// modes an escaping archive would change.
pub fn prepare_root() -> std::io::Result<()> {
    fs::create_dir(OUTSIDE)?;
    fs::set_permissions(OUTSIDE, fs::Permissions::from_mode(0o700))?;
    fs::write(OUTSIDE_FILE, b"outside")?;
    fs::set_permissions(OUTSIDE_FILE, fs::Permissions::from_mode(0o600))
}

/// Extracts one archive into a fresh folder, then checks that nothing outside it changed:
/// the root holds only the two folders, and the outside folder and its file are as made.
fn archive(data: &[u8]) {
    let dest = Path::new(DEST);
    fs::create_dir(dest).expect("the sandbox's root is writable");
    backupd::fuzz::archive(data, dest);
    let mut names: Vec<String> = fs::read_dir("/")
        .expect("listing the sandbox's root")
        .map(|e| {
            e.expect("listing the sandbox's root")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    assert_eq!(names, ["dest", "outside"], "the archive wrote into /");
    let root = fs::symlink_metadata("/").expect("the root is there");
    assert_eq!(root.mode() & 0o7777, 0o755, "the archive changed /'s mode");
    let outside = fs::symlink_metadata(OUTSIDE).expect("the archive removed /outside");
    assert!(outside.is_dir(), "the archive replaced /outside");
    assert_eq!(
        outside.mode() & 0o7777,
        0o700,
        "the archive changed /outside's mode"
    );
    assert_eq!(outside.uid(), 0, "the archive changed /outside's owner");
    let inside: Vec<_> = fs::read_dir(OUTSIDE)
        .expect("listing /outside")
        .map(|e| e.expect("listing /outside").file_name())
        .collect();
    assert_eq!(inside, ["file"], "the archive wrote into /outside");
    let file = fs::symlink_metadata(OUTSIDE_FILE).expect("the archive removed /outside/file");
    assert!(file.is_file(), "the archive replaced /outside/file");
    assert_eq!(
        file.mode() & 0o7777,
        0o600,
        "the archive changed /outside/file's mode"
    );
    assert_eq!(file.nlink(), 1, "the archive hard-linked /outside/file");
    assert_eq!(
        fs::read(OUTSIDE_FILE).expect("reading /outside/file"),
        b"outside",
        "the archive wrote /outside/file"
    );
    fs::remove_dir_all(dest).expect("removing the extracted folder");
}
