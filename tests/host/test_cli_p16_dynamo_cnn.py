"""``edge import-onnx`` and ``edge inspect`` on torch's own dynamo export of a small CNN with BatchNorm.

The exporter folds each eval BatchNorm into the Conv before it and keeps the Conv's torch name on the folded
values. Without a state dict those weights are now left out and said (``skipped``); with one they are named and
their per-channel scale recorded (``batchnorm_folded``), and every tensor ``edge inspect`` shows has the shape of
the initializer it names.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from edge.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("p16cnn")
    torch.manual_seed(0)
    nn = torch.nn
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
        nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    with torch.no_grad():
        for bn in (m[1], m[4]):  # stats far from the identity, so the folded weights differ from torch's
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    m.eval()
    torch.onnx.export(m, (torch.randn(1, 3, 16, 16),), str(root / "cnn.onnx"), dynamo=True, verbose=False)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(root / "cnn.safetensors"))
    return root, m


def _run(argv, capsys) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_dynamo_cnn_import_and_inspect_say_only_what_is_true(exported, capsys):
    root, m = exported
    proto = onnx.load(str(root / "cnn.onnx"))
    if not any(n.op_type == "Conv" and any("BatchNorm" in p.value for p in n.metadata_props) for n in proto.graph.node):
        pytest.skip("this torch/onnxscript does not fold BatchNorm into Conv at export")
    plain = _run(["import-onnx", str(root / "cnn.onnx"), "--out", str(root / "plain.onnx")], capsys)
    assert plain["targets"] == 1 and sorted(plain["skipped"]) == ["0.weight", "3.weight"]
    assert plain["batchnorm_folded"] == []
    named = _run(
        ["import-onnx", str(root / "cnn.onnx"), "--out", str(root / "named.onnx"), "--state-dict",
         str(root / "cnn.safetensors")], capsys,
    )  # fmt: skip
    assert named["targets"] == 3 and named["batchnorm_folded"] == ["0.weight", "3.weight"]
    shown = _run(["inspect", str(root / "named.onnx")], capsys)
    stored = {i.name: list(i.dims) for i in onnx.load(str(root / "named.onnx")).graph.initializer}
    params = dict(m.state_dict())
    assert shown["inputs"] == [v.name for v in proto.graph.input]
    assert shown["outputs"] == [v.name for v in proto.graph.output]
    for key, t in shown["tensors"].items():
        assert t["shape"] == stored[t["initializer"]] == list(params[key].shape), key
        assert t["transposed"] is False
    assert sorted(k for k, t in shown["tensors"].items() if "channel_scale" in t) == ["0.weight", "3.weight"]
    assert shown["extra"]["imported"]["producer"].startswith("pytorch ")
