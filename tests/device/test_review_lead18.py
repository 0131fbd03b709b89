"""The lead's mends of review F's findings on the caller checks (tests/device/test_caller_D18_weights.py):
an adapter whose ``info`` nests without end is a FormatError (was a bare RecursionError), ``clip`` takes 0 and 1
as bools do, and a numpy ``str_`` list of outputs is served under the plain names."""

from __future__ import annotations

from dataclasses import replace

import _tiny
import numpy as np
import pytest

from edge.errors import ConfigError, FormatError
from edge.runtime import Runtime

X = np.random.default_rng(7).standard_normal((4, 10)).astype(np.float32)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    d = tmp_path_factory.mktemp("review-lead18")
    info = _tiny.make_mlp(d / "m.onnx", seed=3, sizes=(10, 16, 4))
    return d / "m.onnx", _tiny.random_adapter(info, seed=0, name="a")


def _deep(n: int) -> list:
    top = cur = []
    for _ in range(n):
        cur.append([])
        cur = cur[0]
    return top


def test_an_adapter_info_that_nests_without_end_is_a_format_error(kit):
    path, a = kit
    cyclic: dict = {"k": 1}
    cyclic["self"] = cyclic
    loop: list = [1]
    loop.append(loop)
    with Runtime(path, strategy="bound") as rt:
        for info in (cyclic, {"l": loop}, {"deep": _deep(5000)}):
            with pytest.raises(FormatError, match="more than 64 deep"):
                rt.load_adapter(replace(a, info=info))
            assert rt.adapters == []
        rt.load_adapter(replace(a, info={"deep": _deep(40)}))  # deep, but within the bound: held read-only
        with pytest.raises(TypeError, match="read-only"):
            rt.adapter("a").info["deep"].append(1)


def test_clip_takes_zero_and_one_and_nothing_else(kit):
    path, a = kit
    with Runtime(path, strategy="bound") as rt:
        rt.load_adapter(a, clip=0)
        rt.switch("a", clip=1)
        assert rt.active == {"a": 1.0}
        for bad in (2, -1, 1.0, "1", None):
            with pytest.raises(ConfigError, match="clip must be True or False"):
                rt.switch(None, clip=bad)
        assert rt.active == {"a": 1.0}


def test_numpy_str_output_names_are_served_under_plain_names(kit):
    path, _ = kit
    with Runtime(path, strategy="bound") as rt:
        name = rt.backend.output_names[0]
        want = rt.run({"x": X})[name]
        for _ in range(2):  # the second call takes the list remembered by the first
            out = rt.run({"x": X}, outputs=[np.str_(name)])
            assert [type(k) for k in out] == [str] and np.array_equal(out[name], want)


def test_string_weights_hash_by_value_and_never_as_a_numeric_tensor_of_the_same_bytes():
    from edge.format.modelinfo import _text_bytes, fingerprint

    labels = np.array(["cat", "dog"], dtype=object)
    same = fingerprint({"labels": labels.copy()})
    assert same == fingerprint({"labels": np.array(["cat", "dog"], dtype=object)})  # values, not pointers
    assert same != fingerprint({"labels": np.array(["cat", "eel"], dtype=object)})
    encoded = _text_bytes(labels)
    forged = np.frombuffer(encoded.tobytes(), np.uint8)  # a numeric tensor holding the encoding's bytes
    assert fingerprint({"labels": forged}) != same
