"""The device trainer on a model whose file fixes its batch (torch.onnx.export without dynamic axes): its frozen
activations are computed in chunks of that batch, the last one padded with zeros and its rows dropped; before, any
number of samples but the file's batch was refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.convert.onnx_import import import_onnx
from edge.learn.device_trainer import DeviceTrainer
from edge.learn.space import Arch
from edge.runtime import Runtime


def _mlp(batch) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal(s) * 0.4).astype(np.float32), n)
        for n, s in (("fc.w", (6, 8)), ("fc.b", (6,)), ("head.w", (6, 3)))
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "fc.w", "fc.b"], ["g"], transB=1),
        helper.make_node("Relu", ["g"], ["h"]),
        helper.make_node("MatMul", ["h", "head.w"], ["logits"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_the_device_trainer_runs_a_fixed_batch_model_on_any_number_of_samples(tmp_path, batch):
    onnx.save(_mlp(batch), tmp_path / "m.onnx")
    import_onnx(tmp_path / "m.onnx", tmp_path / "e.onnx")
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    with Runtime(tmp_path / "e.onnx") as rt:
        want = np.concatenate([rt.run({"x": np.repeat(x[i : i + 1], batch, 0)})["logits"][:1] for i in range(5)])
    tr = DeviceTrainer(tmp_path / "e.onnx", epochs=2, seed=0)
    acts = tr.activations(x)
    assert all(len(v) == 5 for v in acts.values())
    np.testing.assert_allclose(tr._forward(acts, tr._base2d())[0], want, atol=1e-5)
    grown = tr.train(Arch("shira", 0.3, "tail"), x, np.array([0, 1, 2, 0, 1]), "grown")
    with Runtime(tmp_path / "e.onnx") as rt:
        rt.load_adapter(grown)
        rt.switch("grown")
        assert rt.run({"x": x[:batch]})["logits"].shape == (batch, 3)
