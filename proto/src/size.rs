//! Byte sizes as people write them: `512`, `64K`, `64KiB`, `1.5G`, `10GiB`, `1T`.
//!
//! Every suffix is a power of two, as `qemu-img` reads them: K and KiB are 1024, M and MiB
//! 1024², and so on up to P/PiB; a `B` suffix means bytes. Suffix letters are
//! case-insensitive. `KB`/`MB`/`GB` are refused rather than guessed, because people mean
//! powers of ten by them as often as powers of two. A fraction is allowed when it comes
//! out to a whole number of bytes (`1.5K` is 1536, `0.1K` is refused).

use std::fmt;

/// A size that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Invalid size {input:?}: {reason}")]
pub struct SizeError {
    pub input: String,
    pub reason: &'static str,
}

const UNITS: &[(&str, u32)] = &[
    ("", 0),
    ("b", 0),
    ("k", 10),
    ("kib", 10),
    ("m", 20),
    ("mib", 20),
    ("g", 30),
    ("gib", 30),
    ("t", 40),
    ("tib", 40),
    ("p", 50),
    ("pib", 50),
];

/// Parses a byte size (see the module docs for the accepted forms).
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let err = |reason| SizeError {
        input: input.to_string(),
        reason,
    };
    let s = input.trim();
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(num_end);
    if number.is_empty() {
        return Err(err("expected a number of bytes, optionally with a suffix such as K, M, G, T or KiB, MiB, GiB, TiB"));
    }
    let suffix = suffix.trim().to_ascii_lowercase();
    let shift = UNITS
        .iter()
        .find(|(name, _)| *name == suffix)
        .map(|(_, shift)| *shift)
        .ok_or_else(|| {
            err("unknown suffix (use K, M, G, T or KiB, MiB, GiB, TiB; all are powers of two)")
        })?;
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if frac_part.contains('.') || (int_part.is_empty() && frac_part.is_empty()) {
        return Err(err("not a number"));
    }
    let int: u64 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| err("too large"))?
    };
    let whole = int.checked_shl(shift).filter(|v| v >> shift == int);
    let whole = whole.ok_or_else(|| err("too large"))?;
    let frac_digits = frac_part.trim_end_matches('0');
    if frac_digits.is_empty() {
        return Ok(whole);
    }
    if frac_digits.len() > 18 {
        return Err(err("too many decimal places"));
    }
    // frac = digits / 10^n; frac << shift must be a whole number of bytes.
    let digits: u128 = frac_digits.parse().map_err(|_| err("not a number"))?;
    let denom = 10u128.pow(frac_digits.len() as u32);
    let scaled = digits << shift;
    if !scaled.is_multiple_of(denom) {
        return Err(err("not a whole number of bytes"));
    }
    let frac_bytes = u64::try_from(scaled / denom).map_err(|_| err("too large"))?;
    whole
        .checked_add(frac_bytes)
        .ok_or_else(|| err("too large"))
}

/// A size printed for people with binary units: `512 B`, `64 KiB`, `1.5 GiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanSize(pub u64);

impl fmt::Display for HumanSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let bytes = self.0;
        let mut unit = 0;
        while unit + 1 < NAMES.len() && bytes >= 1u64 << (10 * (unit + 1)) {
            unit += 1;
        }
        if unit == 0 {
            return write!(f, "{bytes} B");
        }
        let div = 1u64 << (10 * unit);
        if bytes.is_multiple_of(div) {
            write!(f, "{} {}", bytes / div, NAMES[unit])
        } else {
            let value = bytes as f64 / div as f64;
            let text = format!("{value:.2}");
            let text = text.trim_end_matches('0').trim_end_matches('.');
            write!(f, "{text} {}", NAMES[unit])
        }
    }
}

/// Formats `bytes` for people (see [`HumanSize`]).
pub fn format_size(bytes: u64) -> String {
    HumanSize(bytes).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_suffixed_sizes() {
        let cases = [
            ("512", 512),
            ("0", 0),
            ("512B", 512),
            ("64K", 64 << 10),
            ("64k", 64 << 10),
            ("64KiB", 64 << 10),
            ("64kib", 64 << 10),
            ("10M", 10 << 20),
            ("10MiB", 10 << 20),
            ("10G", 10 << 30),
            ("10GiB", 10 << 30),
            ("1T", 1 << 40),
            ("1TiB", 1 << 40),
            ("2P", 2 << 50),
            ("1.5K", 1536),
            ("1.5G", 3 << 29),
            (".5K", 512),
            ("1.0G", 1 << 30),
            (" 4 K ", 4096),
        ];
        for (input, want) in cases {
            assert_eq!(parse_size(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn refuses_bad_sizes() {
        for input in [
            "",
            "K",
            "abc",
            "10GB",
            "10 X",
            "1.2.3K",
            "0.1K",
            "-1",
            "1e3",
            ".",
            "99999999999999999999",
            "16384P",
        ] {
            let err = parse_size(input).expect_err(input);
            assert_eq!(err.input, input);
            assert!(err.to_string().starts_with("Invalid size"), "{err}");
        }
    }

    #[test]
    fn largest_sizes_do_not_overflow() {
        assert_eq!(parse_size("16383P"), Ok(16383u64 << 50));
        assert!(parse_size("18446744073709551616").is_err());
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn formats_binary_units() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(1024), "1 KiB");
        assert_eq!(format_size(64 << 10), "64 KiB");
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size((1 << 20) + 1), "1 MiB");
        assert_eq!(format_size(1 << 40), "1 TiB");
    }

    #[test]
    fn format_then_parse_round_trips_whole_units() {
        for bytes in [1u64 << 10, 5 << 20, 7 << 30, 3 << 40] {
            let text = format_size(bytes).replace(' ', "");
            assert_eq!(parse_size(&text), Ok(bytes));
        }
    }
}
