//! Compile proto/csi.proto and proto/transfer.proto with protox (pure Rust), so a fresh clone
//! builds without protoc.

fn main() {
    let proto_dir = "../proto";
    println!("cargo:rerun-if-changed={proto_dir}/csi.proto");
    println!("cargo:rerun-if-changed={proto_dir}/transfer.proto");
    let fds = protox::compile(["csi.proto", "transfer.proto"], [proto_dir])
        .expect("proto/csi.proto and proto/transfer.proto must compile");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // A transfer chunk's payload as `Bytes`: decoding slices the received buffer instead
        // of copying 4 MiB into a fresh Vec per chunk.
        .bytes(".loopvol.transfer.v1.Chunk.data")
        .compile_fds(fds)
        .expect("generate gRPC code");
}
