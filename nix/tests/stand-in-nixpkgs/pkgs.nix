# The packages and builders cgtproxy's flake.nix uses, as derivations that only
# fail if built: enough for `nix flake show` and `nix flake check --no-build`.
{ lib, system }:

let
  # The string attributes reach the derivation, so that evaluating it forces
  # them as nixpkgs' builders do (writeText's text holds the evaluation tests'
  # results); all stay readable (meta, src, nativeBuildInputs, ...).
  mkDrv =
    attrs:
    derivation (
      lib.filterAttrs (_: builtins.isString) attrs
      // {
        inherit system;
        builder = "/bin/sh";
        args = [
          "-c"
          "echo 'stand-in nixpkgs: nothing here can be built' >&2; exit 1"
        ];
      }
    )
    // removeAttrs attrs [ "name" ]
    // {
      overrideAttrs =
        f:
        let
          new = attrs // f attrs;
        in
        mkDrv (new // lib.optionalAttrs (new ? pname) { name = "${new.pname}-${new.version}"; });
    };
  package = name: mkDrv { inherit name; };

  pkgs = lib.genAttrs [
    "cargo"
    "clippy"
    "installShellFiles"
    "iproute2"
    "libbpf"
    "libmnl"
    "libnftnl"
    "linuxHeaders"
    "nftables"
    "pkg-config"
    "python3"
    "rust-analyzer"
    "rustc"
    "rustfmt"
  ] package
  // {
    inherit lib;
    stdenv.hostPlatform = { inherit system; };
    stdenv.buildPlatform = {
      inherit system;
      canExecute = platform: platform.system == system;
    };
    python3Packages.pyflakes = package "pyflakes";
    llvmPackages.clang-unwrapped = package "clang-unwrapped";
    callPackage =
      fn: args:
      let
        f = if builtins.isFunction fn then fn else import fn;
      in
      f (builtins.intersectAttrs (builtins.functionArgs f) pkgs // args);
    rustPlatform.buildRustPackage =
      attrs:
      mkDrv (
        {
          name = "${attrs.pname}-${attrs.version}";
          nativeBuildInputs = [ ];
        }
        // attrs
      );
    runCommand = name: env: buildCommand: mkDrv (env // { inherit name buildCommand; });
    writeText = name: text: mkDrv { inherit name text; };
    mkShell = attrs: mkDrv ({ name = "shell"; } // attrs);
    # The VM tests' nodes are evaluated by checks.vm-eval; this only names them.
    testers.runNixOSTest = _: mkDrv { name = "nixos-test"; };
  };
in
pkgs
