# Stand-in: `meta` (maintainers, doc) as free-form data; see ../../../README.md.
{ lib, ... }:
{
  options.meta = lib.mkOption {
    type = lib.types.lazyAttrsOf lib.types.anything;
    default = { };
  };
}
