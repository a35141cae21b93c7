//! What s3sync keeps about a file in its object's user metadata, and how ETags are read.
//!
//! The keys and formats are rclone's, so either tool reads what the other wrote:
//! `x-amz-meta-mtime` holds seconds since the epoch with nine decimals (`1700000000.123456789`),
//! `x-amz-meta-mode` the octal `st_mode` (`100644`), and `x-amz-meta-md5chksum` the base64 MD5
//! of the content where the ETag is not one. Metadata values come from the network: parsing
//! them never panics and refuses what is out of range.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Metadata key of the modification time.
pub(crate) const MTIME: &str = "mtime";
/// Metadata key of the file mode.
pub(crate) const MODE: &str = "mode";
/// Metadata key of the content's MD5 (base64), for objects whose ETag is not an MD5.
pub(crate) const MD5: &str = "md5chksum";

/// Seconds beyond which a timestamp is taken for garbage (year 33,658).
const MAX_SECS: u64 = 1 << 40;

/// Formats a time as rclone does: seconds and nine decimals, negative before 1970.
pub(crate) fn format_mtime(time: SystemTime) -> String {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => format!("{}.{:09}", d.as_secs(), d.subsec_nanos()),
        Err(before) => {
            let d = before.duration();
            format!("-{}.{:09}", d.as_secs(), d.subsec_nanos())
        }
    }
}

/// Parses `[-]SECONDS[.FRACTION]`; digits past nanoseconds are dropped.
pub(crate) fn parse_mtime(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    if secs.is_empty() || secs.len() > 13 || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: u64 = secs.parse().ok()?;
    if secs > MAX_SECS {
        return None;
    }
    let mut nanos = 0u32;
    for (i, digit) in frac.bytes().take(9).enumerate() {
        nanos += u32::from(digit - b'0') * 10u32.pow(8 - i as u32);
    }
    let offset = Duration::new(secs, nanos);
    if negative {
        UNIX_EPOCH.checked_sub(offset)
    } else {
        UNIX_EPOCH.checked_add(offset)
    }
}

/// Formats a mode as octal, as `stat` shows it.
pub(crate) fn format_mode(mode: u32) -> String {
    format!("{mode:o}")
}

/// Parses an octal mode; only the permission bits are kept (never set-id bits from a store).
pub(crate) fn parse_mode(text: &str) -> Option<u32> {
    let text = text.trim();
    if text.is_empty() || text.len() > 7 {
        return None;
    }
    u32::from_str_radix(text, 8).ok().map(|m| m & 0o777)
}

/// The MD5 an ETag stands for, if it is a plain one (a single-part upload without KMS).
pub(crate) fn etag_md5(etag: &str) -> Option<[u8; 16]> {
    let hex = etag.trim().trim_matches('"');
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The MD5 in an `md5chksum` metadata value (base64).
pub(crate) fn meta_md5(value: &str) -> Option<[u8; 16]> {
    let bytes = aws_smithy_types::base64::decode(value.trim()).ok()?;
    bytes.try_into().ok()
}

/// Base64 of an MD5, for the `md5chksum` metadata value.
pub(crate) fn encode_md5(md5: &[u8; 16]) -> String {
    aws_smithy_types::base64::encode(md5)
}

/// Whether two modification times are the same file version: equal to the nanosecond, or
/// to the second when either side keeps only whole seconds.
pub(crate) fn same_mtime(a: SystemTime, b: SystemTime) -> bool {
    if a == b {
        return true;
    }
    let parts = |t: SystemTime| match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i128, d.subsec_nanos()),
        Err(e) => (
            -(e.duration().as_secs() as i128),
            e.duration().subsec_nanos(),
        ),
    };
    let (sa, na) = parts(a);
    let (sb, nb) = parts(b);
    sa == sb && (na == 0 || nb == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn mtimes_use_rclones_format() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(format_mtime(t), "1700000000.123456789");
        assert_eq!(parse_mtime("1700000000.123456789"), Some(t));
        assert_eq!(
            parse_mtime("1700000000"),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(
            parse_mtime("1700000000.5"),
            Some(UNIX_EPOCH + Duration::new(1_700_000_000, 500_000_000))
        );
        let before = UNIX_EPOCH - Duration::new(5, 250_000_000);
        assert_eq!(parse_mtime(&format_mtime(before)), Some(before));
        for bad in [
            "",
            "x",
            "1e9",
            "1.2.3",
            "--1",
            "99999999999999",
            "1.x",
            " . ",
        ] {
            assert_eq!(parse_mtime(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn modes_keep_only_permission_bits() {
        assert_eq!(format_mode(0o100644), "100644");
        assert_eq!(parse_mode("100644"), Some(0o644));
        assert_eq!(parse_mode("104755"), Some(0o755));
        assert_eq!(parse_mode("9"), None);
        assert_eq!(parse_mode(""), None);
    }

    #[test]
    fn plain_etags_are_md5s_and_multipart_ones_are_not() {
        let md5 = etag_md5("\"d41d8cd98f00b204e9800998ecf8427e\"").unwrap();
        assert_eq!(md5[0], 0xd4);
        assert_eq!(etag_md5("\"d41d8cd98f00b204e9800998ecf8427e-3\""), None);
        assert_eq!(etag_md5("zz1d8cd98f00b204e9800998ecf8427e"), None);
        assert_eq!(meta_md5(&encode_md5(&md5)), Some(md5));
    }

    #[test]
    fn whole_second_mtimes_match_their_precise_twin() {
        let precise = UNIX_EPOCH + Duration::new(100, 5);
        assert!(same_mtime(precise, UNIX_EPOCH + Duration::from_secs(100)));
        assert!(!same_mtime(precise, UNIX_EPOCH + Duration::new(100, 6)));
        assert!(!same_mtime(precise, UNIX_EPOCH + Duration::from_secs(101)));
    }

    proptest! {
        #[test]
        fn mtime_parsing_never_panics(text in "\\PC{0,40}") {
            let _ = parse_mtime(&text);
            let _ = parse_mode(&text);
            let _ = etag_md5(&text);
            let _ = meta_md5(&text);
        }

        #[test]
        fn mtimes_round_trip(secs in 0u64..(1 << 36), nanos in 0u32..1_000_000_000) {
            let t = UNIX_EPOCH + Duration::new(secs, nanos);
            prop_assert_eq!(parse_mtime(&format_mtime(t)), Some(t));
        }
    }
}
