#!/usr/bin/env bash
# The main job, from a fresh machine: set up, build, start a 3-node, 2-pool Flannel lab
# (real control plane, real kube-proxy, the demo workload), then the whole migration:
# the connectivity suite before, `migrate plan`, `migrate apply`, the suite after, and
# a summary (nodes moved, time per node, chains removed).
# Extra arguments go to `kubeshift lab up` (e.g. --cni calico). The lab alone:
# scripts/lab.sh. Remove the lab afterwards with: target/debug/kubeshift lab down
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-machine.sh
bash scripts/build-control-plane.sh
cargo build -p kubeshift -p kubeshift-datapath --bins
ks=target/debug/kubeshift
$ks lab up --nodes 3 --pools 2 "$@"
export KUBECONFIG=/var/lib/kubeshift/lab/lab/kubeconfig
out=$(mktemp -d)
echo "== connectivity before (legacy CNI + kube-proxy)"
$ks connectivity test --save "$out/before.json" | tail -3
echo "== migrate plan"
$ks migrate plan --out "$out/plan.yaml"
echo "== migrate apply"
$ks migrate apply -f "$out/plan.yaml" --yes --junit "$out/gates.xml"
echo "== connectivity after (kubeshift: policies now enforced)"
$ks connectivity test | tail -3
$ks migrate status
kubectl get pods -A -o wide
echo "plan, gates (JUnit): $out"
