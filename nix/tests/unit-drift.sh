#!/usr/bin/env bash
# Fails when a shipped unit and its Nix hardening file disagree:
#   dist/systemd/cgtproxy.service          nix/hardening.nix
#   dist/systemd/cgtproxy-forward.service  nix/hardening-forward.nix
#   dist/systemd/cgtproxy-ebpf.conf         nix/hardening-ebpf.nix (a drop-in: its
#     SystemCallFilter= line adds to the unit's, so it is compared as the unit's
#     two lines plus its own)
# Needs only nix-instantiate (Debian's nix-bin will do) and python3; no nixpkgs.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
rc=0
for pair in cgtproxy.service:hardening cgtproxy-forward.service:hardening-forward cgtproxy-ebpf.conf:hardening-ebpf; do
  unit=$root/dist/systemd/${pair%%:*} nix=nix/${pair#*:}.nix
  expr="import $root/$nix"
  if [ "${unit##*.}" = conf ]; then
    # The drop-in as systemd applies it: the unit's settings, then its own;
    # NixOS gets the same by merging the two hardening files.
    cat "$root/dist/systemd/cgtproxy.service" "$unit" >"$tmp.unit"
    unit=$tmp.unit
    expr="import $root/nix/hardening.nix // import $root/$nix"
  fi
  # --store dummy://: evaluation only, no store or daemon needed (any user).
  nix-instantiate --store dummy:// --eval --strict --json --expr "$expr" >"$tmp"
  python3 "$root/nix/tests/unit_drift.py" "$tmp" "$unit" "$nix" || rc=1
done
rm -f "$tmp.unit"
exit "$rc"
