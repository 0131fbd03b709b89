"""Whether a cache folder edge reads back from may be trusted: only when no one but this user (or root) can write
it, as ssh (``StrictModes``), pip and git (``safe.directory``) decide.

What a cache holds is run (the tap cache's tapped copy: :mod:`edge.route.tapcache`) or steers what runs (the
engine choice: :mod:`edge.engine_cache`), and its checks (a record's size and sha256 beside the file) live in the
same folder: whoever can write the folder can plant a matching pair. :func:`trusted_cache` makes the missing levels
(``0700``), resolves the folder (``os.path.realpath``: a ``..`` after a link goes where the kernel goes) and checks
every level of the resolved path; the caller then uses only the path it returns, so the folder checked is the
folder used. It is used only when

* it is a folder owned by the running user (by uid: a root process too refuses a folder of another uid) and is
  neither group- nor world-writable (a sticky bit does not help here: others could still create the entries'
  names);
* every folder above it, up to ``/``, is owned by this user or root and is not group- or world-writable unless it
  has the sticky bit (``/tmp``): whoever can write a parent can rename the cache away and put their own in its
  place between the check and the read, so the check stops at no parent (checking them costs an ``lstat`` each);
* a group-writable level whose group is the user's private group (named as the user, the user's primary group, no
  other members: ``umask 002`` systems such as Ubuntu and Fedora) counts as not group-writable, as in Debian's ssh;
  the group database is read only when such a level is met.

Otherwise it is not used at all (nothing read, written or pruned in it): the caller warns once per process and
folder, naming every level found wrong and the fix (``chmod go-w`` only for a folder of the user's own with a
mode problem; another owner's folder, a file or device, or a shared sticky folder such as ``/tmp``: set the
variable to a folder of your own), and runs uncached. Entries in a trusted folder are checked too
(:func:`entry_problem`): a link, another user's (root's are accepted, as root's parents are: root can write the
user's files anyway) or writable by others is not used (it is rebuilt). Folders the caches create are made
``0700``; their files follow the umask (the folder keeps others out). A cache shared by several users is not a
goal: give each user (and root) a folder of their own. Systems without ``os.geteuid`` (Windows) are not checked.
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import stat
from pathlib import Path

__all__ = ["entry_problem", "folder_problem", "make_levels", "make_private", "trusted_cache", "warn_once"]

_WARNED: set[str] = set()
_WHY = "; anyone who can write it could plant what edge then runs"
_KINDS = ((stat.S_ISREG, "a file"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
_KINDS += ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a link that does not resolve"))


def _me() -> int | None:
    return os.geteuid() if hasattr(os, "geteuid") else None


def _user(uid: int) -> str | None:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return None


def _who(uid: int) -> str:
    """``uid 1000 (alice)``: the name only on this (warning) path, as it reads the user database."""
    name = _user(uid)
    return f"uid {uid} ({name})" if name else f"uid {uid}"


def _private_group(gid: int, me: int) -> bool:
    """Whether ``gid`` is ``me``'s own group (user-private groups): named as the user, the user's primary group, no
    other members. Read only when a group-writable level is met."""
    try:
        import grp
        import pwd

        pw, gr = pwd.getpwuid(me), grp.getgrgid(gid)
        if not (gid == pw.pw_gid and gr.gr_name == pw.pw_name and set(gr.gr_mem) <= {pw.pw_name}):
            return False
        if not _local_accounts():
            return False
        # gr_mem lists supplementary members only: an account whose primary group it is can write it too
        return not any(o.pw_gid == gid and o.pw_uid != me for o in pwd.getpwall())
    except (ImportError, KeyError, OSError):  # not enumerable (NSS, LDAP): in doubt, not private
        return False


_LOCAL = {"files", "systemd", "compat"}  # sources pwd.getpwall and grp read in full


def _local_accounts(conf: str = "/etc/nsswitch.conf") -> bool:
    """Whether the accounts and groups come from sources read in full (no LDAP, sssd, NIS, winbind): only then can
    the members of a group be listed. No nsswitch.conf (glibc's default: files) counts as local."""
    from edge.errors import FormatError
    from edge.format.io import read_bounded

    try:
        text = read_bounded(conf, 65_536, what="nsswitch.conf").decode("utf-8", "replace")
    except (FormatError, OSError) as e:  # unreadable, over the limit: in doubt
        return isinstance(e.__cause__, FileNotFoundError)
    for line in text.splitlines():
        db, _, sources = line.split("#", 1)[0].partition(":")
        words = {w for w in sources.split() if not w.startswith("[")}
        if db.strip() in ("passwd", "group") and not words <= _LOCAL:
            return False
    return True


def _writable_by_others(st: os.stat_result, me: int | None = None) -> str:
    mode = st.st_mode
    group = mode & stat.S_IWGRP and not (me is not None and st.st_uid == me and _private_group(st.st_gid, me))
    who = [w for w, bit in (("group", group), ("world", mode & stat.S_IWOTH)) if bit]
    return f"{'- and '.join(who)}-writable (mode {stat.S_IMODE(mode):04o})" if who else ""


def _level_problem(path: str, st: os.stat_result, me: int, *, leaf: bool) -> tuple[str, str] | None:
    """(why, fix) for one level of a resolved path (the cache folder itself when ``leaf``); None when it is fine.
    ``fix`` is ``"chmod"`` (a folder of the user's own with a mode problem), ``"shared"`` or ``"own"``."""
    where = path if leaf else f"its parent {path}"
    if not stat.S_ISDIR(st.st_mode):  # a device, a file, a link left after realpath (a loop, or changed meanwhile)
        kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a folder")
        return f"{where} is not a folder ({kind})", "notdir"
    if leaf and st.st_uid != me:
        return f"{path} is owned by {_who(st.st_uid)}, not by you (uid {me})", "own"
    if not leaf and st.st_uid not in (me, 0):
        mine = f"you (uid {me}) or root" if me else "root (you)"
        return f"its parent {path} is owned by {_who(st.st_uid)}, not by {mine}: its owner can replace the cache", "own"
    sticky = st.st_mode & stat.S_ISVTX
    if sticky and not leaf:  # /tmp above the cache: others cannot rename or remove the user's names in it
        return None
    others = _writable_by_others(st, None if leaf else me)  # the cache folder itself must be the user's alone
    if not others:
        return None
    if leaf and sticky:  # /tmp, /dev/shm: a shared folder, never to be chmod-ed
        return f"{path} is a shared folder, {others} with the sticky bit: others can make the entries' names", "shared"
    fix = "chmod" if st.st_uid == me else "own"  # root's folder for a user: its mode is root's to change
    return f"{where} is {others}{'' if leaf else ' without the sticky bit'}", fix


def _problems(real: str, me: int, *, strict: bool) -> list[tuple[str, str, str]]:
    """(why, fix, level) for every wrong level of the resolved path ``real`` and its parents; a level not there
    is skipped unless ``strict`` (after the levels were made)."""
    found, path, leaf, owner = [], real, True, None  # owner: (uid, first level, its why) of a run
    while True:
        try:
            st = os.lstat(path)
        except OSError as e:  # not made yet, under a file or a link loop (that level says so)
            if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            if strict and e.errno != errno.ELOOP:
                found.append((f"{path} is not there (removed while it was checked)", "own", path))
            st = None
        why = _level_problem(path, st, me, leaf=leaf) if st is not None else None
        theirs = why is not None and " is owned by " in why[0]
        if theirs and owner is not None and st.st_uid == owner[0]:  # one phrase for a run of levels of one owner
            up = f"{owner[1]} and the folders above it up to {path} are owned by"
            found[-1] = (owner[2].replace(f"{owner[1]} is owned by", up), "own", owner[1])
        else:
            found += [(*why, path)] if why else []
            owner = (st.st_uid, path, why[0]) if theirs else None
        leaf, parent = False, os.path.dirname(path)
        if parent == path:
            return found
        path = parent


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why the cache folder ``folder`` (resolved; the folders above it too) is not trusted, or None when it is.
    Levels not there yet are skipped; an ``OSError`` other than a missing level is raised."""
    me = _me()
    if me is None:
        return None
    found = _problems(os.path.realpath(folder), me, strict=False)
    return "; ".join(why for why, _, _ in found) or None


def make_levels(folder: str | os.PathLike, mode: int) -> bool:
    """Create the missing levels of ``folder`` with ``mode`` (each one, not just the last); whether any was made
    (``OSError`` as it comes)."""
    path, missing = Path(os.path.abspath(folder)), []
    while not os.path.lexists(path) and path.parent != path:
        missing.append(path)
        path = path.parent
    for level in reversed(missing):
        try:
            os.mkdir(level, mode)
        except FileExistsError:
            pass
    return bool(missing)


def make_private(folder: str | os.PathLike) -> bool:
    """Create the missing levels of ``folder`` with mode 0700; whether any was made (``OSError`` as it comes)."""
    return make_levels(folder, 0o700)


def warn_once(key: str, log: logging.Logger, msg: str, *args) -> None:
    """``log.warning(msg, *args)`` the first time ``key`` is met in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg, *args)


def _advice(found: list[tuple[str, str, str]], env: str) -> str:
    chmod = [shlex.quote(level) for _, fix, level in found if fix == "chmod"]
    shared = next((level for _, fix, level in found if fix == "shared"), None)
    own = f"set {env} to a folder of your own (created 0700 when missing)"
    if shared is not None:
        me = _me()
        sub = os.path.join(shared, f"edge-{_user(me) or me}")
        own = f"set {env} to a private subfolder such as {shlex.quote(sub)} (edge makes it 0700), never chmod {shared}"
    return f"chmod go-w {' '.join(chmod)}, or {own}" if chmod and len(chmod) == len(found) else own


def trusted_cache(folder: str | os.PathLike, *, what: str, env: str, log: logging.Logger) -> Path | None:
    """The resolved cache folder to use for ``folder``, or None (warned once per process and folder) when it is not
    trusted. Its missing levels are made (0700) under the resolved path when the levels there pass, then every level
    of the path resolved again is checked: the caller uses the returned path only. ``what`` names the cache
    (``"tap cache"``), ``env`` the variable that points it elsewhere. ``OSError`` when it cannot be made or read."""
    me = _me()
    if me is None:
        make_private(folder)
        return Path(os.path.realpath(folder))
    found = _problems(os.path.realpath(folder), me, strict=False)
    if not found:
        make_private(os.path.realpath(folder))
        real = os.path.realpath(folder)  # again: what the kernel opens now, each level checked (none a link)
        found = _problems(real, me, strict=True)
        if not found:
            return Path(real)
    given, real = _as_given(folder), os.path.realpath(folder)  # as given: '..' kept
    where = given if real == given else f"{given} (it leads to {real})"
    warn_once(
        given,
        log,
        "the %s %s is not used: %s%s. This run goes uncached (nothing read there, its result not kept); fix: %s",
        what,
        where,
        "; ".join(why for why, _, _ in found),
        "" if all(fix == "notdir" for _, fix, _ in found) else _WHY,
        _advice(found, env),
    )
    return None


def _as_given(folder: str | os.PathLike) -> str:
    """``folder`` made absolute, '..' kept; as given when the working folder is gone."""
    text = os.fspath(folder)
    if os.path.isabs(text):
        return text
    try:
        return os.path.join(os.getcwd(), text)
    except OSError:
        return text


def entry_problem(path: str | os.PathLike) -> str | None:
    """Why one entry of a trusted cache (a file or folder) is not used: a symbolic link, another owner's (not the
    user's nor root's) or writable by others; None when it is fine or not there (the read that follows says what is
    wrong with it then)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    me = _me()
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if me is not None and st.st_uid not in (me, 0):
        return f"it is owned by {_who(st.st_uid)}, not by you (uid {me}) or root"
    others = _writable_by_others(st, me) if me is not None else ""
    return f"it is {others}" if others else None
