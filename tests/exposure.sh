#!/usr/bin/env bash
# systemd-analyze's exposure score of the shipped units, computed offline from
# the unit files (systemd >= 250), without installing or booting anything: the
# same figures the VM test (tests/vm/guest-test.sh) reads from the booted guest.
# Fails when a unit scores above its bound: the daemon 1.2, with the eBPF
# datapath's drop-in (cgtproxy-ebpf.conf: CAP_BPF, bpf()) too, the forwarder 1.5
# (why not 1.2: see MAX_FORWARD_EXPOSURE in tests/vm/guest-test.sh).
set -euo pipefail
cd "$(dirname "$0")/../dist/systemd"
# The daemon with the drop-in applied, as systemd merges it (settings in order).
ebpf=$(mktemp -d)
trap 'rm -rf "$ebpf"' EXIT
cat cgtproxy.service cgtproxy-ebpf.conf >"$ebpf/cgtproxy.service"
status=0
for bound in cgtproxy.service:1.2 "$ebpf/cgtproxy.service:1.2" cgtproxy-forward.service:1.5; do
    unit=${bound%:*} max=${bound##*:}
    # --offline reads the file as is; older systemd only warns about newer
    # keys (Type=notify-reload, ImportCredential=), which score nothing.
    case $unit in /*) ;; *) unit=./$unit ;; esac
    line=$(systemd-analyze security --offline=yes --no-pager "$unit" 2>/dev/null | grep -i 'overall exposure')
    score=$(echo "$line" | grep -oE '[0-9]+\.[0-9]+' | head -n1)
    name=$unit
    [ "$unit" = "$ebpf/cgtproxy.service" ] && name="cgtproxy.service with cgtproxy-ebpf.conf"
    echo "$name: ${score:-unknown} (at most $max)"
    if [ -z "$score" ] || ! awk -v e="$score" -v m="$max" 'BEGIN { exit !(e <= m) }'; then
        systemd-analyze security --offline=yes --no-pager "$unit" 2>/dev/null | grep '✗' >&2 || true
        status=1
    fi
done
exit $status
