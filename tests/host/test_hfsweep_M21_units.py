"""The pieces behind session 21's Hugging Face sweep mends, each alone (fast: one tiny export in all).

``check_seq_len`` takes a limit <= 0 as none (XLNet's -1); ``exporters.onnx_ops`` translates ``1.0 - int_tensor``
(which torch's decomposition could not export) in torch's result type; the read probe ignores metadata (XLNet's
``self.dtype`` asks its first parameter); a ``--dynamic-seq`` export of a model reading other weights at another
length is refused; ``--quiet`` holds back what torch prints during the export; refusals name the CLI flags beside the
Python keywords.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge.errors import ConfigError, ExportValidationError  # noqa: E402


class _Config(torch.nn.Module):
    def __init__(self, limit) -> None:
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=limit, model_type="toy")


def test_a_position_limit_of_zero_or_less_is_no_limit():
    from exporters.hf_checks import check_seq_len

    for limit in (-1, 0, None):
        check_seq_len(_Config(limit), 4096)  # XLNet's -1 refused every length: "use seq_len <= -1"
    with pytest.raises(ConfigError, match=r"seq_len 65 is longer than toy's 64 positions.*--seq-len 64"):
        check_seq_len(_Config(64), 65)


def test_float_minus_int_tensor_exports_in_torchs_result_type(tmp_path):
    import onnxruntime as ort

    from exporters.onnx import export_onnx

    class Rsub(torch.nn.Module):
        def forward(self, x, mask):
            return 1.0 - mask, 1 - mask, 2.5 - x, x * (1.0 - mask.transpose(0, 1)).sum()

    x, mask = torch.randn(2, 3), torch.tensor([[1, 1, 0], [1, 0, 0]])
    export_onnx(Rsub().eval(), (x, mask), tmp_path / "r.onnx", input_names=("x", "mask"),
                output_names=("a", "b", "c", "d"), name="rsub", progress=False)  # fmt: skip
    got = ort.InferenceSession(str(tmp_path / "r.onnx")).run(None, {"x": x.numpy(), "mask": mask.numpy()})
    want = [t.numpy() for t in Rsub()(x, mask)]
    assert [g.dtype for g in got] == [np.float32, np.int64, np.float32, np.float32]
    assert all(np.array_equal(g, w) for g, w in zip(got[:3], want[:3])) and np.allclose(got[3], want[3])


def test_the_read_probe_ignores_metadata_and_records_values():
    from exporters.hf_checks import read_storages

    class Probe(torch.nn.Module):
        input_names, modality = ("x",), "text"

        def __init__(self) -> None:
            super().__init__()
            self.asked = torch.nn.Parameter(torch.ones(3))  # its dtype, size and dim are asked, its values never
            self.used = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            assert self.asked.dtype == x.dtype and self.asked.size(0) == 3 and self.asked.dim() == 1
            return x * self.used

    probe = Probe()
    read = read_storages(probe, (torch.ones(2, 3),))
    assert probe.used.untyped_storage().data_ptr() in read
    assert probe.asked.untyped_storage().data_ptr() not in read


def test_unread_weights_become_buffers_and_a_length_dependent_path_is_refused():
    from exporters.hf_unused import drop_unread

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    first = {p.untyped_storage().data_ptr() for p in model[0].parameters()}
    everything = first | {p.untyped_storage().data_ptr() for p in model[1].parameters()}
    with pytest.raises(ConfigError) as e:  # read at one length only: one traced graph is wrong at the other
        drop_unread(model, first, "m", other=(4, everything))
    said = str(e.value)
    assert "1.weight" in said and "--dynamic-seq" in said and "--seq-len N" in said and "\n" not in said
    assert len(list(model.parameters())) == 4  # nothing changed by a refusal
    assert drop_unread(model, first, "m", other=(4, first)) == ["1.weight", "1.bias"]
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias"]
    assert sorted(n for n, _ in model.named_buffers()) == ["1.bias", "1.weight"]  # still there for forward()


def test_unused_refusal_words_only_the_missing_parameters_error():
    from exporters.hf_unused import unused_refusal

    assert unused_refusal(ExportValidationError("outputs differ"), torch.nn.Linear(2, 2), "m") is None
    err = ExportValidationError("2 parameter(s) are not initializers")
    err.parameters = ["a.key.weight", "a.value.weight"]
    encoder = SimpleNamespace(modality="vision", prefix="")
    said = str(unused_refusal(err, encoder, "DIR"))
    assert said.startswith("DIR: ") and "a.key.weight, a.value.weight" in said and "--image-size N" in said


def test_quiet_holds_back_what_the_libraries_print_during_the_export(capsys, caplog):
    from exporters.quiet import library_prints, quiet_host

    with quiet_host(), library_prints("torch.onnx.export"):
        print("def forward(self, arg0_1): ...", file=sys.stderr)
    assert "def forward" not in capsys.readouterr().err
    with library_prints("torch.onnx.export"):  # not quiet: shown
        print("shown", file=sys.stderr)
    assert "shown" in capsys.readouterr().err


def test_refusals_name_the_command_line_flags_beside_the_keywords():
    from exporters.hf import _default_pooling
    from exporters.hf_pool import check_tokens

    model = _Config(64)
    with pytest.raises(ConfigError, match=r"pass pooling= .*CLI: --pooling mean\|cls\|pooler"):
        _default_pooling(model)
    outputs = SimpleNamespace(last_hidden_state=torch.zeros(1, 4, 2, 2), pooler_output=torch.zeros(1, 4, 1, 1))
    with pytest.raises(ConfigError, match=r"Use pooling='pooler' \(CLI: --pooling pooler\)"):
        check_tokens("BitModel", "mean", outputs.last_hidden_state, None, outputs)


def test_a_tap_set_that_finds_nothing_names_the_file_and_the_flag(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edge.route.tapsets import resolve_tap_set

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "main_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )  # fmt: skip
    model = helper.make_model(graph)
    onnx.checker.check_model(model)
    with pytest.raises(ConfigError) as e:
        resolve_tap_set(model, "attn", source=tmp_path / "m.onnx")
    said = str(e.value)
    assert f"model 'main_graph' ({tmp_path / 'm.onnx'})" in said and "edge update --taps A,B" in said
