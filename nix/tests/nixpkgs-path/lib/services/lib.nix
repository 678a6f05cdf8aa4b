# Stand-in for nixpkgs' modular services library, which home-manager's
# `home.services` option is built on; the tests define no such service.
{ lib }:
{
  configure = _: { serviceSubmodule = lib.types.submodule { }; };
  getAssertions = _: _: [ ];
  getWarnings = _: _: [ ];
}
