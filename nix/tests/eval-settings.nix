# services.cgtproxy.settings as evaluated from SETTINGS, for run-eval.sh's check
# that a misspelled key fails evaluation with an error naming it.
{ lib, settings }:
(lib.evalModules {
  modules = (import ./stand-ins.nix { inherit lib; }).nixosModules ++ [
    {
      services.cgtproxy = {
        enable = true;
        # The user's rules alone: their error names them as definition 1.
        slices.enable = false;
        inherit settings;
      };
    }
  ];
}).config.services.cgtproxy.settings
