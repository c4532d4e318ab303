# The two commands of the README: `make demo` and `make test`.
.PHONY: demo demo-dev test tools crds lint e2e image image-push agent-dist

# Runs the main job on the embedded default (no AWS account, no cluster): the real control plane
# (built first by `make tools`: etcd, kube-apiserver, kube-controller-manager, kube-scheduler),
# the operator on the local backend, and the samples.
demo: tools
	cargo build --quiet --bins
	cargo run --quiet --bin ec2-kubelet-dev -- demo --control-plane .tools/bin/control-plane

# The same on the dev cluster (an in-process API server stand-in), for machines without Go.
demo-dev:
	cargo build --quiet --bins
	cargo run --quiet --bin ec2-kubelet-dev -- demo

# Every test, each phase timed (e2e/test.sh): the tools the tests need into .tools/, formatting,
# the suites, the demo end to end as a user runs it (e2e/demo.sh), and the operator end to end on
# the real control plane (e2e/real.sh).
test:
	bash e2e/test.sh

# The operator end to end on a real control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler built from Kubernetes' own Go modules: e2e/control-plane), with kubectl and helm.
e2e: tools
	cargo build --quiet --bins
	bash e2e/real.sh

# kubectl, helm, moto (the EC2 emulator) and the real control plane into .tools/ (idempotent).
tools:
	bash e2e/tools.sh >/dev/null

# Regenerates crds/ and the chart's CRDs from src/crd/.
crds:
	cargo run --quiet --bin ec2-kubelet -- crdgen

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

# The operator image (Dockerfile; Docker with BuildKit). IMAGE is the repository to push to; the
# tag is the workspace version, which is the chart's appVersion (tests/image.rs checks both).
IMAGE ?= ghcr.io/ec2-kubelet/ec2-kubelet
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)

image:
	docker build -t $(IMAGE):$(VERSION) .

image-push: image
	docker push $(IMAGE):$(VERSION)

# The agent binary (Linux, glibc) into dist/, for AMI builds and user data.
agent-dist:
	docker build --target agent --output type=local,dest=dist .
