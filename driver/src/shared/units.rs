//! Sizes: byte counts for people (`10.0 GiB` rather than `10737418240`), and the size and
//! ratio arguments the CLI and the admin tools parse.

/// `n` bytes in the largest binary unit that keeps the number ≥ 1, one decimal.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A volume size as Kubernetes writes a quantity (`10Gi`, `1.5Gi`, `500M`, `1e9`, `4096`),
/// parsed exactly by the same code that reads StorageClass parameters; not zero, not above
/// loopvol's largest volume (16 TiB). Every `--size` goes through here, so every malformed or
/// out-of-range value gets one wording and one exit status (the argument parser's, 2), however
/// large it is: `17Ti`, `8Ei` and `99999999999999999999` alike. `10GB` is not a Kubernetes
/// quantity and is refused with the two spellings that are.
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_bytes(s, provisioner::size::MAX_SIZE, "loopvol's largest volume")
}

/// `--transfer-rate-limit`'s default: 256 MiB/s, about a third of what one SATA SSD or a
/// 10 GbE link carries, so a copy leaves the pods most of the node's IO (design §2).
pub const DEFAULT_TRANSFER_RATE: u64 = 256 << 20;

/// A rate in bytes per second (`--transfer-rate-limit`): a quantity (`256Mi`, `1G`), or 0 for
/// no limit.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    parse_bytes(
        s.trim_end_matches("/s"),
        i64::MAX as u64,
        "the largest rate",
    )
}

/// A pool-wide byte count (`--max-pool-bytes`): a quantity as [`parse_size`] reads it, up to
/// what a CSI message can carry.
pub fn parse_pool_bytes(s: &str) -> Result<u64, String> {
    parse_bytes(s, i64::MAX as u64, "the largest size CSI can carry")
}

fn parse_bytes(s: &str, max: u64, what_max: &str) -> Result<u64, String> {
    use provisioner::quantity::{parse_whole, QuantityError};
    if let Some(stem) = s
        .strip_suffix('B')
        .filter(|t| t.ends_with(char::is_alphabetic))
    {
        return Err(format!(
            "{s:?} is not a Kubernetes quantity: write {stem} (powers of 1000) or {stem}i (powers of 1024)"
        ));
    }
    let too_large = || {
        format!(
            "{s:?} is too large: the most is {} ({max} bytes, {what_max})",
            bytes(max)
        )
    };
    match parse_whole(s) {
        Err(QuantityError::TooLarge(_)) => Err(too_large()),
        Err(e) => Err(e.to_string()),
        Ok(0) => Err("a size of 0 is not a volume; give e.g. 1Gi".into()),
        Ok(n) if n > max => Err(too_large()),
        Ok(n) => Ok(n),
    }
}

/// An overcommit ratio is a finite number ≥ 1: below 1 the pool would refuse space it has, and
/// NaN or infinity would make every capacity figure meaningless.
pub fn parse_overcommit_ratio(s: &str) -> Result<f64, String> {
    let r: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number like 1.5"))?;
    if !r.is_finite() || r < 1.0 {
        return Err(format!(
            "overcommit ratio must be a finite number of at least 1.0, not {s}"
        ));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_rates_are_quantities_or_zero() {
        assert_eq!(parse_rate("256Mi"), Ok(256 << 20));
        assert_eq!(parse_rate("100Mi/s"), Ok(100 << 20));
        assert_eq!(parse_rate("1G"), Ok(1_000_000_000));
        assert_eq!(parse_rate("0"), Ok(0));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10MB").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10Gi").unwrap(), 10 << 30);
        assert_eq!(parse_size("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("1Qi").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("99999999999999Ti").is_err());
        assert_eq!(parse_size("16Ti").unwrap(), 16 << 40);
    }

    #[test]
    fn every_size_out_of_range_gets_the_same_words() {
        for s in ["17Ti", "8Ei", "99999999999999999999", "1e40", "16Ti+1"] {
            let e = parse_size(s).unwrap_err();
            if s == "16Ti+1" {
                assert!(e.contains("unknown suffix"), "{s}: {e}");
                continue;
            }
            assert_eq!(
                e,
                format!(
                    "{s:?} is too large: the most is 16.0 TiB ({} bytes, loopvol's largest volume)",
                    16u64 << 40
                )
            );
        }
        for s in [" 1Gi", "1Gi ", "-1", "-1Gi", ""] {
            assert!(parse_size(s).is_err(), "{s:?} accepted");
        }
        assert_eq!(parse_pool_bytes("100Ti").unwrap(), 100 << 40);
        assert!(parse_pool_bytes("8Ei")
            .unwrap_err()
            .contains("is too large"));
    }

    #[test]
    fn overcommit_ratios() {
        assert_eq!(parse_overcommit_ratio("1").unwrap(), 1.0);
        assert_eq!(parse_overcommit_ratio("2.5").unwrap(), 2.5);
        for bad in ["0.5", "-1", "NaN", "inf", "", "two"] {
            assert!(parse_overcommit_ratio(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn readable() {
        assert_eq!(super::bytes(512), "512 B");
        assert_eq!(super::bytes(10 << 30), "10.0 GiB");
        assert_eq!(super::bytes(1536 << 10), "1.5 MiB");
    }
}
