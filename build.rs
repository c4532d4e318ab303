//! Compiles proto/ into Rust with tonic-prost-build. protox parses the .proto files, so no
//! `protoc` binary is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/ec2kubelet/agent/v1/agent.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // 1 KiB buffers: the operator holds one status stream per pod (src/agent/codec.rs).
        .codec_path("crate::agent::codec::AgentCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
