//! Generates the server side of containerd's Snapshots gRPC service.

fn main() {
    println!("cargo:rerun-if-changed=proto");
    if let Err(e) = tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_protos(&["proto/snapshots.proto"], &["proto"])
    {
        // protoc comes from Debian's protobuf-compiler (`cargo xtask setup`).
        panic!(
            "generating the Snapshots gRPC server failed: {e}\n\
             (is protoc installed? `apt-get install protobuf-compiler` or `cargo xtask setup`)"
        );
    }
}
