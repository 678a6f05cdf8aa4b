# Sandboxing of `cgtproxy forward`'s [Service] section: the daemon's
# (nix/hardening.nix) with IP sockets instead of netlink.
#
# Used as `serviceConfig` by nix/nixos-module.nix and mirrored line by line in
# dist/systemd/cgtproxy-forward.service; nix/tests/unit-drift.sh fails when the
# two differ. Plain data (no nixpkgs), like hardening.nix.
#
# What the forwarder does: accepts the apps' flows on transparent TCP/UDP
# sockets (IP_TRANSPARENT, so CAP_NET_ADMIN), opens marked (SO_MARK, again
# CAP_NET_ADMIN) connections to the upstreams, and talks to systemd over
# AF_UNIX. It never touches nftables or routes.
builtins.removeAttrs (import ./hardening.nix) [
  # It serves IP traffic of the host: any address, its own cgroup included.
  "IPAddressDeny"
  # It keeps no runtime state.
  "RuntimeDirectory"
]
// {
  # IP for the apps' flows and the upstreams, AF_UNIX for sd_notify; no netlink.
  RestrictAddressFamilies = [
    "AF_INET"
    "AF_INET6"
    "AF_UNIX"
  ];
}
