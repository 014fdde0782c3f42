//! Kubernetes resource quantities (`512Mi`, `1Gi`, `100m`), just enough to compare sizes.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// The value of a quantity in base units (bytes, cores), or `None` if it is not one.
pub fn parse(q: &Quantity) -> Option<f64> {
    parse_str(&q.0)
}

fn parse_str(s: &str) -> Option<f64> {
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let s = s.trim();
    let (number, factor) = SUFFIXES
        .iter()
        .find_map(|(suffix, factor)| s.strip_suffix(suffix).map(|n| (n, *factor)))
        .unwrap_or((s, 1.0));
    number.parse::<f64>().ok().map(|n| n * factor)
}

#[cfg(test)]
mod tests {
    use super::parse_str;

    #[test]
    fn binary_decimal_and_milli() {
        assert_eq!(parse_str("512Mi"), Some(536870912.0));
        assert_eq!(parse_str("1Gi"), Some(1073741824.0));
        assert_eq!(parse_str("2G"), Some(2e9));
        assert_eq!(parse_str("100m"), Some(0.1));
        assert_eq!(parse_str("3"), Some(3.0));
        assert_eq!(parse_str("lots"), None);
    }
}
