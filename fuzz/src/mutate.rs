//! Blind mutation for the in-suite runs, where afl is not there: stacked byte-level changes
//! to corpus inputs (bit flips, boundary values, deleted, repeated and spliced blocks,
//! dictionary tokens), from a seeded generator so a run is the same every time.
//!
//! It has no coverage feedback: it keeps the suite's share of fuzzing cheap and repeatable and
//! catches what lies a few changes from a valid input. `scripts/fuzz` runs afl for the rest.

/// xorshift64*: small, fast, and the same sequence for the same seed everywhere.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (zero is moved off, as xorshift would stay there).
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Values at the edges of integer fields, little- and big-endian.
const INTERESTING: &[u64] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    u64::MAX,
];

/// A mutated copy of one of `corpus`, with `dict` tokens available to insert; at most
/// `max_len` bytes.
pub fn mutate(rng: &mut Rng, corpus: &[Vec<u8>], dict: &[Vec<u8>], max_len: usize) -> Vec<u8> {
    let mut data = if corpus.is_empty() {
        Vec::new()
    } else {
        corpus[rng.below(corpus.len())].clone()
    };
    let rounds = 1 + rng.below(8);
    for _ in 0..rounds {
        let len = data.len();
        match rng.below(11) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next() as u8;
            }
            2 if len > 0 => {
                let i = rng.below(len);
                data[i] = data[i].wrapping_add((rng.below(35) as u8).wrapping_sub(17));
            }
            3 if len > 0 => {
                let value = INTERESTING[rng.below(INTERESTING.len())];
                let width = [1, 2, 4, 8][rng.below(4)].min(len);
                let i = rng.below(len - width + 1);
                let bytes = if rng.below(2) == 0 {
                    value.to_le_bytes()
                } else {
                    value.to_be_bytes()
                };
                let from = if rng.below(2) == 0 { 0 } else { 8 - width };
                data[i..i + width].copy_from_slice(&bytes[from..from + width]);
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                data.drain(at..at + n);
            }
            5 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                let block = data[at..at + n].to_vec();
                let to = rng.below(len + 1);
                data.splice(to..to, block);
            }
            6 => {
                let n = 1 + rng.below(32);
                let byte = rng.next() as u8;
                let to = rng.below(len + 1);
                data.splice(to..to, std::iter::repeat_n(byte, n));
            }
            7 | 8 if !dict.is_empty() => {
                let token = &dict[rng.below(dict.len())];
                let to = rng.below(len + 1);
                if rng.below(2) == 0 || to + token.len() > len {
                    data.splice(to..to, token.iter().copied());
                } else {
                    data[to..to + token.len()].copy_from_slice(token);
                }
            }
            9 if !corpus.is_empty() => {
                // Splice: this input's head, another's tail.
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            10 if len > 0 => {
                data.truncate(rng.below(len));
            }
            _ => {}
        }
    }
    data.truncate(max_len);
    data
}

/// The tokens of an afl dictionary: one `"token"` a line, with `\xNN`, `\"` and `\\` escapes;
/// blank lines, comments and `name=` prefixes are allowed.
pub fn parse_dict(text: &str) -> Vec<Vec<u8>> {
    let mut tokens = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(start) = line.find('"') else {
            continue;
        };
        let Some(body) = line[start + 1..].strip_suffix('"') else {
            continue;
        };
        let mut token = Vec::new();
        let mut bytes = body.bytes();
        while let Some(b) = bytes.next() {
            if b != b'\\' {
                token.push(b);
                continue;
            }
            match bytes.next() {
                Some(b'x') => {
                    let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                    let text = std::str::from_utf8(&hex).unwrap_or("");
                    if let Ok(value) = u8::from_str_radix(text, 16) {
                        token.push(value);
                    }
                }
                Some(other) => token.push(other),
                None => {}
            }
        }
        if !token.is_empty() {
            tokens.push(token);
        }
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_inputs() {
        let corpus = vec![b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec()];
        let run = |seed| {
            let mut rng = Rng::new(seed);
            (0..100)
                .map(|_| mutate(&mut rng, &corpus, &[b"TCP6".to_vec()], 4096))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn mutations_stay_within_the_length_bound() {
        let corpus = vec![vec![0u8; 100]];
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            assert!(mutate(&mut rng, &corpus, &[], 120).len() <= 120);
        }
    }

    #[test]
    fn dictionaries_read_afl_escapes() {
        let dict = parse_dict("# comment\nkw1=\"reverse_proxy\"\n\"\\x0d\\x0a\"\n\"a\\\"b\"\n\n");
        assert_eq!(
            dict,
            [
                b"reverse_proxy".to_vec(),
                b"\r\n".to_vec(),
                b"a\"b".to_vec()
            ]
        );
    }
}
