//! `kubectl apply -k manifests/` installs exactly the files in manifests/, and maps the driver
//! image to the released one.

use super::workload::{image, image_repository, pods, DRIVER_IMAGE};
use crate::finding::Finding;
use crate::inventory::{Doc, Inventory, Origin};
use crate::kinds::Kustomization;

/// Where releases of the driver image are pushed.
pub const IMAGE_REPOSITORY: &str = "ghcr.io/loopvol/loopvol";
/// The driver image is tagged with the crate version, which this crate shares with the workspace.
pub const IMAGE_TAG: &str = env!("CARGO_PKG_VERSION");
const KUSTOMIZATION: &str = "kustomization.yaml";

pub fn check(inv: &Inventory) -> Vec<Finding> {
    // A rendered set has no kustomization left to check.
    if inv.rendered {
        return Vec::new();
    }
    let path = format!("manifests/{KUSTOMIZATION}");
    let Some((doc, k)) = inv
        .in_origin::<Kustomization>(Origin::Install)
        .find(|(doc, _)| doc.file == path)
    else {
        return vec![Finding::file(
            &path,
            "missing (or not a Kustomization): `kubectl apply -k manifests/` needs it",
        )];
    };
    let mut out = listed_files(inv, doc, k);
    out.extend(image_mapping(inv, doc, k));
    out
}

/// Every resource entry is a file in manifests/, and every manifests/*.yaml is an entry.
fn listed_files(inv: &Inventory, doc: &Doc, k: &Kustomization) -> Vec<Finding> {
    let installable: Vec<&str> = inv
        .files
        .iter()
        .filter(|f| f.origin == Origin::Install && !f.in_component())
        .map(|f| f.relative_to_manifests())
        .filter(|name| *name != KUSTOMIZATION)
        .collect();
    let mut out: Vec<Finding> = k
        .resources
        .iter()
        .filter_map(|entry| {
            let message = if entry.starts_with("examples/") {
                format!("resources lists {entry}: examples are user workloads and must not be installed")
            } else if !installable.contains(&entry.as_str()) {
                format!("resources lists {entry}, but there is no manifests/{entry}")
            } else {
                return None;
            };
            Some(doc.finding(message))
        })
        .collect();
    out.extend(
        installable
            .iter()
            .filter(|name| !k.resources.iter().any(|r| r == *name))
            .map(|name| {
                doc.finding(format!(
                    "manifests/{name} is not listed in resources, so `kubectl apply -k` would not install it"
                ))
            }),
    );
    out
}

/// `images:` maps `loopvol` to the released image of this version, and maps nothing else.
fn image_mapping(inv: &Inventory, doc: &Doc, k: &Kustomization) -> Vec<Finding> {
    let used: Vec<&str> = pods(inv)
        .iter()
        .flat_map(|p| p.containers())
        .map(|c| image_repository(image(c)))
        .collect();
    let mut out: Vec<Finding> = k
        .images
        .iter()
        .filter(|i| !used.contains(&i.name.as_str()))
        .map(|i| {
            doc.finding(format!(
                "images entry {} matches no container image",
                i.name
            ))
        })
        .collect();
    let expected = format!("{IMAGE_REPOSITORY}:{IMAGE_TAG}");
    match k.images.iter().find(|i| i.name == DRIVER_IMAGE) {
        None => out.push(doc.finding(format!(
            "images has no entry for {DRIVER_IMAGE}; add name: {DRIVER_IMAGE}, newName: \
             {IMAGE_REPOSITORY}, newTag: {IMAGE_TAG}"
        ))),
        Some(i) => {
            let actual = format!(
                "{}:{}",
                i.new_name.as_deref().unwrap_or(DRIVER_IMAGE),
                i.new_tag.as_deref().unwrap_or("latest")
            );
            if actual != expected || i.digest.is_some() {
                out.push(doc.finding(format!(
                    "images maps {DRIVER_IMAGE} to {actual}{}, but this release is {expected}",
                    i.digest.as_deref().map(|d| format!("@{d}")).unwrap_or_default()
                )));
            }
        }
    }
    out
}
