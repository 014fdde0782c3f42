//! Compile proto/csi.proto with protox (pure Rust), so a fresh clone builds without protoc.

fn main() {
    let proto_dir = "../proto";
    println!("cargo:rerun-if-changed={proto_dir}/csi.proto");
    let fds = protox::compile(["csi.proto"], [proto_dir]).expect("proto/csi.proto must compile");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)
        .expect("generate CSI gRPC code");
}
