"""The adapters a :class:`~edge.runtime.Runtime` holds: loading (validated, prepared for switching), what each keeps,
unloading, and the device's memory budget they count against.

With a memory budget (a device profile's ``budgets.memory_mb``, enforced unless ``enforce_memory_budget=False``),
:meth:`AdapterHolder.load_adapter` refuses an adapter that would take the model's footprint (predicted for the
strategy in use; for a backend that predicts none, the model file's size, which it keeps in memory) plus the
adapters already held plus this one past the budget: first on a lower bound computed from its entry counts and
element types, before its positions, base values and writes are prepared, then on the exact figure (kept up per
load and unload by :class:`HeldBuffers`: the data :func:`edge.fusion.held_bytes` counts and the Python objects that
hold it, :func:`edge.fusion.objects`) under the lock it is added under, so two loads at once cannot both take the
last room. A refusal is a :class:`~edge.errors.ConfigError`
naming the figures; the runtime is left as it was.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING

import numpy as np

from edge.errors import AdapterMismatchError, ConfigError
from edge.format.feeds import plain_name

if TYPE_CHECKING:  # at run time imported by the first adapter held, loaded or named: a Runtime that only runs a model
    from edge.format.adapter import Adapter  # imports neither (the adapter format, fusion, their 8 dataclasses)
    from edge.fusion import Layout, Prepared

__all__ = ["AdapterHolder", "HeldBuffers", "check_clip"]

log = logging.getLogger("edge.runtime")

_BASE_CHUNK = 1 << 18  # entries read per lock hold while an adapter loads
_MB = 2**20


class HeldBuffers:
    """The buffers the loaded adapters keep, each once, with how many adapters hold it: the total at any time, and
    what a load or an unload changes, in the time of that one adapter (``held_bytes`` walks every adapter: 44 ms at
    1,000 adapters, under the lock a load takes). Also the held adapters by the digest of their positions
    (:meth:`alike`), so a load finds its twins without walking the others.

    ``total`` is what a memory budget counts: beside the data :func:`edge.fusion.held_bytes` counts (what
    ``Runtime.adapter_bytes`` reports), each buffer's header and the record kept of it here
    (:data:`edge.fusion.RECORD_BYTES`), and per adapter the objects that hold its data (:func:`edge.fusion.objects`:
    walked once per load, given back as counted on unload, never walked on a switch), its name and its records. On
    the demo ViT a tiny adapter (1,337 entries on 12 targets) counts 100 KB so (52 KB of data; 98 KB of resident
    memory each, 1,000 held); a 1 % adapter of MiniLM 0.9 % over its data."""

    def __init__(self, held: Mapping[str, Prepared] | None = None) -> None:
        self._buffers: dict[int, tuple[object, int]] = {}  # id -> (the buffer, adapters holding it)
        self._objects: dict[int, int] = {}  # id of a held adapter -> bytes of its objects (counted when it was added)
        self._layouts: dict[bytes, dict[Layout, dict[int, Prepared]]] = {}  # key -> layout -> id -> adapter
        self.total = 0
        for name, p in (held or {}).items():
            self.add(p, self.walk(p, name))

    def alike(self, key: bytes) -> list[Prepared]:
        """One held adapter per :class:`~edge.fusion.Layout` whose positions digest to ``key`` (one, or none, but
        for adapters on one mask loaded at the same time, or a digest collision): the candidates a load compares."""
        return [next(iter(held.values())) for held in self._layouts.get(key, {}).values()]

    @staticmethod
    def walk(p: Prepared, name: str) -> tuple[dict[int, object], int]:
        """``p``'s buffers by ``id`` and the bytes of its own objects (:func:`edge.fusion.objects`), its name and its
        records: a load walks its adapter once and hands the walk to :meth:`new_bytes` and :meth:`add`."""
        from edge import fusion

        owners, objects = fusion.objects(p)
        return owners, objects + sys.getsizeof(name) + _adapter_records()

    def new_bytes(self, walked: tuple[dict[int, object], int], leaving: Prepared | None = None) -> int:
        """Bytes an adapter (its :meth:`walk`) would add: its buffers no held adapter but ``leaving`` holds, and its
        own objects."""
        owners, objects = walked
        from edge import fusion

        gone = {} if leaving is None else {k for k in fusion.data_owners(leaving) if self._buffers[k][1] == 1}
        return sum(_cost(o) for k, o in owners.items() if k not in self._buffers or k in gone) + objects

    def only(self, p: Prepared) -> int:
        """Bytes that only ``p`` (held) holds: what unloading it frees."""
        from edge import fusion

        mine = (o for k, o in fusion.data_owners(p).items() if self._buffers[k][1] == 1)
        return sum(_cost(o) for o in mine) + self._objects[id(p)]

    def add(self, p: Prepared, walked: tuple[dict[int, object], int]) -> None:
        owners, objects = walked
        for k, o in owners.items():
            n = self._buffers.get(k, (o, 0))[1]
            self._buffers[k] = (o, n + 1)
            self.total += _cost(o) if n == 0 else 0
        self._objects[id(p)] = objects
        self.total += objects
        self._layouts.setdefault(p.layout.key, {}).setdefault(p.layout, {})[id(p)] = p

    def remove(self, p: Prepared) -> None:
        from edge import fusion

        layouts = self._layouts[p.layout.key]
        del layouts[p.layout][id(p)]
        if not layouts[p.layout]:
            del layouts[p.layout]
            if not layouts:
                del self._layouts[p.layout.key]
        for k, o in fusion.data_owners(p).items():
            n = self._buffers[k][1]
            if n == 1:
                del self._buffers[k]
                self.total -= _cost(o)
            else:
                self._buffers[k] = (o, n - 1)
        self.total -= self._objects.pop(id(p))


def check_clip(clip: object) -> None:
    """``clip`` must be a bool (or 0/1): a string from a config file (``"no"``) is true and would clip silently."""
    if not isinstance(clip, (bool, np.bool_)) and not (type(clip) is int and clip in (0, 1)):
        raise ConfigError(f"clip must be True or False, got {type(clip).__name__} {clip!r:.40}")


def _check_path(path: object) -> None:
    """An adapter file's path: a ``str``, ``bytes`` or ``os.PathLike`` without NUL characters (else ConfigError)."""
    try:
        text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else None
    except TypeError:  # a PathLike whose __fspath__ gives no path
        text = None
    if text is None:
        raise ConfigError(
            f"load_adapter takes an adapter file's path or an edge.format.adapter.Adapter, got {type(path).__name__}"
        )
    if "\0" in text:
        raise ConfigError(
            f"adapter path ({len(text)} characters) contains a NUL character: pass the file's path, not its bytes"
        )


def _cost(buffer: object) -> int:
    """What a held buffer takes: its data and header (``sys.getsizeof``) and the record :class:`HeldBuffers` keeps."""
    from edge.fusion import RECORD_BYTES

    return sys.getsizeof(buffer) + RECORD_BYTES


def _adapter_records() -> int:
    """A held adapter's records: its entries in the runtime's adapters, in HeldBuffers' objects and in its layouts,
    and the two dicts a new layout takes there."""
    from edge.fusion import RECORD_BYTES

    return 3 * RECORD_BYTES + 2 * sys.getsizeof({0: 0})


class AdapterHolder:
    """Mixin of :class:`~edge.runtime.Runtime`: its adapters. The runtime sets ``_adapters``, ``_active``, ``_held``
    (:class:`HeldBuffers`), ``_touched``, ``_lock``, ``_policy``, ``_budget_mb`` (None: no budget), ``_file_mb``
    (the model file's size), ``_auto`` (the strategy was asked as auto), ``device``, ``backend``, ``info`` and
    ``model_path``; ``_max_adapter_bytes`` too, or None: computed at the first adapter file loaded."""

    _max_adapter_bytes: int | None = None
    _bounds: dict[str, tuple[int, int]] | None = None  # int_bounds, computed at the first use

    adapters = property(lambda self: sorted(self._adapters), doc="The names of the loaded adapters, sorted.")

    @property
    def footprint(self) -> dict:
        """Strategy, predicted resident MB (the model), MB loading measured (Linux; None if the process shrank: first
        load only), MB the loaded adapters keep as a memory budget counts them (``adapters_mb``: the data of
        :attr:`adapter_bytes` and the Python objects holding it, :class:`HeldBuffers`; not in ``predicted_mb``), and
        with a memory budget ``budget_mb`` and ``room_mb``, what is left of it for more adapters (else both None)."""
        b, held = self.backend, self._held.total / _MB
        out = dict(strategy=b.strategy, predicted_mb=b.predicted_mb(), measured_mb=b.measured_mb, adapters_mb=held)
        room = None if self._budget_mb is None else self._budget_mb - self._model_mb()[0] - held
        return {**out, "budget_mb": self._budget_mb, "room_mb": room}

    @property
    def adapter_bytes(self) -> dict[str, int]:
        """Bytes of data each loaded adapter keeps (its arrays, base values and prepared writes; never the model's
        weights): an array adapters on one mask share counts with the one loaded first (:func:`edge.fusion.held_bytes`;
        what growth plans per entry). A memory budget also counts the objects holding the data (``footprint``)."""
        from edge import fusion

        held = dict(self._adapters)
        return dict(zip(held, fusion.held_bytes(held.values()), strict=True))

    # -- loading -----------------------------------------------------------------------------
    def load_adapter(self, adapter: Adapter | str | os.PathLike, name: str | None = None, *, clip: bool = False) -> str:
        """Validate an adapter against this model and keep it ready to switch. Returns its name.

        On a quantized model a float adapter is requantized onto the base's grid; an entry it would take outside
        the integer range raises :class:`~edge.fusion.SaturationError`, or with ``clip=True`` is clipped (counted
        in :attr:`clipped` while the adapter is active).

        Nothing about the running model changes; a bad adapter raises :class:`~edge.errors.FormatError` or
        :class:`~edge.errors.AdapterMismatchError`, and, when the runtime was given ``trusted_keys``, an unsigned
        or wrongly signed file raises :class:`~edge.errors.SignatureError` before any of its bytes is parsed. Under
        a memory budget, an adapter that would take the model and the adapters held past it raises
        :class:`~edge.errors.ConfigError` (the module doc); one loaded under the name of a held one replaces it, so
        that one's bytes are not counted.
        """
        from edge import fusion
        from edge.format.adapter import Adapter, DenseDelta, load_adapter
        from edge.format.qrange import check_qvalues

        self._check_open()
        check_clip(clip)
        if in_memory := isinstance(adapter, Adapter):
            self._policy.check_in_memory(adapter.name)
        else:  # signature, then every declared target against this model, before any array is decoded
            _check_path(adapter)
            if self._max_adapter_bytes is None:  # the largest file that can fit the model (edge.format.adapter)
                from edge.format.adapter import max_adapter_bytes

                self._max_adapter_bytes = max_adapter_bytes(self.info)
            adapter = load_adapter(adapter, policy=self._policy, model=self.info, max_bytes=self._max_adapter_bytes)
        adapter = fusion.kept(adapter, copy=in_memory)  # read-only; a caller's own copied first, validated again
        adapter.check_against(self.info)
        name = adapter.name if name is None else name
        if not isinstance(name, str) or not (name := plain_name(name)):  # held, looked up, removed: one plain str
            raise ConfigError(f"adapter name must be a non-empty string, got {name!r}")
        ints = {
            k: (d.qvalues, self.int_bounds()[self.info.tensors[k].initializer])
            for k, d in adapter.tensors.items()
            if getattr(d, "qvalues", None) is not None
        }  # every target checked: the error names them all
        check_qvalues(name, ints)  # e.g. -128 in a symmetric int8 weight (edge.format.qrange)
        index, delta = {}, {}
        for tname, d in adapter.tensors.items():
            t = self.info.tensors[tname]
            stored = self.backend.read(t.initializer)
            if stored.size != int(np.prod(t.shape)) or stored.dtype != t.dtype:
                raise AdapterMismatchError(f"{tname}: stored tensor {stored.shape} {stored.dtype} does not fit")
            if isinstance(d, DenseDelta):  # the whole slot tensor, in stored layout
                index[t.initializer] = np.arange(stored.size, dtype=np.int64)
                delta[t.initializer] = np.array(t.to_stored(t.fold(d.values)))  # never the adapter's own array
                continue
            flat = t.stored_offsets(d.indices)
            if t.quant is None:
                values = t.stored_delta(d.indices, d.values)
            elif d.qvalues is not None:  # integer adapter: the exact integers (steps from the base: in _prepare)
                values = d.qvalues
            else:  # float adapter on a quantized base: grid steps of the entry's channel
                values = t.grid_units(d.indices, d.values, self.backend.constant(t.quant.scale))
            if flat.size < 2 or bool(np.all(flat[1:] > flat[:-1])):  # already sorted: no copy, no sort
                index[t.initializer], delta[t.initializer] = flat, np.array(values)  # not the adapter's own array
                continue
            order = np.argsort(flat, kind="stable")
            index[t.initializer] = flat[order]
            delta[t.initializer] = values[order]
        key = fusion.positions_key(index)  # its twins, if any, are the held adapters of this key
        with self._lock:
            self._check_open()
            self._check_not_active(name)
            staying = self._staying(name)[1]
            alike = self._held.alike(key)  # immutable: compared outside the lock
        twin = fusion.same_positions(index, alike)  # an adapter that writes the same entries, if any
        if self._budget_mb is not None:  # a lower bound first: nothing more is allocated for an adapter over it
            self._check_room(name, staying, self._at_least(adapter, index, twin), True)
        prepared = self._prepare(adapter, name, index, delta, clip, twin, key)  # short lock steps
        walked = HeldBuffers.walk(prepared, name)  # its objects, walked once (outside the lock)
        with self._lock:
            self._check_open()
            self._check_not_active(name)
            old, staying = self._staying(name)
            if self._budget_mb is not None:  # the exact figure, against what is held now (another load may have won)
                self._check_room(name, staying, self._held.new_bytes(walked, old), False)
            try:
                self._held.add(prepared, walked)
                if old is not None:
                    self._held.remove(old)
                self._adapters[name] = prepared
            except BaseException:  # a Ctrl-C between two steps: the count follows the adapters held
                self._held = HeldBuffers(self._adapters)
                raise
        return name

    def _staying(self, name: str) -> tuple[Prepared | None, int]:
        """The held adapter called ``name`` (a load under its name replaces it) and the bytes held without it (its
        own bytes are not counted). Under the lock."""
        old = self._adapters.get(name)
        return old, self._held.total - (0 if old is None else self._held.only(old))

    def _at_least(self, adapter: Adapter, index, twin: Prepared | None) -> int:
        """Bytes the adapter will keep at least, before its writes are prepared: its own arrays (data and headers) and
        the objects holding them, and per entry a float32 delta and the new value; the first on its positions also an
        int32 position and the base value (:func:`edge.fusion.entry_bytes`, ``prepared=False``; the file's part is
        its arrays, counted as they are). :meth:`HeldBuffers.new_bytes` counts all that and more once prepared."""
        from edge.fusion import entry_bytes

        arrays = [getattr(d, f.name) for d in adapter.tensors.values() for f in fields(d)]
        mine = [adapter, adapter.tensors, adapter.shapes, adapter.info, adapter.encodings, *adapter.tensors.values()]
        n = sum(sys.getsizeof(o) for o in {id(o): o for o in mine}.values())
        for a in arrays:
            if isinstance(a, np.ndarray):  # an array that views another: its header here, its data there
                n += sys.getsizeof(a) + (0 if a.flags.owndata else a.nbytes)
        for tname, pos in index.items():
            size = self.backend.read(tname).dtype.itemsize
            n += pos.size * entry_bytes(size, first=twin is None, prepared=False, file=False)
        return n

    def _model_mb(self) -> tuple[float, str]:
        """The model's part of the budget, and where it comes from."""
        predicted = self.backend.predicted_mb()
        if predicted is not None:
            return float(predicted), f"predicted for strategy {self.backend.strategy}"
        return self._file_mb, f"its file's size ({self.backend.name} predicts no footprint)"

    def _check_room(self, name: str, held: int, mine: int, estimate: bool) -> None:
        model_mb, source = self._model_mb()
        left = self._budget_mb - model_mb - held / _MB
        if mine / _MB <= left:
            return
        device = f" of device profile {self.device.name!r}" if self.device is not None else ""
        what = f"at least {mine / _MB:.3f} MB (from its entries)" if estimate else f"{mine / _MB:.3f} MB"
        count = len(self._adapters) - (name in self._adapters)  # one of this name would be replaced
        raise ConfigError(
            f"adapter {name!r} would keep {what}, more than the {max(left, 0.0):.3f} MB left of the memory budget of "
            f"{self._budget_mb:g} MB{device} (budgets.memory_mb): the model takes {model_mb:.3f} MB ({source}) and "
            f"the {count} adapter(s) held {held / _MB:.3f} MB; nothing was loaded. Unload an adapter (unload_adapter), "
            f"raise budgets.memory_mb, or use a sparser (lower density) or lower-bit adapter{self._strategy_hint()}"
        )

    def _strategy_hint(self) -> str:
        """Where ``auto`` picked a strategy heavier than the backend's lightest (it fit the model alone; onnxruntime:
        ``bound``, LiteRT: ``builtin``), what that one frees."""
        order = getattr(self.backend, "AUTO_ORDER", ())
        light = order[-1] if order else None
        if not self._auto or light is None or self.backend.strategy == light:
            return ""
        now, lean = self.backend.predicted_mb(), self.backend.predicted_mb(light)
        if now is None or lean is None or lean >= now:
            return ""
        return f", or run strategy {light} (strategy: {light} in the profile's backend: {now - lean:.3f} MB less)"

    def _prepare(
        self, adapter: Adapter, name: str, index, delta, clip: bool, twin: Prepared | None, key: bytes
    ) -> Prepared:
        """The base values at the adapter's positions and its two prepared writes (``twin``'s, if any, shared).

        A base value does not depend on what is switched in (``_base_at`` undoes the active
        adapters), so it is read in steps of ``_BASE_CHUNK`` entries, each under the lock, and a
        large adapter's load holds up a switch in another thread for one step at most.
        """
        from edge.fusion import Layout, Prepared, check_finite, merged
        from runtimes import WeightWrite

        base, new, clipped = {} if twin is None else dict(twin.base), {}, 0
        index.update({} if twin is None else twin.index)  # one copy of the positions
        for tname, pos in index.items():
            if twin is None:
                base[tname] = np.empty(pos.shape, self.backend.read(tname).dtype)
            for i in range(0, pos.size if twin is None else 0, _BASE_CHUNK):  # each step a consistent read
                with self._lock:
                    self._check_open()
                    base[tname][i : i + _BASE_CHUNK] = self._base_at(tname, pos[i : i + _BASE_CHUNK])
            if delta[tname].dtype.kind in "iu":  # integer adapter: its steps from the base, exact
                delta[tname] = (delta[tname].astype(np.int64) - base[tname]).astype(np.float32)
            acc, what = np.float32(0) + delta[tname], f"adapter {name!r}"
            new[tname], n = merged(tname, base[tname], acc, clip=clip, what=what, bounds=self.int_bounds().get(tname))
            clipped += n
        check_finite(new, f"adapter {name!r} added to the base weights")
        if clipped:
            log.warning("adapter %r clips %d entries of the quantized weights to the integer range", name, clipped)
        apply = self.backend.prepare([WeightWrite(t, index[t], new[t]) for t in index])
        if twin is not None:
            return Prepared(adapter, index, delta, base, apply, twin.restore, twin.touched, clipped, twin.layout)
        restore = self.backend.prepare([WeightWrite(t, index[t], base[t]) for t in index])
        touched = {t: (index[t], base[t]) for t in index}
        return Prepared(adapter, index, delta, base, apply, restore, touched, clipped, Layout(key))

    def int_bounds(self) -> Mapping[str, tuple[int, int]]:
        """Per quantized stored tensor, the integers its weights may hold (:func:`edge.format.qrange.weight_bounds`:
        ``[-127, 127]`` for a symmetric int8 one), from the zero points the backend holds; what a fused switch passes
        to :func:`edge.fusion.fuse`. Computed once (zero points never change)."""
        if self._bounds is None:
            from edge.format.qrange import weight_bounds

            q = {t.initializer: t.quant for t in self.info.tensors.values() if t.quant is not None}
            self._bounds = {k: weight_bounds(v.dtype, self.backend.constant(v.zero_point)) for k, v in q.items()}
        return self._bounds

    def _base_at(self, tname: str, pos: np.ndarray) -> np.ndarray:
        base = self.backend.read(tname).reshape(-1)[pos].copy()
        if tname in self._touched:
            tpos, tbase = self._touched[tname]
            where = np.searchsorted(tpos, pos)
            where[where >= tpos.size] = 0
            hit = tpos[where] == pos if tpos.size else np.zeros(pos.shape, bool)
            base[hit] = tbase[where[hit]]
        return base

    def _check_not_active(self, name: str) -> None:
        if name in self._active:
            what = f"adapter {name!r} is active; switch away from it (or unload it) before loading another adapter"
            raise ConfigError(f"{what} under that name, or pass name=... to load this one under another")

    def adapter(self, name: str) -> Adapter:
        """The loaded adapter called ``name`` (its arrays are read-only)."""
        self._check_open()
        name = plain_name(name)
        try:
            return self._adapters[name].adapter
        except KeyError:
            raise ConfigError(f"adapter {name!r} is not loaded; loaded: {sorted(self._adapters) or 'none'}") from None

    def unload_adapter(self, name: str) -> None:
        """Drop a loaded adapter that is not active (its memory, and its part of a memory budget, is freed)."""
        name = plain_name(name)  # one plain str for the active check and the removal alike
        with self._lock:
            self._check_open()
            if name in self._active or name not in self._adapters:
                why = "is active; switch away from it before unloading" if name in self._active else "is not loaded"
                raise ConfigError(f"adapter {name!r} {why}; loaded: {sorted(self._adapters) or 'none'}")
            try:
                self._held.remove(self._adapters.pop(name))
            except BaseException:  # a Ctrl-C between two steps: the count follows the adapters held
                self._held = HeldBuffers(self._adapters)
                raise
