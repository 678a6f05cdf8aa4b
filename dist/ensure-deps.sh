#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages cgtproxy needs to build and test, when they
# are missing. As root it installs them; otherwise it names the command to run.
# Usage: dist/ensure-deps.sh [extra-package ...]
set -euo pipefail

packages=(libnftnl-dev libmnl-dev pkg-config clang libbpf-dev nftables iproute2 util-linux python3 "$@")
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${missing[*]}" >&2
    echo "install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "installing: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
