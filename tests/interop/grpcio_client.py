#!/usr/bin/env python3
"""Drive a running loopvol through one volume's whole life with Python grpcio.

grpcio is gRPC C-core, a client loopvol did not write: it is dialed with its default channel
options, so on a unix socket it sends the percent-encoded socket path as :authority. The CSI
stubs are generated from loopvol's proto/csi.proto at run time with grpcio-tools' protoc.

usage: grpcio_client.py SOCKET WORKDIR
Prints one line per step; exits non-zero on the first failure.
"""

import hashlib
import importlib
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc

MIB = 1 << 20


def load_csi(proto_dir):
    out = tempfile.mkdtemp(prefix="csi-py-")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main([
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        os.path.join(proto_dir, "csi.proto"),
    ])
    if rc != 0:
        sys.exit(f"protoc failed on {proto_dir}/csi.proto ({rc})")
    sys.path.insert(0, out)
    return importlib.import_module("csi_pb2"), importlib.import_module("csi_pb2_grpc")


def step(name, detail=""):
    print(f"ok {name} {detail}".rstrip(), flush=True)


def main():
    socket, work = sys.argv[1], sys.argv[2]
    proto_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")
    pb, rpc = load_csi(os.path.normpath(proto_dir))
    # Default channel options: no grpc.default_authority override.
    channel = grpc.insecure_channel(f"unix://{socket}")
    identity = rpc.IdentityStub(channel)
    controller = rpc.ControllerStub(channel)
    node = rpc.NodeStub(channel)

    info = identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=10)
    assert info.name == "loopvol.csi.dev", info
    step("GetPluginInfo", info.name)
    probe = identity.Probe(pb.ProbeRequest(), timeout=10)
    assert probe.ready.value, probe
    step("Probe")
    caps = controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest(), timeout=10)
    kinds = {c.rpc.type for c in caps.capabilities}
    assert pb.ControllerServiceCapability.RPC.CREATE_DELETE_VOLUME in kinds, caps
    step("ControllerGetCapabilities", str(sorted(kinds)))

    # A gRPC error must arrive as the status code the spec names, not as a reset stream.
    try:
        controller.CreateVolume(pb.CreateVolumeRequest(name=""), timeout=10)
        sys.exit("CreateVolume without a name succeeded")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        step("CreateVolume(no name)", e.code().name)

    mount = pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(fs_type="ext4"),
        access_mode=pb.VolumeCapability.AccessMode(
            mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
    )
    vol = controller.CreateVolume(pb.CreateVolumeRequest(
        name="grpcio-interop",
        capacity_range=pb.CapacityRange(required_bytes=64 * MIB),
        volume_capabilities=[mount],
    ), timeout=30).volume
    assert vol.capacity_bytes >= 64 * MIB, vol
    step("CreateVolume", vol.volume_id)

    staging = os.path.join(work, "staging")
    target = os.path.join(work, "pods", "target")
    os.makedirs(staging, exist_ok=True)
    node.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging, volume_capability=mount,
        volume_context=vol.volume_context), timeout=60)
    step("NodeStageVolume", staging)
    node.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging, target_path=target,
        volume_capability=mount), timeout=60)
    step("NodePublishVolume", target)

    data = os.urandom(4 * MIB)
    path = os.path.join(target, "data.bin")
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    step("write+read through the published volume", f"{len(data)} bytes")

    stats = node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
        volume_id=vol.volume_id, volume_path=target), timeout=30)
    used = [u.used for u in stats.usage if u.unit == pb.VolumeUsage.BYTES]
    assert used and used[0] >= 4 * MIB, stats
    step("NodeGetVolumeStats", f"used={used[0]}")

    node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(
        volume_id=vol.volume_id, target_path=target), timeout=60)
    assert not os.path.exists(target), "target left behind"
    step("NodeUnpublishVolume")
    node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=staging), timeout=60)
    step("NodeUnstageVolume")
    controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=30)
    step("DeleteVolume")
    listed = controller.ListVolumes(pb.ListVolumesRequest(), timeout=30)
    assert all(e.volume.volume_id != vol.volume_id for e in listed.entries), listed
    step("ListVolumes", f"{len(listed.entries)} left")
    channel.close()
    print("grpcio interop: all steps passed", flush=True)


if __name__ == "__main__":
    main()
