// Generates the gRPC code from proto/ with a vendored protoc, so a fresh machine
// needs no system protobuf compiler.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/mutualstore.proto");
    println!("cargo:rerun-if-changed=proto/fsmeta.proto");
    // Shard bytes as `Bytes`: decoded without a copy out of the received buffer, and
    // shared rather than copied when a request is built from a shard.
    tonic_prost_build::configure()
        .bytes(".mutualstore.v1.PutShardRequest.data")
        .bytes(".mutualstore.v1.GetShardResponse.data")
        // prost's codec with whole-message buffers (see src/rpc/codec.rs).
        .codec_path("crate::rpc::codec::ProstCodec")
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/mutualstore.proto"], &["proto"])?;
    // Filesystem metadata: plain prost messages, no service.
    tonic_prost_build::configure().build_client(false).build_server(false).compile_protos(&["proto/fsmeta.proto"], &["proto"])?;
    Ok(())
}
