#!/usr/bin/env bash
# Checks a .deb built by dist/deb/build.sh without installing it:
#
#   tests/deb/check.sh target/debian/cgtproxy_VERSION_ARCH.deb
#
# - the files are exactly the binary, the two units, a man page per page the
#   packaged binary generates, three completions and the documentation; no
#   conffile, nothing in /etc;
# - the packaged units are dist/systemd's with ExecStart=/usr/bin/cgtproxy
#   (and the note and Documentation= line build.sh adds), nothing else changed;
# - control: the version is the binary's, Depends names libnftnl11 and libc6;
# - the binary is stripped and runs; man pages and completions are non-empty;
# - the maintainer scripts parse and neither enable nor start a unit.
# Prints one line per check; exit status 1 if any failed.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
deb=${1:?usage: check.sh DEB}
[ -f "$deb" ] || { echo "no file $deb" >&2; exit 1; }

failed=0
pass() { echo "PASS deb-$1"; }
fail() { echo "FAIL deb-$1 :: $2"; failed=1; }
check() { local n=$1 why=$2; shift 2; if "$@"; then pass "$n"; else fail "$n" "$why"; fi; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$deb" "$tmp/root" || { echo "dpkg-deb -x $deb failed" >&2; exit 1; }
dpkg-deb -e "$deb" "$tmp/control" || { echo "dpkg-deb -e $deb failed" >&2; exit 1; }
bin=$tmp/root/usr/bin/cgtproxy

# --- the file list -----------------------------------------------------------------
dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { print $6 }' | sed 's|^\./||' | sort >"$tmp/have"
"$bin" generate-assets "$tmp/assets" || fail generate-assets "the packaged binary cannot generate-assets"
{
    echo usr/bin/cgtproxy
    echo usr/lib/systemd/system/cgtproxy.service
    echo usr/lib/systemd/system/cgtproxy-forward.service
    echo usr/share/cgtproxy/cgtproxy-ebpf.conf
    for page in "$tmp"/assets/man/*.1; do echo "usr/share/man/man1/$(basename "$page").gz"; done
    echo usr/share/bash-completion/completions/cgtproxy
    echo usr/share/zsh/vendor-completions/_cgtproxy
    echo usr/share/fish/vendor_completions.d/cgtproxy.fish
    for f in README.md.gz copyright changelog.Debian.gz examples/config.json; do
        echo "usr/share/doc/cgtproxy/$f"
    done
} | sort >"$tmp/want"
if diff -u "$tmp/want" "$tmp/have" >"$tmp/diff"; then pass files-exact
else fail files-exact "$(grep -E '^[-+][^-+]' "$tmp/diff" | tr '\n' ' ')"; fi
# The generated list itself must hold a page per subcommand (the unit tests
# check the generator; this checks the packaged binary's).
for sub in run check render forward status explain doctor exec; do
    grep -qx "usr/share/man/man1/cgtproxy-$sub.1.gz" "$tmp/have" || fail "man-$sub" "no man page for $sub"
done
check no-conffiles "the package declares conffiles" test ! -e "$tmp/control/conffiles"
check nothing-in-etc "the package ships files under /etc" test ! -e "$tmp/root/etc"

# --- units ---------------------------------------------------------------------------
for unit in cgtproxy.service cgtproxy-forward.service; do
    packaged=$tmp/root/usr/lib/systemd/system/$unit
    exec_lines=$(grep '^ExecStart=' "$packaged")
    # The daemon runs without --config (the file, else the built-in default);
    # the forwarder keeps its explicit one (it has nothing to do without it).
    want="ExecStart=/usr/bin/cgtproxy run"
    [ "$unit" = cgtproxy-forward.service ] && want="ExecStart=/usr/bin/cgtproxy forward --config /etc/cgtproxy/config.json"
    if [ "$exec_lines" = "$want" ]; then
        pass "$unit-execstart"
    else fail "$unit-execstart" "ExecStart lines: $(tr '\n' ' ' <<<"$exec_lines"), want $want"; fi
    # Undo build.sh's changes; what is left must be the source unit.
    sed '1,5d' "$packaged" | grep -v '^Documentation=man:cgtproxy' |
        sed -e 's|^ExecStart=/usr/bin/cgtproxy run$|ExecStart=/usr/local/bin/cgtproxy run --config /etc/cgtproxy/config.json|' \
            -e 's|^ExecStart=/usr/bin/cgtproxy |ExecStart=/usr/local/bin/cgtproxy |' >"$tmp/undone"
    if diff -u "$repo/dist/systemd/$unit" "$tmp/undone" >"$tmp/diff"; then pass "$unit-as-dist"
    else fail "$unit-as-dist" "differs from dist/systemd/$unit: $(head -c 300 "$tmp/diff" | tr '\n' ' ')"; fi
    page=$(sed -n 's/^Documentation=man:\(cgtproxy[a-z-]*\)(1)$/\1/p' "$packaged")
    check "$unit-documentation" "Documentation= names no shipped page" \
        test -n "$page" -a -e "$tmp/root/usr/share/man/man1/$page.1.gz"
done

# --- control ---------------------------------------------------------------------------
field() { sed -n "s/^$1: //p" "$tmp/control/control"; }
binary_version=$("$bin" --version | awk '{ print $2 }')
check version "Version $(field Version) is not the binary's $binary_version-N" \
    test "${binary_version:-x}" = "$(field Version | sed 's/-[^-]*$//')"
check arch "Architecture $(field Architecture)" test "$(field Architecture)" = "$(dpkg --print-architecture)"
depends=$(field Depends)
check depends "Depends: $depends" grep -q 'libnftnl11 (>=.*libc6\|libc6 (>=.*libnftnl11' <<<"$depends"
check md5sums "md5sums do not match the files" sh -c "cd '$tmp/root' && md5sum --quiet -c '$tmp/control/md5sums'"

# --- contents ------------------------------------------------------------------------------
check binary-runs "the packaged binary does not say its version" \
    grep -q '^cgtproxy [0-9]' <<<"$("$bin" --version)"
check binary-stripped "the packaged binary has a symbol table" \
    sh -c "! readelf -S '$bin' | grep -q '\.symtab'"
for page in "$tmp"/root/usr/share/man/man1/*.gz; do
    zcat "$page" | grep -q '^\.TH ' || fail "man-$(basename "$page")" "not a man page"
done
check readme "README.md.gz is not the README" \
    cmp -s "$repo/README.md" <(zcat "$tmp/root/usr/share/doc/cgtproxy/README.md.gz")
check copyright "copyright lacks the MIT licence" \
    grep -q '^License: MIT' "$tmp/root/usr/share/doc/cgtproxy/copyright"
check example-valid "the example configuration does not pass cgtproxy check" \
    "$bin" check --config "$tmp/root/usr/share/doc/cgtproxy/examples/config.json"

# --- maintainer scripts ------------------------------------------------------------------
for script in postinst prerm postrm; do
    check "$script-parses" "sh -n fails" sh -n "$tmp/control/$script"
done
check installing-starts-nothing "postinst enables or starts a unit" \
    sh -c "! grep -Eq '^[[:space:]]*(systemctl|deb-systemd-invoke|deb-systemd-helper)( [^ ]+)* (enable|start|restart|try-restart|reload-or-restart)( |\$)' '$tmp/control/postinst'"

[ "$failed" = 0 ] && echo "deb check: all passed ($(du -h "$deb" | cut -f1) $(basename "$deb"))"
exit "$failed"
