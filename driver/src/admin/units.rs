//! Byte counts for people: `10.0 GiB` rather than `10737418240`.

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

#[cfg(test)]
mod tests {
    #[test]
    fn readable() {
        assert_eq!(super::bytes(512), "512 B");
        assert_eq!(super::bytes(10 << 30), "10.0 GiB");
        assert_eq!(super::bytes(1536 << 10), "1.5 MiB");
    }
}
