#!/bin/bash
# The cgtproxy VM test, guest side.  Runs as root from vmtest.service (see
# image.sh) with the payload unpacked in /run/payload.  Every check writes one
# line to fd 3 (the second serial port, read by run.sh):
#   PASS name | FAIL name :: reason | INFO text | LOG evidence | DONE
# It checks what a user of the product sees: systemctl, /proc, nft, ip, and
# real packets from a lingering user's applications.
set -u

P=/run/payload
LISTEN_PORT=7893
MARK=0xbb8 # 3000, the proxy target's mark
RT=300     # route table
PEER4=10.99.0.2
PEER6=fd99::2
PEER_PORT=8080
# The forwarder's target "fwd" (config.json) and its upstreams, which live in
# a namespace "up" routed through this host: the peer's whoami server then
# tells who reached it, this host (10.99.0.1) or an upstream.
FWD_PORT=7894
WHOAMI_PORT=8081
UP4=10.98.0.2    # ss-local (SOCKS5 with UDP) on :1080, via ss-server
UP4_B=10.98.0.3  # microsocks (TCP only, password) on UP4:1081 connects from here
UP6=fd98::2
MAX_EXPOSURE=1.2 # systemd-analyze security: the daemon's bound
# The forwarder's bound: the daemon's sandbox without netlink (-0.1) but with
# IP sockets (+0.3: it relays to any destination) and without an IP address
# allow list (+0.2: its peers are the host's own, DHCP-given source addresses
# and any upstream). No unit setting that keeps it working gets to the
# daemon's 1.2 (see README, Threat model). A regression guard.
MAX_FORWARD_EXPOSURE=1.5

exec 2>&1
report() { echo "$*" >&3; echo "$*"; }
pass() { report "PASS $1"; }
fail() { local n=$1; shift; report "FAIL $n :: $*"; }
info() { report "INFO $*"; }
# Multi-line evidence for the host (shown when anything failed).
evidence() { head -n "${1:-40}" | sed 's/^/LOG   /' >&3; }
now() { cut -d' ' -f1 /proc/uptime; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# check NAME CMD...: pass if CMD succeeds, else fail with its output.
check() {
  local n=$1 out; shift
  if out=$("$@" 2>&1); then pass "$n"; else
    fail "$n" "failed: $*"; printf '%s\n' "$out" | evidence
  fi
}

# An app of the lingering user alice, as her own shell would start it.
as_alice() {
  runuser -u alice -- env XDG_RUNTIME_DIR=/run/user/1000 \
    DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/1000/bus "$@"
}
probe_cmd() { echo python3 "$P/vmnet.py" probe "$1" "$2" "${3:-$PEER_PORT}" 3; }

# launch HOW TARGET PROTO HOST [PORT]: run one probe and print its answer.
#   exec:  cgtproxy exec TARGET -- probe            (transient user scope)
#   slice: systemd-run --user --slice=cgtproxy-TARGET.slice probe
#   root:  the probe from this unclassified system service
launch() {
  local how=$1 target=$2 proto=$3 host=$4 port=${5:-}
  case $how in
    exec) as_alice timeout 20 cgtproxy exec "$target" -- $(probe_cmd "$proto" "$host" $port) ;;
    slice) as_alice timeout 20 systemd-run --user --quiet --wait --pipe \
      --slice="cgtproxy-$target.slice" $(probe_cmd "$proto" "$host" $port) ;;
    root) timeout 20 $(probe_cmd "$proto" "$host" $port) ;;
  esac
}

# expect NAME WANT HOW TARGET PROTO HOST [PORT]: the probe's answer must be WANT
# ("TPROXY <dst> 8080": reached the listener with its original destination;
# "PEER <dst> 8080": reached the peer; "FROM <src>": reached the peer's whoami
# server from <src>; "ERROR": reached nothing).
expect() {
  local n=$1 want=$2 out; shift 2
  out=$(launch "$@" 2>&1)
  if [ "$want" = ERROR ] && [[ $out == ERROR* ]]; then pass "$n"
  elif [ "$out" = "$want" ]; then pass "$n"
  else fail "$n" "want '$want', got '$(echo "$out" | tr '\n' ' ' | cut -c1-200)'"; fi
}

dst() { case $1 in *4) echo "$PEER4" ;; *6) echo "$PEER6" ;; esac; }
proto() { echo "${1%?}"; } # tcp4 -> tcp

main_pid() { systemctl show -P MainPID "${1:-cgtproxy}.service"; }
has_table() { nft list table inet cgtproxy >/dev/null 2>&1; }
rule_count() { ip "-$1" rule show | grep -c "fwmark $MARK lookup $RT"; }
has_route() { ip "-$1" route show table "$RT" 2>/dev/null | grep -q '^local default dev lo'; }
rules_in() {
  has_table && [ "$(rule_count 4)" = 1 ] && [ "$(rule_count 6)" = 1 ] && has_route 4 && has_route 6
}
# The table's chains and rules without map elements: those follow the
# cgroups that come and go, the rest must only change with the config.
ruleset_shape() {
  nft list table inet cgtproxy | awk '/elements = \{/ { skip = 1 } skip { if (/\}/) skip = 0; next } { print }'
}
netstate() {
  echo "# nft list table inet cgtproxy"; nft list table inet cgtproxy 2>&1
  echo "# ip rule"; ip -4 rule; ip -6 rule
  echo "# table $RT"; ip -4 route show table "$RT" 2>&1; ip -6 route show table "$RT" 2>&1
}

# rootless PREFIX PID: PID runs as a dynamic user with exactly CAP_NET_ADMIN.
rootless() {
  local n=$1 pid=$2 ruid euid suid fsuid capeff capbnd
  if [ ! -r "/proc/$pid/status" ]; then
    fail "${n}dynamic-user" "no main process (MainPID=$pid)"
    fail "${n}cap-net-admin-only" "no main process"
    return
  fi
  read -r _ ruid euid suid fsuid < <(grep '^Uid:' "/proc/$pid/status")
  if [ "$ruid" = "$euid" ] && [ "$euid" = "$suid" ] && [ "$ruid" -ge 61184 ] && [ "$ruid" -le 65519 ]; then
    pass "${n}dynamic-user"
  else fail "${n}dynamic-user" "uids $ruid $euid $suid $fsuid (dynamic range 61184..65519)"; fi
  # Effective and bounding set: CAP_NET_ADMIN (bit 12) and nothing else.
  capeff=$(awk '/^CapEff:/ { print $2 }' "/proc/$pid/status")
  capbnd=$(awk '/^CapBnd:/ { print $2 }' "/proc/$pid/status")
  if [ "$capeff$capbnd" = 00000000000010000000000000001000 ]; then pass "${n}cap-net-admin-only"
  else fail "${n}cap-net-admin-only" "CapEff=$capeff CapBnd=$capbnd, want 0000000000001000"; fi
  info "main process $pid: user $(id -nu "$ruid" 2>/dev/null || echo "$ruid")," \
    "$(grep -E '^(CapPrm|CapBnd|CapAmb|NoNewPrivs|Seccomp):' "/proc/$pid/status" | tr -s '\t\n' '  ')"
}

t_test=$(now)
info "guest kernel $(uname -r), $(systemctl --version | head -n1), boot to test $(now)s"

# --- setup: install the product as the README tells a user ---------------------
# The .deb with apt, the configuration, `systemctl enable` (guest-deb.sh).
. "$P/guest-deb.sh"
deb_install

# A peer "out there": a network namespace behind a veth.  Its addresses exist
# only inside this guest.  nodad: usable at once, no 2 s duplicate detection.
ip netns add peer
ip link add veth0 type veth peer name veth1 netns peer
ip addr add 10.99.0.1/24 dev veth0
ip -6 addr add fd99::1/64 dev veth0 nodad
ip link set veth0 up
ip -n peer link set lo up
ip -n peer addr add "$PEER4/24" dev veth1
ip -n peer -6 addr add "$PEER6/64" dev veth1 nodad
ip -n peer link set veth1 up
systemd-run --quiet --unit=peer-server -p Type=notify \
  ip netns exec peer python3 "$P/vmnet.py" peer "$PEER_PORT" "$PEER4" "$PEER6"
# The transparent proxy: a system service whose cgroup the config classifies
# direct, so its own traffic is never looped back to itself.
systemd-run --quiet --unit=tproxy-listener -p Type=notify \
  python3 "$P/listener.py" "$LISTEN_PORT" TPROXY
# alice lingers (image.sh): her user manager is started at boot.
systemctl start user@1000.service

# --man=no: the image has no man-db; the package's pages are checked above.
check unit-verify systemd-analyze verify --man=no /usr/lib/systemd/system/cgtproxy.service
expect baseline-peer-tcp4 "PEER $PEER4 $PEER_PORT" root - tcp "$PEER4"
expect baseline-peer-udp6 "PEER $PEER6 $PEER_PORT" root - udp "$PEER6"
check render-unprivileged as_alice cgtproxy render --config /etc/cgtproxy/config.json
check check-valid-config cgtproxy check --config "$P/config-reload.json"
if out=$(cgtproxy check --config "$P/config-invalid.json" 2>&1); then
  fail check-rejects-invalid "exit 0"
else pass check-rejects-invalid; info "check invalid: $(echo "$out" | head -n1)"; fi

# --- start: ready means rules in --------------------------------------------------
t=$(now)
if systemctl start cgtproxy.service; then pass start; else fail start "systemctl start failed"; fi
info "systemctl start took $(elapsed "$t")s"
# Checked at once: READY=1 must come only after the table and routes are in.
check start-table-present has_table
check start-ip-rules test "$(rule_count 4)$(rule_count 6)" = 11
check start-routes eval 'has_route 4 && has_route 6'

rootless "" "$(main_pid)"

# --- traffic of alice's applications ----------------------------------------------
for p in tcp4 udp4 tcp6 udp6; do
  expect "proxy-exec-$p" "TPROXY $(dst $p) $PEER_PORT" exec proxy "$(proto $p)" "$(dst $p)"
done
for p in tcp4 udp4 tcp6 udp6; do
  expect "proxy-slice-$p" "TPROXY $(dst $p) $PEER_PORT" slice proxy "$(proto $p)" "$(dst $p)"
done
for p in tcp4 udp4 tcp6 udp6; do
  expect "direct-exec-$p" "PEER $(dst $p) $PEER_PORT" exec direct "$(proto $p)" "$(dst $p)"
done
for p in tcp4 udp4 tcp6 udp6; do
  expect "drop-exec-$p" ERROR exec drop "$(proto $p)" "$(dst $p)"
done
# exec passes the command's exit status through, and refuses unknown targets.
as_alice cgtproxy exec direct -- sh -c 'exit 7'
st=$?
if [ "$st" = 7 ]; then pass exec-exit-status; else fail exec-exit-status "exit $st, want 7"; fi
if out=$(as_alice cgtproxy exec nosuch -- true 2>&1); then
  fail exec-unknown-target "accepted"
else pass exec-unknown-target; info "exec nosuch: $(echo "$out" | head -n1)"; fi

# --- containers: systemd-nspawn, routed by their machine-NAME.scope ---------------
# Two containers run the host's own /usr (--volatile=yes: a tmpfs root), as
# machined registers them: wiki with a direct veth (ve-wiki), blog on a bridge
# (vb-blog in br-vm). config.json routes both scopes to the proxy; the host
# forwards, and the peer routes their addresses back, so a leak would answer.
sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
ip -n peer route add 10.60.0.0/16 via 10.99.0.1
ip -n peer -6 route add fd60::/16 via fd99::1
ip link add br-vm type bridge
ip addr add 10.60.1.1/24 dev br-vm
ip -6 addr add fd60:1::1/64 dev br-vm nodad
ip link set br-vm up
# nspawn NAME NETWORK-OPTION: starts container NAME as a transient service.
nspawn() {
  systemd-run --quiet --unit="nspawn-$1" systemd-nspawn --quiet -D / --volatile=yes \
    -M "$1" "$2" --bind-ro="$P" --as-pid2 /usr/bin/sleep infinity
}
leader() { machinectl show -P Leader "$1" 2>/dev/null; }
# in_container NAME CMD...: CMD in the container's network namespace.
in_container() { nsenter -t "$(leader "$1")" -n "${@:2}"; }
# address NAME N HOST-IF GATEWAY4 GATEWAY6: the container's host0 gets
# 10.60.N.2 and fd60:N::2, its default routes GATEWAY4/6.
address() {
  in_container "$1" sh -c "ip link set lo up && ip addr add 10.60.$2.2/24 dev host0 &&
    ip -6 addr add fd60:$2::2/64 dev host0 nodad && ip link set host0 up &&
    ip route add default via $4 && ip -6 route add default via $5"
}
wait_for() { for _ in $(seq 100); do "$@" && return 0; sleep 0.1; done; return 1; }
t=$(now)
nspawn wiki --network-veth
nspawn blog --network-bridge=br-vm
has_leader() { [ -n "$(leader "$1")" ]; }
if wait_for has_leader wiki && wait_for has_leader blog &&
  wait_for ip link show ve-wiki && wait_for ip link show vb-blog; then
  pass containers-started
  info "two nspawn containers up in $(elapsed "$t")s: $(machinectl list --no-legend | tr -s ' \n' ' ')"
else
  fail containers-started "$(machinectl list 2>&1 | tr '\n' ' ')"
  journalctl -b -u nspawn-wiki -u nspawn-blog -o cat --no-pager | evidence 30
fi
check container-scope systemctl is-active machine-wiki.scope
ip addr add 10.60.0.1/24 dev ve-wiki
ip -6 addr add fd60::1/64 dev ve-wiki nodad
ip link set ve-wiki up
address wiki 0 ve-wiki 10.60.0.1 fd60::1
address blog 1 vb-blog 10.60.1.1 fd60:1::1
journal_has() { journalctl -b -u cgtproxy.service -o cat --no-pager | grep -qF "$1"; }
if wait_for journal_has "forwarded traffic from interface ve-wiki (container /machine.slice/machine-wiki.scope): tproxy proxy"; then
  pass container-classified
else fail container-classified "no log line"; journalctl -b -u cgtproxy.service -o cat --no-pager | tail -n 20 | evidence; fi
for p in tcp4 udp4 tcp6 udp6; do
  out=$(in_container wiki timeout 20 $(probe_cmd "$(proto "$p")" "$(dst "$p")") 2>&1)
  if [ "$out" = "TPROXY $(dst "$p") $PEER_PORT" ]; then pass "container-$p"
  else fail "container-$p" "want 'TPROXY $(dst "$p") $PEER_PORT', got '$out'"; fi
done
if out=$(cgtproxy explain machine-wiki.scope 2>&1) && echo "$out" | grep -q "through interface ve-wiki .*kernel agrees"; then
  pass container-explain
else fail container-explain "explain"; echo "$out" | evidence; fi
# On a bridge: routed on its port where the kernel has nft's `meta broute`
# (Linux 6.4+, CONFIG_NFT_BRIDGE_META), else dropped there: closed either way.
if modprobe nft_meta_bridge 2>/dev/null && printf '6.4\n%s\n' "$(uname -r | cut -d- -f1)" | sort -V -C; then
  bridged_want="TPROXY"
else bridged_want="ERROR"; fi
info "bridged container expected: $bridged_want (kernel $(uname -r))"
for p in tcp4 udp6; do
  out=$(in_container blog timeout 20 $(probe_cmd "$(proto "$p")" "$(dst "$p")") 2>&1)
  if [ "$bridged_want" = ERROR ] && [[ $out == ERROR* ]]; then pass "container-bridged-$p"
  elif [ "$out" = "TPROXY $(dst "$p") $PEER_PORT" ]; then pass "container-bridged-$p"
  else fail "container-bridged-$p" "want '$bridged_want', got '$out'"; cgtproxy status 2>&1 | evidence; fi
done
# Stopped: its link goes, and with it its map element.
t=$(now)
machinectl terminate wiki blog
gone() { ! cgtproxy status 2>/dev/null | grep -q "interface ve-wiki\|interface vb-blog"; }
if wait_for gone; then pass containers-stopped; info "links unmapped $(elapsed "$t")s after machinectl terminate"
else fail containers-stopped "still listed"; cgtproxy status 2>&1 | evidence; fi

# --- the built-in forwarder (cgtproxy-forward.service) ------------------------------
# The upstreams' namespace, routed through this host like a proxy on the LAN.
ip netns add up
ip link add veth2 type veth peer name veth3 netns up
ip addr add 10.98.0.1/24 dev veth2
ip -6 addr add fd98::1/64 dev veth2 nodad
ip link set veth2 up
ip -n up link set lo up
ip -n up addr add "$UP4/24" dev veth3
ip -n up addr add "$UP4_B/24" dev veth3
ip -n up -6 addr add "$UP6/64" dev veth3 nodad
ip -n up link set veth3 up
ip -n up route add default via 10.98.0.1
ip -n up -6 route add default via fd98::1
ip -n peer route add default via 10.99.0.1
ip -n peer -6 route add default via fd99::1
# (/proc/sys directly: the minimal image has no sysctl.)
echo 1 >/proc/sys/net/ipv4/ip_forward
echo 1 >/proc/sys/net/ipv6/conf/all/forwarding
systemd-run --quiet --unit=peer-whoami -p Type=notify \
  ip netns exec peer python3 "$P/vmnet.py" whoami "$WHOAMI_PORT" "$PEER4" "$PEER6"
systemd-run --quiet --unit=ss-server ip netns exec up \
  ss-server -s 127.0.0.1 -p 8388 -k vmtest -m chacha20-ietf-poly1305 -u
systemd-run --quiet --unit=socks-udp ip netns exec up \
  ss-local -s 127.0.0.1 -p 8388 -b "$UP4" -l 1080 -k vmtest -m chacha20-ietf-poly1305 -u
systemd-run --quiet --unit=socks-auth ip netns exec up \
  microsocks -i "$UP4" -p 1081 -b "$UP4_B" -u fwd -P s3cret
for _ in $(seq 50); do
  [ "$(ip netns exec up ss -Hltn '( sport = :1080 or sport = :1081 or sport = :8388 )' | wc -l)" = 3 ] && break
  sleep 0.2
done
# The password for the microsocks upstream (config-forward-reload.json), root
# only, in the credential store the shipped unit imports from.
(umask 077; mkdir -p /etc/credstore; echo 'fwd:s3cret' >/etc/credstore/cgtproxy.fwd)

# The lab itself: the upstreams' namespace reaches the peer, and is seen as itself.
from_up() { [ "$(ip netns exec up python3 "$P/vmnet.py" probe "$1" "$2" "$WHOAMI_PORT" 3)" = "FROM $3" ]; }
check lab-up-reaches-peer-tcp4 from_up tcp "$PEER4" "$UP4"
check lab-up-reaches-peer-udp6 from_up udp "$PEER6" "$UP6"

check forward-unit-verify systemd-analyze verify --man=no /usr/lib/systemd/system/cgtproxy-forward.service
expect fwd-baseline-direct-tcp4 "FROM 10.99.0.1" exec direct tcp "$PEER4" "$WHOAMI_PORT"
# The daemon already routes the slice, but nothing listens yet: nothing is sent direct.
expect fwd-before-start-tcp4 ERROR exec fwd tcp "$PEER4" "$WHOAMI_PORT"

fwd_listeners() { ss -Hltun "( sport = :$FWD_PORT )" | awk '{ print $1 }' | sort | tr '\n' ' '; }
# The unit's status line (sd_notify STATUS=) names the upstream in use.
status_names() { [[ $(systemctl show -P StatusText cgtproxy-forward.service) == "forwarding fwd :$FWD_PORT "*" $1" ]]; }
t=$(now)
if systemctl start cgtproxy-forward.service; then pass forward-start; else fail forward-start "systemctl start failed"; fi
info "systemctl start cgtproxy-forward took $(elapsed "$t")s"
# Checked at once: READY=1 (Type=notify-reload) must come only once it listens.
l=$(fwd_listeners)
if [ "$l" = "tcp tcp udp udp " ]; then pass forward-ready-listening
else fail forward-ready-listening "listeners on :$FWD_PORT at READY: '$l', want TCP and UDP, v4 and v6"; fi
check forward-status-text status_names "socks5://$UP4:1080"
info "forwarder status: $(systemctl show -P StatusText cgtproxy-forward.service)"
fpid=$(main_pid cgtproxy-forward)
rootless forward- "$fpid"
af=$(systemctl show -P RestrictAddressFamilies cgtproxy-forward.service | tr ' ' '\n' | sort | tr '\n' ' ')
check forward-address-families test "$af" = "AF_INET AF_INET6 AF_UNIX "

# An app of alice in cgtproxy-fwd.slice reaches the peer through the upstream:
# the peer sees the upstream's address, not this host's.
expect fwd-exec-tcp4 "FROM $UP4" exec fwd tcp "$PEER4" "$WHOAMI_PORT"
expect fwd-exec-udp4 "FROM $UP4" exec fwd udp "$PEER4" "$WHOAMI_PORT"
expect fwd-exec-tcp6 "FROM $UP6" exec fwd tcp "$PEER6" "$WHOAMI_PORT"
expect fwd-exec-udp6 "FROM $UP6" exec fwd udp "$PEER6" "$WHOAMI_PORT"
expect fwd-slice-tcp4 "FROM $UP4" slice fwd tcp "$PEER4" "$WHOAMI_PORT"

# Reload: another upstream (microsocks, with the password from the credential)
# for new flows, same process.
install -m 0644 "$P/config-forward-reload.json" /etc/cgtproxy/config.json
check forward-reload-ok systemctl reload cgtproxy-forward.service
check forward-reload-same-pid test "$(main_pid cgtproxy-forward)" = "$fpid"
check forward-reload-status-text status_names "socks5://$UP4:1081"
expect fwd-reload-auth-tcp4 "FROM $UP4_B" exec fwd tcp "$PEER4" "$WHOAMI_PORT"
# microsocks has no UDP: the flow is dropped, never sent direct.
expect fwd-reload-udp4-not-direct ERROR exec fwd udp "$PEER4" "$WHOAMI_PORT"
install -m 0644 "$P/config.json" /etc/cgtproxy/config.json

check forward-stop systemctl stop cgtproxy-forward.service
check forward-stop-clean-exit test "$(systemctl show -P Result cgtproxy-forward.service)" = success
l=$(fwd_listeners)
check forward-stop-no-listeners test -z "$l"
expect fwd-stopped-not-direct ERROR exec fwd tcp "$PEER4" "$WHOAMI_PORT"
if journalctl -b -u cgtproxy-forward.service -o cat --no-pager | grep -q $'\x1b\['; then
  fail forward-journal-no-ansi "log lines carry ANSI escape codes"
else pass forward-journal-no-ansi; fi

# --- reload -------------------------------------------------------------------------
pid=$(main_pid)
install -m 0644 "$P/config-reload.json" /etc/cgtproxy/config.json
t=$(now)
check reload-ok systemctl reload cgtproxy.service
info "systemctl reload took $(elapsed "$t")s"
check reload-same-pid test "$(main_pid)" = "$pid"
check reload-active systemctl is-active --quiet cgtproxy.service
# config-reload.json sends the direct slice to the proxy.
expect reload-rule-change-tcp4 "TPROXY $PEER4 $PEER_PORT" exec direct tcp "$PEER4"
expect reload-rule-change-udp6 "TPROXY $PEER6 $PEER_PORT" exec direct udp "$PEER6"

before=$(ruleset_shape)
install -m 0644 "$P/config-invalid.json" /etc/cgtproxy/config.json
# The journal from here on (a cursor: a timestamp has whole seconds only).
cursor=$(journalctl -u cgtproxy.service -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p')
systemctl reload cgtproxy.service
info "reload with an invalid config: systemctl exit $?"
check reload-invalid-active systemctl is-active --quiet cgtproxy.service
check reload-invalid-same-pid test "$(main_pid)" = "$pid"
after=$(ruleset_shape)
if [ "$before" = "$after" ] && [ -n "$after" ]; then pass reload-invalid-keeps-rules
else
  fail reload-invalid-keeps-rules "ruleset changed"
  diff <(echo "$before") <(echo "$after") | evidence
fi
# Through systemd-run, not `cgtproxy exec`: exec reads the (now invalid)
# config file itself.
expect reload-invalid-keeps-traffic "TPROXY $PEER4 $PEER_PORT" slice direct tcp "$PEER4"
reload_log=$(journalctl -u cgtproxy.service --after-cursor "$cursor" -o cat --no-pager | sed 's/\x1b\[[0-9;]*m//g')
if echo "$reload_log" | grep -q 'reload failed, keeping the previous configuration: .*rules\[4\]\.tproxy'; then
  pass reload-invalid-logged
else fail reload-invalid-logged "no line naming the failed reload and the key"; echo "$reload_log" | evidence; fi
# `direct` and `drop` need no configuration: a broken one never stops a user
# from starting an app outside the proxy.
check exec-direct-without-a-valid-config as_alice cgtproxy exec direct -- true
# Back to a valid config: a restart below must be able to read it.
install -m 0644 "$P/config-reload.json" /etc/cgtproxy/config.json

# --- coexistence: nftables.service's flush ruleset, a wg-quick tunnel ------------------
# What reached the peer namespace directly on the test port, counted there.
ip netns exec peer nft -f - <<'NFT'
table inet count {
  counter arrived { }
  chain c {
    type filter hook prerouting priority -300; policy accept;
    ip saddr 10.99.0.1 meta l4proto { tcp, udp } th dport 8080 counter name "arrived"
    ip6 saddr fd99::1 meta l4proto { tcp, udp } th dport 8080 counter name "arrived"
  }
}
NFT
arrived() { ip netns exec peer nft list counter inet count arrived | awk '/packets/ { print $2 }'; }
# The start configuration again (the direct slice direct), reloaded.
install -m 0644 "$P/config.json" /etc/cgtproxy/config.json
check coexist-reload systemctl reload cgtproxy.service
# Debian's own nftables.service, whose /etc/nftables.conf starts with `flush
# ruleset`, started, reloaded and restarted while an app of alice streams.
rm -f /etc/systemd/system/nftables.service
systemctl daemon-reload
before=$(arrived)
as_alice systemd-run --user --quiet --unit=stream --slice=cgtproxy-proxy.slice \
  -p StandardOutput=file:/tmp/stream.json python3 "$P/stream.py" "$PEER4" "$PEER_PORT" 12 50 5
for _ in $(seq 50); do as_alice systemctl --user is-active --quiet stream.service && break; sleep 0.1; done
for verb in start reload restart; do
  check "nftables-$verb" systemctl "$verb" nftables.service
done
for _ in $(seq 120); do [ -s /tmp/stream.json ] && break; sleep 0.5; done
info "stream through nftables.service start/reload/restart: $(cat /tmp/stream.json 2>/dev/null)"
check nftables-flush-keeps-table has_table
# vmnet.py's listener answers "TPROXY …", its peer server "PEER …".
check nftables-flush-stream-proxied grep -q '"tcp_TPROXY"' /tmp/stream.json
if grep -q PEER /tmp/stream.json; then fail nftables-flush-nothing-direct "answered by the peer: $(cat /tmp/stream.json)"
elif [ "$(arrived)" != "$before" ]; then fail nftables-flush-nothing-direct "$(( $(arrived) - before )) packets reached the peer"
else pass nftables-flush-nothing-direct; fi
check nftables-flush-owner-refuses-delete sh -c '! nft delete table inet cgtproxy 2>/dev/null'
systemctl stop nftables.service

# WireGuard: a full tunnel brought up with wg-quick after cgtproxy. Its rules
# (added without a priority) land ahead of ours; the daemon moves ahead of them.
if modprobe wireguard 2>/dev/null && command -v wg-quick >/dev/null; then
  umask 077
  mkdir -p /etc/wireguard
  hk=$(wg genkey); pk=$(wg genkey)
  hpub=$(echo "$hk" | wg pubkey); ppub=$(echo "$pk" | wg pubkey)
  # The tunnel's far end, in the peer namespace.
  ip -n peer link add wg1 type wireguard
  echo "$pk" >/tmp/wg-peer.key
  ip netns exec peer wg set wg1 listen-port 51820 private-key /tmp/wg-peer.key \
    peer "$hpub" allowed-ips 10.77.0.1/32,fd77::1/128
  ip -n peer addr add 10.77.0.2/24 dev wg1
  ip -n peer -6 addr add fd77::2/64 dev wg1 nodad
  ip -n peer link set wg1 up
  systemd-run --quiet --unit=wg-whoami -p Type=notify \
    ip netns exec peer python3 "$P/vmnet.py" whoami 8082 10.77.0.2 fd77::2
  cat >/etc/wireguard/wg0.conf <<WG
[Interface]
PrivateKey = $hk
Address = 10.77.0.1/24, fd77::1/64
[Peer]
PublicKey = $ppub
Endpoint = $PEER4:51820
AllowedIPs = 0.0.0.0/0, ::/0
WG
  umask 022
  if bash -x "$(command -v wg-quick)" up wg0 >/tmp/wg-quick.log 2>&1; then pass wg-quick-up
  else fail wg-quick-up "wg-quick up failed"; tail -n 40 /tmp/wg-quick.log | evidence; fi
  ours_first() {
    local fam=$1 ours theirs
    ours=$(ip "-$fam" rule | awk -F: "/fwmark $MARK lookup $RT/ { print \$1; exit }")
    theirs=$(ip "-$fam" rule | awk -F: '/lookup 51820/ { print $1; exit }')
    [ -n "$ours" ] && [ -n "$theirs" ] && [ "$ours" -lt "$theirs" ]
  }
  for _ in $(seq 50); do ours_first 4 && ours_first 6 && break; sleep 0.1; done
  check wg-our-rules-first-v4 ours_first 4
  check wg-our-rules-first-v6 ours_first 6
  ip -4 rule | evidence 12
  # Unmarked traffic takes the tunnel (the far end sees the tunnel's address).
  expect wg-direct-through-tunnel "FROM 10.77.0.1" exec direct tcp 10.77.0.2 8082
  # wg-quick's anti-spoofing rule (its preraw chain) drops the proxy's answers
  # to an app whose connection took the tunnel's address: proxied traffic
  # fails, and nothing goes through the tunnel; doctor names the chain.
  expect wg-proxy-fails-closed-tcp4 ERROR exec proxy tcp 10.77.0.2 8082
  expect wg-proxy-fails-closed-udp6 ERROR exec proxy udp fd77::2 8082
  out=$(cgtproxy doctor --config /etc/cgtproxy/config.json 2>&1)
  if echo "$out" | grep -q 'FAIL firewall rpfilter.*wg-quick-wg0 preraw'; then pass wg-doctor-names-preraw
  else fail wg-doctor-names-preraw "doctor did not name wg-quick's chain"; echo "$out" | evidence; fi
  # The README's remedy, as a PostUp would apply it.
  nft insert rule ip wg-quick-wg0 preraw iifname lo accept
  nft insert rule ip6 wg-quick-wg0 preraw iifname lo accept
  # The proxied app's traffic reaches the listener, original destination intact.
  expect wg-proxy-tcp4 "TPROXY 10.77.0.2 8082" exec proxy tcp 10.77.0.2 8082
  expect wg-proxy-udp4 "TPROXY 10.77.0.2 8082" exec proxy udp 10.77.0.2 8082
  expect wg-proxy-tcp6 "TPROXY fd77::2 8082" exec proxy tcp fd77::2 8082
  expect wg-proxy-udp6 "TPROXY fd77::2 8082" exec proxy udp fd77::2 8082
  out=$(cgtproxy doctor --config /etc/cgtproxy/config.json 2>&1)
  if echo "$out" | grep -q 'ok   firewall rpfilter'; then pass wg-doctor-ok-with-remedy
  else fail wg-doctor-ok-with-remedy "doctor still fails"; echo "$out" | evidence; fi
  out=$(cgtproxy status --config /etc/cgtproxy/config.json 2>&1)
  st=$?
  if [ "$st" = 0 ]; then pass wg-status-ok; else fail wg-status-ok "exit $st"; echo "$out" | evidence; fi
  moved=$(journalctl -b -u cgtproxy.service -o cat --no-pager | sed 's/\x1b\[[0-9;]*m//g' |
    grep 'not from all fwmark 0xca6c lookup 51820 could take marked packets before ours: moving our rules')
  if [ -n "$moved" ]; then pass wg-move-logged; info "wg: $(echo "$moved" | head -n1)"
  else fail wg-move-logged "no log line naming wg-quick's rule"; fi
  check wg-quick-down wg-quick down wg0
  back() { [ "$(ip -4 rule | awk -F: "/fwmark $MARK lookup $RT/ { print \$1; exit }")" = 100 ]; }
  for _ in $(seq 50); do back && break; sleep 0.1; done
  check wg-down-rules-back-at-100 back
else
  # The image's cloud kernel has the module and image.sh installs wg-quick.
  fail wg-available "the guest kernel has no wireguard module, or wg-quick is missing"
fi
install -m 0644 "$P/config-reload.json" /etc/cgtproxy/config.json
check coexist-reload-back systemctl reload cgtproxy.service

# --- crash: SIGKILL, Restart=on-failure -----------------------------------------------
pid=$(main_pid)
t=$(now)
systemctl kill -s KILL cgtproxy.service
new=
for _ in $(seq 60); do
  sleep 0.5
  new=$(main_pid)
  if [ "$new" != 0 ] && [ "$new" != "$pid" ] && systemctl is-active --quiet cgtproxy.service; then break; fi
done
if [ "$new" != 0 ] && [ "$new" != "$pid" ] && systemctl is-active --quiet cgtproxy.service; then
  pass kill-restarted
  info "restarted after $(elapsed "$t")s, NRestarts=$(systemctl show -P NRestarts cgtproxy.service)"
else
  fail kill-restarted "MainPID $pid -> $new, $(systemctl is-active cgtproxy.service)"
fi
if rules_in; then pass kill-rules-back; else fail kill-rules-back "stale or missing rules"; netstate | evidence 60; fi
expect kill-traffic-tcp4 "TPROXY $PEER4 $PEER_PORT" exec proxy tcp "$PEER4"
expect kill-traffic-udp6 "TPROXY $PEER6 $PEER_PORT" exec proxy udp "$PEER6"

# --- stop: nothing left behind ------------------------------------------------------------
check stop-ok systemctl stop cgtproxy.service
check stop-clean-exit test "$(systemctl show -P Result cgtproxy.service)" = success
if has_table; then fail stop-no-table "table inet cgtproxy still there"; else pass stop-no-table; fi
if [ "$(rule_count 4)" = 0 ] && [ "$(rule_count 6)" = 0 ]; then pass stop-no-ip-rules
else fail stop-no-ip-rules "fwmark rules left"; ip -4 rule | evidence; ip -6 rule | evidence; fi
left=$( (ip -4 route show table "$RT"; ip -6 route show table "$RT") 2>/dev/null)
if [ -z "$left" ]; then pass stop-no-routes; else fail stop-no-routes "table $RT: $left"; fi
expect stop-traffic-direct "PEER $PEER4 $PEER_PORT" exec proxy tcp "$PEER4"

# --- the eBPF datapath under its unit: the packaged drop-in -----------------------------
# The same config with "datapath": "ebpf"; the drop-in as the README tells.
# A REDIRECT-style listener (SO_ORIGINAL_DST) takes the TPROXY listener's port.
install -Dm644 /usr/share/cgtproxy/cgtproxy-ebpf.conf /etc/systemd/system/cgtproxy.service.d/ebpf.conf
python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); c["datapath"]="ebpf"; json.dump(c, open("/etc/cgtproxy/config.json","w"))' "$P/config.json"
systemctl daemon-reload
systemctl stop tproxy-listener.service
systemd-run --quiet --unit=redirect-listener -p Type=notify \
  python3 "$P/listener.py" "$LISTEN_PORT" REDIRECT --redirect
t=$(now)
if systemctl start cgtproxy.service; then pass ebpf-start
else
  fail ebpf-start "systemctl start failed"
  journalctl -b -u cgtproxy.service -o cat --no-pager | tail -n 30 | evidence 30
fi
info "ebpf datapath: start took $(elapsed "$t")s; $(systemctl show -P StatusText cgtproxy.service)"
pid=$(main_pid)
# CAP_BPF (bit 39) and CAP_NET_ADMIN (bit 12), effective and bounding, nothing else.
caps=$(awk '/^Cap(Eff|Bnd):/ { printf "%s ", $2 }' "/proc/$pid/status" 2>/dev/null)
if [ "$caps" = "0000008000001000 0000008000001000 " ]; then pass ebpf-cap-bpf-net-admin-only
else fail ebpf-cap-bpf-net-admin-only "CapEff CapBnd = $caps"; fi
if has_table || [ "$(rule_count 4)" != 0 ]; then fail ebpf-no-table-no-rules "found nft or ip rule state"; netstate | evidence
else pass ebpf-no-table-no-rules; fi
expect ebpf-proxy-tcp4 "REDIRECT $PEER4 $PEER_PORT" exec proxy tcp "$PEER4"
expect ebpf-proxy-tcp6 "REDIRECT $PEER6 $PEER_PORT" exec proxy tcp "$PEER6"
expect ebpf-proxy-slice-tcp4 "REDIRECT $PEER4 $PEER_PORT" slice proxy tcp "$PEER4"
# UDP of a target fails closed (EPERM), as does all of a dropped app.
expect ebpf-proxy-udp4 "REDIRECT $PEER4 $PEER_PORT" exec proxy udp "$PEER4"
expect ebpf-proxy-udp6 "REDIRECT $PEER6 $PEER_PORT" exec proxy udp "$PEER6"
expect ebpf-proxy-sendto4 "REDIRECT $PEER4 $PEER_PORT" exec proxy sendto "$PEER4"
expect ebpf-drop-tcp6 ERROR exec drop tcp "$PEER6"
expect ebpf-direct-tcp4 "PEER $PEER4 $PEER_PORT" exec direct tcp "$PEER4"
expect ebpf-root-untouched "PEER $PEER6 $PEER_PORT" root - tcp "$PEER6"
check ebpf-status cgtproxy status --config /etc/cgtproxy/config.json
# The built-in forwarder reads SO_ORIGINAL_DST of what the programs redirect.
check ebpf-forward-start systemctl start cgtproxy-forward.service
expect ebpf-fwd-tcp4 "FROM $UP4" exec fwd tcp "$PEER4" "$WHOAMI_PORT"
expect ebpf-fwd-udp4 "FROM $UP4" exec fwd udp "$PEER4" "$WHOAMI_PORT"
expect ebpf-fwd-udp6 "FROM $UP6" exec fwd udp "$PEER6" "$WHOAMI_PORT"
expect ebpf-fwd-sendto4 "FROM $UP4" exec fwd sendto "$PEER4" "$WHOAMI_PORT"
check ebpf-forward-stop systemctl stop cgtproxy-forward.service
ebpf_exposure=$(systemd-analyze security --no-pager cgtproxy.service 2>&1 | grep -i 'overall exposure' | grep -oE '[0-9]+\.[0-9]+' | head -n1)
info "systemd-analyze security with the ebpf drop-in: $ebpf_exposure"
if [ -n "$ebpf_exposure" ] && awk -v e="$ebpf_exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }'; then
  pass "ebpf-exposure-at-most-$MAX_EXPOSURE"
else fail "ebpf-exposure-at-most-$MAX_EXPOSURE" "exposure ${ebpf_exposure:-unknown}"; fi
check ebpf-stop systemctl stop cgtproxy.service
check ebpf-stop-clean-exit test "$(systemctl show -P Result cgtproxy.service)" = success
expect ebpf-stopped-direct "PEER $PEER4 $PEER_PORT" exec proxy tcp "$PEER4"
rm /etc/systemd/system/cgtproxy.service.d/ebpf.conf
install -m 0644 "$P/config.json" /etc/cgtproxy/config.json
systemctl daemon-reload
systemctl stop redirect-listener.service

# The journal is where a user reads the daemon: no terminal colour codes there.
if journalctl -b -u cgtproxy.service -o cat --no-pager | grep -q $'\x1b\['; then
  fail journal-no-ansi "log lines carry ANSI escape codes (stderr is the journal, not a terminal)"
  journalctl -b -u cgtproxy.service -o cat --no-pager | grep $'\x1b\[' | head -n 3 | cat -v | evidence
else pass journal-no-ansi; fi

# --- seccomp and exposure -------------------------------------------------------------------
# A canary proves the denial checks below can see a denial: uname under a filter
# that forbids uname(2) is killed by SIGSYS, which systemd reports as status=SYS
# (what the check of the cgtproxy unit's journal looks for). The kernel's audit
# record of it is printk-rate-limited without auditd and is not always there.
canary=$(systemd-run --wait -p SystemCallFilter=~uname uname 2>&1)
seccomp_log() {
  { journalctl -k -b -o cat --no-pager; journalctl -b _TRANSPORT=audit -o cat --no-pager; } 2>/dev/null |
    grep -E 'type=1326|SECCOMP' | sort -u
}
if echo "$canary" | grep -q 'status=SYS\|status=31'; then pass seccomp-canary-detected
else fail seccomp-canary-detected "a seccomp kill is not reported as SIGSYS here"; echo "$canary" | evidence; fi
if seccomp_log | grep -q 'comm="uname"'; then info "the kernel log shows the canary's seccomp record"
else info "the kernel log has no record of the canary (audit printk rate limit)"; fi
denials=$(seccomp_log | grep -E 'comm="cgtproxy"|exe="/usr/bin/cgtproxy"')
sigsys=$(journalctl -b -u cgtproxy.service -u cgtproxy-forward.service -o cat --no-pager | grep -E 'status=31/SYS|SIGSYS')
if [ -z "$denials$sigsys" ]; then pass no-seccomp-denial
else fail no-seccomp-denial "cgtproxy hit its syscall filter"; printf '%s\n%s\n' "$denials" "$sigsys" | evidence; fi

exposure_line=$(systemd-analyze security --no-pager cgtproxy.service 2>&1 | grep -i 'overall exposure')
exposure=$(echo "$exposure_line" | grep -oE '[0-9]+\.[0-9]+' | head -n1)
info "systemd-analyze security: ${exposure_line#*→ }"
if [ -n "$exposure" ] && awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }'; then
  pass "exposure-at-most-$MAX_EXPOSURE"
else fail "exposure-at-most-$MAX_EXPOSURE" "exposure ${exposure:-unknown}"
  systemd-analyze security --no-pager cgtproxy.service 2>&1 | grep -E '✗' | evidence 30
fi

fwd_exposure_line=$(systemd-analyze security --no-pager cgtproxy-forward.service 2>&1 | grep -i 'overall exposure')
fwd_exposure=$(echo "$fwd_exposure_line" | grep -oE '[0-9]+\.[0-9]+' | head -n1)
info "systemd-analyze security cgtproxy-forward: ${fwd_exposure_line#*→ }"
if [ -n "$fwd_exposure" ] && awk -v e="$fwd_exposure" -v m="$MAX_FORWARD_EXPOSURE" 'BEGIN { exit !(e <= m) }'; then
  pass "forward-exposure-at-most-$MAX_FORWARD_EXPOSURE"
else fail "forward-exposure-at-most-$MAX_FORWARD_EXPOSURE" "exposure ${fwd_exposure:-unknown}"
  systemd-analyze security --no-pager cgtproxy-forward.service 2>&1 | grep -E '✗' | evidence 30
fi

# --- evidence for the host (printed there when anything failed) -------------------------
echo "# journalctl -u cgtproxy-forward" | evidence
journalctl -b -u cgtproxy-forward.service -o short-monotonic --no-pager | evidence 80
echo "# journalctl -u socks-udp -u ss-server -u socks-auth (last 20)" | evidence
journalctl -b -u socks-udp.service -u ss-server.service -u socks-auth.service -o short-monotonic --no-pager | tail -n 20 | evidence
echo "# journalctl -u cgtproxy" | evidence
journalctl -b -u cgtproxy.service -o short-monotonic --no-pager | evidence 200
echo "# journalctl -u tproxy-listener (last 20)" | evidence
journalctl -b -u tproxy-listener.service -o short-monotonic --no-pager | tail -n 20 | evidence
deb_purge
info "guest test took $(elapsed "$t_test")s"
report DONE
