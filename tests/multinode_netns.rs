//! Router mode across real network namespaces: node plugins each in a network namespace and a
//! container (mount namespace) of their own, with their own pools, and a router in a network
//! namespace of its own reaching them over TCP with mTLS on a private network
//! (tests/common/netcluster.rs). The scenarios of tests/multinode.rs that matter most when the
//! network is real: placement, the node side of a volume on its node, a node's outage, and
//! kill -9 of each process in the middle of creates.

mod common;

use std::time::Duration;

use common::netcluster::{self, NetCluster, Victim};
use common::*;
use loopvol::csi::*;
use rand::Rng;
use tonic::Code;

fn on_node(name: &str, node: &str, bytes: i64) -> CreateVolumeRequest {
    let mut r = create_req(name, bytes, rw_mount("ext4"));
    let t = loopvol::edge::controller::topology(node);
    r.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![t.clone()],
        preferred: vec![t],
    });
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_are_placed_used_and_refused_across_namespaces() {
    if !root_or_skip("multinode_netns") {
        return;
    }
    let mut cl = NetCluster::start(2).await;
    cl.lan.assert_sealed();
    cl.assert_no_listener_outside();
    // The nodes reach each other's pool port (a sink pulls from its source), and the router
    // reaches them. (No probe from the root namespace: its default route would send it out
    // of the machine.)
    for (from, to) in [("n1", "n2"), ("n2", "n1"), ("r", "n1"), ("r", "n2")] {
        let to = cl.lan.member(to).ip;
        cl.lan
            .member(from)
            .connect((to, netcluster::POOL_PORT).into())
            .unwrap_or_else(|e| panic!("{from} cannot reach {to}: {e}"));
    }
    let mut r = cl.router().await;

    // Placed on the named node, over the network: the image is in that node's pool only.
    let id = create_volume_id(&mut r, on_node("pvc-a", "n2", 64 * MIB)).await;
    assert!(id.ends_with("@n2"), "{id}");
    assert!(cl.node(2).image(&id).exists());
    assert!(!cl.node(1).image(&id).exists());

    // The node side on that node, as kubelet calls it: stage, publish, write; and after a
    // full release, the data is there again.
    let n2 = cl.node(2);
    let (staging, _) = n2.kubelet_path("staging/a");
    let (target, host_target) = n2.kubelet_path("pods/a/mount");
    let data = pattern(3 << 20, 7);
    let mut node = n2.node().await;
    for round in 0..2 {
        node.node_stage_volume(stage_req(&id, &staging, rw_mount("ext4")))
            .await
            .unwrap();
        node.node_publish_volume(publish_req(&id, &staging, &target, rw_mount("ext4")))
            .await
            .unwrap();
        let file = host_target.join("data");
        if round == 0 {
            std::fs::write(&file, &data).unwrap();
            std::fs::File::open(&file).unwrap().sync_all().unwrap();
        } else {
            assert!(
                std::fs::read(&file).unwrap() == data,
                "data read back differs"
            );
        }
        node.node_unpublish_volume(unpublish_req(&id, &target))
            .await
            .unwrap();
        node.node_unstage_volume(unstage_req(&id, &staging))
            .await
            .unwrap();
    }

    // n2 crashes: its volumes are UNAVAILABLE (never NOT_FOUND), n1 keeps working.
    cl.kill9_node(2);
    let get = |id: &str| ControllerGetVolumeRequest {
        volume_id: id.to_string(),
    };
    assert_eq!(
        code_of(r.controller_get_volume(get(&id)).await),
        Code::Unavailable
    );
    assert_eq!(
        code_of(r.create_volume(on_node("while-down", "n2", 16 * MIB)).await),
        Code::Unavailable
    );
    let other = create_volume_id(&mut r, on_node("pvc-b", "n1", 16 * MIB)).await;
    assert!(other.ends_with("@n1"), "{other}");

    // Back: the router finds it again at the same address.
    cl.restart_node(2).await;
    let mut back = None;
    for _ in 0..100 {
        if let Ok(v) = r.controller_get_volume(get(&id)).await {
            back = v.into_inner().volume;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(back.expect("n2 came back").capacity_bytes, 64 * MIB);
    for i in [1, 2] {
        cl.assert_settled(i).await;
    }
    for v in [id, other] {
        r.delete_volume(DeleteVolumeRequest {
            volume_id: v,
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

/// kill -9 of the node plugin or the router while CreateVolumes are in flight, then a restart
/// and the CO's retries of the same names: every name ends as one volume, and each pool
/// holds the invariants the cross-node transfer's fault rounds will check.
#[tokio::test(flavor = "multi_thread")]
async fn kill9_during_creates_leaves_every_pool_settled() {
    if !root_or_skip("multinode_netns kill -9") {
        return;
    }
    let mut cl = NetCluster::start(2).await;
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let mut names = Vec::new();
    let mut interrupted = 0;
    for round in 0..6usize {
        let victim = [Victim::Node(1), Victim::Node(2), Victim::Router][round % 3];
        let mut r = cl.router().await;
        let batch: Vec<(String, String)> = (0..4)
            .map(|k| (format!("r{round}-{k}"), format!("n{}", 1 + k % 2)))
            .collect();
        let mut calls = Vec::new();
        for (name, node) in &batch {
            let mut r = r.clone();
            let mut req = on_node(name, node, 256 * MIB);
            req.parameters.insert("allocation".into(), "thick".into());
            calls.push(tokio::spawn(async move { r.create_volume(req).await }));
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..40))).await;
        cl.kill9(victim);
        for c in calls {
            // Whatever each call answered (done, UNAVAILABLE, a broken connection) is fine:
            // the retries below must end in one volume per name.
            if !matches!(c.await, Ok(Ok(_))) {
                interrupted += 1;
            }
        }
        cl.restart(victim).await;
        r = cl.router().await;
        for (name, node) in &batch {
            let mut req = on_node(name, node, 256 * MIB);
            req.parameters.insert("allocation".into(), "thick".into());
            let mut done = None;
            for _ in 0..100 {
                match r.create_volume(req.clone()).await {
                    Ok(v) => {
                        done = v.into_inner().volume;
                        break;
                    }
                    Err(e) if e.code() == Code::Unavailable => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    Err(e) => panic!("round {round}, {name}: {e}"),
                }
            }
            let v = done.unwrap_or_else(|| panic!("round {round}: {name} never created"));
            assert!(
                v.volume_id.ends_with(&format!("@{node}")),
                "{}",
                v.volume_id
            );
            names.push(v.volume_id);
        }
        for i in [1, 2] {
            cl.assert_settled(i).await;
        }
        // Room for the next round: the pools are small.
        for id in names.drain(..) {
            r.delete_volume(DeleteVolumeRequest {
                volume_id: id,
                ..Default::default()
            })
            .await
            .unwrap();
        }
    }
    eprintln!("{interrupted} of 24 creates were cut short by a kill -9");
}

/// The settled check itself: it sees a crash's leftovers in `tmp/` (which the next start
/// clears), a transfer record (garbage or in h3's format), a volume being filled that is
/// listed, and a node whose capacity disagrees with its records.
#[tokio::test(flavor = "multi_thread")]
async fn the_settled_check_sees_what_a_crash_could_leave() {
    if !root_or_skip("multinode_netns settled check") {
        return;
    }
    let mut cl = NetCluster::start(1).await;
    let mut r = cl.router().await;
    let id = create_volume_id(&mut r, on_node("thin", "n1", 64 * MIB)).await;
    cl.assert_settled(1).await;
    let pool = cl.node(1).pool.clone();
    let patience = Duration::from_secs(3);

    std::fs::write(pool.join("tmp/0123456789abcdef0123.img"), b"half").unwrap();
    std::fs::create_dir_all(pool.join("transfers")).unwrap();
    std::fs::write(pool.join("transfers/0123456789abcdef0123.json"), b"{}").unwrap();
    let v = cl.violations(1, patience).await;
    assert!(
        v.iter().any(|m| m.starts_with("tmp/")) && v.iter().any(|m| m.starts_with("transfers/")),
        "{v:?}"
    );
    std::fs::remove_dir_all(pool.join("transfers")).unwrap();

    // A transfer record in h3's format, as a job would leave it had it outlived itself: the
    // settled check names the transfer. And mid-flight, a volume being filled that ListVolumes
    // shows (here: its volume record gone from disk while the node still lists it) is caught.
    let hex = hex_of(&id);
    let record = pool.join(format!("volumes/{hex}.json"));
    let text = std::fs::read_to_string(&record).unwrap();
    let transfer = serde_json::json!({
        "format": 1,
        "transfer_id": "0123456789abcdef",
        "volume": serde_json::from_str::<serde_json::Value>(&text).unwrap(),
        "endpoint": "https://10.1.2.3:7443",
        "started_unix": 1,
        "data_bytes": 0,
    });
    std::fs::create_dir_all(pool.join("transfers")).unwrap();
    std::fs::write(
        pool.join(format!("transfers/{hex}.json")),
        transfer.to_string(),
    )
    .unwrap();
    let v = cl.violations(1, patience).await;
    assert!(
        v.iter()
            .any(|m| m.contains("transfer 0123456789abcdef into") && m.contains("outlived")),
        "{v:?}"
    );
    assert!(cl.in_flight_violations(1).await.is_empty());
    std::fs::remove_file(&record).unwrap();
    let v = cl.in_flight_violations(1).await;
    assert!(
        v.iter().any(|m| m.contains("is listed by ListVolumes")),
        "{v:?}"
    );
    std::fs::write(&record, &text).unwrap();
    std::fs::remove_dir_all(pool.join("transfers")).unwrap();
    cl.kill9_node(1);
    cl.restart_node(1).await;
    cl.assert_settled(1).await;

    // The record on disk promises 128 MiB more than the running node holds.
    let record = pool.join(format!("volumes/{}.json", hex_of(&id)));
    let text = std::fs::read_to_string(&record).unwrap();
    let mut rec: serde_json::Value = serde_json::from_str(&text).unwrap();
    rec["size_bytes"] = (192 * MIB).into();
    std::fs::write(&record, rec.to_string()).unwrap();
    let v = cl.violations(1, patience).await;
    assert!(v.iter().any(|m| m.starts_with("offers ")), "{v:?}");
    std::fs::write(&record, text).unwrap();
    cl.assert_settled(1).await;
}
