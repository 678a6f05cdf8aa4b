#!/usr/bin/env bash
# Fails when dist/systemd/cgtproxy.service and nix/hardening.nix disagree.
# Needs only nix-instantiate (Debian's nix-bin will do) and python3; no nixpkgs.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
unit=${1:-$root/dist/systemd/cgtproxy.service}
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
# --store dummy://: evaluation only, no store or daemon needed (any user).
nix-instantiate --store dummy:// --eval --strict --json "$root/nix/hardening.nix" >"$tmp"
python3 "$root/nix/tests/unit_drift.py" "$tmp" "$unit"
