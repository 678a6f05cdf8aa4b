#!/bin/bash
# cgtproxy VM test: boots a Debian trixie guest under qemu (TCG), where
# tests/vm/guest-test.sh installs the Debian package with apt (the release
# binary and the shipped units, dist/systemd/cgtproxy.service and
# dist/systemd/cgtproxy-forward.service, packaged by dist/deb/build.sh), drives
# it through its units and purges it.
# Run as root from anywhere:
#
#   tests/vm/run.sh
#
# Environment (all optional):
#   CGTPROXY_DEB        the .deb to test (default: one dist/deb/build.sh makes
#                       from the three below)
#   CGTPROXY_BIN        binary to package (default: target/release/cgtproxy; built
#                       with `cargo build --release` only when absent)
#   CGTPROXY_UNIT       unit file to package (default: dist/systemd/cgtproxy.service)
#   CGTPROXY_FORWARD_UNIT  the forwarder's (default: dist/systemd/cgtproxy-forward.service)
#   CGTPROXY_VM_CACHE   image cache (default: /var/cache/cgtproxy-vm)
#   CGTPROXY_VM_OUT     where logs go (default: a new temporary directory)
#   CGTPROXY_VM_TIMEOUT seconds the guest may run before it is killed (default 900)
#   CGTPROXY_VM_SMP     guest CPUs (default 1: with 2, qemu 7.2's multi-threaded
#                       TCG has crashed this kernel during boot-time code patching)
#
# Exit status: 0 only if every check passed.  The last line is
# "N passed, M failed".
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
deb=${CGTPROXY_DEB:-}
bin=${CGTPROXY_BIN:-$repo/target/release/cgtproxy}
unit=${CGTPROXY_UNIT:-$repo/dist/systemd/cgtproxy.service}
forward_unit=${CGTPROXY_FORWARD_UNIT:-$repo/dist/systemd/cgtproxy-forward.service}
cache=${CGTPROXY_VM_CACHE:-/var/cache/cgtproxy-vm}
guest_timeout=${CGTPROXY_VM_TIMEOUT:-900}
smp=${CGTPROXY_VM_SMP:-1}
# extra qemu arguments, for debugging (e.g. "-monitor unix:/tmp/mon,server,nowait")
: "${CGTPROXY_VM_QEMU_EXTRA:=}"

t_start=$SECONDS
say() { printf 'vm-test: %s\n' "$*" >&2; }
die() { say "error: $*"; echo "0 passed, 1 failed"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, mkfs of a root tree)"

# --- host tools ----------------------------------------------------------------
# Install only what is missing, without recommends (qemu's would pull a GUI).
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v timeout >/dev/null || need+=(coreutils)
command -v flock >/dev/null || need+=(util-linux)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -qq || die "apt-get update failed"
  timeout 900 apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || die "apt-get install ${need[*]} failed"
fi

# --- the binary and the units, packaged below -------------------------------------
if [ -n "$deb" ]; then
  [ -f "$deb" ] || die "package $deb not found"
else
  if [ ! -x "$bin" ]; then
    say "$bin absent: cargo build --release"
    (cd "$repo" && cargo build --release) || die "cargo build --release failed"
    bin=$repo/target/release/cgtproxy
  fi
  [ -f "$unit" ] || die "unit file $unit not found"
  [ -f "$forward_unit" ] || die "unit file $forward_unit not found"
fi

# --- the image (cached, keyed by the recipe) --------------------------------------
key=$(sha256sum "$here/image.sh" | cut -c1-16)
img=$cache/$key
mkdir -p "$cache"
exec 9>"$cache/lock"
# One builder at a time; a second run on the same machine waits and reuses.
timeout 1200 flock 9 || die "could not lock $cache/lock"
t_img=$SECONDS
if [ ! -f "$img/rootfs.img" ] || [ ! -f "$img/vmlinuz" ]; then
  say "building image $key (debootstrap trixie; about a minute or two)"
  # Drop images of older recipes: each is ~800 MB.
  find "$cache" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
  mkdir -p "$img.tmp"
  if ! timeout 1200 "$here/image.sh" "$img.tmp" >"$cache/build-$key.log" 2>&1; then
    tail -n 30 "$cache/build-$key.log" >&2
    rm -rf "$img.tmp"
    die "image build failed (log: $cache/build-$key.log)"
  fi
  mv "$img.tmp" "$img"
  say "image built in $((SECONDS - t_img)) s"
else
  say "image $key cached"
fi
image_s=$((SECONDS - t_img))
# The lock stays held until exit: a concurrent run with another recipe would
# otherwise delete this image under the running guest (and two TCG guests on
# a 2-core machine would only slow each other down).

# --- the payload disk ------------------------------------------------------------
out=${CGTPROXY_VM_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/cgtproxy-vm.XXXXXX")}
mkdir -p "$out"
payload=$out/payload
rm -rf "$payload"; mkdir -p "$payload"
if [ -z "$deb" ]; then
  deb=$("$repo/dist/deb/build.sh" --bin "$bin" --unit "$unit" --forward-unit "$forward_unit" \
    --out "$out/deb") || die "dist/deb/build.sh failed"
fi
install -m 0644 "$deb" "$payload/"
install -m 0755 "$here/guest-test.sh" "$payload/guest-test.sh"
install -m 0644 "$here/guest-deb.sh" "$payload/guest-deb.sh"
install -m 0644 "$here/vmnet.py" "$payload/vmnet.py"
install -m 0644 "$here/../helpers/stream.py" "$payload/stream.py"
install -m 0644 "$here/../helpers/listener.py" "$payload/listener.py"
install -m 0644 "$here"/config*.json "$payload/"
# A plain tar as the disk: the guest reads it straight from the block device.
tar -C "$payload" --owner=0 --group=0 -cf "$out/payload.tar" .

# --- boot ------------------------------------------------------------------------
: >"$out/results.log"
: >"$out/console.log"
say "booting guest (logs in $out)"
t_boot=$SECONDS
# TCG: this machine's /dev/kvm cannot run ordinary guests.  cx16=off: qemu 7.2
# multi-threaded TCG crashes this kernel in cmpxchg16b paths.  The root disk is
# opened with snapshot=on, so the cached image is never written.  No NIC: the
# guest needs no network; its test peers live in a netns inside it.
# qemu runs in the background so that a trap can end it if this script is
# interrupted (CI time-out, ^C): it must never outlive the run.
qemu_pid=
trap '[ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null' EXIT
trap 'exit 130' INT TERM
qemu_rc=0
timeout -k 10 "$guest_timeout" qemu-system-x86_64 \
  -accel tcg -cpu max,cx16=off -machine q35 -smp "$smp" -m 1024 \
  -nodefaults -no-reboot -display none -nic none \
  -kernel "$img/vmlinuz" \
  -append "root=/dev/nvme0n1 rw console=ttyS0 panic=-1 audit=1 audit_backlog_limit=8192 loglevel=4 ${CGTPROXY_VM_APPEND:-}" \
  -drive if=none,id=root,file="$img/rootfs.img",format=raw,snapshot=on \
  -device nvme,drive=root,serial=root \
  -drive if=none,id=payload,file="$out/payload.tar",format=raw,readonly=on \
  -device virtio-blk-pci,drive=payload \
  -chardev file,id=con,path="$out/console.log" -serial chardev:con \
  -chardev file,id=res,path="$out/results.log" -serial chardev:res \
  $CGTPROXY_VM_QEMU_EXTRA &
qemu_pid=$!
wait "$qemu_pid" || qemu_rc=$?
qemu_pid=
boot_s=$((SECONDS - t_boot))

# --- results ---------------------------------------------------------------------
tr -d '\r' <"$out/results.log" >"$out/results.txt"
passed=$(grep -c '^PASS ' "$out/results.txt" || true)
failed=$(grep -c '^FAIL ' "$out/results.txt" || true)
grep -E '^(PASS|FAIL|INFO) ' "$out/results.txt" || true
if ! grep -qx 'DONE' "$out/results.txt"; then
  failed=$((failed + 1))
  echo "FAIL guest-finished :: guest did not finish (qemu exit $qemu_rc; 124 = timeout)"
  say "last console lines:"
  tr -d '\r' <"$out/console.log" | tail -n 40 >&2
fi
if [ "$failed" -gt 0 ]; then
  # Guest-side evidence (journal, ruleset) collected by guest-test.sh.
  say "guest evidence:"
  sed -n 's/^LOG //p' "$out/results.txt" >&2
fi
say "timings: image ${image_s}s, qemu (boot + test + poweroff) ${boot_s}s, whole run $((SECONDS - t_start))s"
# The payload is only a copy of repo files and the package: keep the logs only.
rm -rf "$payload" "$out/payload.tar" "$out/deb"
say "logs: $out"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
