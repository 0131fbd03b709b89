"""Cache trust: the private-group rule, a deleted working folder, a link loop (helper W, session 21, review U21 F4, F5).

Before: a group-writable level of the user's "private" group passed when another account had that group as its
PRIMARY gid (``gr_mem`` lists supplementary members only), the cache folder itself included; the warning path called
``os.getcwd()`` even for an absolute folder (a deleted working folder gave a bare FileNotFoundError); a link loop
above the cache folder came out as a raw ELOOP ``OSError``.
"""

from __future__ import annotations

import logging
import os

import pytest

from edge import cache_trust

pytestmark = pytest.mark.skipif(not hasattr(os, "geteuid"), reason="no POSIX ownership here")
LOG = logging.getLogger("edge.test_w21")


def _check(folder, caplog):
    caplog.clear()
    cache_trust._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        got = cache_trust.trusted_cache(folder, what="tap cache", env="EDGE_TAP_CACHE", log=LOG)
    return got, [r.getMessage() for r in caplog.records]


def test_a_group_that_is_another_accounts_primary_group_is_not_private(monkeypatch):
    import grp
    import pwd

    alice = pwd.struct_passwd(("alice", "x", 1000, 1000, "", "/home/alice", "/bin/sh"))
    bob = pwd.struct_passwd(("bob", "x", 4242, 1000, "", "/home/bob", "/bin/sh"))  # useradd -g alice bob
    everyone = [alice]
    monkeypatch.setattr(cache_trust, "_local_accounts", lambda: True)
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: {1000: alice}[uid])
    monkeypatch.setattr(pwd, "getpwall", lambda: everyone)
    monkeypatch.setattr(grp, "getgrgid", lambda gid: grp.struct_group(("alice", "x", gid, [])))
    assert cache_trust._private_group(1000, 1000)
    everyone.append(bob)
    assert not cache_trust._private_group(1000, 1000)  # bob writes it, though gr_mem is empty

    def unreadable():
        raise OSError("NSS")

    monkeypatch.setattr(pwd, "getpwall", unreadable)
    assert not cache_trust._private_group(1000, 1000)  # in doubt, not private
    monkeypatch.setattr(pwd, "getpwall", lambda: everyone[:1])
    monkeypatch.setattr(cache_trust, "_local_accounts", lambda: False)  # LDAP/sssd: members cannot be listed
    assert not cache_trust._private_group(1000, 1000)


def test_accounts_are_local_only_when_every_source_is_read_in_full(tmp_path):
    conf = tmp_path / "nsswitch.conf"
    cases = {
        "passwd: files systemd\ngroup: files [NOTFOUND=return] systemd # x\nhosts: files dns\n": True,
        "passwd: files\ngroup: compat\n": True,
        "passwd: files sss\ngroup: files\n": False,
        "passwd: files\ngroup: files ldap\n": False,
    }
    for text, local in cases.items():
        conf.write_text(text)
        assert cache_trust._local_accounts(str(conf)) is local, text
    assert cache_trust._local_accounts(str(tmp_path / "none")) is True  # glibc's default: files
    conf.write_bytes(b"passwd: files\n" * 10_000)  # over the 64 KiB bound: in doubt
    assert cache_trust._local_accounts(str(conf)) is False


def test_the_cache_folder_itself_must_be_the_users_alone(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(cache_trust, "_private_group", lambda gid, me: True)
    taps = tmp_path / "home" / ".cache" / "taps"
    taps.mkdir(parents=True, mode=0o700)
    os.chmod(taps.parent, 0o775)  # a parent in one's private group: passes
    assert _check(taps, caplog)[0] == taps
    os.chmod(taps, 0o775)  # the leaf: its entries' names are what edge runs, never group-writable
    got, (warned,) = _check(taps, caplog)
    assert got is None and f"{taps} is group-writable (mode 0775)" in warned and f"chmod go-w {taps}" in warned


def test_a_deleted_working_folder_still_gets_the_designed_warning(tmp_path, caplog, monkeypatch):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    got, (warned,) = _check(shared, caplog)  # before: FileNotFoundError from os.getcwd()
    assert got is None and f"the tap cache {shared} is not used: {shared} is a shared folder" in warned
    assert cache_trust._as_given("relative/taps") == "relative/taps"  # no working folder: named as given


def test_a_link_loop_is_named_as_a_link_that_does_not_resolve(tmp_path, caplog):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for given in (loop, loop / "taps"):
        got, (warned,) = _check(given, caplog)  # before: ELOOP out of trusted_cache for loop/taps
        assert got is None and f"{loop} is not a folder (a link that does not resolve)" in warned, warned
