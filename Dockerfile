# syntax=docker/dockerfile:1.7
# The images of ec2-kubelet (docs/images.md). `make image` builds the operator; `make agent-dist`
# exports the agent binary, which runs on the instance itself, not in a container.
#
#   docker build -t ghcr.io/ec2-kubelet/ec2-kubelet:0.1.0 .                     # the operator
#   docker build --target agent --output type=local,dest=dist .                 # dist/ec2-kubelet-agent

ARG RUST_VERSION=1.95

# One build stage for both binaries: the workspace (every member's manifest must be present,
# the test bed's too, though nothing of it is compiled), Cargo.lock pinning every crate, and
# cache mounts that keep the registry and target/ between builds.
FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY src src
COPY e2e/testbed e2e/testbed
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ec2-kubelet --bin ec2-kubelet \
 && cargo build --release --locked -p ec2-kubelet-agent --bin ec2-kubelet-agent \
 && mkdir -p /out \
 && cp target/release/ec2-kubelet target/release/ec2-kubelet-agent /out/

# The agent binary alone, for `--output`: AMI builds and user data install it on the instance.
FROM scratch AS agent
COPY --from=build /out/ec2-kubelet-agent /ec2-kubelet-agent

# The operator (the default target): glibc and CA certificates, no shell, no package manager,
# uid 65532 as the chart's securityContext expects (runAsNonRoot, read-only root filesystem).
FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /out/ec2-kubelet /usr/local/bin/ec2-kubelet
USER 65532:65532
EXPOSE 9090 8080 10250 8443
ENTRYPOINT ["/usr/local/bin/ec2-kubelet"]
CMD ["run", "--config", "/etc/ec2-kubelet/operator.yaml"]
