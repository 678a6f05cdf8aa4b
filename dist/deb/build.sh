#!/usr/bin/env bash
# Builds the Debian package with dpkg-deb (no cargo-deb, no debian/ source
# tree): target/debian/cgtproxy_VERSION_ARCH.deb.
#
#   dist/deb/build.sh [--bin PATH] [--unit PATH] [--forward-unit PATH] [--out DIR]
#
# Without --bin it runs `cargo build --release --locked` and packages
# target/release/cgtproxy. The package holds the binary, both units from
# dist/systemd/ (ExecStart rewritten to /usr/bin/cgtproxy), the man pages,
# completions and example configuration the binary generates
# (`cgtproxy generate-assets`), the README, the licence and the maintainer
# scripts beside this file. Dependencies come from dpkg-shlibdeps.
#
# Environment: DEB_REVISION (default 1), DEB_MAINTAINER (default: the author of
# the HEAD commit), SOURCE_DATE_EPOCH (default: the HEAD commit's time; file
# times and the changelog date, so that one commit gives one package).
# Prints the path of the .deb on stdout.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
here=$repo/dist/deb

bin=''
unit=$repo/dist/systemd/cgtproxy.service
forward_unit=$repo/dist/systemd/cgtproxy-forward.service
out=$repo/target/debian
while [ $# -gt 0 ]; do
    case $1 in
        --bin) bin=$2; shift 2 ;;
        --unit) unit=$2; shift 2 ;;
        --forward-unit) forward_unit=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) echo "usage: $0 [--bin PATH] [--unit PATH] [--forward-unit PATH] [--out DIR]" >&2; exit 2 ;;
    esac
done

say() { printf 'deb: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

for tool in dpkg-deb dpkg-shlibdeps strip gzip; do
    command -v "$tool" >/dev/null || {
        # dpkg-shlibdeps is in dpkg-dev, which brings binutils (strip).
        "$repo/dist/ensure-deps.sh" dpkg-dev >&2
        break
    }
done

if [ -z "$bin" ]; then
    say "cargo build --release --locked"
    (cd "$repo" && cargo build --release --locked) >&2
    bin=$repo/target/release/cgtproxy
fi
[ -x "$bin" ] || die "no executable $bin"
[ -f "$unit" ] || die "no unit $unit"
[ -f "$forward_unit" ] || die "no unit $forward_unit"

# "cgtproxy 0.1.0 (git abcdef1)": the package's version is the binary's.
read -r _ upstream rest < <("$bin" --version) || die "$bin --version failed"
[ -n "$upstream" ] || die "$bin --version printed no version"
version=$upstream-${DEB_REVISION:-1}
arch=$(dpkg --print-architecture)
git_rev=$(sed -n 's/^(git \(.*\))$/\1/p' <<<"$rest")
git() { command git -C "$repo" "$@" 2>/dev/null; }
: "${SOURCE_DATE_EPOCH:=$(git log -1 --format=%ct || date +%s)}"
export SOURCE_DATE_EPOCH
maintainer=${DEB_MAINTAINER:-$(git log -1 --format='%an <%ae>' || true)}
[ -n "$maintainer" ] || die "set DEB_MAINTAINER (\"Name <address>\"): no git history to take it from"

work=$out/cgtproxy_${version}_$arch
root=$work/root
deb=$out/cgtproxy_${version}_$arch.deb
rm -rf "$work" "$deb"
mkdir -p "$root/DEBIAN"
umask 022

# --- files --------------------------------------------------------------------
install -Dm755 "$bin" "$root/usr/bin/cgtproxy"
# As dh_strip does: the symbols are a third of the file and no use at run time.
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/cgtproxy"

# The units are dist/systemd's, for manual installs to /usr/local/bin. The
# packaged copies differ in three things only (tests/deb/check.sh undoes them
# and compares): a note on top, so that `systemctl cat` explains itself;
# ExecStart; and a Documentation= line naming the man page the package ships.
package_unit() {
    local src=$1 name page
    name=$(basename "$src")
    local dst=$root/usr/lib/systemd/system/$name
    page=cgtproxy-run
    [ "$name" = cgtproxy-forward.service ] && page=cgtproxy-forward
    install -d "$(dirname "$dst")"
    {
        echo "# Installed by the cgtproxy Debian package from dist/systemd/$name,"
        echo "# with ExecStart=/usr/bin/cgtproxy; the install steps below are for manual"
        echo "# installs. Here: systemctl enable --now $name; change settings"
        echo "# with systemctl edit $name."
        echo "#"
        # The daemon without --config: /etc/cgtproxy/config.json when it exists,
        # else the built-in default, so that `apt install` then `systemctl
        # enable --now cgtproxy` works as it is.
        sed -e 's|^ExecStart=/usr/local/bin/cgtproxy run --config /etc/cgtproxy/config.json$|ExecStart=/usr/bin/cgtproxy run|' \
            -e 's|^ExecStart=/usr/local/bin/cgtproxy |ExecStart=/usr/bin/cgtproxy |' \
            -e "/^Description=/a Documentation=man:$page(1)" "$src"
    } >"$dst"
    chmod 644 "$dst"
    if [ "$(grep -c '^ExecStart=' "$dst")" != 1 ] || ! grep -q '^ExecStart=/usr/bin/cgtproxy \(run$\|forward \)' "$dst"; then
        die "$src: expected one ExecStart=/usr/local/bin/cgtproxy ... line to rewrite"
    fi
}
package_unit "$unit"
package_unit "$forward_unit"

assets=$work/assets
"$bin" generate-assets "$assets" || die "$bin generate-assets failed"
install -d "$root/usr/share/man/man1"
for page in "$assets"/man/*.1; do
    name=$(basename "$page")
    gzip -9n <"$page" >"$root/usr/share/man/man1/$name.gz"
done
install -Dm644 "$assets/completions/cgtproxy.bash" "$root/usr/share/bash-completion/completions/cgtproxy"
install -Dm644 "$assets/completions/_cgtproxy" "$root/usr/share/zsh/vendor-completions/_cgtproxy"
install -Dm644 "$assets/completions/cgtproxy.fish" "$root/usr/share/fish/vendor_completions.d/cgtproxy.fish"

doc=$root/usr/share/doc/cgtproxy
install -Dm644 "$assets/examples/config.json" "$doc/examples/config.json"
# The eBPF datapath's drop-in, for admins to copy into
# /etc/systemd/system/cgtproxy.service.d/ (not applied by default).
install -Dm644 "$repo/dist/systemd/cgtproxy-ebpf.conf" "$root/usr/share/cgtproxy/cgtproxy-ebpf.conf"
gzip -9n <"$repo/README.md" >"$doc/README.md.gz"
{
    echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
    echo "Upstream-Name: cgtproxy"
    echo
    echo "Files: *"
    echo "Copyright: $(sed -n 's/^Copyright (c) //p' "$repo/LICENSE")"
    echo "License: MIT"
    echo
    echo "License: MIT"
    # The licence text after its title and copyright line, in control-file
    # continuation form (blank lines as " .").
    sed -n '/^Permission/,$p' "$repo/LICENSE" | sed 's/^$/./; s/^/ /'
} >"$doc/copyright"
{
    echo "cgtproxy ($version) unstable; urgency=medium"
    echo
    echo "  * Built by dist/deb/build.sh${git_rev:+ from git $git_rev}."
    echo
    echo " -- $maintainer  $(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$doc/changelog.Debian.gz"
chmod 644 "$doc/copyright" "$doc/README.md.gz" "$doc/changelog.Debian.gz"

# --- control ------------------------------------------------------------------
for script in postinst prerm postrm; do
    install -m755 "$here/$script" "$root/DEBIAN/$script"
done

# dpkg-shlibdeps wants a source tree's debian/control; a minimal one will do.
shlibs=$work/shlibs
mkdir -p "$shlibs/debian"
printf 'Source: cgtproxy\n\nPackage: cgtproxy\nArchitecture: any\n' >"$shlibs/debian/control"
depends=$(cd "$shlibs" && dpkg-shlibdeps -O -e"$root/usr/bin/cgtproxy" 2>"$work/shlibdeps.log") \
    || { cat "$work/shlibdeps.log" >&2; die "dpkg-shlibdeps failed"; }
depends=${depends#shlibs:Depends=}
# libmnl0 comes with libnftnl11: the binary itself needs no libmnl symbol, so
# the linker (--as-needed) records none and neither does this list.
for lib in libnftnl11 libc6; do
    [[ $depends == *"$lib"* ]] || die "dpkg-shlibdeps found no $lib in: $depends"
done

cat >"$root/DEBIAN/control" <<EOF
Package: cgtproxy
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $(du -sk --apparent-size "$root/usr" | cut -f1)
Depends: $depends
Recommends: nftables
Section: net
Priority: optional
Description: per-application transparent proxying by cgroup v2 path
 A small daemon watches the cgroup v2 tree and keeps one nftables table and
 a few policy-routing entries in step with it, so that the traffic of each
 systemd unit, app scope or slice, matched by a regex on its cgroup path,
 goes direct, is dropped, or is handed to a local TPROXY listener (mihomo,
 sing-box, xray, v2ray). It never moves processes and needs only
 CAP_NET_ADMIN. A built-in forwarder relays to SOCKS5 and HTTP upstreams.
 .
 Installing starts nothing. systemctl enable --now cgtproxy runs the
 built-in default configuration; for your own, copy the example from
 /usr/share/doc/cgtproxy/examples/ to /etc/cgtproxy/config.json, adapt it,
 and run systemctl reload cgtproxy.
EOF

(cd "$root" && find usr -type f -print0 | LC_ALL=C sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
chmod 644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums"
find "$root" -newermt "@$SOURCE_DATE_EPOCH" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >&2
rm -rf "$work"
say "$(du -h "$deb" | cut -f1) $deb"
echo "$deb"
