{
  lib,
  stdenv,
  rustPlatform,
  pkg-config,
  installShellFiles,
  libnftnl,
  libmnl,
  # The eBPF datapath's programs (build.rs): clang for the bpf target, unwrapped
  # (the wrapper's hardening flags are for the host), libbpf's and the kernel's
  # headers.
  llvmPackages,
  libbpf,
  linuxHeaders,
  # The git revision `cgtproxy --version` names (the flake passes its own):
  # the build has no .git for build.rs to ask. Empty: the version alone.
  gitRev ? "",
}:

let
  cargoToml = lib.importTOML ../Cargo.toml;
  version = cargoToml.package.version;
in
rustPlatform.buildRustPackage {
  pname = "cgtproxy";
  version = if builtins.isString version then version else "0.0.0";

  # Only what cargo reads: edits to nix/, dist/ or the README do not rebuild.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      (lib.fileset.maybeMissing ../build.rs)
      # rustfmt reads it in the fmt check.
      (lib.fileset.maybeMissing ../rustfmt.toml)
      (lib.fileset.maybeMissing ../.rustfmt.toml)
      (lib.fileset.maybeMissing ../benches)
      (lib.fileset.maybeMissing ../examples)
      # Integration tests are not run here (they need root and namespaces), but
      # clippy --all-targets compiles them; tests/vm is the Debian VM test's.
      (lib.fileset.difference (lib.fileset.maybeMissing ../tests) (
        lib.fileset.maybeMissing ../tests/vm
      ))
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;

  nativeBuildInputs = [
    pkg-config
    installShellFiles
  ];
  buildInputs = [
    libnftnl
    libmnl
  ];

  # build.rs reads it; empty means unknown.
  CGTPROXY_GIT_REV = gitRev;
  # build.rs: the clang and include paths for src/kernel/bpf/cgtproxy.bpf.c.
  CGTPROXY_CLANG = "${llvmPackages.clang-unwrapped}/bin/clang";
  CGTPROXY_BPF_CFLAGS = "-I${lib.getDev libbpf}/include -I${linuxHeaders}/include";

  # The man pages, completions and example configuration the Debian package
  # ships, written by the binary just built (src/assets.rs); so only where
  # the build machine can run it (not when cross-compiling).
  postInstall = lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
    "$out/bin/cgtproxy" generate-assets assets
    installManPage assets/man/*.1
    installShellCompletion --cmd cgtproxy \
      --bash assets/completions/cgtproxy.bash \
      --zsh assets/completions/_cgtproxy \
      --fish assets/completions/cgtproxy.fish
    install -Dm644 assets/examples/config.json "$out/share/doc/cgtproxy/examples/config.json"
  '';

  # Unit tests only: tests/kernel*.rs need root, private namespaces and a real
  # cgroup2 tree, none of which the build sandbox has. (`--lib` errors on a
  # crate without a library target.)
  cargoTestFlags = lib.optional (builtins.pathExists ../src/lib.rs) "--lib" ++ [ "--bins" ];

  meta = {
    description = "Per-application transparent proxy rule manager driven by cgroup v2 and nftables";
    license = lib.licenses.mit;
    mainProgram = "cgtproxy";
    platforms = lib.platforms.linux;
  };
}
