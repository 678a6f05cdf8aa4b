#!/bin/bash
# Builds the Debian trixie guest image for the cgtproxy VM test.
#
#   image.sh OUTDIR   ->  OUTDIR/rootfs.img (ext4, raw) and OUTDIR/vmlinuz
#
# run.sh caches OUTDIR keyed by the sha256 of this file, so any change here
# rebuilds the image and nothing else does.  Keep everything test-specific
# (configs, the test itself) out of the image: it travels on the payload disk.
set -euo pipefail

out=${1:?usage: image.sh OUTDIR}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=trixie
tree=$out/tree

# What a minimal systemd host with nftables and a lingering user needs.
# dbus-user-session + libpam-systemd: `systemd-run --user` for a lingering user.
# linux-image-cloud-amd64: virtio/NVMe/ext4 built in, so it boots without initrd.
# Upstreams of `cgtproxy forward`: shadowsocks-libev (its ss-local is a SOCKS5
# server with UDP ASSOCIATE; trixie has no dante) and microsocks (TCP only,
# with a password). wireguard-tools: a real wg-quick tunnel brought up after
# cgtproxy (the cloud kernel has the wireguard module; wg-quick runs sysctl,
# from procps). systemd-container: systemd-nspawn and machined, a real
# container manager whose machine-NAME.scope the configuration routes.
packages=(
  systemd systemd-sysv dbus dbus-user-session libpam-systemd
  nftables iproute2 python3 kmod libnss-systemd
  linux-image-cloud-amd64 libnftnl11 libmnl0
  shadowsocks-libev microsocks wireguard-tools procps systemd-container
)

rm -rf "$tree"
mkdir -p "$tree"
debootstrap --variant=minbase --include="$(IFS=,; echo "${packages[*]}")" \
  "$suite" "$tree" "$mirror"

# --- configuration -----------------------------------------------------------
echo cgtproxy-vm >"$tree/etc/hostname"
# A fixed machine-id: the image is booted fresh every time (qemu snapshot=on),
# and a missing id would make every boot a "first boot".
echo 5e3c0b7a1d9f4e2b8c6a0f1e2d3c4b5a >"$tree/etc/machine-id"
# Root is mounted rw by the kernel command line; nothing else to mount.
: >"$tree/etc/fstab"

# The test user whose apps are routed; lingering, so its user manager
# (user@1000.service) runs without a login, as for a desktop autostart.
chroot "$tree" useradd --uid 1000 --create-home --shell /bin/bash alice
mkdir -p "$tree/var/lib/systemd/linger"
: >"$tree/var/lib/systemd/linger/alice"

# Units that only cost boot time in a throw-away VM (timers, pseudo file
# systems nobody here uses, gettys, first-boot machinery), and the
# shadowsocks server's own unit: the test runs its upstreams itself.
for u in \
  apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
  fstrim.timer man-db.timer logrotate.timer systemd-tmpfiles-clean.timer \
  dev-hugepages.mount dev-mqueue.mount sys-kernel-debug.mount \
  sys-kernel-tracing.mount sys-kernel-config.mount sys-fs-fuse-connections.mount \
  systemd-firstboot.service systemd-journal-catalog-update.service \
  systemd-hwdb-update.service ldconfig.service systemd-update-done.service \
  e2scrub_reap.service getty@tty1.service serial-getty@ttyS0.service \
  console-getty.service systemd-binfmt.service nftables.service shadowsocks-libev.service; do
  ln -sf /dev/null "$tree/etc/systemd/system/$u"
done

# The generic test entry point: unpack the payload disk and run its
# guest-test.sh; results go to the second serial port (ttyS1), which the host
# reads.  The root disk is the only NVMe disk (nvme0n1: NVMe is built into the
# cloud kernel, so no initrd); the payload is a plain tar on a read-only
# virtio disk.  virtio_blk is a module and the image has no udev, so load it
# here; then it is /dev/vda, unambiguously.
cat >"$tree/usr/local/sbin/vmtest-entry" <<'ENTRY'
#!/bin/sh
set -eu
modprobe virtio_blk
i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1)); [ "$i" -lt 100 ] || { echo "no payload disk" >/dev/ttyS1; exit 1; }
  sleep 0.1
done
mkdir -p /run/payload
tar -C /run/payload -xf /dev/vda
stty -F /dev/ttyS1 raw -echo 2>/dev/null || true
exec /run/payload/guest-test.sh 3>/dev/ttyS1
ENTRY
chmod 755 "$tree/usr/local/sbin/vmtest-entry"

cat >"$tree/etc/systemd/system/vmtest.service" <<'UNIT'
[Unit]
Description=cgtproxy VM test (payload from /dev/vda)
After=multi-user.target
# Power off whatever happens, so the host sees qemu exit at once.
SuccessAction=poweroff-force
FailureAction=poweroff-force
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/vmtest-entry
StandardOutput=journal+console
StandardError=journal+console
# The host guards the whole run with a timeout; here: never stop half-way.
TimeoutStartSec=infinity
[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/vmtest.service \
  "$tree/etc/systemd/system/multi-user.target.wants/vmtest.service"

# Keep the journal in memory only: faster, and the disk is thrown away anyway.
mkdir -p "$tree/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' >"$tree/etc/systemd/journald.conf.d/vm.conf"

# --- kernel and disk ----------------------------------------------------------
cp -L "$tree"/boot/vmlinuz-* "$out/vmlinuz.tmp"
# The kernel is booted directly; the initrd that initramfs-tools made is unused.
rm -f "$tree"/boot/initrd.img* "$tree"/boot/vmlinuz-*
rm -rf "$tree"/var/cache/apt/archives/*.deb "$tree"/var/lib/apt/lists/*
size_mb=$(( $(du -sm "$tree" | cut -f1) + 512 ))
rm -f "$out/rootfs.img.tmp"
mkfs.ext4 -q -F -L root -d "$tree" "$out/rootfs.img.tmp" "${size_mb}M"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/rootfs.img.tmp" "$out/rootfs.img"
rm -rf "$tree"
