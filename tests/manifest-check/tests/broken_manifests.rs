//! Deliberately broken manifests: the checker must notice, and say where and what.

mod common;

use common::{assert_exactly, assert_reports, findings_after, findings_with_extra_file};

const NODE: &str = "manifests/node.yaml";
const CONTROLLER: &str = "manifests/controller.yaml";

#[test]
fn misspelled_field_is_reported_with_its_path() {
    let findings = findings_after(&[(
        NODE,
        "imagePullPolicy: IfNotPresent",
        "imagePullPolicyy: IfNotPresent",
    )]);
    assert_exactly(
        &findings,
        &[
            "manifests/node.yaml DaemonSet/loopvol-node container certs: unknown field \
           spec.template.spec.initContainers[0].imagePullPolicyy: it is dropped when parsed, so it \
           is misspelled, misplaced or not part of this API version",
        ],
    );
}

#[test]
fn misplaced_field_is_reported() {
    // `tolerations` belongs in the pod spec, not in the DaemonSet spec.
    let findings = findings_after(&[(
        NODE,
        "  updateStrategy:",
        "  tolerations: []\n  updateStrategy:",
    )]);
    assert_exactly(
        &findings,
        &[
            "manifests/node.yaml DaemonSet/loopvol-node: unknown field spec.tolerations: it is \
           dropped when parsed, so it is misspelled, misplaced or not part of this API version",
        ],
    );
}

#[test]
fn misspelled_field_in_a_snapshot_class_is_reported() {
    let findings = findings_after(&[(
        "manifests/components/snapshots/volumesnapshotclass.yaml",
        "deletionPolicy: Delete",
        "deletionPolcy: Delete",
    )]);
    let unknown = "manifests/components/snapshots/volumesnapshotclass.yaml VolumeSnapshotClass/loopvol-snapshots: does not \
                   parse as VolumeSnapshotClass snapshot.storage.k8s.io/v1: unknown field `deletionPolcy`";
    assert!(
        findings.iter().any(|f| f.starts_with(unknown)),
        "{findings:#?}"
    );
    // An object that does not parse is not there for the objects that refer to it.
    assert_reports(
        &findings,
        "manifests/examples/snapshot-restore.yaml VolumeSnapshot/loopvol-demo-snap: \
         volumeSnapshotClassName loopvol-snapshots is not defined in the manifests",
    );
    assert_eq!(findings.len(), 2, "{findings:#?}");
}

#[test]
fn explicit_null_and_wrong_api_version_are_reported() {
    let findings = findings_after(&[
        (CONTROLLER, "emptyDir: {}", "emptyDir:"),
        (
            NODE,
            "apiVersion: apps/v1\nkind: DaemonSet",
            "apiVersion: extensions/v1beta1\nkind: DaemonSet",
        ),
    ]);
    assert_reports(
        &findings,
        "manifests/controller.yaml Deployment/loopvol-controller: field \
         spec.template.spec.volumes[0].emptyDir is null; remove it or give it a value ({} for an empty object)",
    );
    assert_reports(
        &findings,
        "manifests/node.yaml DaemonSet/loopvol-node: apiVersion extensions/v1beta1 is not served \
         for DaemonSet; use apps/v1",
    );
}

#[test]
fn mismatched_driver_names_are_reported() {
    let findings = findings_after(&[
        (
            "manifests/storageclasses.yaml",
            "provisioner: loopvol.csi.dev",
            "provisioner: loopvol.csi.io",
        ),
        (
            CONTROLLER,
            "- --driver-name\n            - loopvol.csi.dev",
            "- --driver-name\n            - loopvol",
        ),
    ]);
    assert_exactly(
        &findings,
        &[
            "manifests/controller.yaml Deployment/loopvol-controller container loopvol: \
             --driver-name loopvol but the CSIDriver is named loopvol.csi.dev",
            "manifests/storageclasses.yaml StorageClass/loopvol: provisioner loopvol.csi.io but \
             the CSIDriver is named loopvol.csi.dev",
        ],
    );
}

#[test]
fn missing_service_account_is_reported() {
    let findings = findings_after(&[(
        NODE,
        "serviceAccountName: loopvol-node",
        "serviceAccountName: loopvol-nodes",
    )]);
    assert_exactly(
        &findings,
        &["manifests/node.yaml DaemonSet/loopvol-node: serviceAccountName refers to ServiceAccount \
           loopvol-system/loopvol-nodes, which is not defined in the manifests"],
    );

    // Renaming the account itself breaks the pod and every binding to it.
    let findings = findings_after(&[(
        "manifests/rbac.yaml",
        "  name: loopvol-controller\n  namespace: loopvol-system\n",
        "  name: loopvol-ctrl\n  namespace: loopvol-system\n",
    )]);
    assert_reports(
        &findings,
        "manifests/controller.yaml Deployment/loopvol-controller: serviceAccountName refers to \
         ServiceAccount loopvol-system/loopvol-controller, which is not defined in the manifests",
    );
    assert_reports(
        &findings,
        "manifests/rbac.yaml ClusterRoleBinding/loopvol-external-provisioner: subject \
         ServiceAccount loopvol-system/loopvol-controller is not defined in the manifests",
    );
    assert_eq!(
        findings.len(),
        1 + 7,
        "pod + 3 cluster and 4 namespaced bindings: {findings:#?}"
    );
}

#[test]
fn socket_mismatches_are_reported() {
    let findings = findings_after(&[
        (
            NODE,
            "- --csi-address=/csi/csi.sock\n            # The same socket",
            "- --csi-address=/plugin/csi.sock\n            # The same socket",
        ),
        (
            NODE,
            "--kubelet-registration-path=/var/lib/kubelet/plugins/loopvol.csi.dev/csi.sock",
            "--kubelet-registration-path=/var/lib/kubelet/plugins/loopvol/csi.sock",
        ),
    ]);
    assert_exactly(
        &findings,
        &[
            "manifests/node.yaml DaemonSet/loopvol-node container csi-node-driver-registrar: \
             --csi-address /plugin/csi.sock but loopvol listens on /csi/csi.sock",
            "manifests/node.yaml DaemonSet/loopvol-node container csi-node-driver-registrar: \
             --kubelet-registration-path /var/lib/kubelet/plugins/loopvol/csi.sock but loopvol's \
             socket is /var/lib/kubelet/plugins/loopvol.csi.dev/csi.sock on the host (hostPath of \
             volume plugin-dir)",
        ],
    );
}

#[test]
fn same_path_on_another_volume_is_not_the_same_socket() {
    // The resizer mounts the pool at /csi instead of the socket directory.
    let findings = findings_after(&[(
        CONTROLLER,
        "- --handle-volume-inuse-error=false\n            - --v=2\n          resources:\n            requests:\n              cpu: 10m\n              memory: 32Mi\n            limits:\n              memory: 256Mi\n          securityContext:\n            privileged: false\n            allowPrivilegeEscalation: false\n            readOnlyRootFilesystem: true\n            capabilities:\n              drop: [\"ALL\"]\n          volumeMounts:\n            - name: socket-dir",
        "- --handle-volume-inuse-error=false\n            - --v=2\n          resources:\n            requests:\n              cpu: 10m\n              memory: 32Mi\n            limits:\n              memory: 256Mi\n          securityContext:\n            privileged: false\n            allowPrivilegeEscalation: false\n            readOnlyRootFilesystem: true\n            capabilities:\n              drop: [\"ALL\"]\n          volumeMounts:\n            - name: pool-dir",
    )]);
    assert_exactly(
        &findings,
        &["manifests/controller.yaml Deployment/loopvol-controller container csi-resizer: \
           --csi-address /csi/csi.sock is on volume pool-dir, but loopvol's socket is on volume socket-dir"],
    );
}

#[test]
fn kustomization_must_list_exactly_the_manifest_files() {
    let findings = findings_after(&[(
        "manifests/kustomization.yaml",
        "  - storageclasses.yaml\n",
        "  - storageclass.yaml\n",
    )]);
    assert_exactly(
        &findings,
        &[
            "manifests/kustomization.yaml Kustomization/kustomization.yaml: manifests/storageclasses.yaml \
             is not listed in resources, so `kubectl apply -k` would not install it",
            "manifests/kustomization.yaml Kustomization/kustomization.yaml: resources lists \
             storageclass.yaml, but there is no manifests/storageclass.yaml",
        ],
    );

    let extra = "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: extra\n  namespace: loopvol-system\n";
    let findings = findings_with_extra_file("manifests/extra.yaml", extra);
    assert_exactly(
        &findings,
        &["manifests/kustomization.yaml Kustomization/kustomization.yaml: manifests/extra.yaml is \
           not listed in resources, so `kubectl apply -k` would not install it"],
    );
}

#[test]
fn images_must_be_mapped_and_pinned() {
    let findings = findings_after(&[
        (
            CONTROLLER,
            "- name: loopvol\n          image: loopvol\n",
            "- name: loopvol\n          image: ghcr.io/loopvol/loopvol:0.1.0\n",
        ),
        (CONTROLLER, "csi-resizer:v2.3.0", "csi-resizer:latest"),
        (
            "manifests/kustomization.yaml",
            "newTag: 0.1.0",
            "newTag: 0.0.9",
        ),
    ]);
    assert_exactly(
        &findings,
        &[
            "manifests/controller.yaml Deployment/loopvol-controller container loopvol: image \
             ghcr.io/loopvol/loopvol:0.1.0: the driver's image must be exactly `loopvol`; \
             kustomization.yaml `images:` sets its registry and tag in one place",
            "manifests/controller.yaml Deployment/loopvol-controller container csi-resizer: image \
             registry.k8s.io/sig-storage/csi-resizer:latest uses :latest; pin a released version",
            "manifests/kustomization.yaml Kustomization/kustomization.yaml: images maps loopvol to \
             ghcr.io/loopvol/loopvol:0.0.9, but this release is ghcr.io/loopvol/loopvol:0.1.0",
        ],
    );
}

#[test]
fn containers_need_resources_and_defined_variables() {
    let findings = findings_after(&[
        (CONTROLLER, "              cpu: 5m\n              memory: 16Mi\n            limits:\n              memory: 64Mi\n", "              cpu: 5m\n              memory: 16Mi\n"),
        (NODE, "- name: NODE_NAME", "- name: NODENAME"),
    ]);
    assert_exactly(
        &findings,
        &[
            "manifests/controller.yaml Deployment/loopvol-controller container liveness-probe: \
             resources: limits.memory not set",
            "manifests/node.yaml DaemonSet/loopvol-node container loopvol: $(NODE_NAME) is used in \
             the command line but NODE_NAME is not in env, so it is passed literally",
            "manifests/node.yaml DaemonSet/loopvol-node container loopvol: --node-id $(NODE_NAME) is \
             not the node's name; pass $(NODE_NAME) with NODE_NAME from fieldRef spec.nodeName",
        ],
    );
}

#[test]
fn namespaces_and_privileges_are_enforced() {
    let findings = findings_after(&[
        ("manifests/storageclasses.yaml", "  name: loopvol\n", "  name: loopvol\n  namespace: loopvol-system\n"),
        ("manifests/examples/pvc-pod.yaml", "  name: loopvol-demo\nspec:\n  accessModes", "  name: loopvol-demo\n  namespace: loopvol-system\nspec:\n  accessModes"),
        (CONTROLLER, "          securityContext:\n            privileged: false\n            allowPrivilegeEscalation: false\n            readOnlyRootFilesystem: true\n            capabilities:\n              drop: [\"ALL\"]\n          volumeMounts:\n            - name: socket-dir\n              mountPath: /csi\n\n        - name: csi-resizer", "          securityContext:\n            privileged: true\n          volumeMounts:\n            - name: socket-dir\n              mountPath: /csi\n\n        - name: csi-resizer"),
    ]);
    assert_reports(
        &findings,
        "manifests/storageclasses.yaml StorageClass/loopvol: StorageClass is cluster-scoped; remove \
         metadata.namespace (loopvol-system)",
    );
    assert_reports(
        &findings,
        "manifests/examples/pvc-pod.yaml PersistentVolumeClaim/loopvol-demo: examples are applied \
         into the user's own namespace; remove metadata.namespace (loopvol-system)",
    );
    assert_reports(
        &findings,
        "manifests/controller.yaml Deployment/loopvol-controller container csi-provisioner: runs \
         privileged; only the node plugin's loopvol container needs that",
    );
}

#[test]
fn topology_and_volume_ids_are_checked() {
    let findings = findings_after(&[
        (
            "manifests/examples/static-pv.yaml",
            "volumeHandle: vol-5d41402abc4b2a76b971@node-1",
            "volumeHandle: vol-5d41402abc4b2a76b971@node-2",
        ),
        (
            "manifests/storageclasses.yaml",
            "reclaimPolicy: Delete\n---",
            "reclaimPolicy: Delete\nallowedTopologies:\n  - matchLabelExpressions:\n      - key: kubernetes.io/hostname\n        values: [node-1]\n---",
        ),
    ]);
    assert_exactly(
        &findings,
        &[
            "manifests/examples/static-pv.yaml PersistentVolume/loopvol-static-demo: volumeHandle is \
             on node node-2 but nodeAffinity allows [node-1]",
            "manifests/storageclasses.yaml StorageClass/loopvol: topology key kubernetes.io/hostname: \
             loopvol labels its nodes with topology.loopvol.csi.dev/node (the node name)",
        ],
    );
}

#[test]
fn storage_class_parameters_and_sizes_are_checked() {
    let findings = findings_after(&[
        ("manifests/storageclasses.yaml", "  allocation: thin", "  alocation: thin"),
        ("manifests/storageclasses.yaml", "  allocation: thick", "  allocation: thick\n  pool: Fast"),
        (
            "manifests/examples/statefulset.yaml",
            "storageClassName: loopvol\n        resources:\n          requests:\n            storage: 512Mi",
            "storageClassName: loopvol-xfs-thick\n        resources:\n          requests:\n            storage: 100Mi",
        ),
    ]);
    assert_exactly(
        &findings,
        &[
            "manifests/examples/statefulset.yaml StatefulSet/loopvol-web: volumeClaimTemplate data: \
             requests 100Mi but xfs volumes (StorageClass loopvol-xfs-thick) must be at least 300Mi",
            "manifests/storageclasses.yaml StorageClass/loopvol: unknown parameter alocation: loopvol \
             refuses it at CreateVolume; it accepts fsType, allocation, pool, encryption and the IO \
             limits readIOPS, writeIOPS, readBPS, writeBPS (keys under csi.storage.k8s.io/ are for \
             the sidecars)",
            "manifests/storageclasses.yaml StorageClass/loopvol-xfs-thick: parameter pool: pool name \
             \"Fast\" must be 1-16 characters of [a-z0-9-], starting and ending with a letter or digit",
        ],
    );
}

#[test]
fn encrypted_classes_need_ext4_a_known_method_and_a_node_stage_secret() {
    const EXAMPLE: &str = "manifests/examples/encrypted-volume.yaml";
    let findings = findings_after(&[
        (
            EXAMPLE,
            "  csi.storage.k8s.io/fstype: ext4",
            "  csi.storage.k8s.io/fstype: xfs",
        ),
        (EXAMPLE, "  encryption: fscrypt", "  encryption: luks"),
        (
            EXAMPLE,
            "  csi.storage.k8s.io/node-stage-secret-namespace: kube-system\n",
            "",
        ),
    ]);
    let class = format!("{EXAMPLE} StorageClass/loopvol-encrypted");
    let want = [
            format!(
                "{class}: parameter encryption needs csi.storage.k8s.io/node-stage-secret-namespace: \
                 the key comes from the node-stage Secret, and every NodeStageVolume without one is \
                 refused"
            ),
            format!("{class}: parameter encryption needs ext4, and this class makes xfs"),
            format!(
                "{class}: parameter encryption: \"luks\" is not a supported method; loopvol supports \
                 \"fscrypt\" (ext4 filesystem volumes)"
            ),
    ];
    assert_exactly(
        &findings,
        &want.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

#[test]
fn volume_attributes_classes_carry_limits_loopvol_accepts() {
    let findings = findings_after(&[
        (
            "manifests/examples/volumeattributesclasses.yaml",
            "  writeIOPS: \"300\"",
            "  writeIOPS: \"-300\"",
        ),
        (
            "manifests/examples/volumeattributesclasses.yaml",
            "driverName: loopvol.csi.dev\nparameters:\n  readIOPS: \"20000\"",
            "driverName: loopvol.example\nparameters:\n  readIOPS: \"20000\"\n  iops: \"5\"",
        ),
    ]);
    assert_exactly(
        &findings,
        &[
            "manifests/examples/volumeattributesclasses.yaml VolumeAttributesClass/loopvol-bronze: \
             parameter writeIOPS: \"-300\" is not a whole number of operations per second \
             (\"0\" or \"unlimited\" removes the limit)",
            "manifests/examples/volumeattributesclasses.yaml VolumeAttributesClass/loopvol-gold: \
             unknown mutable parameter \"iops\": loopvol accepts readIOPS, writeIOPS, readBPS, \
             writeBPS",
            "manifests/examples/volumeattributesclasses.yaml VolumeAttributesClass/loopvol-gold: \
             driverName loopvol.example but the CSIDriver is named loopvol.csi.dev",
        ],
    );
}

#[test]
fn claims_and_snapshots_must_point_at_existing_objects() {
    let findings = findings_after(&[
        // The restore's dataSource (not the snapshot itself) gets the wrong name.
        (
            "manifests/examples/snapshot-restore.yaml",
            "name: loopvol-demo-snap\n---",
            "name: loopvol-demo-snapshot\n---",
        ),
        (
            "manifests/examples/static-pv.yaml",
            "volumeName: loopvol-static-demo",
            "volumeName: loopvol-static",
        ),
        (
            "manifests/examples/block-pvc-pod.yaml",
            "  storageClassName: loopvol\n",
            "",
        ),
    ]);
    assert_exactly(
        &findings,
        &[
            "manifests/examples/block-pvc-pod.yaml PersistentVolumeClaim/loopvol-block-demo: \
             storageClassName is not set, so the cluster's default StorageClass is used instead of \
             loopvol; name it (or \"\" for a pre-bound PersistentVolume)",
            "manifests/examples/snapshot-restore.yaml PersistentVolumeClaim/loopvol-demo-restored: \
             dataSource VolumeSnapshot loopvol-demo-snapshot is not defined in the manifests",
            "manifests/examples/static-pv.yaml PersistentVolumeClaim/loopvol-static-demo: volumeName \
             loopvol-static: no such PersistentVolume in the manifests",
        ],
    );
}

#[test]
fn liveness_probe_and_selector_must_match_their_targets() {
    let findings = findings_after(&[
        (CONTROLLER, "--http-endpoint=:9808", "--http-endpoint=:9818"),
        (
            NODE,
            "  selector:\n    matchLabels:\n      app.kubernetes.io/name: loopvol\n      app.kubernetes.io/component: node",
            "  selector:\n    matchLabels:\n      app.kubernetes.io/name: loopvol\n      app.kubernetes.io/component: nodes",
        ),
    ]);
    assert_exactly(
        &findings,
        &[
            "manifests/controller.yaml Deployment/loopvol-controller container loopvol: \
             livenessProbe checks port 9808 but the livenessprobe sidecar serves 9818",
            "manifests/node.yaml DaemonSet/loopvol-node: spec.selector wants \
             app.kubernetes.io/component=nodes but the pod template does not carry it",
        ],
    );
}

#[test]
fn the_node_plugin_is_confined_to_the_kubelets_directory() {
    let findings = findings_after(&[(
        NODE,
        "            - --kubelet-dir\n            - /var/lib/kubelet",
        "            - --kubelet-dir\n            - /var/lib/kubelet-elsewhere",
    )]);
    assert_exactly(
        &findings,
        &[
            "manifests/node.yaml DaemonSet/loopvol-node container loopvol: --kubelet-dir \
             /var/lib/kubelet-elsewhere, but the kubelet's paths arrive under /var/lib/kubelet: \
             every NodeStageVolume and NodePublishVolume would be refused",
        ],
    );
}

#[test]
fn the_node_plugin_must_see_the_hosts_cgroup_tree_writable_at_its_cgroup_root() {
    let mount = "            - name: cgroup\n              mountPath: /sys/fs/cgroup\n";
    let expected_missing = "manifests/node.yaml DaemonSet/loopvol-node container loopvol: \
         --cgroup-root /sys/fs/cgroup is not the host's cgroup tree: mount hostPath \
         /sys/fs/cgroup at /sys/fs/cgroup, or no pod's cgroup is found and every volume with IO \
         limits is refused";
    // Without the mount (the container sees only its own cgroup there).
    let findings = findings_after(&[(NODE, mount, "")]);
    assert_reports(&findings, expected_missing);
    // Mounted somewhere else than where the driver looks.
    let findings = findings_after(&[(
        NODE,
        mount,
        "            - name: cgroup\n              mountPath: /host/sys/fs/cgroup\n",
    )]);
    assert_exactly(&findings, &[expected_missing]);
    // ...unless --cgroup-root names that place.
    let findings = findings_after(&[
        (
            NODE,
            mount,
            "            - name: cgroup\n              mountPath: /host/sys/fs/cgroup\n",
        ),
        (
            NODE,
            "            - --metrics-address\n",
            "            - --cgroup-root\n            - /host/sys/fs/cgroup\n            - --metrics-address\n",
        ),
    ]);
    assert_exactly(&findings, &[]);
    // Read-only: io.max and the blkio throttle files cannot be written.
    let findings = findings_after(&[(
        NODE,
        mount,
        "            - name: cgroup\n              mountPath: /sys/fs/cgroup\n              readOnly: true\n",
    )]);
    assert_exactly(
        &findings,
        &[
            "manifests/node.yaml DaemonSet/loopvol-node container loopvol: the host's cgroup \
           tree at /sys/fs/cgroup is mounted readOnly: IO limits are written into pods' cgroups \
           there (io.max, blkio.throttle.*)",
        ],
    );
    // Some other host directory is not the host's cgroup tree either.
    let findings = findings_after(&[(
        NODE,
        "          hostPath:\n            path: /sys/fs/cgroup\n",
        "          hostPath:\n            path: /sys/fs/cgroup/blkio\n",
    )]);
    assert_exactly(&findings, &[expected_missing]);
}

#[test]
fn rbac_on_a_resource_no_crd_serves_is_reported() {
    let findings = findings_after(&[(
        "manifests/rbac.yaml",
        "resources: [\"looppools/status\"]",
        "resources: [\"looppool/status\"]",
    )]);
    assert_exactly(
        &findings,
        &[
            "manifests/rbac.yaml ClusterRole/loopvol-node-looppools: rule on looppool/status in \
             API group loopvol.csi.dev: no CustomResourceDefinition in the manifests serves it",
        ],
    );
    // The status subresource must be one the CRD has.
    let findings = findings_after(&[(
        "manifests/looppool-crd.yaml",
        "      subresources:\n        status: {}\n",
        "",
    )]);
    assert_exactly(
        &findings,
        &[
            "manifests/rbac.yaml ClusterRole/loopvol-node-looppools: rule on looppools/status in \
             API group loopvol.csi.dev: no CustomResourceDefinition in the manifests serves it",
        ],
    );
}
