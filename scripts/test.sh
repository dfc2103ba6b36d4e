#!/usr/bin/env bash
# Runs all of kubeshift's tests, after setting up what they need on a fresh machine:
# Debian packages, the lab's control plane (built from source, cached), the build.
# The lab tests start real clusters in network namespaces; they need root.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup-machine.sh
bash scripts/build-control-plane.sh

# The tree is rustfmt-clean (rustfmt.toml) and clippy-clean; both fail the run.
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

# Doc tests are left out (there are none; their empty runs would close the output).
# Benches are built and run by hand, see BENCHMARKS.md.
out=$(mktemp)
trap 'rm -f "$out"' EXIT
# Each run has a deadline, so a test that hangs fails the run with its name on screen
# ("has been running for over 60 seconds") instead of eating CI's whole budget: unit
# tests first (they take seconds), then the lab tests (about 45 minutes cold).
set +e
timeout --kill-after=30s 10m cargo test --workspace --no-fail-fast --lib --bins 2>&1 | tee "$out"
unit=${PIPESTATUS[0]}
timeout --kill-after=60s 65m cargo test --workspace --no-fail-fast --test '*' 2>&1 | tee -a "$out"
status=${PIPESTATUS[0]}
set -e
for s in "$unit" "$status"; do
    if [ "$s" = 124 ] || [ "$s" = 137 ]; then echo "a test run passed its deadline (see the test still running above)"; fi
done
[ "$status" = 0 ] && status=$unit
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "%d passed, %d failed, %d skipped\n", p, f, i }' "$out"
exit "$status"
