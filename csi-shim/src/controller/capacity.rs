//! Sizes and room: how a CSI `capacity_range` becomes a blockd volume size, and how much
//! a pool can still take.
//!
//! Sizes: blockd sizes are multiples of 4 KiB. The chosen size is the smallest multiple of
//! 4 KiB at or above `required_bytes` (or the source's size for a clone or restore, or
//! 1 GiB for a blank volume with no range), never above `limit_bytes`: when rounding up
//! would pass the limit, the largest multiple below it is taken if that still honours
//! `required_bytes`; otherwise the range is `OUT_OF_RANGE`.
//!
//! Room (what GetCapacity reports and what CreateVolume admits), for a pool with capacity
//! `C`, real free space `F`, provisioned sizes `P` and the shim's over-provisioning ratio
//! `R` (`--overprovisioning-ratio`):
//!
//! ```text
//! headroom            = R·C − P                 (thin promises still allowed)
//! reserve             = C / 50                  (2%: writes to existing volumes keep room)
//! available_capacity  = min(F − reserve, headroom)   (0 when F ≤ reserve or the pool failed)
//! maximum_volume_size = headroom                     (0 when F ≤ reserve or the pool failed)
//! ```
//!
//! blockd's `Pool.overprovisioning_ratio` is the *current* ratio `P / C`, not a limit,
//! so the limit is the shim's flag. CreateVolume of a new volume of size `S` is admitted
//! when the pool is healthy, `F > reserve` and `S ≤ headroom`; otherwise it is
//! `RESOURCE_EXHAUSTED`, which makes the provisioner try another node.

use blockd_proto::csi::CapacityRange;
use blockd_proto::size::format_size;
use blockd_proto::v1;
use tonic::Status;

/// Size of a blank volume created without a capacity range.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;
/// blockd rounds sizes up to multiples of the granule, and accepts at most the largest
/// multiple that fits an `i64` (sizes travel as `i64` in CSI): the API's rules.
pub use blockd_proto::rules::{MAX_VOLUME_SIZE, SIZE_GRANULE};
/// The share of a pool kept free for writes to existing volumes: 1/50 = 2%.
const RESERVE_DIVISOR: u64 = 50;

/// A capacity range that cannot be honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("capacity_range.{field} must not be negative (got {value})")]
    Negative { field: &'static str, value: i64 },
    #[error("capacity_range must set required_bytes or limit_bytes (or both)")]
    Empty,
    #[error("capacity_range.limit_bytes ({limit}) is smaller than required_bytes ({required})")]
    LimitBelowRequired { required: u64, limit: u64 },
    #[error(
        "no size between required_bytes {required} and limit_bytes {limit} is a multiple of \
         4096 bytes, the granularity of blockd volumes; widen the range"
    )]
    NoGranule { required: u64, limit: u64 },
    #[error(
        "the source is {source_size} bytes, larger than capacity_range.limit_bytes ({limit}); \
         a volume made from it must be at least as large as the source"
    )]
    SourceAboveLimit { source_size: u64, limit: u64 },
    #[error(
        "capacity_range.required_bytes ({required}) is smaller than the source ({source_size} \
         bytes); a restored or cloned volume must be at least as large as its source"
    )]
    BelowSource { required: u64, source_size: u64 },
    #[error("{size} bytes is larger than the largest blockd volume ({MAX_VOLUME_SIZE} bytes)")]
    TooLarge { size: u64 },
    #[error(
        "the volume is already {current} bytes, more than capacity_range.limit_bytes \
         ({limit}); volumes cannot shrink"
    )]
    Shrink { current: u64, limit: u64 },
}

impl From<SizeError> for Status {
    fn from(err: SizeError) -> Self {
        match err {
            SizeError::Negative { .. }
            | SizeError::Empty
            | SizeError::LimitBelowRequired { .. } => Status::invalid_argument(err.to_string()),
            SizeError::NoGranule { .. }
            | SizeError::SourceAboveLimit { .. }
            | SizeError::BelowSource { .. }
            | SizeError::TooLarge { .. }
            | SizeError::Shrink { .. } => Status::out_of_range(err.to_string()),
        }
    }
}

/// A validated capacity range; `required == 0` means "no minimum".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Range {
    pub required: u64,
    pub limit: Option<u64>,
}

impl Range {
    /// Validates an optional `capacity_range` (absent or all-zero: no constraint).
    pub fn parse(range: Option<&CapacityRange>) -> Result<Range, SizeError> {
        let Some(range) = range else {
            return Ok(Range::default());
        };
        let non_negative = |field, value: i64| {
            u64::try_from(value).map_err(|_| SizeError::Negative { field, value })
        };
        let required = non_negative("required_bytes", range.required_bytes)?;
        let limit = non_negative("limit_bytes", range.limit_bytes)?;
        let limit = (limit > 0).then_some(limit);
        if let Some(limit) = limit {
            if limit < required {
                return Err(SizeError::LimitBelowRequired { required, limit });
            }
        }
        Ok(Range { required, limit })
    }

    pub fn is_empty(&self) -> bool {
        self.required == 0 && self.limit.is_none()
    }

    /// Whether an existing volume of `size` satisfies this range (CreateVolume
    /// idempotency).
    pub fn admits(&self, size: u64) -> bool {
        size >= self.required && self.limit.is_none_or(|limit| size <= limit)
    }
}

fn round_up(size: u64) -> Result<u64, SizeError> {
    size.checked_next_multiple_of(SIZE_GRANULE)
        .filter(|s| *s <= MAX_VOLUME_SIZE)
        .ok_or(SizeError::TooLarge { size })
}

/// The size of a new volume (see the module docs); `source` is the size of the snapshot
/// or volume it is made from.
pub fn new_volume_size(range: &Range, source: Option<u64>) -> Result<u64, SizeError> {
    let floor = source.unwrap_or(0);
    if let (Some(source_size), Some(limit)) = (source, range.limit) {
        if source_size > limit {
            return Err(SizeError::SourceAboveLimit { source_size, limit });
        }
    }
    if range.required > 0 && range.required < floor {
        return Err(SizeError::BelowSource {
            required: range.required,
            source_size: floor,
        });
    }
    let want = if range.required > 0 {
        range.required
    } else if let Some(source_size) = source {
        source_size
    } else {
        DEFAULT_VOLUME_SIZE.min(range.limit.unwrap_or(u64::MAX))
    };
    let size = round_up(want)?;
    within_limit(range, size, floor.max(1))
}

/// The size a volume of `current` bytes grows to (ControllerExpandVolume). Never smaller
/// than `current`: an expansion to a size the volume already has is a no-op.
pub fn expanded_size(range: &Range, current: u64) -> Result<u64, SizeError> {
    if range.is_empty() {
        return Err(SizeError::Empty);
    }
    if let Some(limit) = range.limit {
        if current > limit {
            return Err(SizeError::Shrink { current, limit });
        }
    }
    let want = if range.required > 0 {
        range.required
    } else {
        range.limit.unwrap_or(current)
    };
    let size = round_up(want)?.max(current);
    within_limit(range, size, current)
}

/// `size`, or when that passes `range.limit`, the limit rounded down to whole granules,
/// provided that is still at least `range.required` and `least` bytes.
fn within_limit(range: &Range, size: u64, least: u64) -> Result<u64, SizeError> {
    match range.limit {
        Some(limit) if size > limit => {
            let down = limit / SIZE_GRANULE * SIZE_GRANULE;
            if down >= range.required && down >= least {
                Ok(down)
            } else {
                Err(SizeError::NoGranule {
                    required: range.required,
                    limit,
                })
            }
        }
        _ => Ok(size),
    }
}

/// What a pool can still take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub available: u64,
    pub max_volume_size: u64,
}

fn headroom(pool: &v1::Pool, ratio: f64) -> u64 {
    // f64 → u64 saturates (and NaN becomes 0), so no overflow here.
    let promised = (ratio * pool.capacity_bytes as f64) as u64;
    promised.saturating_sub(pool.provisioned_bytes)
}

fn reserve(pool: &v1::Pool) -> u64 {
    pool.capacity_bytes / RESERVE_DIVISOR
}

/// GetCapacity's answer for `pool` (see the module docs).
pub fn room(pool: &v1::Pool, ratio: f64) -> Room {
    if pool.health != "ok" || pool.free_bytes <= reserve(pool) {
        return Room {
            available: 0,
            max_volume_size: 0,
        };
    }
    let headroom = headroom(pool, ratio).min(MAX_VOLUME_SIZE);
    Room {
        available: (pool.free_bytes - reserve(pool)).min(headroom),
        max_volume_size: headroom,
    }
}

/// Whether a new volume of `size` bytes may be created in `pool` on node `node`;
/// `RESOURCE_EXHAUSTED` saying why not.
pub fn admit(pool: &v1::Pool, ratio: f64, size: u64, node: &str) -> Result<(), Status> {
    if pool.health != "ok" {
        return Err(Status::resource_exhausted(format!(
            "pool {:?} on node {node} cannot take new volumes: {}",
            pool.name, pool.health
        )));
    }
    if pool.free_bytes <= reserve(pool) {
        return Err(Status::resource_exhausted(format!(
            "pool {:?} on node {node} is full: {} free of {}, at or below the 2% kept for \
             writes to existing volumes; delete volumes or snapshots to free space",
            pool.name,
            format_size(pool.free_bytes),
            format_size(pool.capacity_bytes)
        )));
    }
    let headroom = headroom(pool, ratio);
    if size > headroom {
        return Err(Status::resource_exhausted(format!(
            "pool {:?} on node {node} cannot promise {} more: {} of {} capacity is already \
             provisioned and the over-provisioning ratio is {ratio} (csi-shim \
             --overprovisioning-ratio), leaving {}",
            pool.name,
            format_size(size),
            format_size(pool.provisioned_bytes),
            format_size(pool.capacity_bytes),
            format_size(headroom)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required: i64, limit: i64) -> Range {
        Range::parse(Some(&CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }))
        .unwrap()
    }

    #[test]
    fn ranges_are_validated() {
        assert_eq!(Range::parse(None).unwrap(), Range::default());
        for (required, limit) in [(-1, 0), (0, -1)] {
            let err = Range::parse(Some(&CapacityRange {
                required_bytes: required,
                limit_bytes: limit,
            }))
            .unwrap_err();
            assert_eq!(Status::from(err).code(), tonic::Code::InvalidArgument);
        }
        let err = Range::parse(Some(&CapacityRange {
            required_bytes: 10,
            limit_bytes: 5,
        }))
        .unwrap_err();
        assert_eq!(
            err,
            SizeError::LimitBelowRequired {
                required: 10,
                limit: 5
            }
        );
        assert!(range(10, 0).admits(10) && range(10, 0).admits(u64::MAX));
        assert!(!range(10, 20).admits(21) && !range(10, 20).admits(9));
    }

    #[test]
    fn blank_volume_sizes() {
        assert_eq!(
            new_volume_size(&Range::default(), None),
            Ok(DEFAULT_VOLUME_SIZE)
        );
        assert_eq!(new_volume_size(&range(1, 0), None), Ok(4096));
        assert_eq!(new_volume_size(&range(4097, 0), None), Ok(8192));
        assert_eq!(new_volume_size(&range(0, 1 << 20), None), Ok(1 << 20));
        // Rounding up would pass the limit: take the largest granule below it.
        assert_eq!(new_volume_size(&range(4000, 5000), None), Ok(4096));
        assert_eq!(new_volume_size(&range(0, 5000), None), Ok(4096));
        let err = new_volume_size(&range(4097, 8000), None).unwrap_err();
        assert_eq!(Status::from(err).code(), tonic::Code::OutOfRange);
        let err = new_volume_size(&range(0, 100), None).unwrap_err();
        assert_eq!(Status::from(err).code(), tonic::Code::OutOfRange);
        let err = new_volume_size(&range(i64::MAX, 0), None).unwrap_err();
        assert_eq!(Status::from(err).code(), tonic::Code::OutOfRange);
    }

    #[test]
    fn sizes_from_a_source() {
        let src = Some(8 << 20);
        assert_eq!(new_volume_size(&Range::default(), src), Ok(8 << 20));
        assert_eq!(new_volume_size(&range(16 << 20, 0), src), Ok(16 << 20));
        assert_eq!(new_volume_size(&range(0, 32 << 20), src), Ok(8 << 20));
        assert!(matches!(
            new_volume_size(&range(4 << 20, 0), src),
            Err(SizeError::BelowSource { .. })
        ));
        assert!(matches!(
            new_volume_size(&range(0, 4 << 20), src),
            Err(SizeError::SourceAboveLimit { .. })
        ));
    }

    #[test]
    fn expansion_sizes() {
        let cur = 8 << 20;
        assert_eq!(expanded_size(&range(16 << 20, 0), cur), Ok(16 << 20));
        assert_eq!(expanded_size(&range(16 << 20, 16 << 20), cur), Ok(16 << 20));
        assert_eq!(expanded_size(&range(0, 16 << 20), cur), Ok(16 << 20));
        // Already that large, or larger: nothing to do.
        assert_eq!(expanded_size(&range(4 << 20, 0), cur), Ok(cur));
        assert_eq!(expanded_size(&range(cur as i64, 0), cur), Ok(cur));
        assert_eq!(expanded_size(&Range::default(), cur), Err(SizeError::Empty));
        let err = expanded_size(&range(0, 4 << 20), cur).unwrap_err();
        assert_eq!(Status::from(err).code(), tonic::Code::OutOfRange);
        let err = expanded_size(&range(i64::MAX, 0), cur).unwrap_err();
        assert_eq!(Status::from(err).code(), tonic::Code::OutOfRange);
    }

    fn pool(capacity: u64, free: u64, provisioned: u64) -> v1::Pool {
        v1::Pool {
            name: "default".into(),
            capacity_bytes: capacity,
            free_bytes: free,
            provisioned_bytes: provisioned,
            health: "ok".into(),
            ..Default::default()
        }
    }

    #[test]
    fn room_honours_free_space_ratio_and_reserve() {
        let gib = 1u64 << 30;
        let reserve = 100 * gib / 50;
        // Empty pool, ratio 4: free space bounds what is available now, the ratio what
        // one volume may promise.
        let r = room(&pool(100 * gib, 100 * gib, 0), 4.0);
        assert_eq!(r.available, 100 * gib - reserve);
        assert_eq!(r.max_volume_size, 400 * gib);
        // Heavily provisioned: the ratio bounds both.
        let r = room(&pool(100 * gib, 90 * gib, 390 * gib), 4.0);
        assert_eq!(
            r,
            Room {
                available: 10 * gib,
                max_volume_size: 10 * gib
            }
        );
        // Past the ratio, or full, or failed: nothing.
        assert_eq!(
            room(&pool(100 * gib, 90 * gib, 500 * gib), 4.0).available,
            0
        );
        assert_eq!(room(&pool(100 * gib, reserve, 0), 4.0).available, 0);
        let mut failed = pool(100 * gib, 100 * gib, 0);
        failed.health = "failed: EIO".into();
        assert_eq!(room(&failed, 4.0).max_volume_size, 0);
    }

    #[test]
    fn admission_explains_refusals() {
        let gib = 1u64 << 30;
        admit(&pool(10 * gib, 10 * gib, 0), 1.0, 10 * gib, "n").unwrap();
        let err = admit(&pool(10 * gib, 10 * gib, 5 * gib), 1.0, 6 * gib, "n").unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(
            err.message().contains("over-provisioning"),
            "{}",
            err.message()
        );
        let err = admit(&pool(10 * gib, 0, 0), 4.0, 4096, "n").unwrap_err();
        assert!(err.message().contains("is full"), "{}", err.message());
    }
}
