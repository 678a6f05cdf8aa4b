#!/usr/bin/env bash
# Fails when a shipped unit and its Nix hardening file disagree:
#   dist/systemd/cgtproxy.service          nix/hardening.nix
#   dist/systemd/cgtproxy-forward.service  nix/hardening-forward.nix
# Needs only nix-instantiate (Debian's nix-bin will do) and python3; no nixpkgs.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
rc=0
for pair in cgtproxy:hardening cgtproxy-forward:hardening-forward; do
  unit=$root/dist/systemd/${pair%%:*}.service nix=nix/${pair#*:}.nix
  # --store dummy://: evaluation only, no store or daemon needed (any user).
  nix-instantiate --store dummy:// --eval --strict --json "$root/$nix" >"$tmp"
  python3 "$root/nix/tests/unit_drift.py" "$tmp" "$unit" "$nix" || rc=1
done
exit "$rc"
