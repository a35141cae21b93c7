//! Fuzz entry points (feature `fuzzing`, off by default): the folder archive reader, for the
//! `fuzz` crate's harness and afl.
//!
//! Invariants: [`archive`] takes arbitrary bytes, extracts them into the folder it is given
//! and returns normally; a panic is a bug. It writes to the filesystem, so the harness runs it
//! inside an empty root of its own and checks afterwards that nothing outside the target
//! changed. This module is not an API: it exists so the reader can stay private.

use std::path::Path;

/// A tar block.
const BLOCK: usize = 512;

/// Extracts `data` as a folder backup's tar stream into `dest` (an existing, empty folder).
///
/// Header checksums are set right first, as mutated bytes almost never carry a valid one and
/// the reader would refuse them before any interesting code runs.
pub fn archive(data: &[u8], dest: &Path) {
    let mut tar = data.to_vec();
    fix_checksums(&mut tar);
    let _ = crate::archive::extract(&tar[..], dest);
}

/// Walks the headers as a tar reader does (a header, then its data rounded up to blocks) and
/// writes each one's checksum.
fn fix_checksums(tar: &mut [u8]) {
    let mut at = 0;
    while let Some(header) = tar.get_mut(at..at + BLOCK) {
        if header.iter().all(|&b| b == 0) {
            at += BLOCK;
            continue;
        }
        header[148..156].fill(b' ');
        let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
        // Six octal digits, NUL, space: as GNU tar writes it (the sum is below 8^6).
        header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let size = size_of(&header[124..136]);
        let blocks = size.div_ceil(BLOCK as u64);
        let Some(next) = usize::try_from(blocks)
            .ok()
            .and_then(|b| b.checked_mul(BLOCK))
            .and_then(|d| d.checked_add(at + BLOCK))
        else {
            return;
        };
        at = next;
    }
}

/// A header's size field: octal text, or GNU's base-256 when the top bit is set.
fn size_of(field: &[u8]) -> u64 {
    if field[0] & 0x80 != 0 {
        return field[1..].iter().fold(0u64, |n, &b| {
            n.saturating_mul(256).saturating_add(u64::from(b))
        });
    }
    field
        .iter()
        .skip_while(|&&b| b == b' ')
        .take_while(|&&b| (b'0'..=b'7').contains(&b))
        .fold(0u64, |n, &b| {
            n.saturating_mul(8).saturating_add(u64::from(b - b'0'))
        })
}
