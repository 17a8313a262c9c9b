//! Every key and fixed-size value layout of the metadata store.
//!
//! All ids are big-endian `u64` so that byte order equals numeric order: a scan of the
//! map column family over one lineage visits chunks in order and, within a chunk,
//! epochs in order, which is what `seek_for_prev(L|c|e)` relies on.
//!
//! | CF        | key                               | value                          |
//! |-----------|-----------------------------------|--------------------------------|
//! | meta      | `b"format"`, `b"next_id"`         | u32 version / u64 counter      |
//! | pools     | pool id (u64)                     | JSON `PoolRecord`              |
//! | images    | image id (u64)                    | JSON `ImageRecord`             |
//! | lineages  | lineage id (u64)                  | JSON `LineageRecord`           |
//! | map       | lineage (u64) chunk (u64) epoch (u64) | physical chunk (u64), `ZERO` = tombstone |
//! | intents   | intent id (u64)                   | JSON `Intent`                  |

use super::{Cf, MetaError, Result};

/// Key of the store's format version in [`Cf::Meta`].
pub const FORMAT_KEY: &[u8] = b"format";
/// Key of the id counter in [`Cf::Meta`].
pub const NEXT_ID_KEY: &[u8] = b"next_id";
/// The metadata format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Map value meaning "this chunk reads as zeros at this epoch" (hides older data).
pub const ZERO: u64 = u64::MAX;

/// Length of a map key.
pub const MAP_KEY_LEN: usize = 24;

/// Encodes a u64 id key.
pub fn id_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// Decodes a u64 id key of `cf`.
pub fn decode_id(cf: Cf, key: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = key.try_into().map_err(|_| MetaError::Corrupt {
        cf,
        what: format!("id key of {} bytes, expected 8", key.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}

/// Encodes a chunk-map key.
pub fn map_key(lineage: u64, chunk: u64, epoch: u64) -> [u8; MAP_KEY_LEN] {
    let mut k = [0u8; MAP_KEY_LEN];
    k[..8].copy_from_slice(&lineage.to_be_bytes());
    k[8..16].copy_from_slice(&chunk.to_be_bytes());
    k[16..].copy_from_slice(&epoch.to_be_bytes());
    k
}

/// The first key of a lineage's map range.
pub fn map_lineage_start(lineage: u64) -> [u8; 8] {
    lineage.to_be_bytes()
}

/// The first key after a lineage's map range (empty when it is the last possible lineage).
pub fn map_lineage_end(lineage: u64) -> Vec<u8> {
    match lineage.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        None => Vec::new(),
    }
}

/// Decodes a chunk-map key into (lineage, chunk, epoch).
pub fn decode_map_key(key: &[u8]) -> Result<(u64, u64, u64)> {
    if key.len() != MAP_KEY_LEN {
        return Err(MetaError::Corrupt {
            cf: Cf::Map,
            what: format!("map key of {} bytes, expected {MAP_KEY_LEN}", key.len()),
        });
    }
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&key[i * 8..i * 8 + 8]);
        u64::from_be_bytes(b)
    };
    Ok((word(0), word(1), word(2)))
}

/// Encodes a map value.
pub fn map_value(phys: u64) -> [u8; 8] {
    phys.to_be_bytes()
}

/// Decodes a map value.
pub fn decode_map_value(value: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = value.try_into().map_err(|_| MetaError::Corrupt {
        cf: Cf::Map,
        what: format!("map value of {} bytes, expected 8", value.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}

/// Encodes a u64 value (counters).
pub fn u64_value(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

/// Decodes a u64 value of `cf`.
pub fn decode_u64(cf: Cf, value: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = value.try_into().map_err(|_| MetaError::Corrupt {
        cf,
        what: format!("u64 value of {} bytes, expected 8", value.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn map_key_round_trips_and_orders(a in any::<(u64, u64, u64)>(), b in any::<(u64, u64, u64)>()) {
            let ka = map_key(a.0, a.1, a.2);
            let kb = map_key(b.0, b.1, b.2);
            prop_assert_eq!(decode_map_key(&ka).unwrap(), a);
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
        }

        #[test]
        fn lineage_range_contains_exactly_its_keys(l in 0u64..u64::MAX, c in any::<u64>(), e in any::<u64>()) {
            let k = map_key(l, c, e);
            prop_assert!(k.as_slice() >= map_lineage_start(l).as_slice());
            prop_assert!(k.as_slice() < map_lineage_end(l).as_slice());
            let next = map_key(l + 1, 0, 0);
            prop_assert!(next.as_slice() >= map_lineage_end(l).as_slice());
        }
    }

    #[test]
    fn bad_lengths_are_typed_errors() {
        assert!(matches!(
            decode_map_key(&[0; 23]),
            Err(MetaError::Corrupt { .. })
        ));
        assert!(matches!(
            decode_map_value(&[0; 7]),
            Err(MetaError::Corrupt { .. })
        ));
        assert!(matches!(
            decode_id(Cf::Images, &[0; 9]),
            Err(MetaError::Corrupt { .. })
        ));
    }
}
