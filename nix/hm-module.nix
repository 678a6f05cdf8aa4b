{
  config,
  lib,
  pkgs,
  ...
}:

# Per-user routing choices. Needs no privileges: the system's cgtproxy daemon
# (services.cgtproxy with its slice convention on) routes whatever runs in
# cgtproxy-TARGET.slice under the user's systemd manager; this module only
# starts programs there.
let
  inherit (lib) mkOption mkIf types;

  cfg = config.programs.cgtproxy;
  exe = lib.getExe cfg.package;
  allTargets = cfg.targets ++ [
    "direct"
    "drop"
  ];
  targetType = types.strMatching "[A-Za-z0-9_.@-]+";
  sliceOf = target: "cgtproxy-${target}.slice";

  cgtproxy-exec = pkgs.writeShellScriptBin "cgtproxy-exec" ''
    # cgtproxy-exec TARGET [--] CMD...: run CMD in a user scope in cgtproxy-TARGET.slice.
    exec ${exe} exec "$@"
  '';

  # A copy of the app's own desktop entry whose Exec= lines start the app through
  # `cgtproxy exec`; it shadows the original, having the same desktop-file ID.
  # DBusActivatable=true would let launchers bypass Exec=, so it is dropped.
  wrapDesktopFile =
    id: app:
    pkgs.runCommand "cgtproxy-${id}.desktop" { preferLocalBuild = true; } ''
      src=${app.package}/share/applications/${id}.desktop
      if [ ! -f "$src" ]; then
        echo "programs.cgtproxy.apps.${id}: $src does not exist; the attribute name must be the desktop-file ID" >&2
        exit 1
      fi
      sed -e 's|^Exec=|Exec=${exe} exec ${app.target} -- |' \
          -e '/^DBusActivatable=/d' "$src" > "$out"
    '';

  appModule = {
    options = {
      package = mkOption {
        type = types.package;
        description = "Package that provides `share/applications/<name>.desktop`.";
      };
      target = mkOption {
        type = targetType;
        example = "proxy";
        description = "Where the app's traffic goes: a target name, `direct` or `drop`.";
      };
    };
  };
in
{
  options.programs.cgtproxy = {
    enable = lib.mkEnableOption "per-application routing through the system's cgtproxy daemon";

    # pkgs.cgtproxy: the flake's modules provide it from overlays.default when the
    # user's pkgs lack it, so a package the user overlays in is the one used.
    package = lib.mkPackageOption pkgs "cgtproxy" { extraDescription = "For `cgtproxy exec`."; };

    targets = mkOption {
      type = types.listOf targetType;
      default = [ "proxy" ];
      example = lib.literalExpression "builtins.attrNames osConfig.services.cgtproxy.settings.tproxies";
      description = ''
        The TPROXY target names of the system's configuration; `direct` and `drop`
        are always available. On NixOS, take them from `osConfig` as in the example.
      '';
    };

    apps = mkOption {
      type = types.attrsOf (types.submodule appModule);
      default = { };
      example = lib.literalExpression ''
        { "firefox" = { package = pkgs.firefox; target = "proxy"; }; }
      '';
      description = ''
        Apps by desktop-file ID (the file name without `.desktop`) whose launcher
        entry is replaced by one that starts the app in the target's slice.
      '';
    };

    services = mkOption {
      type = types.attrsOf targetType;
      default = { };
      example = {
        syncthing = "direct";
      };
      description = ''
        User services (by unit name without `.service`) to run in a target's slice:
        a drop-in `NAME.service.d/cgtproxy-slice.conf` sets `Slice=`, so the unit
        itself may come from a package or from home-manager.
      '';
    };

    flatpaks = mkOption {
      type = types.attrsOf targetType;
      default = { };
      example = {
        "org.mozilla.firefox" = "proxy";
      };
      description = ''
        Flatpak apps by app ID. Flatpak already runs each app in its own
        `app-flatpak-<ID>-<N>.scope`, so no wrapper is needed: these become
        {option}`programs.cgtproxy.systemRules` for the system's configuration.
      '';
    };

    systemRules = mkOption {
      type = types.listOf (types.attrsOf (types.either types.str types.bool));
      readOnly = true;
      description = ''
        Rules matching {option}`programs.cgtproxy.flatpaks`, to add to the system's
        `services.cgtproxy.settings.rules` (rules are system-wide, so a user cannot
        install them), e.g. `config.home-manager.users.alice.programs.cgtproxy.systemRules`.
      '';
    };
  };

  config = lib.mkMerge [
  {
    # Pure data, so available whether or not the module is enabled.
    programs.cgtproxy.systemRules = lib.mapAttrsToList (
      id: target:
      {
        match = "/app-flatpak-${lib.escapeRegex id}-[0-9]+\\.scope$";
      }
      // (
        if target == "direct" then
          { direct = true; }
        else if target == "drop" then
          { drop = true; }
        else
          { tproxy = target; }
      )
    ) cfg.flatpaks;
  }
  (mkIf cfg.enable {
    assertions =
      lib.mapAttrsToList (id: app: {
        assertion = builtins.elem app.target allTargets;
        message = "programs.cgtproxy.apps.${id}.target = ${builtins.toJSON app.target}: not one of programs.cgtproxy.targets, direct, drop (${lib.concatStringsSep ", " allTargets}).";
      }) cfg.apps
      ++ lib.mapAttrsToList (name: target: {
        assertion = builtins.elem target allTargets;
        message = "programs.cgtproxy.services.${name} = ${builtins.toJSON target}: not one of programs.cgtproxy.targets, direct, drop (${lib.concatStringsSep ", " allTargets}).";
      }) cfg.services
      ++ lib.mapAttrsToList (id: target: {
        assertion = builtins.elem target allTargets;
        message = "programs.cgtproxy.flatpaks.\"${id}\" = ${builtins.toJSON target}: not one of programs.cgtproxy.targets, direct, drop (${lib.concatStringsSep ", " allTargets}).";
      }) cfg.flatpaks;

    home.packages = [ cgtproxy-exec ];

    # Declared and started with the user's manager, so that each slice's cgroup
    # exists (and the daemon has classified it) before the first app lands in it:
    # a scope then starts inside an already-routed slice. Left to systemd-run, the
    # slice would be created together with the app's scope, racing the daemon's
    # inotify for the app's first packets. (Also the place for resource limits.)
    systemd.user.slices = lib.listToAttrs (
      map (
        t:
        lib.nameValuePair "cgtproxy-${t}" {
          Unit.Description = "cgtproxy: apps whose traffic goes to ${t}";
          Install.WantedBy = [ "default.target" ];
        }
      ) allTargets
    );

    # Drop-ins, not systemd.user.services: a unit file of ours would hide the
    # unit that a package ships (leaving a service without ExecStart=), while a
    # drop-in adds to whichever unit is there, home-manager's own included.
    xdg.configFile = lib.mapAttrs' (
      name: target:
      lib.nameValuePair "systemd/user/${name}.service.d/cgtproxy-slice.conf" {
        text = ''
          [Service]
          Slice=${sliceOf target}
        '';
      }
    ) cfg.services;

    xdg.dataFile = lib.mapAttrs' (
      id: app: lib.nameValuePair "applications/${id}.desktop" { source = wrapDesktopFile id app; }
    ) cfg.apps;

  })
  ];
}
