//! Per-volume IO limits: what the StorageClass or VolumeAttributesClass asked for, validated
//! strictly and stored in the volume's record. The node side turns them into throttle rules
//! for the volume's loop device in the cgroup of each pod that has it published.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::PoolError;

pub const READ_IOPS: &str = "readIOPS";
pub const WRITE_IOPS: &str = "writeIOPS";
pub const READ_BPS: &str = "readBPS";
pub const WRITE_BPS: &str = "writeBPS";
pub const KEYS: [&str; 4] = [READ_IOPS, WRITE_IOPS, READ_BPS, WRITE_BPS];

/// Below one 4 KiB block per second a bandwidth limit stalls every IO rather than shaping it.
pub const MIN_BPS: u64 = 4096;

/// Limits of one volume; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoLimits {
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "readIOPS")]
    pub read_iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "writeIOPS")]
    pub write_iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "readBPS")]
    pub read_bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "writeBPS")]
    pub write_bps: Option<u64>,
}

/// A requested change: each named key is set (`Some`) or removed (`None`); keys not named stay
/// as they are (the spec: a plugin must not modify a volume based on the absence of keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoLimitsChange(BTreeMap<&'static str, Option<u64>>);

impl IoLimits {
    pub fn is_empty(&self) -> bool {
        *self == IoLimits::default()
    }

    fn slot(&mut self, key: &str) -> &mut Option<u64> {
        match key {
            READ_IOPS => &mut self.read_iops,
            WRITE_IOPS => &mut self.write_iops,
            READ_BPS => &mut self.read_bps,
            _ => &mut self.write_bps,
        }
    }

    /// These limits with `change` applied.
    pub fn with(mut self, change: &IoLimitsChange) -> IoLimits {
        for (key, value) in &change.0 {
            *self.slot(key) = *value;
        }
        self
    }

    /// `key=value` pairs for people (`status`, `inspect`, logs), unlimited ones left out.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = [
            (READ_IOPS, self.read_iops),
            (WRITE_IOPS, self.write_iops),
            (READ_BPS, self.read_bps),
            (WRITE_BPS, self.write_bps),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
        .collect();
        if parts.is_empty() {
            "unlimited".into()
        } else {
            parts.join(",")
        }
    }
}

impl IoLimitsChange {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parse one IO-limit key, if `key` is one; `Ok(false)` for a key that is not ours.
    pub fn parse_key(&mut self, key: &str, value: &str) -> Result<bool, PoolError> {
        let Some(&key) = KEYS.iter().find(|k| **k == key) else {
            return Ok(false);
        };
        let v = value.trim();
        let parsed = if v == "0" || v.eq_ignore_ascii_case("unlimited") {
            None
        } else if key.ends_with("IOPS") {
            Some(parse_iops(key, v)?)
        } else {
            Some(parse_bps(key, v)?)
        };
        self.0.insert(key, parsed);
        Ok(true)
    }

    /// VolumeAttributesClass parameters: every key must be an IO limit, every value valid, or
    /// the whole change is refused and nothing is applied.
    pub fn parse_mutable<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<IoLimitsChange, PoolError> {
        let mut change = IoLimitsChange::default();
        for (key, value) in params {
            if !change.parse_key(key, value)? {
                return Err(PoolError::InvalidArgument(format!(
                    "unknown mutable parameter {key:?}: loopvol accepts {}",
                    KEYS.join(", ")
                )));
            }
        }
        Ok(change)
    }
}

fn parse_iops(key: &str, v: &str) -> Result<u64, PoolError> {
    match v.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(PoolError::InvalidArgument(format!(
            "parameter {key}: {v:?} is not a whole number of operations per second \
             (\"0\" or \"unlimited\" removes the limit)"
        ))),
    }
}

fn parse_bps(key: &str, v: &str) -> Result<u64, PoolError> {
    let n = crate::quantity::parse_whole(v)
        .map_err(|e| PoolError::InvalidArgument(format!("parameter {key}: {e}")))?;
    if n < MIN_BPS {
        return Err(PoolError::InvalidArgument(format!(
            "parameter {key}: {v:?} is below {MIN_BPS} bytes per second, which would stall \
             every IO (\"0\" or \"unlimited\" removes the limit)"
        )));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(pairs: &[(&str, &str)]) -> Result<IoLimitsChange, PoolError> {
        IoLimitsChange::parse_mutable(pairs.iter().copied())
    }

    #[test]
    fn values_and_removal() {
        let c = change(&[("writeIOPS", "300"), ("readBPS", "100Mi")]).unwrap();
        let l = IoLimits::default().with(&c);
        assert_eq!(l.write_iops, Some(300));
        assert_eq!(l.read_bps, Some(100 << 20));
        assert_eq!(l.describe(), "writeIOPS=300,readBPS=104857600");
        // Absent keys stay; "0" and "unlimited" remove.
        let l2 = l.with(&change(&[("writeIOPS", "unlimited")]).unwrap());
        assert_eq!(l2.write_iops, None);
        assert_eq!(l2.read_bps, Some(100 << 20));
        let l3 = l2.with(&change(&[("readBPS", "0")]).unwrap());
        assert!(l3.is_empty());
        assert!(change(&[]).unwrap().is_empty());
    }

    #[test]
    fn bad_values_are_refused_whole() {
        for bad in [
            &[("XXX_FakeKey", "XXX_FakeValue")][..],
            &[("writeIOPS", "-5")],
            &[("writeIOPS", "1.5")],
            &[("writeIOPS", "fast")],
            &[("writeIOPS", "")],
            &[("writeIOPS", "1k")],
            &[("readBPS", "-1Mi")],
            &[("readBPS", "100")],
            &[("readBPS", "1.5")],
            &[("readBPS", "10GB")],
            &[("writeIOPS", "300"), ("readiops", "5")],
        ] {
            let e = change(bad).unwrap_err();
            assert!(matches!(e, PoolError::InvalidArgument(_)), "{bad:?}: {e:?}");
        }
    }

    #[test]
    fn records_round_trip_with_the_parameter_names() {
        let l = IoLimits {
            write_iops: Some(300),
            ..Default::default()
        };
        let json = serde_json::to_string(&l).unwrap();
        assert_eq!(json, r#"{"writeIOPS":300}"#);
        assert_eq!(serde_json::from_str::<IoLimits>(&json).unwrap(), l);
        assert!(serde_json::from_str::<IoLimits>("{}").unwrap().is_empty());
    }
}
