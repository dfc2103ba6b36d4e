#!/usr/bin/env bash
# The lab alone, from a fresh machine: set up, build, start a 3-node
# Flannel cluster with real kube-proxy and the demo workload, and show it.
# Extra arguments go to `kubeshift lab up` (e.g. --cni calico --pools 2).
# Remove it afterwards with: target/debug/kubeshift lab down
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-machine.sh
bash scripts/build-control-plane.sh
cargo build -p kubeshift
target/debug/kubeshift lab up "$@"
export KUBECONFIG=/var/lib/kubeshift/lab/lab/kubeconfig
kubectl get nodes -o wide
kubectl get pods,svc -A -o wide
