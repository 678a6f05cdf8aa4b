# A stand-in for the nixpkgs flake, for `nix flake check --no-build` without
# network (flake-check.sh): nixpkgs' real lib (copied in beside this file at run
# time from a checkout, never committed) and packages that are derivations
# which cannot build. Evaluating the checks still runs the module-evaluation
# tests, which need lib only.
{
  outputs =
    { self }:
    let
      lib = import ./lib;
    in
    {
      inherit lib;
      legacyPackages = lib.genAttrs [
        "x86_64-linux"
        "aarch64-linux"
      ] (system: import ./pkgs.nix { inherit lib system; });
    };
}
