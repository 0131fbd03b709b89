"""``exporters.onnx_ops``' ``rsub`` (``scalar - tensor``) computes as torch does for every scalar and tensor type.

Review T21 of b3dff02: an integer scalar outside the tensor's range (``300 - uint8``, ``-1 - uint8``, ``200 - int8``,
``10**10 - int32``) overflowed in the translation where torch wraps, and a symbolic float minus an integer tensor
(``x.shape[1] * 0.5 - x`` under a dynamic axis) kept the integer type, so onnxruntime refused the file with a raw
Fail. Every case here goes through ``export_onnx`` (validated against torch) and is then checked value and dtype
against torch on onnxruntime; two exports in all, shared by the module (fast).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from edge.errors import ExportValidationError  # noqa: E402


class _Static(torch.nn.Module):
    def forward(self, u8, i8, i32, i64, f16, f32, f64):
        return (
            300 - u8,  # 300 wraps to 44 in uint8, as torch converts the scalar
            -1 - u8,
            200 - i8,
            10**10 - i32,
            2.5 - u8,  # an integer tensor and a float: torch's default float (float32)
            1.0 - i64,  # XLNet's input_mask = 1.0 - attention_mask
            3 - i64,
            1.5 - i32,
            torch.rsub(i64, 1.5, alpha=2),
            torch.rsub(i32, 7, alpha=3),
            torch.rsub(f32, 1.5, alpha=2),
            3 - f32,
            1.0 - f16,
            1.1 - f64,
        )


_STATIC_IN = (
    torch.tensor([[0, 1, 44, 200, 255]], dtype=torch.uint8).repeat(2, 1),
    torch.tensor([[-128, -5, 0, 72, 127]], dtype=torch.int8).repeat(2, 1),
    torch.tensor([[-(2**31), -3, 0, 5, 2**31 - 1]], dtype=torch.int32).repeat(2, 1),
    torch.tensor([[0, 1, 1, 0, -7]]).repeat(2, 1),
    torch.linspace(-2, 2, 10).reshape(2, 5).half(),
    torch.linspace(-3, 3, 10).reshape(2, 5),
    torch.linspace(-1, 1, 10, dtype=torch.float64).reshape(2, 5),
)
_STATIC_NAMES = ("u8", "i8", "i32", "i64", "f16", "f32", "f64")
_STATIC_OUT = tuple(f"o{i}" for i in range(14))


class _Symbolic(torch.nn.Module):
    def forward(self, ids, x):
        n = ids.shape[1]  # symbolic under the dynamic "seq" axis
        return n * 0.5 - ids, n - ids, n * 0.5 - x, n - x, torch.rsub(ids, 2, alpha=n)


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _assert_as_torch(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        w = w.numpy()
        assert g.dtype == w.dtype, f"output {i}: {g.dtype} != torch {w.dtype}"
        assert g.shape == w.shape and np.array_equal(g, w), f"output {i}: {g.ravel()[:5]} != torch {w.ravel()[:5]}"


@pytest.fixture(scope="module")
def static_file(tmp_path_factory):
    from exporters.onnx import export_onnx

    path = tmp_path_factory.mktemp("rsub") / "static.onnx"
    export_onnx(_Static().eval(), _STATIC_IN, path, input_names=_STATIC_NAMES, output_names=_STATIC_OUT,
                name="rsub", progress=False)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def symbolic_file(tmp_path_factory):
    from exporters.onnx import export_onnx

    path = tmp_path_factory.mktemp("rsub") / "symbolic.onnx"
    examples = (torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]]), torch.linspace(-1, 1, 12).reshape(2, 6))
    export_onnx(_Symbolic().eval(), examples, path, input_names=("ids", "x"), output_names=("a", "b", "c", "d", "e"),
                dynamic_axes={"ids": {1: "seq"}, "x": {1: "seq"}}, name="rsub_sym", progress=False)  # fmt: skip
    return path


def test_integer_scalars_out_of_the_tensors_range_wrap_as_in_torch(static_file):
    got = _session(static_file).run(None, dict(zip(_STATIC_NAMES, (t.numpy() for t in _STATIC_IN))))
    want = _Static()(*_STATIC_IN)
    _assert_as_torch(got, want)
    assert got[0][0].tolist() == [44, 43, 0, 100, 45]  # 300 - u8 modulo 256
    assert got[1][0].tolist() == [255, 254, 211, 55, 0]  # -1 - u8
    assert got[2][0].tolist() == [72, -51, -56, -128, 73]  # 200 is -56 in int8
    assert got[3][0, 2] == 1410065408  # 10**10 modulo 2**32
    dtypes = [g.dtype for g in got]
    assert dtypes[:5] == [np.uint8, np.uint8, np.int8, np.int32, np.float32]
    assert dtypes[5:] == [np.float32, np.int64, np.float32, np.float32, np.int32, np.float32, np.float32,
                          np.float16, np.float64]  # fmt: skip
    assert got[5][0].tolist() == [1.0, 0.0, 0.0, 1.0, 8.0]  # XLNet's mask, float32


def test_a_symbolic_scalar_takes_torchs_result_type_at_every_length(symbolic_file):
    session = _session(symbolic_file)
    types = [o.type.removeprefix("tensor(").removesuffix(")") for o in session.get_outputs()]
    assert types == ["float", "int64", "float", "float", "int64"]  # n * 0.5 - int64 was int64: unloadable
    for seq in (6, 9):
        ids, x = torch.arange(2 * seq).reshape(2, seq) % 5, torch.linspace(-1, 1, 2 * seq).reshape(2, seq)
        got = session.run(None, {"ids": ids.numpy(), "x": x.numpy()})
        _assert_as_torch(got, _Symbolic()(ids, x))
        assert got[0][0, 1] == seq * 0.5 - 1 and got[1][0, 1] == seq - 1 and got[4][0, 1] == 2 - seq


def test_result_types_and_wrapping_are_torchs_own():
    from exporters.onnx_ops import result_dtype, wrap_int

    assert result_dtype("INT64", 1.0) == torch.get_default_dtype() == torch.float32
    assert result_dtype("UINT8", 2.5) == torch.float32 and result_dtype("UINT8", 300) == torch.uint8
    assert result_dtype("FLOAT16", 1.0) == torch.float16 and result_dtype("BFLOAT16", 3) == torch.bfloat16
    assert result_dtype("INT32", 10**10) == torch.int32 and result_dtype("DOUBLE", 1) == torch.float64
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        for value in (-1, 0, 127, 128, 200, 255, 256, 300, -129, 10**10, -(10**10), 2**63 - 1, -(2**63)):
            assert wrap_int(value, dtype) == torch.tensor(value, dtype=torch.int64).to(dtype).item(), (value, dtype)
    with pytest.raises(TypeError, match=r"scalar minus a BOOL tensor has no translation.*cast the tensor"):
        result_dtype("BOOL", 1)


def test_a_file_onnxruntime_cannot_load_is_a_typed_one_line_refusal(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from exporters.onnx import _validate

    graph = helper.make_graph(  # Sub of an int64 and a float: onnxruntime refuses it at load (the F2 symptom)
        [helper.make_node("Sub", ["x", "c"], ["y"])], "bad",
        [helper.make_tensor_value_info("x", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [2, 3])],
        [helper.make_tensor("c", TensorProto.FLOAT, [], [1.0])],
    )  # fmt: skip
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    with pytest.raises(ExportValidationError, match=r"onnxruntime cannot load the exported graph: .*not written") as e:
        _validate(torch.nn.Identity(), (torch.zeros(2, 3, dtype=torch.int64),), path, ("x",), ("y",), False, 1e-4, 1e-3)
    assert "\n" not in str(e.value) and "import-onnx" in str(e.value)
