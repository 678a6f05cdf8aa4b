"""Lints the VM tests' scripts as the NixOS test driver does before it runs one:
pyflakes, with the driver's names (and each machine's) as builtins. (The driver
also type-checks them with mypy against its own classes; that needs the driver.)

Usage: vm_lint.py SCRIPTS.json, the `scripts` of eval-vm.nix's result:
{ TEST: { "machines": [NAME, ...], "script": TEXT }, ... }. PYFLAKES names the
pyflakes command (default: pyflakes).
"""

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

# What the driver's Driver.test_symbols() defines for every test script.
DRIVER_SYMBOLS = [
    "start_all",
    "test_script",
    "machines_qemu",
    "machines_nspawn",
    "vlans",
    "driver",
    "log",
    "os",
    "create_machine",
    "subtest",
    "run_tests",
    "join_all",
    "retry",
    "serial_stdout_off",
    "serial_stdout_on",
    "polling_condition",
    "BaseMachine",
    "t",
    "debug",
]


def pythonize(name):
    # How the driver turns a node name into a Python name.
    return re.sub(r"^[^A-Za-z_]|[^A-Za-z0-9_]", "_", name)


def main():
    with open(sys.argv[1]) as f:
        tests = json.load(f)
    pyflakes = shlex.split(os.environ.get("PYFLAKES", "pyflakes"))
    failed = 0
    for name, test in sorted(tests.items()):
        machines = [pythonize(m) for m in test["machines"]]
        if len(machines) == 1:
            machines.append("machine")
        env = dict(os.environ, PYFLAKES_BUILTINS=",".join(machines + DRIVER_SYMBOLS))
        with tempfile.NamedTemporaryFile("w", suffix=f"-{name}.py") as script:
            script.write(test["script"])
            script.flush()
            r = subprocess.run(pyflakes + [script.name], env=env, capture_output=True, text=True)
        if r.returncode == 0:
            print(f"ok lint {name}")
        else:
            failed += 1
            print(f"FAIL lint {name}:\n{r.stdout}{r.stderr}", file=sys.stderr)
    print(f"VM test scripts: {len(tests) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
