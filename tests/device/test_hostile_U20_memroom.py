"""edge.memory_room counts a cgroup's page cache on both file LRU lists, active and inactive, as room (the kernel
reclaims it before its OOM killer runs); before U20 only the inactive list was, so a container that had just copied
the model (its pages active) could refuse a legitimate import. tmpfs/shared memory (on the anon lists) stays used."""

from __future__ import annotations

from edge.memory_room import memory_room

MB = 1 << 20


def _cgroup(tmp_path, cgroup: str, files: dict[str, str]):
    (tmp_path / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {8192 * 1024} kB\n")
    (tmp_path / "cgroup").write_text(cgroup)
    root = tmp_path / "fs"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(exist_ok=True)
    return memory_room(tmp_path / "meminfo", tmp_path / "cgroup", root)


def test_v2_active_page_cache_is_room(tmp_path):
    stat = f"anon {200 * MB}\nfile {1300 * MB}\nactive_file {1100 * MB}\ninactive_file {100 * MB}\nshmem {100 * MB}\n"
    room, where = _cgroup(
        tmp_path, "0::/\n", {"memory.max": f"{2048 * MB}\n", "memory.current": f"{1500 * MB}\n", "memory.stat": stat}
    )
    assert room == (2048 - 300) * MB  # anon 200 + shmem 100 (file counts it, the file LRU lists do not)
    assert where.endswith("2,048 MB, 300 MB used")


def test_v1_active_page_cache_is_room(tmp_path):
    stat = f"total_active_file {400 * MB}\ntotal_inactive_file {100 * MB}\nactive_file {1}\n"
    files = {
        "memory/box/memory.limit_in_bytes": f"{1024 * MB}\n",
        "memory/box/memory.usage_in_bytes": f"{900 * MB}\n",
        "memory/box/memory.stat": stat,
    }
    assert _cgroup(tmp_path, "4:memory:/box\n", files)[0] == (1024 - 400) * MB


def test_a_stat_missing_or_garbled_counts_no_cache(tmp_path):
    files = {"memory.max": f"{1024 * MB}\n", "memory.current": f"{600 * MB}\n", "memory.stat": "active_file lots\n"}
    assert _cgroup(tmp_path, "0::/\n", files)[0] == 424 * MB
    (tmp_path / "fs" / "memory.stat").unlink()
    assert memory_room(tmp_path / "meminfo", tmp_path / "cgroup", tmp_path / "fs")[0] == 424 * MB


def test_more_cache_than_usage_leaves_the_whole_limit(tmp_path):
    stat = f"active_file {900 * MB}\ninactive_file {900 * MB}\n"
    files = {"memory.max": f"{1024 * MB}\n", "memory.current": f"{600 * MB}\n", "memory.stat": stat}
    assert _cgroup(tmp_path, "0::/\n", files)[0] == 1024 * MB
