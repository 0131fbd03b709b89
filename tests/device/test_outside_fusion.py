"""Property-based audit of fused-mode semantics, from outside: random adapters and random sequences of
load/switch/unload/run/close on every backend and strategy, against a numpy reference model of the documented
rule (README "Guarantees"; :mod:`edge.fusion`; :mod:`edge.runtime`).

Reference, per touched entry, over the active adapters in the order given:
float: ``w = base + acc``, ``acc = 0 + sum_i(float32(alpha_i) * delta_i)`` in float32 (a folded channel scale
applied to the delta first); quantized: ``q = base + rint(acc)`` with ``acc`` in grid steps (an integer adapter:
``qvalues - base``; a float one: ``delta / scale``), out of the weight's range (symmetric int8: [-127, 127])
-> ``SaturationError`` (or clipped with
``clip``); a fusion that is not finite -> ``ConfigError``; a failed call changes nothing. Weights are compared
bit for bit (``-0.0`` and NaN payloads included) and outputs against a plain onnxruntime / LiteRT session on a
file with exactly those weights written in (after ``wait_settled``).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _tiny  # noqa: E402
import _tiny_tflite  # noqa: E402

from edge.errors import AdapterMismatchError, ConfigError, EdgeError, FormatError, RuntimeClosedError  # noqa: E402
from edge.format.adapter import Adapter, SparseDelta  # noqa: E402
from edge.format.modelinfo import TensorInfo  # noqa: E402
from edge.format.qrange import weight_bounds  # noqa: E402
from edge.fusion import SaturationError, normalise  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
CACHE = Path.home() / ".cache" / "edge"
VIT, CNN = CACHE / "digits-07d9c19ac5e7", CACHE / "digits-cnn-cbd0669b2c88"
STRATEGIES = {".onnx": ("hybrid", "bound", "rebuild"), ".tflite": ("hybrid", "rebuild", "builtin")}
ALPHAS = (1.0, 1.0, 0.5, -1.0, 0.0, -0.0, 2.5, 1e-3, 1e30)
# README: onnxruntime's unprepacked kernels (bound) and LiteRT's built-in ones (builtin, no XNNPACK) can differ from a
# plain session in the last bits: compared bit for bit with a fresh runtime of the strategy, and close to plain on
# float models with weights of sane size (with a 3e38 weight kernels overflow differently: 1e17 against 0.1).
# Not on int8 ones (KERNEL_GAP, a finding of this audit): on the dynamic-range int8 ViT (.tflite) the built-in
# kernels differ from XNNPACK by 4.4e-2 on the base logits (up to 1.8 with an adapter clipped to -128 before
# symmetric int8 weights were held to [-127, 127]: tests/device/test_int8range_I21_litert.py), and hybrid's settle
# window runs them too.
UNPACKED = ("bound", "builtin")
SCALE = int(os.environ.get("EDGE_AUDIT_SCALE", "1"))  # more examples for a longer hunt (the suite runs 1)
TINY = float(np.finfo(np.float32).smallest_subnormal)


def _first(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern)) if folder.is_dir() else []
    return found[0] if found else None


MODELS = {
    "tiny": GOLDEN / "tiny-mlp-v1.onnx",
    "tiny-int8": GOLDEN / "tiny-mlp-int8-v1.onnx",
    "tiny-tflite": GOLDEN / "tiny-mlp-v1.tflite",
    "vit": VIT / "encoder.onnx",
    "vit-tflite": VIT / "encoder.tflite",
    "vit-int8-dynamic": _first(VIT / "quantized", "encoder.dynamic.*.onnx"),
    "vit-int8-static": _first(VIT / "quantized", "encoder.static.*.onnx"),
    "vit-int8-tflite": _first(VIT / "quantized", "encoder.dynamic.*.tflite"),
    "vit-int8-static-tflite": _first(VIT / "quantized", "encoder.static.*.tflite"),
    "cnn": CNN / "encoder.onnx",
    "cnn-tflite": CNN / "encoder.tflite",
    "cnn-int8": _first(CNN / "quantized", "encoder.static.*.onnx"),
    "cnn-int8-tflite": _first(CNN / "quantized", "encoder.dynamic.*.tflite"),
}


# -- the reference model -----------------------------------------------------------------------------------------
def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view({4: np.uint32, 1: np.uint8}[a.dtype.itemsize]) if a.dtype.kind == "f" else a


def _steps(t, d: SparseDelta, base_at: np.ndarray, scale) -> np.ndarray:
    if t.quant is None:
        return np.asarray(t.stored_delta(d.indices, d.values), np.float32)
    if d.qvalues is not None:
        return (d.qvalues.astype(np.int64) - base_at).astype(np.float32)
    return t.grid_units(d.indices, d.values, scale)


def reference(m, pairs, clip: bool) -> tuple[dict[str, np.ndarray], int]:
    """The weights ``pairs`` ((adapter, alpha) in order) fuse into, and entries clipped; raises as the runtime
    documents (ConfigError: not finite; SaturationError: out of the integer range without clip)."""
    out, clipped = {k: v.copy() for k, v in m.base.items()}, 0
    for k, t in m.info.tensors.items():
        ds = [(d, a) for ad, a in pairs for n, d in ad.tensors.items() if n == k]
        if not ds:
            continue
        base = m.base[k].reshape(-1)
        flats = [np.ravel_multi_index(tuple(d.indices.astype(np.int64)), t.shape) for d, _ in ds]
        pos = np.unique(np.concatenate(flats))
        acc = np.zeros(pos.size, np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            for (d, a), f in zip(ds, flats):
                acc[np.searchsorted(pos, f)] += np.float32(a) * _steps(t, d, base[f], m.scales.get(k))
        if base.dtype.kind == "f":
            with np.errstate(over="ignore", invalid="ignore"):
                new = base[pos] + acc
            if not np.isfinite(new).all():
                raise ConfigError("not finite")
        else:
            if not np.isfinite(acc).all():
                raise ConfigError("not finite")
            lo, hi = m.bounds[k]
            q = base[pos].astype(np.int64) + np.rint(np.clip(acc, -(1 << 20), 1 << 20)).astype(np.int64)
            n = int(((q < lo) | (q > hi)).sum())
            if n and not clip:
                raise SaturationError("saturates")
            clipped += n
            new = np.clip(q, lo, hi).astype(base.dtype)
        w = out[k].reshape(-1)
        w[pos] = new
    return out, clipped


class Model:
    """One model file: its metadata, base weights from the file, scales, a feed and plain sessions to compare."""

    def __init__(self, path: Path) -> None:
        self.path, self.tflite = path, path.suffix == ".tflite"
        self.tiny = _tiny_tflite if self.tflite else _tiny
        with Runtime(path, strategy="rebuild") as rt:
            self.info, self.threads = rt.info, rt.backend.threads
            self.scales = {k: rt.backend.constant(t.quant.scale) for k, t in rt.info.tensors.items() if t.quant}
            self.bounds = {  # a symmetric int8 weight (zero point 0) holds [-127, 127] (edge.format.qrange)
                k: weight_bounds(t.quant.dtype, rt.backend.constant(t.quant.zero_point))
                for k, t in rt.info.tensors.items()
                if t.quant
            }
            self.outputs = list(rt.backend.output_names)
        self.targets = sorted(k for k, t in self.info.tensors.items() if not t.slot and not t.head)
        self.base = {k: v for k, v in self.tiny.base_weights(path, self.info).items() if k in self.targets}
        self.quantized = any(v.dtype.kind in "iu" for v in self.base.values())
        self.feed, self._plain = None, {}
        self.feed = self._make_feed()

    def _make_feed(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        if self.tflite:
            from ai_edge_litert.interpreter import Interpreter

            it = Interpreter(model_content=self.path.read_bytes())
            specs = [(d["name"], [max(1, int(n)) for n in d["shape"]], d["dtype"]) for d in it.get_input_details()]
        else:
            import onnxruntime as ort

            s = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
            specs = [
                (i.name, [n if isinstance(n, int) and n > 0 else 1 for n in i.shape], np.float32)
                for i in s.get_inputs()
            ]
        return {n: rng.standard_normal(shape).astype(dtype) for n, shape, dtype in specs}

    def plain(self, weights: dict[str, np.ndarray], tmp: Path, strategy: str | None = None) -> dict[str, np.ndarray]:
        """Outputs of a plain session (``strategy``: a fresh ``Runtime`` with it) on a copy of the file with
        ``weights`` written in (cached by content)."""
        blob = b"".join(np.ascontiguousarray(weights[k]).tobytes() for k in self.targets)
        key = hashlib.sha256(blob + str(strategy).encode()).hexdigest()
        if key in self._plain:
            return self._plain[key]
        full = {k: weights.get(k, b) for k, b in self.tiny.base_weights(self.path, self.info).items()}
        out = tmp / f"ref-{key[:12]}{self.path.suffix}"
        self.tiny.write_merged(self.path, self.info, full, out)
        if strategy is not None:
            backend = "tflite" if self.tflite else "onnxruntime"
            with Runtime(out, backend=backend, strategy=strategy, verify=False) as fresh:
                got = fresh.run(self.feed)
        elif self.tflite:
            from ai_edge_litert.interpreter import Interpreter

            it = Interpreter(model_content=out.read_bytes(), num_threads=self.threads or None)
            for d in it.get_input_details():
                it.resize_tensor_input(d["index"], self.feed[d["name"]].shape)
            it.allocate_tensors()
            for d in it.get_input_details():
                it.set_tensor(d["index"], self.feed[d["name"]])
            it.invoke()
            got = {d["name"]: it.get_tensor(d["index"]).copy() for d in it.get_output_details()}
        else:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads or 0
            sess = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
            got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, self.feed)))
        self._plain[key] = got
        out.unlink()
        return got


_MODELS: dict[str, Model] = {}
SEEN: Counter = Counter()  # (call, outcome) -> count: what the sequences reached


#: small stand-ins for the cached digits models, built in-session (``_insession.small_models``), which CI runs:
#: a conv net with a folded BatchNorm scale on each backend, int8 twins of each kind (onnxruntime dynamic and static
#: QDQ; LiteRT dynamic range and full integer), and float adapters of the float models for the int8 twins
SMALL = {
    "conv": "cnn",
    "conv-tflite": "cnn-tflite",
    "mlp-int8-dynamic": "vit-int8-dynamic",
    "mlp-int8-static": "vit-int8-static",
    "conv-int8-static": "cnn-int8",
    "mlp-int8-tflite": "vit-int8-tflite",
    "mlp-int8-static-tflite": "vit-int8-static-tflite",
}  # stand-in -> the cached model it stands in for
FLOAT_ADAPTERS = {"mlp-int8-dynamic": "mlp", "mlp-int8-static": "mlp", "conv-int8-static": "conv"}


@pytest.fixture(autouse=True)
def _small_models(small_models):
    MODELS.update({k: small_models[k] for k in SMALL})
    MODELS.update({f"{k}.float-adapters": small_models[f"{v}-float-adapters"] for k, v in FLOAT_ADAPTERS.items()})


def cached(cases: list) -> list:
    """The cases (keys, or (key, strategy)) of the demo's models found in the cache; with none cached (a fresh
    checkout, CI), one case that skips saying so: their properties run on the SMALL stand-ins there."""
    found = [c for c in cases if MODELS[c[0] if isinstance(c, tuple) else c] is not None]
    found = [c for c in found if MODELS[c[0] if isinstance(c, tuple) else c].exists()]
    why = f"no digits model cached in {CACHE} (run `edge demo` / `make bench` once); the small stand-ins ran"
    width = len(cases[0]) if isinstance(cases[0], tuple) else 1
    return found or [pytest.param(*[None] * width, marks=pytest.mark.skip(reason=why), id="not-cached")]


def model(key: str) -> Model:
    path = MODELS[key]
    if path is None or not path.exists():
        pytest.skip(f"{key}: no cached file (run `edge demo` / `make bench` once to create it)")
    if key not in _MODELS:
        _MODELS[key] = Model(path)
    return _MODELS[key]


# -- random adapters ---------------------------------------------------------------------------------------------
def _values(rng, n: int, kind: str) -> np.ndarray:
    v = rng.standard_normal(n).astype(np.float32) * np.float32(0.05)
    if kind == "special":  # zeros, -0.0, subnormals, negatives, and one large value
        pick = rng.integers(0, 5, n)
        v = np.where(pick == 0, np.float32(0.0), v)
        v = np.where(pick == 1, np.float32(-0.0), v)
        v = np.where(pick == 2, np.float32(TINY) * rng.integers(1, 9, n).astype(np.float32), v)
        v = np.where(pick == 3, -np.abs(v), v)
    elif kind == "big":  # off the integer range of an int8 base (requantized), still finite on a float one
        v = v * np.float32(400)
    elif kind == "huge":
        v[rng.integers(0, n)] = np.float32(3e38)
    return v.astype(np.float32)


def make_adapter(m: Model, name: str, seed: int, shared, kind: str, integer: bool) -> Adapter:
    """Sparse entries of one or two targets, in unsorted order. ``shared``: True, positions from a pool every
    adapter draws from (overlaps), the last entry always among them; "same": exactly the positions every "same"
    adapter writes (one mask: the runtime shares their base values and switches between them in one pass);
    "blocks": aligned runs of 16 entries; "whole": every entry; False: anywhere. On a quantized base ``integer``
    gives int8 ``qvalues``."""
    rng = np.random.default_rng(seed)
    tensors, shapes = {}, {}
    same = shared == "same"
    pick = np.random.default_rng(5) if same else rng
    for k in pick.choice(m.targets, size=min(len(m.targets), int(pick.integers(1, 3))), replace=False):
        t = m.info.tensors[k]
        size = int(np.prod(t.shape))
        pool = np.random.default_rng(7).choice(size, min(size, 24), replace=False) if shared else np.arange(size)
        n = int(pick.integers(1, min(len(pool), 12) + 1))
        flat = pick.choice(pool, n, replace=False)
        if shared is True and size - 1 not in flat:
            flat[0] = size - 1
        if shared == "blocks":  # aligned runs of 16 (unit copies in runtimes.lines), one at the end if it fits
            starts = rng.choice(max(1, size // 16), min(3, max(1, size // 16)), replace=False) * 16
            flat = np.unique(np.concatenate([np.arange(b, min(b + 16, size)) for b in starts]))
        elif shared == "whole":  # every entry: a slice copy
            flat = np.arange(size)
        n = flat.size
        flat = rng.permutation(flat)
        idx = np.stack(np.unravel_index(flat, t.shape)).astype(np.int32)
        q = None
        if integer and t.quant is not None:
            base = m.base[k].reshape(-1)[flat].astype(np.int64)
            lo, hi = m.bounds[k]  # an integer adapter past its weight's range is refused (edge.format.qrange)
            step = rng.integers(-40, 41, n) if kind != "big" else rng.choice([-255, 255], n)  # big: the range's ends
            q = np.clip(base + step, lo, hi).astype(m.base[k].dtype)
        tensors[str(k)], shapes[str(k)] = SparseDelta(idx, _values(rng, n, kind), q), tuple(t.shape)
    return Adapter(name, m.info.fingerprint, tensors, shapes)


BAD = ("truncated", "header", "fingerprint", "index-out-of-range", "duplicated", "nan", "wrong-dtype")


def bad_file(m: Model, a: Adapter, how: str, tmp: Path) -> Path:
    """``a`` saved, then broken ``how``: cut short, a garbled header, another model's fingerprint, an index at the
    shape's end, a repeated index, a NaN value, float64 values."""
    import json

    from safetensors import safe_open
    from safetensors.numpy import save

    path = a.save(tmp / f"bad-{how}.safetensors")
    data = path.read_bytes()
    if how in ("truncated", "header"):
        path.write_bytes(data[: len(data) // 2] if how == "truncated" else data[:8] + b"{" * 8 + data[16:])
        return path
    with safe_open(str(path), "numpy") as f:
        meta, arrays = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    k = next(iter(a.tensors))
    idx, val = arrays[f"{k}.indices"], arrays[f"{k}.values"]
    if how == "fingerprint":
        edge = json.loads(meta["edge"])
        meta["edge"] = json.dumps({**edge, "base_fingerprint": "0" * len(edge["base_fingerprint"])})
    elif how == "index-out-of-range":
        idx[:, -1] = np.asarray(a.shapes[k], np.int32)
    elif how == "duplicated":
        arrays[f"{k}.indices"] = np.concatenate([idx, idx[:, :1]], axis=1)
        arrays[f"{k}.values"] = np.concatenate([val, val[:1]])
        if f"{k}.qvalues" in arrays:
            arrays[f"{k}.qvalues"] = np.concatenate([arrays[f"{k}.qvalues"], arrays[f"{k}.qvalues"][:1]])
    elif how == "nan":
        val[-1] = np.nan
    else:
        arrays[f"{k}.values"] = val.astype(np.float64)
    path.write_bytes(save(arrays, metadata=meta))
    return path


# -- the state machine -------------------------------------------------------------------------------------------
class Checked:
    """A runtime and the reference state beside it; every call's outcome (value or error type) must match."""

    def __init__(self, m: Model, backend: str, strategy: str, tmp: Path) -> None:
        self.m, self.tmp = m, tmp
        self.rt = Runtime(m.path, backend=backend, strategy=strategy)
        assert self.rt.strategy == strategy
        self.loaded: dict[str, tuple[Adapter, bool]] = {}  # name -> (adapter, loaded with clip)
        self.active: dict[str, float] = {}
        self.weights, self.clipped, self.closed = dict(m.base), 0, False

    def expect(self, call, want):
        """Run ``call``; ``want`` is an exception type or None. Returns True when it succeeded."""
        SEEN[(getattr(call, "__qualname__", "").split(".")[1], getattr(want, "__name__", "ok"))] += 1
        if want is None:
            call()
            return True
        with pytest.raises(want):
            call()
        return False

    def load(self, a: Adapter, clip: bool) -> None:
        want = RuntimeClosedError if self.closed else (ConfigError if a.name in self.active else None)
        if want is None:
            try:
                reference(self.m, [(a, 1.0)], clip)
            except EdgeError as e:
                want = type(e)
        if self.expect(lambda: self.rt.load_adapter(a, clip=clip), want):
            self.loaded[a.name] = (a, clip)

    def load_bad(self, path: Path, how: str) -> None:
        """A corrupt or mismatched file: refused with a typed error, the runtime exactly as it was."""
        want = RuntimeClosedError if self.closed else (AdapterMismatchError if how == "fingerprint" else FormatError)
        self.expect(lambda: self.rt.load_adapter(path), want)

    def unload(self, name: str) -> None:
        refused = name in self.active or name not in self.loaded  # active, or never loaded: a ConfigError
        want = RuntimeClosedError if self.closed else (ConfigError if refused else None)
        if self.expect(lambda: self.rt.unload_adapter(name), want):
            self.loaded.pop(name, None)

    def switch(self, spec, clip: bool) -> None:
        if spec is None or isinstance(spec, str):
            target = {} if spec is None else {spec: 1.0}
        else:
            target = dict(spec) if isinstance(spec, dict) else dict.fromkeys(spec, 1.0)
        want, new = None, None
        if self.closed:
            want = RuntimeClosedError
        elif any(not np.isfinite(a) for a in target.values()) or any(n not in self.loaded for n in target):
            want = ConfigError
        else:
            fast = len(target) == 1 and next(iter(target.values())) == 1.0  # prepared at load, with its clip
            c = self.loaded[next(iter(target))][1] if fast else clip
            try:
                new = reference(self.m, [(self.loaded[n][0], a) for n, a in target.items()], c)
            except EdgeError as e:
                want = type(e)
        if self.expect(lambda: self.rt.switch(spec, clip=clip), want):
            (self.weights, self.clipped), self.active = new, target
        if not self.closed:
            assert self.rt.active == self.active
            assert self.rt.clipped == self.clipped

    def close(self) -> None:
        self.rt.close()
        self.closed = True

    def check(self, outputs: bool) -> None:
        if self.closed:
            for call in (lambda: self.rt.weights(self.m.targets[0]), lambda: self.rt.run(self.m.feed)):
                with pytest.raises(RuntimeClosedError):
                    call()
            return
        self.rt.wait_settled(30)
        for k in self.m.targets:  # bit for bit, -0.0 and NaN payloads included
            got, want = self.rt.weights(k), self.weights[k]
            assert got.dtype == want.dtype, k
            np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=f"{k} after {self.active}")
        if outputs:  # bit for bit; a strategy that never prepacks: against a fresh runtime of it, and close to plain
            got = self.rt.run(self.m.feed)
            unpacked = self.rt.strategy in UNPACKED
            want = self.m.plain(self.weights, self.tmp, self.rt.strategy if unpacked else None)
            for name in self.m.outputs:
                np.testing.assert_array_equal(got[name], want[name], err_msg=f"output {name} with {self.active}")
            if unpacked:  # close to a plain session (outputs near the float32 range can round to inf on one only)
                plain = self.m.plain(self.weights, self.tmp)
                sane = all(float(np.nanmax(np.abs(w), initial=0)) < 1e6 for w in self.weights.values())
                for name in self.m.outputs if sane and not self.m.quantized else ():  # int8: see KERNEL_GAP
                    if np.isfinite(got[name]).all() and np.isfinite(plain[name]).all():
                        scale = max(1.0, float(np.abs(plain[name]).max()))  # large weights: large outputs
                        np.testing.assert_allclose(got[name], plain[name], rtol=1e-5, atol=1e-5 * scale)


def _spec(draw, names):
    kind = draw(st.sampled_from(["none", "one", "dict", "list"]))
    if kind == "none":
        return draw(st.sampled_from([None, {}]))
    if kind == "one":
        return draw(st.sampled_from(names))
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    if kind == "list":
        return chosen
    bad = draw(st.sampled_from([None, None, None, float("nan"), float("inf"), -float("inf")]))
    spec = {n: draw(st.sampled_from(ALPHAS)) for n in chosen}
    if bad is not None:
        spec[chosen[-1]] = bad
    return spec


@st.composite
def programs(draw, max_steps: int):
    names = ["a", "b", "c"]
    ops = []
    for i in range(draw(st.integers(3, max_steps))):
        op = (
            "load" if i < 2 else draw(st.sampled_from(["load", "switch", "switch", "switch", "unload", "bad", "close"]))
        )
        if op == "load":
            kind = draw(st.sampled_from(["plain", "plain", "special", "big", "huge"]))
            shared = draw(st.sampled_from([True, "same", "same", "blocks", "whole", False]))
            ops.append(
                (
                    "load",
                    draw(st.sampled_from(names)),
                    draw(st.integers(0, 2**16)),
                    shared,
                    kind,
                    draw(st.booleans()),
                    draw(st.booleans()),
                )
            )
        elif op == "switch":
            ops.append(("switch", _spec(draw, names), draw(st.booleans())))
        elif op == "bad":
            ops.append(("bad", draw(st.sampled_from(names)), draw(st.integers(0, 2**16)), draw(st.sampled_from(BAD))))
        elif op == "unload":
            ops.append(("unload", draw(st.sampled_from(names))))
        else:
            ops.append(("close",))
    return ops


def execute(m: Model, backend: str, strategy: str, ops, tmp: Path, outputs_every: int = 1) -> None:
    c = Checked(m, backend, strategy, tmp)
    try:
        for i, op in enumerate(ops):
            if op[0] == "load":
                _, name, seed, shared, kind, integer, clip = op
                c.load(make_adapter(m, name, seed, shared, kind, integer), clip)
            elif op[0] == "switch":
                c.switch(op[1], op[2])
            elif op[0] == "bad":
                c.load_bad(bad_file(m, make_adapter(m, op[1], op[2], True, "plain", True), op[3], tmp), op[3])
            elif op[0] == "unload":
                c.unload(op[1])
            elif op[0] == "close" and i == len(ops) - 1:
                c.close()
            c.check(outputs=(i % outputs_every == 0) or i == len(ops) - 1)
        if not c.closed:  # back to base: the file's weights, bit for bit
            c.switch(None, False)
            c.check(outputs=True)
    finally:
        c.rt.close()


TINY_CASES = [(k, s) for k in ("tiny", "tiny-int8", "tiny-tflite") for s in STRATEGIES[MODELS[k].suffix]]


@pytest.mark.parametrize("key,strategy", TINY_CASES)
def test_random_sequences_on_tiny_models_match_the_reference(key, strategy, tmp_path_factory):
    m = model(key)
    backend = "tflite" if m.tflite else "onnxruntime"
    tmp = tmp_path_factory.mktemp("ref")

    @settings(max_examples=30 * SCALE, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(programs(8))
    def run(ops):
        execute(m, backend, strategy, ops, tmp)

    before = Counter(SEEN)
    run()
    seen = SEEN - before  # the sequences reached fused switches, refusals and corrupt files, not only loads
    assert seen[("switch", "ok")] and seen[("switch", "ConfigError")] and seen[("load_bad", "FormatError")], seen


SMALL_CASES = [(k, s) for k in SMALL for s in STRATEGIES[".tflite" if "tflite" in k else ".onnx"]]


@pytest.mark.parametrize("key,strategy", SMALL_CASES)
def test_random_sequences_on_small_stand_ins_match_the_reference(key, strategy, tmp_path_factory):
    """What the cached-model cases below check, on a fresh checkout too: conv filters (folded scales, layouts),
    int8 bases of every quantizer kind."""
    m = model(key)
    backend = "tflite" if m.tflite else "onnxruntime"
    tmp = tmp_path_factory.mktemp("ref")

    @settings(max_examples=8 * SCALE, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(programs(8))
    def run(ops):
        execute(m, backend, strategy, ops, tmp)

    run()


BIG_CASES = [
    (k, s)
    for k in (
        "vit",
        "vit-tflite",
        "vit-int8-dynamic",
        "vit-int8-static",
        "vit-int8-tflite",
        "vit-int8-static-tflite",
        "cnn",
        "cnn-tflite",
        "cnn-int8",
        "cnn-int8-tflite",
    )
    for s in (STRATEGIES[".tflite"] if "tflite" in k else STRATEGIES[".onnx"])
]


@pytest.mark.parametrize("key,strategy", cached(BIG_CASES))
def test_random_sequences_on_the_cached_digits_models_match_the_reference(key, strategy, tmp_path_factory):
    m = model(key)
    backend = "tflite" if m.tflite else "onnxruntime"
    tmp = tmp_path_factory.mktemp("ref")

    @settings(max_examples=4 * SCALE, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(programs(8))
    def run(ops):
        execute(m, backend, strategy, ops, tmp, outputs_every=3)

    run()


def test_refused_adapters_never_reach_the_runtime():
    """NaN/Inf values and duplicated indices are refused when the adapter is built (and again at load)."""
    m = model("tiny")
    k = m.targets[0]
    shape = tuple(m.info.tensors[k].shape)
    idx = np.zeros((len(shape), 2), np.int32)
    for bad, why in ((np.array([np.nan, 1], np.float32), "NaN"), (np.array([np.inf, 1], np.float32), "NaN or Inf")):
        idx1 = np.array([[0, 1]] + [[0, 0]] * (len(shape) - 1), np.int32)
        with pytest.raises(AdapterMismatchError, match=why):
            Adapter("x", m.info.fingerprint, {k: SparseDelta(idx1, bad)}, {k: shape})
    with pytest.raises(AdapterMismatchError, match="duplicated"):
        Adapter("x", m.info.fingerprint, {k: SparseDelta(idx, np.ones(2, np.float32))}, {k: shape})


@pytest.mark.parametrize(
    "spec",
    [
        *({"a": None}, {"a": "0.5"}, {"a": b"1"}, {"a": [1.0]}, 3, b"a", ["a", "a"], ("a", 1)),
        *({"a": 1.0, "b": object()}, {"a": True}, {"a": 1.0, "b": np.True_}),
    ],
    ids=[
        *("none-weight", "str-weight", "bytes-weight", "list-weight", "int", "bytes", "dup-list", "non-str-name"),
        *("obj", "bool-weight", "numpy-bool-weight"),
    ],
)
def test_a_malformed_fusion_spec_is_a_config_error_and_changes_nothing(spec):
    """Before: a None or list weight and an int spec raised a bare TypeError; b"a" was read as adapter '97'; a
    string weight "0.5" was taken as 0.5; ["a", "a"] fused "a" once at weight 1 (not 2) without a word; a bool
    weight ({"a": True}, a slip for ["a"]) was taken as 1.0."""
    m = model("tiny")
    with Runtime(m.path) as rt:
        for seed, name in ((1, "a"), (2, "b")):
            rt.load_adapter(make_adapter(m, name, seed, True, "plain", False))
        rt.switch({"a": 0.5, "b": 1.0})
        before = {k: rt.weights(k) for k in m.targets}
        with pytest.raises(ConfigError, match="switch|weight|names"):
            rt.switch(spec)
        assert rt.active == {"a": 0.5, "b": 1.0}
        assert all(np.array_equal(_bits(rt.weights(k)), _bits(w)) for k, w in before.items())
    assert normalise(["b", "a"]) == {"b": 1.0, "a": 1.0} and normalise({"a": np.float32(2)}) == {"a": 2.0}
    assert list(normalise({"b": np.int64(1), "a": np.int8(-1)}).items()) == [("b", 1.0), ("a", -1.0)]


def _signed_zero_model(path: Path) -> Path:
    """The tiny MLP with -0.0 at every third entry of its targets and two NaNs with payloads in fc2.weight."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((20, 10)).astype(np.float32) * 0.5
    w2 = rng.standard_normal((2, 20)).astype(np.float32) * 0.5
    for w in (w1, w2):
        w.reshape(-1)[::3] = np.float32(-0.0)
    w2.reshape(-1)[[4, 31]] = np.array([0x7FC0DEAD, 0xFFA00001], np.uint32).view(np.float32)  # quiet, signalling
    stored = {"fc1.weight": w1.T.copy(), "fc1.bias": np.zeros(20, np.float32), "fc2.weight": w2}
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"]),
        helper.make_node("Add", ["h0", "fc1.bias"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("Gemm", ["h2", "fc2.weight"], ["logits"], transB=1),
    ]
    tensors = {
        "fc1.weight": TensorInfo("fc1.weight", (20, 10), transposed=True),
        "fc2.weight": TensorInfo("fc2.weight", (2, 20), transposed=False),
    }
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 10])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])]
    _tiny.write_model(path, "signed-zero", nodes, inputs, outputs, stored, tensors)
    return path


@pytest.mark.parametrize("strategy", STRATEGIES[".onnx"])
def test_random_sequences_keep_signed_zeros_and_nan_payloads_of_the_base(strategy, tmp_path_factory):
    """Undo writes the saved base bits back: -0.0 stays -0.0 and a NaN keeps its payload (an adapter on a NaN entry
    is refused: base + delta is not finite); a fused entry follows the rule (-0.0 + 0.0 is +0.0)."""
    path = tmp_path_factory.mktemp("signed") / "signed-zero.onnx"
    if "signed-zero" not in _MODELS:
        MODELS["signed-zero"] = _signed_zero_model(path)
    m = model("signed-zero")
    assert np.signbit(m.base["fc1.weight"]).sum() > 0 and np.isnan(m.base["fc2.weight"]).sum() == 2
    tmp = tmp_path_factory.mktemp("ref")

    @settings(max_examples=20 * SCALE, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(programs(8))
    def run(ops):
        execute(m, "onnxruntime", strategy, ops, tmp)

    run()


def test_an_adapter_too_large_for_the_grid_is_refused_without_a_numpy_warning():
    """Before: a float adapter of 3e38 on an int8 base (or on a folded channel scale) leaked numpy's 'overflow
    encountered' RuntimeWarning from TensorInfo.grid_units/stored_delta before the ConfigError."""
    import warnings

    m = model("tiny-int8")
    a = make_adapter(m, "big", 5, True, "huge", False)
    with Runtime(m.path) as rt, warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConfigError, match="non-finite"):
            rt.load_adapter(a)
        assert rt.adapters == []
    t = TensorInfo("w", (2, 2), channel_scale=(1e10, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = t.stored_delta(np.array([[0, 1], [0, 0]], np.int32), np.array([3e38, 1.0], np.float32))
    assert np.isinf(got[0]) and got[1] == 1.0


@pytest.mark.parametrize(
    "key",
    ["tiny-int8", *(k for k in SMALL if "int8" in k)]
    + cached(["vit-int8-dynamic", "vit-int8-tflite", "vit-int8-static-tflite", "cnn-int8", "cnn-int8-tflite"]),
)
def test_a_saturating_fusion_leaves_the_state_it_found_then_clips_as_the_reference(key, tmp_path):
    """Multi-adapter fusions on an int8 base that leave the range: refused with the weights, active set, clipped
    count and outputs all as before; with clip=True clipped exactly as the reference, counted; undo bit-exact."""
    m = model(key)
    for strategy in STRATEGIES[m.path.suffix][:2]:
        c = Checked(m, "tflite" if m.tflite else "onnxruntime", strategy, tmp_path)
        try:
            c.load(make_adapter(m, "a", 11, True, "plain", True), False)
            c.load(make_adapter(m, "b", 12, True, "big", True), False)
            c.load(make_adapter(m, "f", 13, True, "plain", False), False)  # a float adapter, requantized
            c.switch({"f": 1.0, "a": 0.5}, False)
            c.check(outputs=True)
            before = c.rt.run(m.feed)
            for spec in ({"a": 1.0, "b": 2.5}, {"b": 2.5, "f": 1.0}, {"b": -3.0}):
                c.switch(spec, False)
                assert c.active == {"f": 1.0, "a": 0.5}, f"{spec} should saturate on {key}"
                c.check(outputs=False)
                for name, v in c.rt.run(m.feed).items():
                    np.testing.assert_array_equal(v, before[name])
            c.switch({"a": 1.0, "b": 2.5}, True)
            assert c.clipped > 0 and c.active == {"a": 1.0, "b": 2.5}
            c.check(outputs=True)
            c.switch(None, False)
            c.check(outputs=True)
        finally:
            c.rt.close()


@pytest.mark.parametrize("key", ["conv-tflite", "conv", *cached(["cnn-tflite"])])
def test_merge_weights_is_the_reference_on_a_folded_channel_scale_too(key):
    """Before: ``edge.merge_weights`` added ``alpha * delta`` to the folded weight the runtime reads back, while the
    runtime adds ``alpha * delta * channel_scale`` (TensorInfo.stored_delta): on the LiteRT CNN (BatchNorm folded
    into its convs) the documented reference disagreed with the runtime. ``tensors=rt.info.tensors`` folds it."""
    from edge import merge_weights

    m = model(key)
    folded = [k for k in m.targets if m.info.tensors[k].channel_scale is not None]
    assert folded, f"{key} folds BatchNorm scales into its convs"
    a, b = (make_adapter(m, n, s, True, "plain", False) for n, s in (("a", 21), ("b", 22)))
    with Runtime(m.path, backend="tflite" if m.tflite else "onnxruntime") as rt:
        rt.load_adapter(a)
        rt.load_adapter(b)
        for spec in ({"a": 1.0}, {"a": 0.5, "b": -2.0}):
            rt.switch(spec)
            pairs = [({"a": a, "b": b}[n], w) for n, w in spec.items()]
            ref = merge_weights(m.base, pairs, tensors=rt.info.tensors)
            for k in m.targets:
                np.testing.assert_array_equal(_bits(rt.weights(k)), _bits(ref[k]), err_msg=k)
        # without the model's tensors it is the source-layout sum, unfolded: different on the folded targets
        a_folded = [k for k in folded if k in a.tensors]
        if a_folded:
            rt.switch("a")
            plain = merge_weights(m.base, [(a, 1.0)])
            assert not all(np.array_equal(plain[k], rt.weights(k)) for k in a_folded)


@pytest.mark.parametrize("key", [*FLOAT_ADAPTERS, *cached(["vit-int8-dynamic", "vit-int8-static", "cnn-int8"])])
def test_the_float_twins_adapters_requantize_onto_the_int8_base_as_the_reference(key, tmp_path):
    """The demo's float SHiRA adapters on the int8 twin: requantized, saturation refused or clipped and counted as
    the reference says, alone and fused with weights; back to base bit for bit."""
    from edge.format.adapter import load_adapter

    m = model(key)
    folder = MODELS.get(f"{key}.float-adapters") or m.path.parents[1]  # the demo keeps them beside quantized/
    files = [folder / f"shira-{d}.safetensors" for d in ("rotate", "noise")]
    if not all(f.exists() for f in files):
        pytest.skip(f"{key}: no cached float adapters beside it")
    c = Checked(m, "onnxruntime", "hybrid", tmp_path)
    try:
        for f, clip in zip(files, (True, False)):
            c.load(load_adapter(f, model=m.info), clip)
        assert "rotate" in c.loaded
        for spec, clip in (("rotate", False), ({"rotate": 1.0, "noise": 0.5}, False), ({"noise": 2.0}, True)):
            c.switch({n: w for n, w in ({spec: 1.0} if isinstance(spec, str) else spec).items() if n in c.loaded}, clip)
            c.check(outputs=True)
        c.switch(None, False)
        c.check(outputs=True)
    finally:
        c.rt.close()


def test_runtime_calls_that_would_pass_silently_are_refused():
    """An empty adapter name, unloading a name never loaded, and waiting on a closed runtime: each a typed error."""
    rt = Runtime(GOLDEN / "tiny-mlp-v1.onnx")
    with pytest.raises(ConfigError, match="non-empty string"):
        rt.load_adapter(GOLDEN / "adapter-v1.safetensors", name="")
    assert rt.adapters == []
    with pytest.raises(ConfigError, match="'never' is not loaded"):
        rt.unload_adapter("never")
    name = rt.load_adapter(GOLDEN / "adapter-v1.safetensors")
    rt.unload_adapter(name)
    assert rt.wait_settled(5)
    rt.close()
    with pytest.raises(RuntimeClosedError):
        rt.wait_settled(5)
