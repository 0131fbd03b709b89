"""The host trainer that growth uses: a SHiRA adapter trained with torch (:mod:`exporters.shira`).

:func:`edge.learn.growth.grow` (device core) takes any object with ``train(arch, x, y, name)``
and, for the ``snip`` proxy, ``saliency(x, y, params)``. This one trains every layer the
architecture names, with torch, on the workstation or a device that has torch; the numpy
:class:`edge.learn.device_trainer.DeviceTrainer` is the torch-free alternative.

Both run the same recipe, so on the same tail their adapters can be compared
(``edge bench update``, :mod:`lab.bench_trainers`): a SNIP mask on the training samples
(the ``max(1, round(density * numel))`` entries of largest ``|w| * sum_b |dL_b/dw|`` over
consecutive calibration batches of 256 samples, ties to the lower flat index: both
trainers pick the same entries), zero deltas at start, then
:class:`torch.optim.AdamW` (decoupled weight decay on the deltas, i.e. a pull towards the
base) over shuffled minibatches of ``batch`` for ``epochs``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["HostTrainer"]


class HostTrainer:
    """Train a SHiRA adapter (SNIP mask) for the exported model ``info`` with torch.

    ``checkpoint`` is what the ONNX model was exported from; ``load(checkpoint)`` returns
    the ``nn.Module`` (it must be a module-level function, so a growth child process can
    receive it). The model is loaded on first use. ``epochs``, ``lr``, ``batch`` and
    ``weight_decay`` mean what they mean for :class:`~edge.learn.device_trainer.DeviceTrainer`.
    """

    def __init__(
        self,
        checkpoint,
        info,
        *,
        load: Callable[[object], object],
        epochs: int = 30,
        lr: float = 1e-2,
        batch: int = 64,
        weight_decay: float = 0.0,
        seed: int = 0,
        threads: int | None = 1,
    ) -> None:
        from edge.errors import ConfigError

        if epochs < 1 or lr <= 0 or weight_decay < 0 or batch < 1:
            raise ConfigError(
                f"the host trainer needs epochs >= 1, lr > 0, weight_decay >= 0, batch >= 1; got {epochs}, {lr}, "
                f"{weight_decay}, {batch}"
            )
        self.checkpoint, self.info, self.epochs, self.lr, self.seed = checkpoint, info, epochs, lr, seed
        self.batch, self.weight_decay = batch, weight_decay
        self.threads = threads  # torch intra-op threads while training (small models train faster on one)
        self._load = load
        self._model = None

    def model(self):
        if self._model is None:
            self._model = self._load(self.checkpoint)
        return self._model

    def saliency(self, x: np.ndarray, y: np.ndarray, params: Sequence[str]) -> dict[str, np.ndarray]:
        """``|w * dL/dw|`` of each parameter on ``(x, y)`` (mean cross-entropy), at the base weights."""
        from exporters.shira import saliency

        return saliency(self.model(), x, y, params)

    def train(self, arch, x: np.ndarray, y: np.ndarray, name: str):
        import torch

        from exporters import shira

        before = torch.get_num_threads()
        try:
            if self.threads:
                torch.set_num_threads(self.threads)
            model = self.model()
            masks = shira.make_masks(
                model, arch.targets(self.info), density=arch.density, kind="snip", calib=(x, y), seed=self.seed
            )
            trained = shira.train_shira(
                model,
                masks,
                x,
                y,
                epochs=self.epochs,
                lr=self.lr,
                batch_size=self.batch,
                weight_decay=self.weight_decay,
                seed=self.seed,
                progress=False,
            )
        finally:
            torch.set_num_threads(before)
        meta = arch.grown_info(len(x), "host", self.epochs)
        return shira.shira_adapter(trained, self.info, name, meta)
