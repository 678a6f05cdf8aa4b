#!/usr/bin/env bash
# Runs the module-evaluation tests (nix/tests/eval.nix) with Nix and nixpkgs' lib
# only. NIXPKGS_LIB: a checkout of nix-community/nixpkgs.lib, or of nixpkgs
# (either the repository root or its lib/ directory). Never commit that copy.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

if [ -z "${NIXPKGS_LIB:-}" ]; then
  echo "eval tests skipped: set NIXPKGS_LIB to a checkout of nixpkgs' lib"
  exit 0
fi
lib=$(cd "$NIXPKGS_LIB" && pwd)
[ -f "$lib/lib/default.nix" ] && lib=$lib/lib
if [ ! -f "$lib/default.nix" ] || [ ! -f "$lib/modules.nix" ]; then
  echo "eval tests: NIXPKGS_LIB=$NIXPKGS_LIB holds no nixpkgs lib" >&2
  exit 1
fi

# --store dummy://: pure evaluation, no store and no daemon, so Debian's
# nix-bin works as any user on a machine that never ran Nix.
if ! out=$(nix-instantiate --store dummy:// --eval --strict --json \
  "$root/nix/tests/eval.nix" --arg lib "import (/. + \"$lib\")"); then
  echo "eval tests: 0 passed, 1 failed"
  exit 1
fi
python3 - "$out" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
for name in r["names"]:
    print(f"ok {name}")
print(f"eval tests: {r['passed']} passed, {r['failed']} failed")
PY
