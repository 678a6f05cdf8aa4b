# services.cgtproxy.settings as evaluated from SETTINGS, for run-eval.sh's check
# that a misspelled key fails evaluation with an error naming it.
{ lib, settings }:
((import ./stand-ins.nix { inherit lib; }).evalNixos {
  # The user's rules alone: their error names them as definition 1.
  services.cgtproxy.slices.enable = false;
  services.cgtproxy.settings = settings;
}).services.cgtproxy.settings
