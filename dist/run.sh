#!/usr/bin/env bash
# Builds cgtproxy and runs the daemon, installing missing system packages first
# when run as root. Arguments go to `cgtproxy run` (e.g. --config FILE); without a
# config file at /etc/cgtproxy/config.json the built-in default is used.
set -euo pipefail
cd "$(dirname "$0")/.."
dist/ensure-deps.sh
cargo build --release --locked
bin=target/release/cgtproxy
if [ "$(id -u)" -ne 0 ]; then
    # The daemon needs CAP_NET_ADMIN; nothing else runs privileged.
    exec sudo "$bin" run "$@"
fi
exec "$bin" run "$@"
