"""After `pip install --no-deps .` in the arm64 root: the installed package (not the source tree) finds its profiles.

Run from outside the source tree: ``cd / && python /src/scripts/arm/check_installed.py``.
"""

from __future__ import annotations

import platform
import sys

import edge
from edge.devices import list_profiles, packaged_dir

SHIPPED = {"rpi4", "rpi5", "jetson-orin-nano", "qualcomm-qnn", "coral-edgetpu", "x86-dev"}


def main() -> int:
    where = packaged_dir()
    names = {p.name for p in list_profiles()}
    print(f"edge {edge.__version__} from {edge.__file__} on {platform.machine()}; profiles from {where}")
    if "site-packages" not in edge.__file__:
        print("error: edge was imported from the source tree, not the installed package", file=sys.stderr)
        return 1
    missing = sorted(SHIPPED - names)
    if missing:
        print(
            f"error: the installed package lacks the profiles {missing}; ship devices/*.yaml as package data "
            "(edge/devices/profiles, see pyproject.toml)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
