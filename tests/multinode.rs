//! Router mode end to end: three node plugins on 127.0.0.2/3/4, each serving its own pool over
//! mTLS, and one router on a unix socket that the sidecars would talk to.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;
use loopvol::csi::controller_client::ControllerClient;
use loopvol::csi::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn router_places_routes_paginates_and_survives_a_node_outage() {
    if !root_or_skip("multinode") {
        return;
    }
    let mut cl = Cluster::start();
    let mut r = cl.router().await;

    // Placement follows the topology; each backing file lands in its node's pool.
    let mut ids = Vec::new();
    for node in 1..=3u8 {
        let v = r
            .create_volume(on_node(&format!("pvc-n{node}"), node))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert!(
            v.volume_id.ends_with(&format!("@n{node}")),
            "{}",
            v.volume_id
        );
        assert!(cl.image(node, &v.volume_id).exists());
        ids.push(v.volume_id);
    }
    // Unconstrained: the node with the most room (any of them here) — and the file is there.
    let free = r
        .create_volume(create_req("pvc-free", 16 * MIB, rw_mount("")))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let node: u8 = free.volume_id.rsplit_once("@n").unwrap().1.parse().unwrap();
    assert!(cl.image(node, &free.volume_id).exists());

    // ID-routed calls.
    let grown = r
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: ids[1].clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 32 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 32 * MIB);
    assert_eq!(
        std::fs::metadata(cl.image(2, &ids[1])).unwrap().len(),
        32 * MIB as u64
    );
    let snap = r
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: ids[2].clone(),
            name: "snap-n3".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.snapshot_id.ends_with("@n3"));
    // Its image and record (and, on a pool without reflink, its chunk digests).
    assert_eq!(
        std::fs::read_dir(cl.pool(3).join("snapshots"))
            .unwrap()
            .filter(|e| !e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".chunks"))
            .count(),
        2
    );
    // A restore goes where the topology asks (n1 pulls the data from n3); without topology
    // it stays on the snapshot's node.
    let restore = common::transfer::from_snapshot(on_node("restore", 1), &snap.snapshot_id);
    let (elsewhere, _) =
        common::transfer::create_until_ready(&mut r, &restore, Duration::from_secs(60))
            .await
            .unwrap();
    assert!(
        elsewhere.volume_id.ends_with("@n1"),
        "{}",
        elsewhere.volume_id
    );
    let mut restore = restore;
    restore.name = "restore-here".into();
    restore.accessibility_requirements = None;
    let restored = r
        .create_volume(restore)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(restored.volume_id.ends_with("@n3"));
    r.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    r.delete_volume(DeleteVolumeRequest {
        volume_id: ids[0].clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(!cl.image(1, &ids[0]).exists());
    r.delete_volume(DeleteVolumeRequest {
        volume_id: "fake-vol-id".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Capacity per node, by topology segment.
    let cap = |node: &str| GetCapacityRequest {
        volume_capabilities: vec![rw_mount("")],
        accessible_topology: Some(loopvol::edge::controller::topology(node)),
        ..Default::default()
    };
    assert!(
        r.get_capacity(cap("n2"))
            .await
            .unwrap()
            .into_inner()
            .available_capacity
            > 0
    );
    // A node the router does not know is not a node without room.
    assert_eq!(code_of(r.get_capacity(cap("n9")).await), Code::Unavailable);

    // Pagination across nodes, with volumes added between pages: nothing lost, nothing twice.
    for i in 0..7u8 {
        r.create_volume(on_node(&format!("page-{i}"), i % 3 + 1))
            .await
            .unwrap();
    }
    let before: HashSet<String> = r
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut added = 0;
    loop {
        let page = r
            .list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        seen.extend(
            page.entries
                .into_iter()
                .map(|e| e.volume.unwrap().volume_id),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
        r.create_volume(on_node(&format!("late-{added}"), added % 3 + 1))
            .await
            .unwrap();
        added += 1;
    }
    let unique: HashSet<String> = seen.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "duplicates across pages: {seen:?}"
    );
    assert!(
        before.is_subset(&unique),
        "lost: {:?}",
        before.difference(&unique).collect::<Vec<_>>()
    );
    assert_eq!(
        code_of(
            r.list_volumes(ListVolumesRequest {
                max_entries: 1,
                starting_token: "junk".into()
            })
            .await
        ),
        Code::Aborted
    );

    // A node goes down: its volumes are UNAVAILABLE (never NOT_FOUND), the others keep working.
    cl.nodes[1].stop();
    let down = r
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: ids[1].clone(),
        })
        .await;
    assert_eq!(code_of(down), Code::Unavailable);
    let del = r
        .delete_volume(DeleteVolumeRequest {
            volume_id: ids[1].clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(code_of(del), Code::Unavailable);
    assert_eq!(
        code_of(r.create_volume(on_node("while-down", 2)).await),
        Code::Unavailable
    );
    r.controller_get_volume(ControllerGetVolumeRequest {
        volume_id: ids[2].clone(),
    })
    .await
    .unwrap();
    r.create_volume(on_node("still-fine", 1)).await.unwrap();
    assert_eq!(
        code_of(r.list_volumes(ListVolumesRequest::default()).await),
        Code::Unavailable,
        "a partial list would lose volumes"
    );
    cl.nodes[1].spawn();
    let mut back = None;
    for _ in 0..50 {
        match r
            .controller_get_volume(ControllerGetVolumeRequest {
                volume_id: ids[1].clone(),
            })
            .await
        {
            Ok(v) => {
                back = Some(v.into_inner());
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(
        back.expect("node came back").volume.unwrap().capacity_bytes,
        32 * MIB
    );
}

/// Named pools behind the router: IDs `vol-<hex>~fast@<node>` are routed by their node part,
/// the node finds the pool, and lists page across nodes and pools.
#[tokio::test(flavor = "multi_thread")]
async fn router_routes_volumes_of_named_pools() {
    if !root_or_skip("router_routes_volumes_of_named_pools") {
        return;
    }
    let cl = Cluster::start();
    let mut r = cl.router().await;
    let in_fast = |name: &str, node: u8| {
        let mut req = on_node(name, node);
        req.parameters.insert("pool".into(), "fast".into());
        req
    };
    let mut ids = HashSet::new();
    for (name, node, fast) in [("f2", 2, true), ("f3", 3, true), ("d2", 2, false)] {
        let req = if fast {
            in_fast(name, node)
        } else {
            on_node(name, node)
        };
        let v = r
            .create_volume(req)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let pool_dir = if fast { "fast" } else { "pool" };
        let suffix = if fast {
            format!("~fast@n{node}")
        } else {
            format!("@n{node}")
        };
        assert!(v.volume_id.ends_with(&suffix), "{}", v.volume_id);
        let image = cl.dir.path().join(format!(
            "n{node}/{pool_dir}/volumes/{}.img",
            hex_of(&v.volume_id)
        ));
        assert!(image.exists(), "{}", image.display());
        ids.insert(v.volume_id);
    }
    let f2 = ids
        .iter()
        .find(|i| i.ends_with("~fast@n2"))
        .unwrap()
        .clone();
    // Routed by ID: the node's pool answers.
    let got = r
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: f2.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().volume_id, f2);
    // Capacity per node and pool: a pool no node has offers nothing.
    let cap = |pool: &str| GetCapacityRequest {
        parameters: [("pool".to_string(), pool.to_string())].into(),
        accessible_topology: Some(loopvol::edge::controller::topology("n2")),
        ..Default::default()
    };
    let fast = r.get_capacity(cap("fast")).await.unwrap().into_inner();
    assert!(fast.available_capacity > 0);
    let none = r.get_capacity(cap("nvme")).await.unwrap().into_inner();
    assert_eq!(none.available_capacity, 0);
    // Every volume once, one per page, across nodes and their pools.
    let mut listed = HashSet::new();
    let mut token = String::new();
    loop {
        let page = r
            .list_volumes(ListVolumesRequest {
                max_entries: 1,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        for e in page.entries {
            assert!(listed.insert(e.volume.unwrap().volume_id));
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(listed, ids);
    for id in &ids {
        r.delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert!(!cl
        .dir
        .path()
        .join(format!("n2/fast/volumes/{}.img", hex_of(&f2)))
        .exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pool_port_refuses_clients_without_a_valid_certificate() {
    if !root_or_skip("mtls") {
        return;
    }
    let cl = Cluster::start();
    let url = format!("https://127.0.0.2:{}", cl.ports[0]);
    let ca = Certificate::from_pem(std::fs::read(cl.dir.path().join("certs/ca.crt")).unwrap());
    let try_with = |identity: Option<Identity>| {
        let url = url.clone();
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .domain_name("loopvol-node");
        if let Some(id) = identity {
            tls = tls.identity(id);
        }
        async move {
            let ch = Endpoint::from_shared(url)
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await;
            match ch {
                Err(e) => Err(e.to_string()),
                Ok(ch) => ControllerClient::new(ch)
                    .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            }
        }
    };
    let id_from = |dir: &str| {
        Identity::from_pem(
            std::fs::read(cl.dir.path().join(format!("{dir}/client.crt"))).unwrap(),
            std::fs::read(cl.dir.path().join(format!("{dir}/client.key"))).unwrap(),
        )
    };
    assert!(
        try_with(None).await.is_err(),
        "no client certificate must be refused"
    );
    assert!(
        try_with(Some(id_from("rogue"))).await.is_err(),
        "a certificate from another CA must be refused"
    );
    try_with(Some(id_from("certs")))
        .await
        .expect("the router's certificate is accepted");
}

/// Just enough of the Kubernetes API for the router's pod watch: a pod list (held back for
/// `list_delay`, as a slow API server or a controller starting before the node plugins are up
/// would) and a watch stream of the changes the test makes. Every change is kept, so a watch
/// that starts from a list's resourceVersion misses none.
struct FakeApi {
    addr: std::net::SocketAddr,
    state: std::sync::Arc<std::sync::Mutex<ApiState>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct ApiState {
    rv: u64,
    pods: std::collections::BTreeMap<String, serde_json::Value>,
    /// (resourceVersion, watch event line)
    events: Vec<(u64, bytes::Bytes)>,
    watchers: Vec<tokio::sync::mpsc::UnboundedSender<bytes::Bytes>>,
}

const POD_NAMESPACE: &str = "loopvol-system";
const POD_SELECTOR: &str = "app=loopvol-node";

/// A node plugin pod as the API server reports it.
fn plugin_pod(
    name: &str,
    node: &str,
    ip: Option<&str>,
    ready: bool,
    created: &str,
) -> serde_json::Value {
    let mut status = serde_json::json!({
        "phase": if ip.is_some() { "Running" } else { "Pending" },
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
    });
    if let Some(ip) = ip {
        status["podIP"] = ip.into();
    }
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": POD_NAMESPACE,
            "uid": format!("uid-{name}"),
            "labels": {"app": "loopvol-node"},
            "creationTimestamp": created,
        },
        "spec": {"nodeName": node, "containers": [{"name": "loopvol", "image": "loopvol"}]},
        "status": status,
    })
}

impl FakeApi {
    async fn start(list_delay: Duration, pods: Vec<serde_json::Value>) -> FakeApi {
        use http_body_util::BodyExt;
        let state = std::sync::Arc::new(std::sync::Mutex::new(ApiState::default()));
        {
            let mut st = state.lock().unwrap();
            for p in pods {
                st.rv += 1;
                let mut p = p;
                p["metadata"]["resourceVersion"] = st.rv.to_string().into();
                st.pods
                    .insert(p["metadata"]["name"].as_str().unwrap().into(), p);
            }
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let state = state.clone();
                            async move {
                                type Body = http_body_util::combinators::BoxBody<
                                    bytes::Bytes,
                                    std::convert::Infallible,
                                >;
                                let query = req.uri().query().unwrap_or("").to_string();
                                let path = req.uri().path().to_string();
                                let json = |status: u16, body: Body| {
                                    hyper::Response::builder()
                                        .status(status)
                                        .header("content-type", "application/json")
                                        .body(body)
                                        .unwrap()
                                };
                                if path != format!("/api/v1/namespaces/{POD_NAMESPACE}/pods") {
                                    return Ok::<_, std::convert::Infallible>(json(
                                        404,
                                        http_body_util::Full::new(bytes::Bytes::from_static(b"{}"))
                                            .boxed(),
                                    ));
                                }
                                if query.split('&').any(|kv| kv == "watch=true") {
                                    let from: u64 = query
                                        .split('&')
                                        .find_map(|kv| kv.strip_prefix("resourceVersion="))
                                        .and_then(|v| v.parse().ok())
                                        .unwrap_or(0);
                                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                                    {
                                        let mut st = state.lock().unwrap();
                                        for (rv, line) in &st.events {
                                            if *rv > from {
                                                let _ = tx.send(line.clone());
                                            }
                                        }
                                        st.watchers.push(tx);
                                    }
                                    let frames = futures::StreamExt::map(
                                        tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
                                        |b| {
                                            Ok::<_, std::convert::Infallible>(
                                                hyper::body::Frame::data(b),
                                            )
                                        },
                                    );
                                    return Ok(json(
                                        200,
                                        http_body_util::StreamBody::new(frames).boxed(),
                                    ));
                                }
                                tokio::time::sleep(list_delay).await;
                                let body = {
                                    let st = state.lock().unwrap();
                                    serde_json::json!({
                                        "apiVersion": "v1",
                                        "kind": "PodList",
                                        "metadata": {"resourceVersion": st.rv.to_string()},
                                        "items": st.pods.values().collect::<Vec<_>>(),
                                    })
                                };
                                Ok(json(
                                    200,
                                    http_body_util::Full::new(bytes::Bytes::from(body.to_string()))
                                        .boxed(),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeApi { addr, state, task }
    }

    fn event(&self, kind: &str, mut pod: serde_json::Value) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        pod["metadata"]["resourceVersion"] = st.rv.to_string().into();
        let name = pod["metadata"]["name"].as_str().unwrap().to_string();
        if kind == "DELETED" {
            st.pods.remove(&name);
        } else {
            st.pods.insert(name, pod.clone());
        }
        let mut line = serde_json::json!({"type": kind, "object": pod}).to_string();
        line.push('\n');
        let line = bytes::Bytes::from(line);
        let rv = st.rv;
        st.events.push((rv, line.clone()));
        st.watchers.retain(|w| w.send(line.clone()).is_ok());
    }

    fn kubeconfig(&self, path: &Path) {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
                 users:\n- name: router\n  user:\n    token: fake\ncontexts:\n- name: fake\n  context:\n    \
                 cluster: fake\n    user: router\ncurrent-context: fake\n",
                self.addr
            ),
        )
        .unwrap();
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The router starts before it has seen any node plugin pod (csi-provisioner asks for
/// capacity about 100 ms after start), and a node plugin is replaced by a rolling update
/// (its pod terminates, disappears, and a new one takes a moment to become ready). At no
/// point may a node read as empty: a capacity is real or UNAVAILABLE, a list complete or
/// UNAVAILABLE.
#[tokio::test(flavor = "multi_thread")]
async fn router_waits_for_discovery_and_keeps_a_restarting_node() {
    if !root_or_skip("multinode discovery") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("loopvol-discovery-")
        .tempdir()
        .unwrap();
    let certs = dir.path().join("certs");
    write_certs(&certs);
    // Discovery gives one port for every node; the nodes differ by IP.
    let ips = ["127.0.0.5", "127.0.0.6"];
    let port = std::net::TcpListener::bind((ips[0], 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut nodes = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let name = format!("n{}", i + 1);
        let sock = dir.path().join(format!("{name}.sock"));
        let args = node_args(&name, &sock, dir.path(), &format!("{ip}:{port}"), &certs);
        nodes.push(Proc::start(
            args,
            sock,
            dir.path().join(format!("{name}.log")),
        ));
    }
    let api = FakeApi::start(
        Duration::from_millis(1500),
        vec![
            plugin_pod(
                "node-n1-a",
                "n1",
                Some(ips[0]),
                true,
                "2026-01-01T00:00:00Z",
            ),
            plugin_pod(
                "node-n2-a",
                "n2",
                Some(ips[1]),
                true,
                "2026-01-01T00:00:00Z",
            ),
        ],
    )
    .await;
    let kubeconfig = dir.path().join("kubeconfig");
    api.kubeconfig(&kubeconfig);
    let router_socket = dir.path().join("router.sock");
    let args: Vec<String> = vec![
        "serve".into(),
        "--mode".into(),
        "controller".into(),
        "--node-id".into(),
        "router".into(),
        "--endpoint".into(),
        format!("unix://{}", s(&router_socket)),
        "--nodes-from".into(),
        "kubernetes".into(),
        "--node-pod-namespace".into(),
        POD_NAMESPACE.into(),
        "--node-pod-selector".into(),
        POD_SELECTOR.into(),
        "--node-pool-port".into(),
        port.to_string(),
        "--tls-cert".into(),
        s(&certs.join("client.crt")),
        "--tls-key".into(),
        s(&certs.join("client.key")),
        "--tls-ca".into(),
        s(&certs.join("ca.crt")),
    ];
    let started = Instant::now();
    let _router = Proc::start_with_env(
        args,
        vec![("KUBECONFIG".into(), s(&kubeconfig))],
        router_socket.clone(),
        dir.path().join("router.log"),
    );
    let mut r = ControllerClient::new(
        Endpoint::from_shared(format!("unix://{}", s(&router_socket)))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let cap = |node: &str| GetCapacityRequest {
        volume_capabilities: vec![rw_mount("")],
        accessible_topology: Some(loopvol::edge::controller::topology(node)),
        ..Default::default()
    };

    // The pod list is still on its way: the router waits for it instead of answering 0.
    let first = r.get_capacity(cap("n1")).await.unwrap().into_inner();
    assert!(first.available_capacity > 0, "{first:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "answered before the pod list came: {:?}",
        started.elapsed()
    );
    let mut ids = Vec::new();
    for node in [1, 2] {
        ids.push(
            r.create_volume(on_node(&format!("d{node}"), node))
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap()
                .volume_id,
        );
    }
    let listed = |resp: ListVolumesResponse| -> HashSet<String> {
        resp.entries
            .into_iter()
            .map(|e| e.volume.unwrap().volume_id)
            .collect()
    };
    assert_eq!(
        listed(
            r.list_volumes(ListVolumesRequest::default())
                .await
                .unwrap()
                .into_inner()
        ),
        ids.iter().cloned().collect()
    );

    // A rolling update replaces n1's plugin pod: terminating, deleted, a new one not ready.
    let mut old = plugin_pod(
        "node-n1-a",
        "n1",
        Some(ips[0]),
        true,
        "2026-01-01T00:00:00Z",
    );
    old["metadata"]["deletionTimestamp"] = "2026-01-01T01:00:00Z".into();
    api.event("MODIFIED", old.clone());
    api.event("DELETED", old);
    api.event(
        "ADDED",
        plugin_pod("node-n1-b", "n1", None, false, "2026-01-01T01:00:01Z"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match r.get_capacity(cap("n1")).await {
            Ok(c) => assert!(c.get_ref().available_capacity > 0, "{c:?}"),
            Err(e) if e.code() == Code::Unavailable => break,
            Err(e) => panic!("{e}"),
        }
        assert!(
            Instant::now() < deadline,
            "the router never saw n1's plugin go"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        code_of(r.list_volumes(ListVolumesRequest::default()).await),
        Code::Unavailable,
        "a list without n1's volumes would be a lie"
    );
    assert!(
        r.get_capacity(cap("n2"))
            .await
            .unwrap()
            .into_inner()
            .available_capacity
            > 0
    );
    assert_eq!(
        code_of(
            r.get_capacity(GetCapacityRequest {
                volume_capabilities: vec![rw_mount("")],
                ..Default::default()
            })
            .await
        ),
        Code::Unavailable,
        "a total without n1 would be too small"
    );

    // The new pod becomes ready (the same node, so the same IP here): n1 is back.
    api.event(
        "MODIFIED",
        plugin_pod(
            "node-n1-b",
            "n1",
            Some(ips[0]),
            true,
            "2026-01-01T01:00:01Z",
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match r.get_capacity(cap("n1")).await {
            Ok(c) => {
                assert!(c.get_ref().available_capacity > 0, "{c:?}");
                break;
            }
            Err(e) if e.code() == Code::Unavailable => {}
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < deadline, "n1 never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        listed(
            r.list_volumes(ListVolumesRequest::default())
                .await
                .unwrap()
                .into_inner()
        ),
        ids.iter().cloned().collect()
    );
    for id in ids {
        r.delete_volume(DeleteVolumeRequest {
            volume_id: id,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread")]
async fn router_streams_snapshot_metadata_from_the_owning_node() {
    use loopvol::csi::snapshot_metadata_client::SnapshotMetadataClient;
    use std::os::unix::fs::FileExt;
    if !root_or_skip("multinode snapshot metadata") {
        return;
    }
    let cl = Cluster::start();
    let mut r = cl.router().await;
    let mut vols = Vec::new();
    for node in [1u8, 2] {
        let v = r
            .create_volume(on_node(&format!("cbt-n{node}"), node))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        vols.push(v);
    }
    let snap = |r: &mut ControllerClient<Channel>, name: &str, vol: &str| {
        let mut r = r.clone();
        let (name, vol) = (name.to_string(), vol.to_string());
        async move {
            r.create_snapshot(CreateSnapshotRequest {
                source_volume_id: vol,
                name,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap()
            .snapshot_id
        }
    };
    let write = |node: u8, vol: &str, off: u64, seed: u64| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(cl.image(node, vol))
            .unwrap();
        f.write_all_at(&pattern(1 << 20, seed), off).unwrap();
        f.sync_all().unwrap();
    };
    write(1, &vols[0], 2 << 20, 1);
    let s1 = snap(&mut r, "cbt-1", &vols[0]).await;
    write(1, &vols[0], 9 << 20, 2);
    let s2 = snap(&mut r, "cbt-2", &vols[0]).await;
    let other = snap(&mut r, "cbt-other", &vols[1]).await;

    let ch = Endpoint::from_shared(format!("unix://{}", s(&cl.router_socket)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut m = SnapshotMetadataClient::new(ch);
    // Allocated, one range per message, passed through message by message.
    let mut st = m
        .get_metadata_allocated(GetMetadataAllocatedRequest {
            snapshot_id: s2.clone(),
            max_results: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut ranges = Vec::new();
    while let Some(msg) = st.message().await.unwrap() {
        assert_eq!(msg.volume_capacity_bytes, 16 * MIB);
        assert!(msg.block_metadata.len() <= 1);
        ranges.extend(
            msg.block_metadata
                .iter()
                .map(|b| (b.byte_offset, b.size_bytes)),
        );
    }
    assert_eq!(ranges, vec![(2 * MIB, MIB), (9 * MIB, MIB)]);
    // Delta on one node: only the second write.
    let mut st = m
        .get_metadata_delta(GetMetadataDeltaRequest {
            base_snapshot_id: s1.clone(),
            target_snapshot_id: s2.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut delta = Vec::new();
    while let Some(msg) = st.message().await.unwrap() {
        delta.extend(
            msg.block_metadata
                .iter()
                .map(|b| (b.byte_offset, b.size_bytes)),
        );
    }
    assert_eq!(delta, vec![(9 * MIB, MIB)]);
    // Across nodes: not comparable. Unknown node: UNAVAILABLE. Not an ID: NOT_FOUND.
    let delta_code = |base: &str, target: &str| {
        let mut m = m.clone();
        let req = GetMetadataDeltaRequest {
            base_snapshot_id: base.into(),
            target_snapshot_id: target.into(),
            ..Default::default()
        };
        async move {
            m.get_metadata_delta(req)
                .await
                .map(|_| ())
                .unwrap_err()
                .code()
        }
    };
    assert_eq!(delta_code(&s1, &other).await, Code::FailedPrecondition);
    assert_eq!(delta_code("", &s2).await, Code::InvalidArgument);
    let alloc_code = |id: &str| {
        let mut m = m.clone();
        let req = GetMetadataAllocatedRequest {
            snapshot_id: id.into(),
            ..Default::default()
        };
        async move {
            m.get_metadata_allocated(req)
                .await
                .map(|_| ())
                .unwrap_err()
                .code()
        }
    };
    assert_eq!(
        alloc_code("snap-0123456789abcdef0123@n9").await,
        Code::Unavailable
    );
    assert_eq!(alloc_code("vol-x").await, Code::NotFound);
    assert_eq!(
        alloc_code("snap-0123456789abcdef0123@n3").await,
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn router_forwards_group_snapshots_and_refuses_groups_spanning_nodes() {
    use loopvol::csi::group_controller_client::GroupControllerClient;
    if !root_or_skip("multinode group snapshots") {
        return;
    }
    let cl = Cluster::start();
    let mut r = cl.router().await;
    let mut g = GroupControllerClient::new(
        Endpoint::from_shared(format!("unix://{}", s(&cl.router_socket)))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let vol = |name: &'static str, node: u8| {
        let mut r = r.clone();
        async move {
            r.create_volume(on_node(name, node))
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap()
                .volume_id
        }
    };
    let (a, b, c) = (vol("ga", 1).await, vol("gb", 1).await, vol("gc", 2).await);
    let mk = |name: &str, v: &[&String]| CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: v.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    // Members on two nodes: FAILED_PRECONDITION, and nothing is made on either node.
    let e = g
        .create_volume_group_snapshot(mk("span", &[&a, &c]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("one node"), "{e}");
    for node in [1u8, 2] {
        assert!(
            !cl.pool(node).join("groups").exists()
                || std::fs::read_dir(cl.pool(node).join("groups"))
                    .unwrap()
                    .next()
                    .is_none()
        );
    }
    // Members on one node: forwarded there, and Get/Delete find it through the router.
    let grp = g
        .create_volume_group_snapshot(mk("same", &[&a, &b]))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert!(
        grp.group_snapshot_id.ends_with("@n1"),
        "{}",
        grp.group_snapshot_id
    );
    assert!(cl
        .pool(1)
        .join("groups")
        .read_dir()
        .unwrap()
        .next()
        .is_some());
    let ids: Vec<String> = grp
        .snapshots
        .iter()
        .map(|s| s.snapshot_id.clone())
        .collect();
    let got = g
        .get_volume_group_snapshot(GetVolumeGroupSnapshotRequest {
            group_snapshot_id: grp.group_snapshot_id.clone(),
            snapshot_ids: ids.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.group_snapshot.unwrap(), grp);
    g.delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: grp.group_snapshot_id.clone(),
        snapshot_ids: ids,
        ..Default::default()
    })
    .await
    .unwrap();
    let gone = g
        .get_volume_group_snapshot(GetVolumeGroupSnapshotRequest {
            group_snapshot_id: grp.group_snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    for v in [a, b, c] {
        r.delete_volume(DeleteVolumeRequest {
            volume_id: v,
            ..Default::default()
        })
        .await
        .unwrap();
    }
}
