//! Rendering kustomizations without kustomize: the subset loopvol's manifests use, so that CI
//! (which has no kubectl) checks every overlay and component as `kubectl apply -k` would see it.
//!
//! Supported, and refused beyond that (unknown fields fail): `resources` (files and
//! directories), `components` (directories of `kind: Component`), `images` (newName, newTag,
//! digest) and `patches` given inline or by `path` as RFC 6902 JSON patches with a
//! `target: {kind, name}`. Order follows kustomize: resources, then each component in turn
//! (its resources, patches, images), then the kustomization's own patches and images.
//! When kubectl is installed, a test compares this renderer's output with `kubectl kustomize`.

use serde::Deserialize;
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    components: Vec<String>,
    #[serde(default)]
    images: Vec<Image>,
    #[serde(default)]
    patches: Vec<Patch>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Image {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
    digest: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Patch {
    path: Option<String>,
    patch: Option<String>,
    target: Target,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Target {
    kind: String,
    name: String,
}

fn read_kustomization(dir: &Path) -> Result<Kustomization, String> {
    let path = dir.join("kustomization.yaml");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_norway::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn documents(path: &Path) -> Result<Vec<Value>, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_documents(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The non-empty documents of a multi-document YAML text.
pub fn parse_documents(text: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let v = serde_norway::Value::deserialize(doc).map_err(|e| e.to_string())?;
        let v = serde_json::to_value(v).map_err(|e| e.to_string())?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// Render the kustomization in `dir` into its objects.
pub fn render(dir: &Path) -> Result<Vec<Value>, String> {
    let mut stack = Vec::new();
    render_root(dir, &mut stack, false)
}

fn render_root(
    dir: &Path,
    stack: &mut Vec<PathBuf>,
    component: bool,
) -> Result<Vec<Value>, String> {
    let dir = fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // kustomize refuses a base that contains the overlay being built (and loops).
    if let Some(inner) = stack.iter().find(|v| v.starts_with(&dir)) {
        return Err(format!(
            "cycle: {} contains {}, which is being built",
            dir.display(),
            inner.display()
        ));
    }
    let k = read_kustomization(&dir)?;
    build(&dir, k, stack, component)
}

/// Render `base` with `components` applied, as a kustomization holding just those would.
pub fn render_with(base: &Path, components: &[PathBuf]) -> Result<Vec<Value>, String> {
    let k = Kustomization {
        api_version: "kustomize.config.k8s.io/v1beta1".into(),
        kind: "Kustomization".into(),
        resources: vec![base.to_string_lossy().into_owned()],
        components: components
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect(),
        images: vec![],
        patches: vec![],
    };
    build(Path::new("/"), k, &mut Vec::new(), false)
}

fn build(
    dir: &Path,
    k: Kustomization,
    stack: &mut Vec<PathBuf>,
    component: bool,
) -> Result<Vec<Value>, String> {
    let dir = dir.to_path_buf();
    let wanted = if component {
        "Component"
    } else {
        "Kustomization"
    };
    if k.kind != wanted {
        return Err(format!(
            "{}: kind {} where {wanted} is expected",
            dir.display(),
            k.kind
        ));
    }
    let api = if component {
        "kustomize.config.k8s.io/v1alpha1"
    } else {
        "kustomize.config.k8s.io/v1beta1"
    };
    if k.api_version != api {
        return Err(format!(
            "{}: apiVersion {} (expected {api})",
            dir.display(),
            k.api_version
        ));
    }
    if dir != Path::new("/") {
        stack.push(dir.clone());
    }
    let mut objects = Vec::new();
    for r in &k.resources {
        let p = dir.join(r);
        if p.is_dir() {
            objects.extend(render_root(&p, stack, false)?);
        } else {
            objects.extend(documents(&p)?);
        }
    }
    for c in &k.components {
        let cdir = dir.join(c);
        let ck = read_kustomization(&cdir)?;
        let mut own = render_root(&cdir, stack, true)?;
        // A component's resources join the set before its patches apply to the whole set.
        objects.append(&mut own);
        apply_patches(&cdir, &ck.patches, &mut objects)?;
        apply_images(&ck.images, &mut objects);
    }
    if !component {
        apply_patches(&dir, &k.patches, &mut objects)?;
        apply_images(&k.images, &mut objects);
    }
    if dir != Path::new("/") {
        stack.pop();
    }
    Ok(objects)
}

fn apply_patches(dir: &Path, patches: &[Patch], objects: &mut [Value]) -> Result<(), String> {
    for p in patches {
        let text = match (&p.path, &p.patch) {
            (Some(path), None) => {
                fs::read_to_string(dir.join(path)).map_err(|e| format!("{path}: {e}"))?
            }
            (None, Some(inline)) => inline.clone(),
            _ => {
                return Err(format!(
                    "{}: a patch needs exactly one of path, patch",
                    dir.display()
                ))
            }
        };
        let ops: Value = serde_norway::from_str::<serde_norway::Value>(&text)
            .map_err(|e| e.to_string())
            .and_then(|v| serde_json::to_value(v).map_err(|e| e.to_string()))?;
        let patch: json_patch::Patch = serde_json::from_value(ops).map_err(|e| {
            format!(
                "{}: only RFC 6902 JSON patches are supported here: {e}",
                dir.display()
            )
        })?;
        let mut matched = 0;
        for o in objects.iter_mut() {
            let is = |key: &str, want: &str| o.pointer(key).and_then(Value::as_str) == Some(want);
            if is("/kind", &p.target.kind) && is("/metadata/name", &p.target.name) {
                json_patch::patch(o, &patch).map_err(|e| {
                    format!(
                        "{}: patch on {}/{} fails: {e}",
                        dir.display(),
                        p.target.kind,
                        p.target.name
                    )
                })?;
                matched += 1;
            }
        }
        if matched == 0 {
            return Err(format!(
                "{}: patch target {}/{} matches no object",
                dir.display(),
                p.target.kind,
                p.target.name
            ));
        }
    }
    Ok(())
}

fn apply_images(images: &[Image], objects: &mut [Value]) {
    for o in objects.iter_mut() {
        let Some(spec) = o.pointer_mut("/spec/template/spec").or(None) else {
            continue;
        };
        for list in ["initContainers", "containers"] {
            for c in spec
                .get_mut(list)
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                let Some(image) = c.get("image").and_then(Value::as_str) else {
                    continue;
                };
                let (repo, tag) = split_image(image);
                let Some(i) = images.iter().find(|i| i.name == repo) else {
                    continue;
                };
                let name = i.new_name.clone().unwrap_or_else(|| repo.to_string());
                let new = match (&i.digest, &i.new_tag, tag) {
                    (Some(d), _, _) => format!("{name}@{d}"),
                    (None, Some(t), _) => format!("{name}:{t}"),
                    (None, None, Some(t)) => format!("{name}:{t}"),
                    (None, None, None) => name,
                };
                c["image"] = Value::String(new);
            }
        }
    }
}

fn split_image(image: &str) -> (&str, Option<&str>) {
    if let Some((r, _)) = image.split_once('@') {
        return (r, None);
    }
    match image.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r, Some(t)),
        _ => (image, None),
    }
}

/// The rendered objects as one multi-document YAML text.
pub fn to_yaml(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| serde_norway::to_string(o).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("---\n")
}
