{
  description = "cgtproxy: per-application transparent proxy rules from cgroup v2 and nftables";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    # Only for the home-manager VM test; users bring their own.
    home-manager = {
      url = "github:nix-community/home-manager";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    {
      self,
      nixpkgs,
      home-manager,
    }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      # What `cgtproxy --version` names after the release: this flake's
      # revision (every commit then rebuilds the package, README edits too).
      gitRev = self.shortRev or self.dirtyShortRev or "dirty";

      # The modules' package option defaults to pkgs.cgtproxy (mkPackageOption).
      # Where the user's pkgs lack it, these modules take it from overlays.default
      # applied to those pkgs. Not by setting nixpkgs.overlays: read-only pkgs
      # (runNixOSTest's nodes, home-manager.useGlobalPkgs) refuse that.
      withPackage =
        optionPath: module:
        { lib, pkgs, ... }:
        {
          imports = [ module ];
          config = lib.setAttrByPath optionPath (
            lib.mkDefault (pkgs.cgtproxy or (self.overlays.default pkgs pkgs).cgtproxy)
          );
        };
    in
    {
      packages = forAllSystems (pkgs: rec {
        cgtproxy = pkgs.callPackage ./nix/package.nix { inherit gitRev; };
        default = cgtproxy;
      });

      overlays.default = final: _prev: {
        cgtproxy = final.callPackage ./nix/package.nix { inherit gitRev; };
      };

      nixosModules = rec {
        cgtproxy = withPackage [ "services" "cgtproxy" "package" ] ./nix/nixos-module.nix;
        default = cgtproxy;
      };

      homeManagerModules = rec {
        cgtproxy = withPackage [ "programs" "cgtproxy" "package" ] ./nix/hm-module.nix;
        default = cgtproxy;
      };
      # The name home-manager's own flake module (flake-parts) now uses.
      homeModules = self.homeManagerModules;

      checks = forAllSystems (
        pkgs:
        let
          package = self.packages.${pkgs.stdenv.hostPlatform.system}.cgtproxy;
        in
        {
          # Build plus the unit tests that need no root.
          build = package;

          clippy = package.overrideAttrs (old: {
            pname = "cgtproxy-clippy";
            nativeBuildInputs = old.nativeBuildInputs ++ [ pkgs.clippy ];
            buildPhase = ''
              runHook preBuild
              cargo clippy --offline --all-targets -- -D warnings
              runHook postBuild
            '';
            doCheck = false;
            installPhase = "touch $out";
          });

          fmt =
            pkgs.runCommand "cgtproxy-fmt"
              {
                nativeBuildInputs = [ pkgs.rustfmt ];
                src = package.src;
              }
              ''
                edition=$(sed -n 's/^edition *= *"\([0-9]*\)".*/\1/p' "$src/Cargo.toml" | head -n 1)
                dirs=("$src/src")
                for d in tests benches examples; do
                  if [ -d "$src/$d" ]; then dirs+=("$src/$d"); fi
                done
                find "''${dirs[@]}" -name '*.rs' -print0 |
                  xargs -0 rustfmt --check --edition "''${edition:-2021}"
                touch "$out"
              '';

          # Module evaluation against stand-ins: the same tests nix/tests/run-eval.sh runs.
          eval = pkgs.writeText "cgtproxy-eval-tests" (
            builtins.toJSON {
              nixos = import ./nix/tests/eval.nix { inherit lib; };
              home-manager = import ./nix/tests/eval-hm.nix {
                inherit lib;
                homeManager = home-manager.outPath;
              };
            }
          );

          # The VM tests' nodes through the modules, and their scripts linted as the
          # test driver does: what run-eval.sh checks, here without building a VM.
          vm-eval =
            let
              result = import ./nix/tests/eval-vm.nix {
                inherit lib;
                homeManager = home-manager.outPath;
              };
            in
            pkgs.runCommand "cgtproxy-vm-eval"
              {
                nativeBuildInputs = [
                  pkgs.python3
                  pkgs.python3Packages.pyflakes
                ];
                scripts = builtins.toJSON result.scripts;
                passAsFile = [ "scripts" ];
              }
              ''
                python3 ${./nix/tests/vm_lint.py} "$scriptsPath"
                touch "$out"
              '';

          # Each shipped unit against its Nix hardening file.
          unit-drift =
            pkgs.runCommand "cgtproxy-unit-drift"
              {
                nativeBuildInputs = [ pkgs.python3 ];
                hardening = builtins.toJSON (import ./nix/hardening.nix);
                hardeningForward = builtins.toJSON (import ./nix/hardening-forward.nix);
                passAsFile = [
                  "hardening"
                  "hardeningForward"
                ];
              }
              ''
                python3 ${./nix/tests/unit_drift.py} "$hardeningPath" ${./dist/systemd/cgtproxy.service} nix/hardening.nix
                python3 ${./nix/tests/unit_drift.py} "$hardeningForwardPath" ${./dist/systemd/cgtproxy-forward.service} nix/hardening-forward.nix
                touch "$out"
              '';

          vm = pkgs.testers.runNixOSTest (
            import ./nix/tests/vm.nix {
              inherit package;
              nixosModule = self.nixosModules.default;
            }
          );
          vm-home-manager = pkgs.testers.runNixOSTest (
            import ./nix/tests/vm-home-manager.nix {
              inherit package;
              nixosModule = self.nixosModules.default;
              hmModule = self.homeManagerModules.default;
              homeManagerNixosModule = home-manager.nixosModules.home-manager;
            }
          );
        }
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.cgtproxy ];
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            rust-analyzer
            pkg-config
            libnftnl
            libmnl
            # build.rs's clang for the eBPF programs, with libbpf's headers.
            llvmPackages.clang-unwrapped
            libbpf
            nftables
            iproute2
            python3
          ];
        };
      });
    };
}
