//! Kubernetes resource quantities (`100Mi`, `1.5Gi`, `500k`, `1e6`), parsed exactly.
//!
//! Written here because the grammar is small and the crates that implement it pull in all of
//! k8s-openapi; the pool has no Kubernetes dependency. The grammar is apimachinery's
//! `resource.Quantity`: a decimal number, then a binary-SI suffix (Ki … Ei), a decimal-SI suffix
//! (n u m k M G T P E) or a decimal exponent (`e`/`E` and an integer). loopvol's quantities
//! count whole things (bytes), so a value that is not a whole number (`1.5` bytes, `100m`) is
//! refused instead of rounded.

/// Why a string is not a whole quantity. Too large is its own case, so that a caller with a
/// smaller maximum of its own says one thing for every value above it, whether or not the
/// value fits in 64 bits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("{0:?} is not a quantity like 100Mi or 1.5G: {1}")]
    Malformed(String, &'static str),
    #[error("{0:?} is not a quantity like 100Mi or 1.5G: unknown suffix {1:?}")]
    UnknownSuffix(String, String),
    #[error("{0:?} is too large: the most is {max} bytes", max = u64::MAX)]
    TooLarge(String),
}

/// Parse `s` as a non-negative whole quantity. No white space, as in Kubernetes: `" 1Gi"` is
/// refused, not quietly trimmed.
pub fn parse_whole(s: &str) -> Result<u64, QuantityError> {
    let bad = |why: &'static str| Err(QuantityError::Malformed(s.to_string(), why));
    let too_large = || Err(QuantityError::TooLarge(s.to_string()));
    let t = s;
    if t.is_empty() {
        return bad("it is empty");
    }
    if t.contains(char::is_whitespace) {
        return bad("it contains white space");
    }
    if t.starts_with('-') {
        return bad("it is negative");
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return bad("it has no digits");
    }
    if frac_part.contains('.') {
        return bad("it has two decimal points");
    }
    // value = mantissa × 10^exp10 × 2^exp2
    let digits = format!("{int_part}{frac_part}");
    let mut mantissa: u128 = 0;
    for d in digits.bytes() {
        mantissa = match mantissa
            .checked_mul(10)
            .and_then(|m| m.checked_add(u128::from(d - b'0')))
        {
            Some(m) => m,
            None => return too_large(),
        };
    }
    let mut exp10: i64 = -(frac_part.len() as i64);
    let mut exp2: u32 = 0;
    match suffix {
        "" => {}
        "Ki" => exp2 = 10,
        "Mi" => exp2 = 20,
        "Gi" => exp2 = 30,
        "Ti" => exp2 = 40,
        "Pi" => exp2 = 50,
        "Ei" => exp2 = 60,
        "n" => exp10 -= 9,
        "u" => exp10 -= 6,
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        e if e.starts_with(['e', 'E']) => match e[1..].parse::<i64>() {
            Ok(x) if (-40..=40).contains(&x) => exp10 += x,
            _ => return bad("its exponent is not a small integer"),
        },
        other => {
            return Err(QuantityError::UnknownSuffix(
                s.to_string(),
                other.to_string(),
            ))
        }
    }
    let mut value = match mantissa.checked_mul(1u128 << exp2) {
        Some(v) => v,
        None => return too_large(),
    };
    while exp10 > 0 {
        value = match value.checked_mul(10) {
            Some(v) => v,
            None => return too_large(),
        };
        exp10 -= 1;
    }
    while exp10 < 0 {
        if value % 10 != 0 {
            return bad("it is not a whole number");
        }
        value /= 10;
        exp10 += 1;
    }
    u64::try_from(value).or_else(|_| too_large())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_quantities() {
        for (s, want) in [
            ("0", 0),
            ("4096", 4096),
            ("100Mi", 100 << 20),
            ("1.5Gi", 3 << 29),
            ("1Ki", 1024),
            ("500k", 500_000),
            ("2M", 2_000_000),
            ("1G", 1_000_000_000),
            ("1e6", 1_000_000),
            ("1.5E3", 1500),
            ("+7", 7),
            ("0.5Ki", 512),
            (".5Ki", 512),
            ("2000m", 2),
            ("18446744073709551615", u64::MAX),
        ] {
            assert_eq!(parse_whole(s), Ok(want), "{s}");
        }
        for s in [
            "",
            "-1",
            "-1Mi",
            "abc",
            "1.5",
            "100m",
            "1..0",
            "1.0.0",
            "10GB",
            "1Qi",
            "1e",
            "1e99",
            "Mi",
            ".",
            "18446744073709551616",
            "99999999999Ei",
            " 1Gi",
            "1Gi ",
            "1 Gi",
        ] {
            assert!(parse_whole(s).is_err(), "{s:?} accepted");
        }
        for s in [
            "18446744073709551616",
            "99999999999Ei",
            "1e40",
            "99999999999999999999",
        ] {
            assert_eq!(
                parse_whole(s),
                Err(QuantityError::TooLarge(s.into())),
                "{s}"
            );
        }
    }
}
