"""The ``shira-head`` update method: SHiRA entries of a model's head, trained on device without autograd.

It changes the model itself: the learned entries of the last linear layer
(``head.weight``, reading ``features``) become a standard SHiRA
:class:`~edge.format.adapter.Adapter` (:meth:`edge.learn.update.Updater.to_adapter`) that
``Runtime.load_adapter``/``switch`` fuse in place. The mask is picked on device by
SNIP (largest ``|w * dL/dw|`` on the samples); training is Adam on softmax
cross-entropy with hand-written gradients (``dL/dW = (softmax(z) - onehot)^T f / n``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge.errors import ConfigError
from edge.learn.methods import METHODS, Context, Method, softmax

__all__ = ["ShiraHead", "head_context", "head_view", "source_indices"]


@METHODS.register("shira-head")
class ShiraHead(Method):
    """SHiRA entries of the head ``W [C, d]`` (``logits = f W^T + b``), trained by hand-written gradients.

    The mask (``density`` of the head's entries) is picked by SNIP on the first
    update's samples and kept afterwards; later updates continue training the same
    entries. Adam on mean softmax cross-entropy, full batch, over the new samples
    plus a replay buffer of up to ``replay`` feature vectors per class kept from
    earlier updates (each sample seen so far equally likely to stay), which limits
    forgetting of earlier domains.
    """

    name = "shira-head"
    per_domain = False  # one head for every domain; the replay buffer keeps earlier domains

    @dataclass(frozen=True)
    class Config:
        density: float = 0.5  # of the head's entries (the head is a tiny share of the model)
        steps: int = 300
        lr: float = 0.03
        weight_decay: float = 1e-3  # pulls deltas towards 0 (the base head)
        replay: int = 20  # feature vectors kept per class for later updates (0: none)

        def __post_init__(self):
            if not 0.0 < self.density <= 1.0:
                raise ConfigError(f"shira-head density must be in (0, 1], got {self.density}")
            if self.steps < 1 or self.lr <= 0 or self.weight_decay < 0 or self.replay < 0:
                raise ConfigError(
                    f"shira-head needs steps >= 1, lr > 0, weight_decay >= 0, replay >= 0; got {self.steps}, "
                    f"{self.lr}, {self.weight_decay}, {self.replay}"
                )

    def initial(self):
        c = self.ctx.head_weight.shape[0]
        return {
            "indices": np.zeros((2, 0), np.int32),
            "values": np.zeros(0, np.float32),
            "bias": np.zeros(c, np.float32),
            "counts": np.zeros(c, np.int64),
            "replay_features": np.zeros((0, self.ctx.dim), np.float32),
            "replay_labels": np.zeros(0, np.int64),
        }

    def check_labels(self, y):
        c = self.ctx.head_weight.shape[0]
        if y.max() >= c:
            raise ConfigError(
                f"shira-head trains the model's head {self.ctx.head_name!r} with {c} outputs, but got label "
                f"{int(y.max())}; use ncm, slda or ranpac to add classes"
            )

    def estimate_bytes(self, n, classes):
        c, d = self.ctx.head_weight.shape
        n += self.config.replay * c
        return 8 * (8 * c * d + 6 * n * c + 2 * n * d)

    def fit(self, f, y, logits, seed):
        w0 = self.ctx.head_weight.astype(np.float64)
        replay = self._replay(f, y, seed)
        f_new = f
        bias = self.tensors["bias"].astype(np.float64)
        if not self.counts.any():  # first update: the head's bias, read off the model's own outputs
            if logits is None:
                raise ConfigError("the first shira-head update needs the model's logits to recover the head bias")
            bias = _head_bias(logits.astype(np.float64), f_new.astype(np.float64) @ w0.T, self.ctx.head_name)
        f = np.concatenate([f_new, self.tensors["replay_features"]]).astype(np.float64)
        y_new, y = y, np.concatenate([y, self.tensors["replay_labels"]])
        onehot = np.eye(w0.shape[0])[y]
        idx = self.tensors["indices"]
        if idx.shape[1] == 0:  # SNIP: largest |w * dL/dw| on these samples
            grad = (softmax(f @ w0.T + bias) - onehot).T @ f / len(f)
            n = max(1, int(round(self.config.density * w0.size)))
            flat = np.sort(np.argsort(-np.abs(w0 * grad).reshape(-1), kind="stable")[:n])
            idx = np.stack(np.unravel_index(flat, w0.shape)).astype(np.int32)
        rows, cols = idx.astype(np.int64)
        values = self.tensors["values"].astype(np.float64) if self.tensors["values"].size else np.zeros(rows.size)
        cfg = self.config
        m1, m2 = np.zeros_like(values), np.zeros_like(values)
        w = w0.copy()
        for t in range(1, cfg.steps + 1):
            w[rows, cols] = w0[rows, cols] + values
            p = softmax(f @ w.T + bias)
            g = ((p - onehot).T @ f)[rows, cols] / len(f) + cfg.weight_decay * values
            m1 = 0.9 * m1 + 0.1 * g
            m2 = 0.999 * m2 + 0.001 * g * g
            values -= cfg.lr * (m1 / (1 - 0.9**t)) / (np.sqrt(m2 / (1 - 0.999**t)) + 1e-8)
        return {
            "indices": idx,
            "values": values.astype(np.float32),
            "bias": bias.astype(np.float32),
            "counts": self.counts + np.bincount(y_new, minlength=w0.shape[0]),
            **replay,
        }

    def _replay(self, f: np.ndarray, y: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        """The next replay buffer: per class, a uniform sample of every vector seen so far (reservoir)."""
        cap = self.config.replay
        old_f, old_y = self.tensors["replay_features"], self.tensors["replay_labels"]
        rng = np.random.default_rng([seed, 7])
        keep_f, keep_y = [], []
        for c in np.union1d(np.unique(old_y), np.unique(y)):
            old_c, new_c = np.flatnonzero(old_y == c), np.flatnonzero(y == c)
            seen = int(self.counts[c]) if c < self.counts.size else 0
            k_new = min(new_c.size, round(cap * new_c.size / (seen + new_c.size)))
            k_old = min(old_c.size, cap - k_new)
            keep_f += [old_f[rng.choice(old_c, k_old, replace=False)], f[rng.choice(new_c, k_new, replace=False)]]
            keep_y += [np.full(k_old + k_new, c, np.int64)]
        return {
            "replay_features": np.concatenate(keep_f).astype(np.float32) if keep_f else old_f,
            "replay_labels": np.concatenate(keep_y) if keep_y else old_y,
        }

    def merged_weight(self) -> np.ndarray:
        w = self.ctx.head_weight.copy()
        rows, cols = self.tensors["indices"].astype(np.int64)
        w[rows, cols] = w[rows, cols] + self.tensors["values"]  # the runtime's merge, in float32
        return w

    def scores(self, f):
        if self._cache is None:
            self._cache = self.merged_weight()
        return f.astype(np.float32, copy=False) @ self._cache.T + self.tensors["bias"]


def _head_bias(out: np.ndarray, scores: np.ndarray, head: str) -> np.ndarray:
    """The head's bias from the model's output ``out`` and ``scores = f W^T``: ``out = scores + b``, or its Softmax or
    LogSoftmax (a model that serves probabilities: the bias up to a constant, which they do not see). The output's
    kind is decided first, from every row (one row fits a bias of any kind exactly); a row whose probabilities
    underflowed to 0 (a confident input) tells nothing of the bias and is left out."""
    lse = np.log(np.exp(out - out.max(1, keepdims=True)).sum(1)) + out.max(1)
    if np.abs(lse).max() < 1e-4:  # log-probabilities: out = z - logsumexp(z)
        logp, kind = out, "LogSoftmax"
    elif out.min() >= 0 and np.abs(out.sum(1) - 1).max() < 1e-4:  # probabilities: out = softmax(z)
        rows = (out > 1e-30).all(1)
        if not rows.any():
            raise ConfigError(
                "shira-head reads the head's bias off the model's probabilities, but every sample's underflowed to 0 "
                "for some class (confident inputs); give samples the model is less sure of, or use ncm, slda or ranpac"
            )
        logp, scores, kind = np.log(out[rows]), scores[rows], "Softmax"
    else:
        logp, kind = None, "logits"
    if logp is None:
        resid = out - scores
        tol = 1e-3 * max(1.0, float(np.abs(out).max()))
    else:  # z - logsumexp(z) - scores = b - logsumexp(z): centred per row, b - mean(b)
        resid = logp - scores
        resid -= resid.mean(1, keepdims=True)
        tol = 1e-3 * max(1.0, float(np.abs(logp).max()))
    bias = resid.mean(0)
    if np.abs(resid - bias).max() > tol:
        raise ConfigError(
            f"shira-head needs logits = features @ {head}^T + bias (or their Softmax or LogSoftmax), but this model's "
            f"outputs (read as {kind}) are not that; use ncm, slda or ranpac"
        )
    return bias


# -- the head a shira-head update trains ------------------------------------------------------------------------
def head_view(shape: tuple, dim: int) -> str | None:
    """How a head of source ``shape`` reads ``dim``-wide features: ``"rows"`` (``[C, dim]``, or a 1x1 convolution's
    ``[C, dim, 1, 1]``), ``"transposed"`` (``[dim, C]``: ``x @ W``), or None (it does not)."""
    if len(shape) == 2 and shape[1] == dim or len(shape) == 4 and tuple(shape[1:]) == (dim, 1, 1):
        return "rows"
    return "transposed" if len(shape) == 2 and shape[0] == dim else None


def head_context(runtime, head: str, dim: int, logits: str | None) -> tuple[Context, tuple]:
    """The :class:`Context` of a shira-head update of ``head`` on ``runtime`` (the head as ``[C, dim]``) and the
    head's source layout ``(shape, view)`` for :func:`source_indices`; :class:`ConfigError` when it cannot train it."""
    info = runtime.info
    if head not in info.tensors:
        raise ConfigError(_no_head(info, head, dim, logits))
    if info.tensors[head].channel_scale is not None:
        raise ConfigError(
            f"head {head!r} of model {info.name!r} has a BatchNorm folded into it (import-onnx's channel_scale); "
            "shira-head trains an unfolded head: use ncm, slda or ranpac"
        )
    if logits is None:
        raise ConfigError(
            f"shira-head needs a logits output; model {info.name!r} has {list(info.outputs)}: name the one the head "
            "makes, logit_output=NAME (edge update: -o logit_output=NAME)"
        )
    touched = [n for n in runtime.active if head in runtime.adapter(n).tensors]
    if touched:
        raise ConfigError(
            f"active adapter(s) {touched} already change {head!r}; switch them off (rt.switch(None)) "
            "before a shira-head update, which trains deltas against the base head"
        )
    w = runtime.weights(head).astype(np.float32)
    view = head_view(w.shape, dim)
    if view is None:
        raise ConfigError(
            f"head {head!r} of shape {w.shape} does not read {dim}-wide features (a Linear's [classes, {dim}], "
            f"a 1x1 convolution's [classes, {dim}, 1, 1], or the [{dim}, classes] of x @ W)"
        )
    shape, w = tuple(w.shape), w.reshape(w.shape[0], -1)
    return Context(dim, w.T.copy() if view == "transposed" else w, head), (shape, view)


def _no_head(info, head: str, dim: int, logits: str | None) -> str:
    """Why ``head`` cannot be trained when the model has no such target, and what to pass: a name only when some
    target reads ``dim``-wide features; a model without a logits output either (one that outputs an embedding)
    is told it has no head to train, not to name one."""
    reads = [k for k, t in info.tensors.items() if head_view(t.shape, dim) is not None]
    if logits is None:
        seen = (
            f"its tensors that read {dim}-wide features: {reads[:8]}"
            if reads
            else f"none of its tensors reads {dim}-wide features"
        )
        return (
            f"shira-head trains the head {head!r}, a classifier's, and model {info.name!r} has no such tensor and no "
            f"logits output (its outputs: {list(info.outputs)}; {seen}): a model that outputs embeddings has no head "
            "to train, use ncm, slda or ranpac; for one whose head makes logits, pass head=NAME and logit_output=NAME "
            "(edge update: -o head=NAME -o logit_output=NAME)"
        )
    if not reads:
        return (
            f"shira-head trains the head {head!r}, which model {info.name!r} cannot rewrite, and none of its tensors "
            f"reads the {dim}-wide features given: learn over the features its head reads (edge update: --taps NAME "
            "-o head=NAME), or use ncm, slda or ranpac"
        )
    return (
        f"shira-head trains the head {head!r}, which model {info.name!r} cannot rewrite (its tensors that "
        f"read {dim}-wide features: {reads[:8]}); pass head=NAME (edge update: -o head=NAME)"
    )


def source_indices(indices: np.ndarray, layout: tuple) -> np.ndarray:
    """``[2, N]`` entries of the ``[C, dim]`` head as int32 indices in its source ``layout`` (:func:`head_context`)."""
    shape, view = layout
    rows, cols = np.asarray(indices)
    idx = np.stack([cols, rows] if view == "transposed" else [rows, cols])
    return np.concatenate([idx, np.zeros((len(shape) - 2, idx.shape[1]), idx.dtype)]).astype(np.int32)
