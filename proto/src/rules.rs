//! The rules both sides of the API hold alike: the daemon's engine enforces them, the API
//! edge ([`crate::model`]) and the clients (csi-shim, blockctl) check them before asking.
//! Kept here, once, so that the two sides cannot drift.
//!
//! - Names of pools, volumes and snapshots: 1–[`MAX_NAME_LEN`] bytes of `[a-z0-9._-]`, the
//!   first one `[a-z0-9]`, and no `..` (so a name is always a safe path component and a
//!   safe NBD export name).
//! - Sizes: a volume's size is a whole number of [`SIZE_GRANULE`] bytes, at most
//!   [`MAX_VOLUME_SIZE`] (sizes travel as `i64` in CSI).

/// Longest allowed name of a pool, volume or snapshot.
pub const MAX_NAME_LEN: usize = 128;

/// Volume sizes are rounded up to a multiple of this.
pub const SIZE_GRANULE: u64 = 4096;

/// The largest volume size: the largest multiple of the granule that fits an `i64`.
pub const MAX_VOLUME_SIZE: u64 = (i64::MAX as u64) / SIZE_GRANULE * SIZE_GRANULE;

/// How a name breaks the naming rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameRuleError {
    Empty,
    TooLong,
    BadFirst,
    BadCharacter,
    DotDot,
}

impl NameRuleError {
    /// The reason, as the tail of a sentence that names the object ("… must not be empty").
    pub fn reason(self) -> &'static str {
        match self {
            NameRuleError::Empty => "must not be empty",
            NameRuleError::TooLong => "must be at most 128 characters",
            NameRuleError::BadFirst => "must start with a lowercase letter or a digit",
            NameRuleError::BadCharacter => {
                "may contain only lowercase letters, digits, '.', '_' and '-'"
            }
            NameRuleError::DotDot => "must not contain \"..\"",
        }
    }
}

impl std::fmt::Display for NameRuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for NameRuleError {}

/// Checks `name` against the naming rule.
pub fn check_name(name: &str) -> Result<(), NameRuleError> {
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match name.as_bytes() {
        [] => Err(NameRuleError::Empty),
        _ if name.len() > MAX_NAME_LEN => Err(NameRuleError::TooLong),
        [first, ..] if !allowed(*first) => Err(NameRuleError::BadFirst),
        bytes if !bytes.iter().all(|&b| allowed(b) || b"._-".contains(&b)) => {
            Err(NameRuleError::BadCharacter)
        }
        _ if name.contains("..") => Err(NameRuleError::DotDot),
        _ => Ok(()),
    }
}

/// `size` rounded up to the granule; `None` for 0 or past [`MAX_VOLUME_SIZE`].
pub fn round_volume_size(size: u64) -> Option<u64> {
    if size == 0 {
        return None;
    }
    size.checked_next_multiple_of(SIZE_GRANULE)
        .filter(|s| *s <= MAX_VOLUME_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_follow_the_rule() {
        for good in ["a", "0", "vol-1", "a.b_c-d", &"x".repeat(MAX_NAME_LEN)] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        let cases = [
            ("", NameRuleError::Empty),
            (&"x".repeat(MAX_NAME_LEN + 1), NameRuleError::TooLong),
            ("-a", NameRuleError::BadFirst),
            (".a", NameRuleError::BadFirst),
            ("Vol", NameRuleError::BadFirst),
            ("a b", NameRuleError::BadCharacter),
            ("a/b", NameRuleError::BadCharacter),
            ("aé", NameRuleError::BadCharacter),
            ("a..b", NameRuleError::DotDot),
        ];
        for (bad, why) in cases {
            assert_eq!(check_name(bad), Err(why), "{bad:?}");
            assert_eq!(why.to_string(), why.reason());
        }
    }

    #[test]
    fn sizes_round_up_to_the_granule() {
        assert_eq!(round_volume_size(0), None);
        assert_eq!(round_volume_size(1), Some(SIZE_GRANULE));
        assert_eq!(round_volume_size(SIZE_GRANULE), Some(SIZE_GRANULE));
        assert_eq!(round_volume_size(MAX_VOLUME_SIZE), Some(MAX_VOLUME_SIZE));
        assert_eq!(round_volume_size(MAX_VOLUME_SIZE + 1), None);
        assert_eq!(round_volume_size(u64::MAX), None);
    }

    proptest! {
        /// A name that passes is a safe path component and an unescaped URI path segment.
        #[test]
        fn valid_names_are_safe_path_components(name in "[a-z0-9][a-z0-9._-]{0,140}") {
            if check_name(&name).is_ok() {
                prop_assert!(name.len() <= MAX_NAME_LEN);
                prop_assert!(name != "." && name != ".." && !name.contains('/'));
            } else {
                prop_assert!(name.len() > MAX_NAME_LEN || name.contains(".."));
            }
        }

        #[test]
        fn rounded_sizes_are_the_smallest_granule_multiple(size in 1u64..=MAX_VOLUME_SIZE) {
            let rounded = round_volume_size(size).unwrap();
            prop_assert_eq!(rounded % SIZE_GRANULE, 0);
            prop_assert!(rounded >= size && rounded - size < SIZE_GRANULE);
        }
    }
}
