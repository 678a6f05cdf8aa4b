# What the nodes of both NixOS VM tests (vm.nix, vm-home-manager.nix) share.
{
  # The target's HTTP server, dual stack (Python's http.server binds `::` with
  # IPV6_V6ONLY off): every GET answers "target".
  targetHttp =
    { pkgs, ... }:
    {
      networking.firewall.allowedTCPPorts = [ 80 ];
      systemd.services.target-http = {
        wantedBy = [ "multi-user.target" ];
        serviceConfig.ExecStart = "${pkgs.python3}/bin/python3 -m http.server 80 --bind :: --directory ${pkgs.writeTextDir "index.html" "target\n"}";
      };
    };

  # The transparent (TPROXY) listener standing in for a proxy core on `port`,
  # up before the daemon; the configurations classify its unit direct.
  tproxyListener =
    port:
    { pkgs, ... }:
    {
      systemd.services.tproxy-listener = {
        wantedBy = [ "multi-user.target" ];
        before = [ "cgtproxy.service" ];
        serviceConfig = {
          # HTTP answers "proxied <original destination>"; every flow logged.
          ExecStart = "${pkgs.python3}/bin/python3 ${../../tests/helpers/listener.py} ${toString port} proxied --http --log /run/tproxy-listener.log";
          # IP_TRANSPARENT sockets.
          AmbientCapabilities = [ "CAP_NET_ADMIN" ];
        };
      };
    };
}
