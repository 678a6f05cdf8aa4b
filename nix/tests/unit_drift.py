#!/usr/bin/env python3
"""Compare a Nix hardening file (as JSON) with the [Service] section of a shipped unit.

usage: unit_drift.py HARDENING_JSON UNIT_FILE [NAME]
NAME names the hardening file in messages (default nix/hardening.nix).
Exit 0 when every hardening key has the same value in the unit and the unit sets no
other key beyond the operational ones listed below; 1 on drift, 2 on bad input.
"""
import json
import sys

# [Service] keys that are not sandboxing: they differ between the NixOS module
# (store paths, options) and the shipped unit by design.
OPERATIONAL = {
    "Type", "ExecStart", "ExecReload", "ExecStartPre", "Restart", "RestartSec",
    "Environment", "ConfigurationDirectory", "ReloadSignal", "TimeoutStopSec",
    "LimitNOFILE",
    # The forwarder's upstream passwords: the credential store here, the
    # secret's own path (LoadCredential=) in the NixOS module.
    "ImportCredential", "LoadCredential",
}

# Settings systemd merges as sets when given more than once (a drop-in adding
# to the unit's): compared as sets.
SETS = {"CapabilityBoundingSet", "AmbientCapabilities"}

TRUE = {"yes", "true", "on", "1"}
FALSE = {"no", "false", "off", "0"}


def norm(value):
    """One comparable string: booleans as yes/no, lists joined by spaces."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return " ".join(norm(v) for v in value)
    text = " ".join(str(value).split())
    low = text.lower()
    if low in TRUE:
        return "yes"
    if low in FALSE:
        return "no"
    return text


def service_section(path):
    """Key -> list of values, in order, from [Service]; continuation lines joined."""
    keys = {}
    section = None
    pending = ""
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = pending + raw.rstrip("\n")
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            stripped = line.strip()
            if not stripped or stripped[0] in "#;":
                continue
            if stripped.startswith("[") and stripped.endswith("]"):
                section = stripped[1:-1]
                continue
            if section != "Service":
                continue
            key, sep, value = stripped.partition("=")
            if not sep:
                raise ValueError(f"{path}: not a setting: {stripped!r}")
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def main(argv):
    if len(argv) not in (3, 4):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    name = argv[3] if len(argv) == 4 else "nix/hardening.nix"
    with open(argv[1], encoding="utf-8") as f:
        hardening = json.load(f)
    unit = service_section(argv[2])
    drift = []
    for key in sorted(hardening):
        want = norm(hardening[key])
        if key not in unit:
            drift.append(f"{key}: in {name} ({want!r}) but not in the unit")
            continue
        # An empty assignment resets a list setting: compare what follows the last one.
        values = unit[key]
        if "" in values:
            values = values[len(values) - 1 - values[::-1].index(""):][1:]
        got = " ".join(norm(v) for v in values)
        if key in SETS:
            got, want = " ".join(sorted(set(got.split()))), " ".join(sorted(set(want.split())))
        if got != want:
            drift.append(f"{key}: {name} has {want!r}, the unit has {got!r}")
    for key in sorted(set(unit) - set(hardening) - OPERATIONAL):
        drift.append(f"{key}: set in the unit ({' '.join(unit[key])!r}) but not in {name}")
    if drift:
        print(f"drift between {name} and {argv[2]}:")
        for line in drift:
            print("  " + line)
        return 1
    print(f"unit-drift: {len(hardening)} settings of {name} agree with {argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
