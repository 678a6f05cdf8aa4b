#!/usr/bin/env bash
# systemd-analyze's exposure score of the shipped units, computed offline from
# the unit files (systemd >= 250), without installing or booting anything: the
# same figures the VM test (tests/vm/guest-test.sh) reads from the booted guest.
# Fails when a unit scores above its bound: the daemon 1.2, the forwarder 1.5
# (why not 1.2: see MAX_FORWARD_EXPOSURE in tests/vm/guest-test.sh).
set -euo pipefail
cd "$(dirname "$0")/../dist/systemd"
status=0
for bound in cgtproxy.service:1.2 cgtproxy-forward.service:1.5; do
    unit=${bound%%:*} max=${bound#*:}
    # --offline reads the file as is; older systemd only warns about newer
    # keys (Type=notify-reload, ImportCredential=), which score nothing.
    line=$(systemd-analyze security --offline=yes --no-pager "./$unit" 2>/dev/null | grep -i 'overall exposure')
    score=$(echo "$line" | grep -oE '[0-9]+\.[0-9]+' | head -n1)
    echo "$unit: ${score:-unknown} (at most $max)"
    if [ -z "$score" ] || ! awk -v e="$score" -v m="$max" 'BEGIN { exit !(e <= m) }'; then
        systemd-analyze security --offline=yes --no-pager "./$unit" 2>/dev/null | grep '✗' >&2 || true
        status=1
    fi
done
exit $status
