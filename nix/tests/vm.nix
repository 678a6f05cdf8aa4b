# NixOS VM test: the module's unit routes real packets by cgroup.
#   client: cgtproxy + a transparent listener (port 7893) + the built-in
#           forwarder (target "fwd", port 7894);
#   target: an HTTP server, a whoami server and microsocks (the forwarder's upstream).
# Run: nix build .#checks.x86_64-linux.vm -L
{ package, nixosModule }:

{ lib, ... }:

let
  listenerPort = 7893;
  mark = 3000;
  routeTable = 300;
  forwardPort = 7894;
  whoamiPort = 8081;
  # The Debian VM test's network actors; `whoami` answers "FROM <client ip>".
  vmnet = ../../tests/vm/vmnet.py;
  common = import ./common.nix;
in
{
  name = "cgtproxy";

  nodes = {
    target =
      { pkgs, ... }:
      {
        imports = [ common.targetHttp ];
        networking.firewall.allowedTCPPorts = [
          1080
          whoamiPort
        ];
        networking.firewall.allowedUDPPorts = [ whoamiPort ];
        # Tells who reached it: the client itself, or the upstream (this node).
        systemd.services.whoami = {
          wantedBy = [ "multi-user.target" ];
          serviceConfig = {
            Type = "notify";
            ExecStart = "${pkgs.python3}/bin/python3 ${vmnet} whoami ${toString whoamiPort} 0.0.0.0 ::";
          };
        };
        # The forwarder's SOCKS5 upstream (TCP only: microsocks has no UDP ASSOCIATE).
        systemd.services.microsocks = {
          wantedBy = [ "multi-user.target" ];
          serviceConfig = {
            ExecStart = "${pkgs.microsocks}/bin/microsocks -i 0.0.0.0 -p 1080";
            DynamicUser = true;
          };
        };
      };

    client =
      { pkgs, nodes, ... }:
      let
        target4 = nodes.target.networking.primaryIPAddress;
      in
      {
        imports = [
          nixosModule
          (common.tproxyListener listenerPort)
        ];

        # The firewall in nftables form with its reverse-path check on, so the
        # module's exemption for looped-back packets is exercised, and with
        # nftables' default `flush ruleset` on every reload: the table, flagged
        # owner, must survive it.
        networking.nftables.enable = true;
        networking.nftables.flushRuleset = true;
        networking.firewall.checkReversePath = true;

        services.cgtproxy = {
          enable = true;
          inherit package;
          logLevel = "debug";
          # System slices too: the test starts its probes as root.
          slices.scope = "any";
          settings = {
            route-table = routeTable;
            tproxies.proxy = {
              port = listenerPort;
              inherit mark;
            };
            # An upstream: the module runs cgtproxy-forward.service on its own.
            tproxies.fwd = {
              port = forwardPort;
              mark = mark + 1;
              upstream = "socks5://${target4}:1080";
            };
            rules = [
              {
                match = "^/system\\.slice/tproxy-listener\\.service$";
                direct = true;
              }
            ];
          };
        };

        # After a switch to this, /reloadtest.slice is dropped: proves the reload path.
        specialisation.reloaded.configuration = {
          services.cgtproxy.settings.rules = lib.mkBefore [
            {
              match = "^/reloadtest\\.slice(/|$)";
              drop = true;
            }
          ];
        };

        environment.systemPackages = [
          pkgs.curl
          pkgs.nftables
          (pkgs.writeShellScriptBin "vmnet" ''exec ${pkgs.python3}/bin/python3 ${vmnet} "$@"'')
          (pkgs.writeScriptBin "udp-send" ''
            #!${pkgs.python3}/bin/python3
            # udp-send HOST PORT TEXT: one datagram.
            import socket, sys
            host, port, text = sys.argv[1], int(sys.argv[2]), sys.argv[3]
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            socket.socket(family, socket.SOCK_DGRAM).sendto(text.encode(), (host, port))
          '')
          # An app that exists before the daemon does and connects when told to.
          # Absolute paths: a transient service started by systemd-run gets systemd's
          # compiled-in PATH, which on NixOS holds only systemd's own bin directory.
          (pkgs.writeShellScriptBin "early-app" ''
            while [ ! -e /run/early-go ]; do ${pkgs.coreutils}/bin/sleep 0.2; done
            ${pkgs.curl}/bin/curl -sS --max-time 5 http://${target4}/ >/run/early-result 2>&1 \
              || echo "curl failed: $?" >>/run/early-result
            exec ${pkgs.coreutils}/bin/sleep infinity
          '')
        ];
      };
  };

  testScript =
    { nodes, ... }:
    let
      target4 = nodes.target.networking.primaryIPAddress;
      target6 = nodes.target.networking.primaryIPv6Address;
    in
    ''
      import re

      T4 = "${target4}"
      T6 = "${target6}"

      def in_slice(slice, cmd):
          # A transient scope in SLICE, run in the foreground: its output and status are ours.
          return f"systemd-run --quiet --scope --slice={slice} -- {cmd}"

      def http(addr):
          host = f"[{addr}]" if ":" in addr else addr
          return f"curl -sS -g --max-time 5 http://{host}/"

      def rules_present():
          client.succeed("nft list table inet cgtproxy")
          client.succeed("ip -4 rule show | grep -q 'lookup ${toString routeTable}'")
          client.succeed("ip -6 rule show | grep -q 'lookup ${toString routeTable}'")

      def main_pid(unit="cgtproxy"):
          return client.succeed(f"systemctl show -P MainPID {unit}.service").strip()

      def whoami(proto, addr):
          return f"vmnet probe {proto} {addr} ${toString whoamiPort} 3"

      def field(pattern, text):
          # First group of PATTERN in TEXT. (A bare `re.search(...).group(1)` fails the
          # driver's mypy check: search() returns Optional[Match].)
          m = re.search(pattern, text, re.M)
          assert m is not None, f"no {pattern!r} in: {text}"
          return m.group(1)

      start_all()
      target.wait_for_unit("target-http.service")
      target.wait_for_open_port(80)
      client.wait_for_unit("tproxy-listener.service")
      client.wait_for_unit("cgtproxy.service")
      client.wait_for_unit("cgtproxy-forward.service")
      target.wait_for_unit("microsocks.service")
      target.wait_for_unit("whoami.service")
      # Both address families up (IPv6 duplicate address detection takes a moment).
      client.wait_until_succeeds(http(T4), timeout=30)
      client.wait_until_succeeds(http(T6), timeout=30)

      # The probes' slices, started once and kept (an active slice is not collected
      # when its last scope ends): a probe's scope then starts inside a cgroup the
      # daemon has already classified, instead of racing the daemon's inotify with a
      # slice created on the fly. The first probes wait for that classification.
      client.succeed("systemctl start cgtproxy-proxy.slice cgtproxy-direct.slice cgtproxy-drop.slice cgtproxy-fwd.slice")
      client.wait_until_succeeds(in_slice("cgtproxy-proxy.slice", http(T4)) + " | grep -q '^proxied '", timeout=10)
      client.wait_until_fails(in_slice("cgtproxy-drop.slice", http(T4)), timeout=30)

      with subtest("ready means the rules are in"):
          rules_present()
          client.succeed("ip -4 route show table ${toString routeTable} | grep -q 'local default dev lo'")
          print(client.succeed("nft list table inet cgtproxy"))

      with subtest("rootless, with CAP_NET_ADMIN only (the daemon and the forwarder)"):
          for unit in ("cgtproxy", "cgtproxy-forward"):
              pid = main_pid(unit)
              status = client.succeed(f"cat /proc/{pid}/status")
              uid = field(r"^Uid:\s+(\d+)", status)
              assert uid != "0", f"{unit} runs as root: {status}"
              for cap in ("CapEff", "CapBnd"):
                  value = field(rf"^{cap}:\s+([0-9a-f]+)", status)
                  assert int(value, 16) == 1 << 12, f"{unit}: {cap} {value} is not exactly CAP_NET_ADMIN"

      with subtest("a proxied app reaches the listener with its original destination"):
          out = client.succeed(in_slice("cgtproxy-proxy.slice", http(T4)))
          assert out.strip() == f"proxied {T4}:80", out
          out = client.succeed(in_slice("cgtproxy-proxy.slice", http(T6)))
          assert out.strip() == f"proxied [{T6}]:80", out
          client.succeed(in_slice("cgtproxy-proxy.slice", f"udp-send {T4} 9999 hello4"))
          client.succeed(in_slice("cgtproxy-proxy.slice", f"udp-send {T6} 9999 hello6"))
          client.wait_until_succeeds(f"grep -qxF 'udp {T4}:9999 hello4' /run/tproxy-listener.log", timeout=10)
          client.wait_until_succeeds(f"grep -qxF 'udp [{T6}]:9999 hello6' /run/tproxy-listener.log", timeout=10)

      with subtest("direct and unclassified apps reach the target"):
          for addr in (T4, T6):
              out = client.succeed(in_slice("cgtproxy-direct.slice", http(addr)))
              assert out.strip() == "target", out
              out = client.succeed(http(addr))
              assert out.strip() == "target", out

      with subtest("an app routed to the forwarder reaches the target through microsocks"):
          C4 = "${nodes.client.networking.primaryIPAddress}"
          out = client.succeed(in_slice("cgtproxy-direct.slice", whoami("tcp", T4)))
          assert out.strip() == f"FROM {C4}", out
          # microsocks runs on the target: the target sees its own address.
          out = client.succeed(in_slice("cgtproxy-fwd.slice", whoami("tcp", T4)))
          assert out.strip() == f"FROM {T4}", out
          out = client.succeed(in_slice("cgtproxy-fwd.slice", whoami("tcp", T6)))
          assert out.strip() == f"FROM {T6}", out
          # No UDP through microsocks: dropped, never sent direct.
          client.fail(in_slice("cgtproxy-fwd.slice", whoami("udp", T4)))

      with subtest("a dropped app gets nowhere"):
          client.fail(in_slice("cgtproxy-drop.slice", http(T4)))
          client.fail(in_slice("cgtproxy-drop.slice", http(T6)))

      with subtest("an app started before the daemon is routed too"):
          client.succeed("systemctl stop cgtproxy.service")
          client.fail("nft list table inet cgtproxy")
          client.succeed("systemd-run --unit=early-app --slice=cgtproxy-proxy.slice /run/current-system/sw/bin/early-app")
          client.wait_for_unit("early-app.service")
          client.succeed("systemctl start cgtproxy.service")
          rules_present()
          client.succeed("touch /run/early-go")
          client.wait_until_succeeds("test -s /run/early-result", timeout=15)
          out = client.succeed("cat /run/early-result")
          assert out.strip() == f"proxied {T4}:80", out
          client.succeed("systemctl stop early-app.service")

      with subtest("a rule change reloads the daemon and the forwarder, same processes, new rules"):
          pid = main_pid()
          forward_pid = main_pid("cgtproxy-forward")
          out = client.succeed(in_slice("reloadtest.slice", http(T4)))
          assert out.strip() == "target", out
          client.succeed(
              "${nodes.client.system.build.toplevel}/specialisation/reloaded/bin/switch-to-configuration test"
          )
          client.wait_for_unit("cgtproxy.service")
          assert main_pid() == pid, "cgtproxy was restarted, not reloaded"
          client.wait_for_unit("cgtproxy-forward.service")
          assert main_pid("cgtproxy-forward") == forward_pid, "cgtproxy-forward was restarted, not reloaded"
          client.fail(in_slice("reloadtest.slice", http(T4)))
          out = client.succeed(in_slice("cgtproxy-proxy.slice", http(T4)))
          assert out.strip() == f"proxied {T4}:80", out

      with subtest("nftables.service reloads flush the ruleset, not our table; the rpfilter exemption holds"):
          for verb in ("reload", "restart"):
              client.succeed(f"systemctl {verb} nftables.service")
              client.succeed("nft list table inet cgtproxy | grep -q 'flags owner'")
              out = client.succeed(in_slice("cgtproxy-proxy.slice", http(T4)))
              assert out.strip() == f"proxied {T4}:80", f"after {verb}: {out}"
              out = client.succeed(in_slice("cgtproxy-proxy.slice", http(T6)))
              assert out.strip() == f"proxied [{T6}]:80", f"after {verb}: {out}"
          client.succeed("nft list chain inet nixos-fw rpfilter-allow | grep -q 'meta mark'")
          out = client.succeed("cgtproxy doctor --config /etc/cgtproxy/config.json || true")
          print(out)
          assert "ok   firewall rpfilter" in out, out
          assert "ok   ip rule order" in out, out

      with subtest("killed, it is restarted and routes again"):
          pid = main_pid()
          client.succeed("systemctl kill --signal=KILL cgtproxy.service")
          client.wait_until_succeeds(
              f"systemctl is-active cgtproxy.service && [ \"$(systemctl show -P MainPID cgtproxy.service)\" != {pid} ]",
              timeout=30,
          )
          rules_present()
          out = client.succeed(in_slice("cgtproxy-proxy.slice", http(T4)))
          assert out.strip() == f"proxied {T4}:80", out

      with subtest("hardening"):
          for unit in ("cgtproxy", "cgtproxy-forward"):
              out = client.succeed(f"systemd-analyze security {unit}.service | tail -n 1")
              print(out)
              exposure = float(field(rf"exposure level for {unit}\.service:\s+([0-9.]+)", out))
              assert exposure <= 2.0, f"{unit}: exposure {exposure}"
          client.fail("journalctl -k -b --no-pager | grep -E 'type=1326|seccomp' | grep -q cgtproxy")

      with subtest("the forwarder stops cleanly; its target's traffic is not sent direct"):
          client.succeed("systemctl stop cgtproxy-forward.service")
          assert client.succeed("systemctl show -P Result cgtproxy-forward.service").strip() == "success"
          client.fail(in_slice("cgtproxy-fwd.slice", whoami("tcp", T4)))

      with subtest("stop leaves no table, rule or route"):
          client.succeed("systemctl stop cgtproxy.service")
          client.fail("nft list table inet cgtproxy")
          client.fail("ip -4 rule show | grep -q 'lookup ${toString routeTable}'")
          client.fail("ip -6 rule show | grep -q 'lookup ${toString routeTable}'")
          assert client.succeed("ip -4 route show table ${toString routeTable}").strip() == ""
          assert client.succeed("ip -6 route show table ${toString routeTable}").strip() == ""
          out = client.succeed(in_slice("cgtproxy-proxy.slice", http(T4)))
          assert out.strip() == "target", out
    '';
}
