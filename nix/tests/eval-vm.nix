# The NixOS VM tests (vm.nix, vm-home-manager.nix) without a VM: every node is
# evaluated through nix/nixos-module.nix (and alice's home through home-manager's
# modules) with the stand-ins, and each test script is rendered from the
# evaluated nodes, for vm_lint.py to check as the test driver does.
#
#   nix-instantiate --eval --strict --json nix/tests/eval-vm.nix \
#     --arg lib 'import <nixpkgs/lib>' --arg homeManager /path/to/home-manager
{ lib, homeManager }:

let
  inherit (lib) mkOption types;
  standIns = import ./stand-ins.nix { inherit lib; };
  inherit (import ./helpers.nix { inherit lib; }) failedAssertions searches report;
  hm' = standIns.homeManager homeManager;

  # The NixOS options the nodes set or the test scripts read, beyond those of
  # stand-ins.nix.
  nodeOptions = {
    options = {
      networking.firewall.allowedTCPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
      };
      networking.firewall.allowedUDPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
      };
      networking.primaryIPAddress = mkOption {
        type = types.str;
        default = "192.168.1.1";
      };
      networking.primaryIPv6Address = mkOption {
        type = types.str;
        default = "2001:db8:1::1";
      };
      system.build.toplevel = mkOption {
        type = types.package;
        default = standIns.fakeDrv "nixos-system" { };
      };
      specialisation = mkOption {
        type = types.attrsOf (
          types.submodule { options.configuration = mkOption { type = types.deferredModule; }; }
        );
        default = { };
      };
      users.users = mkOption {
        type = standIns.freeformAttrs;
        default = { };
      };
    };
  };

  # home-manager's NixOS module, as far as the test uses it: each user's home is
  # evaluated with all of home-manager's modules.
  homeManagerNixosModule = {
    options.home-manager = {
      useGlobalPkgs = mkOption { type = types.bool; };
      useUserPackages = mkOption { type = types.bool; };
      users = mkOption {
        type = types.attrsOf (
          types.submoduleWith {
            class = "homeManager";
            specialArgs = hm'.specialArgs // {
              inherit (hm') lib;
            };
            modules = hm'.modules ++ [
              (
                { name, ... }:
                {
                  home.username = name;
                  home.homeDirectory = "/home/${name}";
                }
              )
            ];
          }
        );
        default = { };
      };
    };
  };

  # A test as runNixOSTest would get it, with its nodes evaluated.
  evalTest =
    test:
    let
      t = test { inherit lib; };
      nodes = lib.mapAttrs (
        name: node:
        lib.evalModules {
          modules = standIns.nixosModules ++ [
            nodeOptions
            node
            { _module.args.nodes = configs; }
          ];
        }
      ) t.nodes;
      configs = lib.mapAttrs (_: n: n.config) nodes;
    in
    {
      inherit nodes configs;
      script = t.testScript { nodes = configs; };
    };

  vm = evalTest (
    import ./vm.nix {
      package = standIns.cgtproxy;
      nixosModule = ../nixos-module.nix;
    }
  );
  vmHm = evalTest (
    import ./vm-home-manager.nix {
      package = standIns.cgtproxy;
      nixosModule = ../nixos-module.nix;
      hmModule = ../hm-module.nix;
      inherit homeManagerNixosModule;
    }
  );

  # vm.nix's client after `switch-to-configuration` into its specialisation.
  reloaded = (
    vm.nodes.client.extendModules {
      modules = [ vm.configs.client.specialisation.reloaded.configuration ];
    }
  ).config;
  alice = vmHm.configs.client.home-manager.users.alice;
  aliceFiles = lib.mapAttrs' (_: f: lib.nameValuePair f.target f) alice.home.file;

  tests = {
    testVmNodesPassAssertions = {
      expr = lib.mapAttrs (_: failedAssertions) (vm.configs // { reloaded = reloaded; });
      expected = {
        client = [ ];
        target = [ ];
        reloaded = [ ];
      };
    };
    testVmClientUnits = {
      expr = builtins.attrNames (
        lib.filterAttrs (n: _: lib.hasPrefix "cgtproxy" n) vm.configs.client.systemd.services
      );
      expected = [
        "cgtproxy"
        "cgtproxy-forward"
      ];
    };
    # The reload subtest: reloadtest.slice is unclassified (no rule) before the
    # switch, and dropped after it.
    testVmReloadedRule = {
      expr = map (
        c:
        let
          rule = lib.findFirst (r: searches r.match "/reloadtest.slice/run-r1.scope") null c.services.cgtproxy.settings.rules;
        in
        if rule == null then null else rule.drop
      ) [
        vm.configs.client
        reloaded
      ];
      expected = [
        null
        true
      ];
    };
    testVmHmNodePassesAssertions = {
      expr = {
        client = failedAssertions vmHm.configs.client;
        alice = failedAssertions alice;
      };
      expected = {
        client = [ ];
        alice = [ ];
      };
    };
    testVmHmAliceFiles = {
      expr = map (p: aliceFiles ? ${p}) [
        ".local/share/applications/probe.desktop"
        ".config/systemd/user/cgtproxy-proxy.slice"
      ];
      expected = [
        true
        true
      ];
    };
  };
in
report "VM test nodes" tests
// {
  # Per test: its machines (the names the driver defines) and its script.
  scripts = lib.mapAttrs (_: t: {
    machines = builtins.attrNames t.configs;
    inherit (t) script;
  }) {
    inherit vm;
    vm-home-manager = vmHm;
  };
}
