"""``Runtime(model, dims={...})``: a model's named input dimensions fixed to sizes in every session (edge.dims).

Before: every named dimension ran free (onnxruntime planned memory per call; NPU providers need static shapes) and
there was no way to fix one. Now the override reaches each session the backend builds (``hybrid``'s prepacked and
bound ones, ``bound``, ``rebuild``'s rebuilds), the runtime's input specs carry the sizes (a feed of another size is
refused naming the dimension; generated inputs take the sizes), and the model, its fingerprint and its adapters are
unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.dims import FixedDim, check_dims, parse_dim_flags  # noqa: E402
from edge.errors import ConfigError, EdgeError, FormatError  # noqa: E402
from edge.format.feeds import generate_inputs  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from runtimes.base import BackendOptions  # noqa: E402

RNG = np.random.default_rng(21)
W1 = RNG.standard_normal((8, 6)).astype(np.float32)
W2 = RNG.standard_normal((6, 3)).astype(np.float32)
DIGITS = Path.home() / ".cache" / "edge" / "digits-07d9c19ac5e7"


def named_mlp() -> onnx.ModelProto:
    """out = (sum_seq(x @ w1) + z) @ w2; x [batch, seq, 8], z [unk__7, 6] (an exporter's name for the batch), and
    an unnamed free axis on the output."""
    vi = helper.make_tensor_value_info
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("ReduceSum", ["h", "axis"], ["r"], keepdims=0),
        helper.make_node("Add", ["r", "z"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["out"]),
    ]
    inits = [
        numpy_helper.from_array(W1, "w1"),
        numpy_helper.from_array(W2, "w2"),
        numpy_helper.from_array(np.array([1], np.int64), "axis"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [vi("x", TensorProto.FLOAT, ["batch", "seq", 8]), vi("z", TensorProto.FLOAT, ["unk__7", 6])],
        [vi("out", TensorProto.FLOAT, [None, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _want(x, z):
    return ((x @ W1).sum(1) + z) @ W2


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dims")
    onnx.save(named_mlp(), tmp / "m.onnx")
    import_onnx(tmp / "m.onnx", tmp / "m.edge.onnx")
    return tmp / "m.edge.onnx"


def _feeds(b=2, s=5):
    return {"x": RNG.standard_normal((b, s, 8)).astype(np.float32), "z": RNG.standard_normal((b, 6)).astype(np.float32)}


@pytest.mark.parametrize("strategy", ["hybrid", "bound", "rebuild"])
def test_the_override_reaches_every_session_and_outputs_are_static(model, strategy):
    feeds = _feeds()
    with Runtime(model, strategy=strategy) as free:
        want = free.run(feeds)["out"]
    dims = {"batch": 2, "seq": 5, "unk__7": 2}
    with Runtime(model, strategy=strategy, dims=dims) as rt:
        assert rt.dims == dims and rt.backend.dims == dims
        got = rt.run(feeds)["out"]
        rt.wait_idle()
        sessions = [s for s in (rt.backend._static, rt.backend._bound) if s is not None]
        assert len(sessions) == (2 if strategy == "hybrid" else 1)
        for s in sessions:
            shapes = {i.name: i.shape for i in s.get_inputs()}
            assert shapes["x"] == [2, 5, 8] and shapes["z"] == [2, 6]
            assert [o.shape for o in s.get_outputs()] == [[2, 3]]  # static: the override reached shape inference
        assert rt.info.fingerprint == free.info.fingerprint  # a run option, not a model change
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, _want(feeds["x"], feeds["z"]), rtol=1e-4, atol=1e-4)


def test_a_rebuild_after_a_write_keeps_the_dims(model):
    from runtimes import WeightWrite

    with Runtime(model, strategy="rebuild", dims={"seq": 5}) as rt:
        first = rt.backend._static
        w = rt.backend.read("w1").copy()
        rt.backend.write(rt.backend.prepare([WeightWrite("w1", None, w)]))
        rt.wait_settled()
        assert rt.backend._static is not first
        assert rt.backend._static.get_inputs()[0].shape == ["batch", 5, 8]
        assert rt.run(_feeds(3, 5))["out"].shape == (3, 3)


def test_a_feed_of_another_size_is_refused_naming_the_dimension(model):
    with Runtime(model, dims={"seq": 5}) as rt:
        with pytest.raises(ConfigError) as e:
            rt.run(_feeds(2, 4))
        msg = str(e.value)
        assert "has shape (2, 4, 8)" in msg and "[batch, seq=5, 8]" in msg
        assert "dimension 'seq' is fixed to 5 by dims" in msg and "feed that size" in msg
        assert rt.run(_feeds(1, 5))["out"].shape == (1, 3)  # the free batch stays free


def test_a_name_the_model_does_not_declare_names_its_dims_per_input(model):
    with pytest.raises(ConfigError) as e:
        Runtime(model, dims={"batch": 1, "sequence": 128})
    msg = str(e.value)
    assert "dims ['sequence'] are not dimensions model" in msg
    assert "x: ['batch', 'seq']; z: ['unk__7']" in msg and "--dim NAME=SIZE" in msg


@pytest.mark.parametrize(
    "dims, words",
    [
        ({"batch": 0}, "dims['batch'] is 0; a size is from 1 to 2147483647"),
        ({"batch": -3}, "dims['batch'] is -3"),
        ({"batch": 2**31}, "dims['batch'] is 2147483648; a size is from 1 to 2147483647"),
        ({"batch": True}, "dims['batch'] must be an integer size from 1 to 2147483647, got bool True"),
        ({"batch": 1.0}, "got float 1.0"),
        ({"batch": np.float32(2)}, "got float32"),
        ({"batch": "2"}, "got str '2'"),
        ({"batch": None}, "got NoneType None"),
        ({"": 1}, "a dimension name must be a non-empty string"),
        ({3: 1}, "a dimension name must be a non-empty string, got 3"),
        ([("batch", 1)], "dims must be a mapping of dimension name to size"),
        ("batch=1", "dims must be a mapping of dimension name to size"),
    ],
)
def test_bad_sizes_and_names_are_refused_before_the_model_is_read(model, dims, words):
    with pytest.raises(ConfigError) as e:
        Runtime(model, dims=dims)
    assert words in str(e.value)


def test_sizes_of_numpy_ints_are_taken_and_the_options_check_them_too():
    assert check_dims({"batch": np.int64(4)}) == {"batch": 4} and type(check_dims({"b": np.int32(2)})["b"]) is int
    with pytest.raises(ConfigError, match="dims\\['b'\\] is 0"):
        BackendOptions(dims={"b": 0})
    assert parse_dim_flags(["batch=1", " seq = 128 "]) == {"batch": 1, "seq": 128}
    for bad, words in [
        ("batch", "--dim takes NAME=SIZE"),
        ("=3", "--dim takes NAME=SIZE"),
        ("b=-1", "--dim takes NAME=SIZE"),
        ("b=1.5", "--dim takes NAME=SIZE"),
        ("b=" + "9" * 5000, "--dim takes NAME=SIZE"),
        ("b=0", "--dim['b'] is 0"),
        ("b=2147483648", "--dim['b'] is 2147483648"),
    ]:
        with pytest.raises(ConfigError, match=words.replace("[", "\\[").replace("]", "\\]")):
            parse_dim_flags([bad])
    with pytest.raises(ConfigError, match="--dim b given twice"):
        parse_dim_flags(["b=1", "b=2"])


def test_a_size_that_contradicts_a_fixed_axis_is_a_typed_error(model):
    """batch 2 and unk__7 3 meet in an Add: onnxruntime refuses at load or at run; either is a ConfigError naming
    the dims, never onnxruntime's own exception or a FormatError blaming the file."""
    dims = {"batch": 2, "unk__7": 3}
    try:
        rt = Runtime(model, dims=dims)
    except EdgeError as e:
        assert type(e) is ConfigError and not isinstance(e, FormatError)
        assert "dims {'batch': 2, 'unk__7': 3}" in str(e) and "load without dims" in str(e)
        return
    with rt, pytest.raises(ConfigError) as e:  # the feeds pass the checks: each dimension has its own size
        rt.run({"x": np.ones((2, 5, 8), np.float32), "z": np.ones((3, 6), np.float32)})
    assert "dims {'batch': 2, 'unk__7': 3} fix a size the graph contradicts" in str(e.value)


def test_generated_inputs_take_the_fixed_sizes(model):
    with Runtime(model, dims={"batch": 3, "seq": 7}) as rt:
        feeds = generate_inputs(model, rt.info.inputs, batch=1, specs=rt.backend.input_specs)
        assert feeds["x"].shape == (3, 7, 8) and feeds["z"].shape == (1, 6)  # unk__7 free: the batch given
        assert rt.run(feeds)["out"].shape == (3, 3)
        spec = rt.backend.input_specs["x"].shape
        assert spec == (3, 7, 8) and isinstance(spec[0], FixedDim) and repr(spec[0]) == "batch=3"


def test_a_tflite_engine_refuses_dims_rather_than_ignoring_them(tmp_path):
    src = DIGITS / "encoder.tflite"
    if not src.is_file():
        pytest.skip("make demo has not built the digits .tflite")
    pytest.importorskip("ai_edge_litert")
    shutil.copy(src, tmp_path / "encoder.tflite")
    with pytest.raises(ConfigError) as e:
        Runtime(tmp_path / "encoder.tflite", dims={"batch": 1})
    assert "backend 'tflite' takes none" in str(e.value) and "backend='onnxruntime'" in str(e.value)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    if not (DIGITS / "encoder.onnx").is_file():
        pytest.skip("make demo has not built the digits encoder")
    tmp = tmp_path_factory.mktemp("digits")
    for name in ("encoder.onnx", "shira-rotate.safetensors"):
        shutil.copy(DIGITS / name, tmp / name)
    return tmp


@pytest.mark.parametrize("batch", [1, 4])
def test_the_demo_encoder_under_dims_switches_an_adapter_with_the_same_outputs(digits, batch):
    x = np.random.default_rng(batch).standard_normal((batch, 1, 8, 8)).astype(np.float32)
    out = {}
    for key, dims in (("free", None), ("fixed", {"batch": batch})):
        with Runtime(digits / "encoder.onnx", dims=dims) as rt:
            base = rt.run({"pixels": x})
            rt.load_adapter(digits / "shira-rotate.safetensors")
            rt.switch("rotate")
            rt.wait_settled()  # each state run on the rebuilt prepacked session (the bound one sums in another order)
            tuned = rt.run({"pixels": x})
            rt.switch(None)
            rt.wait_settled()
            back = rt.run({"pixels": x})
            rt.wait_idle()
            if dims:
                assert rt.backend._bound.get_inputs()[0].shape == [batch, 1, 8, 8]
                assert {o.name: o.shape for o in rt.backend._static.get_outputs()}["logits"][0] == batch
            out[key] = (base, tuned, back)
    # not bit-equal: with a static batch onnxruntime's extended optimizer turns the MatMul+Add pairs into Gemm
    # (14 Gemm against 1 free), another summation order; measured 4.8e-7 at most on the logits (|logits| < 7)
    for a, b in zip(out["free"], out["fixed"]):
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=2e-6)
    assert not np.array_equal(out["fixed"][0]["logits"], out["fixed"][1]["logits"])  # the adapter did something
    np.testing.assert_array_equal(out["fixed"][0]["logits"], out["fixed"][2]["logits"])


def test_a_run_failure_under_dims_names_them():
    """The run path (onnxruntime 1.2x refuses the contradiction above at load already): a kernel's failure of a
    runtime with dims says the dims may contradict the graph, besides the sizes fed."""
    from edge import run_errors

    e = RuntimeError(
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Add node. "
        "Name:'/add' Status Message: Attempting to broadcast an axis by a dimension other than 1. 2 by 3"
    )
    msg = str(run_errors.checked_failure(e, "m", {"x": ("batch", 5, 8)}, {"batch": 2, "unk__7": 3}))
    assert "in its Add node '/add'" in msg and "dims {'batch': 2, 'unk__7': 3} fix a size the graph contradicts" in msg
    assert msg.endswith("check the dims, or run the file with onnxruntime directly for the node's whole message")
    assert "dims" not in str(run_errors.checked_failure(e, "m", {"x": ("batch", 5, 8)}))
