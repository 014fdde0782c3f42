//! Every way to install loopvol (the default, each optional component, each overlay) renders
//! and passes the manifest checks; the renderer agrees with kubectl's kustomize where kubectl is
//! installed; and the rendered checks really look at what a configuration changes.

use manifest_check::{configurations, render, repo_root, Configuration};
use serde_json::Value;

fn config(name: &str) -> Configuration {
    configurations(repo_root())
        .unwrap()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no configuration {name}"))
}

#[test]
fn every_configuration_renders_and_passes() {
    let configs = configurations(repo_root()).unwrap();
    // The default, six components and at least the example overlay.
    assert!(configs.len() >= 8, "{configs:?}");
    let mut report = Vec::new();
    for c in &configs {
        report.extend(c.check().iter().map(ToString::to_string));
    }
    assert!(report.is_empty(), "{}", report.join("\n"));
}

fn kinds(objects: &[Value]) -> Vec<String> {
    let mut k: Vec<String> = objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    k.sort();
    k
}

#[test]
fn the_default_install_needs_no_snapshot_crds_and_no_generated_files() {
    let objects = config("manifests").render().unwrap();
    let k = kinds(&objects);
    assert!(
        !k.iter().any(|k| k.starts_with("VolumeSnapshotClass/")),
        "{k:?}"
    );
    assert!(
        !k.iter().any(|k| k.starts_with("Secret/")),
        "no Secret is generated from files: {k:?}"
    );
    assert!(k.contains(&"Role/loopvol-certs".to_string()), "{k:?}");
    let with = config("manifests + components/snapshots").render().unwrap();
    assert!(kinds(&with).contains(&"VolumeSnapshotClass/loopvol-snapshots".to_string()));
}

fn node_plugin(objects: &[Value]) -> &Value {
    objects
        .iter()
        .find(|o| o["kind"] == "DaemonSet" && o["metadata"]["name"] == "loopvol-node")
        .unwrap()
}

#[test]
fn the_k0s_component_moves_every_kubelet_path_and_the_checks_notice_a_mismatch() {
    let c = config("manifests + components/kubelet-k0s");
    let objects = c.render().unwrap();
    let text = serde_json::to_string(node_plugin(&objects)).unwrap();
    assert!(!text.contains("/var/lib/kubelet"), "{text}");
    assert!(text.contains("/var/lib/k0s/kubelet/plugins_registry"));
    // Checked against the default kubelet directory, the same set is wrong in several ways.
    let wrong = manifest_check::check_rendered("k0s as default", &objects, "/var/lib/kubelet");
    let wrong: Vec<String> = wrong.iter().map(ToString::to_string).collect();
    assert!(
        wrong
            .iter()
            .any(|f| f.contains("--kubelet-dir /var/lib/k0s/kubelet")),
        "{wrong:?}"
    );
    assert!(
        wrong.iter().any(|f| f.contains("plugins_registry")),
        "{wrong:?}"
    );
}

#[test]
fn the_example_overlay_sets_image_pool_and_node_selector() {
    let objects = config("overlays/example").render().unwrap();
    let ds = node_plugin(&objects);
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["nodeSelector"]["loopvol.csi.dev/storage"], "true");
    assert_eq!(
        spec["containers"][0]["image"],
        "registry.example.com/storage/loopvol:0.1.0"
    );
    assert_eq!(
        spec["initContainers"][0]["image"],
        "registry.example.com/storage/loopvol:0.1.0"
    );
    assert_eq!(spec["volumes"][4]["hostPath"]["path"], "/srv/loopvol");
    let args: Vec<&str> = spec["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.windows(2).any(|w| w == ["--log-format", "json"]),
        "{args:?}"
    );
}

#[test]
fn a_patch_that_no_longer_fits_fails_the_render() {
    let tmp = std::env::temp_dir().join(format!("manifest-check-{}", std::process::id()));
    let comp = tmp.join("c");
    std::fs::create_dir_all(&comp).unwrap();
    std::fs::write(
        comp.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\npatches:\n- target: {kind: DaemonSet, name: loopvol-node}\n  patch: |-\n    - op: test\n      path: /spec/template/spec/volumes/0/name\n      value: not-this\n",
    )
    .unwrap();
    let e = render::render_with(&repo_root().join("manifests"), std::slice::from_ref(&comp))
        .unwrap_err();
    std::fs::remove_dir_all(&tmp).unwrap();
    assert!(e.contains("patch on DaemonSet/loopvol-node fails"), "{e}");
}

/// The renderer implements only a subset of kustomize; where kubectl is installed, its output
/// must be the same objects as `kubectl kustomize`. (CI machines without kubectl rely on the
/// renderer alone, which is why it exists.)
#[test]
fn renderer_matches_kubectl_kustomize_where_available() {
    if std::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        eprintln!("kubectl not installed: comparison skipped");
        return;
    }
    for c in configurations(repo_root()).unwrap() {
        let Some(dir) = &c.dir else { continue };
        let out = std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            c.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs = render::parse_documents(&String::from_utf8(out.stdout).unwrap()).unwrap();
        let ours = c.render().unwrap();
        let mut a: Vec<String> = theirs.iter().map(|v| v.to_string()).collect();
        let mut b: Vec<String> = ours.iter().map(|v| v.to_string()).collect();
        a.sort();
        b.sort();
        assert_eq!(
            a, b,
            "{}: the renderer and kubectl kustomize disagree",
            c.name
        );
    }
}

/// The second-pool component gives the node plugin one more `--pool` with its hostPath mounted
/// at the same path, and a StorageClass choosing that pool.
#[test]
fn the_second_pool_component_serves_and_offers_the_pool_fast() {
    let objects = config("manifests + components/second-pool")
        .render()
        .unwrap();
    let spec = &node_plugin(&objects)["spec"]["template"]["spec"];
    let driver = &spec["containers"][0];
    let args: Vec<&str> = driver["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&"--pool=fast=/var/lib/loopvol-fast"),
        "{args:?}"
    );
    assert!(
        args.windows(2)
            .any(|w| w == ["--pool-dir", "/var/lib/loopvol"]),
        "the default pool stays: {args:?}"
    );
    let mount = driver["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "pool-fast")
        .unwrap();
    assert_eq!(mount["mountPath"], "/var/lib/loopvol-fast");
    let volume = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "pool-fast")
        .unwrap();
    assert_eq!(volume["hostPath"]["path"], "/var/lib/loopvol-fast");
    let class = objects
        .iter()
        .find(|o| o["kind"] == "StorageClass" && o["metadata"]["name"] == "loopvol-fast")
        .unwrap();
    assert_eq!(class["parameters"]["pool"], "fast");

    // Without the --pool argument, the StorageClass names a pool no node serves.
    let mut without = objects.clone();
    let ds = without
        .iter_mut()
        .find(|o| o["kind"] == "DaemonSet" && o["metadata"]["name"] == "loopvol-node")
        .unwrap();
    ds["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array_mut()
        .unwrap()
        .retain(|a| !a.as_str().unwrap().starts_with("--pool="));
    let found: Vec<String> =
        manifest_check::check_rendered("no --pool", &without, "/var/lib/kubelet")
            .iter()
            .map(ToString::to_string)
            .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains("StorageClass/loopvol-fast: parameter pool: no node plugin serves a pool \"fast\" (it serves default)"),
        "{found:?}"
    );
}
