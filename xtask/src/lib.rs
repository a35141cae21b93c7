//! Man pages and completions generated from each tool's clap definition.
//!
//! Each tool's `after_long_help` carries `EXAMPLES:` and `EXIT STATUS:` blocks, which become
//! man sections of those names; `FILES` and `ENVIRONMENT` come from the table below, which
//! also lists every tool. Pages carry no date, so regenerating an unchanged tree changes
//! nothing and the staleness test can compare bytes.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use clap::{Command, CommandFactory};
use roff::{Roff, bold, roman};

pub mod layers;
pub mod quickstart;

/// Every crate of the workspace, by folder.
pub const CRATES: &[&str] = &[
    "labcore", "testkit", "tunnel", "edge", "s3sync", "backupd", "pgprov", "xtask", "fuzz",
];

/// A tool: its command line and the sections clap does not know.
pub struct Tool {
    /// The clap definition.
    pub command: Command,
    /// FILES: (path, what it is).
    pub files: &'static [(&'static str, &'static str)],
    /// ENVIRONMENT: (variable, what it does).
    pub environment: Vec<(&'static str, &'static str)>,
}

const LOGGING_ENV: &[(&str, &str)] = &[
    (
        "LABKIT_LOG",
        "Log filter when --log-level is not given (EnvFilter syntax, e.g. info,backupd=debug).",
    ),
    (
        "JOURNAL_STREAM",
        "Set by systemd; log lines then carry no timestamp.",
    ),
];

const SYSTEMD_ENV: &[(&str, &str)] = &[
    (
        "NOTIFY_SOCKET",
        "Readiness (READY=1, RELOADING=1, STOPPING=1) is sent here (systemd Type=notify).",
    ),
    (
        "WATCHDOG_USEC",
        "When set, WATCHDOG=1 is sent at half this interval.",
    ),
    (
        "CREDENTIALS_DIRECTORY",
        "systemd credentials: a secret not given inline or as *_file is read from the credential named by its dotted key, or labkit_KEY (a folder loaded with LoadCredential=labkit:DIR).",
    ),
];

const PG_ENV: &[(&str, &str)] = &[
    (
        "PGHOST, PGPORT, PGUSER, PGDATABASE",
        "The PostgreSQL server and admin role (default: the local Unix socket, the OS user).",
    ),
    (
        "PGPASSWORD, PGPASSFILE",
        "The admin password, or the password file (default ~/.pgpass); never give it in argv.",
    ),
    (
        "PGSERVICE, PGSERVICEFILE, PGSYSCONFDIR",
        "A connection service from pg_service.conf.",
    ),
    (
        "PGSSLMODE, PGSSLROOTCERT",
        "TLS: disable, prefer, require, verify-ca or verify-full, and the root certificates.",
    ),
    (
        "PGCONNECT_TIMEOUT, PGAPPNAME",
        "Connection timeout in seconds, and the application name.",
    ),
];

const S3_ENV: &[(&str, &str)] = &[
    (
        "AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL",
        "The S3 endpoint, e.g. http://127.0.0.1:9000 for MinIO (path-style addressing unless it is amazonaws.com).",
    ),
    (
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN",
        "Credentials (else the profile, else the instance role).",
    ),
    (
        "AWS_REGION, AWS_DEFAULT_REGION, AWS_PROFILE",
        "Region and ~/.aws/config profile.",
    ),
    (
        "AWS_CA_BUNDLE",
        "Extra CA certificates (PEM) to trust for the endpoint.",
    ),
];

/// Every tool, in the order man pages and completions are written.
pub fn tools() -> Vec<Tool> {
    vec![
        Tool {
            command: backupd::cli::Cli::command(),
            files: &[
                ("/etc/labkit/backupd.toml", "The default config file."),
                (
                    "/var/lib/backupd/backups",
                    "The default local target when the config names none ($STATE_DIRECTORY/backups under systemd).",
                ),
                (
                    "/run/lock/backupd-NAME.lock",
                    "The lock that keeps runs of one config apart ($RUNTIME_DIRECTORY under systemd).",
                ),
                (
                    "TARGET/SUBJECT/STAMP/manifest.json",
                    "A backup's manifest, written last: without it the backup does not exist.",
                ),
            ],
            environment: [
                LOGGING_ENV,
                SYSTEMD_ENV,
                PG_ENV,
                S3_ENV,
                &[(
                    "STATE_DIRECTORY, RUNTIME_DIRECTORY",
                    "Set by systemd; see FILES.",
                )],
            ]
            .concat(),
        },
        Tool {
            command: pgprov::cli::Cli::command(),
            files: &[
                (
                    "~/.pgpass",
                    "The admin password, looked up as libpq does (PGPASSFILE names another file).",
                ),
                (
                    "~/.pg_service.conf, $PGSYSCONFDIR/pg_service.conf",
                    "Connection services named by PGSERVICE.",
                ),
                (
                    "DIR/NAME.uri, DIR/NAME.env, DIR/NAME.json, DIR/NAME.pgpass",
                    "Credentials written by --out-dir, mode 0600; an existing file is never overwritten.",
                ),
            ],
            environment: [LOGGING_ENV, PG_ENV].concat(),
        },
        Tool {
            command: edge::cli::Cli::command(),
            files: &[
                (
                    "/etc/labkit/edge.toml",
                    "The config edge.service runs (or a Caddyfile with --caddyfile).",
                ),
                (
                    "/var/lib/labkit/edge",
                    "Storage: the internal CA, certificates and keys (0700; $STATE_DIRECTORY under systemd).",
                ),
            ],
            environment: [
                LOGGING_ENV,
                SYSTEMD_ENV,
                &[(
                    "STATE_DIRECTORY",
                    "Set by systemd; the storage folder when the config names none.",
                )],
            ]
            .concat(),
        },
        Tool {
            command: s3sync::cli::Cli::command(),
            files: &[
                (
                    "DIR/.NAME.RANDOM.s3sync-part",
                    "A download in progress, renamed to DIR/NAME once verified; removed if it fails.",
                ),
                (
                    "~/.aws/config, ~/.aws/credentials",
                    "Profiles with region, endpoint and credentials, read when flags, --config and AWS_* variables leave them open.",
                ),
            ],
            environment: [
                LOGGING_ENV,
                S3_ENV,
                &[(
                    "AWS_CONFIG_FILE, AWS_SHARED_CREDENTIALS_FILE",
                    "Other files in place of ~/.aws/config and ~/.aws/credentials.",
                )],
            ]
            .concat(),
        },
        Tool {
            command: tunnel::cli::Cli::command(),
            files: &[
                (
                    "/etc/labkit/tunnel-server.toml, /etc/labkit/tunnel-client.toml",
                    "The configs tunnel-server.service and tunnel-client.service run (rathole's format).",
                ),
                (
                    "/etc/labkit/credentials/tunnel-server/, /etc/labkit/credentials/tunnel-client/",
                    "Tokens and Noise keys as files named after their config key, loaded as systemd credentials.",
                ),
            ],
            environment: [LOGGING_ENV, SYSTEMD_ENV].concat(),
        },
    ]
}

/// The workspace root (the folder above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
        .to_owned()
}

/// Writes every man page into `out`; returns the files written.
pub fn write_man_pages(out: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(out)?;
    let mut written = Vec::new();
    for (name, page) in man_pages() {
        let path = out.join(name);
        fs::write(&path, page)?;
        written.push(path);
    }
    Ok(written)
}

/// Every man page as (file name, roff text).
pub fn man_pages() -> Vec<(String, String)> {
    let mut pages = Vec::new();
    for tool in tools() {
        let mut command = tool.command.clone();
        command.build();
        let name = command.get_name().to_owned();
        pages.push((format!("{name}.1"), page(&command, &name, &tool)));
        sub_pages(&command, &name, &name, &tool, &mut pages);
    }
    pages.push((
        "edge-caddyfile.5".to_owned(),
        text_page("EDGE-CADDYFILE", "5", edge::cli::CADDYFILE_MANUAL),
    ));
    pages
}

/// A page from text in `TITLE:` sections (a file format's manual, not a command's).
fn text_page(title: &str, section: &str, text: &str) -> String {
    let mut roff = Roff::new();
    roff.control(
        "TH",
        [
            title,
            section,
            "",
            &format!("labkit {}", env!("CARGO_PKG_VERSION")),
            "labkit",
        ],
    );
    for (name, body) in sections(text) {
        roff.control("SH", [name.as_str()]);
        roff.control("nf", []);
        for line in &body {
            roff.text([roman(line.as_str())]);
        }
        roff.control("fi", []);
    }
    roff.to_roff()
}

/// A page per subcommand, nested ones included (`edge ca root` is edge-ca-root(1)).
fn sub_pages(
    command: &Command,
    page_name: &str,
    bin_name: &str,
    tool: &Tool,
    pages: &mut Vec<(String, String)>,
) {
    let tool_name = tool.command.get_name();
    for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
        let full = format!("{page_name}-{}", sub.get_name());
        let bin = format!("{bin_name} {}", sub.get_name());
        let renamed = sub.clone().name(full.clone()).bin_name(bin.clone());
        pages.push((format!("{full}.1"), page(&renamed, tool_name, tool)));
        sub_pages(sub, &full, &bin, tool, pages);
    }
}

fn page(command: &Command, tool_name: &str, tool: &Tool) -> String {
    let man = clap_mangen::Man::new(command.clone())
        .manual("labkit")
        .source(format!("labkit {}", env!("CARGO_PKG_VERSION")));
    let mut out = Vec::new();
    let render = |out: &mut Vec<u8>| -> io::Result<()> {
        man.render_title(out)?;
        man.render_name_section(out)?;
        man.render_synopsis_section(out)?;
        man.render_description_section(out)?;
        if command.get_arguments().any(|a| !a.is_hide_set()) {
            man.render_options_section(out)?;
        }
        if command.has_subcommands() {
            man.render_subcommands_section(out)?;
        }
        Ok(())
    };
    render(&mut out).expect("rendering into memory cannot fail");
    let mut roff = Roff::new();
    let extra = command
        .get_after_long_help()
        .or_else(|| command.get_after_help())
        .map(ToString::to_string)
        .unwrap_or_default();
    let mut blocks = sections(&extra);
    if !blocks.iter().any(|(title, _)| title == "EXIT STATUS") {
        // Subcommands share the tool's exit statuses.
        if let Some(parent) = tools()
            .into_iter()
            .find(|t| t.command.get_name() == tool_name)
        {
            let text = parent
                .command
                .get_after_long_help()
                .map(ToString::to_string)
                .unwrap_or_default();
            blocks.extend(
                sections(&text)
                    .into_iter()
                    .filter(|(title, _)| title == "EXIT STATUS"),
            );
        }
    }
    for (title, body) in &blocks {
        roff.control("SH", [title.as_str()]);
        roff.control("nf", []);
        for line in body {
            roff.text([roman(line.as_str())]);
        }
        roff.control("fi", []);
    }
    roff.control("SH", ["FILES"]);
    for (path, what) in tool.files {
        roff.control("TP", []);
        roff.text([bold(*path)]);
        roff.text([roman(*what)]);
    }
    roff.control("SH", ["ENVIRONMENT"]);
    for (name, what) in &tool.environment {
        roff.control("TP", []);
        roff.text([bold(*name)]);
        roff.text([roman(*what)]);
    }
    roff.control("SH", ["SEE ALSO"]);
    let others: Vec<String> = tools()
        .iter()
        .map(|t| t.command.get_name().to_owned())
        .filter(|n| n != command.get_name())
        .map(|n| format!("{n}(1)"))
        .collect();
    roff.text([roman(others.join(", "))]);
    let mut text = String::from_utf8(out).expect("clap_mangen writes UTF-8");
    text.push_str(&roff.to_roff());
    text
}

/// Splits help text into `TITLE:` blocks of lines (leading blank lines dropped).
fn sections(text: &str) -> Vec<(String, Vec<String>)> {
    let mut blocks: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_end();
        let is_title = trimmed.ends_with(':')
            && !trimmed.starts_with(' ')
            && trimmed[..trimmed.len() - 1]
                .chars()
                .all(|c| c.is_ascii_uppercase() || c == ' ');
        if is_title {
            blocks.push((trimmed.trim_end_matches(':').to_owned(), Vec::new()));
        } else if let Some((_, body)) = blocks.last_mut() {
            body.push(trimmed.strip_prefix("    ").unwrap_or(trimmed).to_owned());
        }
    }
    for (_, body) in &mut blocks {
        while body.last().is_some_and(|l| l.is_empty()) {
            body.pop();
        }
    }
    blocks
}

/// Writes bash, zsh and fish completions for every tool into `out`.
pub fn write_completions(out: &Path) -> io::Result<Vec<PathBuf>> {
    use clap_complete::Shell;
    let mut written = Vec::new();
    for tool in tools() {
        let mut command = tool.command;
        let name = command.get_name().to_owned();
        for (shell, dir, file) in [
            (Shell::Bash, "bash", name.clone()),
            (Shell::Zsh, "zsh", format!("_{name}")),
            (Shell::Fish, "fish", format!("{name}.fish")),
        ] {
            let dir = out.join(dir);
            fs::create_dir_all(&dir)?;
            let path = dir.join(file);
            let mut buffer = Vec::new();
            clap_complete::generate(shell, &mut command, &name, &mut buffer);
            fs::write(&path, buffer)?;
            written.push(path);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_blocks_become_sections() {
        let blocks = sections("EXAMPLES:\n    a b\n\nEXIT STATUS:\n    0 ok\n\n");
        assert_eq!(blocks[0], ("EXAMPLES".to_owned(), vec!["a b".to_owned()]));
        assert_eq!(
            blocks[1],
            ("EXIT STATUS".to_owned(), vec!["0 ok".to_owned()])
        );
    }
}
