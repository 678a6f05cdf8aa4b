# Stand-ins for what the modules take from nixpkgs and NixOS, so that the tests
# evaluate them with nixpkgs' lib alone: builders return inspectable attribute
# sets instead of derivations, and the few NixOS options the module touches are
# declared here. Shared by eval.nix, eval-hm.nix and vm-nodes.nix.
{ lib }:

let
  inherit (lib) mkOption types;

  storeDir = "/nix/store";
  fakeDrv =
    name: extra:
    {
      type = "derivation";
      inherit name;
      outPath = "${storeDir}/00000000000000000000000000000000-${name}";
      meta = { };
    }
    // extra;

  jsonValue =
    let
      valueType =
        types.nullOr (
          types.oneOf [
            types.bool
            types.int
            types.float
            types.str
            types.path
            (types.attrsOf valueType)
            (types.listOf valueType)
          ]
        )
        // {
          description = "JSON value";
        };
    in
    valueType;

  cgtproxy = fakeDrv "cgtproxy-0.1.0" { meta.mainProgram = "cgtproxy"; };

  scriptBin =
    name: text:
    fakeDrv name {
      inherit text;
      meta.mainProgram = name;
    };

  freeformAttrs = types.attrsOf (types.submodule { freeformType = types.attrsOf types.anything; });
in
rec {
  inherit
    storeDir
    fakeDrv
    cgtproxy
    freeformAttrs
    ;

  pkgs = {
    # As with overlays.default applied: the modules' package option defaults to it.
    inherit cgtproxy;
    inherit lib;
    # Every format home-manager's modules use, all with the JSON format's type.
    formats = lib.genAttrs [
      "json"
      "toml"
      "yaml"
      "ini"
      "iniWithGlobalSection"
      "keyValue"
      "xml"
      "javaProperties"
    ] (_: _: {
      type = jsonValue;
      lib.types.atom = jsonValue;
      generate = name: value: fakeDrv name { inherit value; };
    });
    writeText = name: text: fakeDrv name { inherit text; };
    writeTextFile = args: fakeDrv args.name args;
    writeTextDir = path: text: fakeDrv (baseNameOf path) { inherit text; };
    writeScriptBin = scriptBin;
    writeShellScriptBin = scriptBin;
    runCommand = name: env: script: fakeDrv name { inherit env script; };
    runCommandLocal = name: env: script: fakeDrv name { inherit env script; };
  }
  # Packages that home-manager's modules (while evaluating the files asked for)
  # and the VM tests' nodes read.
  // lib.genAttrs [
    "syncthing"
    "coreutils"
    "curl"
    "microsocks"
    "nftables"
    "python3"
    "man"
    "shared-mime-info"
    "glibcLocales"
  ] (
    name:
    fakeDrv name {
      version = "0";
      meta.mainProgram = name;
    }
  )
  // {
    stdenv = {
      buildPlatform.canExecute = _: true;
      hostPlatform = {
        system = "x86_64-linux";
        isLinux = true;
        isDarwin = false;
      };
    };
    # home-manager's modules import a few nixpkgs files by path.
    path = ./nixpkgs-path;
  };

  # NixOS's `utils` module argument. The escaping itself is nixpkgs' business:
  # the tests check which arguments the module hands to it.
  utils.escapeSystemdExecArgs = args: { escapedExecArgs = args; };

  # The options of NixOS that nix/nixos-module.nix sets or reads.
  nixosOptions = {
    options = {
      assertions = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
      };
      warnings = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      environment.etc = mkOption {
        type = freeformAttrs;
        default = { };
      };
      environment.systemPackages = mkOption {
        type = types.listOf types.package;
        default = [ ];
      };
      # The kernel's version decides whether nftables' flush can touch our table.
      boot.kernelPackages = mkOption {
        type = types.attrs;
        default.kernel.version = "6.12.40";
      };
      networking.nftables.enable = mkOption {
        type = types.bool;
        default = false;
      };
      networking.nftables.flushRuleset = mkOption {
        type = types.bool;
        default = true;
      };
      networking.firewall.checkReversePath = mkOption {
        type = types.either types.bool (
          types.enum [
            "strict"
            "loose"
          ]
        );
        default = true;
      };
      networking.firewall.extraReversePathFilterRules = mkOption {
        type = types.lines;
        default = "";
      };
      systemd.services = mkOption {
        type = freeformAttrs;
        default = { };
      };
    };
  };

  # nix/nixos-module.nix with all of the above.
  nixosModules = [
    nixosOptions
    ../nixos-module.nix
    {
      _module.args = { inherit pkgs utils; };
    }
  ];
  # The configuration with services.cgtproxy enabled and the module CFG.
  evalNixos =
    cfg:
    (lib.evalModules {
      modules = nixosModules ++ [
        { services.cgtproxy.enable = true; }
        cfg
      ];
    }).config;

  # home-manager's complete module set from a checkout of it, built as its own
  # entry point does, using the pkgs above (as with useGlobalPkgs).
  homeManager =
    src:
    let
      hmLib = import (src + "/modules/lib/stdlib-extended.nix") lib;
    in
    {
      lib = hmLib;
      modules = import (src + "/modules/modules.nix") {
        inherit pkgs;
        lib = hmLib;
        useNixpkgsModule = false;
      };
      specialArgs.modulesPath = toString (src + "/modules");
    };
}
