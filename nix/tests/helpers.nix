# What eval.nix and eval-hm.nix share: checks on an evaluated configuration and
# the report that run-eval.sh and `nix flake check` read.
{ lib }:

rec {
  failedAssertions = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  # Whether a failed assertion's message contains every one of `parts`.
  refusedWith =
    config: parts: lib.any (m: lib.all (p: lib.hasInfix p m) parts) (failedAssertions config);
  # True when evaluating `value` deeply throws (a type error, say).
  throws = value: !(builtins.tryEval (builtins.deepSeq value value)).success;
  # Rust-regex search approximated with POSIX ERE (same syntax for these patterns).
  searches = regex: path: builtins.match ".*(${regex}).*" path != null;

  # { passed = N; failed = 0; names = [ ... ]; }, or a throw listing the failures.
  report =
    suite: tests:
    let
      failures = lib.runTests tests;
      names = builtins.attrNames tests;
    in
    if failures == [ ] then
      {
        passed = builtins.length names;
        failed = 0;
        inherit names;
      }
    else
      throw "cgtproxy ${suite} tests failed (${toString (builtins.length failures)} of ${toString (builtins.length names)}):\n${
        lib.concatMapStringsSep "\n" (
          f: "  ${f.name}: expected ${builtins.toJSON f.expected}, got ${builtins.toJSON f.result}"
        ) failures
      }";
}
