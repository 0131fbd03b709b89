"""Growing a new adaptor: :func:`grow` picks an architecture from the search space
(:mod:`edge.learn.space`) under the device's budget and trains it with a trainer;
:class:`GrowthJob` does the same in a low-priority child process.

When the router (:mod:`edge.route.router`) has collected enough persistently novel inputs::

    budget = Budget.of(rt)                            # what rt's memory budget leaves for adapters; or
                                                      # Budget.of(profile), Budget(memory_mb=0.1, latency_ms=5.0)
    trainer = DeviceTrainer("encoder.onnx", rt.info)  # the exported model the runtime serves
    result = grow(rt, x, y, trainer=trainer, budget=budget, name="new-1", space=DEVICE_SPACE)
    rt.load_adapter(result.adapter)                   # under a memory budget: checked again, exactly (ConfigError)

**Trainer hook**: an object with ``train(arch, x, y, name) -> Adapter`` and optionally
``saliency(x, y, params) -> {param: |w * grad|}`` (the ``snip`` proxy needs it).
:class:`edge.learn.device_trainer.DeviceTrainer` trains on the device in numpy;
:class:`exporters.host_trainer.HostTrainer` trains on the host with torch.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from edge.errors import ConfigError
from edge.format.samples import batch_length
from edge.learn.space import PROXIES, SEARCH_SPACE, Arch, Budget, Candidate, candidates, measure_device, select

__all__ = ["GrowthJob", "GrowthResult", "grow"]


@dataclass(frozen=True)
class GrowthResult:
    adapter: object  # edge.format.adapter.Adapter
    chosen: Candidate
    candidates: list = field(default_factory=list)
    train_s: float = 0.0
    proxy: str = "snip"

    def as_dict(self) -> dict:
        return {
            "adapter": self.adapter.name,
            "chosen": self.chosen.as_dict(),
            "proxy": self.proxy,
            "train_s": round(self.train_s, 2),
            "candidates": [c.as_dict() for c in self.candidates],
        }


def grow(
    runtime,
    x: np.ndarray,
    y: np.ndarray,
    *,
    trainer,
    budget: Budget = Budget(),
    name: str = "grown",
    space: Sequence[Arch] = SEARCH_SPACE,
    proxy: str = "snip",
    knee: float = 0.9,
    device: Mapping[str, float] | None = None,
) -> GrowthResult:
    """Pick an architecture for labelled novel inputs ``(x, y)`` under ``budget`` and train it with ``trainer``."""
    _check_labelled(x, y)
    device = dict(device or measure_device(runtime, x))
    return _grow(runtime.info, x, y, trainer, budget, name, space, proxy, knee, device)


def _check_labelled(x, y: np.ndarray) -> None:
    y, n = np.asarray(y), batch_length(x)  # x: an array, or a dict of inputs (token ids and mask)
    if n != len(y) or not n:
        raise ConfigError(f"growth needs labelled inputs, got {n} inputs and {len(y)} labels")
    if (y < 0).any():
        raise ConfigError(f"{int((y < 0).sum())} of {len(y)} novel inputs have no label; growth trains supervised")


def _grow(info, x, y, trainer, budget, name, space, proxy, knee, device) -> GrowthResult:
    y = np.asarray(y, np.int64)
    cands = candidates(info, budget, device, space)
    feasible = [c for c in cands if c.fits]
    scores = dict(zip(map(id, feasible), PROXIES.get(proxy)(feasible, trainer, x, y))) if feasible else {}
    cands = [replace(c, proxy=scores.get(id(c), float("nan"))) for c in cands]
    chosen = select(cands, knee)
    t0 = time.perf_counter()
    adapter = trainer.train(chosen.arch, x, y, name)
    return GrowthResult(adapter, chosen, cands, time.perf_counter() - t0, proxy)


# -- in the background ---------------------------------------------------------------------------
class GrowthJob:
    """:func:`grow` in a child process at low CPU priority, so the stream keeps being served meanwhile.

        job = GrowthJob(rt, x, y, trainer=trainer, budget=budget, name="new-1", device=device, workdir=d)
        ...                                   # keep calling router.process(...)
        if job.done():
            result = job.result()             # the adapter, read back from the file the child wrote
            rt.load_adapter(result.adapter, name="new-1")

    The child (``spawn``: a fresh interpreter, nothing inherited) gets the trainer, the
    labelled inputs, the model's :class:`~edge.format.modelinfo.ModelInfo`, budget and device
    timings; it lowers its priority by ``nice`` (POSIX), runs the proxy search and the
    training, and writes ``<workdir>/<name>.safetensors`` (the standard adapter format,
    written atomically) and ``<name>.growth.json`` (the choice, the candidates, the
    training time, or the error). The parent reads them back with
    :func:`~edge.format.adapter.load_adapter`: nothing is unpickled on the way back. The
    device timings (``device``) must be measured beforehand (:func:`measure_device`),
    since the child has no runtime.
    """

    def __init__(
        self,
        runtime,
        x: np.ndarray,
        y: np.ndarray,
        *,
        trainer,
        workdir,
        device: Mapping[str, float],
        budget: Budget = Budget(),
        name: str = "grown",
        space: Sequence[Arch] = SEARCH_SPACE,
        proxy: str = "snip",
        knee: float = 0.9,
        nice: int = 10,
    ) -> None:
        import multiprocessing
        from pathlib import Path

        _check_labelled(x, y)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ConfigError(f"adapter name {name!r} must be letters, digits, '.', '_' or '-' (it names a file)")
        PROXIES.get(proxy)  # unknown names fail here, not in the child
        self.name, self.workdir = name, Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.adapter_path = self.workdir / f"{name}.safetensors"
        self.report_path = self.workdir / f"{name}.growth.json"
        for p in (self.adapter_path, self.report_path):
            p.unlink(missing_ok=True)
        xs = {k: np.asarray(v) for k, v in x.items()} if isinstance(x, Mapping) else np.asarray(x)
        args = (runtime.info, xs, np.asarray(y, np.int64), trainer, budget, name, tuple(space), proxy, knee)
        self.started = time.perf_counter()
        self._proc = multiprocessing.get_context("spawn").Process(
            target=_grow_child,
            args=(*args, dict(device), str(self.adapter_path), str(self.report_path), nice),
            name=f"edge-grow-{name}",
            daemon=True,
        )
        self._proc.start()
        self._result: GrowthResult | None = None

    def done(self) -> bool:
        """The child has finished (successfully or not)."""
        return self._result is not None or not self._proc.is_alive()

    def result(self, timeout: float | None = None) -> GrowthResult:
        """Wait for the child (up to ``timeout`` s) and return what it grew; raises what it failed with."""
        import json

        from edge.errors import EdgeError
        from edge.format.adapter import load_adapter

        if self._result is not None:
            return self._result
        self._proc.join(timeout)
        if self._proc.is_alive():
            raise TimeoutError(f"growing {self.name!r} is still running after {timeout} s")
        try:
            report = json.loads(self.report_path.read_text())
        except (OSError, ValueError) as e:
            raise EdgeError(
                f"growing {self.name!r} failed: the child exited with code {self._proc.exitcode} and left no "
                f"readable report ({e})"
            ) from None
        if "error" in report:
            raise (ConfigError if report.get("type") == "ConfigError" else EdgeError)(
                f"growing {self.name!r} failed in the child: {report['error']}"
            )
        adapter = load_adapter(self.adapter_path)
        cands = [Candidate(**{**c, "arch": Arch(**c["arch"]), "targets": tuple(c["targets"])}) for c in report["cands"]]
        self._result = GrowthResult(adapter, cands[report["chosen"]], cands, report["train_s"], report["proxy"])
        return self._result

    def cancel(self) -> None:
        """Stop the child (its partial files are never read)."""
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)


def _grow_child(info, x, y, trainer, budget, name, space, proxy, knee, device, adapter_path, report_path, nice):
    """Body of :class:`GrowthJob`'s child process."""
    import dataclasses
    import json
    import os
    import signal
    from pathlib import Path

    from edge.format.io import atomic_write_bytes

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when growing stops
    if nice and hasattr(os, "nice"):
        os.nice(nice)
    try:
        res = _grow(info, x, y, trainer, budget, name, space, proxy, knee, device)
        res.adapter.save(adapter_path)
        report = {
            "cands": [dataclasses.asdict(c) for c in res.candidates],
            "chosen": res.candidates.index(res.chosen),
            "train_s": res.train_s,
            "proxy": res.proxy,
        }
    except Exception as e:  # reported to the parent, which raises it there
        report = {"error": f"{type(e).__name__}: {e}", "type": type(e).__name__}
    atomic_write_bytes(Path(report_path), json.dumps(report).encode())
