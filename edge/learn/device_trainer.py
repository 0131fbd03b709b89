"""Growing an adapter on the device: SHiRA on the trainable tail of any classifier, backprop by hand (numpy only).

:class:`DeviceTrainer` is a :mod:`edge.learn.growth` trainer hook for devices without
torch. It trains SHiRA entries of the model's tail, everything else frozen: the
classifier weight and the last linear layer before it (``MatMul``, ``Gemm`` or 1x1
``Conv``), found from the graph by :func:`edge.learn.tail.find_tail`, which walks back
from the logits through the ops it can differentiate (``Add``: bias or residual,
``Relu``, ``Gelu``, ``LayerNormalization``, ``BatchNormalization``, mean pooling,
reshapes). On the demo's pre-LN ViT that is the last block's MLP output projection
(``blocks.{last}.mlp.fc2.weight``) and ``head.weight``, with the residual add, the
final norm and the mean over tokens between them; on a CNN, a 1x1 convolution or a
linear layer before the classifier, through ``Relu``, ``GlobalAveragePool`` and
``Flatten``. When the walk meets another op first (a 3x3 ``Conv``, a ``ReduceMax``),
only the classifier is trainable and asking for more raises
:class:`~edge.errors.ConfigError` naming that op.

Everything before the last linear layer does not change, so one run of the model
gives per input the tail's input ``h`` and any frozen skip input ``r`` of a residual
sum (extra outputs of an in-memory copy of the model, weights untouched), and
training needs no further model run. Each run checks that the numpy forward of the
tail reproduces the model's logits, so a tail the walk misread raises a ConfigError
instead of training the wrong function. Loss: mean softmax cross-entropy. On the ViT::

    z = r + h W2^T + b2            n = LayerNorm(z; gamma, beta, eps)     (final norm)
    f = mean_T(n)                  logits = f Wh^T + bh

SHiRA: a SNIP mask (the ``max(1, round(density * numel))`` entries of largest
``|w| * sum_b |dL_b/dw|`` per tensor, ``L_b`` the mean loss of consecutive batches of 256
training samples, ties to the lower flat index, as :func:`exporters.shira.make_masks`);
AdamW on those entries' deltas (``torch.optim.AdamW``'s update: the decoupled weight
decay is a small pull towards the base), minibatches of ``batch`` (a fresh shuffle each
epoch, the last one smaller), in float32 as torch (:meth:`DeviceTrainer.loss_and_grads` and
:meth:`DeviceTrainer.logits` in float64). That is the host trainer's recipe
(:class:`exporters.host_trainer.HostTrainer`): with the same settings on the same tail
both pick the same entries, and full-batch steps give the same adapter up to rounding
(``edge bench update`` compares the two on the demo ViT and CNN).
When only the classifier trains, the features it reads are computed once. The result
is a standard SHiRA :class:`~edge.format.adapter.Adapter` (``[ndim, N]`` int32 indices in
the parameter's source shape, float32 deltas, the model's fingerprint).

Layer sets: ``head`` and ``last-mlp`` (:mod:`edge.learn.space`, by the digits ViT's names;
:data:`DEVICE_SPACE` crosses them with 5 densities) and, on any model, ``tail-head`` and
``tail`` (:mod:`edge.learn.tail`, from the graph; :data:`~edge.learn.tail.TAIL_SPACE`).
Pass one to ``grow(..., space=...)``. :meth:`DeviceTrainer.saliency` raises
:class:`~edge.errors.ConfigError` for any other parameter (a proxy score of zero
would silently rank a candidate it cannot train).

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

(Measured with the earlier name-based trainer, in float64; the float32 epochs take about 0.5x
that time at full batch, 0.8x with minibatches of 32, paired, at the same accuracy.)
Against the host trainer on the same tail, same samples and settings (``edge bench update``,
BENCHMARKS.md): the same accuracy gain at full batch, and within noise with minibatches.
Memory: ``h`` and ``r`` of every sample are kept, ``4 * n * T * (hidden + dim)`` bytes
(12 MB for 1000 demo samples), plus per-minibatch temporaries of that size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from edge.errors import ConfigError
from edge.learn.space import DEVICE_SPACE, Arch
from edge.learn.tail import TAIL_SPACE, Tail, find_tail, remember

__all__ = ["DEVICE_SPACE", "TAIL_SPACE", "DeviceTrainer"]

_CALIB = 256  # the SNIP mask's calibration batch (exporters.shira.make_masks's default)


class DeviceTrainer:
    """Train SHiRA adapters of a model's tail on the device (numpy; see the module doc).

    Inputs ``x`` are an array (a one-input model) or a dict of the model's inputs (token ids and an attention
    mask), checked against the graph. ``model_path`` is the exported ONNX model (``info`` is read from it when not
    given). ``threads`` is onnxruntime's intra-op thread count for the one model run
    (numpy's BLAS threads follow ``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS``).
    Picklable (the session is rebuilt on first use), so :class:`edge.learn.growth.GrowthJob`
    can run it in a child process.
    """

    _epoch_dtype = np.float32  # the mask's and the epochs' arithmetic (torch's); loss_and_grads is float64

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
        from edge.convert.onnx_read import read_model
        from edge.format.modelinfo import onnx_info
        from edge.format.onnx_graph import refuse_sparse

        if epochs < 1 or lr <= 0 or weight_decay < 0 or batch < 1:
            raise ConfigError(
                f"the device trainer needs epochs >= 1, lr > 0, weight_decay >= 0, batch >= 1; got {epochs}, {lr}, "
                f"{weight_decay}, {batch}"
            )
        self._proto = read_model(model_path)  # bounded, regular files only: a FIFO or /dev/zero is a FormatError
        self.info = info if info is not None else onnx_info(self._proto)
        refuse_sparse(self._proto, self.info.name)  # its onnxruntime session would densify them, unchecked
        self.epochs, self.lr, self.weight_decay, self.seed, self.batch = epochs, lr, weight_decay, seed, batch
        self.threads = threads
        self._tail: Tail = find_tail(self._proto, self.info)
        remember(self.info, self._tail)
        self._session = None

    def __getstate__(self) -> dict:  # an onnxruntime session does not pickle
        # the graph as bytes: pickle would import its class's module, onnx.onnx_ml_pb2, running all of onnx's
        # __init__ (ml_dtypes) in GrowthJob's child before its first step; parsed back with the classes alone
        return {**self.__dict__, "_session": None, "_proto": self._proto.SerializeToString()}

    def __setstate__(self, state: dict) -> None:
        from edge.format.onnx_proto import load_model

        self.__dict__.update(state, _proto=load_model(state["_proto"]))
        remember(self.info, self._tail)  # the tail layer sets, in a child process too

    @property
    def params(self) -> tuple[str, ...]:
        """The parameters this trainer can adapt: the last linear layer (when reachable) and the classifier."""
        return self._tail.params

    @property
    def classifier(self) -> str:
        return self._tail.steps[self._tail.ci].param

    def base_weights(self) -> dict[str, np.ndarray]:
        """The base values of :attr:`params` (float64, source layout and shape)."""
        return {s.param: s.w2d.reshape(s.shape).copy() for s in self._tail.linears}

    def _base2d(self) -> dict[str, np.ndarray]:
        return {s.param: s.w2d.copy() for s in self._tail.linears}

    # -- the model run ----------------------------------------------------------------------------
    def activations(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The tail's frozen inputs for inputs ``x``, from one run of the model: graph tensor -> ``[B, ...]`` float32.

        Tensors computed on the batch folded into another axis (a ``Gemm`` on ``[B*T, d]``)
        are kept per sample and unfolded by :meth:`_side`.
        """
        from edge.format.feeds import fixed_batch, pad_rows

        feeds, n = self._feeds(x)
        sess = self._run_session()
        t = self._tail
        names = list(dict.fromkeys([t.input, *t.residuals, t.logits]))
        parts: dict[str, list] = {k: [] for k in names}
        self._rest = {}
        step = fixed_batch(i.shape for i in sess.get_inputs())  # a file that fixes its batch: run in chunks of it,
        for i in range(0, n, step or self.batch):  # the last padded with zeros, its rows dropped
            nb = min(step or self.batch, n - i)
            rows = step or nb
            fb = pad_rows({k: v[i : i + nb] for k, v in feeds.items()}, rows)
            try:
                outs = sess.run(names, fb)
            except Exception as e:  # onnxruntime's InvalidArgument and friends: a shape the graph cannot take
                raise ConfigError(f"model {self.info.name!r} rejected inputs of shape {_shapes(x)}: {e}") from e
            for k, a in zip(names, outs):
                if not a.ndim or a.shape[0] % rows:
                    raise ConfigError(f"tensor {k!r} of shape {a.shape} has no batch axis for {rows} inputs")
                self._rest[k] = a.shape[1:]
                parts[k].append(a.reshape(rows, -1)[:nb])
        acts = {k: np.concatenate(v) for k, v in parts.items()}  # float32, as the model computes them
        lg = acts.pop(t.logits)
        got = self._forward(acts, self._base2d())[0]
        if got.shape != lg.shape or (err := float(np.abs(got - lg).max())) > 1e-3 * max(1.0, float(np.abs(lg).max())):
            raise ConfigError(
                f"model {self.info.name!r}: the numpy forward of the tail {list(self.params)} (from {t.input!r}) does "
                f"not reproduce the model's {t.logits!r}"
                + (f" (max difference {err:.3g})" if got.shape == lg.shape else f" (shape {got.shape} vs {lg.shape})")
                + "; the device trainer cannot train this model's tail"
            )
        return acts

    def _feeds(self, x) -> tuple[dict[str, np.ndarray], int]:
        """The model's inputs from ``x`` (an array for a one-input model, or a dict by input name: token ids and an
        attention mask), checked against the graph (:func:`edge.format.feeds.check_feeds`), float arrays cast to
        the input's float type; and the number of samples."""
        from edge.format.feeds import check_feeds, fixed_batch, onnx_input_specs

        specs = onnx_input_specs(self._proto, self.info.inputs)
        if fixed_batch(sp.shape for sp in specs.values()):  # a fixed batch: activations() runs in chunks of it
            specs = {k: replace(sp, shape=("edge.batch", *sp.shape[1:])) for k, sp in specs.items()}
        feeds = x if isinstance(x, Mapping) else {self.info.inputs[0]: x} if len(specs) == 1 else x
        if isinstance(feeds, Mapping):
            cast = {k: np.asarray(v) for k, v in feeds.items()}
            feeds = {
                k: v.astype(specs[k].dtype) if k in specs and specs[k].dtype.kind == "f" else v for k, v in cast.items()
            }
        try:
            feeds = check_feeds(feeds, specs)
        except ConfigError as e:
            raise ConfigError(f"model {self.info.name!r} rejected inputs of shape {_shapes(x)}: {e}") from e
        n = _count(feeds)
        if not n:
            raise ConfigError(f"the device trainer needs a non-empty batch of inputs, got shape {_shapes(x)}")
        return feeds, n

    def _side(self, acts: Mapping[str, np.ndarray], rows=None) -> dict[str, np.ndarray]:
        """The frozen inputs of samples ``rows`` (default all) in the shapes the graph computes them in."""
        return {k: (v if rows is None else v[rows]).reshape(-1, *self._rest[k]) for k, v in acts.items()}

    def _forward(self, acts, w2d, rows=None, tail: Tail | None = None):
        """The tail (default: the float64 one) on the samples ``rows`` of ``acts`` (float32, promoted by weights)."""
        t, side = tail or self._tail, self._side(acts, rows)
        return t.forward(side[t.input], side, w2d)

    def _run_session(self):
        if self._session is None:
            import onnxruntime as ort

            from edge.format.onnx_proto import pb2, value_info

            exposed = pb2().ModelProto()
            exposed.CopyFrom(self._proto)
            have = {o.name for o in exposed.graph.output}
            t = self._tail
            for name in (t.input, *t.residuals, t.logits):
                if name not in have:
                    exposed.graph.output.append(value_info(name, 1, None))  # FLOAT, any shape
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
        y = self._labels(y, _count(x))
        w = dict(weights or {})
        self._supported(list(w))
        w2d = self._base2d()
        w2d.update({p: np.asarray(v, np.float64).reshape(w2d[p].shape) for p, v in w.items()})
        acts = self.activations(x)
        loss, grads = self._loss_grads(acts, y, w2d, set(self.params))
        return loss, {s.param: grads[s.param].reshape(s.shape) for s in self._tail.linears}

    def _loss_grads(self, acts, y, w2d, want, rows=None, tail: Tail | None = None):
        logits, saved = self._forward(acts, w2d, rows, tail)
        loss, d = _cross_entropy(logits, y)
        return loss, (tail or self._tail).grads(d, saved, want)

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
            why = self._tail.why_short
            short = f"; the walk back from the classifier stopped at {why}" if why and arch.layers == "tail" else ""
            raise ConfigError(
                f"{arch} selects no tensor of model {self.info.name!r} (this trainer adapts {list(self.params)}){short}"
            )
        self._supported(targets)
        y = self._labels(y, _count(x))
        acts = self.activations(x)
        t = self._tail.astype(self._epoch_dtype)
        base = {p: v.astype(self._epoch_dtype) for p, v in self._base2d().items()}
        score = dict.fromkeys(targets, 0.0)  # sum over batches of |dL/dw|, as exporters.shira.make_masks
        for i in range(0, len(y), _CALIB):
            rows = np.arange(i, min(i + _CALIB, len(y)))
            grads = self._loss_grads(acts, y[rows], base, set(targets), rows=rows, tail=t)[1]
            score = {p: score[p] + np.abs(grads[p]) for p in targets}
        flat = {p: _snip_mask(base[p], score[p], arch.density) for p in targets}
        values = self._fit({p: np.divmod(f, base[p].shape[1]) for p, f in flat.items()}, acts, y, t, base)
        shape = {s.param: s.shape for s in self._tail.linears}
        tensors = {
            p: SparseDelta(np.stack(np.unravel_index(flat[p], shape[p])).astype(np.int32), values[p].astype(np.float32))
            for p in targets
        }
        meta = arch.grown_info(len(y), "device", self.epochs)
        return Adapter(name, self.info.fingerprint, tensors, {p: shape[p] for p in targets}, method="shira", info=meta)

    def _fit(self, masks: Mapping[str, tuple], acts, y, t: Tail, base) -> dict[str, np.ndarray]:
        """AdamW on the masked entries' deltas (minibatches of ``batch`` in a fresh shuffle each epoch, the last one
        smaller, as torch's ``randperm(n).split(batch)``), through tail ``t`` from the weights ``base``."""
        w = {p: v.copy() for p, v in base.items()}
        vals = {p: np.zeros(len(m[0])) for p, m in masks.items()}  # deltas and Adam moments in float64
        m1 = {p: np.zeros_like(v) for p, v in vals.items()}
        m2 = {p: np.zeros_like(v) for p, v in vals.items()}
        start = 0 if set(masks) - {self.classifier} else t.ci
        if start:  # the classifier's input does not change: compute it once, train the classifier alone
            side = self._side(acts)
            f = t.forward(side[t.input], side, base, stop=t.ci)[0]
            f_rest, f = f.shape[1:], f.reshape(len(y), -1)
        rng = np.random.default_rng(self.seed)
        step, decay = 0, 1.0 - self.lr * self.weight_decay
        for _ in range(self.epochs):
            order = rng.permutation(len(y))
            for b in (order[i : i + self.batch] for i in range(0, len(y), self.batch)):
                step += 1
                if start:
                    logits, saved = t.forward(f[b].reshape(-1, *f_rest), {}, w, start=start)
                    grads = t.grads(_cross_entropy(logits, y[b])[1], saved, set(masks), start=start)
                else:
                    grads = self._loss_grads(acts, y[b], w, set(masks), rows=b, tail=t)[1]
                for p, (rows, cols) in masks.items():  # AdamW, as torch.optim.AdamW (decoupled weight decay)
                    g = grads[p][rows, cols]
                    m1[p] = 0.9 * m1[p] + 0.1 * g
                    m2[p] = 0.999 * m2[p] + 0.001 * g * g
                    vals[p] *= decay
                    vals[p] -= self.lr * (m1[p] / (1 - 0.9**step)) / (np.sqrt(m2[p] / (1 - 0.999**step)) + 1e-8)
                    w[p][rows, cols] = base[p][rows, cols] + vals[p]
        return vals

    def logits(self, x: np.ndarray, adapter=None) -> np.ndarray:
        """The logits on ``x`` computed in numpy, with ``adapter``'s entries merged (in float32, as the runtime); for a
        model whose output is a final Softmax or LogSoftmax, the scores it normalises."""
        acts = self.activations(x)
        w = self._base2d()
        if adapter is not None:
            adapter.check_against(self.info)
            self._supported(list(adapter.tensors))
            shape = {s.param: s.shape for s in self._tail.linears}
            for p, d in adapter.tensors.items():
                merged = w[p].astype(np.float32)
                rows, cols = np.divmod(np.ravel_multi_index(np.asarray(d.indices, np.int64), shape[p]), merged.shape[1])
                merged[rows, cols] = merged[rows, cols] + d.values
                w[p] = merged.astype(np.float64)
        return self._forward(acts, w)[0]

    # -- validation --------------------------------------------------------------------------------
    def _supported(self, params: Sequence[str]) -> None:
        self._tail.check(params, f"model {self.info.name!r}")

    def _labels(self, y, n: int) -> np.ndarray:
        y = np.asarray(y)
        classes = self._tail.steps[self._tail.ci].m.shape[1]
        if not n:
            raise ConfigError("the device trainer needs a non-empty batch of labelled inputs, got none")
        if y.ndim != 1 or len(y) != n:
            raise ConfigError(f"the device trainer needs one label per input, got {y.shape} labels for {n} inputs")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= classes:
            raise ConfigError(
                f"labels must be integers in [0, {classes}) (the classifier {self.classifier!r} has {classes} "
                f"outputs), got {y.dtype} in [{y.min()}, {y.max()}]; new classes need ncm, slda or ranpac "
                "(edge.learn.update)"
            )
        return y.astype(np.int64)


def _count(x) -> int:
    """Samples in ``x``: an array's first axis, or a dict's (of equally long arrays)."""
    from edge.format.samples import batch_length

    return batch_length(x)


def _shapes(x):
    return {k: np.shape(v) for k, v in x.items()} if isinstance(x, Mapping) else np.shape(x)


# -- the math ----------------------------------------------------------------------------------------
def _cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy and ``dL/dlogits``."""
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    d = np.exp(logp)
    d[np.arange(len(y)), y] -= 1.0
    return float(-logp[np.arange(len(y)), y].mean()), d / len(y)


def _snip_mask(w: np.ndarray, grad: np.ndarray, density: float) -> np.ndarray:
    """Sorted flat indices of the ``max(1, round(density * numel))`` largest ``|w * g|`` (ties: lower index)."""
    n = max(1, int(round(density * w.size)))
    return np.sort(np.argsort(-np.abs(w * grad).reshape(-1), kind="stable")[:n])
