//! StorageClass parameters: what `CreateVolume`, `GetCapacity` and
//! `ValidateVolumeCapabilities` accept in their `parameters` map.
//!
//! | key                          | value                                   | meaning                          |
//! |------------------------------|-----------------------------------------|----------------------------------|
//! | `pool`                       | a blockd pool name                      | where the volume lives (default: the daemon's default pool) |
//! | `csi.storage.k8s.io/fstype`  | `ext4` or `xfs`                          | file system of mount volumes     |
//! | `maxIops`                    | a positive integer                      | IOPS limit of the volume         |
//! | `iopsPerGB`                  | a positive integer                      | IOPS limit = iopsPerGB × size in GiB (rounded up), capped by `maxIops` when both are given |
//! | `maxBandwidth`               | bytes per second as a Kubernetes quantity: `104857600`, `90Mi` (90×2^20), `90M` (90×10^6), `1.5Gi`, `1e9` | bandwidth limit of the volume |
//!
//! Invariants: an unknown key is refused (a typo in a StorageClass must not silently give
//! an unlimited volume), except keys under `csi.storage.k8s.io/`, which are the
//! orchestrator's metadata (`--extra-create-metadata`: `pvc/name`, `pvc/namespace`,
//! `pv/name`) and are accepted and ignored. Parsing is pure: no I/O, no blockd calls.
//! The two offerings of the seed chapter's table 4.1 map onto these keys as
//! `default-block` = `maxBandwidth: 90Mi` (HDD-like, 40–90 MB/s) and `performance-block` =
//! `iopsPerGB: "20"` (io1-like provisioned IOPS).

use std::collections::HashMap;
use std::fmt;

use blockd_proto::model::{validate_name, NameKind};

/// Parameter keys this driver understands.
pub const POOL: &str = "pool";
pub const FS_TYPE: &str = "csi.storage.k8s.io/fstype";
pub const MAX_IOPS: &str = "maxIops";
pub const IOPS_PER_GB: &str = "iopsPerGB";
pub const MAX_BANDWIDTH: &str = "maxBandwidth";

/// The prefix of the orchestrator's own keys, accepted and ignored.
const CO_PREFIX: &str = "csi.storage.k8s.io/";

/// Volume context keys the controller hands to the node service.
pub const CONTEXT_POOL: &str = "pool";
pub const CONTEXT_FS_TYPE: &str = "fsType";
pub const CONTEXT_MAX_IOPS: &str = "maxIops";
pub const CONTEXT_MAX_BANDWIDTH: &str = "maxBandwidthBytes";

const GIB: u128 = 1 << 30;

/// A file system the node service knows how to make and grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    /// Parses a CSI `fs_type` or fstype parameter; `None` for anything else.
    pub fn parse(raw: &str) -> Option<FsType> {
        match raw {
            "ext4" => Some(FsType::Ext4),
            "xfs" => Some(FsType::Xfs),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parameter that cannot be used. Its `Display` tells the StorageClass author what to
/// change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error(
        "Unknown StorageClass parameter {key:?}; blockd.csi.io accepts pool, \
         csi.storage.k8s.io/fstype, maxIops, iopsPerGB and maxBandwidth"
    )]
    Unknown { key: String },
    #[error("Invalid StorageClass parameter {key}={value:?}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
}

impl From<ParamError> for tonic::Status {
    fn from(err: ParamError) -> Self {
        tonic::Status::invalid_argument(err.to_string())
    }
}

/// The per-volume limits blockd enforces; 0 means unlimited (as in `blockd.v1.Qos`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Qos {
    pub max_iops: u64,
    pub max_bandwidth_bytes: u64,
}

/// Validated StorageClass parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeParams {
    /// `None`: the daemon's default pool (or the source's pool for a clone).
    pub pool: Option<String>,
    pub fs_type: Option<FsType>,
    pub max_iops: Option<u64>,
    pub iops_per_gb: Option<u64>,
    pub max_bandwidth_bytes: Option<u64>,
}

impl VolumeParams {
    /// Validates a `parameters` map (see the module docs).
    pub fn parse(parameters: &HashMap<String, String>) -> Result<Self, ParamError> {
        let mut params = VolumeParams::default();
        // Sorted, so that the first bad key reported does not depend on hash order.
        let mut keys: Vec<&String> = parameters.keys().collect();
        keys.sort();
        for key in keys {
            let value = &parameters[key];
            match key.as_str() {
                POOL => {
                    validate_name(NameKind::Pool, "pool", value).map_err(|err| {
                        ParamError::Invalid {
                            key: POOL,
                            value: value.clone(),
                            reason: format!("not a blockd pool name ({err})"),
                        }
                    })?;
                    params.pool = Some(value.clone());
                }
                FS_TYPE => {
                    params.fs_type =
                        Some(FsType::parse(value).ok_or_else(|| ParamError::Invalid {
                            key: FS_TYPE,
                            value: value.clone(),
                            reason: "supported file systems are ext4 and xfs".into(),
                        })?);
                }
                MAX_IOPS => params.max_iops = Some(positive_integer(MAX_IOPS, value)?),
                IOPS_PER_GB => params.iops_per_gb = Some(positive_integer(IOPS_PER_GB, value)?),
                MAX_BANDWIDTH => {
                    let bytes = parse_bandwidth(value).map_err(|err| ParamError::Invalid {
                        key: MAX_BANDWIDTH,
                        value: value.clone(),
                        reason: format!(
                            "expected bytes per second as a Kubernetes quantity such as \
                             104857600, 90Mi (90×2^20) or 90M (90×10^6): {err}"
                        ),
                    })?;
                    if bytes == 0 {
                        return Err(ParamError::Invalid {
                            key: MAX_BANDWIDTH,
                            value: value.clone(),
                            reason: "must be greater than 0 (leave it out for no limit)".into(),
                        });
                    }
                    params.max_bandwidth_bytes = Some(bytes);
                }
                other if other.starts_with(CO_PREFIX) => {}
                other => {
                    return Err(ParamError::Unknown {
                        key: other.to_string(),
                    })
                }
            }
        }
        Ok(params)
    }

    /// The QoS a volume of `size_bytes` gets: `iopsPerGB × ⌈size in GiB⌉`-style scaling
    /// (computed exactly and rounded up, at least 1), capped by `maxIops`.
    pub fn qos(&self, size_bytes: u64) -> Qos {
        let scaled = self.iops_per_gb.map(|per_gib| {
            let iops = (u128::from(per_gib) * u128::from(size_bytes)).div_ceil(GIB);
            u64::try_from(iops).unwrap_or(u64::MAX).max(1)
        });
        let max_iops = match (scaled, self.max_iops) {
            (Some(scaled), Some(cap)) => scaled.min(cap),
            (Some(iops), None) | (None, Some(iops)) => iops,
            (None, None) => 0,
        };
        Qos {
            max_iops,
            max_bandwidth_bytes: self.max_bandwidth_bytes.unwrap_or(0),
        }
    }
}

/// Bytes per second as a Kubernetes `resource.Quantity`, the syntax StorageClass authors
/// know from `resources.requests`: a decimal number (fraction allowed) with an optional
/// binary suffix (`Ki` `Mi` `Gi` `Ti` `Pi` `Ei`, powers of 2^10), decimal suffix (`k` `M`
/// `G` `T` `P` `E`, powers of 10^3) or decimal exponent (`e9`, `E9`). So `1G` is 10^9 and
/// `1Gi` is 2^30, as in Kubernetes. A fraction of a byte rounds up, as `Quantity.Value()`
/// does. Anything else (`10GB`, `1gi`, `-5`, `1m`) is an error that says what is expected.
fn parse_bandwidth(value: &str) -> Result<u64, String> {
    let raw = value.trim();
    let split = raw
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(raw.len());
    let (number, suffix) = raw.split_at(split);
    let number = number.strip_prefix('+').unwrap_or(number);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole
            .chars()
            .chain(fraction.chars())
            .all(|c| c.is_ascii_digit())
    {
        return Err("expected a number, then optionally a suffix".into());
    }
    // value = digits / 10^fraction_len × multiplier, computed exactly in u128.
    let significant = format!("{whole}{fraction}");
    let significant = significant.trim_start_matches('0');
    let digits: u128 = if significant.is_empty() {
        0
    } else {
        significant
            .parse()
            .map_err(|_| "the number is too large".to_string())?
    };
    let (numerator_scale, denominator_exp): (u128, u32) = match suffix {
        "" => (1, 0),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        "k" => (10u128.pow(3), 0),
        "M" => (10u128.pow(6), 0),
        "G" => (10u128.pow(9), 0),
        "T" => (10u128.pow(12), 0),
        "P" => (10u128.pow(15), 0),
        "E" => (10u128.pow(18), 0),
        exp if exp.starts_with(['e', 'E']) => {
            let e: i32 = exp[1..]
                .parse()
                .map_err(|_| format!("{exp:?} is not a decimal exponent such as e9"))?;
            match e {
                0..=18 => (10u128.pow(e as u32), 0),
                -18..=-1 => (1, e.unsigned_abs()),
                _ => return Err(format!("exponent {e} is out of range")),
            }
        }
        other => {
            return Err(format!(
                "unknown suffix {other:?}: use Ki, Mi, Gi, Ti, Pi, Ei (powers of 1024) or \
                 k, M, G, T, P, E (powers of 1000)"
            ))
        }
    };
    let fraction_len = u32::try_from(fraction.len()).map_err(|_| "too many digits".to_string())?;
    let denominator = 10u128
        .checked_pow(fraction_len + denominator_exp)
        .ok_or_else(|| "too many digits".to_string())?;
    let bytes = digits
        .checked_mul(numerator_scale)
        .ok_or_else(|| "the number is too large".to_string())?
        .div_ceil(denominator);
    u64::try_from(bytes).map_err(|_| "the number is too large".to_string())
}

/// A size as a Kubernetes `resource.Quantity` (`1Gi`, `500M`, `1073741824`), read as
/// [`parse_bandwidth`] reads bandwidths: the `size` of an inline ephemeral volume.
pub fn parse_quantity(value: &str) -> Result<u64, String> {
    parse_bandwidth(value)
}

fn positive_integer(key: &'static str, value: &str) -> Result<u64, ParamError> {
    match value.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(ParamError::Invalid {
            key,
            value: value.to_string(),
            reason: "expected a positive whole number".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::string_map as map;

    #[test]
    fn empty_parameters_mean_defaults_and_no_limits() {
        let params = VolumeParams::parse(&HashMap::new()).unwrap();
        assert_eq!(params, VolumeParams::default());
        assert_eq!(params.qos(10 << 30), Qos::default());
    }

    #[test]
    fn seed_offerings_parse() {
        let default_block =
            VolumeParams::parse(&map(&[(MAX_BANDWIDTH, "90Mi"), (FS_TYPE, "ext4")])).unwrap();
        assert_eq!(default_block.fs_type, Some(FsType::Ext4));
        assert_eq!(
            default_block.qos(11 << 30),
            Qos {
                max_iops: 0,
                max_bandwidth_bytes: 90 << 20
            }
        );
        let performance = VolumeParams::parse(&map(&[(IOPS_PER_GB, "20")])).unwrap();
        assert_eq!(performance.qos(14 << 30).max_iops, 280);
    }

    #[test]
    fn iops_scale_round_up_and_are_capped() {
        let p = VolumeParams::parse(&map(&[(IOPS_PER_GB, "20"), (MAX_IOPS, "100")])).unwrap();
        assert_eq!(p.qos(1 << 30).max_iops, 20);
        assert_eq!(p.qos(10 << 30).max_iops, 100);
        // 1.5 GiB at 20/GiB is exactly 30; 4 MiB rounds up to 1, never to 0 (unlimited).
        assert_eq!(p.qos(3 << 29).max_iops, 30);
        assert_eq!(p.qos(4 << 20).max_iops, 1);
        let only_cap = VolumeParams::parse(&map(&[(MAX_IOPS, "500")])).unwrap();
        assert_eq!(only_cap.qos(1 << 40).max_iops, 500);
        let huge = VolumeParams::parse(&map(&[(IOPS_PER_GB, &u64::MAX.to_string())])).unwrap();
        assert_eq!(huge.qos(i64::MAX as u64).max_iops, u64::MAX);
    }

    #[test]
    fn bandwidth_accepts_bytes_and_size_strings() {
        for (raw, want) in [
            ("1048576", 1 << 20),
            ("200Mi", 200 << 20),
            ("90Mi", 90 << 20),
            ("1Gi", 1 << 30),
            ("1G", 1_000_000_000),
            ("90M", 90_000_000),
            ("64Ki", 64 << 10),
            ("1.5Gi", 3 << 29),
            ("0.5k", 500),
            ("1e9", 1_000_000_000),
            ("2E3", 2000),
            ("1.0001k", 1001),
            ("+7", 7),
            ("12e-1", 2),
        ] {
            let p = VolumeParams::parse(&map(&[(MAX_BANDWIDTH, raw)])).unwrap();
            assert_eq!(p.max_bandwidth_bytes, Some(want), "{raw}");
        }
    }

    #[test]
    fn orchestrator_metadata_is_ignored() {
        let p = VolumeParams::parse(&map(&[
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("csi.storage.k8s.io/pvc/namespace", "default"),
            ("csi.storage.k8s.io/pv/name", "pvc-1"),
            (POOL, "fast"),
        ]))
        .unwrap();
        assert_eq!(p.pool.as_deref(), Some("fast"));
    }

    #[test]
    fn bad_parameters_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("type", "io1", "Unknown StorageClass parameter \"type\""),
            (POOL, "Bad Pool", "pool"),
            (FS_TYPE, "btrfs", "ext4 and xfs"),
            (MAX_IOPS, "0", "positive whole number"),
            (MAX_IOPS, "-5", "positive whole number"),
            (IOPS_PER_GB, "1.5", "positive whole number"),
            (MAX_BANDWIDTH, "fast", "bytes per second"),
            (MAX_BANDWIDTH, "0", "greater than 0"),
            (MAX_BANDWIDTH, "10GB", "unknown suffix"),
            (MAX_BANDWIDTH, "64KiB", "unknown suffix"),
            (MAX_BANDWIDTH, "1gi", "unknown suffix"),
            (MAX_BANDWIDTH, "-5", "expected a number"),
            (MAX_BANDWIDTH, "1e99", "out of range"),
            (
                MAX_BANDWIDTH,
                "99999999999999999999999999999999999999999Ei",
                "too large",
            ),
            (MAX_BANDWIDTH, ".", "expected a number"),
        ];
        for (key, value, needle) in cases {
            let err = VolumeParams::parse(&map(&[(key, value)])).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(needle), "{key}={value}: {text}");
            assert_eq!(
                tonic::Status::from(err).code(),
                tonic::Code::InvalidArgument
            );
        }
    }
}
