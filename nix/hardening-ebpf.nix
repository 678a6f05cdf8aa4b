# What the eBPF datapath (settings.datapath = "ebpf") adds to nix/hardening.nix,
# mirrored by the drop-in dist/systemd/cgtproxy-ebpf.conf (nix/tests/unit-drift.sh
# compares the two). Plain data, like hardening.nix.
#
# Loading the cgroup socket programs and their maps takes CAP_BPF; the program
# types are networking ones, so loading and attaching them also takes
# CAP_NET_ADMIN. The bpf() system call is in @privileged, which hardening.nix
# denies: it is allowed again by name, nothing else of that group.
{
  CapabilityBoundingSet = [
    "CAP_BPF"
    "CAP_NET_ADMIN"
  ];
  AmbientCapabilities = [
    "CAP_BPF"
    "CAP_NET_ADMIN"
  ];
  SystemCallFilter = [
    "@system-service"
    "~@resources @privileged"
    "bpf"
  ];
}
