"""A Hugging Face folder whose weights are a pickle is refused before anything loads it.

``edge export DIR`` let transformers load ``pytorch_model.bin`` (``torch.load``: a pickle) when the folder had no
safetensors file; edge never loads a pickle from a file a user hands it (README, "Security"). The refusal names
the file and how to convert it on a trusted machine; a folder with both files loads its safetensors.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

from edge.cli import main  # noqa: E402
from edge.errors import FormatError  # noqa: E402
from exporters.hf import export_hf_encoder  # noqa: E402

BERT = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def pickled(tmp_path_factory):
    root = tmp_path_factory.mktemp("lead16pickle")
    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(**BERT, intermediate_size=32, max_position_embeddings=32))
    model.save_pretrained(root / "bin")  # transformers 5 writes safetensors only: the pickle as older ones wrote it
    torch.save(model.state_dict(), root / "bin" / "pytorch_model.bin")
    (root / "bin" / "model.safetensors").unlink()
    assert (root / "bin" / "pytorch_model.bin").is_file() and not list((root / "bin").glob("*.safetensors"))
    return root / "bin"


def test_a_pickled_checkpoint_is_refused_and_never_unpickled(pickled, tmp_path, monkeypatch):
    def no_unpickling(*a, **k):
        raise AssertionError("torch.load ran on the user's pickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(FormatError, match=r"as pytorch_model\.bin, not safetensors; edge never loads pickles.*"):
        export_hf_encoder(pickled, tmp_path / "m.onnx", seq_len=8, progress=False)
    assert not list(tmp_path.iterdir())


def test_the_cli_refuses_it_in_one_line(pickled, tmp_path, capsys):
    code = main(["export", str(pickled), "--out", str(tmp_path / "m.onnx"), "--seq-len", "8", "-q"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("edge: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "save_pretrained(OUT, safe_serialization=True)" in lines[0]


def test_a_folder_with_both_files_loads_its_safetensors(pickled, tmp_path, monkeypatch):
    import shutil

    both = tmp_path / "both"
    shutil.copytree(pickled, both)
    torch.manual_seed(0)
    T.BertModel(T.BertConfig(**BERT, intermediate_size=32, max_position_embeddings=32)).save_pretrained(tmp_path / "st")
    shutil.copy(tmp_path / "st" / "model.safetensors", both / "model.safetensors")
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("unpickled")))
    info = export_hf_encoder(both, tmp_path / "m.onnx", seq_len=8, progress=False)
    assert (tmp_path / "m.onnx").is_file() and info.name
