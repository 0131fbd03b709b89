"""edge.memory_room: the smaller of MemAvailable and what a cgroup (v2 or v1) memory limit leaves, from fake files."""

from __future__ import annotations

from edge.memory_room import memory_room

MB = 1 << 20


def _tree(tmp_path, meminfo_mb=None, cgroup="0::/\n"):
    meminfo = tmp_path / "meminfo"
    if meminfo_mb is not None:
        meminfo.write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {meminfo_mb * 1024} kB\n")
    (tmp_path / "cgroup").write_text(cgroup)
    root = tmp_path / "fs"
    root.mkdir()
    return meminfo, tmp_path / "cgroup", root


def test_meminfo_alone(tmp_path):
    m, c, r = _tree(tmp_path, 3000)
    assert memory_room(m, c, r) == (3000 * MB, f"MemAvailable in {m}")


def test_a_v2_limit_on_a_parent_is_found_and_reclaimable_cache_is_not_counted(tmp_path):
    m, c, r = _tree(tmp_path, 3000, "0::/app/job\n")
    (r / "app" / "job").mkdir(parents=True)
    (r / "app" / "job" / "memory.max").write_text("max\n")  # no limit here
    (r / "app" / "memory.max").write_text(f"{1024 * MB}\n")
    (r / "app" / "memory.current").write_text(f"{600 * MB}\n")
    (r / "app" / "memory.stat").write_text(f"anon 1\ninactive_file {100 * MB}\n")
    room, where = memory_room(m, c, r)
    assert room == (1024 - 500) * MB
    assert where == f"the cgroup memory limit {r / 'app' / 'memory.max'}: 1,024 MB, 500 MB used"


def test_a_v1_limit_and_an_unlimited_one(tmp_path):
    m, c, r = _tree(tmp_path, 100, "4:memory:/box\n3:cpu:/x\n")
    (r / "memory" / "box").mkdir(parents=True)
    (r / "memory" / "box" / "memory.limit_in_bytes").write_text(f"{512 * MB}\n")
    (r / "memory" / "box" / "memory.usage_in_bytes").write_text(f"{256 * MB}\n")
    (r / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert memory_room(m, c, r) == (100 * MB, f"MemAvailable in {m}")  # MemAvailable is tighter here
    m.write_text(f"MemAvailable: {4096 * 1024} kB\n")
    assert memory_room(m, c, r)[0] == 256 * MB


def test_a_container_path_missing_under_the_mount_reads_the_mount_itself(tmp_path):
    m, c, r = _tree(tmp_path, None, "0::/not/here\n")
    (r / "memory.max").write_text(f"{300 * MB}\n")
    (r / "memory.current").write_text(f"{400 * MB}\n")  # over: nothing left, not negative
    assert memory_room(m, c, r)[0] == 0


def test_nothing_readable_is_none(tmp_path):
    assert memory_room(tmp_path / "no", tmp_path / "no", tmp_path / "no") is None
