{
  config,
  lib,
  pkgs,
  utils,
  ...
}:

let
  inherit (lib)
    mkOption
    mkEnableOption
    mkIf
    mkBefore
    types
    literalExpression
    ;

  cfg = config.services.cgtproxy;
  json = pkgs.formats.json { };
  configPath = "/etc/cgtproxy/config.json";

  # Optional keys left null are omitted: the daemon rejects keys it does not know,
  # and `null` is not one of the values it accepts.
  dropNulls =
    v:
    if builtins.isAttrs v then
      lib.mapAttrs (_: dropNulls) (lib.filterAttrs (_: x: x != null) v)
    else if builtins.isList v then
      map dropNulls v
    else
      v;

  targetNames = builtins.attrNames cfg.settings.tproxies;
  reserved = [
    "direct"
    "drop"
  ];

  # The reference's convention: cgtproxy-NAME.slice routes to target NAME, plus
  # cgtproxy-direct.slice and cgtproxy-drop.slice. A dashed name nests its slice
  # (cgtproxy-a-b.slice lies inside cgtproxy-a.slice), so longer names go first.
  sliceNames = lib.sort (a: b: lib.stringLength a > lib.stringLength b) (
    lib.filter (n: !(builtins.elem n reserved)) targetNames ++ reserved
  );
  slicePrefix =
    {
      user = "/user@[0-9]+\\.service/(.*/)?";
      any = "/";
    }
    .${cfg.slices.scope};
  sliceRule =
    name:
    {
      match = "${slicePrefix}cgtproxy-${lib.escapeRegex name}\\.slice(/|$)";
    }
    // (
      if name == "direct" then
        { direct = true; }
      else if name == "drop" then
        { drop = true; }
      else
        { tproxy = name; }
    );

  # The forwarder runs as a dynamic user, which cannot read a root-only secret:
  # each target's upstream-auth-file reaches it as a credential (LoadCredential=,
  # copied by systemd when the unit starts), and the rendered file names that copy.
  forwardTargets = lib.filterAttrs (_: t: t.upstream != null) cfg.settings.tproxies;
  credentialDir = "/run/credentials/cgtproxy-forward.service";
  credentialName = name: "upstream-${name}";
  authFiles = lib.filterAttrs (_: t: t.upstream-auth-file != null) (
    if cfg.forward.enable then forwardTargets else { }
  );
  credentials = lib.mapAttrsToList (
    name: t: "${credentialName name}:${t.upstream-auth-file}"
  ) authFiles;

  # An empty `interfaces` is left out, as the contract's example has none.
  rendered = dropNulls (
    lib.recursiveUpdate
      (removeAttrs cfg.settings (lib.optional (cfg.settings.interfaces == [ ]) "interfaces"))
      {
      tproxies = lib.mapAttrs (name: _: {
        upstream-auth-file = "${credentialDir}/${credentialName name}";
      }) authFiles;
    }
  );
  rawConfig = json.generate "cgtproxy-config.json" rendered;
  canCheck = pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform;
  configFile =
    if cfg.checkConfig && canCheck then
      pkgs.runCommand "cgtproxy-config.json"
        {
          nativeBuildInputs = [ cfg.package ];
          preferLocalBuild = true;
        }
        ''
          cgtproxy check --config ${rawConfig}
          cp ${rawConfig} "$out"
        ''
    else
      rawConfig;

  marks = lib.mapAttrsToList (_: t: t.mark) cfg.settings.tproxies;
  # The eBPF datapath: no marks, routes or table; CAP_BPF and bpf() for the unit.
  ebpf = cfg.settings.datapath == "ebpf";

  # The same checks for `rules` and `interfaces` (`list` names which).
  ruleAssertionsOf =
    list:
    lib.concatLists (
    lib.imap0 (
      i: r:
      let
        where = "services.cgtproxy.settings.${list}.${toString i} (match = ${builtins.toJSON r.match})";
        actions = lib.filter (a: r.${a} != null) [
          "tproxy"
          "direct"
          "drop"
        ];
      in
      [
        {
          assertion = builtins.length actions == 1;
          message = "${where}: needs exactly one of tproxy, direct, drop; it has ${
            if actions == [ ] then "none" else lib.concatStringsSep ", " actions
          }.";
        }
        {
          assertion = r.tproxy == null || builtins.elem r.tproxy targetNames;
          message = "${where}: tproxy = ${builtins.toJSON r.tproxy} names no target in services.cgtproxy.settings.tproxies (known: ${
            lib.concatStringsSep ", " targetNames
          }).";
        }
        {
          assertion = r.direct == null || r.direct;
          message = "${where}: direct must be true when set; remove it instead.";
        }
        {
          assertion = r.drop == null || r.drop;
          message = "${where}: drop must be true when set; remove it instead.";
        }
      ]
    ) cfg.settings.${list}
  );

  ruleAssertions = ruleAssertionsOf "rules" ++ ruleAssertionsOf "interfaces";

  markAssertions = lib.mapAttrsToList (
    mark: names:
    {
      assertion = builtins.length names == 1;
      message = "services.cgtproxy.settings.tproxies: ${
        lib.concatMapStringsSep ", " (n: "${n}.mark") names
      } share the mark ${mark}; each target needs its own.";
    }
  ) (lib.groupBy' (acc: n: acc ++ [ n ]) [ ] (n: toString cfg.settings.tproxies.${n}.mark) targetNames);

  # No freeformType in these submodules: like the daemon, evaluation refuses a key
  # it does not know, naming it, instead of passing a typo through.
  # The daemon's checks of dns-hijack, here too so that they hold without the
  # build-time `cgtproxy check` (which cross-compiling skips).
  dnsAssertions = lib.concatLists (
    lib.mapAttrsToList (
      name: t:
      let
        d = t.dns-hijack;
        where = "services.cgtproxy.settings.tproxies.${name}.dns-hijack";
      in
      lib.optionals (d != null) [
        {
          assertion = d.ip != null || d.ip6 != null;
          message = "${where}: needs ip, ip6 or both.";
        }
        {
          assertion = !d.stub || d.ip != null;
          message = "${where}.stub: needs ip (the stub 127.0.0.53 is IPv4).";
        }
      ]
    ) cfg.settings.tproxies
  );

  dnsHijackModule = {
    options = {
      ip = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "127.0.0.1";
        description = "IPv4 address of the DNS server for this target's IPv4 port-53 traffic; null leaves IPv4 DNS alone.";
      };
      ip6 = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "::1";
        description = "IPv6 address for the target's IPv6 DNS traffic; null leaves IPv6 DNS alone.";
      };
      port = mkOption {
        type = types.port;
        default = 53;
        description = "Port of that DNS server.";
      };
      tcp = mkOption {
        type = types.bool;
        default = false;
        description = "Also redirect TCP/53, not only UDP/53.";
      };
      stub = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Also redirect the target's queries to systemd-resolved's stub listener
          (127.0.0.53), which {option}`services.cgtproxy.settings.bypass` would
          otherwise exempt. Needs {option}`ip`.
        '';
      };
    };
  };

  tproxyModule = {
    options = {
      port = mkOption {
        type = types.ints.between 1 65535;
        example = 7893;
        description = "Port of the local TPROXY listener (the proxy's tproxy inbound).";
      };
      mark = mkOption {
        type = types.ints.between 1 4294967295;
        example = 3000;
        description = "Firewall mark for this target's packets; unique across targets.";
      };
      no-udp = mkOption {
        type = types.bool;
        default = false;
        description = "Send this target's UDP traffic direct instead of to the listener.";
      };
      no-ipv6 = mkOption {
        type = types.bool;
        default = false;
        description = "Send this target's IPv6 traffic direct instead of to the listener.";
      };
      dns-hijack = mkOption {
        type = types.nullOr (types.submodule dnsHijackModule);
        default = null;
        description = "Redirect this target's DNS (port 53) to the given server.";
      };
      upstream = mkOption {
        type = types.nullOr (types.strMatching "(socks5|http)://.+:[0-9]+");
        default = null;
        example = "socks5://127.0.0.1:1080";
        description = ''
          Upstream (SOCKS5 or HTTP CONNECT) of the built-in forwarder, `cgtproxy
          forward`, which then serves this target's port; see
          {option}`services.cgtproxy.forward.enable`.
        '';
      };
      upstream-auth-file = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/cgtproxy-upstream";
        description = ''
          File holding `user:password` for {option}`upstream`. A string, not a
          Nix path, so that the secret is not copied into the world-readable store.
          It may be readable by root only: the forwarder's unit receives it with
          `LoadCredential=` (read when the unit starts; a changed path restarts
          it), and the rendered configuration names that copy,
          `${credentialDir}/upstream-NAME`.
        '';
      };
    };
  };

  ruleModule = {
    options = {
      match = mkOption {
        type = types.str;
        example = "/app-firefox-[0-9]+\\.scope$";
        description = ''
          Regex (Rust `regex` syntax) searched in the cgroup's path relative to the
          cgroup2 root, with a leading `/`. The first matching rule wins.
        '';
      };
      tproxy = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "Send matching cgroups' traffic to this target of {option}`services.cgtproxy.settings.tproxies`.";
      };
      direct = mkOption {
        type = types.nullOr types.bool;
        default = null;
        description = "`true`: leave matching cgroups' traffic alone.";
      };
      drop = mkOption {
        type = types.nullOr types.bool;
        default = null;
        description = "`true`: drop matching cgroups' traffic.";
      };
    };
  };
in
{
  options.services.cgtproxy = {
    enable = mkEnableOption "cgtproxy, the per-application transparent proxy rule manager";

    # pkgs.cgtproxy: the flake's modules provide it from overlays.default when the
    # user's pkgs lack it, so a package the user overlays in is the one used.
    package = lib.mkPackageOption pkgs "cgtproxy" { };

    settings = mkOption {
      default = { };
      description = ''
        The daemon's configuration, rendered to `${configPath}`. Keys are the JSON
        file's own (see the "Configuration" section of the project's README.md);
        like the daemon, evaluation refuses a key it does not know.
      '';
      example = literalExpression ''
        {
          tproxies.proxy = { port = 7893; mark = 3000; };
          rules = [
            { match = "^/system\\.slice/mihomo\\.service$"; direct = true; }
            { match = "/app-firefox-[0-9]+\\.scope$"; tproxy = "proxy"; }
          ];
        }
      '';
      type = types.submodule {
        options = {
          version = mkOption {
            type = types.enum [ 1 ];
            default = 1;
            description = "Schema version of the configuration.";
          };
          cgroup-root = mkOption {
            type = types.strMatching "AUTO|/.*";
            default = "AUTO";
            description = "`AUTO` (find the cgroup2 mount) or the absolute path of a cgroup2 mount.";
          };
          route-table = mkOption {
            type = types.ints.positive;
            default = 300;
            description = "Policy-routing table for the local loop: 1 to 252, or above 255.";
          };
          table = mkOption {
            type = types.strMatching "[A-Za-z0-9_-]+";
            default = "cgtproxy";
            description = "Name of the `inet` nftables table that the daemon owns.";
          };
          rule-priority = mkOption {
            type = types.nullOr (types.ints.between 1 32765);
            default = null;
            example = 5000;
            description = ''
              Priority of the daemon's ip rules (IPv4 and IPv6). null leaves the key
              out, so the daemon's default applies (ahead of common VPN and mesh
              clients' rules; the README says which value and why).
            '';
          };
          bypass = mkOption {
            type = types.listOf types.str;
            default = [
              "127.0.0.0/8"
              "::1/128"
            ];
            description = "Destination addresses or CIDRs (IPv4 or IPv6) that are never touched.";
          };
          tproxies = mkOption {
            type = types.attrsOf (types.submodule tproxyModule);
            default = { };
            description = "TPROXY targets by name.";
          };
          rules = mkOption {
            type = types.listOf (types.submodule ruleModule);
            default = [ ];
            description = ''
              Ordered rules; each has {option}`match` and exactly one of
              {option}`tproxy`, {option}`direct` = true, {option}`drop` = true.
              The rules of {option}`services.cgtproxy.slices` come first.
            '';
          };
          datapath = mkOption {
            type = types.nullOr (
              types.enum [
                "nft"
                "ebpf"
              ]
            );
            # Unset, the key is left out of the file: the daemon's default, nft.
            default = null;
            description = ''
              How classified sockets are routed. `nft` (the default): the nftables table and
              policy routing, to TPROXY listeners. `ebpf`: cgroup socket
              programs redirect a proxied cgroup's TCP `connect()` to the
              target's port on 127.0.0.1 / ::1, for REDIRECT-style listeners
              that read `SO_ORIGINAL_DST` (the built-in forwarder, redsocks,
              mihomo's `redir-port`); no marks, routes or table, so VPN rules and
              firewalls cannot disturb it. A target's UDP goes to the same
              port, for the built-in forwarder (connected, bound and IPv6
              UDP sockets talk to one destination each; `no-udp` sends it
              direct); no `interfaces`, no
              `dns-hijack`. The unit gains CAP_BPF and the bpf() system call.
              Changing it restarts the daemon.
            '';
          };
          interfaces = mkOption {
            type = types.listOf (types.submodule ruleModule);
            default = [ ];
            example = lib.literalExpression ''
              [
                { match = "^br-lan$"; tproxy = "proxy"; }
                { match = "^vnet"; drop = true; }
              ]
            '';
            description = ''
              Gateway mode: ordered rules on interface names. Traffic this host
              forwards from a matching interface (a LAN, a bridge, a VM network)
              gets the rule's verdict; {option}`match` is searched in the name.
              Interfaces that appear later are covered without a reload.
              Containers need none of this: a rule in
              {option}`services.cgtproxy.settings.rules` that matches a
              container's cgroup (`machine-NAME.scope`, `docker-ID.scope`, a
              quadlet's unit) routes what it forwards to this host too. Needs
              `networking.ip_forward` (or the interfaces' own forwarding); see the
              README's "Containers, VMs and LAN clients".
            '';
          };
        };
      };
    };

    configFile = mkOption {
      type = types.path;
      readOnly = true;
      description = "The rendered (and, with {option}`checkConfig`, validated) configuration file.";
    };

    checkConfig = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Validate the rendered file with `cgtproxy check` at build time. Turn it off
        when cross-compiling for a platform the build machine cannot run.
      '';
    };

    logLevel = mkOption {
      type = types.enum [
        "error"
        "warn"
        "info"
        "debug"
        "trace"
      ];
      default = "info";
      description = "Log level (`--log-level`).";
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "Extra arguments for `cgtproxy run`.";
    };

    slices = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Add rules, before {option}`services.cgtproxy.settings.rules`, for the slice
          convention that `cgtproxy exec` and the home-manager module use:
          `cgtproxy-NAME.slice` goes to target NAME, `cgtproxy-direct.slice` is left
          alone and `cgtproxy-drop.slice` is dropped.
        '';
      };
      scope = mkOption {
        type = types.enum [
          "user"
          "any"
        ];
        default = "user";
        description = ''
          `user`: only those slices under a user manager (`user@UID.service`), which
          any local user can start programs in. `any`: also system slices, e.g.
          `systemd-run --slice=cgtproxy-proxy.slice` run by root.
        '';
      };
    };

    forward = {
      enable = mkOption {
        type = types.bool;
        default = forwardTargets != { };
        defaultText = literalExpression "any target in services.cgtproxy.settings.tproxies has an upstream";
        description = ''
          Run the built-in forwarder, `cgtproxy forward`, as
          `cgtproxy-forward.service`: it listens on the port of every target
          with an `upstream` and relays that target's traffic through it
          (SOCKS5 or HTTP CONNECT). Same sandbox as the daemon, but with IP
          sockets instead of netlink. A rule classifying its own cgroup
          direct comes before all others.
        '';
      };
    };

    reversePathExemption = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Accept packets carrying a target's mark in the nftables firewall's
        reverse-path check ({option}`networking.firewall.extraReversePathFilterRules`),
        so that {option}`networking.firewall.checkReversePath` never drops the
        packets that the daemon loops back through `lo` to the listener.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions =
      ruleAssertions
      ++ markAssertions
      ++ dnsAssertions
      ++ map (n: {
        assertion = !(builtins.elem n reserved);
        message = "services.cgtproxy.settings.tproxies.${n}: `direct` and `drop` are reserved names (cgtproxy exec, slices).";
      }) targetNames
      ++ [
        {
          assertion = !ebpf || cfg.settings.interfaces == [ ];
          message = "services.cgtproxy.settings.interfaces: forwarded traffic never meets the ebpf datapath's socket hooks; use settings.datapath = \"nft\" for gateway mode.";
        }
        {
          assertion = !ebpf || lib.all (t: t.dns-hijack == null) (lib.attrValues cfg.settings.tproxies);
          message = "services.cgtproxy.settings.tproxies: the ebpf datapath does not hijack DNS yet; remove dns-hijack or use settings.datapath = \"nft\".";
        }
        {
          assertion = !cfg.forward.enable || forwardTargets != { };
          message = "services.cgtproxy.forward.enable: no target in services.cgtproxy.settings.tproxies has an upstream, so `cgtproxy forward` would have nothing to do.";
        }
        {
          assertion =
            let
              t = cfg.settings.route-table;
            in
            t <= 252 || t > 255;
          message = "services.cgtproxy.settings.route-table = ${toString cfg.settings.route-table}: tables 253 to 255 are the kernel's (default, main, local).";
        }
      ];

    # From Linux 5.12 the daemon's table is flagged owner and `flush ruleset`
    # leaves it alone; only older kernels lose it on every reload.
    warnings =
      lib.optional
        (
          config.networking.nftables.enable
          && config.networking.nftables.flushRuleset
          && lib.versionOlder config.boot.kernelPackages.kernel.version "5.12"
        )
        ''
          services.cgtproxy: networking.nftables.flushRuleset is on and this kernel
          (${config.boot.kernelPackages.kernel.version}) is older than 5.12, which cannot
          flag cgtproxy's table as owned: every reload of nftables.service (as
          nixos-rebuild switch does when the ruleset changed) runs `flush ruleset`, which
          removes the table until the daemon restores it, milliseconds later; traffic sent
          in between goes direct. Set networking.nftables.flushRuleset = false; NixOS then
          replaces only its own tables.'';

    services.cgtproxy.settings.rules = lib.mkMerge [
      # Before everything else, the slices too: the forwarder's own traffic is
      # never captured. Its upstream connections would not be anyway (they
      # carry SO_MARK 0x63677466, which the output chain leaves alone); this
      # covers the rest of what it sends, whatever the user's rules match.
      (mkIf cfg.forward.enable (
        lib.mkOrder 400 [
          {
            match = "^/system\\.slice/cgtproxy-forward\\.service$";
            direct = true;
          }
        ]
      ))
      (mkIf cfg.slices.enable (mkBefore (map sliceRule sliceNames)))
    ];
    services.cgtproxy.configFile = configFile;

    environment.etc."cgtproxy/config.json".source = configFile;
    # `cgtproxy exec`, `check`, `render` for users and admins.
    environment.systemPackages = [ cfg.package ];

    networking.firewall.extraReversePathFilterRules = mkIf (cfg.reversePathExemption && !ebpf && marks != [ ]) ''
      meta mark { ${lib.concatMapStringsSep ", " toString marks} } accept comment "cgtproxy: TPROXY loop via lo"
    '';

    systemd.services.cgtproxy = {
      description = "cgtproxy per-application transparent proxy rules";
      wantedBy = [ "multi-user.target" ];
      # nftables.service runs `flush ruleset` when it starts: after it, never before.
      after = [ "nftables.service" ];
      # Rules in before any network comes up.
      before = [ "network-pre.target" ];
      wants = [ "network-pre.target" ];
      # The config lives at a stable path, so a change reloads (SIGHUP) instead
      # of restarting; a new package changes ExecStart= and so restarts.
      reloadTriggers = [ configFile ];
      # As dist/systemd/cgtproxy.service: a fixed malloc mmap threshold and no
      # per-thread cache of freed blocks keep start-up's memory from staying
      # resident (16.2 → 11.6 MiB idle at 50,000 cgroups).
      environment.GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=131072:glibc.malloc.tcache_count=0";
      serviceConfig = import ./hardening.nix // lib.optionalAttrs ebpf (import ./hardening-ebpf.nix) // {
        Type = "notify-reload";
        ExecStart = utils.escapeSystemdExecArgs (
          [
            (lib.getExe cfg.package)
            "run"
            "--config"
            configPath
            "--log-level"
            cfg.logLevel
          ]
          ++ cfg.extraArgs
        );
        # A crash leaves a stale table; a restart replaces it in one transaction.
        Restart = "on-failure";
        RestartSec = "2s";
      };
    };

    systemd.services.cgtproxy-forward = mkIf cfg.forward.enable {
      description = "cgtproxy built-in transparent forwarder (SOCKS5 / HTTP CONNECT upstreams)";
      wantedBy = [ "multi-user.target" ];
      after = [
        "network.target"
        "cgtproxy.service"
      ];
      # SIGHUP: new upstreams for new flows, listeners for new ports; open
      # flows go on. New credentials change LoadCredential= and so restart it.
      reloadTriggers = [ configFile ];
      serviceConfig = import ./hardening-forward.nix // {
        Type = "notify-reload";
        ExecStart = utils.escapeSystemdExecArgs [
          (lib.getExe cfg.package)
          "forward"
          "--config"
          configPath
          "--log-level"
          cfg.logLevel
        ];
        Restart = "on-failure";
        RestartSec = "2s";
        # SIGTERM stops accepting and lets open connections finish for up to 10 s.
        TimeoutStopSec = "15s";
        # Two descriptors per TCP connection, three per UDP flow.
        LimitNOFILE = 65536;
      }
      // lib.optionalAttrs (credentials != [ ]) { LoadCredential = credentials; };
    };
  };
}
