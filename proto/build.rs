//! Compiles the .proto files into Rust with tonic-prost-build. protox parses them, so no
//! `protoc` binary is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["ec2kubelet/agent/v1/agent.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // 1 KiB buffers: the operator holds one status stream per pod (codec.rs).
        .codec_path("crate::codec::AgentCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
