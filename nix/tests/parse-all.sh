#!/usr/bin/env bash
# Checks that every .nix file of the repository parses (nix-instantiate --parse).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  mapfile -t files < <(git ls-files --cached --others --exclude-standard -- '*.nix')
else
  mapfile -t files < <(find . -name '*.nix' -not -path './.git/*' -not -path './target/*' | sed 's|^\./||')
fi
ok=0 bad=0
for f in "${files[@]}"; do
  [ -f "$f" ] || continue
  if nix-instantiate --store dummy:// --parse "$f" >/dev/null; then
    ok=$((ok + 1))
  else
    echo "parse error: $f" >&2
    bad=$((bad + 1))
  fi
done
echo "nix parse: $ok passed, $bad failed"
[ "$bad" -eq 0 ]
