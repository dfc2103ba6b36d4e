#!/usr/bin/env bash
# Repeated `lab up` / `lab down` of a 3-node lab, Flannel and Calico alternating, while a
# second lab runs beside it: the check that `lab up` does not flake on a busy machine.
# Usage: scripts/lab-soak.sh [RUNS]   (default 30). Prints one line per run and a total;
# exits non-zero if any run failed. Load the machine further (e.g. a cargo build) to taste.
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-30}
bin=target/debug/kubeshift
cargo build -q -p kubeshift
cleanup() { $bin lab down --name soakbg >/dev/null 2>&1; $bin lab down --name soak >/dev/null 2>&1; }
trap cleanup EXIT
$bin lab up --name soakbg --nodes 2 --no-demo >/dev/null 2>&1 || { echo "the background lab did not start"; exit 1; }
failed=0
for i in $(seq 1 "$runs"); do
  cni=flannel; [ $((i % 2)) -eq 0 ] && cni=calico
  t0=$(date +%s)
  if out=$($bin lab up --name soak --nodes 3 --cni "$cni" 2>&1); then r=ok; else r=FAILED; failed=$((failed+1)); fi
  t1=$(date +%s)
  $bin lab down --name soak >/dev/null 2>&1
  echo "run $i $cni $r $((t1-t0))s load $(cut -d' ' -f1 /proc/loadavg)"
  [ "$r" = ok ] || echo "$out" | tail -n 30
done
echo "$((runs-failed)) of $runs lab up runs passed"
[ "$failed" -eq 0 ]
