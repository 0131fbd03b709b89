"""``edge bench quantized``'s memory ladder: from which size an int8 hybrid runtime is below a plain fp32 session."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from edge.errors import ConfigError  # noqa: E402
from lab.bench_quantized import BASES, ONNX, _ladder_wanted, add_arguments, markdown  # noqa: E402
from lab.bench_quantized_ladder import LadderConfig, crossover, ladder, ladder_lines, ladder_models  # noqa: E402

TINY = LadderConfig(vocab=64, seq_len=16, head_dim=16, rungs=((32, 1), (16, 1)))


def _row(name, weights_mb, hybrid, plain):
    return {"model": name, "weights_mb": weights_mb, "hybrid_int8_rss_mb": hybrid, "plain_fp32_rss_mb": plain}


def test_the_crossover_is_the_smallest_rung_below_and_says_whether_every_larger_one_is_too():
    rows = [_row("a", 0.5, 3.0, 2.0), _row("b", 2.0, 5.0, 5.0), _row("c", 3.0, 6.5, 7.2), _row("d", 6.0, 10, 12)]
    x = crossover(rows)
    assert x == {
        "below": {"model": "c", "weights_mb": 3.0},
        "not_below": {"model": "b", "weights_mb": 2.0},
        "monotone": True,
    }
    x = crossover([*rows, _row("e", 9.0, 13.0, 12.9)])  # a larger rung above again: not one threshold
    assert x["below"]["model"] == "c" and x["not_below"]["model"] == "e" and not x["monotone"]
    assert crossover(rows[:2]) == {"below": None, "not_below": {"model": "b", "weights_mb": 2.0}, "monotone": False}
    assert crossover(rows[2:])["not_below"] is None


def test_a_rung_the_heads_do_not_divide_is_refused():
    with pytest.raises(ConfigError, match="multiple of head_dim 32"):
        LadderConfig(rungs=((48, 2),))
    with pytest.raises(ConfigError, match="none"):
        LadderConfig(rungs=())


def _args(*argv):
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="onnxruntime")
    add_arguments(p)
    return p.parse_args(list(argv))


def test_the_ladder_runs_with_every_model_and_memory_unless_told_and_only_on_onnxruntime():
    assert _ladder_wanted(_args()) and not _ladder_wanted(_args("--no-ladder"))
    assert not _ladder_wanted(_args("--model", "vit")) and _ladder_wanted(_args("--model", "vit", "--ladder"))
    assert not _ladder_wanted(_args("--no-memory")) and not _ladder_wanted(_args("--backend", "tflite"))
    for argv in (("--ladder", "--no-memory"), ("--ladder", "--backend", "tflite")):
        with pytest.raises(ConfigError, match="--ladder measures resident memory on onnxruntime"):
            _ladder_wanted(_args(*argv))


def test_each_rung_takes_the_plain_fp32_session_and_the_int8_runtimes_from_the_memory_bench(tmp_path, monkeypatch):
    """Files and children faked: which file each figure comes from, and the rows in order of fp32 weights."""
    import lab.bench_memory
    import lab.bench_quantized_ladder as ld

    files = {}
    for name, size in (("bert-h32-l1", 3000), ("bert-h16-l1", 1000)):
        for kind, n in (("fp32", size), ("int8", size // 4)):
            files[name, kind] = tmp_path / f"{name}-{kind}.onnx"
            files[name, kind].write_bytes(b"x" * n)
    monkeypatch.setattr(
        ld,
        "ladder_models",
        lambda cache, quantize, options, cfg, progress: [
            (m, files[m, "fp32"], files[m, "int8"], {}) for m in TINY_NAMES
        ],
    )
    calls = []

    def fake(path, feeds, *, strategies, threads, repeat, progress):
        calls.append((path.name, strategies, repeat))
        mb = path.stat().st_size / 1000  # a figure that names its file: 1 MB per 1000 bytes
        return {
            "params": path.stat().st_size,
            "plain": {"rss_mb": mb},
            "strategies": {s: {"rss_mb": mb + i + 1} for i, s in enumerate(strategies)},
        }

    monkeypatch.setattr(lab.bench_memory, "bench_memory", fake)
    result = ladder(tmp_path, None, {}, cfg=TINY, threads=2, progress=False)
    assert calls == [
        ("bert-h32-l1-fp32.onnx", ["hybrid"], 1),
        ("bert-h32-l1-int8.onnx", ["hybrid", "bound"], 1),
        ("bert-h16-l1-fp32.onnx", ["hybrid"], 1),
        ("bert-h16-l1-int8.onnx", ["hybrid", "bound"], 1),
    ]
    small, large = result["rows"]
    assert small["model"] == "bert-h16-l1" and large["model"] == "bert-h32-l1"
    assert small["params"] == 1000 and small["weights_mb"] == 4000 / 2**20
    assert (small["plain_fp32_rss_mb"], small["hybrid_fp32_rss_mb"]) == (1.0, 2.0)
    assert (small["plain_int8_rss_mb"], small["hybrid_int8_rss_mb"], small["bound_int8_rss_mb"]) == (0.25, 1.25, 2.25)
    assert (small["bytes_fp32"], small["bytes_int8"]) == (1000, 250)
    assert result["crossover"]["below"] == {"model": "bert-h32-l1", "weights_mb": 0.01}  # 1.75 < 3.0; 1.25 > 1.0


TINY_NAMES = ("bert-h32-l1", "bert-h16-l1")
DYNAMIC = BASES["int8-dynamic"]["minilm"]


@pytest.mark.slow  # two exports and 18 fresh children: about 35 s of CPU, minutes of wall time on a loaded machine
def test_a_two_rung_ladder_measures_every_file_in_fresh_children_and_names_its_crossover(tmp_path):
    result = ladder(tmp_path, ONNX.quantize, DYNAMIC, cfg=TINY, progress=False)
    rows = result["rows"]
    assert [r["model"] for r in rows] == ["bert-h16-l1", "bert-h32-l1"]  # sorted by fp32 weights
    assert result["base"] == "int8-dynamic" and result["config"]["seq_len"] == 16 and "rungs" not in result["config"]
    for r in rows:
        assert r["weights_mb"] == 4 * r["params"] / 2**20 and r["bytes_int8"] < r["bytes_fp32"]
        for k in ("plain_fp32", "hybrid_fp32", "plain_int8", "hybrid_int8", "bound_int8"):
            assert r[f"{k}_rss_mb"] > 0, k
    assert rows[0]["params"] < rows[1]["params"]
    assert result["crossover"] == crossover(rows)
    text = "\n".join(ladder_lines(result))
    assert text.count("| bert-h") == 2 and "Smallest ladder model where hybrid int8 < plain fp32:" in text
    section = markdown({"rows": [], "goals": {}, "ladder": result})
    assert "| encoder | params | fp32 weights MB | resident MB: plain fp32 |" in section

    folder = next(tmp_path.glob("bert-ladder-*"))
    files = sorted(folder.glob("*.onnx"))
    assert len(files) == 4  # each rung's fp32 file and its int8 twin, cached
    stamps = [f.stat().st_mtime_ns for f in files]
    again = ladder_models(tmp_path, ONNX.quantize, DYNAMIC, TINY, progress=False)
    assert [f.stat().st_mtime_ns for f in files] == stamps and len(again) == 2  # read back, not built again
