#!/usr/bin/env bash
# The whole test suite: unit tests, kernel tests (real packets in private network
# namespaces; root), the Nix checks that run without nixpkgs (module evaluation
# with the fixtures in ../shared/nix-fixtures), and the systemd VM test. Installs
# missing Debian/Ubuntu packages first when run as root (redsocks only for
# `cargo bench --bench kernel`, which compares the forwarder with it). The
# Debian package is built and its contents checked (tests/deb/check.sh); the
# VM test installs it.
# CGTPROXY_SKIP_VM=1 leaves out the VM test (it needs several minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
# The kernel tests need root: as another user, the same command goes through
# sudo, keeping PATH (rustup's cargo) and the environment (CI, CGTPROXY_*).
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null; then
        echo "the kernel tests need root, and there is no sudo: run $0 as root" >&2
        exit 1
    fi
    exec sudo -E env PATH="$PATH" "$0" "$@"
fi
dist/ensure-deps.sh nix-bin pyflakes3 debootstrap v2ray microsocks dante-server tinyproxy redsocks dpkg-dev

echo "== systemd-analyze security of the shipped units (offline)"
tests/exposure.sh

echo "== Nix: parse, hardening drift, module evaluation, flake show/check"
nix/tests/parse-all.sh
nix/tests/unit-drift.sh
# Offline copies of nixpkgs' lib and home-manager (test data beside the clone,
# never in it), as CI has them; without them run-eval.sh says what it left out,
# and with CI=true fails.
fixtures=../shared/nix-fixtures
if [ -d "$fixtures" ]; then
    export NIXPKGS_LIB="${NIXPKGS_LIB:-$fixtures/nixpkgs-lib}"
    export HOME_MANAGER="${HOME_MANAGER:-$fixtures/home-manager}"
fi
nix/tests/run-eval.sh
nix/tests/flake-check.sh

echo "== Debian package: build and contents"
cargo build --release --locked
deb=$(dist/deb/build.sh --bin "$PWD/target/release/cgtproxy")
tests/deb/check.sh "$deb"

if [ -z "${CGTPROXY_SKIP_VM:-}" ] && [ -x tests/vm/run.sh ]; then
    echo "== systemd VM test (installs that package)"
    CGTPROXY_DEB="$deb" tests/vm/run.sh
fi

echo "== cargo test: unit and kernel tests"
cargo test --locked -- --test-threads=1
