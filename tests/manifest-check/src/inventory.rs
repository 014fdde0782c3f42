//! Manifest files, their documents, and the parsed objects the checks look at.

use crate::finding::Finding;
use crate::kinds::{find_kind, known_kinds, KindInfo, Object, Pick};
use crate::roundtrip;
use serde::Deserialize;
use serde_json::Value;

/// Where a manifest file sits, which decides the rules it follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `manifests/*.yaml`: installed by `kubectl apply -k manifests/`.
    Install,
    /// `manifests/examples/*.yaml`: user workloads, applied by hand into any namespace.
    Example,
}

/// One manifest file's text.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Path relative to the repository root, e.g. `manifests/node.yaml`.
    pub path: String,
    pub origin: Origin,
    pub text: String,
}

impl SourceFile {
    pub fn new(path: &str, text: &str) -> Self {
        // Component files (manifests/components/*/) install like the base, when chosen.
        let origin = if path.starts_with("manifests/examples/") {
            Origin::Example
        } else {
            Origin::Install
        };
        SourceFile {
            path: path.to_string(),
            origin,
            text: text.to_string(),
        }
    }

    /// The file name relative to `manifests/`, as kustomization.yaml refers to it.
    /// An optional component's file, installed only when an overlay picks the component.
    pub fn in_component(&self) -> bool {
        self.path.starts_with("manifests/components/")
    }

    pub fn relative_to_manifests(&self) -> &str {
        self.path.strip_prefix("manifests/").unwrap_or(&self.path)
    }
}

/// One parsed object.
#[derive(Debug, Clone)]
pub struct Doc {
    pub file: String,
    pub origin: Origin,
    pub kind: String,
    pub name: String,
    /// `None` when the manifest leaves it to `kubectl` (or for cluster-scoped objects).
    pub namespace: Option<String>,
    pub namespaced: bool,
    pub object: Object,
}

impl Doc {
    /// `Kind/name`, the way kubectl prints it.
    pub fn label(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }

    pub fn finding(&self, message: impl Into<String>) -> Finding {
        Finding {
            file: self.file.clone(),
            object: Some(self.label()),
            container: None,
            message: message.into(),
        }
    }

    /// The namespace the object ends up in, `""` meaning "the user's current namespace".
    pub fn effective_namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("")
    }
}

/// Everything loaded: the files (even unparseable ones) and the objects that parsed.
#[derive(Debug)]
pub struct Inventory {
    pub files: Vec<SourceFile>,
    pub docs: Vec<Doc>,
    /// The output of a kustomize build rather than the source files: no kustomization, and
    /// the driver image already mapped.
    pub rendered: bool,
    /// The kubelet root directory of the cluster this set is for.
    pub kubelet_dir: String,
}

impl Default for Inventory {
    fn default() -> Self {
        Inventory {
            files: Vec::new(),
            docs: Vec::new(),
            rendered: false,
            kubelet_dir: crate::DEFAULT_KUBELET_DIR.to_string(),
        }
    }
}

impl Inventory {
    /// Parse every document of every file. Problems found on the way are returned; documents
    /// that do not parse at all are left out of the inventory, documents that only lose fields
    /// in the round trip stay in it (so the cross-checks still see them).
    pub fn load(files: Vec<SourceFile>) -> (Inventory, Vec<Finding>) {
        let kinds = known_kinds();
        let mut findings = Vec::new();
        let mut docs = Vec::new();
        for file in &files {
            match split_documents(&file.text) {
                Ok(values) => {
                    for (index, value) in values.iter().enumerate() {
                        let (doc, problems) = parse_document(&kinds, file, index, value);
                        docs.extend(doc);
                        findings.extend(problems);
                    }
                }
                Err(e) => findings.push(Finding::file(&file.path, format!("not valid YAML: {e}"))),
            }
        }
        (
            Inventory {
                files,
                docs,
                ..Default::default()
            },
            findings,
        )
    }

    /// All objects of type `T`, with their documents.
    pub fn all<'a, T: Pick + 'a>(&'a self) -> impl Iterator<Item = (&'a Doc, &'a T)> + 'a {
        self.docs
            .iter()
            .filter_map(|doc| T::pick(&doc.object).map(|t| (doc, t)))
    }

    /// Objects of type `T` from one origin.
    pub fn in_origin<'a, T: Pick + 'a>(
        &'a self,
        origin: Origin,
    ) -> impl Iterator<Item = (&'a Doc, &'a T)> + 'a {
        self.all::<T>().filter(move |(doc, _)| doc.origin == origin)
    }

    /// Whether an object of type `T` with this namespace and name exists.
    pub fn has<T: Pick>(&self, namespace: &str, name: &str) -> bool {
        self.find::<T>(namespace, name).is_some()
    }

    pub fn find<'a, T: Pick + 'a>(
        &'a self,
        namespace: &str,
        name: &str,
    ) -> Option<(&'a Doc, &'a T)> {
        self.all::<T>()
            .find(|(doc, _)| doc.name == name && doc.effective_namespace() == namespace)
    }
}

/// The YAML documents of one file, as JSON values. Empty documents are skipped.
///
/// Each document goes through `serde_norway::Value` first: its mappings refuse duplicate keys
/// (as kubectl does), where deserializing straight into JSON would keep the last one silently.
fn split_documents(text: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        let yaml = serde_norway::Value::deserialize(document).map_err(|e| e.to_string())?;
        let value = serde_json::to_value(yaml).map_err(|e| e.to_string())?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// Parse one document: the object (unless it does not parse at all) and its problems.
fn parse_document(
    kinds: &[KindInfo],
    file: &SourceFile,
    index: usize,
    value: &Value,
) -> (Option<Doc>, Vec<Finding>) {
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_string);
    let metadata = value.get("metadata").cloned().unwrap_or(Value::Null);
    let kind = text(value, "kind").unwrap_or_default();
    let name = text(&metadata, "name").unwrap_or_else(|| default_name(file, &kind, index));
    let finding = |message: String| Finding {
        file: file.path.clone(),
        object: Some(format!("{kind}/{name}")),
        container: None,
        message,
    };
    let fail = |message: &str| (None, vec![finding(message.to_string())]);

    let Some(api_version) = text(value, "apiVersion") else {
        return fail("apiVersion is missing");
    };
    if kind.is_empty() {
        return fail("kind is missing");
    }
    let info = match find_kind(kinds, &api_version, &kind) {
        Ok(info) => info,
        Err(e) => return fail(&e),
    };
    let (object, typed) = match info.parse(value) {
        Ok(parsed) => parsed,
        Err(e) => return fail(&format!("does not parse as {kind} {api_version}: {e}")),
    };
    let problems = roundtrip::diff(value, &typed)
        .iter()
        .map(|d| {
            let f = finding(d.to_string());
            match d.path().container() {
                Some(container) => f.in_container(container),
                None => f,
            }
        })
        .collect();
    let doc = Doc {
        file: file.path.clone(),
        origin: file.origin,
        kind,
        name,
        namespace: text(&metadata, "namespace"),
        namespaced: info.namespaced,
        object,
    };
    (Some(doc), problems)
}

/// Objects without a name (a Kustomization) are labelled by their file.
fn default_name(file: &SourceFile, kind: &str, index: usize) -> String {
    if kind == "Kustomization" {
        file.relative_to_manifests().to_string()
    } else {
        format!("<document {}>", index + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_split_and_empty_ones_skipped() {
        let values = split_documents("---\na: 1\n---\n---\nb: 2\n").unwrap();
        assert_eq!(values.len(), 2);
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let err = split_documents("a: 1\na: 2\n").unwrap_err();
        assert!(err.contains("duplicate"), "{err}");
    }

    #[test]
    fn origin_follows_the_directory() {
        assert_eq!(
            SourceFile::new("manifests/node.yaml", "").origin,
            Origin::Install
        );
        assert_eq!(
            SourceFile::new("manifests/examples/pvc-pod.yaml", "").origin,
            Origin::Example
        );
    }

    #[test]
    fn unknown_field_in_a_container_names_file_object_container_and_path() {
        let yaml = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n  - name: app\n    image: busybox:1.37\n    imagePullPolicyy: Always\n";
        let (_, findings) =
            Inventory::load(vec![SourceFile::new("manifests/examples/p.yaml", yaml)]);
        assert_eq!(findings.len(), 1);
        assert_eq!(
            findings[0].to_string(),
            "manifests/examples/p.yaml Pod/p container app: unknown field \
             spec.containers[0].imagePullPolicyy: it is dropped when parsed, so it is \
             misspelled, misplaced or not part of this API version"
        );
    }
}
