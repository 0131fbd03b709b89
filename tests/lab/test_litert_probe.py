"""lab.litert_probe: the per-mapping resident memory its breakdown compares (``/proc/self/smaps``)."""

from __future__ import annotations

import sys

import pytest

from lab.litert_probe import mappings

SMAPS = """\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                  96 kB
7f0000000000-7f0000100000 r-xp 00000000 08:01 1234                       /usr/lib/libfoo.so
Size:               1024 kB
Rss:                 300 kB
7f0000200000-7f0000210000 rw-p 00000000 00:00 0
Size:                 64 kB
Rss:                  64 kB
7f0000300000-7f0000304000 rw-p 00000000 00:00 0
Size:                 16 kB
Rss:                   8 kB
7f0000400000-7f0000500000 r-xp 00000000 08:01 1234                       /usr/lib/libfoo.so
Size:               1024 kB
Rss:                  12 kB
"""


def test_mappings_groups_by_file_and_permissions_and_sums_anonymous(tmp_path):
    p = tmp_path / "smaps"
    p.write_text(SMAPS)
    assert mappings(str(p)) == {"[heap] rw-p": 96, "libfoo.so r-xp": 312, "[anon] rw-p": 72}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")
def test_mappings_of_this_process_add_up_to_its_resident_memory():
    from runtimes.base import rss_mb

    before = rss_mb()
    total = sum(mappings().values()) / 1024
    assert abs(total - before) < 0.05 * before + 2.0  # the same pages, read a moment apart
