//! `loopvol csi info` and the JSON shapes the commands print.

use super::*;

/// Everything a person asks first: who answers, what it can do, whether it is ready, which
/// node it is. Services this process does not serve (`--mode`) show as null.
pub(super) async fn info(c: &mut Clients) -> Result<Value, Status> {
    let plugin = c
        .identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await?
        .into_inner();
    let caps = c
        .identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await?
        .into_inner();
    let ready = match c.identity.probe(ProbeRequest {}).await {
        Ok(r) => json!(r.into_inner().ready.unwrap_or(true)),
        Err(s) => json!(format!(
            "{}: {}",
            crate::metrics::code_name(s.code()),
            s.message()
        )),
    };
    let controller_caps = optional(
        c.controller
            .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
            .await,
    )?
    .map(|r| {
        r.capabilities
            .iter()
            .filter_map(|cap| match &cap.r#type {
                Some(controller_service_capability::Type::Rpc(rpc)) => {
                    controller_service_capability::rpc::Type::try_from(rpc.r#type)
                        .ok()
                        .map(|t| t.as_str_name())
                }
                None => None,
            })
            .collect::<Vec<_>>()
    });
    let node_info = optional(c.node.node_get_info(NodeGetInfoRequest {}).await)?.map(|n| {
        json!({
            "node_id": n.node_id,
            "max_volumes_per_node": n.max_volumes_per_node,
            "topology": n.accessible_topology.map(|t| t.segments),
        })
    });
    let node_caps = optional(
        c.node
            .node_get_capabilities(NodeGetCapabilitiesRequest {})
            .await,
    )?
    .map(|r| {
        r.capabilities
            .iter()
            .filter_map(|cap| match &cap.r#type {
                Some(node_service_capability::Type::Rpc(rpc)) => {
                    node_service_capability::rpc::Type::try_from(rpc.r#type)
                        .ok()
                        .map(|t| t.as_str_name())
                }
                None => None,
            })
            .collect::<Vec<_>>()
    });
    Ok(json!({
        "plugin": {
            "name": plugin.name,
            "vendor_version": plugin.vendor_version,
            "manifest": plugin.manifest,
        },
        "plugin_capabilities": caps.capabilities.iter().filter_map(plugin_cap_name).collect::<Vec<_>>(),
        "ready": ready,
        "controller_capabilities": controller_caps,
        "node": node_info,
        "node_capabilities": node_caps,
    }))
}

/// A service the process does not serve answers UNIMPLEMENTED: that is "absent", not an error.
pub(super) fn optional<T>(r: Result<tonic::Response<T>, Status>) -> Result<Option<T>, Status> {
    match r {
        Ok(r) => Ok(Some(r.into_inner())),
        Err(s) if s.code() == Code::Unimplemented => Ok(None),
        Err(s) => Err(s),
    }
}

pub(super) fn plugin_cap_name(c: &PluginCapability) -> Option<String> {
    use plugin_capability::{service, volume_expansion, Type};
    match c.r#type.as_ref()? {
        Type::Service(s) => service::Type::try_from(s.r#type)
            .ok()
            .map(|t| t.as_str_name().to_string()),
        Type::VolumeExpansion(v) => volume_expansion::Type::try_from(v.r#type)
            .ok()
            .map(|t| format!("VOLUME_EXPANSION_{}", t.as_str_name())),
    }
}

pub(super) fn unit_name(unit: i32) -> &'static str {
    volume_usage::Unit::try_from(unit)
        .map(|u| u.as_str_name())
        .unwrap_or("UNKNOWN")
}

pub(super) fn volume_json(v: &Volume) -> Value {
    json!({
        "volume_id": v.volume_id,
        "capacity_bytes": v.capacity_bytes,
        "volume_context": v.volume_context,
        "accessible_topology": v.accessible_topology.iter().map(|t| &t.segments).collect::<Vec<_>>(),
    })
}

/// One shape for a snapshot wherever one is printed (create, list, groups): times in RFC 3339,
/// as every other time the CLI prints.
pub(super) fn snapshot_json(s: &Snapshot) -> Value {
    json!({
        "snapshot_id": s.snapshot_id,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "ready_to_use": s.ready_to_use,
        "creation_time": s.creation_time.as_ref()
            .map(|t| super::super::output::rfc3339(t.seconds.max(0) as u64)),
    })
}
