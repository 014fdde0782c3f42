//! The driver image is the bare name `loopvol` (kustomize maps it); every other image is
//! pinned to a release.

use super::workload::{image, image_tag, is_driver, pods, sidecar, DRIVER_IMAGE};
use crate::finding::Finding;
use crate::inventory::Inventory;
use k8s_openapi::api::core::v1::Container;

pub fn check(inv: &Inventory) -> Vec<Finding> {
    pods(inv)
        .iter()
        .flat_map(|pod| {
            pod.containers()
                .filter_map(|c| problem(c, inv.rendered).map(|m| pod.finding(c, m)))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn problem(c: &Container, rendered: bool) -> Option<String> {
    let image = image(c);
    if is_driver(c) && rendered {
        // After a build, `images:` must have given the bare name a registry and a tag.
        return (image == DRIVER_IMAGE || image_tag(image).is_none()).then(|| {
            format!("image {image}: the build left the driver image unmapped; `images:` must name {DRIVER_IMAGE}")
        });
    }
    if is_driver(c) {
        return (image != DRIVER_IMAGE).then(|| {
            format!(
                "image {image}: the driver's image must be exactly `{DRIVER_IMAGE}`; \
                 kustomization.yaml `images:` sets its registry and tag in one place"
            )
        });
    }
    let digest = image.contains("@sha256:");
    match image_tag(image) {
        _ if image.is_empty() => Some("has no image".to_string()),
        None if digest => None,
        None => Some(format!("image {image} has no tag; pin a released version")),
        Some("latest") => Some(format!(
            "image {image} uses :latest; pin a released version"
        )),
        Some(tag) if sidecar(c).is_some() && !is_release_tag(tag) => Some(format!(
            "image {image}: sig-storage sidecars are released as vMAJOR.MINOR.PATCH tags"
        )),
        Some(_) => None,
    }
}

fn is_release_tag(tag: &str) -> bool {
    let Some(version) = tag.strip_prefix('v') else {
        return false;
    };
    let parts: Vec<&str> = version.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}
