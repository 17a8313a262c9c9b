//! Helpers shared by csi-shim's unit tests (compiled for tests only).

use std::collections::HashMap;

/// A string map (CSI parameters, mutable parameters, volume context) from literal pairs.
pub(crate) fn string_map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
