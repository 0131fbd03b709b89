"""Two benchmarks writing their sections of one BENCHMARKS.md at once both keep theirs (helper C's audit).

``write_section`` reads the file, replaces one section and writes it back; two processes doing that at the
same moment used to lose one section (each wrote back the file it had read, without the other's section).
"""

from __future__ import annotations

import multiprocessing as mp
import re

from lab.benchmarks import write_section


def _writer(path: str, key: str, rounds: int, go) -> None:
    go.wait(30)
    for i in range(rounds):
        write_section(path, key, f"section {key}", f"round {i} of {key}\n" + "x" * 20_000)


def test_concurrent_sections_are_all_kept(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    ctx = mp.get_context("fork")
    go = ctx.Event()
    keys = ["a", "b", "c"]
    procs = [ctx.Process(target=_writer, args=(str(path), k, 15, go)) for k in keys]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    text = path.read_text()
    for k in keys:  # every section present, once, at its last round
        assert len(re.findall(rf"<!-- bench:{k} -->", text)) == 1, text[:2000]
        assert f"round 14 of {k}\n" in text
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
