#!/usr/bin/env bash
# The whole test suite: unit tests, kernel tests (real packets in private network
# namespaces; root), the Nix checks that run without nixpkgs, and the systemd VM
# test. Installs missing Debian/Ubuntu packages first when run as root (redsocks
# only for `cargo bench --bench kernel`, which compares the forwarder with it).
# CGTPROXY_SKIP_VM=1 leaves out the VM test (it needs several minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
dist/ensure-deps.sh nix-bin v2ray microsocks dante-server tinyproxy redsocks
if [ "$(id -u)" -ne 0 ]; then
    echo "the kernel tests need root: run  sudo -E env PATH=\"\$PATH\" $0" >&2
    exit 1
fi

echo "== systemd-analyze security of the shipped units (offline)"
tests/exposure.sh

echo "== Nix: parse, hardening drift, module evaluation"
nix/tests/parse-all.sh
nix/tests/unit-drift.sh
nix/tests/run-eval.sh

if [ -z "${CGTPROXY_SKIP_VM:-}" ] && [ -x tests/vm/run.sh ]; then
    echo "== systemd VM test"
    cargo build --release --locked
    CGTPROXY_BIN="$PWD/target/release/cgtproxy" tests/vm/run.sh
fi

echo "== cargo test: unit and kernel tests"
cargo test --locked -- --test-threads=1
