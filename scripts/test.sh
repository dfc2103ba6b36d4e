#!/usr/bin/env bash
# Runs all of kubeshift's tests, after setting up what they need on a fresh machine:
# Debian packages, the lab's control plane (built from source, cached), the build.
# The lab tests start real clusters in network namespaces; they need root.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-machine.sh
bash scripts/build-control-plane.sh
cargo build --workspace --all-targets
cargo test --workspace
