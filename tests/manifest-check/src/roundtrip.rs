//! Compare a manifest document with what survives a typed parse.
//!
//! k8s-openapi ignores fields it does not know and fills in defaults for required fields that are
//! absent. So `original` (the YAML as written) and `typed` (the parsed value serialized back) differ
//! exactly where the manifest has a misspelled or unknown field, an explicit `null`, or a missing
//! required field.

use serde_json::Value;
use std::fmt;

/// A JSON path such as `spec.template.spec.containers[1].imagePullPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JsonPath(Vec<Segment>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    /// An array index, with the element's `name` when it has one (containers, volumes, ...).
    Index(usize, Option<String>),
}

impl JsonPath {
    fn key(&self, key: &str) -> Self {
        self.push(Segment::Key(key.to_string()))
    }

    fn index(&self, i: usize, element: &Value) -> Self {
        let name = element
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_string);
        self.push(Segment::Index(i, name))
    }

    fn push(&self, segment: Segment) -> Self {
        let mut segments = self.0.clone();
        segments.push(segment);
        JsonPath(segments)
    }

    fn depth(&self) -> usize {
        self.0.len()
    }

    fn last_key(&self) -> Option<&str> {
        match self.0.last() {
            Some(Segment::Key(k)) => Some(k),
            _ => None,
        }
    }

    /// The name of the innermost container (or init container) the path goes through.
    pub fn container(&self) -> Option<&str> {
        self.0.windows(2).rev().find_map(|pair| match pair {
            [Segment::Key(list), Segment::Index(_, Some(name))]
                if matches!(list.as_str(), "containers" | "initContainers") =>
            {
                Some(name.as_str())
            }
            _ => None,
        })
    }
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(k) if i == 0 => write!(f, "{k}")?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n, _) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// How the typed value differs from the manifest at one path.
#[derive(Debug, Clone, PartialEq)]
pub enum Difference {
    /// In the manifest, gone after parsing: unknown/misspelled field or explicit null.
    Lost { path: JsonPath, value: Value },
    /// Not in the manifest, invented by parsing: a required field that is missing.
    Added { path: JsonPath },
    /// Present in both with different values.
    Changed {
        path: JsonPath,
        original: Value,
        typed: Value,
    },
}

impl Difference {
    pub fn path(&self) -> &JsonPath {
        match self {
            Difference::Lost { path, .. }
            | Difference::Added { path }
            | Difference::Changed { path, .. } => path,
        }
    }
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::Lost {
                path,
                value: Value::Null,
            } => write!(
                f,
                "field {path} is null; remove it or give it a value ({{}} for an empty object)"
            ),
            Difference::Lost { path, .. } => write!(
                f,
                "unknown field {path}: it is dropped when parsed, so it is misspelled, \
                 misplaced or not part of this API version"
            ),
            Difference::Added { path } => write!(f, "required field {path} is missing"),
            Difference::Changed {
                path,
                original,
                typed,
            } => write!(f, "field {path} is {original} but parses as {typed}"),
        }
    }
}

/// Every difference between the manifest and its typed round-trip.
pub fn diff(original: &Value, typed: &Value) -> Vec<Difference> {
    let mut out = Vec::new();
    walk(&JsonPath::default(), original, typed, &mut out);
    out
}

fn walk(path: &JsonPath, original: &Value, typed: &Value, out: &mut Vec<Difference>) {
    match (original, typed) {
        (Value::Object(o), Value::Object(t)) => {
            for (key, value) in o {
                let here = path.key(key);
                match t.get(key) {
                    Some(tv) => walk(&here, value, tv, out),
                    None => out.push(Difference::Lost {
                        path: here,
                        value: value.clone(),
                    }),
                }
            }
            for key in t.keys().filter(|k| !o.contains_key(*k)) {
                let here = path.key(key);
                if !is_implied(&here) {
                    out.push(Difference::Added { path: here });
                }
            }
        }
        (Value::Array(o), Value::Array(t)) => {
            for (i, ov) in o.iter().enumerate() {
                let here = path.index(i, ov);
                match t.get(i) {
                    Some(tv) => walk(&here, ov, tv, out),
                    None => out.push(Difference::Lost {
                        path: here,
                        value: ov.clone(),
                    }),
                }
            }
            for (i, tv) in t.iter().enumerate().skip(o.len()) {
                out.push(Difference::Added {
                    path: path.index(i, tv),
                });
            }
        }
        _ if same_scalar(original, typed) => {}
        _ => out.push(Difference::Changed {
            path: path.clone(),
            original: original.clone(),
            typed: typed.clone(),
        }),
    }
}

/// Objects embedded in others (a StatefulSet's volumeClaimTemplates) serialize their own
/// `apiVersion` and `kind`, which the manifest rightly leaves out.
fn is_implied(path: &JsonPath) -> bool {
    path.depth() > 1 && matches!(path.last_key(), Some("apiVersion" | "kind"))
}

/// Scalars are equal if they are equal as JSON, or if one is the other written as a string
/// (`cpu: 1` parses into a Quantity and reads back as `"1"`).
fn same_scalar(original: &Value, typed: &Value) -> bool {
    match (original, typed) {
        (Value::Number(n), Value::String(s)) | (Value::String(s), Value::Number(n)) => {
            n.to_string() == *s
        }
        _ => original == typed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn identical_values_have_no_difference() {
        let v = json!({"spec": {"containers": [{"name": "a", "args": ["x"]}]}});
        assert!(diff(&v, &v).is_empty());
    }

    #[test]
    fn lost_field_is_reported_with_its_path_and_container() {
        let original = json!({"spec": {"containers": [{"name": "a"}, {"name": "b", "imagePullPolicyy": "Always"}]}});
        let typed = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}});
        let d = diff(&original, &typed);
        assert_eq!(d.len(), 1);
        assert_eq!(
            d[0].path().to_string(),
            "spec.containers[1].imagePullPolicyy"
        );
        assert_eq!(d[0].path().container(), Some("b"));
        assert!(d[0].to_string().starts_with("unknown field"), "{}", d[0]);
    }

    #[test]
    fn null_is_called_out_as_null() {
        let d = diff(&json!({"spec": {"emptyDir": null}}), &json!({"spec": {}}));
        assert!(d[0].to_string().contains("is null"), "{}", d[0]);
    }

    #[test]
    fn missing_required_field_shows_up_as_added() {
        let d = diff(&json!({"rules": [{}]}), &json!({"rules": [{"verbs": []}]}));
        assert_eq!(
            d,
            vec![Difference::Added {
                path: JsonPath::default()
                    .key("rules")
                    .index(0, &json!({}))
                    .key("verbs")
            }]
        );
        assert_eq!(d[0].to_string(), "required field rules[0].verbs is missing");
    }

    #[test]
    fn numbers_read_back_as_strings_are_equal() {
        assert!(diff(&json!({"cpu": 1}), &json!({"cpu": "1"})).is_empty());
        assert!(!diff(&json!({"cpu": 1}), &json!({"cpu": "2"})).is_empty());
    }

    #[test]
    fn embedded_objects_may_omit_api_version_and_kind() {
        let original = json!({"spec": {"volumeClaimTemplates": [{"metadata": {"name": "d"}}]}});
        let typed = json!({"spec": {"volumeClaimTemplates": [{"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "d"}}]}});
        assert!(diff(&original, &typed).is_empty());
        // ...but a top-level object may not.
        assert!(!diff(&json!({}), &json!({"kind": "Pod"})).is_empty());
    }
}
