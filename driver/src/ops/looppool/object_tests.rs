//! The LoopPool type against the CRD in manifests/ (they cannot drift apart), and the status
//! it makes of a pool's figures.

use super::*;
use serde_json::Value;

fn crd() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/looppool-crd.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::from_str(&text).unwrap()
}

fn figures(available: u64, headroom: u64, read_only: bool) -> Figures {
    Figures {
        path: "/var/lib/loopvol".into(),
        filesystem: "xfs".into(),
        reflink: true,
        read_only,
        sample: crate::metrics::PoolSample {
            pool: "fast".into(),
            capacity_bytes: 10 << 30,
            available_bytes: available,
            reserved_bytes: 3 << 30,
            provisioned_bytes: 5 << 30,
            allocated_bytes: 2 << 30,
            volumes: 4,
            encrypted_volumes: 1,
            snapshots: 1,
            staged_volumes: Some(2),
            loop_devices: 2,
            io_limits: Vec::new(),
        },
        headroom_bytes: headroom,
    }
}

/// The JSON type a schema node asks for, as serde_json names values.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Bool(_) => "boolean",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
        Value::Null => "null",
    }
}

/// Every field of `value` is in `schema` with the same type, and every property of `schema`
/// is a field of `value`: the CRD describes exactly what the node plugin writes.
fn assert_matches_schema(at: &str, value: &Value, schema: &Value) {
    assert_eq!(
        schema["type"].as_str(),
        Some(json_type(value)),
        "{at}: the CRD's type differs from what the node plugin writes"
    );
    match value {
        Value::Object(fields) => {
            let props = schema["properties"].as_object().unwrap();
            let written: Vec<&String> = fields.keys().collect();
            let declared: Vec<&String> = props.keys().collect();
            let (mut w, mut d) = (written.clone(), declared.clone());
            w.sort();
            d.sort();
            assert_eq!(w, d, "{at}: fields written vs. declared in the CRD");
            for (k, v) in fields {
                assert_matches_schema(&format!("{at}.{k}"), v, &props[k]);
            }
        }
        Value::Array(items) => {
            for v in items {
                assert_matches_schema(&format!("{at}[]"), v, &schema["items"]);
            }
        }
        _ => {
            if let Some(allowed) = schema["enum"].as_array() {
                assert!(
                    allowed.contains(value),
                    "{at}: {value} not in the CRD's enum"
                );
            }
        }
    }
}

#[test]
fn the_crd_names_the_type_the_node_plugin_writes() {
    let crd = crd();
    assert_eq!(crd["metadata"]["name"], format!("{PLURAL}.{GROUP}"));
    assert_eq!(crd["spec"]["group"], GROUP);
    assert_eq!(crd["spec"]["scope"], "Cluster");
    assert_eq!(crd["spec"]["names"]["kind"], KIND);
    assert_eq!(crd["spec"]["names"]["plural"], PLURAL);
    let versions = crd["spec"]["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0]["name"], VERSION);
    assert_eq!(API_VERSION, format!("{GROUP}/{VERSION}"));
    assert!(
        versions[0]["subresources"]["status"].is_object(),
        "the status is applied on the status subresource"
    );
}

#[test]
fn the_crd_schema_is_exactly_the_status_written() {
    let crd = crd();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"];
    let now = "2026-12-07T22:00:00Z";
    for f in [
        figures(5 << 30, 1 << 30, false),
        figures(0, 0, false),
        figures(5 << 30, 1 << 30, true),
    ] {
        let s = status("node-a", &f, None, now);
        assert_matches_schema("status", &serde_json::to_value(&s).unwrap(), schema);
        let gone = missing(s, now);
        assert_matches_schema("status", &serde_json::to_value(&gone).unwrap(), schema);
    }
}

#[test]
fn printer_columns_show_what_the_issue_asks_and_name_written_fields() {
    let crd = crd();
    let columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap();
    let default: Vec<String> = columns
        .iter()
        .filter(|c| c["priority"].as_i64().unwrap_or(0) == 0)
        .map(|c| c["name"].as_str().unwrap().to_uppercase())
        .collect();
    assert_eq!(
        default,
        ["NODE", "POOL", "FS", "REFLINK", "CAPACITY", "FREE", "VOLUMES", "HEALTH", "AGE"]
    );
    let written = serde_json::to_value(status(
        "node-a",
        &figures(5 << 30, 1 << 30, false),
        None,
        "2026-12-07T22:00:00Z",
    ))
    .unwrap();
    for c in columns {
        let path = c["jsonPath"].as_str().unwrap();
        if path == ".metadata.creationTimestamp" {
            continue;
        }
        let field = path.strip_prefix(".status.").unwrap();
        let value = &written[field];
        assert!(!value.is_null(), "column {path} names no written field");
        let want = match c["type"].as_str().unwrap() {
            "date" => "string",
            t => t,
        };
        assert_eq!(json_type(value), want, "column {path}");
    }
}

#[test]
fn health_is_the_worst_true_condition() {
    let now = "2026-12-07T22:00:00Z";
    let ok = status("node-a", &figures(5 << 30, 1 << 30, false), None, now);
    assert_eq!(ok.health, HEALTHY);
    assert_eq!(
        (ok.free_bytes, ok.headroom_bytes, ok.promised_bytes),
        (5 << 30, 1 << 30, 3 << 30)
    );
    assert_eq!((ok.volumes, ok.snapshots), (4, 1));
    let no_room = status("node-a", &figures(5 << 30, 0, false), None, now);
    assert_eq!(no_room.health, FULL);
    let last_mib = status(
        "node-a",
        &figures(provisioner::pool::FULL_BYTES - 1, 1 << 30, false),
        None,
        now,
    );
    assert_eq!(last_mib.health, FULL);
    let ro = status("node-a", &figures(0, 0, true), None, now);
    assert_eq!(ro.health, READ_ONLY);
    let cond = |s: &LoopPoolStatus, t: &str| {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .unwrap()
            .status
            .clone()
    };
    assert_eq!(
        (cond(&ro, FULL), cond(&ro, READ_ONLY), cond(&ro, MISSING)),
        ("True".into(), "True".into(), "False".into())
    );
}

#[test]
fn a_condition_keeps_its_transition_time_until_it_changes() {
    let first = status(
        "node-a",
        &figures(5 << 30, 1 << 30, false),
        None,
        "2026-12-07T22:00:00Z",
    );
    let same = status(
        "node-a",
        &figures(4 << 30, 1 << 30, false),
        Some(&first),
        "2026-12-07T22:01:00Z",
    );
    let full = same.conditions.iter().find(|c| c.type_ == FULL).unwrap();
    assert_eq!(full.last_transition_time, "2026-12-07T22:00:00Z");
    assert_eq!(same.last_update, "2026-12-07T22:01:00Z");
    let now_full = status(
        "node-a",
        &figures(4 << 30, 0, false),
        Some(&same),
        "2026-12-07T22:02:00Z",
    );
    let full = now_full
        .conditions
        .iter()
        .find(|c| c.type_ == FULL)
        .unwrap();
    assert_eq!(
        (full.status.as_str(), full.last_transition_time.as_str()),
        ("True", "2026-12-07T22:02:00Z")
    );
}

#[test]
fn a_missing_pool_keeps_its_last_figures() {
    let last = status(
        "node-a",
        &figures(5 << 30, 1 << 30, false),
        None,
        "2026-12-07T22:00:00Z",
    );
    let gone = missing(last.clone(), "2026-12-08T09:00:00Z");
    assert_eq!(gone.health, MISSING);
    assert_eq!(
        (gone.volumes, gone.capacity_bytes),
        (last.volumes, last.capacity_bytes)
    );
    let m: Vec<_> = gone
        .conditions
        .iter()
        .filter(|c| c.type_ == MISSING)
        .collect();
    assert_eq!(m.len(), 1);
    assert_eq!(
        (m[0].status.as_str(), m[0].last_transition_time.as_str()),
        ("True", "2026-12-08T09:00:00Z")
    );
    assert_eq!(gone.last_update, "2026-12-08T09:00:00Z");
}

#[test]
fn names_the_api_server_would_refuse_are_refused_at_start() {
    assert_eq!(name("node-a", "fast"), "node-a.fast");
    assert!(check_name("node-a", "fast").is_ok());
    assert!(check_name("worker-1.example.com", "default").is_ok());
    assert!(check_name("Node_A", "fast").is_err());
    assert!(check_name(&"n".repeat(64), "fast").is_err());
}

#[test]
fn a_status_written_by_someone_else_still_reads() {
    let obj: LoopPool = serde_json::from_value(serde_json::json!({
        "apiVersion": API_VERSION, "kind": KIND,
        "metadata": {"name": "node-a.old"},
        "status": {"node": "node-a", "pool": "old", "volumes": 3, "conditions": [{"type": "Full"}]},
    }))
    .unwrap();
    let s = obj.status.unwrap();
    assert_eq!((s.volumes, s.capacity_bytes), (3, 0));
    assert_eq!(s.conditions[0].type_, FULL);
}
