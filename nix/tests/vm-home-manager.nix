# NixOS VM test: the home-manager module routes a user's commands and launchers.
#   client: cgtproxy (slice convention, user scope) + a transparent listener, and a
#   lingering user whose home-manager config enables programs.cgtproxy.
# Run: nix build .#checks.x86_64-linux.vm-home-manager -L
{
  package,
  nixosModule,
  hmModule,
  homeManagerNixosModule,
}:

{ ... }:

let
  listenerPort = 7893;
  common = import ./common.nix;
in
{
  name = "cgtproxy-home-manager";

  nodes = {
    target = common.targetHttp;

    client =
      { pkgs, ... }:
      {
        imports = [
          nixosModule
          homeManagerNixosModule
          (common.tproxyListener listenerPort)
        ];

        services.cgtproxy = {
          enable = true;
          inherit package;
          # The default: only slices under user@UID.service are routed.
          slices.scope = "user";
          settings.tproxies.proxy = {
            port = listenerPort;
            mark = 3000;
          };
        };

        environment.systemPackages = [ pkgs.curl ];

        users.users.alice = {
          isNormalUser = true;
          uid = 1000;
          # Her systemd manager runs from boot, without a login.
          linger = true;
        };

        home-manager = {
          useGlobalPkgs = true;
          useUserPackages = true;
          users.alice = {
            imports = [ hmModule ];
            home.stateVersion = "25.05";
            programs.cgtproxy = {
              enable = true;
              inherit package;
              targets = [ "proxy" ];
              # A stand-in app whose launcher the module rewrites.
              apps.probe = {
                package = pkgs.writeTextDir "share/applications/probe.desktop" ''
                  [Desktop Entry]
                  Type=Application
                  Name=Probe
                  Exec=probe --flag %U
                  DBusActivatable=true
                '';
                target = "proxy";
              };
            };
          };
        };
      };
  };

  testScript =
    { nodes, ... }:
    let
      target4 = nodes.target.networking.primaryIPAddress;
    in
    ''
      import shlex

      T4 = "${target4}"
      HTTP = f"curl -sS --max-time 5 http://{T4}/"

      def as_alice(cmd):
          env = "export XDG_RUNTIME_DIR=/run/user/1000 DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/1000/bus; "
          return f"su -l alice -c {shlex.quote(env + cmd)}"

      start_all()
      target.wait_for_unit("target-http.service")
      target.wait_for_open_port(80)
      client.wait_for_unit("tproxy-listener.service")
      client.wait_for_unit("cgtproxy.service")
      client.wait_for_unit("home-manager-alice.service")
      # Lingering is applied by a oneshot (linger-users.service) once logind is up;
      # wait for boot to finish so that user@1000.service is not "inactive, no job".
      client.wait_for_unit("multi-user.target")
      client.wait_for_unit("user@1000.service")
      client.wait_until_succeeds(HTTP, timeout=30)

      # programs.cgtproxy starts the user's slices with her manager; make sure they
      # are up, then wait for the daemon to have classified them before asserting.
      client.succeed(as_alice("systemctl --user start cgtproxy-proxy.slice cgtproxy-direct.slice cgtproxy-drop.slice"))
      client.wait_until_succeeds(as_alice(f"cgtproxy-exec proxy {HTTP}") + " | grep -q '^proxied '", timeout=10)
      client.wait_until_fails(as_alice(f"cgtproxy-exec drop {HTTP}"), timeout=30)

      with subtest("cgtproxy-exec routes a user's command by target"):
          out = client.succeed(as_alice(f"cgtproxy-exec proxy {HTTP}"))
          assert out.strip() == f"proxied {T4}:80", out
          out = client.succeed(as_alice(f"cgtproxy-exec direct -- {HTTP}"))
          assert out.strip() == "target", out
          client.fail(as_alice(f"cgtproxy-exec drop {HTTP}"))
          # The command's exit status is passed through.
          status, _ = client.execute(as_alice("cgtproxy-exec direct sh -c 'exit 7'"))
          assert status == 7, f"exit status {status}"
          # Its scope is in the user's slice, where the system rules look.
          cgroup = client.succeed(as_alice("cgtproxy-exec proxy cat /proc/self/cgroup"))
          assert "/user@1000.service/cgtproxy.slice/cgtproxy-proxy.slice/" in cgroup, cgroup

      with subtest("the user's slices are declared"):
          client.succeed(as_alice("systemctl --user cat cgtproxy-proxy.slice cgtproxy-direct.slice cgtproxy-drop.slice"))

      with subtest("the app's launcher starts it through cgtproxy exec"):
          entry = client.succeed("cat /home/alice/.local/share/applications/probe.desktop")
          assert "/bin/cgtproxy exec proxy -- probe --flag %U" in entry, entry
          assert "DBusActivatable" not in entry, entry

      with subtest("with scope user, the same slice name at system level is not routed"):
          out = client.succeed(f"systemd-run --quiet --scope --slice=cgtproxy-proxy.slice -- {HTTP}")
          assert out.strip() == "target", out
    '';
}
