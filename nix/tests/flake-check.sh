#!/usr/bin/env bash
# `nix flake show` and `nix flake check --no-build` without network: the flake's
# inputs are replaced by stand-ins, nixpkgs by nix/tests/stand-in-nixpkgs with
# the real lib of NIXPKGS_LIB, home-manager by HOME_MANAGER (run-eval.sh says
# what they are). Evaluating the checks also runs the evaluation tests under
# that Nix.
#
# Debian 12's Nix (2.8) is too old for today's flakes and lock files, so with
# an older `nix` this runs Debian 13's (2.26) in a chroot that debootstrap
# makes once (as root, about 40 s) and keeps in CGTPROXY_NIX_CHROOT.
# Any warning fails the check, but two: the inputs' overrides leave the lock
# file unwritten, and homeManagerModules (an output of the design contract)
# is unknown to Nix, unlike homeModules.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
chroot_dir=${CGTPROXY_NIX_CHROOT:-/var/cache/cgtproxy/nix-trixie}

left_out() {
  if [ "${CI:-}" = true ]; then
    echo "flake check: $1; CI must run it" >&2
    exit 1
  fi
  echo "left out: nix flake show/check with stand-in inputs ($1)"
  exit 0
}

[ -n "${NIXPKGS_LIB:-}" ] || left_out "NIXPKGS_LIB is not set"
[ -n "${HOME_MANAGER:-}" ] || left_out "HOME_MANAGER is not set"
lib=$(cd "$NIXPKGS_LIB" && pwd)
[ -f "$lib/lib/default.nix" ] && lib=$lib/lib

# new_enough NIX: whether that nix is 2.26 or later.
new_enough() {
  local v
  v=$("$@" --version 2>/dev/null | sed -n 's/.* \([0-9]*\.[0-9]*\).*/\1/p') || return 1
  [ -n "$v" ] && printf '%s\n2.26\n' "$v" | sort -V -C -r
}

# The host's own Debian mirror (apt's sources), for debootstrap.
debian_mirror() {
  { cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true; } |
    sed -n -e 's|^URIs: *\([^ ]*/debian\)/*$|\1|p' -e 's|^deb \([^ ]*/debian\)/* .*|\1|p' |
    awk 'NR == 1'
}

# in_chroot CMD...: CMD in the chroot, with a /proc of a private mount
# namespace that goes away with it.
in_chroot() {
  unshare -m --propagation private sh -c 'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"' \
    "$chroot_dir" "$@"
}

if new_enough nix; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  run() { "$@"; }
  inner=$work
else
  [ "$(id -u)" -eq 0 ] || left_out "needs Nix 2.26 or later, or root for a Debian 13 chroot with it"
  if ! { [ -d "$chroot_dir" ] && new_enough in_chroot nix; }; then
    mirror=$(debian_mirror)
    [ -n "$mirror" ] || left_out "no Debian mirror in apt's sources for debootstrap"
    command -v debootstrap >/dev/null || left_out "debootstrap is not installed"
    echo "flake check: making a Debian 13 chroot with Nix in $chroot_dir" >&2
    rm -rf "$chroot_dir.new"
    mkdir -p "$(dirname "$chroot_dir")"
    # Into .new, then renamed: an interrupted run leaves no half-made chroot.
    # libdbi-perl: nix-bin needs it (perl-dbdabi-94), which debootstrap does not resolve.
    debootstrap --variant=minbase --include=nix-bin,libdbi-perl trixie "$chroot_dir.new" "$mirror" \
      >/dev/null || left_out "debootstrap failed: $chroot_dir.new/debootstrap/debootstrap.log"
    rm -rf "$chroot_dir"
    mv "$chroot_dir.new" "$chroot_dir"
  fi
  work=$(mktemp -d "$chroot_dir/tmp/cgtproxy-flake.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  inner=${work#"$chroot_dir"}
  run() { in_chroot "$@"; }
fi

# The flake as committed (and as being changed), and its stand-in inputs.
mkdir "$work/repo"
git -C "$root" ls-files -z -c -o --exclude-standard | (cd "$root" && tar -c --null -T -) |
  tar -x -C "$work/repo"
cp -r "$root/nix/tests/stand-in-nixpkgs" "$work/nixpkgs"
cp -r "$lib" "$work/nixpkgs/lib"
cp -r "$(cd "$HOME_MANAGER" && pwd)" "$work/home-manager"
chmod -R u+w "$work"

# A store of its own, gone with $work; no registry, substituter or build users.
flake() {
  run env HOME="$inner" nix --extra-experimental-features 'nix-command flakes' \
    --store "$inner/store" --option flake-registry '' --option substituters '' \
    --option build-users-group '' \
    flake "$@" --no-write-lock-file "path:$inner/repo" \
    --override-input nixpkgs "path:$inner/nixpkgs" \
    --override-input home-manager "path:$inner/home-manager"
}

rc=0
# --all-systems: aarch64-linux too (otherwise also a warning that it was left out).
for cmd in "show --all-systems" "check --no-build --all-systems"; do
  # shellcheck disable=SC2086 # $cmd is several words
  if ! flake $cmd >"$work/out" 2>&1; then
    cat "$work/out" >&2
    echo "FAIL nix flake $cmd" >&2
    rc=1
  elif grep '^warning:' "$work/out" | grep -v -e "unknown flake output 'homeManagerModules'" \
    -e "not writing modified lock file" | grep -q .; then
    cat "$work/out" >&2
    echo "FAIL nix flake $cmd: warnings" >&2
    rc=1
  else
    echo "ok nix flake $cmd"
  fi
done
exit "$rc"
