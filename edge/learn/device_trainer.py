"""Growing an adapter on the device: SHiRA on the last MLP and the head, backprop by hand (numpy only).

:class:`DeviceTrainer` is a :mod:`edge.learn.growth` trainer hook
for devices without torch. It trains SHiRA entries of two weights of a pre-LN
transformer encoder, everything else frozen: the last block's MLP output projection
``W2`` (``blocks.{last}.mlp.fc2.weight``, ``[dim, hidden]``) and the classifier
``Wh`` (``head.weight``, ``[classes, dim]``). Everything before ``W2`` does not
change, so one run of the model gives per input ``h`` (the input of the last fc2,
``[T, hidden]``) and ``r`` (the residual stream fc2's output is added to,
``[T, dim]``), and training needs no further model run::

    z = r + h W2^T + b2            n = LayerNorm(z; gamma, beta, eps)     (final norm)
    f = mean_T(n)                  logits = f Wh^T + bh                   L = mean CE

Backward (``B`` samples, ``T`` tokens)::

    dlogits = (softmax(logits) - onehot) / B       dWh = dlogits^T f
    dn = (dlogits Wh) / T, broadcast over T        dz_hat = dn * gamma
    dz = (dz_hat - mean_d(dz_hat) - z_hat * mean_d(dz_hat * z_hat)) / sqrt(var + eps)
    dW2 = sum_(b,t) dz^T h

``W2`` changes ``z``, so the LayerNorm is recomputed each step. SHiRA: a SNIP mask
(the ``max(1, round(density * numel))`` entries of largest ``|w * dL/dw|`` per
tensor, on the training samples, ties to the lower flat index, as
:func:`exporters.shira.make_masks`); Adam on those entries' deltas with a small L2
pull towards the base (as :mod:`edge.learn.shira_head`), minibatches of ``batch``,
float64. The result is a standard SHiRA :class:`~edge.format.adapter.Adapter`
(torch-layout ``[2, N]`` int32 indices, float32 deltas, the model's fingerprint).

Layer sets (registered in :data:`edge.learn.growth.LAYER_SETS` on import): ``head``
(``head.weight``) and ``last-mlp`` (last fc2 and ``head.weight``).
:data:`DEVICE_SPACE` crosses them with 5 densities; pass it to ``grow(...,
space=DEVICE_SPACE)``. :meth:`DeviceTrainer.saliency` raises
:class:`~edge.errors.ConfigError` for any other parameter (a proxy score of zero
would silently rank a candidate it cannot train).

The tensors are found in the ONNX graph, not by name alone: the MatMul or Gemm
reading fc2's initializer (its input is ``h``), its bias Add, the residual Add
(``r`` is its other input), the LayerNormalization reading the sum (gamma, beta,
eps) and the MatMul or Gemm reading ``head.weight``. ``h``, ``r`` and the logits
become extra outputs of an in-memory copy of the model (weights untouched), run once
per :meth:`~DeviceTrainer.saliency` or :meth:`~DeviceTrainer.train` call; each run
checks that the numpy forward reproduces the model's logits, so a model of another
shape raises a ConfigError instead of training the wrong function.

Measured on the demo encoder (dim 64, hidden 128, 2 blocks, 16 tokens; x86_64 2-core VM,
one thread for onnxruntime and OpenBLAS, other jobs running; defaults: 200 epochs, lr
0.03, batch 256), on the ``invert`` shift, where the base model's test accuracy is 0.009:

* 256 labelled samples: ``head@0.5`` (320 entries) 0.60 in 0.09 s; ``last-mlp@0.1``
  (883) 0.60 and ``last-mlp@0.5`` (4416) 0.65, each in 1.4 s (one model run 33 ms,
  then 6.9 ms per epoch). ``grow(space=DEVICE_SPACE)`` without a budget picks
  ``last-mlp@0.5``.
* 1000 samples: ``head@0.5`` 0.74 (1.0 ms per epoch), ``last-mlp@0.5`` 0.76 in 5.7 s
  (28 ms per epoch).
* The host trainer (torch, 30 epochs of batch 64) on the same 256 samples: 0.61 on the
  same ``last-mlp@0.5`` entries, 0.73 on every block's linear weights at density 0.1
  (6556 entries) in 1.5 s. The earlier layers are what the device trainer cannot reach.

Memory: ``h`` and ``r`` of every sample are kept, ``8 * n * T * (hidden + dim)`` bytes
(24 MB for 1000 demo samples), plus per-minibatch temporaries of that size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edge.errors import ConfigError, FormatError
from edge.learn.space import DEVICE_SPACE, HEAD, Arch, last_fc2

__all__ = ["DEVICE_SPACE", "DeviceTrainer"]

_SHAPE_ONLY = ("Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten")


@dataclass(frozen=True)
class _Tail:
    """The trainable end of the model: tensor names to expose and the frozen weights (float64, source layout)."""

    fc2: str  # parameter names
    head: str
    h: str  # graph tensors: fc2's input, the residual stream, the logits
    r: str
    logits: str
    w2: np.ndarray  # [dim, hidden]
    b2: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    eps: float
    wh: np.ndarray  # [classes, dim]
    bh: np.ndarray


class DeviceTrainer:
    """Train SHiRA adapters of the last fc2 and the head on the device (numpy; see the module doc).

    ``model_path`` is the exported ONNX model (``info`` is read from it when not
    given). ``threads`` is onnxruntime's intra-op thread count for the one model run
    (numpy's BLAS threads follow ``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS``).
    Picklable (the session is rebuilt on first use), so :class:`edge.learn.growth.GrowthJob`
    can run it in a child process.
    """

    def __init__(
        self,
        model_path,
        info=None,
        *,
        epochs: int = 200,
        lr: float = 3e-2,
        weight_decay: float = 1e-4,
        seed: int = 0,
        batch: int = 256,
        threads: int | None = 1,
    ) -> None:
        import onnx

        from edge.format.modelinfo import onnx_info

        if epochs < 1 or lr <= 0 or weight_decay < 0 or batch < 1:
            raise ConfigError(
                f"the device trainer needs epochs >= 1, lr > 0, weight_decay >= 0, batch >= 1; got {epochs}, {lr}, "
                f"{weight_decay}, {batch}"
            )
        try:
            self._proto = onnx.load(str(model_path))
        except Exception as e:  # OSError, protobuf DecodeError and friends
            raise FormatError(f"cannot read ONNX model {model_path}: {e}") from e
        self.info = info if info is not None else onnx_info(self._proto)
        self.epochs, self.lr, self.weight_decay, self.seed, self.batch = epochs, lr, weight_decay, seed, batch
        self.threads = threads
        self._tail = _locate(self._proto, self.info)
        self._session = None

    def __getstate__(self) -> dict:  # an onnxruntime session does not pickle
        return {**self.__dict__, "_session": None}

    @property
    def params(self) -> tuple[str, str]:
        """The parameters this trainer can adapt: the last fc2 and the head."""
        return (self._tail.fc2, self._tail.head)

    def base_weights(self) -> dict[str, np.ndarray]:
        """The base values of :attr:`params` (float64, source layout ``[out, in]``)."""
        return {self._tail.fc2: self._tail.w2.copy(), self._tail.head: self._tail.wh.copy()}

    # -- the model run ----------------------------------------------------------------------------
    def activations(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(h [B, T, hidden], r [B, T, dim])`` of inputs ``x`` (float64), from one run of the model."""
        x = np.asarray(x, np.float32)
        if x.ndim < 1 or not len(x):
            raise ConfigError(f"the device trainer needs a non-empty batch of inputs, got shape {x.shape}")
        sess = self._run_session()
        t = self._tail
        hs, rs, ls = [], [], []
        for i in range(0, len(x), self.batch):
            try:
                h, r, lg = sess.run([t.h, t.r, t.logits], {self.info.inputs[0]: x[i : i + self.batch]})
            except Exception as e:  # onnxruntime's InvalidArgument and friends: a wrong input shape or dtype
                raise ConfigError(f"model {self.info.name!r} rejected inputs of shape {x.shape}: {e}") from e
            if r.ndim != 3:
                raise ConfigError(f"the residual stream {t.r!r} has shape {r.shape}; expected [batch, tokens, dim]")
            hs.append(h.reshape(*r.shape[:2], -1))  # a Gemm-based fc2 reads [B*T, hidden]
            rs.append(r)
            ls.append(lg)
        h, r, lg = (np.concatenate(a).astype(np.float64) for a in (hs, rs, ls))
        got = _forward(t, h, r, t.w2, t.wh)[0]
        err = float(np.abs(got - lg).max())
        if err > 1e-3 * max(1.0, float(np.abs(lg).max())):
            raise ConfigError(
                f"model {self.info.name!r} does not compute logits = head(mean over tokens(LayerNorm({t.r} + "
                f"fc2({t.h})))): the numpy forward differs from the model's {t.logits!r} by {err:.3g}; the device "
                "trainer needs that form (a pre-LN encoder, mean pooling, a linear head)"
            )
        return h, r

    def _run_session(self):
        if self._session is None:
            import onnx
            import onnxruntime as ort
            from onnx import TensorProto, helper

            exposed = onnx.ModelProto()
            exposed.CopyFrom(self._proto)
            have = {o.name for o in exposed.graph.output}
            for name in (self._tail.h, self._tail.r, self._tail.logits):
                if name not in have:
                    exposed.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads or 0
            so.log_severity_level = 3
            self._session = ort.InferenceSession(exposed.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return self._session

    # -- gradients ---------------------------------------------------------------------------------
    def loss_and_grads(
        self, x: np.ndarray, y: np.ndarray, weights: Mapping[str, np.ndarray] | None = None
    ) -> tuple[float, dict[str, np.ndarray]]:
        """Mean cross-entropy on ``(x, y)`` and ``dL/dw`` of :attr:`params`, at ``weights`` (default: base)."""
        y = self._labels(y, len(x))
        t, w = self._tail, dict(weights or {})
        self._supported(list(w))
        h, r = self.activations(x)
        loss, g2, gh = _loss_grads(t, h, r, y, w.get(t.fc2, t.w2), w.get(t.head, t.wh), want_w2=True)
        return loss, {t.fc2: g2, t.head: gh}

    def saliency(self, x: np.ndarray, y: np.ndarray, params: Sequence[str]) -> dict[str, np.ndarray]:
        """``|w * dL/dw|`` of each parameter on ``(x, y)`` (mean cross-entropy), at the base weights.

        Only :attr:`params` are supported; any other raises :class:`ConfigError`.
        """
        self._supported(params)
        _, grads = self.loss_and_grads(x, y)
        base = self.base_weights()
        return {p: np.abs(base[p] * grads[p]) for p in params}

    # -- training ----------------------------------------------------------------------------------
    def train(self, arch: Arch, x: np.ndarray, y: np.ndarray, name: str):
        """SHiRA entries of ``arch.targets(info)`` trained on ``(x, y)``, as an adapter."""
        from edge.format.adapter import Adapter, SparseDelta

        if arch.kind != "shira":
            raise ConfigError(f"the device trainer trains 'shira' adapters, not {arch.kind!r} ({arch})")
        if not 0.0 < arch.density <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {arch.density} in {arch}")
        targets = arch.targets(self.info)
        if not targets:
            raise ConfigError(f"{arch} selects no tensor of model {self.info.name!r}")
        self._supported(targets)
        y = self._labels(y, len(x))
        t = self._tail
        h, r = self.activations(x)
        _, g2, gh = _loss_grads(t, h, r, y, t.w2, t.wh, want_w2=t.fc2 in targets)
        base = {t.fc2: t.w2, t.head: t.wh}
        masks = {p: _snip_mask(base[p], {t.fc2: g2, t.head: gh}[p], arch.density) for p in targets}
        values = self._fit(masks, h, r, y)
        tensors = {p: SparseDelta(masks[p].astype(np.int32), values[p].astype(np.float32)) for p in targets}
        shapes = {p: tuple(self.info.tensors[p].shape) for p in targets}
        meta = {
            "mask": "snip",
            "density": arch.density,
            "layers": arch.layers,
            "grown": True,
            "samples": len(x),
            "trainer": "device",
            "epochs": self.epochs,
        }
        return Adapter(name, self.info.fingerprint, tensors, shapes, method="shira", info=meta)

    def _fit(self, masks: Mapping[str, np.ndarray], h, r, y) -> dict[str, np.ndarray]:
        """Adam on the masked entries' deltas (minibatches of ``batch``, shuffled each epoch)."""
        t = self._tail
        base = {t.fc2: t.w2, t.head: t.wh}
        w = {p: base[p].copy() for p in base}
        vals = {p: np.zeros(m.shape[1]) for p, m in masks.items()}
        m1 = {p: np.zeros_like(v) for p, v in vals.items()}
        m2 = {p: np.zeros_like(v) for p, v in vals.items()}
        train_w2 = t.fc2 in masks
        if not train_w2:  # the features do not change: pool them once, train the head alone
            f = _forward(t, h, r, t.w2, t.wh)[1]
        rng = np.random.default_rng(self.seed)
        step = 0
        for _ in range(self.epochs):
            for b in np.array_split(rng.permutation(len(y)), max(1, -(-len(y) // self.batch))):
                step += 1
                if train_w2:
                    _, g2, gh = _loss_grads(t, h[b], r[b], y[b], w[t.fc2], w[t.head], want_w2=True)
                    grads = {t.fc2: g2, t.head: gh}
                else:
                    grads = {t.head: _head_grads(t, f[b], y[b], w[t.head])[1]}
                for p, (rows, cols) in masks.items():
                    g = grads[p][rows, cols] + self.weight_decay * vals[p]
                    m1[p] = 0.9 * m1[p] + 0.1 * g
                    m2[p] = 0.999 * m2[p] + 0.001 * g * g
                    vals[p] -= self.lr * (m1[p] / (1 - 0.9**step)) / (np.sqrt(m2[p] / (1 - 0.999**step)) + 1e-8)
                    w[p][rows, cols] = base[p][rows, cols] + vals[p]
        return vals

    def logits(self, x: np.ndarray, adapter=None) -> np.ndarray:
        """The logits on ``x`` computed in numpy, with ``adapter``'s entries merged (in float32, as the runtime)."""
        t = self._tail
        h, r = self.activations(x)
        w = {t.fc2: t.w2, t.head: t.wh}
        if adapter is not None:
            adapter.check_against(self.info)
            self._supported(list(adapter.tensors))
            for p, d in adapter.tensors.items():
                merged = w[p].astype(np.float32)
                rows, cols = np.asarray(d.indices, np.int64)
                merged[rows, cols] = merged[rows, cols] + d.values
                w[p] = merged.astype(np.float64)
        return _forward(t, h, r, w[t.fc2], w[t.head])[0]

    # -- validation --------------------------------------------------------------------------------
    def _supported(self, params: Sequence[str]) -> None:
        other = [p for p in params if p not in self.params]
        if other:
            raise ConfigError(
                f"the device trainer adapts only {list(self.params)} of model {self.info.name!r}, not {other}; "
                "use grow(..., space=DEVICE_SPACE) or the host trainer"
            )

    def _labels(self, y, n: int) -> np.ndarray:
        y = np.asarray(y)
        classes = self._tail.wh.shape[0]
        if not n:
            raise ConfigError("the device trainer needs a non-empty batch of labelled inputs, got none")
        if y.ndim != 1 or len(y) != n:
            raise ConfigError(f"the device trainer needs one label per input, got {y.shape} labels for {n} inputs")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= classes:
            raise ConfigError(
                f"labels must be integers in [0, {classes}) (the head {self._tail.head!r} has {classes} outputs), "
                f"got {y.dtype} in [{y.min()}, {y.max()}]; new classes need ncm, slda or ranpac (edge.learn.update)"
            )
        return y.astype(np.int64)


# -- the math ----------------------------------------------------------------------------------------
def _forward(t: _Tail, h, r, w2, wh):
    """``(logits [B, C], features [B, dim], z_hat [B, T, dim], 1/std [B, T, 1])``."""
    z = r + h @ w2.T + t.b2
    zc = z - z.mean(-1, keepdims=True)
    inv = 1.0 / np.sqrt((zc * zc).mean(-1, keepdims=True) + t.eps)
    z_hat = zc * inv
    f = (z_hat * t.gamma + t.beta).mean(1)
    return f @ wh.T + t.bh, f, z_hat, inv


def _head_grads(t: _Tail, f, y, wh):
    """Mean cross-entropy, ``dL/dWh`` and ``dL/dlogits`` from pooled features ``f``."""
    logits = f @ wh.T + t.bh
    logits = logits - logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    d = np.exp(logp)
    d[np.arange(len(y)), y] -= 1.0
    d /= len(y)
    return float(-logp[np.arange(len(y)), y].mean()), d.T @ f, d


def _loss_grads(t: _Tail, h, r, y, w2, wh, *, want_w2: bool):
    """``(loss, dL/dW2 or None, dL/dWh)`` at weights ``w2``, ``wh`` (see the module doc)."""
    _, f, z_hat, inv = _forward(t, h, r, w2, wh)
    loss, gh, dlogits = _head_grads(t, f, y, wh)
    if not want_w2:
        return loss, None, gh
    dz_hat = (dlogits @ wh)[:, None, :] * (t.gamma / z_hat.shape[1])  # [B, 1, dim]: the same for every token
    dz = inv * (dz_hat - dz_hat.mean(-1, keepdims=True) - z_hat * (dz_hat * z_hat).mean(-1, keepdims=True))
    g2 = dz.reshape(-1, dz.shape[-1]).T @ h.reshape(-1, h.shape[-1])
    return loss, g2, gh


def _snip_mask(w: np.ndarray, grad: np.ndarray, density: float) -> np.ndarray:
    """int64 ``[2, N]`` (row, col), row-major sorted: the ``max(1, round(density * numel))`` largest ``|w * g|``."""
    n = max(1, int(round(density * w.size)))
    flat = np.sort(np.argsort(-np.abs(w * grad).reshape(-1), kind="stable")[:n])
    return np.stack(np.divmod(flat, w.shape[1]))


# -- finding the tail in the graph ---------------------------------------------------------------------
def _locate(proto, info) -> _Tail:
    """The tensors and weights :class:`DeviceTrainer` needs, found in the graph; ConfigError if absent."""
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    where = f"model {info.name!r}"

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name]).astype(np.float64)

    def param(p: str) -> np.ndarray:
        ti = info.tensors[p]
        a = array(ti.initializer)
        return a.T if ti.transposed else a

    def only(tensor: str):
        nodes = consumers.get(tensor, [])
        return nodes[0] if len(nodes) == 1 else None

    def linear(p: str) -> tuple[str, str, np.ndarray | None]:
        """(input, output after the bias, bias) of the MatMul/Gemm reading parameter ``p``."""
        init = info.tensors[p].initializer
        node = next((n for n in g.node if n.op_type in ("MatMul", "Gemm") and n.input[1:2] == [init]), None)
        if node is None:
            raise ConfigError(f"{where}: no MatMul or Gemm reads {p!r} (initializer {init!r})")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm":
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                raise ConfigError(f"{where}: the Gemm reading {p!r} has transA/alpha/beta; not a plain linear layer")
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if bias is not None and bias not in inits:
                raise ConfigError(f"{where}: the bias of {p!r} ({bias!r}) is not an initializer")
            return node.input[0], node.output[0], None if bias is None else array(bias)
        out, add = node.output[0], only(node.output[0])
        if add is not None and add.op_type == "Add":
            other = [i for i in add.input if i != out]
            if len(other) == 1 and other[0] in inits:
                return node.input[0], add.output[0], array(other[0])
        return node.input[0], out, None

    fc2 = last_fc2(list(info.tensors))
    missing = [n for n, ok in (("<blocks>.<i>.mlp.fc2.weight", fc2), (HEAD, HEAD in info.tensors)) if not ok]
    if missing:
        raise ConfigError(
            f"{where} has no {' or '.join(repr(m) for m in missing)}; the device trainer trains the last block's "
            f"MLP output projection and the head of a pre-LN encoder (model tensors: {sorted(info.tensors)[:8]} ...)"
        )
    fc2 = fc2[0]
    h, out, b2 = linear(fc2)
    node = only(out)
    while node is not None and node.op_type in _SHAPE_ONLY:
        out, node = node.output[0], only(node.output[0])
    if node is None or node.op_type != "Add" or len(set(node.input)) != 2 or any(i in inits for i in node.input):
        raise ConfigError(f"{where}: the output of {fc2!r} ({out!r}) is not added to a residual stream")
    r = next(i for i in node.input if i != out)
    ln = only(node.output[0])
    if ln is None or ln.op_type != "LayerNormalization" or ln.input[0] != node.output[0]:
        raise ConfigError(
            f"{where}: the residual sum after {fc2!r} ({node.output[0]!r}) does not feed one LayerNormalization "
            "(the final norm of a pre-LN encoder)"
        )
    ln_attrs = {a.name: helper.get_attribute_value(a) for a in ln.attribute}
    if ln_attrs.get("axis", -1) not in (-1, 2):
        raise ConfigError(f"{where}: the final LayerNormalization normalises axis {ln_attrs['axis']}, not the last")
    if ln.input[1] not in inits or (len(ln.input) > 2 and ln.input[2] and ln.input[2] not in inits):
        raise ConfigError(f"{where}: the final LayerNormalization's scale and bias are not initializers")
    gamma = array(ln.input[1])
    beta = array(ln.input[2]) if len(ln.input) > 2 and ln.input[2] else np.zeros_like(gamma)
    _, logits, bh = linear(HEAD)
    w2, wh = param(fc2), param(HEAD)
    dim, classes = w2.shape[0], wh.shape[0]
    b2 = np.zeros(dim) if b2 is None else b2
    bh = np.zeros(classes) if bh is None else bh
    if wh.shape[1] != dim or b2.shape != (dim,) or gamma.shape != (dim,) or bh.shape != (classes,):
        raise ConfigError(
            f"{where}: shapes do not chain: {fc2} {w2.shape}, bias {b2.shape}, norm {gamma.shape}, "
            f"{HEAD} {wh.shape}, bias {bh.shape}"
        )
    eps = float(ln_attrs.get("epsilon", 1e-5))
    return _Tail(fc2, HEAD, h, r, logits, w2, b2, gamma, beta, eps, wh, bh)
