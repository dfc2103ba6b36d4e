#!/usr/bin/env bash
# Installs the Debian packages kubeshift's lab, datapath and tests need. Quick when
# they are already there.
set -euo pipefail

pkgs=(iproute2 iptables nftables conntrack containernetworking-plugins util-linux
      clang llvm libbpf-dev bpftool libelf-dev pkg-config curl)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup-machine] installing ${missing[*]}" >&2
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo is missing: kubeshift needs the machine's Rust toolchain (1.95)" >&2; exit 1; }
bash "$(dirname "$0")/setup-linters.sh"
