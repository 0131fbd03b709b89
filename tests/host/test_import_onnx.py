"""`edge import-onnx` on a model exported elsewhere (plain ``torch.onnx.export``, no project metadata), adapted."""

from __future__ import annotations

import argparse
import copy
import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.errors import AdapterMismatchError, ConfigError, FormatError  # noqa: E402
from edge.format.adapter import Adapter, SparseDelta  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

TARGETS = ("conv1.weight", "dw.weight", "conv2.weight", "proj.weight", "fc1.weight", "fc2.weight")


class MlpCnn(torch.nn.Module):
    """Conv, depthwise conv, 1x1 conv, a linear on a 3-D tensor (exported as MatMul) and two on 2-D (Gemm)."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8) if bn else torch.nn.Identity()
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv2 = torch.nn.Conv2d(8, 4, 1)
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.proj = torch.nn.Linear(16, 16)
        self.fc1 = torch.nn.Linear(64, 16)
        self.fc2 = torch.nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = self.pool(self.conv2(torch.relu(self.dw(x))))
        x = torch.relu(self.proj(x.flatten(2)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class _LastHidden(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state


def foreign_export(model, path) -> None:
    """What a user who never heard of this project does: the TorchScript-based exporter, defaults."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(2, 3, 8, 8),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}},
        )


def shira(model, info, names, seed: int = 0, n: int = 6) -> tuple[Adapter, dict]:
    """A SHiRA adapter in torch layout (indices into ``model``'s parameters) under the model's target ``names``."""
    rng = np.random.default_rng(seed)
    params = dict(model.named_parameters())
    deltas, torch_deltas = {}, {}
    for pname, tname in names.items():
        shape = tuple(params[pname].shape)
        flat = rng.choice(int(np.prod(shape)), size=n, replace=False)
        idx = np.stack(np.unravel_index(flat, shape)).astype(np.int32)
        values = rng.standard_normal(n).astype(np.float32) * 0.5
        deltas[tname] = SparseDelta(idx, values)
        torch_deltas[pname] = (idx, values)
    shapes = {names[p]: tuple(params[p].shape) for p in names}
    return Adapter("shira", info.fingerprint, deltas, shapes), torch_deltas


def merged(model, torch_deltas):
    out = MlpCnn()
    out.load_state_dict(model.state_dict())
    with torch.no_grad():
        for pname, (idx, values) in torch_deltas.items():
            dict(out.named_parameters())[pname][tuple(idx)] += torch.from_numpy(values)
    return out.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("foreign")
    torch.manual_seed(0)
    model = MlpCnn().eval()
    foreign_export(model, tmp / "net.onnx")
    save_file(model.state_dict(), tmp / "net.safetensors")
    return {"dir": tmp, "model": model}


def _check_switch(path, model, names) -> None:
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    with Runtime(path) as rt:
        base = rt.run({"x": x})["y"]
        before = {t: rt.weights(t) for t in names.values()}
        adapter, torch_deltas = shira(model, rt.info, names)
        rt.load_adapter(adapter)
        rt.switch("shira")
        got = rt.run({"x": x})["y"]
        rt.switch(None)
        rt.wait_settled()  # the prepacked session again, as for `base`
        undone = rt.run({"x": x})["y"]
        for t, w in before.items():
            np.testing.assert_array_equal(rt.weights(t), w)
    with torch.no_grad():
        want_base = model(torch.from_numpy(x)).numpy()
        want = merged(model, torch_deltas)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(base, want_base, atol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - base).max() > 1e-3  # the adapter did change something
    np.testing.assert_array_equal(undone, base)


def test_foreign_export_has_no_metadata(exported):
    with pytest.raises(FormatError, match="edge import-onnx"):
        Runtime(exported["dir"] / "net.onnx")


def test_import_with_state_dict_names_every_weight_and_switches_shira(exported):
    out = exported["dir"] / "named.onnx"
    report = import_onnx(exported["dir"] / "net.onnx", out, state_dict=exported["dir"] / "net.safetensors")
    info = report.info
    assert sorted(info.tensors) == sorted(TARGETS) and info.name == "net"
    assert not report.unmatched and not report.ambiguous and not report.missing
    assert info.tensors["proj.weight"].transposed and info.tensors["proj.weight"].initializer.startswith("onnx::")
    assert not info.tensors["fc1.weight"].transposed and info.tensors["dw.weight"].shape == (8, 1, 3, 3)
    model = exported["model"]
    with Runtime(out) as rt:
        for t in TARGETS:
            np.testing.assert_array_equal(rt.weights(t), dict(model.named_parameters())[t].detach().numpy())
    _check_switch(out, model, {t: t for t in TARGETS})


def test_import_without_names_keeps_onnx_names_in_torch_layout(exported):
    out = exported["dir"] / "unnamed.onnx"
    info = import_onnx(exported["dir"] / "net.onnx", out).info
    matmul = [k for k in info.tensors if k.startswith("onnx::MatMul")]
    assert len(info.tensors) == 6 and len(matmul) == 1 and "fc2.weight" in info.tensors
    names = {t: t for t in TARGETS if t != "proj.weight"} | {"proj.weight": matmul[0]}
    _check_switch(out, exported["model"], names)


def test_the_command_line_and_targets(exported, capsys):
    from edge.commands import import_onnx as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    out = exported["dir"] / "cli.onnx"
    args = parser.parse_args(
        ["import-onnx", str(exported["dir"] / "net.onnx"), "--out", str(out), "--hf", str(exported["dir"])]
        + ["--targets", "fc1", "conv?.weight", "--strict"]
    )
    with pytest.raises(FormatError, match="no model.safetensors"):
        args.func(args)
    args.hf = None
    args.state_dict = exported["dir"] / "net.safetensors"
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["targets"] == 3 and summary["renamed"] == 6
    with Runtime(out) as rt:
        assert sorted(rt.info.tensors) == ["conv1.weight", "conv2.weight", "fc1.weight"]
    with pytest.raises(ConfigError, match=r"targets \['nope'\] match no weight"):
        import_onnx(exported["dir"] / "net.onnx", out, targets=["nope"])


def test_pickle_state_dicts_are_refused(exported, tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(FormatError, match="pickle"):
        import_onnx(exported["dir"] / "net.onnx", tmp_path / "o.onnx", state_dict=tmp_path / "pytorch_model.bin")
    with pytest.raises(FormatError, match=r"pytorch_model.bin.*pickle, refused"):
        import_onnx(exported["dir"] / "net.onnx", tmp_path / "o.onnx", state_dict=tmp_path)


def _bn_model(seed: int = 1) -> MlpCnn:
    torch.manual_seed(seed)
    model = MlpCnn(bn=True).eval()
    with torch.no_grad():  # a trained BatchNorm: the folded filter differs from conv1.weight per channel
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.running_mean.uniform_(-1.0, 1.0)
        model.bn.weight.uniform_(-2.0, 2.0)
    return model


def test_folded_batchnorm_is_matched_by_its_channel_scale_and_equal_weights_are_reported(tmp_path):
    model = _bn_model()
    with torch.no_grad():
        model.fc2.weight.zero_()  # equal to no other weight: still one match
        model.fc1.weight[:, 16:] = 0
    params = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params["copy_of_fc1.weight"] = params["fc1.weight"].copy()  # two parameters of one value: the
    params["copy_of_proj.weight"] = params["proj.weight"].copy()  # initializer's name decides, if it is one
    params["not_conv1.weight"] = params["conv1.weight"] * np.float32(1.0001) + np.float32(1e-3)  # no one scale
    foreign_export(model, tmp_path / "bn.onnx")
    report = import_onnx(tmp_path / "bn.onnx", tmp_path / "bn.edge.onnx", state_dict=params)
    conv1 = report.info.tensors["conv1.weight"]  # BatchNorm was folded into it by the exporter
    bn = model.bn
    want = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    np.testing.assert_allclose(conv1.channel_scale, want, rtol=1e-6)
    assert conv1.initializer != "conv1.weight" and report.renamed[conv1.initializer] == "conv1.weight"
    assert not report.unmatched and "conv1.weight" not in report.missing
    (matmul,) = [k for k in report.info.tensors if k.startswith("onnx::MatMul")]  # kept its ONNX name
    assert report.ambiguous == {matmul: ("copy_of_proj.weight", "proj.weight")}
    assert report.renamed["fc1.weight"] == "fc1.weight" and report.renamed["fc2.weight"] == "fc2.weight"
    with pytest.raises(AdapterMismatchError, match="nothing was written"):
        import_onnx(tmp_path / "bn.onnx", tmp_path / "strict.onnx", state_dict=params, strict=True)
    assert not (tmp_path / "strict.onnx").exists()
    # only a parameter that reaches no target: the refusal names that alone, not ONNX names kept
    only = {k: v for k, v in params.items() if not k.startswith(("copy_of", "not_conv1"))}
    only["unused.weight"] = np.ones((3, 5), np.float32)
    with pytest.raises(AdapterMismatchError) as refused:
        import_onnx(tmp_path / "bn.onnx", tmp_path / "strict.onnx", state_dict=only, strict=True)
    said = str(refused.value)
    assert "1 parameter(s) reach no adapter target ['unused.weight']" in said, said
    assert "match no parameter" not in said and "ambiguous" not in said and "ONNX names" not in said
    assert said.endswith("Without --strict the file is written with the targets it has")
    assert not (tmp_path / "strict.onnx").exists()


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_a_shira_adapter_on_a_batchnorm_folded_conv_matches_torch(tmp_path, dynamo):
    """Both torch exporters fold BatchNorm; the dynamo one even keeps the name ``conv1.weight`` for the folded value."""
    model = _bn_model(seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(2, 3, 8, 8),),
            str(tmp_path / "bn.onnx"),
            dynamo=dynamo,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes=None if dynamo else {"x": {0: "batch"}},
        )
    params = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    report = import_onnx(tmp_path / "bn.onnx", tmp_path / "bn.edge.onnx", state_dict=params, strict=True)
    assert report.info.tensors["conv1.weight"].channel_scale is not None
    assert report.info.tensors["dw.weight"].channel_scale is None
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with Runtime(tmp_path / "bn.edge.onnx") as rt:
        base = rt.run({"x": x})["y"]
        adapter, torch_deltas = shira(model, rt.info, {"conv1.weight": "conv1.weight", "dw.weight": "dw.weight"})
        rt.load_adapter(adapter)
        rt.switch("shira")
        got = rt.run({"x": x})["y"]
        rt.switch(None)
        rt.wait_settled()
        np.testing.assert_array_equal(rt.run({"x": x})["y"], base)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for pname, (idx, values) in torch_deltas.items():
            dict(tuned.named_parameters())[pname][tuple(idx)] += torch.from_numpy(values)
        want = tuned(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(base, model(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(got - base).max() > 1e-3


def test_a_foreign_hf_export_takes_a_peft_shira_adapter(tmp_path):
    """A BERT exported as optimum does (TorchScript exporter), named from its HF folder, then PEFT's own SHiRA."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from edge.convert.peft import import_peft

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        attn_implementation="eager",
    )
    bert = transformers.BertModel(config, add_pooling_layer=False).eval()
    bert.save_pretrained(tmp_path / "hf")
    ids = torch.randint(1, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _LastHidden(bert),  # as optimum does: plain tensor inputs, the last hidden state out
            tuple(feeds.values()),
            str(tmp_path / "bert.onnx"),
            dynamo=False,
            input_names=list(feeds),
            output_names=["last_hidden_state"],
            dynamic_axes={k: {0: "batch", 1: "seq"} for k in feeds},
        )
    report = import_onnx(tmp_path / "bert.onnx", tmp_path / "bert.edge.onnx", state_dict=tmp_path / "hf")
    assert "encoder.layer.1.attention.self.query.weight" in report.info.tensors
    assert not report.unmatched and not report.ambiguous and not report.missing

    model = peft.get_peft_model(copy.deepcopy(bert), peft.ShiraConfig(r=2, target_modules=["query", "value"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    model.save_pretrained(str(tmp_path / "shira"))
    merged = model.merge_and_unload().eval()
    adapter = import_peft(tmp_path / "shira", tmp_path / "bert.edge.onnx")
    x = {k: v.numpy() for k, v in feeds.items()}
    with Runtime(tmp_path / "bert.edge.onnx") as rt:
        base = rt.run(x)["last_hidden_state"]
        rt.load_adapter(adapter)
        rt.switch(adapter.name)
        got = rt.run(x)["last_hidden_state"]
    with torch.no_grad():
        want = merged(**feeds).last_hidden_state.numpy()
    assert np.abs(want - base).max() > 1e-3
    np.testing.assert_allclose(got, want, atol=1e-5)
