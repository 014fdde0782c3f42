//! Turning a CSI capacity range into a concrete volume size.

use crate::PoolError;

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
/// What a volume gets when the request names no size.
pub const DEFAULT_SIZE: u64 = GIB;
/// ext4 with 4 KiB blocks cannot address files beyond 16 TiB, so no backing file may be larger.
pub const MAX_SIZE: u64 = 16 << 40;

/// Pick the size for a request: at least `required` (or the default), rounded up to whole MiB
/// (loop devices and filesystems want aligned sizes), never above `limit`, never below
/// `minimum` (the smallest size the chosen filesystem can be made on).
/// `0` means "unset" for both bounds, as in the CSI CapacityRange.
pub fn choose(required: i64, limit: i64, minimum: u64) -> Result<u64, PoolError> {
    if required < 0 || limit < 0 {
        return Err(PoolError::OutOfRange(format!(
            "capacity range must not be negative (required_bytes={required}, limit_bytes={limit})"
        )));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit != 0 && required > limit {
        return Err(PoolError::OutOfRange(format!(
            "required_bytes {required} exceeds limit_bytes {limit}"
        )));
    }
    let wanted = if required == 0 {
        DEFAULT_SIZE
    } else {
        required
    };
    let mut size = round_up(wanted.max(minimum));
    if limit != 0 && size > limit {
        // Fall back to the largest aligned size under the limit that still meets the minimum.
        size = limit / MIB * MIB;
        if size < required || size < minimum || size == 0 {
            return Err(PoolError::OutOfRange(format!(
                "no size between required_bytes {required} and limit_bytes {limit} is a whole \
                 MiB of at least {minimum} bytes"
            )));
        }
    }
    if size > MAX_SIZE {
        return Err(PoolError::OutOfRange(format!(
            "{size} bytes is above loopvol's maximum volume size of {MAX_SIZE} bytes (16 TiB)"
        )));
    }
    Ok(size)
}

pub fn round_up(bytes: u64) -> u64 {
    bytes.div_ceil(MIB).saturating_mul(MIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_rounding() {
        assert_eq!(choose(0, 0, 0).unwrap(), GIB);
        assert_eq!(choose(1, 0, 0).unwrap(), MIB);
        assert_eq!(choose(MIB as i64 + 1, 0, 0).unwrap(), 2 * MIB);
        assert_eq!(choose(0, (10 * MIB) as i64, 0).unwrap(), 10 * MIB);
        assert_eq!(choose(0, 0, 300 * MIB).unwrap(), GIB);
        assert_eq!(choose(MIB as i64, 0, 300 * MIB).unwrap(), 300 * MIB);
    }

    #[test]
    fn limit_is_honoured() {
        // Rounding up would pass the limit: take the aligned size under it.
        let limit = (5 * MIB + 10) as i64;
        assert_eq!(choose((4 * MIB + 1) as i64, limit, 0).unwrap(), 5 * MIB);
        // Nothing aligned fits between required and limit.
        assert!(matches!(
            choose((MIB + 1) as i64, (MIB + 100) as i64, 0),
            Err(PoolError::OutOfRange(_))
        ));
        // Limit below the filesystem minimum.
        assert!(matches!(
            choose(0, (100 * MIB) as i64, 300 * MIB),
            Err(PoolError::OutOfRange(_))
        ));
    }

    #[test]
    fn absurd_sizes_are_out_of_range() {
        assert!(matches!(choose(-1, 0, 0), Err(PoolError::OutOfRange(_))));
        assert!(matches!(choose(10, 5, 0), Err(PoolError::OutOfRange(_))));
        assert!(matches!(
            choose(i64::MAX, 0, 0),
            Err(PoolError::OutOfRange(_))
        ));
    }
}
