//! The CSI spec's gRPC types and service traits (proto/csi/csi.proto, vendored with its
//! licence) generated into OUT_DIR; src/csi/grpc.rs includes them.

fn main() {
    let protoc = protoc_bin_vendored::protoc_bin_path()
        .expect("protoc-bin-vendored has protoc for this host");
    // A build script is single-threaded: setting its own environment is safe.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        // No generated message derives Debug: NodePublishVolumeRequest (and others) carry
        // secrets, and a `{:?}` of one must not compile.
        .skip_debug(["."])
        // Stage, unstage, stats, expand: UNIMPLEMENTED, as the spec asks of a plugin without
        // those capabilities.
        .generate_default_stubs(true)
        .compile_protos(&["proto/csi/csi.proto"], &["proto/csi"])
        .expect("proto/csi/csi.proto compiles");
}
