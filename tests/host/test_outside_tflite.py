"""Outside audit of the LiteRT backend on ``.tflite`` files this project did not write.

Each model is converted with ``litert_torch.convert`` directly (not ``exporters.export_tflite``: no
optimization barriers, no renaming, no metadata), as an outside user's pipeline would. Such a file is
refused by ``edge.Runtime`` in one typed line naming the way in; ``edge.convert.tflite_import`` makes it
adapter-ready without torch. Then, for every file: outputs equal a plain ``ai_edge_litert`` Interpreter
on the *original* file bit for bit (XNNPACK vs XNNPACK, built-in vs built-in) under every strategy; an
adapter switched in equals a plain interpreter on the file with those weights written, and switched out is
bit-exact undo; a weight that two operators read is written once for both.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("litert_torch", reason="litert-torch is not installed: run `make test-tflite` (.venv-tflite)")
torch = pytest.importorskip("torch")
from _tiny import random_adapter  # noqa: E402
from ai_edge_litert import interpreter as tfl  # noqa: E402

from edge.convert.tflite_import import import_tflite  # noqa: E402
from edge.errors import ConfigError, EdgeError, FormatError  # noqa: E402
from edge.format.tflite import pack_model, read_tflite, tensor_name, unpack_model  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

nn = torch.nn
STRATEGIES = ("hybrid", "rebuild", "builtin")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class CNN(nn.Module):  # conv + BatchNorm, depthwise conv + BatchNorm (folded by the converter)
    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.n2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.n2(self.dw(torch.relu(self.n1(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


class Encoder(nn.Module):  # LayerNorm, attention, GELU
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True)
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        return self.norm(self.layer(x))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 6), nn.Linear(4, 6)

    def forward(self, x, y):
        return self.a(x) * self.b(y)


class Ids(nn.Module):  # integer input, EMBEDDING_LOOKUP
    def __init__(self):
        super().__init__()
        self.e, self.f = nn.Embedding(50, 16), nn.Linear(16, 3)

    def forward(self, ids):
        return self.f(self.e(ids).mean(1))


class Shared(nn.Module):  # one weight read by two FULLY_CONNECTED ops
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)

    def forward(self, x):
        return self.a(torch.tanh(self.a(x)))


class BoolIO(nn.Module):  # a bool input and a bool output
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x, m):
        y = self.a(x)
        return torch.where(m, y, torch.zeros_like(y)), y > 0


MODELS = {
    "mlp": (MLP, lambda: (torch.randn(1, 16),)),
    "cnn-bn-depthwise": (CNN, lambda: (torch.randn(1, 3, 12, 12),)),
    "encoder": (Encoder, lambda: (torch.randn(1, 10, 32),)),
    "two-inputs": (TwoInputs, lambda: (torch.randn(1, 8), torch.randn(1, 4))),
    "ids-int64": (Ids, lambda: (torch.randint(0, 50, (1, 7), dtype=torch.int64),)),
    "ids-int32": (Ids, lambda: (torch.randint(0, 50, (1, 7), dtype=torch.int32),)),
    "shared-weight": (Shared, lambda: (torch.randn(1, 16),)),
    "bool-io": (BoolIO, lambda: (torch.randn(1, 8), torch.rand(1, 8) > 0.5)),
}


def _torch_model(cls):
    torch.manual_seed(0)
    m = cls().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        for b in m.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.running_mean.normal_(0, 0.2)
                b.running_var.uniform_(0.5, 2.0)
    return m


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """name -> bytes of a .tflite file converted by litert_torch.convert, nothing else."""
    import litert_torch

    out, files = tmp_path_factory.mktemp("foreign"), {}
    for name, (cls, args) in MODELS.items():
        path = out / f"{name}.tflite"
        litert_torch.convert(_torch_model(cls), args()).export(str(path))
        files[name] = path.read_bytes()
    m1 = _torch_model(MLP)
    sig = litert_torch.signature("first", m1, (torch.randn(1, 16),)).signature(
        "second", _torch_model(CNN), (torch.randn(1, 3, 12, 12),)
    )
    path = out / "two-signatures.tflite"
    sig.convert().export(str(path))
    files["two-signatures"] = path.read_bytes()
    return files


def _feeds(data: bytes, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    it = tfl.Interpreter(model_content=data)
    out = []
    for d in it.get_input_details():
        shape, dtype = tuple(d["shape"]), np.dtype(d["dtype"])
        if dtype == np.bool_:
            out.append(rng.random(shape) > 0.5)
        elif dtype.kind in "iu":
            out.append(rng.integers(0, 50, shape).astype(dtype))
        else:
            out.append(rng.standard_normal(shape).astype(dtype))
    return out


def _plain(data: bytes, feeds, *, xnnpack: bool) -> list[np.ndarray]:
    """A plain ai_edge_litert Interpreter: default delegate (XNNPACK) or the built-in kernels only."""
    kind = tfl.OpResolverType.AUTO if xnnpack else tfl.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = tfl.Interpreter(model_content=bytes(data), experimental_op_resolver_type=kind)
    it.allocate_tensors()
    for d, x in zip(it.get_input_details(), feeds):
        it.set_tensor(d["index"], x)
    it.invoke()
    return [it.get_tensor(d["index"]).copy() for d in it.get_output_details()]


def _with_weights(data: bytes, weights: dict[str, np.ndarray]) -> bytes:
    """The foreign file with stored tensors replaced (by name, subgraph 0): the oracle for a switched adapter."""
    m = unpack_model(data)
    for t in m.subgraphs[0].tensors:
        if tensor_name(t) in weights:
            m.buffers[t.buffer].data = np.frombuffer(weights[tensor_name(t)].tobytes(), np.uint8)
    return pack_model(m)


def _stored(data: bytes) -> dict[str, np.ndarray]:
    fb = read_tflite(data)
    return {
        t.name: np.frombuffer(data, t.dtype, int(np.prod(t.shape)), t.start).reshape(t.shape).copy()
        for t in fb.tensors
        if t.nbytes
    }


def _equal(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), f"max diff {np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))}"


@pytest.fixture(scope="module")
def imported(foreign, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported")
    return {name: (out / f"{name}.tflite", import_tflite_at(data, out, name)) for name, data in foreign.items()}


def import_tflite_at(data: bytes, folder, name: str, signature: str | None = None):
    src = folder / f"{name}-src.tflite"
    src.write_bytes(data)
    if name == "two-signatures":
        signature = signature or "first"
    return import_tflite(src, folder / f"{name}.tflite", signature=signature)


ALL = [*MODELS, "two-signatures"]


@pytest.mark.parametrize("name", ALL)
def test_a_foreign_file_is_refused_in_one_typed_line_naming_the_import(foreign, tmp_path, name):
    path = tmp_path / "m.tflite"
    path.write_bytes(foreign[name])
    with pytest.raises(FormatError) as e:
        Runtime(path, backend="tflite")
    assert "\n" not in str(e.value) and "import_tflite" in str(e.value)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", ALL)
def test_imported_file_runs_bit_exact_and_switches_with_exact_undo(foreign, imported, name, strategy):
    path, report = imported[name]
    data, feeds = foreign[name], _feeds(foreign[name])
    xnn = strategy != "builtin"
    base = _plain(data, feeds, xnnpack=xnn)
    with Runtime(path, backend="tflite", strategy=strategy) as rt:
        assert set(rt.info.tensors) == set(report.targets) and rt.info.tensors
        named = dict(zip(rt.info.inputs, feeds))
        _equal(list(rt.run(named).values()), base)
        adapter = random_adapter(rt.info, seed=3, density=0.1)
        stored = _stored(data)
        for k, d in adapter.tensors.items():
            w = stored[rt.info.tensors[k].initializer]
            np.add.at(w, tuple(d.indices), d.values)
        want = _plain(_with_weights(data, stored), feeds, xnnpack=xnn)
        rt.load_adapter(adapter)
        rt.switch(adapter.name)
        assert rt.wait_settled(30)
        assert rt.providers == (["XNNPACK", "CPU"] if xnn else ["CPU"])
        _equal(list(rt.run(named).values()), want)
        for k in adapter.tensors:
            assert rt.weights(k).tobytes() == stored[rt.info.tensors[k].initializer].tobytes()
        rt.switch(None)
        assert rt.wait_settled(30)
        _equal(list(rt.run(named).values()), base)
        before = _stored(data)
        for k in adapter.tensors:
            assert rt.weights(k).tobytes() == before[rt.info.tensors[k].initializer].tobytes()


def test_a_weight_two_operators_read_is_one_target_written_for_both(foreign, imported):
    path, report = imported["shared-weight"]
    fb = read_tflite(foreign["shared-weight"])
    readers = [op for op in fb.ops if op.code == 9]
    assert len(readers) == 2 and readers[0].inputs[1] == readers[1].inputs[1]
    assert list(report.targets.values()) == [fb.tensors[readers[0].inputs[1]].name] and not report.tied


def test_a_buffer_two_tensors_share_is_split_and_reported(foreign, tmp_path):
    m = unpack_model(foreign["mlp"])
    sg = m.subgraphs[0]
    fcs = [op for op in sg.operators if m.operatorCodes[op.opcodeIndex].builtinCode == 9]
    first = sg.tensors[fcs[0].inputs[1]]
    dup = type(first)()  # a second tensor (another name) over the same buffer, as a deduplicating converter leaves it
    dup.name, dup.shape, dup.type, dup.buffer = b"alias", list(first.shape), first.type, first.buffer
    sg.tensors.append(dup)
    (tmp_path / "src.tflite").write_bytes(pack_model(m))
    report = import_tflite(tmp_path / "src.tflite", tmp_path / "out.tflite")
    assert report.tied == {tensor_name(first): "alias"}
    data = (tmp_path / "out.tflite").read_bytes()
    tensors = {t.name: t for t in read_tflite(data).tensors}
    assert tensors[tensor_name(first)].start != tensors["alias"].start


def test_weights_stored_outside_the_flatbuffer_are_read_and_inlined(foreign, tmp_path):
    m = unpack_model(foreign["mlp"])
    sg = m.subgraphs[0]
    fc = next(op for op in sg.operators if m.operatorCodes[op.opcodeIndex].builtinCode == 9)
    buf = m.buffers[sg.tensors[fc.inputs[1]].buffer]
    raw = np.asarray(buf.data, np.uint8).tobytes()
    index = sg.tensors[fc.inputs[1]].buffer
    buf.data, buf.offset, buf.size = None, 2**40, len(raw)  # placeholder: the field takes its room
    head = pack_model(m)  # (pack_model replaces m.buffers with aligned copies)
    offset = m.buffers[index].offset = (len(head) + 63) // 64 * 64
    head = pack_model(m)
    assert len(head) <= offset
    data = head + b"\0" * (offset - len(head)) + raw
    (tmp_path / "src.tflite").write_bytes(data)
    feeds = _feeds(data)
    report = import_tflite(tmp_path / "src.tflite", tmp_path / "out.tflite")
    assert tensor_name(sg.tensors[fc.inputs[1]]) in report.targets.values()
    with Runtime(tmp_path / "out.tflite", backend="tflite", strategy="builtin") as rt:
        _equal(list(rt.run(dict(zip(rt.info.inputs, feeds))).values()), _plain(data, feeds, xnnpack=False))


def test_float16_weights_behind_dequantize_are_refused_saying_what_to_do(foreign, tmp_path):
    from ai_edge_litert import schema_py_generated as s

    m = unpack_model(foreign["mlp"])
    sg = m.subgraphs[0]
    fc = next(op for op in sg.operators if m.operatorCodes[op.opcodeIndex].builtinCode == 9)
    w = sg.tensors[fc.inputs[1]]
    half = np.frombuffer(np.asarray(m.buffers[w.buffer].data, np.uint8).tobytes(), np.float32).astype(np.float16)
    m.buffers[w.buffer].data = np.frombuffer(half.tobytes(), np.uint8)
    w.type = s.TensorType.FLOAT16
    f32 = s.TensorT()
    f32.name, f32.shape, f32.type, f32.buffer = b"w_f32", list(w.shape), s.TensorType.FLOAT32, 0
    sg.tensors.append(f32)
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.DEQUANTIZE
    code.version = 1
    m.operatorCodes.append(code)
    deq = s.OperatorT()
    deq.opcodeIndex, deq.inputs, deq.outputs = len(m.operatorCodes) - 1, [fc.inputs[1]], [len(sg.tensors) - 1]
    fc.inputs = [fc.inputs[0], len(sg.tensors) - 1, *fc.inputs[2:]]
    sg.operators.insert(0, deq)
    data = pack_model(m)
    _plain(data, _feeds(data), xnnpack=True)  # a valid file LiteRT runs
    (tmp_path / "fp16.tflite").write_bytes(data)
    with pytest.raises(FormatError, match="float32") as e:
        import_tflite(tmp_path / "fp16.tflite", tmp_path / "out.tflite")
    assert "\n" not in str(e.value) and not (tmp_path / "out.tflite").exists()


def test_an_imported_file_is_not_imported_twice_and_a_non_tflite_is_refused(imported, tmp_path):
    path, _ = imported["mlp"]
    with pytest.raises(FormatError, match="already adapter-ready"):
        import_tflite(path, tmp_path / "again.tflite")
    (tmp_path / "x.tflite").write_bytes(b"not a flatbuffer at all")
    with pytest.raises(EdgeError):
        import_tflite(tmp_path / "x.tflite", tmp_path / "y.tflite")


def test_the_import_command_writes_the_file_and_prints_its_targets(foreign, tmp_path, capsys):
    import argparse
    import json

    from edge.commands import import_tflite as command

    (tmp_path / "in.tflite").write_bytes(foreign["two-inputs"])
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["import-tflite", str(tmp_path / "in.tflite"), "--out", str(tmp_path / "out.tflite")])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {v["op"] for v in summary["targets"].values()} == {"FULLY_CONNECTED"} and len(summary["targets"]) == 2
    with Runtime(tmp_path / "out.tflite", backend="tflite") as rt:
        assert set(rt.info.tensors) == set(summary["targets"]) and rt.info.fingerprint == summary["fingerprint"]


def test_several_signatures_need_one_named_and_the_named_one_runs(foreign, tmp_path):
    data = foreign["two-signatures"]
    (tmp_path / "in.tflite").write_bytes(data)
    with pytest.raises(ConfigError, match=r"signatures \['first', 'second'\]") as e:
        import_tflite(tmp_path / "in.tflite", tmp_path / "out.tflite")
    assert "\n" not in str(e.value) and not (tmp_path / "out.tflite").exists()
    report = import_tflite(tmp_path / "in.tflite", tmp_path / "out.tflite", signature="second")  # subgraph 1
    assert {v for v in report.readers.values()} == {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}
    x = np.random.default_rng(2).standard_normal((1, 3, 12, 12)).astype(np.float32)
    for strategy, kind in (
        ("hybrid", tfl.OpResolverType.AUTO),
        ("builtin", tfl.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES),
    ):
        plain = tfl.Interpreter(model_content=data, experimental_op_resolver_type=kind).get_signature_runner("second")
        want = list(plain(args_0=x).values())
        with Runtime(tmp_path / "out.tflite", backend="tflite", strategy=strategy) as rt:
            rt.wait_settled(30)
            _equal(list(rt.run({rt.info.inputs[0]: x}).values()), want)


def test_a_backend_given_a_path_gives_its_input_specs(imported):
    from edge.format.feeds import input_specs
    from runtimes.base import BackendOptions
    from runtimes.litert import LiteRTBackend

    path, _ = imported["two-inputs"]
    backend = LiteRTBackend(path, BackendOptions(strategy="builtin"))
    assert backend.input_specs == input_specs("tflite", path.read_bytes())


def _peak_bytes(fn) -> int:
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        held = fn()
        peak = tracemalloc.get_traced_memory()[1]
        del held
        return peak
    finally:
        tracemalloc.stop()


def test_runtime_loads_a_foreign_model_holding_one_copy_of_its_bytes_at_peak(tmp_path):
    import litert_torch

    from runtimes.base import BackendOptions
    from runtimes.litert import LiteRTBackend

    model = nn.Sequential(nn.Linear(256, 2048), nn.ReLU(), nn.Linear(2048, 1024)).eval()  # 10.5 MB of weights
    litert_torch.convert(model, (torch.randn(1, 256),)).export(str(tmp_path / "big-src.tflite"))
    import_tflite(tmp_path / "big-src.tflite", tmp_path / "big.tflite")
    size = (tmp_path / "big.tflite").stat().st_size
    backend = _peak_bytes(lambda: LiteRTBackend(tmp_path / "big.tflite", BackendOptions(strategy="builtin")))
    runtime = _peak_bytes(lambda: Runtime(tmp_path / "big.tflite", backend="tflite", strategy="builtin"))
    assert backend < 1.2 * size  # the backend given a path: its arena is the bytes it read
    assert runtime < backend + 0.2 * size, f"{runtime / 1e6:.1f} MB at peak for a {size / 1e6:.1f} MB file"


def test_tensors_sharing_a_name_are_renamed_not_refused(foreign, tmp_path):
    m = unpack_model(foreign["mlp"])
    sg = m.subgraphs[0]
    fcs = [op for op in sg.operators if m.operatorCodes[op.opcodeIndex].builtinCode == 9]
    first, second = sg.tensors[fcs[0].inputs[1]], sg.tensors[fcs[1].inputs[1]]
    second.name = first.name  # two weights, one name: LiteRT runs it; the fingerprint needs unique names
    data = pack_model(m)
    (tmp_path / "in.tflite").write_bytes(data)
    report = import_tflite(tmp_path / "in.tflite", tmp_path / "out.tflite")
    assert report.info.extra["imported"]["renamed"] == {f"{tensor_name(first)}_1": tensor_name(first)}
    assert len(report.targets) == 2
    feeds = _feeds(data)
    with Runtime(tmp_path / "out.tflite", backend="tflite", strategy="builtin") as rt:
        _equal(list(rt.run(dict(zip(rt.info.inputs, feeds))).values()), _plain(data, feeds, xnnpack=False))


@pytest.mark.parametrize("name", ["mlp", "cnn-bn-depthwise", "encoder", "ids-int32"])
def test_a_larger_batch_than_converted_equals_row_by_row_runs(foreign, imported, name):
    path, _ = imported[name]
    data = foreign[name]
    rows = [_feeds(data, seed=s) for s in range(3)]
    batch = [np.concatenate([r[i] for r in rows]) for i in range(len(rows[0]))]
    for strategy in ("builtin", "rebuild"):
        want = [np.concatenate(x) for x in zip(*(_plain(data, r, xnnpack=strategy != "builtin") for r in rows))]
        with Runtime(path, backend="tflite", strategy=strategy) as rt:
            _equal(list(rt.run(dict(zip(rt.info.inputs, batch))).values()), want)


def test_an_integer_constant_that_is_no_weight_does_not_make_a_float_file_quantized(foreign, tmp_path):
    """A float model adding a uint8 constant (CAST to float32) to its output: only weights say "quantized"."""
    from ai_edge_litert import schema_py_generated as s

    m = unpack_model(foreign["mlp"])
    sg = m.subgraphs[0]
    out = sg.outputs[0]
    shape = list(sg.tensors[out].shape)

    def tensor(name, ttype, data=None):
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), ttype, 0
        if data is not None:
            b = s.BufferT()
            b.data = np.frombuffer(data.tobytes(), np.uint8)
            m.buffers.append(b)
            t.buffer = len(m.buffers) - 1
        sg.tensors.append(t)
        return len(sg.tensors) - 1

    def op(code, inputs, outputs):
        c = s.OperatorCodeT()
        c.builtinCode = c.deprecatedBuiltinCode = code
        c.version = 1
        m.operatorCodes.append(c)
        o = s.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = len(m.operatorCodes) - 1, inputs, outputs
        sg.operators.append(o)

    offsets = np.arange(int(np.prod(shape)), dtype=np.uint8).reshape(shape) * 3
    const, cast, pre = (
        tensor(b"offsets_u8", s.TensorType.UINT8, offsets),
        tensor(b"offsets_f32", s.TensorType.FLOAT32),
        tensor(b"pre", s.TensorType.FLOAT32),
    )
    for o in sg.operators:
        o.outputs = [pre if i == out else i for i in o.outputs]
    op(s.BuiltinOperator.CAST, [const], [cast])
    op(s.BuiltinOperator.ADD, [pre, cast], [out])
    data = pack_model(m)
    feeds = _feeds(data)
    _equal(_plain(data, feeds, xnnpack=False), [_plain(foreign["mlp"], feeds, xnnpack=False)[0] + offsets])
    (tmp_path / "in.tflite").write_bytes(data)
    report = import_tflite(tmp_path / "in.tflite", tmp_path / "out.tflite")
    assert sorted(report.readers.values()) == ["FULLY_CONNECTED", "FULLY_CONNECTED"]
    assert report.info.extra["imported"]["subgraphs"] == 1
    with Runtime(tmp_path / "out.tflite", backend="tflite", strategy="builtin") as rt:
        _equal(list(rt.run(dict(zip(rt.info.inputs, feeds))).values()), _plain(data, feeds, xnnpack=False))


def test_the_subgraph_count_and_weights_no_adapter_reaches_are_recorded(imported):
    one = imported["mlp"][1].info.extra["imported"]
    assert one["subgraphs"] == 1 and "untargeted_weights" not in one
    two = imported["two-signatures"][1].info.extra["imported"]  # signature "first" (the MLP) runs; "second" does not
    assert two["subgraphs"] == 2 and two["untargeted_weights"] == 3  # the CNN's conv, depthwise and linear weights


def test_int8_weights_on_a_grid_are_still_refused_as_quantized(foreign, tmp_path):
    from ai_edge_litert import schema_py_generated as s

    m = unpack_model(foreign["mlp"])
    sg = m.subgraphs[0]
    fc = next(op for op in sg.operators if m.operatorCodes[op.opcodeIndex].builtinCode == 9)
    w = sg.tensors[fc.inputs[1]]
    m.buffers[w.buffer].data = np.zeros(int(np.prod(w.shape)), np.uint8)
    w.type, w.quantization = s.TensorType.INT8, s.QuantizationParametersT()
    w.quantization.scale, w.quantization.zeroPoint = [0.01], [0]
    (tmp_path / "int8.tflite").write_bytes(pack_model(m))
    with pytest.raises(FormatError, match="int8 on a quantization grid"):
        import_tflite(tmp_path / "int8.tflite", tmp_path / "out.tflite")
