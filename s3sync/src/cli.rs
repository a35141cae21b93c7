//! The command line: commands, flags and their help (the help becomes the man page).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use labcore::Format;
use labcore::log::LogArgs;
use labcore::s3::S3Args;

const ABOUT_LONG: &str = "\
Copy, sync and stream between local files and S3 buckets (MinIO, Garage, Ceph RGW, AWS).

Locations are local paths, - for standard input or output, s3://BUCKET/KEY on the default
store, or s3://STORE/BUCKET/KEY on a store named in the config. Keys are taken literally:
spaces, +, %, # and unicode need no escaping beyond the shell's.

Named stores are [store.NAME] tables of the config (-c FILE, else
$XDG_CONFIG_HOME/labkit/s3sync.toml or ~/.config/labkit/s3sync.toml when it exists) with
endpoint, region, path_style, profile, access_key_id, secret_access_key or
secret_access_key_file (else the systemd credential store.NAME.secret_access_key, else the
AWS_* variables and profiles), ca_bundle and storage_class. A first URL segment that names a
configured store means that store; any other is a bucket of the default store, as before. A
bucket of the default store named like a store is reached as s3://_/BUCKET/KEY. Between two
objects of one store, copies are server-side; between two stores they stream through s3sync
(ranged GETs into a multipart upload, in bounded memory).

An upload of a file larger than one part that is cut short (a store gone, a signal, kill -9)
keeps its parts; the next upload of the same file to the same key resumes it after checking
the stored parts against the file (state in $XDG_STATE_HOME/labkit/s3sync/uploads, else
~/.local/state/...). s3sync cleanup aborts uploads nobody resumed.

Request settings, chosen so every S3 store accepts them:
  - path-style addressing (ENDPOINT/BUCKET/KEY) for every endpoint outside amazonaws.com,
    since self-hosted stores rarely have wildcard DNS (--virtual-hosted to override);
  - checksums only where the S3 API requires them: the SDK's default aws-chunked uploads with
    trailing checksums are refused by some stores (\"Invalid payload signature\"); s3sync
    checks integrity itself (sizes always, MD5 from plain ETags or md5chksum metadata on
    download, x-amz-checksum values where the store keeps them);
  - up to 5 attempts per request with exponential backoff and jitter on throttling, 5xx
    answers and dropped connections; 10 s to connect, 300 s for an answer.

Uploads stream in parts (8 MiB first, doubling every 1,000 parts so 10,000 parts cover any
object, streams of unknown length included); a failed multipart upload is aborted. File mtime
and mode travel in the object's metadata (x-amz-meta-mtime, x-amz-meta-mode, rclone's format)
and are restored on download. Downloads go to a hidden temporary file in the destination
folder and are renamed into place only once verified.

Settings come from flags, then the [s3] table of --config, then AWS_ENDPOINT_URL(_S3),
AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE,
AWS_CA_BUNDLE, then ~/.aws/config and ~/.aws/credentials. Secrets are never flags.";

const EXAMPLES: &str = "\
EXAMPLES:
  Upload a folder, then keep the bucket in step with it:
    s3sync cp -r ./photos s3://media/photos
    s3sync sync --delete ./photos s3://media/photos

  See what a sync would do without changing anything:
    s3sync sync --delete --dry-run s3://media/photos ./photos

  Stream a database dump up and back:
    pg_dump -Fc gitea | s3sync cp - s3://backups/gitea.dump
    s3sync cat s3://backups/gitea.dump | pg_restore --list

  Against a local MinIO:
    AWS_ENDPOINT_URL=http://127.0.0.1:9000 s3sync ls s3://media/

  Keep uploading a folder as it changes:
    s3sync watch --delete /srv/www s3://site/www

  From MinIO at home to an off-site store, at most 2 MiB/s by day, then compare:
    s3sync sync --bwlimit '08:00,2M 23:00,off' s3://home/media s3://offsite/media
    s3sync check --checksum s3://home/media s3://offsite/media

EXIT STATUS:
    0   every transfer succeeded
    1   some transfers failed (each is reported on stderr); the others were done; check
        found differences
    64  bad usage or location
    65  bad data: a download that does not match its object, an unusable key, a sync refused
        by the deletion limit
    66  a missing bucket, object or file; a watched folder that was removed, replaced,
        unmounted or emptied
    69  the store is unreachable
    73  a file or folder cannot be created
    74  an I/O error
    75  interrupted by a signal, or throttled past the retries
    77  credentials or permissions refused
    78  a bad config";

/// s3sync: copy, sync and stream between local files and S3.
#[derive(Debug, Parser)]
#[command(name = "s3sync", version, long_about = ABOUT_LONG, after_long_help = EXAMPLES)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// S3 connection.
    #[command(flatten)]
    pub s3: S3Args,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
    /// Transfer tuning and output.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Flags every command takes.
#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// The s3sync config: its [s3] table is the default store, each [store.NAME] table a store
    /// that URLs name as s3://NAME/bucket/key [default: $XDG_CONFIG_HOME/labkit/s3sync.toml,
    /// else ~/.config/labkit/s3sync.toml, when it exists]
    #[arg(long, short = 'c', value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,

    /// Bandwidth limit in bytes/s: RATE (512k, 8M, off), UP:DOWN (8M:off), or a timetable
    /// "08:00,512k 23:00,off" (local time; rclone's syntax without weekdays)
    #[arg(long, value_name = "RATE", global = true, value_parser = parse_bwlimit)]
    pub bwlimit: Option<String>,

    /// Requests per second to the stores at most (0: no limit); counts listings, HEAD, GET,
    /// PUT, the parts of file uploads, copies and deletions, not the parts of streamed uploads
    #[arg(long, value_name = "N", default_value_t = 0.0, global = true)]
    pub tpslimit: f64,

    /// Live progress on stderr: auto (a display when stderr is a terminal), json (a line a
    /// second, for scripts), none
    #[arg(long, value_enum, value_name = "MODE", default_value_t = ProgressMode::Auto, global = true)]
    pub progress: ProgressMode,

    /// Per-transfer output on stdout: text (nothing but dry-run plans) or json (a line each)
    #[arg(long, value_enum, default_value_t = Format::Text, global = true)]
    pub format: Format,

    /// Files transferred at once
    #[arg(long, value_name = "N", default_value_t = 32, global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub transfers: u16,

    /// First part size of uploads and range size of downloads, e.g. 8M, 64MiB (at least 5M)
    #[arg(long, value_name = "SIZE", default_value = "8M", global = true, value_parser = parse_size)]
    pub part_size: u64,

    /// Parts of one object moving at once
    #[arg(long, value_name = "N", default_value_t = 4, global = true, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub part_concurrency: u16,

    /// Memory for the parts of large objects in flight, e.g. 256M; bounds how many large
    /// objects move at once
    #[arg(long, value_name = "SIZE", default_value = "256M", global = true, value_parser = parse_size)]
    pub max_memory: u64,

    /// Flush each downloaded file to disk before renaming it into place
    #[arg(long, global = true)]
    pub fsync: bool,

    /// Never show a progress bar (the same as --progress none)
    #[arg(long, global = true)]
    pub no_progress: bool,
}

/// How a run shows its progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A live display on stderr when it is a terminal, nothing otherwise.
    Auto,
    /// A JSON line a second on stderr.
    Json,
    /// Nothing but the final summary.
    None,
}

/// Checks a `--bwlimit` value (it is parsed again where the limits are made).
fn parse_bwlimit(text: &str) -> Result<String, String> {
    crate::limit::Timetable::parse(text).map(|_| text.to_owned())
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Copy a file, a folder (-r), a stream (-) or an object.
    #[command(after_long_help = "EXAMPLES:
  s3sync cp notes.txt s3://docs/            # to s3://docs/notes.txt
  s3sync cp notes.txt s3://docs/a/b.txt     # to that key
  s3sync cp -r ./site s3://www/site         # the folder's content under site/
  s3sync cp s3://docs/notes.txt .           # to ./notes.txt
  s3sync cp -r s3://www/site ./restore      # every object under site/
  s3sync cp s3://docs/a s3://archive/a      # inside the store, no download
  tar c /etc | s3sync cp - s3://backups/etc.tar")]
    Cp {
        /// Source: a file, a folder with -r, - for stdin, or s3://bucket/key
        src: String,
        /// Destination: a file or folder, - for stdout, or s3://bucket/key (a key ending in /
        /// or an existing folder receives the source's file name)
        dst: String,
        /// Copy folders and prefixes, everything below them
        #[arg(short, long)]
        recursive: bool,
        /// Print what would be copied, copy nothing
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        tree: TreeArgs,
    },
    /// Make DST hold what SRC holds (one way), transferring only what changed.
    #[command(after_long_help = "NOTES:
    Unchanged means same size and same mtime (the mtime of an S3 object is its
    x-amz-meta-mtime, which a HeadObject reads), or same MD5 with --checksum.

    The state cache saves those HeadObjects. cp -r and sync keep one per folder and prefix,
    and one per pair of prefixes on two stores, where the source object's listed size and
    LastModified stand for the file's size and mtime
    (in $XDG_CACHE_HOME/labkit/s3sync, else ~/.cache/labkit/s3sync): for each file, the size
    and mtime it had and the size, ETag and LastModified of the object that carried that mtime
    when s3sync uploaded, downloaded or compared it. A file is unchanged without a HeadObject
    only if its size and mtime (to the nanosecond) and the listed object's size, ETag (where
    the store lists ETags) and LastModified all equal the record: the HeadObject would then
    have found the same object, with the same mtime. Right after an upload LastModified is not
    known yet; the next listing accepts one in the second of the store's answer or the one
    before, and the record keeps it. Anything else (no record, a mismatch, a cold or unreadable
    cache) falls back to the HeadObject. The one case only the cache misses: on a store whose
    listings carry no ETags (AWS, MinIO, Garage and Ceph all list them), another writer
    replacing an object with one of the same size within the same second as s3sync's upload.
    --no-cache turns it off. LastModified alone (rclone's --update --use-server-modtime) would
    skip a file restored with an older mtime; MinIO's listings can carry x-amz-meta-mtime, but
    only MinIO's.

    Nothing is deleted unless --delete is given, and then only after every transfer
    succeeded and both listings were complete. Without --force or --max-delete, a sync that would
    delete more than half of the destination is refused before it changes anything.

EXAMPLES:
  s3sync sync ./photos s3://media/photos
  s3sync sync --delete --exclude '*.tmp' --exclude 'cache/' ./site s3://www/site
  s3sync sync --delete --dry-run s3://media/photos ./photos
  s3sync sync --checksum s3://media/photos ./photos")]
    Sync {
        /// Source folder or s3://bucket/prefix
        src: String,
        /// Destination folder or s3://bucket/prefix
        dst: String,
        /// Delete destination files that are not in the source
        #[arg(long)]
        delete: bool,
        /// Refuse to run if more than N deletions are needed
        #[arg(long, value_name = "N", requires = "delete")]
        max_delete: Option<usize>,
        /// Allow deleting more than half of the destination
        #[arg(long, requires = "delete")]
        force: bool,
        /// Compare content (MD5) instead of size and mtime
        #[arg(long)]
        checksum: bool,
        /// Print the plan (transfers and deletions), change nothing
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        tree: TreeArgs,
    },
    /// List buckets, or the objects under a prefix.
    #[command(after_long_help = "NOTES:
    Text lines are `DATE SIZE KEY` (folders as `PRE name/`); --format json prints
    {\"key\":..,\"size\":..,\"last_modified\":..,\"etag\":..} per object, {\"prefix\":..} per folder,
    {\"bucket\":..,\"created\":..} per bucket.

EXAMPLES:
  s3sync ls
  s3sync ls s3://media/photos/
  s3sync ls -r --format json s3://media")]
    Ls {
        /// s3://bucket/prefix; none lists the buckets
        url: Option<String>,
        /// List every object below, not just one level
        #[arg(short, long)]
        recursive: bool,
    },
    /// Write an object to standard output.
    #[command(after_long_help = "EXAMPLES:
  s3sync cat s3://backups/gitea.dump | pg_restore --list")]
    Cat {
        /// s3://bucket/key
        url: String,
    },
    /// Delete an object, or every object under a prefix (-r).
    #[command(after_long_help = "EXAMPLES:
  s3sync rm s3://media/old.jpg
  s3sync rm -r --dry-run s3://media/tmp/")]
    Rm {
        /// s3://bucket/key
        url: String,
        /// Delete every object under the prefix
        #[arg(short, long)]
        recursive: bool,
        /// Print what would be deleted, delete nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Make a bucket.
    #[command(after_long_help = "NOTES:
    A bucket that already exists and is yours is fine (exit 0).

EXAMPLES:
  s3sync mb s3://backups")]
    Mb {
        /// s3://bucket
        url: String,
    },
    /// Compare two trees (folders, prefixes, stores) and list every difference; exit 1 if any.
    #[command(after_long_help = "NOTES:
    Entries are compared by size, and with --checksum also by MD5: a local file's, an
    object's plain ETag, or its md5chksum metadata (which s3sync writes on multipart objects).
    An object with none of these cannot be proven equal and counts as a difference
    (unverifiable). Each difference is a line on stdout:
    `missing-in-destination REL`, `missing-in-source REL`, `size-differs REL`,
    `content-differs REL`, `unverifiable REL` (--format json: {\"difference\":..,\"path\":..}).

EXAMPLES:
  s3sync check ./photos s3://media/photos
  s3sync check --checksum s3://home/media/photos s3://offsite/media/photos")]
    Check {
        /// Source folder or s3://[STORE/]bucket/prefix
        src: String,
        /// Destination folder or s3://[STORE/]bucket/prefix
        dst: String,
        /// Also compare content (MD5)
        #[arg(long)]
        checksum: bool,
        #[command(flatten)]
        tree: TreeArgs,
    },
    /// Abort multipart uploads left behind (interrupted uploads nobody resumed).
    #[command(after_long_help = "NOTES:
    An interrupted upload of a large file keeps its parts so the next run of the same upload
    resumes it; cleanup aborts those begun more than --older-than ago, and any other tool's
    left-over uploads under the prefix, freeing the space their parts take.

EXAMPLES:
  s3sync cleanup s3://media
  s3sync cleanup --older-than 1h --dry-run s3://offsite/backups/")]
    Cleanup {
        /// s3://[STORE/]bucket[/prefix]
        url: String,
        /// Only uploads begun longer ago than this, e.g. 30m, 12h, 7d
        #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
        older_than: Duration,
        /// List what would be aborted, abort nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Sync a local folder to S3, then keep syncing it as files change (inotify).
    #[command(after_long_help = "NOTES:
    A full sync runs first; then changed files are uploaded once they have been
    quiet for --debounce. When events come faster than they can be held (--max-pending, or the
    kernel's inotify queue overflows), a full sync runs instead. Runs until SIGTERM or SIGINT;
    tells systemd READY=1 after the first sync (Type=notify).

    With --delete, every pass (the first sync, each batch of changes, each full sync after an
    overflow) keeps to --max-delete, or without it and --force to half of the destination,
    and stops the watch (exit 65) rather than delete more. The watch also stops (exit 66)
    instead of deleting when the folder is removed or replaced, a file system is mounted or
    unmounted on it, or it lists nothing while the destination holds files: an unmounted disk
    looks like an empty folder.

EXAMPLES:
  s3sync watch /srv/www s3://site/www
  s3sync watch --delete --debounce 2s --exclude '*.swp' ~/notes s3://notes/")]
    Watch {
        /// Local folder
        src: String,
        /// s3://bucket/prefix
        dst: String,
        /// Delete objects whose files were deleted
        #[arg(long)]
        delete: bool,
        /// Stop rather than delete more than N objects in one pass
        #[arg(long, value_name = "N", requires = "delete")]
        max_delete: Option<usize>,
        /// Allow a pass to delete more than half of the destination
        #[arg(long, requires = "delete")]
        force: bool,
        /// Quiet time after the last change before uploading, e.g. 500ms, 2s
        #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
        debounce: Duration,
        /// Changed paths held before falling back to a full sync
        #[arg(long, value_name = "N", default_value_t = 10_000)]
        max_pending: usize,
        #[command(flatten)]
        tree: TreeArgs,
    },
}

/// Flags of commands that walk trees.
#[derive(Args, Clone, Debug, Default)]
pub struct TreeArgs {
    /// Leave out paths matching this glob (repeatable); a pattern ending in / leaves out a
    /// folder; a leading / anchors it at the root, otherwise it matches at any depth
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Take part even if excluded (repeatable); with only --include, nothing else takes part
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,
    /// Read --exclude patterns from FILE, one per line (# starts a comment)
    #[arg(long, value_name = "FILE")]
    pub exclude_from: Vec<PathBuf>,
    /// Follow symbolic links in a local source (skipped otherwise)
    #[arg(short = 'L', long)]
    pub follow_links: bool,
    /// Neither read nor write the state cache: every same-sized file costs a HeadObject
    #[arg(long)]
    pub no_cache: bool,
}

/// Parses `8M`, `8MiB`, `64k`, `1G` or a byte count; units are binary.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 8M"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("{text:?}: unknown unit (use K, M or G)")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Parses `500ms`, `2s`, `1m` or a number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 500ms or 2s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(number)),
        "" | "s" => Ok(Duration::from_secs(number)),
        "m" => Ok(Duration::from_secs(number * 60)),
        "h" => Ok(Duration::from_secs(number * 3600)),
        "d" => Ok(Duration::from_secs(number * 86_400)),
        _ => Err(format!("{text:?}: unknown unit (use ms, s, m, h or d)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("8M"), Ok(8 << 20));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("12345"), Ok(12345));
        assert!(parse_size("8X").is_err());
        assert!(parse_size("M").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("2w").is_err());
    }
}
