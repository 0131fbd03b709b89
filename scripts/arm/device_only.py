"""pytest plugin for `make test-arm`: run tests/device/ as a device install can.

The device tests live in tests/device/ (host tests in tests/host/, the lab's in tests/lab/).
As a guard, a module there is still left out when it imports, at its top level, a package
that only the host install has (torch, the exporters, the lab, scikit-learn); a few named
tests are left out because emulation distorts what they measure (resident memory). What
was left out is printed in the summary, so a skipped module is never silent.

Load with ``PYTHONPATH=scripts/arm python -m pytest -p device_only``.
"""

from __future__ import annotations

import ast
from pathlib import Path

#: Top-level imports that mark a test module as host-only, with the reason shown.
HOST_ONLY = {
    "torch": "needs torch (host install)",
    "exporters": "tests the torch exporters (host install)",
    "peft": "needs peft, which pulls torch (host install)",
    "transformers": "needs transformers, which pulls torch (host install)",
    "sklearn": "needs scikit-learn (demo extra)",
    "lab": "uses the lab (demo, datasets, benchmarks: host install)",
}
#: Test modules that are not about the device at all.
NOT_DEVICE = {"test_lint.py": "lint runs once on the host (make lint)"}
#: Tests (file::function, every parametrization) whose figure emulation distorts, with the reason shown.
NOT_UNDER_EMULATION = {
    "test_concurrency.py::test_switching_does_not_grow_memory": (
        "resident memory under qemu-user includes its cache of translated code, which grows as XNNPACK "
        "generates kernels for each new interpreter (passes natively)"
    ),
}

_left_out: dict[str, str] = {}


def _host_reason(path: Path) -> str | None:
    if path.name in NOT_DEVICE:
        return NOT_DEVICE[path.name]
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body:  # top level only: imports inside tests are the test's own business
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            for prefix, reason in HOST_ONLY.items():
                if name == prefix or name.startswith(prefix + "."):
                    return reason
    return None


def pytest_ignore_collect(collection_path: Path, config):
    if collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    reason = _host_reason(collection_path)
    if reason is None:
        return None
    _left_out[collection_path.name] = reason
    return True


def pytest_collection_modifyitems(session, config, items):
    keep, drop = [], []
    for item in items:
        key = f"{item.path.name}::{item.originalname}"
        if key in NOT_UNDER_EMULATION:
            drop.append(item)
            _left_out[key] = NOT_UNDER_EMULATION[key]
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _left_out:
        terminalreporter.write_sep("-", "left out of the device-side run")
        for name, reason in sorted(_left_out.items()):
            terminalreporter.write_line(f"{name}: {reason}")
