# Evaluation tests for nix/hm-module.nix inside home-manager's complete module set
# (every module of HOMEMANAGER/modules/modules.nix), with the stand-in pkgs of
# stand-ins.nix: the files it makes in the user's home are checked as home-manager
# would write them.
#
#   nix-instantiate --eval --strict --json nix/tests/eval-hm.nix \
#     --arg lib 'import <nixpkgs/lib>' --arg homeManager /path/to/home-manager
{ lib, homeManager }:

let
  standIns = import ./stand-ins.nix { inherit lib; };
  inherit (standIns) storeDir fakeDrv evalNixos;
  inherit (import ./helpers.nix { inherit lib; })
    failedAssertions
    refusedWith
    searches
    report
    ;
  exe = "${standIns.cgtproxy}/bin/cgtproxy";

  hm' = standIns.homeManager homeManager;
  evalHm =
    cfg:
    (hm'.lib.evalModules {
      modules = hm'.modules ++ [
        ../hm-module.nix
        {
          home.username = "alice";
          home.homeDirectory = "/home/alice";
          home.stateVersion = "25.05";
          programs.cgtproxy.enable = true;
        }
        cfg
      ];
      class = "homeManager";
      inherit (hm') specialArgs;
    }).config;

  # The files home-manager links into the home directory, by path relative to it.
  homeFiles =
    config:
    lib.mapAttrs' (_: f: lib.nameValuePair f.target f) (
      lib.filterAttrs (_: f: f.enable) config.home.file
    );
  unitDir = ".config/systemd/user";

  hm = evalHm {
    programs.cgtproxy = {
      targets = [ "proxy" ];
      apps.firefox = {
        package = fakeDrv "firefox" { };
        target = "proxy";
      };
      # A unit that a package ships, unknown to home-manager.
      services.syncthing = "direct";
      flatpaks."org.mozilla.firefox" = "proxy";
      flatpaks."com.example.Game" = "drop";
    };
  };
  files = homeFiles hm;

  # The same choice for the unit that home-manager's own module writes.
  hmSyncthing = evalHm {
    services.syncthing.enable = true;
    programs.cgtproxy.services.syncthing = "direct";
  };
  syncthingFiles = homeFiles hmSyncthing;

  tests = {
    testHmSlices = {
      expr = lib.mapAttrs (_: s: s.Unit.Description) hm.systemd.user.slices;
      expected = {
        cgtproxy-proxy = "cgtproxy: apps whose traffic goes to proxy";
        cgtproxy-direct = "cgtproxy: apps whose traffic goes to direct";
        cgtproxy-drop = "cgtproxy: apps whose traffic goes to drop";
      };
    };
    # Each slice's unit file, and its link that starts it with the manager.
    testHmSliceFiles = {
      expr = lib.filter (p: lib.hasInfix "cgtproxy-" p && lib.hasSuffix ".slice" p) (
        builtins.attrNames files
      );
      expected = map (p: "${unitDir}/${p}") [
        "cgtproxy-direct.slice"
        "cgtproxy-drop.slice"
        "cgtproxy-proxy.slice"
        "default.target.wants/cgtproxy-direct.slice"
        "default.target.wants/cgtproxy-drop.slice"
        "default.target.wants/cgtproxy-proxy.slice"
      ];
    };
    testHmExecHelper = {
      expr = map (p: [
        p.name
        (lib.hasInfix ''exec ${exe} exec "$@"'' p.text)
      ]) (lib.filter (p: p.name == "cgtproxy-exec") hm.home.packages);
      expected = [
        [
          "cgtproxy-exec"
          true
        ]
      ];
    };
    # A drop-in, and no unit file of ours that would hide the package's.
    testHmServiceDropIn = {
      expr = {
        dropIn = files."${unitDir}/syncthing.service.d/cgtproxy-slice.conf".text or null;
        unit = files ? "${unitDir}/syncthing.service";
      };
      expected = {
        dropIn = "[Service]\nSlice=cgtproxy-direct.slice\n";
        unit = false;
      };
    };
    # home-manager's own unit keeps its file and ExecStart=; the drop-in adds Slice=.
    testHmOwnUnitKept = {
      expr =
        let
          inherit (hmSyncthing.systemd.user.services.syncthing) Service;
        in
        {
          unit = syncthingFiles ? "${unitDir}/syncthing.service";
          execStart = map (lib.hasInfix "/bin/syncthing serve") Service.ExecStart;
          slice = Service ? Slice;
          dropIn = syncthingFiles."${unitDir}/syncthing.service.d/cgtproxy-slice.conf".text or null;
          assertions = failedAssertions hmSyncthing;
        };
      expected = {
        unit = true;
        execStart = [ true ];
        slice = false;
        dropIn = "[Service]\nSlice=cgtproxy-direct.slice\n";
        assertions = [ ];
      };
    };
    testHmDesktopEntry = {
      expr =
        let
          f = files.".local/share/applications/firefox.desktop".source;
        in
        [
          (lib.hasInfix "${storeDir}/00000000000000000000000000000000-firefox/share/applications/firefox.desktop" f.script)
          (lib.hasInfix "s|^Exec=|Exec=${exe} exec proxy -- |" f.script)
          (lib.hasInfix "/^DBusActivatable=/d" f.script)
        ];
      expected = [
        true
        true
        true
      ];
    };
    testHmFlatpakRules = {
      expr = hm.programs.cgtproxy.systemRules;
      expected = [
        {
          match = "/app-flatpak-com\\.example\\.Game-[0-9]+\\.scope$";
          drop = true;
        }
        {
          match = "/app-flatpak-org\\.mozilla\\.firefox-[0-9]+\\.scope$";
          tproxy = "proxy";
        }
      ];
    };
    testHmFlatpakRuleMatches = {
      expr = map (p: searches (lib.last hm.programs.cgtproxy.systemRules).match p) [
        "/user.slice/user-1000.slice/user@1000.service/app.slice/app-flatpak-org.mozilla.firefox-4242.scope"
        "/user.slice/user-1000.slice/user@1000.service/app.slice/app-flatpak-orgXmozilla.firefox-4242.scope"
      ];
      expected = [
        true
        false
      ];
    };
    testHmRulesAcceptedBySystem = {
      expr = failedAssertions (evalNixos {
        services.cgtproxy.settings.tproxies.proxy = {
          port = 7893;
          mark = 3000;
        };
        services.cgtproxy.settings.rules = hm.programs.cgtproxy.systemRules;
      });
      expected = [ ];
    };
    testHmUnknownTarget = {
      expr =
        map
          (refusedWith (evalHm {
            programs.cgtproxy.apps.x = {
              package = fakeDrv "x" { };
              target = "nope";
            };
            programs.cgtproxy.services.y = "nope2";
            programs.cgtproxy.flatpaks.z = "nope3";
          }))
          [
            [
              "programs.cgtproxy.apps.x.target"
              "\"nope\""
            ]
            [
              "programs.cgtproxy.services.y"
              "\"nope2\""
            ]
            [
              "programs.cgtproxy.flatpaks.\"z\""
              "\"nope3\""
            ]
          ];
      expected = [
        true
        true
        true
      ];
    };
    # No assertion or warning of any home-manager module fails.
    testHmGoodNoAssertion = {
      expr = {
        assertions = failedAssertions hm;
        inherit (hm) warnings;
      };
      expected = {
        assertions = [ ];
        warnings = [ ];
      };
    };
  };
in
report "home-manager eval" tests
