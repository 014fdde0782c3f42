//! End-to-end tests of the Identity and Controller services against the real binary.

mod common;

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::*;
use loopvol::csi::volume_capability::access_mode::Mode;
use loopvol::csi::*;
use tonic::Code;

fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_reports_name_capabilities_and_readiness() {
    if !root_or_skip("identity") {
        return;
    }
    let d = Driver::start().await;
    let mut id = d.identity().await;
    let info = id
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "loopvol.csi.dev");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = id
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let services: HashSet<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    use plugin_capability::service::Type as S;
    assert!(services.contains(&(S::ControllerService as i32)));
    assert!(services.contains(&(S::VolumeAccessibilityConstraints as i32)));
    let probe = id.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket must be private to root");

    let mut c = d.controller().await;
    let ccaps = c
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use controller_service_capability::rpc::Type as R;
    let rpcs: HashSet<i32> = ccaps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|controller_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for want in [
        R::CreateDeleteVolume,
        R::ListVolumes,
        R::GetCapacity,
        R::GetVolume,
    ] {
        assert!(rpcs.contains(&(want as i32)), "{want:?} missing");
    }
    assert!(
        !rpcs.contains(&(R::PublishUnpublishVolume as i32)),
        "no attach step"
    );
    for opt_in in [R::GetSnapshot, R::GetVolumeHealth, R::ListVolumeHealth] {
        assert!(
            !rpcs.contains(&(opt_in as i32)),
            "{opt_in:?} is unknown to released clients and must be opt-in"
        );
    }
}

/// The controller and node capability values as one process advertises them.
async fn advertised(d: &Driver) -> (HashSet<i32>, HashSet<i32>) {
    let mut c = d.controller().await;
    let mut n = d.node().await;
    let ctrl = c
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| c.r#type)
        .map(|controller_service_capability::Type::Rpc(r)| r.r#type)
        .collect();
    let node = n
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| c.r#type)
        .map(|node_service_capability::Type::Rpc(r)| r.r#type)
        .collect();
    (ctrl, node)
}

#[tokio::test(flavor = "multi_thread")]
async fn newer_capabilities_are_advertised_only_when_asked_for() {
    if !root_or_skip("opt_in_capabilities") {
        return;
    }
    use controller_service_capability::rpc::Type as C;
    use node_service_capability::rpc::Type as N;
    let plain = Driver::start().await;
    let (base_c, base_n) = advertised(&plain).await;
    let d = Driver::start_with(&["--advertise-capabilities", "volume-health,get-snapshot"]).await;
    let (c, n) = advertised(&d).await;
    let added_c: HashSet<i32> = c.difference(&base_c).copied().collect();
    let added_n: HashSet<i32> = n.difference(&base_n).copied().collect();
    assert_eq!(
        added_c,
        HashSet::from([
            C::GetSnapshot as i32,
            C::GetVolumeHealth as i32,
            C::ListVolumeHealth as i32
        ])
    );
    assert_eq!(
        added_n,
        HashSet::from([N::GetVolumeHealth as i32, N::GetStorageHealth as i32])
    );
    assert!(base_c.is_subset(&c) && base_n.is_subset(&n));
    // The RPCs answer without the advertisement too.
    let mut pc = plain.controller().await;
    pc.controller_list_volume_health(ControllerListVolumeHealthRequest::default())
        .await
        .expect("ListVolumeHealth is served even when not advertised");
    // An unknown group name is refused at start-up.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopvol"))
        .args(["serve", "--advertise-capabilities", "volume-condition"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("volume-condition"));
}

#[tokio::test(flavor = "multi_thread")]
async fn create_and_delete_make_and_remove_real_files() {
    if !root_or_skip("create_delete") {
        return;
    }
    let d = Driver::start().await;
    let mut c = d.controller().await;
    let vol = c
        .create_volume(create_req("pvc-basic", 10 * MIB + 1, rw_mount("")))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.capacity_bytes, 11 * MIB, "rounded up to whole MiB");
    assert!(vol.volume_id.ends_with(&format!("@{NODE}")));
    assert!(vol.volume_id.len() <= 128);
    assert_eq!(
        vol.accessible_topology[0]
            .segments
            .get(loopvol::TOPOLOGY_KEY)
            .map(String::as_str),
        Some(NODE)
    );
    let img = d.image_of(&vol.volume_id);
    let meta = std::fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), 11 * MIB as u64);
    assert_eq!(meta.blocks(), 0, "thin volumes are sparse");

    // Default size when no capacity range is given.
    let mut req = create_req("pvc-default", 0, rw_mount(""));
    req.capacity_range = None;
    let dflt = c
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(dflt.capacity_bytes, 1 << 30);

    c.delete_volume(DeleteVolumeRequest {
        volume_id: vol.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!img.exists());
    // Idempotent, and unknown IDs are fine too.
    c.delete_volume(DeleteVolumeRequest {
        volume_id: vol.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_volume(DeleteVolumeRequest {
        volume_id: "fake-vol-id".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        code_of(c.delete_volume(DeleteVolumeRequest::default()).await),
        Code::InvalidArgument
    );
    assert_eq!(
        files_in(&d.pool.join("volumes")).len(),
        2,
        "only pvc-default remains"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_and_change_nothing() {
    if !root_or_skip("bad_requests") {
        return;
    }
    let d = Driver::start().await;
    let mut c = d.controller().await;
    let long = "a".repeat(129);
    let mut cases: Vec<(CreateVolumeRequest, Code, &str)> = vec![
        (
            create_req("", MIB, rw_mount("")),
            Code::InvalidArgument,
            "name",
        ),
        (
            create_req("a/b", MIB, rw_mount("")),
            Code::InvalidArgument,
            "'/'",
        ),
        (
            create_req("..", MIB, rw_mount("")),
            Code::InvalidArgument,
            "'..'",
        ),
        (
            create_req("a\0b", MIB, rw_mount("")),
            Code::InvalidArgument,
            "NUL",
        ),
        (
            create_req(&long, MIB, rw_mount("")),
            Code::InvalidArgument,
            "128",
        ),
        (
            create_req("x", MIB, rw_mount("ntfs")),
            Code::InvalidArgument,
            "ntfs",
        ),
        (
            create_req("x", MIB, mount_cap("", Mode::MultiNodeMultiWriter)),
            Code::InvalidArgument,
            "MULTI_NODE",
        ),
        (
            create_req("x", i64::MAX, rw_mount("")),
            Code::OutOfRange,
            "maximum",
        ),
    ];
    let mut no_caps = create_req("x", MIB, rw_mount(""));
    no_caps.volume_capabilities.clear();
    cases.push((no_caps, Code::InvalidArgument, "volume_capabilities"));
    let mut no_mode = create_req("x", MIB, rw_mount(""));
    no_mode.volume_capabilities[0].access_mode = None;
    cases.push((no_mode, Code::InvalidArgument, "access_mode"));
    let mut unknown_param = create_req("x", MIB, rw_mount(""));
    unknown_param.parameters = HashMap::from([("fstype".into(), "ext4".into())]);
    cases.push((unknown_param, Code::InvalidArgument, "\"fstype\""));
    let mut bad_alloc = create_req("x", MIB, rw_mount(""));
    bad_alloc.parameters = HashMap::from([("allocation".into(), "lazy".into())]);
    cases.push((bad_alloc, Code::InvalidArgument, "lazy"));
    let mut inverted = create_req("x", 10 * MIB, rw_mount(""));
    inverted.capacity_range.as_mut().unwrap().limit_bytes = MIB;
    cases.push((inverted, Code::OutOfRange, "limit"));
    let mut elsewhere = create_req("x", MIB, rw_mount(""));
    elsewhere.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![loopvol::edge::controller::topology("other-node")],
        preferred: vec![],
    });
    cases.push((elsewhere, Code::ResourceExhausted, "requisite"));
    let mut hostile = create_req("x", MIB, rw_mount(""));
    if let Some(volume_capability::AccessType::Mount(m)) =
        &mut hostile.volume_capabilities[0].access_type
    {
        m.mount_flags = vec!["noatime,suid".into()];
    }
    cases.push((hostile, Code::InvalidArgument, "mount flag"));
    let mut thick_huge = create_req("x", 1 << 43, rw_mount(""));
    thick_huge.parameters = HashMap::from([("allocation".into(), "thick".into())]);
    cases.push((thick_huge, Code::ResourceExhausted, "bytes"));

    for (req, code, needle) in cases {
        let name = format!("{:?}", req.name);
        let err = c.create_volume(req).await.expect_err(&name);
        assert_eq!(err.code(), code, "{name}: {}", err.message());
        assert!(
            err.message().contains(needle),
            "{name}: message {:?} lacks {needle:?}",
            err.message()
        );
    }
    assert!(
        files_in(&d.pool.join("volumes")).is_empty(),
        "a refused request left files"
    );
    assert!(files_in(&d.pool.join("tmp")).is_empty());

    // IDs with path tricks are refused everywhere, not resolved.
    for bad in ["../../etc/passwd", "vol-x/../../y", "a\0b"] {
        let r = c
            .controller_get_volume(ControllerGetVolumeRequest {
                volume_id: bad.into(),
            })
            .await;
        assert_eq!(code_of(r), Code::InvalidArgument, "{bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn create_is_idempotent_by_name() {
    if !root_or_skip("idempotent") {
        return;
    }
    let d = Driver::start().await;
    let mut c = d.controller().await;
    let a = c
        .create_volume(create_req("same", 4 * MIB, rw_mount("ext4")))
        .await
        .unwrap()
        .into_inner();
    let b = c
        .create_volume(create_req("same", 4 * MIB, rw_mount("ext4")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        a.volume.as_ref().unwrap().volume_id,
        b.volume.as_ref().unwrap().volume_id
    );
    let e = c
        .create_volume(create_req("same", 64 * MIB, rw_mount("ext4")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let e = c
        .create_volume(create_req("same", 4 * MIB, rw_mount("btrfs")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert_eq!(files_in(&d.pool.join("volumes")).len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_creates_of_one_name_make_one_volume() {
    if !root_or_skip("concurrent_creates") {
        return;
    }
    let d = Driver::start().await;
    let c = d.controller().await;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move {
                c.create_volume(create_req("racy", 8 * MIB, rw_mount("")))
                    .await
                    .map(|r| r.into_inner().volume.unwrap().volume_id)
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap().expect("every racer gets the volume"));
    }
    assert_eq!(ids.len(), 1);
    let files = files_in(&d.pool.join("volumes"));
    assert_eq!(
        files.iter().filter(|f| f.ends_with(".img")).count(),
        1,
        "{files:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn thick_volumes_are_fully_allocated() {
    if !root_or_skip("thick") {
        return;
    }
    let d = Driver::start().await;
    let mut c = d.controller().await;
    let mut req = create_req("thick", 32 * MIB, rw_mount("xfs"));
    req.parameters = HashMap::from([("allocation".into(), "thick".into())]);
    let v = c
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        v.capacity_bytes,
        300 * MIB,
        "xfs volumes are at least 300 MiB"
    );
    let m = std::fs::metadata(d.image_of(&v.volume_id)).unwrap();
    assert!(
        m.blocks() * 512 >= 300 * MIB as u64,
        "allocated {} bytes",
        m.blocks() * 512
    );
    assert_eq!(
        v.volume_context.get("allocation").map(String::as_str),
        Some("thick")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn list_volumes_paginates_every_volume_once() {
    if !root_or_skip("list_volumes") {
        return;
    }
    let d = Driver::start().await;
    let mut c = d.controller().await;
    let mut created = HashSet::new();
    for i in 0..10 {
        let v = c
            .create_volume(create_req(&format!("list-{i}"), MIB, rw_mount("")))
            .await
            .unwrap();
        created.insert(v.into_inner().volume.unwrap().volume_id);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut deleted_mid_way = false;
    loop {
        let page = c
            .list_volumes(ListVolumesRequest {
                max_entries: 3,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 3);
        seen.extend(
            page.entries
                .iter()
                .map(|e| e.volume.as_ref().unwrap().volume_id.clone()),
        );
        if page.next_token.is_empty() {
            break;
        }
        // The token stays valid when the last volume of the page is deleted meanwhile.
        if !deleted_mid_way {
            let last = seen.last().unwrap().clone();
            c.delete_volume(DeleteVolumeRequest {
                volume_id: last,
                ..Default::default()
            })
            .await
            .unwrap();
            deleted_mid_way = true;
        }
        token = page.next_token;
    }
    let unique: HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no duplicates");
    assert_eq!(unique, created);
    assert_eq!(
        code_of(
            c.list_volumes(ListVolumesRequest {
                max_entries: 0,
                starting_token: "bogus".into()
            })
            .await
        ),
        Code::Aborted
    );
    assert_eq!(
        code_of(
            c.list_volumes(ListVolumesRequest {
                max_entries: -1,
                starting_token: String::new()
            })
            .await
        ),
        Code::InvalidArgument
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn capacity_counts_thin_promises_and_topology() {
    if !root_or_skip("capacity") {
        return;
    }
    let d = Driver::start().await;
    let mut c = d.controller().await;
    let cap = |params: HashMap<String, String>, topo: Option<Topology>| GetCapacityRequest {
        volume_capabilities: vec![rw_mount("")],
        parameters: params,
        accessible_topology: topo,
    };
    let before = c
        .get_capacity(cap(HashMap::new(), None))
        .await
        .unwrap()
        .into_inner();
    assert!(before.available_capacity > 0);
    assert!(before.maximum_volume_size.unwrap() <= before.available_capacity);
    c.create_volume(create_req("reserve", 1 << 30, rw_mount("")))
        .await
        .unwrap();
    let after = c
        .get_capacity(cap(HashMap::new(), None))
        .await
        .unwrap()
        .into_inner();
    let drop = before.available_capacity - after.available_capacity;
    // Other tests share the filesystem, so allow their noise around the 1 GiB promise.
    assert!(
        (drop - (1 << 30)).abs() < 256 * MIB,
        "capacity dropped by {drop}"
    );
    let other = c
        .get_capacity(cap(
            HashMap::new(),
            Some(loopvol::edge::controller::topology("other-node")),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.available_capacity, 0);
    let mine = c
        .get_capacity(cap(
            HashMap::new(),
            Some(loopvol::edge::controller::topology(NODE)),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(mine.available_capacity > 0);
    let bad = c
        .get_capacity(cap(HashMap::from([("colour".into(), "red".into())]), None))
        .await;
    assert_eq!(code_of(bad), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread")]
async fn validate_and_get_volume() {
    if !root_or_skip("validate") {
        return;
    }
    let d = Driver::start().await;
    let mut c = d.controller().await;
    let v = c
        .create_volume(create_req("val", MIB * 16, rw_mount("ext4")))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let ok = c
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id.clone(),
            volume_capabilities: vec![rw_mount("ext4"), block_cap(Mode::SingleNodeReaderOnly)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some(), "{}", ok.message);
    for caps in [
        vec![mount_cap("", Mode::MultiNodeReaderOnly)],
        vec![rw_mount("xfs")],
    ] {
        let no = c
            .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: v.volume_id.clone(),
                volume_capabilities: caps,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(no.confirmed.is_none());
        assert!(!no.message.is_empty());
    }
    let unknown = c
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: format!("vol-0123456789abcdef0123@{NODE}"),
            volume_capabilities: vec![rw_mount("")],
            ..Default::default()
        })
        .await;
    assert_eq!(code_of(unknown), Code::NotFound);
    let missing = c
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(code_of(missing), Code::InvalidArgument);

    let got = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, 16 * MIB);
    let nf = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "fake-vol-id".into(),
        })
        .await;
    assert_eq!(code_of(nf), Code::NotFound);

    // Health: fine, then the backing file disappears behind our back.
    let h = c
        .controller_get_volume_health(ControllerGetVolumeHealthRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(h.volume_health.unwrap().health_statuses.is_empty());
    std::fs::remove_file(d.image_of(&v.volume_id)).unwrap();
    let h = c
        .controller_get_volume_health(ControllerGetVolumeHealthRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume_health
        .unwrap();
    assert_eq!(
        h.health_statuses[0].status,
        VolumeHealthErrorType::DataLoss as i32
    );
    assert_eq!(h.health_statuses[0].reason, "BackingFileMissing");
    let listed = c
        .controller_list_volume_health(ControllerListVolumeHealthRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_volumes_and_sigterm_cleans_the_socket() {
    if !root_or_skip("restart") {
        return;
    }
    let mut d = Driver::start().await;
    let id = {
        let mut c = d.controller().await;
        c.create_volume(create_req("survivor", 2 * MIB, rw_mount("")))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id
    };
    let status = d.stop();
    assert!(status.success(), "SIGTERM exit: {status}");
    assert!(!d.socket.exists(), "socket removed on shutdown");
    // A stale socket file with nobody listening is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&d.socket).unwrap();
    drop(stale);
    assert!(d.socket.exists());
    d.spawn().await;
    let mut c = d.controller().await;
    let got = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        got.into_inner().volume.unwrap().capacity_bytes,
        8 * MIB,
        "ext4 minimum"
    );

    // A second server on a live socket refuses to steal it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopvol"))
        .args(["serve", "--mode", "controller", "--node-id", NODE])
        .arg("--endpoint")
        .arg(format!("unix://{}", d.socket.display()))
        .arg("--pool-dir")
        .arg(d.path("other-pool"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And a second server on the same pool is refused too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loopvol"))
        .args(["serve", "--node-id", NODE])
        .arg("--endpoint")
        .arg(format!("unix://{}", d.path("second.sock").display()))
        .arg("--pool-dir")
        .arg(&d.pool)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("locked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// kill -9 in the middle of a burst of creates and deletes; the restarted driver must find a
/// pool where records and images agree and every acknowledged create still exists.
#[tokio::test(flavor = "multi_thread")]
async fn kill_during_burst_leaves_a_consistent_pool() {
    if !root_or_skip("kill9_burst") {
        return;
    }
    let mut d = Driver::start().await;
    for round in 0..3u64 {
        let c = d.controller().await;
        // "keep" volumes are only ever created: every acknowledged one must survive. "churn"
        // volumes are created and deleted concurrently: they only have to stay consistent.
        let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let mut tasks = Vec::new();
        for i in 0..40u64 {
            let mut c = c.clone();
            let acked = acked.clone();
            tasks.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    let name = format!("keep-{round}-{i}");
                    if let Ok(r) = c
                        .create_volume(create_req(&name, 4 * MIB, rw_mount("")))
                        .await
                    {
                        acked
                            .lock()
                            .unwrap()
                            .push(r.into_inner().volume.unwrap().volume_id);
                    }
                } else {
                    let name = format!("churn-{round}-{}", i % 6);
                    let _ = c
                        .create_volume(create_req(&name, 4 * MIB, rw_mount("")))
                        .await;
                    let _ = c
                        .delete_volume(DeleteVolumeRequest {
                            volume_id: loopvol_id(&name),
                            ..Default::default()
                        })
                        .await;
                }
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(15 + 10 * round)).await;
        d.kill9();
        for t in tasks {
            let _ = t.await;
        }
        d.spawn().await;
        let mut c = d.controller().await;
        let listed: HashSet<String> = c
            .list_volumes(ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries
            .into_iter()
            .map(|e| e.volume.unwrap().volume_id)
            .collect();
        let acked = acked.lock().unwrap().clone();
        for id in &acked {
            assert!(listed.contains(id), "acknowledged volume {id} lost");
        }
        let files = files_in(&d.pool.join("volumes"));
        let imgs: HashSet<_> = files
            .iter()
            .filter_map(|f| f.strip_suffix(".img"))
            .collect();
        let recs: HashSet<_> = files
            .iter()
            .filter_map(|f| f.strip_suffix(".json"))
            .collect();
        assert_eq!(
            imgs, recs,
            "records and images disagree after restart: {files:?}"
        );
        assert_eq!(recs.len(), listed.len());
        assert!(files_in(&d.pool.join("tmp")).is_empty());
    }
}

fn loopvol_id(name: &str) -> String {
    provisioner::VolumeId::from_name(provisioner::ids::Kind::Volume, name, NODE).to_string()
}
