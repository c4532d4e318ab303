# The two commands of the README: `make demo` and `make test`.
.PHONY: demo test tools crds lint e2e

# Runs the main job on the embedded default (no AWS account, no cluster).
demo:
	cargo build --quiet --bins
	cargo run --quiet -- demo

# Every test: installs the tools the tests need into .tools/, checks formatting, runs the suites,
# then runs the demo end to end as a user would (e2e/demo.sh).
test: tools
	cargo fmt --all -- --check
	cargo test --locked
	bash e2e/demo.sh

# The operator end to end on a real control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler built from Kubernetes' own Go modules: e2e/control-plane), with kubectl and helm.
e2e: tools
	bash e2e/real.sh

# kubectl, helm and moto (the EC2 emulator) into .tools/ (idempotent).
tools:
	bash e2e/tools.sh

# Regenerates crds/ and the chart's CRDs from src/crd/.
crds:
	cargo run --quiet -- crdgen

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets --locked -- -D warnings
