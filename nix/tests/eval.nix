# Module-evaluation tests for nix/nixos-module.nix, with nixpkgs' lib and the
# stand-ins of stand-ins.nix (home-manager's module: eval-hm.nix).
#
#   nix-instantiate --eval --strict --json nix/tests/eval.nix --arg lib 'import <nixpkgs/lib>'
#
# Returns { passed = N; failed = 0; names = [...]; } or throws listing the failures.
{ lib }:

let
  standIns = import ./stand-ins.nix { inherit lib; };
  inherit (standIns)
    storeDir
    fakeDrv
    nixosModules
    evalNixos
    ;
  exe = "${standIns.cgtproxy}/bin/cgtproxy";
  # What ExecStart= holds with the stand-in for nixpkgs' utils.escapeSystemdExecArgs.
  execArgs = args: { escapedExecArgs = args; };

  inherit (import ./helpers.nix { inherit lib; })
    failedAssertions
    refusedWith
    throws
    searches
    report
    ;

  # The flake's NixOS module, as a user's flake gets it, with PKGS.
  flakeModuleWith =
    pkgs:
    let
      outputs = (import ../../flake.nix).outputs {
        self = outputs;
        nixpkgs = { inherit lib; };
        home-manager = { };
      };
    in
    (lib.evalModules {
      modules = [
        standIns.nixosOptions
        outputs.nixosModules.default
        {
          _module.args = {
            inherit pkgs;
            inherit (standIns) utils;
          };
          services.cgtproxy.enable = true;
        }
      ];
    }).config;

  noSlices = {
    services.cgtproxy.slices.enable = false;
    services.cgtproxy.checkConfig = false;
  };

  # The example of the design contract (shared/DESIGN.md), as the daemon reads it.
  designJson = ''
    {
      "version": 1,
      "cgroup-root": "AUTO",
      "route-table": 300,
      "table": "cgtproxy",
      "bypass": ["127.0.0.0/8", "::1/128"],
      "tproxies": {
        "proxy": {
          "port": 7893,
          "mark": 3000,
          "no-udp": false,
          "no-ipv6": false,
          "dns-hijack": { "ip": "127.0.0.1", "ip6": "::1", "port": 53, "tcp": false }
        }
      },
      "rules": [
        { "match": "^/system\\.slice/mihomo\\.service$", "direct": true },
        { "match": "/cgtproxy-drop\\.slice(/|$)", "drop": true },
        { "match": "/cgtproxy-proxy\\.slice(/|$)", "tproxy": "proxy" }
      ]
    }
  '';
  designCfg = evalNixos {
    imports = [ noSlices ];
    services.cgtproxy.settings = {
      tproxies.proxy = {
        port = 7893;
        mark = 3000;
        dns-hijack = {
          ip = "127.0.0.1";
          ip6 = "::1";
        };
      };
      rules = [
        {
          match = "^/system\\.slice/mihomo\\.service$";
          direct = true;
        }
        {
          match = "/cgtproxy-drop\\.slice(/|$)";
          drop = true;
        }
        {
          match = "/cgtproxy-proxy\\.slice(/|$)";
          tproxy = "proxy";
        }
      ];
    };
  };
  designUnit = designCfg.systemd.services.cgtproxy;

  proxyOnly = {
    services.cgtproxy.settings.tproxies.proxy = {
      port = 7893;
      mark = 3000;
    };
  };
  withSlices = evalNixos {
    imports = [ proxyOnly ];
    services.cgtproxy.settings.tproxies.a-b = {
      port = 7894;
      mark = 3001;
    };
    services.cgtproxy.settings.tproxies.a = {
      port = 7895;
      mark = 3002;
    };
    services.cgtproxy.settings.rules = [
      {
        match = "^/system\\.slice/mihomo\\.service$";
        direct = true;
      }
    ];
  };
  sliceRules = withSlices.services.cgtproxy.settings.rules;
  # The action of the first rule whose regex is found in `path` (the daemon's semantics).
  classify =
    rules: path:
    let
      hit = lib.findFirst (r: searches r.match path) null rules;
    in
    if hit == null then
      null
    else if hit.tproxy != null then
      hit.tproxy
    else if hit.direct == true then
      "direct"
    else
      "drop";
  userSlice = name: "/user.slice/user-1000.slice/user@1000.service/cgtproxy.slice/${name}/run-r1.scope";

  hardeningForward = import ../hardening-forward.nix;
  # A target served by the forwarder next to one served by a proxy core.
  withForward = {
    imports = [ proxyOnly ];
    services.cgtproxy.settings.tproxies.tor = {
      port = 7894;
      mark = 3001;
      upstream = "socks5://127.0.0.1:9050";
    };
  };
  forwardCfg = evalNixos withForward;
  forwardUnit = forwardCfg.systemd.services.cgtproxy-forward;
  withAuthModule = {
    imports = [ withForward ];
    services.cgtproxy.checkConfig = false;
    services.cgtproxy.settings.tproxies.corp = {
      port = 7895;
      mark = 3002;
      upstream = "http://proxy.corp.example:3128";
      upstream-auth-file = "/run/secrets/corp-proxy";
    };
  };
  withAuth = evalNixos withAuthModule;

  tests = {
    # --- NixOS module: rendering ---
    testDesignJson = {
      expr = designCfg.services.cgtproxy.configFile.value;
      # Typed options render their defaults; the contract's example predates `stub`.
      expected = lib.recursiveUpdate (builtins.fromJSON designJson) {
        tproxies.proxy.dns-hijack.stub = false;
      };
    };
    testEtcFile = {
      expr = designCfg.environment.etc."cgtproxy/config.json".source == designCfg.services.cgtproxy.configFile;
      expected = true;
    };
    # Every key of the daemon's config has a typed option; set ones are rendered.
    testEveryKeyTyped = {
      expr =
        (evalNixos {
          imports = [
            noSlices
            proxyOnly
          ];
          services.cgtproxy.settings.rule-priority = 5000;
          services.cgtproxy.settings.interfaces = [
            {
              match = "^br-lan$";
              tproxy = "proxy";
            }
          ];
          services.cgtproxy.settings.tproxies.proxy = {
            upstream = "socks5://127.0.0.1:1080";
            dns-hijack = {
              ip = "127.0.0.1";
              stub = true;
            };
          };
        }).services.cgtproxy.configFile.value;
      expected = {
        version = 1;
        cgroup-root = "AUTO";
        route-table = 300;
        table = "cgtproxy";
        rule-priority = 5000;
        interfaces = [
          {
            match = "^br-lan$";
            tproxy = "proxy";
          }
        ];
        bypass = [
          "127.0.0.0/8"
          "::1/128"
        ];
        tproxies.proxy = {
          port = 7893;
          mark = 3000;
          no-udp = false;
          no-ipv6 = false;
          upstream = "socks5://127.0.0.1:1080";
          dns-hijack = {
            ip = "127.0.0.1";
            port = 53;
            tcp = false;
            stub = true;
          };
        };
        # The upstream turns the forwarder on, and with it this rule.
        rules = [
          {
            match = "^/system\\.slice/cgtproxy-forward\\.service$";
            direct = true;
          }
        ];
      };
    };
    # Unset, rule-priority is left out: the daemon's default applies.
    testRulePriorityUnset = {
      expr = designCfg.services.cgtproxy.configFile.value ? rule-priority;
      expected = false;
    };
    # As the daemon refuses unknown keys, evaluation does (run-eval.sh checks
    # that the error names the key).
    testUnknownKeys = {
      expr = map (s: throws (evalNixos { services.cgtproxy.settings = s; }).services.cgtproxy.settings) [
        { rule-priorty = 5000; }
        { tproxies.proxy = { port = 1; mark = 1; no_udp = true; }; }
        { tproxies.proxy = { port = 1; mark = 1; dns-hijack = { ip = "127.0.0.1"; tpc = true; }; }; }
        { rules = [ { match = "x"; direct = true; tproxi = "proxy"; } ]; }
      ];
      expected = [
        true
        true
        true
        true
      ];
    };
    testCheckConfig = {
      expr =
        let
          f = (evalNixos proxyOnly).services.cgtproxy.configFile;
        in
        [
          f.name
          (lib.hasInfix "cgtproxy check --config ${storeDir}/00000000000000000000000000000000-cgtproxy-config.json" f.script)
          (f.env.nativeBuildInputs == [ standIns.cgtproxy ])
        ];
      expected = [
        "cgtproxy-config.json"
        true
        true
      ];
    };
    testNoCheckConfig = {
      expr = designCfg.services.cgtproxy.configFile ? script;
      expected = false;
    };

    # --- NixOS module: the unit ---
    testUnitType = {
      expr = designUnit.serviceConfig.Type;
      expected = "notify-reload";
    };
    testExecStart = {
      expr = designUnit.serviceConfig.ExecStart;
      expected = execArgs [
        exe
        "run"
        "--config"
        "/etc/cgtproxy/config.json"
        "--log-level"
        "info"
      ];
    };
    # Each extra argument reaches nixpkgs' escaping helper as one argument.
    testExecStartExtraArgs = {
      expr =
        (evalNixos {
          imports = [ proxyOnly ];
          services.cgtproxy.logLevel = "debug";
          services.cgtproxy.extraArgs = [ "--x=$HOME 100%" ];
        }).systemd.services.cgtproxy.serviceConfig.ExecStart;
      expected = execArgs [
        exe
        "run"
        "--config"
        "/etc/cgtproxy/config.json"
        "--log-level"
        "debug"
        "--x=$HOME 100%"
      ];
    };
    testOrdering = {
      expr = {
        inherit (designUnit)
          after
          before
          wants
          wantedBy
          ;
      };
      expected = {
        after = [ "nftables.service" ];
        before = [ "network-pre.target" ];
        wants = [ "network-pre.target" ];
        wantedBy = [ "multi-user.target" ];
      };
    };
    testReloadTriggers = {
      expr = designUnit.reloadTriggers == [ designCfg.services.cgtproxy.configFile ];
      expected = true;
    };
    testRestart = {
      expr = designUnit.serviceConfig.Restart;
      expected = "on-failure";
    };
    testEnvironmentAsTheShippedUnit = {
      # dist/systemd/cgtproxy.service's Environment= lines (malloc tuning).
      expr = designUnit.environment;
      expected = lib.listToAttrs (
        map (
          line:
          let
            parts = lib.splitString "=" (lib.removePrefix "Environment=" line);
          in
          lib.nameValuePair (builtins.head parts) (lib.concatStringsSep "=" (builtins.tail parts))
        ) (builtins.filter (lib.hasPrefix "Environment=") (lib.splitString "\n" (builtins.readFile ../../dist/systemd/cgtproxy.service)))
      );
    };
    testHardeningApplied = {
      expr = builtins.intersectAttrs (import ../hardening.nix) designUnit.serviceConfig;
      expected = import ../hardening.nix;
    };
    testRootless = {
      expr = {
        inherit (designUnit.serviceConfig)
          DynamicUser
          CapabilityBoundingSet
          AmbientCapabilities
          RestrictAddressFamilies
          ProtectControlGroups
          ;
        hasPrivateNetwork = designUnit.serviceConfig ? PrivateNetwork;
        hasUser = designUnit.serviceConfig ? User;
      };
      expected = {
        DynamicUser = true;
        CapabilityBoundingSet = [ "CAP_NET_ADMIN" ];
        AmbientCapabilities = [ "CAP_NET_ADMIN" ];
        RestrictAddressFamilies = [
          "AF_NETLINK"
          "AF_UNIX"
        ];
        ProtectControlGroups = true;
        hasPrivateNetwork = false;
        hasUser = false;
      };
    };
    # pkgs.cgtproxy where the user's pkgs have it, else overlays.default's.
    testFlakeModulePackage = {
      expr =
        map (pkgs: (flakeModuleWith pkgs).services.cgtproxy.package.name)
          [
            standIns.pkgs
            (
              removeAttrs standIns.pkgs [ "cgtproxy" ]
              // {
                callPackage = path: _: fakeDrv "built-from-${baseNameOf path}" { };
              }
            )
          ];
      expected = [
        "cgtproxy-0.1.0"
        "built-from-package.nix"
      ];
    };
    testDisabled = {
      expr =
        let
          c = (lib.evalModules { modules = nixosModules; }).config;
        in
        [
          (c.systemd.services ? cgtproxy)
          (c.environment.etc ? "cgtproxy/config.json")
          c.assertions
        ];
      expected = [
        false
        false
        [ ]
      ];
    };

    # --- NixOS module: the forwarder ---
    testForwardOnlyWithUpstream = {
      expr = [
        ((evalNixos proxyOnly).systemd.services ? cgtproxy-forward)
        (forwardCfg.systemd.services ? cgtproxy-forward)
        forwardCfg.services.cgtproxy.forward.enable
      ];
      expected = [
        false
        true
        true
      ];
    };
    testForwardUnit = {
      expr = {
        inherit (forwardUnit) after wantedBy;
        inherit (forwardUnit.serviceConfig)
          Type
          ExecStart
          Restart
          TimeoutStopSec
          LimitNOFILE
          ;
        reloadsOnConfig = forwardUnit.reloadTriggers == [ forwardCfg.services.cgtproxy.configFile ];
        hasCredentials = forwardUnit.serviceConfig ? LoadCredential;
      };
      expected = {
        after = [
          "network.target"
          "cgtproxy.service"
        ];
        wantedBy = [ "multi-user.target" ];
        Type = "notify-reload";
        ExecStart = execArgs [
          exe
          "forward"
          "--config"
          "/etc/cgtproxy/config.json"
          "--log-level"
          "info"
        ];
        Restart = "on-failure";
        TimeoutStopSec = "15s";
        LimitNOFILE = 65536;
        reloadsOnConfig = true;
        hasCredentials = false;
      };
    };
    testForwardHardening = {
      expr = {
        applied = builtins.intersectAttrs hardeningForward forwardUnit.serviceConfig == hardeningForward;
        inherit (forwardUnit.serviceConfig)
          DynamicUser
          CapabilityBoundingSet
          AmbientCapabilities
          RestrictAddressFamilies
          ;
        # The same sandbox as the daemon's, but for the address families (and no
        # runtime directory: it keeps no state).
        sameAsDaemon =
          removeAttrs hardeningForward [ "RestrictAddressFamilies" ]
          == removeAttrs (import ../hardening.nix) [
            "RestrictAddressFamilies"
            "IPAddressDeny"
            "RuntimeDirectory"
          ];
        hasIPAddressDeny = forwardUnit.serviceConfig ? IPAddressDeny;
        hasUser = forwardUnit.serviceConfig ? User;
        hasPrivateNetwork = forwardUnit.serviceConfig ? PrivateNetwork;
      };
      expected = {
        applied = true;
        DynamicUser = true;
        CapabilityBoundingSet = [ "CAP_NET_ADMIN" ];
        AmbientCapabilities = [ "CAP_NET_ADMIN" ];
        RestrictAddressFamilies = [
          "AF_INET"
          "AF_INET6"
          "AF_UNIX"
        ];
        sameAsDaemon = true;
        hasIPAddressDeny = false;
        hasUser = false;
        hasPrivateNetwork = false;
      };
    };
    testForwardCgroupDirect = {
      expr =
        let
          rules =
            (evalNixos {
              imports = [ withForward ];
              services.cgtproxy.slices.scope = "any";
              services.cgtproxy.settings.rules = [
                {
                  match = "^/system\\.slice/";
                  tproxy = "proxy";
                }
              ];
            }).services.cgtproxy.settings.rules;
        in
        {
          first = builtins.head rules;
          classes = map (classify rules) [
            "/system.slice/cgtproxy-forward.service"
            "/system.slice/cgtproxy-forwardx.service"
            "/system.slice/cgtproxy-tor.slice/run-r1.service"
          ];
        };
      expected = {
        first = {
          match = "^/system\\.slice/cgtproxy-forward\\.service$";
          direct = true;
          tproxy = null;
          drop = null;
        };
        classes = [
          "direct"
          "proxy"
          "tor"
        ];
      };
    };
    testForwardCredentials = {
      expr = {
        inherit (withAuth.systemd.services.cgtproxy-forward.serviceConfig) LoadCredential;
        rendered = lib.mapAttrs (_: t: t.upstream-auth-file or null) withAuth.services.cgtproxy.configFile.value.tproxies;
        # The option keeps what the user wrote.
        option = withAuth.services.cgtproxy.settings.tproxies.corp.upstream-auth-file;
      };
      expected = {
        LoadCredential = [ "upstream-corp:/run/secrets/corp-proxy" ];
        rendered = {
          corp = "/run/credentials/cgtproxy-forward.service/upstream-corp";
          proxy = null;
          tor = null;
        };
        option = "/run/secrets/corp-proxy";
      };
    };
    testForwardOff = {
      expr =
        let
          c = evalNixos {
            imports = [ withAuthModule ];
            services.cgtproxy.forward.enable = false;
          };
        in
        {
          unit = c.systemd.services ? cgtproxy-forward;
          directRule = lib.any (r: lib.hasInfix "cgtproxy-forward" r.match) c.services.cgtproxy.settings.rules;
          # Someone else's forwarder reads the file where it is.
          auth = c.services.cgtproxy.configFile.value.tproxies.corp.upstream-auth-file;
        };
      expected = {
        unit = false;
        directRule = false;
        auth = "/run/secrets/corp-proxy";
      };
    };
    testForwardNothingToDo = {
      expr = refusedWith (evalNixos {
        imports = [ proxyOnly ];
        services.cgtproxy.forward.enable = true;
      }) [ "services.cgtproxy.forward.enable" "no target" "upstream" ];
      expected = true;
    };

    # --- NixOS module: interplay with the firewall ---
    # Only a kernel without the owner flag (before 5.12) loses the table to a flush.
    testFlushRulesetWarning = {
      expr = map (c: builtins.length c.warnings) [
        (evalNixos {
          imports = [ proxyOnly ];
          networking.nftables.enable = true;
          boot.kernelPackages.kernel.version = "5.10.240";
        })
        (evalNixos {
          imports = [ proxyOnly ];
          networking.nftables.enable = true;
        })
        (evalNixos {
          imports = [ proxyOnly ];
          networking.nftables.enable = true;
          networking.nftables.flushRuleset = false;
          boot.kernelPackages.kernel.version = "5.10.240";
        })
        (evalNixos proxyOnly)
      ];
      expected = [
        1
        0
        0
        0
      ];
    };
    testFlushRulesetWarningText = {
      expr = lib.hasInfix "networking.nftables.flushRuleset" (
        builtins.head
          (evalNixos {
            imports = [ proxyOnly ];
            networking.nftables.enable = true;
            boot.kernelPackages.kernel.version = "5.10.240";
          }).warnings
      );
      expected = true;
    };
    testReversePathExemption = {
      expr = withSlices.networking.firewall.extraReversePathFilterRules;
      expected = ''
        meta mark { 3002, 3001, 3000 } accept comment "cgtproxy: TPROXY loop via lo"
      '';
    };
    testReversePathExemptionOff = {
      expr =
        (evalNixos {
          imports = [ proxyOnly ];
          services.cgtproxy.reversePathExemption = false;
        }).networking.firewall.extraReversePathFilterRules;
      expected = "";
    };

    # --- NixOS module: the slice convention ---
    testSliceRulesFirst = {
      expr = map (r: r.match) sliceRules;
      expected = [
        "/user@[0-9]+\\.service/(.*/)?cgtproxy-direct\\.slice(/|$)"
        "/user@[0-9]+\\.service/(.*/)?cgtproxy-proxy\\.slice(/|$)"
        "/user@[0-9]+\\.service/(.*/)?cgtproxy-drop\\.slice(/|$)"
        "/user@[0-9]+\\.service/(.*/)?cgtproxy-a-b\\.slice(/|$)"
        "/user@[0-9]+\\.service/(.*/)?cgtproxy-a\\.slice(/|$)"
        "^/system\\.slice/mihomo\\.service$"
      ];
    };
    testSliceClassification = {
      expr = map (classify sliceRules) [
        (userSlice "cgtproxy-proxy.slice")
        (userSlice "cgtproxy-direct.slice")
        (userSlice "cgtproxy-drop.slice")
        (userSlice "cgtproxy-a.slice/cgtproxy-a-b.slice")
        (userSlice "cgtproxy-a.slice")
        "/user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox-1.scope"
        "/cgtproxy.slice/cgtproxy-proxy.slice/run-r1.service"
        "/system.slice/mihomo.service"
      ];
      expected = [
        "proxy"
        "direct"
        "drop"
        "a-b"
        "a"
        null
        null
        "direct"
      ];
    };
    testSliceScopeAny = {
      expr =
        let
          rules =
            (evalNixos {
              imports = [ proxyOnly ];
              services.cgtproxy.slices.scope = "any";
            }).services.cgtproxy.settings.rules;
        in
        map (classify rules) [
          "/cgtproxy.slice/cgtproxy-proxy.slice/run-r1.service"
          "/cgtproxy.slice/cgtproxy-drop.slice"
          (userSlice "cgtproxy-direct.slice")
          "/system.slice/cgtproxy-proxyx.slice"
        ];
      expected = [
        "proxy"
        "drop"
        "direct"
        null
      ];
    };
    testSlicesRendered = {
      expr =
        builtins.length
          (evalNixos {
            imports = [ proxyOnly ];
            services.cgtproxy.checkConfig = false;
          }).services.cgtproxy.configFile.value.rules;
      expected = 3;
    };

    # --- NixOS module: the eBPF datapath ---
    testEbpfRendersAndHardens =
      let
        c = evalNixos {
          imports = [
            noSlices
            proxyOnly
          ];
          services.cgtproxy.settings.datapath = "ebpf";
        };
        sc = c.systemd.services.cgtproxy.serviceConfig;
      in
      {
        expr = {
          datapath = c.services.cgtproxy.configFile.value.datapath;
          inherit (sc) CapabilityBoundingSet AmbientCapabilities SystemCallFilter DynamicUser;
          # No marks to exempt from a reverse-path filter.
          rpfilter = c.networking.firewall.extraReversePathFilterRules;
        };
        expected = {
          datapath = "ebpf";
          CapabilityBoundingSet = [
            "CAP_BPF"
            "CAP_NET_ADMIN"
          ];
          AmbientCapabilities = [
            "CAP_BPF"
            "CAP_NET_ADMIN"
          ];
          SystemCallFilter = [
            "@system-service"
            "~@resources @privileged"
            "bpf"
          ];
          DynamicUser = true;
          rpfilter = "";
        };
      };
    # The default datapath keeps CAP_NET_ADMIN alone.
    testNftKeepsOneCapability = {
      expr = {
        inherit (designUnit.serviceConfig) CapabilityBoundingSet;
        # Unset, the key is left out: the daemon's default.
        datapath = designCfg.services.cgtproxy.configFile.value ? datapath;
      };
      expected = {
        CapabilityBoundingSet = [ "CAP_NET_ADMIN" ];
        datapath = false;
      };
    };
    testEbpfRefusesInterfacesAndDnsHijack = {
      expr = [
        (refusedWith (evalNixos {
          imports = [ proxyOnly ];
          services.cgtproxy.settings.datapath = "ebpf";
          services.cgtproxy.settings.interfaces = [
            {
              match = "^lan0$";
              drop = true;
            }
          ];
        }) [ "services.cgtproxy.settings.interfaces" "ebpf datapath" ])
        (refusedWith (evalNixos {
          imports = [ proxyOnly ];
          services.cgtproxy.settings.datapath = "ebpf";
          services.cgtproxy.settings.tproxies.proxy.dns-hijack.ip = "127.0.0.1";
        }) [ "dns-hijack" "ebpf datapath" ])
      ];
      expected = [
        true
        true
      ];
    };

    # --- NixOS module: refused settings ---
    testUnknownTarget = {
      expr = refusedWith (evalNixos {
        imports = [ proxyOnly ];
        services.cgtproxy.settings.rules = [
          {
            match = "x";
            tproxy = "nope";
          }
        ];
      }) [ "services.cgtproxy.settings.rules.3" "tproxy = \"nope\"" "known: proxy" ];
      expected = true;
    };
    testUnknownTargetInInterfaces = {
      expr = refusedWith (evalNixos {
        imports = [ proxyOnly ];
        services.cgtproxy.settings.interfaces = [
          {
            match = "^br-lan$";
            tproxy = "nope";
          }
        ];
      }) [ "services.cgtproxy.settings.interfaces.0" "tproxy = \"nope\"" "known: proxy" ];
      expected = true;
    };
    testZeroActions = {
      expr = refusedWith (evalNixos {
        imports = [
          proxyOnly
          noSlices
        ];
        services.cgtproxy.settings.rules = [ { match = "x"; } ];
      }) [ "services.cgtproxy.settings.rules.0" "exactly one" "none" ];
      expected = true;
    };
    testSeveralActions = {
      expr = refusedWith (evalNixos {
        imports = [
          proxyOnly
          noSlices
        ];
        services.cgtproxy.settings.rules = [
          {
            match = "x";
            tproxy = "proxy";
            drop = true;
          }
        ];
      }) [ "services.cgtproxy.settings.rules.0" "tproxy, drop" ];
      expected = true;
    };
    testDirectFalse = {
      expr = refusedWith (evalNixos {
        imports = [
          proxyOnly
          noSlices
        ];
        services.cgtproxy.settings.rules = [
          {
            match = "x";
            direct = false;
          }
        ];
      }) [ "rules.0" "direct must be true" ];
      expected = true;
    };
    testDuplicateMarks = {
      expr = refusedWith (evalNixos {
        imports = [ proxyOnly ];
        services.cgtproxy.settings.tproxies.other = {
          port = 7894;
          mark = 3000;
        };
      }) [ "services.cgtproxy.settings.tproxies" "other.mark" "proxy.mark" "3000" ];
      expected = true;
    };
    testReservedName = {
      expr = refusedWith (evalNixos {
        services.cgtproxy.settings.tproxies.drop = {
          port = 7894;
          mark = 1;
        };
      }) [ "services.cgtproxy.settings.tproxies.drop" "reserved" ];
      expected = true;
    };
    testReservedRouteTable = {
      expr = refusedWith (evalNixos {
        imports = [ proxyOnly ];
        services.cgtproxy.settings.route-table = 254;
      }) [ "services.cgtproxy.settings.route-table = 254" ];
      expected = true;
    };
    testDnsHijackRefused = {
      expr =
        let
          refused =
            dnsHijack:
            refusedWith (evalNixos {
              services.cgtproxy.settings.tproxies.p = {
                port = 1;
                mark = 1;
                dns-hijack = dnsHijack;
              };
            });
        in
        [
          (refused { tcp = true; } [ "tproxies.p.dns-hijack:" "needs ip, ip6 or both" ])
          (refused {
            ip6 = "::1";
            stub = true;
          } [ "tproxies.p.dns-hijack.stub:" "needs ip" ])
        ];
      expected = [
        true
        true
      ];
    };
    testGoodConfigNoAssertion = {
      expr = failedAssertions withSlices ++ failedAssertions designCfg ++ failedAssertions withAuth;
      expected = [ ];
    };
    testTypeErrors = {
      expr =
        map
          (
            s:
            throws
              (evalNixos {
                imports = [ noSlices ];
                services.cgtproxy.settings = s;
              }).services.cgtproxy.configFile.value
          )
          [
            { tproxies.p = { port = 0; mark = 1; }; }
            { tproxies.p = { port = 1; mark = 0; }; }
            { tproxies.p = { port = 70000; mark = 1; }; }
            { tproxies.p = { port = 1; mark = 1; upstream = "ftp://x:1"; }; }
            { version = 2; }
            { cgroup-root = "relative"; }
            { rule-priority = 0; }
            { rule-priority = 32766; }
            { rules = [ { tproxy = "p"; } ]; }
            { tproxies.p = { port = 1; mark = 1; }; }
          ];
      expected = [
        true
        true
        true
        true
        true
        true
        true
        true
        true
        false
      ];
    };
  };

in
report "eval" tests
