"""``edge profile --device`` reads each adapter once, through the runtime's signature policy (review finding F2).

Before: ``_profile_adapter`` (and ``backend="auto"``'s fit check) called ``inspect_adapter`` first: up to 2 GiB read
without the policy and the whole safetensors file parsed, so an unsigned corrupt file said FormatError instead of
SignatureError, and ``rt.load_adapter`` then read the file again (a file swapped in between paired one file's name
with the other's bytes). Now the file is read once through ``rt.policy`` (bounded by the model's largest adapter),
its name comes from those bytes, and the load takes the same bytes (:class:`edge.format.signing.ReadFile`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("cryptography")

import edge.format.adapter as fa  # noqa: E402
import edge.format.signing as signing  # noqa: E402
from edge.errors import SignatureError  # noqa: E402
from edge.format.signing import ReadFile, SignaturePolicy, generate_key, load_public_key, sign_file  # noqa: E402
from edge.profiling import ProfileConfig, profile_model  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

DIGITS = Path.home() / ".cache" / "edge" / "digits-07d9c19ac5e7"
QUICK = ProfileConfig(runs=2, warmup=1, switches=1, progress=False, engine_rounds=0, engine_runs=0)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not (DIGITS / "encoder.onnx").is_file():
        pytest.skip("make demo has not built the digits encoder")
    tmp = tmp_path_factory.mktemp("signed")
    for name in ("encoder.onnx", "shira-rotate.safetensors", "shira-invert.safetensors"):
        shutil.copy(DIGITS / name, tmp / name)
    pub = generate_key(tmp / "k.pem")
    yaml = (ROOT / "devices" / "x86-dev.yaml").read_text().replace("name: x86-dev", "name: signed-dev")
    (tmp / "signed-dev.yaml").write_text(yaml + f"trusted_keys: [{pub.read_text().strip()}]\n")
    good = (tmp / "shira-rotate.safetensors").read_bytes()
    (tmp / "unsigned-corrupt.safetensors").write_bytes(good[:-8])  # the header's offsets point past the end
    shutil.copy(tmp / "shira-rotate.safetensors", tmp / "signed.safetensors")
    sign_file(tmp / "signed.safetensors", tmp / "k.pem")
    return tmp


@pytest.fixture
def parsed(monkeypatch):
    """Every parse of adapter bytes (the metadata header, the whole file), by function name."""
    calls = []
    for name in ("adapter_from_bytes", "_read_metadata"):
        real = getattr(fa, name)
        monkeypatch.setattr(fa, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    return calls


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_ENGINE_CACHE", str(tmp_path / "engines"))


@pytest.mark.parametrize("backend", ["onnxruntime", "auto"])  # auto: its fit check read each adapter first too
def test_an_unsigned_corrupt_adapter_is_refused_for_its_signature_before_any_parse(setup, parsed, backend):
    with pytest.raises(SignatureError) as e:
        profile_model(
            setup / "encoder.onnx",
            setup / "signed-dev.yaml",
            adapters=[setup / "unsigned-corrupt.safetensors"],
            backend=backend,
            config=QUICK,
        )
    assert "unsigned-corrupt.safetensors is unsigned" in str(e.value) and parsed == []


def test_a_signed_adapter_is_read_once_and_profiled_under_its_own_name(setup, monkeypatch, parsed):
    reads = []
    real = signing.read_bounded
    monkeypatch.setattr(signing, "read_bounded", lambda p, *a, **k: reads.append(Path(p).name) or real(p, *a, **k))
    result = profile_model(
        setup / "encoder.onnx",
        setup / "signed-dev.yaml",
        adapters=[setup / "signed.safetensors"],
        backend="onnxruntime",
        config=QUICK,
    )
    (row,) = result["adapters"]
    assert row["name"] == "rotate" and row["bytes"] == (setup / "signed.safetensors").stat().st_size
    assert reads.count("signed.safetensors") == 1 and reads.count("signed.safetensors.sig") == 1
    assert parsed.count("adapter_from_bytes") == 1  # the load's, once; the name from the header of the same bytes


def test_the_load_takes_the_bytes_read_not_a_file_swapped_in_after(setup, tmp_path):
    """What was read (rotate) is what loads, under its name, though the path now holds invert."""
    path = tmp_path / "swapped.safetensors"
    shutil.copy(setup / "shira-rotate.safetensors", path)
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    with Runtime(setup / "encoder.onnx", strategy="rebuild") as rt:
        held = rt.policy.read_file(path, 1 << 24)
        shutil.copy(setup / "shira-invert.safetensors", path)  # swapped after the read
        assert rt.load_adapter(held) == "rotate"
        rt.switch("rotate")
        got = rt.run({"pixels": x})["logits"]
    with Runtime(setup / "encoder.onnx", strategy="rebuild") as rt:
        rt.load_adapter(setup / "shira-rotate.safetensors")
        rt.switch("rotate")
        np.testing.assert_array_equal(got, rt.run({"pixels": x})["logits"])


def test_read_bytes_are_given_only_to_the_policy_that_read_them(setup, tmp_path):
    keyed = SignaturePolicy((load_public_key(setup / "k.pub"),))
    policy = SignaturePolicy(None)
    held = policy.read_file(setup / "unsigned-corrupt.safetensors", 1 << 24)
    assert isinstance(held, ReadFile) and str(held) == str(setup / "unsigned-corrupt.safetensors")
    assert policy.read(held, 1 << 24) is held.data  # the policy that read them: the same bytes
    again = SignaturePolicy(None).read(held, 1 << 24)  # an equal policy reads the path anew (identity only, Q21 F1)
    assert again == held.data and again is not held.data
    with pytest.raises(SignatureError):  # a keyed policy reads and verifies the path itself
        keyed.read(held, 1 << 24)
    small = SignaturePolicy(None)
    with pytest.raises(Exception) as e:  # a tighter limit than the read's: read again, bounded by it
        small.read(held, 16)
    assert "16" in str(e.value)
