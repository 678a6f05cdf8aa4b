#!/usr/bin/env bash
# Runs the module-evaluation tests with Nix and checkouts of their inputs only:
#   NIXPKGS_LIB   nix-community/nixpkgs.lib, or nixpkgs (its root or its lib/):
#                 nix/tests/eval.nix (the NixOS module);
#   HOME_MANAGER  home-manager (the flake.lock revision): nix/tests/eval-hm.nix,
#                 the home-manager module inside all of home-manager's modules,
#                 and nix/tests/eval-vm.nix, the VM tests' nodes, whose scripts
#                 vm_lint.py then lints as the test driver does (pyflakes).
# Never commit those copies. Without one, its tests are left out (said so); with
# CI=true, a missing one fails the run.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# missing VAR WHAT: says what is left out, or fails in CI.
missing() {
  if [ "${CI:-}" = true ]; then
    echo "eval tests: $1 is not set; CI must run $2" >&2
    exit 1
  fi
  echo "left out: $2 (set $1; \`nix flake check\` runs them too)"
}

if [ -z "${NIXPKGS_LIB:-}" ]; then
  missing NIXPKGS_LIB "all module-evaluation tests"
  exit 0
fi
lib=$(cd "$NIXPKGS_LIB" && pwd)
[ -f "$lib/lib/default.nix" ] && lib=$lib/lib
if [ ! -f "$lib/default.nix" ] || [ ! -f "$lib/modules.nix" ]; then
  echo "eval tests: NIXPKGS_LIB=$NIXPKGS_LIB holds no nixpkgs lib" >&2
  exit 1
fi
libArg="import (/. + \"$lib\")"

# --store dummy://: pure evaluation, no store and no daemon, so Debian's
# nix-bin works as any user on a machine that never ran Nix.
eval_json() {
  nix-instantiate --store dummy:// --eval --strict --json "$@" --arg lib "$libArg"
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A suite file returns { passed; failed; names; } or throws listing failures;
# its result stays in $tmp/result.json.
suite() {
  local label=$1
  shift
  if ! eval_json "$@" >"$tmp/result.json"; then
    echo "$label: 0 passed, 1 failed"
    return 1
  fi
  python3 - "$label" "$tmp/result.json" <<'PY'
import json, sys
label, r = sys.argv[1], json.load(open(sys.argv[2]))
for name in r["names"]:
    print(f"ok {name}")
print(f"{label}: {r['passed']} passed, {r['failed']} failed")
PY
}

# Debian's pyflakes3, or pyflakes for Debian's python3 (python3 on PATH may be another).
pyflakes_cmd() {
  if command -v pyflakes3 >/dev/null; then
    echo pyflakes3
  elif command -v pyflakes >/dev/null; then
    echo pyflakes
  elif /usr/bin/python3 -m pyflakes --version >/dev/null 2>&1; then
    echo "/usr/bin/python3 -m pyflakes"
  fi
}

# A misspelled key must fail evaluation with an error naming it (eval.nix can
# only see that evaluation throws, not what it says).
typo() {
  local settings=$1 option=$2 err
  if err=$(eval_json "$root/nix/tests/eval-settings.nix" --arg settings "$settings" 2>&1); then
    echo "FAIL typo: $settings evaluated without error" >&2
    return 1
  fi
  if ! grep -qF "The option \`services.cgtproxy.settings.$option' does not exist" <<<"$err"; then
    echo "FAIL typo: the error for $settings does not name $option:" >&2
    echo "$err" >&2
    return 1
  fi
  echo "ok typo $option"
}

rc=0
suite "eval tests" "$root/nix/tests/eval.nix" || rc=1
typo '{ rule-priorty = 5000; }' rule-priorty || rc=1
typo '{ tproxies.p = { port = 1; mark = 1; dns-hijack = { ip = "127.0.0.1"; tpc = true; }; }; }' \
  tproxies.p.dns-hijack.tpc || rc=1
typo '{ rules = [ { match = "x"; direct = true; tproxi = "p"; } ]; }' 'rules."[definition 1-entry 1]".tproxi' || rc=1

if [ -n "${HOME_MANAGER:-}" ]; then
  hm=$(cd "$HOME_MANAGER" && pwd)
  if [ ! -f "$hm/modules/modules.nix" ]; then
    echo "eval tests: HOME_MANAGER=$HOME_MANAGER holds no home-manager" >&2
    exit 1
  fi
  hmArg="/. + \"$hm\""
  suite "home-manager eval tests" "$root/nix/tests/eval-hm.nix" --arg homeManager "$hmArg" || rc=1
  if suite "VM test nodes" "$root/nix/tests/eval-vm.nix" --arg homeManager "$hmArg"; then
    pyflakes=$(pyflakes_cmd)
    if [ -n "$pyflakes" ]; then
      python3 -c 'import json, sys; json.dump(json.load(sys.stdin)["scripts"], sys.stdout)' \
        <"$tmp/result.json" >"$tmp/scripts.json"
      PYFLAKES=$pyflakes python3 "$root/nix/tests/vm_lint.py" "$tmp/scripts.json" || rc=1
    elif [ "${CI:-}" = true ]; then
      echo "eval tests: no pyflakes; CI must lint the VM test scripts" >&2
      rc=1
    else
      echo "left out: linting the VM test scripts (install pyflakes3)"
    fi
  else
    rc=1
  fi
else
  missing HOME_MANAGER "the home-manager module's tests"
fi
exit "$rc"
