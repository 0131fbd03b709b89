"""The arithmetic of fused switching, on float weights and on quantized (int8/uint8) ones.

Float targets: ``w = base + sum_i(alpha_i * delta_i)``, the sum in float32 in the order the
adapters are given, added to the base value once (see :mod:`edge.runtime`).

Quantized targets (``TensorInfo.quant``: ``real = (q - zero_point) * scale``) are written as
integers on the base's own grid; scales and zero points never change. Every adapter is
turned, at load, into a delta in *grid steps* at each entry:

* an integer adapter (``SparseDelta.qvalues``): ``qvalues - base``, exact;
* a float adapter: ``delta / scale`` (the scale of the entry's channel, along the source
  axis ``QuantInfo.axis``), i.e. requantization onto the base grid.

Fused: ``q = base + rint(sum_i(alpha_i * steps_i))`` (round half to even). A value outside
the tensor's integer range (:func:`edge.format.qrange.weight_bounds`: ``[-127, 127]`` for a
symmetric int8 weight, else the type's) is refused with :class:`SaturationError` (nothing is written), or,
when the caller passes ``clip=True``, clipped and counted (:attr:`Fused.clipped`). Undo writes
the saved base integers, bit-exact.

What a runtime keeps per loaded adapter is here too: :class:`Prepared` (positions, deltas and base values, the
runtime's own arrays) and :func:`kept` (the adapter itself, read-only; a caller's own object copied and validated
again first), so nothing a caller holds reaches the weights.
"""

from __future__ import annotations

import gc
import hashlib
import math
import sys
import types
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from numbers import Real

import numpy as np

from edge.errors import ConfigError, SaturationError
from edge.format.adapter import Adapter, DenseDelta, SparseDelta
from edge.format.feeds import plain_name as plain_name  # re-exported: adapters_held, runtime
from edge.format.modelinfo import read_only
from edge.format.qrange import SAFE_BOUNDS

__all__ = [
    "Fused",
    "Layout",
    "RECORD_BYTES",
    "Prepared",
    "SHARE_BYTES",
    "SaturationError",
    "buffers",
    "check_finite",
    "data_owners",
    "entry_bytes",
    "fuse",
    "held_bytes",
    "kept",
    "merge_weights",
    "merged",
    "normalise",
    "objects",
    "plain_name",
    "positions_key",
    "same_positions",
]


@dataclass(frozen=True)
class Fused:
    """What a switch writes: per stored tensor, positions, base values and new values; and entries clipped."""

    touched: dict[str, tuple[np.ndarray, np.ndarray]]
    values: dict[str, np.ndarray]
    clipped: int = 0


def merged(
    tname: str, base: np.ndarray, acc: np.ndarray, *, clip: bool, what: str, bounds: tuple[int, int] | None = None
) -> tuple[np.ndarray, int]:
    """``base`` plus the fused delta ``acc`` (float32; grid steps for an integer ``base``), and entries clipped.

    ``bounds``: the tensor's range (:func:`edge.format.qrange.weight_bounds`: ``[-127, 127]`` for a symmetric int8
    weight, else the type's). None: the range no kernel misreads, ``[-127, 127]`` for int8 (an asymmetric weight
    may also hold -128: its caller passes its bounds), uint8's whole range."""
    if base.dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            return base + acc, 0
    lo, hi = SAFE_BOUNDS[str(base.dtype)] if bounds is None else bounds
    if not np.isfinite(acc).all():
        raise ConfigError(f"{what} gives non-finite grid steps in {tname!r}; nothing was changed")
    q = base.astype(np.int64) + np.rint(np.clip(acc, -(1 << 20), 1 << 20)).astype(np.int64)
    out = (q < lo) | (q > hi)
    n = int(out.sum())
    if n and not clip:
        raise SaturationError(
            f"{what} takes {n} of {q.size} entries of {tname!r} outside the {base.dtype} range [{lo}, {hi}] "
            f"(up to {int(q.min())}..{int(q.max())}); nothing was changed. Use smaller adapter weights, or pass "
            "clip=True (`edge profile --clip`) to clip them to the range (the count is reported)"
        )
    return np.clip(q, lo, hi).astype(base.dtype), n


def fuse(
    parts: Mapping[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]],
    *,
    clip: bool,
    what: str,
    bounds: Mapping[str, tuple[int, int]] | None = None,
) -> Fused:
    """Several weighted adapters at once: ``parts`` maps a stored tensor to (positions, alpha * delta, base) per
    adapter; overlapping positions add their deltas, then each entry is merged once with its base value, within
    ``bounds[tensor]`` (:meth:`edge.adapters_held.AdapterHolder.int_bounds`; a tensor not in it: :func:`merged`'s)."""
    touched, values, clipped = {}, {}, 0
    for tname, plist in parts.items():
        allpos = np.concatenate([q for q, _, _ in plist])
        pos, first, inv = np.unique(allpos, return_index=True, return_inverse=True)
        acc = np.zeros(pos.shape, np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            np.add.at(acc, inv, np.concatenate([v for _, v, _ in plist]))
        base = np.concatenate([b for _, _, b in plist])[first]
        touched[tname] = (pos, base)
        values[tname], n = merged(tname, base, acc, clip=clip, what=what, bounds=(bounds or {}).get(tname))
        clipped += n
    return Fused(touched, values, clipped)


@dataclass(frozen=True, eq=False)
class Layout:
    """The entries a group of held adapters writes (one object for all of them: compared by identity), with the
    digest of their positions (:func:`positions_key`) a load looks its twins up by."""

    key: bytes


@dataclass(frozen=True)
class Prepared:
    """An adapter resolved against a runtime's model: stored-layout flat positions per stored tensor. Its arrays are
    the runtime's own (never the caller's ``Adapter`` arrays), so nothing a caller holds can change a later switch."""

    adapter: Adapter  # read-only (:func:`kept`)
    index: Mapping[str, np.ndarray]  # stored tensor -> sorted flat positions (int32 where they fit, else int64)
    delta: Mapping[str, np.ndarray]  # stored tensor -> float32 deltas aligned with index (grid steps if quantized)
    base: Mapping[str, np.ndarray]  # stored tensor -> base values at index
    apply: object  # backend-prepared write of base + delta (the alpha = 1 fast path)
    restore: object  # backend-prepared write of the base values (undo)
    touched: Mapping[str, tuple[np.ndarray, np.ndarray]]  # stored tensor -> (index, base): what a switch records
    clipped: int = 0  # entries of a quantized base clipped to the integer range by ``apply`` (load_adapter(clip=True))
    layout: Layout | None = None  # shared by the adapters that write the same entries (:func:`same_positions`)

    def __post_init__(self) -> None:
        """``index`` as int32 where the tensor allows: only loads and fusing read it, never a single switch
        (``apply`` and ``restore`` hold their own ``intp`` positions, one array for both: numpy would cast any other
        index type on every switch). ``delta`` stays the runtime's own copy even where it equals the adapter's
        values: a caller can make an array :attr:`adapter` hands out writable again (``setflags``)."""
        index = {t: _narrow(pos) for t, pos in self.index.items()}
        same = {id(self.index[t]): index[t] for t in index}
        touched = {t: (same.get(id(pos), pos), b) for t, (pos, b) in self.touched.items()}
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "touched", touched)

    @property
    def arrays(self) -> list[np.ndarray]:
        """Every array this adapter keeps (not the arena the prepared writes write into): what :func:`held_bytes`
        counts."""
        found = [getattr(d, f.name) for d in self.adapter.tensors.values() for f in fields(d)]
        found += [*self.index.values(), *self.delta.values(), *self.base.values()]
        found += [a for pos, b in self.touched.values() for a in (pos, b)]
        for w in (self.apply, self.restore):
            for part in w.parts if hasattr(w, "parts") else w:  # an ArenaWrite, or the default list of WeightWrite
                found += list(part[1:]) if isinstance(part, tuple) else [part.index, part.values]
        return [a for a in found if isinstance(a, np.ndarray)]


def _narrow(pos: np.ndarray) -> np.ndarray:
    """Sorted positions as int32 when they fit (a read-only copy), else as they are."""
    if pos.dtype != np.int64 or (pos.size and int(pos[-1]) > np.iinfo(np.int32).max):
        return pos
    out = pos.astype(np.int32)
    out.setflags(write=False)
    return out


#: per entry of a sparse float adapter: its file's int32 index per dimension and float32 value; what the runtime keeps:
#: a float32 delta, and for the first adapter on its positions an int32 position (:func:`_compact`), and once its
#: writes are prepared the positions its apply and undo share (intp; a run of whole units is a slice, so at most)
_INDEX, _VALUE, _DELTA, _POSITION, _SWITCH_POSITION = 4, 4, 4, 4, np.dtype(np.intp).itemsize


def entry_bytes(itemsize: int, ndim: int = 2, *, first: bool = True, prepared: bool = True, file: bool = True) -> int:
    """Bytes a loaded sparse float adapter keeps per entry of a weight of ``ndim`` dimensions stored in
    ``itemsize``-byte elements (4: float32; 1: int8/uint8): its file's arrays (``file``), its delta and the new value
    its switch writes; the first adapter on its positions (``first``) also their position and base value, and once
    prepared (``prepared``) its undo's values and the positions apply and undo share. That is :func:`held_bytes` per
    entry at most (at least, with ``prepared=False``: what a load checks before preparing, edge.adapters_held). For a
    matrix: 40/31 bytes float32/int8 (at least 28/22), 20/17 on a shared mask."""
    n = (ndim * _INDEX + _VALUE if file else 0) + _DELTA + itemsize
    if first:
        n += _POSITION + itemsize + (itemsize + _SWITCH_POSITION if prepared else 0)
    return n


def held_bytes(adapters: Iterable[Prepared]) -> list[int]:
    """Bytes of the arrays each of ``adapters`` keeps, every buffer counted once: an array several adapters share
    (positions, base values and undo of adapters on one mask) counts with the first that holds it."""
    seen: set[int] = set()
    out = []
    for p in adapters:
        own = {k: a for k, a in buffers(p).items() if k not in seen}
        seen.update(own)
        out.append(sum(a.nbytes for a in own.values()))
    return out


#: what a memory budget's record of one held buffer takes (edge.adapters_held.HeldBuffers: a dict entry, id ->
#: (buffer, count)): the tuple, the int key (an id is past the small ints Python caches) and the dict's slot (hash, key
#: and value, and its index) at the table's fill just after it grows (a third): at most what a record takes
RECORD_BYTES = sys.getsizeof((None, 0)) + sys.getsizeof(1 << 40) + (3 * 8 + 8) * 3
#: what runtimes.lines keeps to share one positions array of a prepared write among writes (its key: a tuple of the
#: dtype, size, last position and a 16-byte digest; the weak reference and its slot)
SHARE_BYTES = (
    (sys.getsizeof(("<i8", 1 << 40, 1 << 40, bytes(16))) + sys.getsizeof(bytes(16)) + 2 * sys.getsizeof(1 << 40))
    + sys.getsizeof(weakref.ref(Fused))
    + RECORD_BYTES
)
_INLINE = sys.version_info >= (3, 11)  # an instance's attribute values kept beside it, no __dict__ made (CPython)
_SHARED = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, bool, type(None))


def objects(p: Prepared) -> tuple[dict[int, object], int]:
    """What ``p`` keeps as Python objects, for a memory budget: the objects that own its data by ``id`` (an array that
    owns its elements, or the ``bytearray``/``bytes`` a file's arrays view: ``sys.getsizeof`` of each is its data and
    its header), and the bytes of every other object that holds the data, each once: everything reachable from ``p``
    (the adapter, its deltas, names and shapes, the mappings, the prepared writes, each array's header, the views and
    memoryviews a file's arrays sit on), stopping at arrays (the arena its writes write into is the model's) and at
    classes, modules and functions. :func:`held_bytes` counts the data alone. One walk (a few objects per target
    tensor, never per entry)."""
    owners, views = _chains(p)
    n, seen, todo = 0, set(owners), [p, *views.values()]
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, _SHARED) or (type(o) is int and -5 <= o <= 256):  # shared, or counted
            continue
        seen.add(id(o))
        if isinstance(o, np.ndarray):  # its header: its data is its owner's, or the model's arena
            n += sys.getsizeof(o) - (o.nbytes if o.flags.owndata else 0)
            continue
        if type(o) is tuple and len(o) == 3 and isinstance(o[1], np.ndarray) and id(o[1]) not in seen:  # a write's
            n += SHARE_BYTES  # part (arena view, positions, values): runtimes.lines shares the positions
        refs = gc.get_referents(o) + (list(o) if isinstance(o, dict) else [])  # str keys: not referents
        if getattr(type(o), "__dictoffset__", 0) and not _INLINE and hasattr(o, "__dict__"):  # an instance's dict
            refs = [r for r in refs if r is not o.__dict__] + list(o.__dict__.values())
        n += sys.getsizeof(o) + _attribute_bytes(o, refs)
        todo += refs
    return owners, n


def data_owners(p: Prepared) -> dict[int, object]:
    """The objects that own the data of ``p``'s arrays, by ``id`` (as :func:`objects` finds them, without the walk of
    everything else): what an unload gives back, beside the objects counted when ``p`` was loaded."""
    return _chains(p)[0]


def _chains(p: Prepared) -> tuple[dict[int, object], dict[int, object]]:
    """The owners of ``p``'s arrays' data, and the views and memoryviews between them, by ``id``."""
    owners, views = {}, {}
    for a in p.arrays:
        while id(a) not in owners and id(a) not in views:
            base = a.base if isinstance(a, np.ndarray) else getattr(a, "obj", None)  # an array's, a memoryview's
            (owners if base is None else views)[id(a)] = a
            if base is None:
                break
            a = base
    return owners, views


def _attribute_bytes(o: object, refs: list) -> int:
    """The attribute values of an instance with a ``__dict__``, kept apart from it: 8 bytes per slot of its class's
    shared keys (2/3 of a power of two) and 40 beside. Not ``sys.getsizeof(o.__dict__)``: that counts the keys only
    while one instance holds them (an adapter's figure would change with the others held), and on Python 3.11+ makes
    the dict it measures."""
    if not getattr(type(o), "__dictoffset__", 0) or isinstance(o, type):
        return 0
    attributes, table = sum(r is not type(o) for r in refs), 8
    while table * 2 // 3 < attributes:
        table *= 2
    return 8 * (table * 2 // 3) + 40


def buffers(p: Prepared) -> dict[int, np.ndarray]:
    """The arrays that own the memory of everything ``p`` keeps (a view counts as the array it views), by ``id``."""
    out = {}
    for a in p.arrays:
        while isinstance(a.base, np.ndarray):  # a view: the array that owns the memory
            a = a.base
        out[id(a)] = a
    return out


def kept(adapter: Adapter, *, copy: bool) -> Adapter:
    """``adapter`` as a runtime keeps it: every array read-only, so writing into what ``Runtime.adapter`` returns
    raises. ``copy=True`` (an ``Adapter`` the caller built and still holds) rebuilds it from plain copies of its
    arrays as the library's own classes, validated again: neither a thread changing the caller's arrays during
    ``load_adapter`` nor a subclass (of ``Adapter``, its deltas or ``ndarray``) can slip past the checks. Its
    mappings (``tensors``, ``shapes``, ``info``, ``encodings``) are made read-only (:func:`read_only`): a delta put
    into what ``Runtime.adapter`` returns would be counted as held and break the unload that gives it back."""
    if copy:
        tensors = {}
        for k, d in dict(adapter.tensors).items():
            cls = next((c for c in (DenseDelta, SparseDelta) if isinstance(d, c)), None)
            if cls is not None:  # the library's own class, from plain copies (anything else fails validation)
                d = cls(**{f.name: None if (v := getattr(d, f.name)) is None else np.array(v) for f in fields(cls)})
            tensors[k] = d
        own = {f.name: getattr(adapter, f.name) for f in fields(Adapter)}
        mappings = {n: dict(own[n]) for n in ("shapes", "info", "encodings")}
        adapter = Adapter(**{**own, **mappings, "tensors": tensors})  # Adapter.__post_init__ validates the copies
    for d in adapter.tensors.values():
        for f in fields(d):
            if isinstance(v := getattr(d, f.name), np.ndarray):
                v.setflags(write=False)
    for n in ("tensors", "shapes", "info", "encodings"):  # the runtime's own object now: its mappings read-only too,
        object.__setattr__(adapter, n, read_only(getattr(adapter, n)))  # so what a held adapter keeps cannot change
    return adapter


def positions_key(index: Mapping[str, np.ndarray]) -> bytes:
    """A digest of the entries ``index`` (stored tensor -> sorted positions) writes: BLAKE2b over each tensor's name,
    entry count and positions (as little-endian int64, whatever their integer type), tensors in name order. Equal
    positions give equal keys; a load compares its positions in full (:func:`same_positions`) only with held adapters
    of its key, so the n-th load costs the same whatever n (comparing with every held adapter made n loads O(n^2))."""
    h = hashlib.blake2b(digest_size=16)
    for t in sorted(index):
        pos = np.ascontiguousarray(index[t], dtype="<i8")  # no copy for the int64 positions a load computes
        name = t.encode()
        h.update(len(name).to_bytes(8, "little") + name + pos.size.to_bytes(8, "little"))
        h.update(pos)
    return h.digest()


def same_positions(index: Mapping[str, np.ndarray], others: Iterable) -> object | None:
    """The first of ``others`` (prepared adapters, each with an ``index``: stored tensor -> sorted positions) that
    writes exactly the entries ``index`` writes, or ``None``. Adapters on one mask (SHiRA-WM's, a function of the
    base weights alone, is the same for every adapter of a model) share their base values and their undo, and a
    switch between two of them is one pass: the new values overwrite every entry the old adapter wrote. A runtime
    passes only the held adapters whose :func:`positions_key` equals that of ``index``, one per :class:`Layout`."""
    for other in others:
        o = other.index
        if o.keys() == index.keys() and all(o[t].size == index[t].size for t in index):
            if all(o[t] is index[t] or np.array_equal(o[t], index[t]) for t in index):
                return other
    return None


def check_finite(values: Mapping[str, np.ndarray], what: str) -> None:
    bad = [t for t, v in values.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
    if bad:
        raise ConfigError(
            f"{what} gives non-finite weights in {bad[:5]} (overflow); nothing was changed. Use smaller weights"
        )


def normalise(spec) -> dict[str, float]:
    """A switch's ``spec`` as {name: weight}: ``None`` (the base), a name, names (each at weight 1, each once) or a
    mapping name -> real number, every name a plain ``str`` (:func:`plain_name`). Anything else raises
    ``ConfigError`` before the runtime changes."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        return {plain_name(spec): 1.0}
    if isinstance(spec, Mapping):
        out = {}
        for k, v in spec.items():
            if type(v) is not float and (not isinstance(v, Real) or isinstance(v, bool)):  # "0.5", True: a slip
                raise ConfigError(f"adapter weight for {k!r} must be a real number, got {type(v).__name__} {v!r:.40}")
            try:
                a = float(v)
            except OverflowError:  # an int or a Fraction beyond any float (10**400; its repr may not even print)
                raise ConfigError(
                    f"adapter weight for {k!r} must be finite, got {type(v).__name__} out of range"
                ) from None
            if not math.isfinite(a):
                raise ConfigError(f"adapter weight for {k!r} must be finite, got {v!r}")
            out[plain_name(k)] = a
        return out
    if type(spec) in (list, tuple):
        names = spec
    elif isinstance(spec, Iterable) and not isinstance(spec, (bytes, bytearray)):
        names = list(spec)
    else:
        names = None  # not a list of names: refused below
    if names is None or not all(isinstance(n, str) for n in names):
        raise ConfigError(
            f"switch takes None, an adapter name, a list of names or a mapping name -> weight; got {spec!r:.80}"
        )
    out = dict.fromkeys((plain_name(n) for n in names), 1.0)  # [] is the base, as None is
    if len(out) != len(names):
        raise ConfigError(f"adapter names repeat in {names!r:.80}; to weight one twice, pass a mapping name -> 2.0")
    return out


def merge_weights(
    base: Mapping[str, np.ndarray], adapters: Iterable[tuple[Adapter, float]], *, tensors: Mapping | None = None
) -> dict[str, np.ndarray]:
    """Reference merge of float weights in source layout: ``W + sum_i alpha_i * S_i`` with the runtime's semantics.

    ``base`` maps parameter names to arrays; returns new arrays for every parameter. ``tensors`` (the model's
    ``rt.info.tensors``) lands each delta as the runtime does (:meth:`TensorInfo.stored_delta`): needed where a
    converter folded a channel scale into the weight (``base`` then as ``rt.weights`` reads it, scale left in).
    """
    acc: dict[str, np.ndarray] = {}
    touched: dict[str, np.ndarray] = {}
    for adapter, alpha in adapters:
        for tname, d in adapter.tensors.items():
            a = acc.setdefault(tname, np.zeros(base[tname].shape, np.float32))
            m = touched.setdefault(tname, np.zeros(base[tname].shape, bool))
            t = None if tensors is None else tensors[tname]
            if isinstance(d, DenseDelta):
                where, values = ..., d.values if t is None else t.fold(d.values)
            else:
                where = tuple(d.indices.astype(np.int64))
                values = d.values if t is None else t.stored_delta(d.indices, d.values)
            a[where] += np.float32(alpha) * values
            m[where] = True
    out = {k: np.array(v, copy=True) for k, v in base.items()}
    for tname, a in acc.items():
        m = touched[tname]
        out[tname][m] = base[tname][m] + a[m]
    return out
