"""Print the device-side requirements of pyproject.toml, one per line: [project] dependencies plus extras.

    python3 scripts/arm/requirements.py test,litert     # dependencies + those extras

Refuses the "host" extra, and leaves out (saying so on stderr) any requirement that pulls
torch, such as peft in the test extra: the arm64 root is a device install, and tests that
need those packages are host tests (scripts/arm/device_only.py leaves them out).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"

#: Packages that are torch or depend on it.
PULLS_TORCH = {"torch", "torchvision", "peft", "transformers", "sentence-transformers", "litert-torch"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;@]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def main(argv: list[str]) -> int:
    extras = [e for arg in argv for e in arg.split(",") if e]
    if "host" in extras:
        print("the host extra pulls torch; the arm64 root is a device install", file=sys.stderr)
        return 2
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    known = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in known]
    if unknown:
        print(f"unknown extra(s) {unknown}; pyproject.toml has: {', '.join(known)}", file=sys.stderr)
        return 2
    out, seen = [], set()
    for req in [*project["dependencies"], *(r for e in extras for r in known[e])]:
        name = _name(req)
        if name in PULLS_TORCH:
            print(f"requirements: left out {req} (pulls torch)", file=sys.stderr)
        elif name not in seen:
            seen.add(name)
            out.append(req)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
