"""Peers of fused-mode switching, measured side by side on one exported model (device side, no torch).

* ``ort_multi_lora`` -- onnxruntime's own multi-LoRA API (ORT >= 1.20): the model gets a LoRA
  branch ``x @ A @ B`` beside every target MatMul, with ``A`` and ``B`` as *overridable
  initializers* (graph inputs with zero defaults, see :func:`add_lora_inputs`); each adapter is
  an ``.onnx_adapter`` file written with ``onnxruntime.AdapterFormat`` and loaded with
  ``onnxruntime.LoraAdapter``; a switch is ``RunOptions.add_active_adapter``.
* ``session_recreate`` -- one merged model file per adapter; a switch builds a new plain
  session from it (what a runtime without in-place updates does).
* the project's default strategy (``Runtime``, SHiRA adapters at ``density``), for reference.

Adapters have the same trainable count per target tensor: SHiRA at ``density``, LoRA rank
``round(density * m * n / (m + n))``. Switch (A -> B) and apply (base -> A) are call to return,
as in :mod:`lab.bench_switch`, so a result's ``peers`` entries fit its ``strategies`` table; inference is the
steady state, measured in interleaved rounds against a plain static session of the base model
(``overhead_pct``). Memory (``rss_mb``, ``peak_rss_mb``) is measured in a fresh process per
contestant, as resident memory after setup and two switches minus that of a process that
imported the same modules and loaded nothing (Linux ``/proc``; ``None`` elsewhere).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edge.errors import ConfigError, EdgeError
from edge.machine import p50, reset_peak_rss, status_mb, time_calls
from lab.benchmarks import default_targets, random_shira

__all__ = ["PEERS", "add_lora_inputs", "bench_peers", "ort_multi_lora", "session_recreate", "markdown"]

PEERS = ("ort_multi_lora", "session_recreate")


def add_lora_inputs(model, info, targets: Mapping[str, int]):
    """An ONNX model with a LoRA branch on each target weight, its ``A``/``B`` as overridable initializers.

    ``targets`` maps parameter names (``ModelInfo.tensors`` keys) to ranks. For a weight stored
    ``[k, n]`` and read by ``MatMul(x, W)``, adds ``MatMul(MatMul(x, W.lora_A), W.lora_B)`` to
    the product, with ``W.lora_A`` ``[k, r]`` and ``W.lora_B`` ``[r, n]`` zero initializers that
    are also graph inputs, so onnxruntime's ``LoraAdapter`` can override them per run.
    Returns a new ``onnx.ModelProto``; raises :class:`ConfigError` for weights not read that way.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    stored = {info.tensors[t].initializer: (t, r) for t, r in targets.items()}
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    renames: dict[str, str] = {}
    nodes, done = [], set()
    for node in graph.node:
        nodes.append(node)
        w = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w not in stored:
            continue
        param, r = stored[w]
        k, n = shapes[w]
        a, b, out = f"{param}.lora_A", f"{param}.lora_B", node.output[0]
        for name, shape in ((a, (k, r)), (b, (r, n))):
            graph.initializer.append(numpy_helper.from_array(np.zeros(shape, np.float32), name))
            graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        nodes += [
            helper.make_node("MatMul", [node.input[0], a], [f"{a}.out"]),
            helper.make_node("MatMul", [f"{a}.out", b], [f"{b}.out"]),
            helper.make_node("Add", [out, f"{b}.out"], [f"{out}.lora"]),
        ]
        renames[out] = f"{out}.lora"
        done.add(w)
    missing = sorted(stored[w][0] for w in set(stored) - done)
    if missing:
        raise ConfigError(f"targets {missing[:5]} are not read as MatMul(x, W); cannot add LoRA inputs for them")
    added = {f"{n}.lora" for n in renames}
    for node in nodes:
        if any(o in added for o in node.output):
            continue
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for o in graph.output:
        if o.name in renames:
            raise ConfigError(f"target output {o.name!r} is a graph output; cannot add a LoRA branch after it")
    del graph.node[:]
    graph.node.extend(nodes)
    return model


# -- contestants ------------------------------------------------------------------------------------------------------


class _Static:
    """A plain session of the base model: the speed reference (cannot switch)."""

    def __init__(self, files, threads):
        self.sess = _session(files["base"], threads)

    def switch(self, which):
        pass

    def run(self, feeds):
        return self.sess.run(None, feeds)

    def settle(self):
        pass


class _Default:
    """The project's Runtime with its default strategy and two SHiRA adapters."""

    def __init__(self, files, threads):
        from edge.runtime import Runtime

        self.rt = Runtime(files["base"], threads=threads)
        for which in "AB":
            self.rt.load_adapter(files[f"shira_{which}"], name=which)
        self.name = self.rt.strategy

    def switch(self, which):
        self.rt.switch(which)

    def run(self, feeds):
        return self.rt.run(feeds)

    def settle(self):
        self.rt.wait_settled()


class _OrtMultiLora:
    """onnxruntime's LoRA API: adapters loaded once, a switch picks the active one in RunOptions."""

    def __init__(self, files, threads):
        import onnxruntime as ort

        self._ort = ort
        self.sess = _session(files["lora_model"], threads)
        self.adapters = {}
        self.load_ms = []
        for which in "AB":
            t0 = time.perf_counter()
            ad = ort.LoraAdapter()
            ad.Load(str(files[f"lora_{which}"]))
            self.load_ms.append((time.perf_counter() - t0) * 1e3)
            self.adapters[which] = ad
        self.options = None

    def switch(self, which):
        ro = self._ort.RunOptions()
        if which is not None:
            ro.add_active_adapter(self.adapters[which])
        self.options = ro

    def run(self, feeds):
        return self.sess.run(None, feeds, self.options)

    def settle(self):
        pass


class _Recreate:
    """One merged model file per adapter; a switch builds a new session (the old one is dropped after)."""

    def __init__(self, files, threads):
        self.files, self.threads = files, threads
        self.sess = _session(files["merged_A"], threads)

    def switch(self, which):
        self.sess = _session(self.files["base" if which is None else f"merged_{which}"], self.threads)

    def run(self, feeds):
        return self.sess.run(None, feeds)

    def settle(self):
        pass


_KINDS = {"static": _Static, "default": _Default, "ort_multi_lora": _OrtMultiLora, "session_recreate": _Recreate}


def _session(path, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # the "initializer appears in graph inputs" notice is the point here
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# -- benchmark --------------------------------------------------------------------------------------------------------


def bench_peers(
    model_path: str | Path,
    feeds: Mapping[str, np.ndarray],
    *,
    peers: tuple[str, ...] = ("default", *PEERS),
    density: float = 0.01,
    targets: str | None = None,
    threads: int | None = None,
    runs: int = 200,
    rounds: int = 5,
    switches: int = 20,
    memory: bool = True,
    progress: bool = True,
) -> dict:
    """Switch time, steady inference overhead vs a static session, and memory, for each of ``peers``."""
    from edge.progress import bar
    from edge.runtime import Runtime

    unknown = [p for p in peers if p not in _KINDS or p == "static"]
    if unknown:
        raise ConfigError(f"unknown peer(s) {unknown}; known: default, {', '.join(PEERS)}")
    feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
    steps = bar(total=2 + len(peers) + (len(peers) + 1 if memory else 0), desc="bench peers", disable=not progress)
    static_rss: dict = {}
    with Runtime(model_path, threads=threads) as probe:
        info = probe.info
        threads = probe.backend.threads  # every peer on the threads the runtime resolved (1 for a tiny model)
        names = default_targets(info, targets)
        base = {k: probe.weights(k) for k in names}
    with tempfile.TemporaryDirectory() as tmp:
        files, ranks = _prepare(Path(model_path), info, base, names, density, Path(tmp))
        steps.update()
        live = {"static": _Static(files, threads)}
        result: dict[str, dict] = {}
        for p in peers:
            live[p] = c = _KINDS[p](files, threads)
            result[p] = _time_switches(c, feeds, switches)
            if p == "ort_multi_lora":
                result[p]["adapter_load_ms_p50"] = p50(c.load_ms)
            steps.update()
        times = {k: [] for k in live}
        per_round = max(1, runs // rounds)
        for _ in range(rounds):
            for k, c in live.items():
                times[k] += time_calls(lambda c=c: c.run(feeds), per_round)
        steps.update()
        static_ms = p50(times["static"])
        for p in peers:
            result[p]["infer_ms_p50"] = p50(times[p])
            result[p]["overhead_pct"] = 100.0 * (p50(times[p]) / static_ms - 1.0)
        default_strategy = getattr(live.get("default"), "name", None)
        del live
        if memory:
            np.savez(Path(tmp) / "feeds.npz", **feeds)
            files["feeds"] = Path(tmp) / "feeds.npz"
            baseline = _memory("baseline", files, threads)
            static = _memory("static", files, threads)
            static_rss = {k: (static[k] - baseline[k] if static.get(k) is not None else None) for k in static}
            steps.update()
            for p in peers:
                m = _memory(p, files, threads)
                result[p].update(
                    {k: (m[k] - baseline[k] if m.get(k) is not None else None) for k in ("rss_mb", "peak_rss_mb")}
                )
                steps.update()
    steps.close()
    if default_strategy:
        result[f"default ({default_strategy})"] = result.pop("default")
    return {
        "model": info.name,
        "density": density,
        "targets": len(names),
        "shira_nnz": int(sum(round(density * v.size) for v in base.values())),
        "lora_params": int(sum(r * sum(base[k].shape) for k, r in ranks.items())),
        "lora_rank_p50": int(np.median(list(ranks.values()))),
        "threads": threads,
        "static_infer_ms_p50": static_ms,
        "static_rss_mb": static_rss.get("rss_mb"),
        "peers": result,
    }


def ort_multi_lora(model_path, feeds, **kwargs) -> dict:
    """onnxruntime's multi-LoRA API alone (with the static reference): ``{"switch_ms_p50", ...}``."""
    r = bench_peers(model_path, feeds, peers=("ort_multi_lora",), **kwargs)
    return {**r["peers"]["ort_multi_lora"], "static_infer_ms_p50": r["static_infer_ms_p50"]}


def session_recreate(model_path, feeds, **kwargs) -> dict:
    """Session re-creation per switch alone (with the static reference)."""
    r = bench_peers(model_path, feeds, peers=("session_recreate",), **kwargs)
    return {**r["peers"]["session_recreate"], "static_infer_ms_p50": r["static_infer_ms_p50"]}


def markdown(result: dict) -> str:
    """A Markdown table of one :func:`bench_peers` result (for BENCHMARKS.md)."""

    def mb(v):
        return "-" if v is None else f"{v:.0f}"

    lines = [
        f"### Peers on {result['model']} ({result['targets']} target tensors; SHiRA density "
        f"{result['density']:.0%} = {result['shira_nnz']:,} entries; LoRA rank p50 {result['lora_rank_p50']} = "
        f"{result['lora_params']:,} params)",
        "",
        f"static session (the reference): {result['static_infer_ms_p50']:.3f} ms/inference, "
        f"{mb(result.get('static_rss_mb'))} MB RSS.",
        "",
        "| contestant | switch A->B ms p50 | apply base->A ms p50 | first inference after switch ms | "
        "steady inference ms p50 | overhead vs static | RSS MB | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in result["peers"].items():
        lines.append(
            f"| {name} | {v['switch_ms_p50']:.3f} | {v['apply_ms_p50']:.3f} | {v['first_infer_ms_p50']:.3f} | "
            f"{v['infer_ms_p50']:.3f} | {v['overhead_pct']:+.1f} % | {mb(v.get('rss_mb'))} | "
            f"{mb(v.get('peak_rss_mb'))} |"
        )
    lines += [
        "",
        "RSS: resident memory of a fresh process after setup and two switches, minus a process that only imported "
        "the modules. ort_multi_lora keeps both adapters loaded; session_recreate holds one session (two while "
        "switching).",
        "",
    ]
    return "\n".join(lines)


# -- helpers ----------------------------------------------------------------------------------------------------------


def _time_switches(c, feeds, switches: int) -> dict:
    """As lab.bench_switch: apply = base -> A, switch = A -> B (call to return), then the first inference."""
    sw, apply, first = [], [], []
    for i in range(switches + 2):
        c.switch(None)
        c.settle()
        t0 = time.perf_counter()
        c.switch("A")
        t1 = time.perf_counter()
        c.run(feeds)
        c.settle()
        t2 = time.perf_counter()
        c.switch("B")
        t3 = time.perf_counter()
        c.run(feeds)
        t4 = time.perf_counter()
        c.settle()
        if i >= 2:  # the first two rounds warm caches
            apply.append((t1 - t0) * 1e3)
            sw.append((t3 - t2) * 1e3)
            first.append((t4 - t3) * 1e3)
    return {"switch_ms_p50": p50(sw), "apply_ms_p50": p50(apply), "first_infer_ms_p50": p50(first)}


def _prepare(path: Path, info, base, names, density: float, tmp: Path):
    """Every file the contestants need: SHiRA adapters, LoRA model and adapters, merged models."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    ranks = {k: max(1, round(density * base[k].size / sum(base[k].shape))) for k in names}
    files = {"base": path}
    for seed, which in ((1, "A"), (2, "B")):
        files[f"shira_{which}"] = random_shira(info, names, density, seed=seed, name=which).save(
            tmp / f"shira_{which}.safetensors"
        )
    lora = add_lora_inputs(proto, info, ranks)
    files["lora_model"] = tmp / "lora.onnx"
    onnx.save(lora, str(files["lora_model"]))
    rng = np.random.default_rng(0)
    for which in "AB":
        params, merged = {}, {}
        for k, r in ranks.items():
            t = info.tensors[k]
            w = t.to_stored(base[k]).reshape(t.stored_shape)  # stored layout [k, n], read as MatMul(x, W)
            a = (rng.standard_normal((w.shape[0], r)) / np.sqrt(w.shape[0])).astype(np.float32)
            b = (rng.standard_normal((r, w.shape[1])) * 1e-2).astype(np.float32)
            params[f"{k}.lora_A"] = ort.OrtValue.ortvalue_from_numpy(a)
            params[f"{k}.lora_B"] = ort.OrtValue.ortvalue_from_numpy(b)
            merged[t.initializer] = w + a @ b
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(1)
        fmt.set_parameters(params)
        files[f"lora_{which}"] = tmp / f"lora_{which}.onnx_adapter"
        fmt.export_adapter(str(files[f"lora_{which}"]))
        m = onnx.ModelProto.FromString(proto.SerializeToString())
        for init in m.graph.initializer:
            if init.name in merged:
                init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(merged[init.name]), init.name))
        files[f"merged_{which}"] = tmp / f"merged_{which}.onnx"
        onnx.save(m, str(files[f"merged_{which}"]))
    return files, ranks


def _memory(kind: str, files: Mapping[str, Path], threads) -> dict:
    """RSS and peak RSS (MB) of a fresh process that set up ``kind`` and switched twice."""
    spec = json.dumps({"kind": kind, "files": {k: str(v) for k, v in files.items()}, "threads": threads})
    code = "import sys, lab.bench_peers as b; b._memory_child(sys.argv[1])"
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, cwd=root, timeout=600)
    if r.returncode != 0:
        raise EdgeError(f"memory probe for {kind} failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _memory_child(spec: str) -> None:
    import onnxruntime  # noqa: F401  (the baseline imports what every contestant imports)

    import edge.runtime  # noqa: F401

    s = json.loads(spec)
    files = {k: Path(v) for k, v in s["files"].items()}
    feeds = dict(np.load(files["feeds"], allow_pickle=False))
    reset_peak_rss()
    if s["kind"] != "baseline":
        c = _KINDS[s["kind"]](files, s["threads"])
        for which in "ABA":
            c.switch(which)
            c.run(feeds)
            c.settle()
    print(json.dumps({"rss_mb": status_mb("VmRSS"), "peak_rss_mb": status_mb("VmHWM")}))
