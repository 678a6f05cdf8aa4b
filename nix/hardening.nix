# Sandboxing of the cgtproxy daemon's [Service] section: the one source of truth.
#
# Used as `serviceConfig` by nix/nixos-module.nix and mirrored line by line in
# dist/systemd/cgtproxy.service; nix/tests/unit-drift.sh fails when the two differ.
# Plain data (no nixpkgs), so `nix-instantiate --eval --strict --json` reads it.
#
# What the daemon does, and so what it keeps: it talks netlink (nftables, ip rule,
# ip route) with CAP_NET_ADMIN, reads /proc/self/mountinfo, watches the host's
# cgroup2 tree with inotify, and talks to systemd over AF_UNIX (sd_notify).
{
  # No static account; the daemon owns no files. Implies RemoveIPC=, PrivateTmp=.
  DynamicUser = true;

  # The one privilege it needs: nftables and policy routing over netlink.
  CapabilityBoundingSet = [ "CAP_NET_ADMIN" ];
  AmbientCapabilities = [ "CAP_NET_ADMIN" ];
  NoNewPrivileges = true;

  # The whole file system read-only; /home, /root, /run/user hidden; own /tmp.
  ProtectSystem = "strict";
  ProtectHome = true;
  PrivateTmp = true;
  # Read-only /sys/fs/cgroup. Not `private`: a cgroup namespace would change the
  # paths and levels the daemon must see (the host's).
  ProtectControlGroups = true;
  # /proc/sys, /sys read-only; no module loading (nft expressions are autoloaded
  # by the kernel itself), no kernel log, clock or hostname changes.
  ProtectKernelTunables = true;
  ProtectKernelModules = true;
  ProtectKernelLogs = true;
  ProtectClock = true;
  ProtectHostname = true;
  # Only its own processes in /proc, and no /proc/sys etc.; /proc/self/mountinfo stays.
  ProtectProc = "invisible";
  ProcSubset = "pid";
  # No device nodes needed.
  PrivateDevices = true;
  DevicePolicy = "closed";
  PrivateMounts = true;

  # Netlink for the kernel, AF_UNIX for sd_notify and logging; no IP socket at all.
  RestrictAddressFamilies = [ "AF_NETLINK" "AF_UNIX" ];
  # Belt and braces for the above: no IP traffic from the daemon's own cgroup.
  # Not PrivateNetwork=: the daemon must edit the host's network namespace.
  IPAddressDeny = "any";

  # Namespaces, realtime, SUID/SGID files, personality, W+X memory: none needed.
  RestrictNamespaces = true;
  RestrictRealtime = true;
  RestrictSUIDSGID = true;
  LockPersonality = true;
  MemoryDenyWriteExecute = true;

  # Ordinary service syscalls only, minus resource and privileged ones; the default
  # action (kill) makes any denial visible in the kernel log instead of hiding it.
  SystemCallArchitectures = "native";
  SystemCallFilter = [ "@system-service" "~@resources @privileged" ];

  # Nothing it creates should be readable by others.
  # /run/cgtproxy: where the daemon says why it is degraded, for `cgtproxy
  # status` (the only thing it writes; removed when it stops).
  RuntimeDirectory = "cgtproxy";
  UMask = "0077";
}
