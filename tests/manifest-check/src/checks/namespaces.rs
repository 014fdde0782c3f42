//! Installed objects live in loopvol-system; examples go wherever the user applies them.

use super::NAMESPACE;
use crate::finding::Finding;
use crate::inventory::{Doc, Inventory, Origin};
use k8s_openapi::api::core::v1::Namespace;

pub fn check(inv: &Inventory) -> Vec<Finding> {
    let mut out: Vec<Finding> = inv.docs.iter().filter_map(placement).collect();
    if !inv.has::<Namespace>("", NAMESPACE) {
        out.push(Finding::file(
            "manifests/",
            format!("no Namespace {NAMESPACE}: the installed objects live there, so it must be created too"),
        ));
    }
    out
}

fn placement(doc: &Doc) -> Option<Finding> {
    let message = match (doc.origin, doc.namespaced, doc.namespace.as_deref()) {
        (_, false, Some(ns)) => format!(
            "{} is cluster-scoped; remove metadata.namespace ({ns})",
            doc.kind
        ),
        (Origin::Install, true, Some(NAMESPACE)) => return None,
        (Origin::Install, true, Some(ns)) => {
            format!("is in namespace {ns}; everything loopvol installs goes in {NAMESPACE}")
        }
        (Origin::Install, true, None) => format!(
            "has no metadata.namespace, so it would land in whatever namespace kubectl uses; \
             set it to {NAMESPACE}"
        ),
        (Origin::Example, true, Some(ns)) => format!(
            "examples are applied into the user's own namespace; remove metadata.namespace ({ns})"
        ),
        (Origin::Example, _, None) | (_, false, None) => return None,
    };
    Some(doc.finding(message))
}
