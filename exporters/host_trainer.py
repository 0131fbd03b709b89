"""The host trainer that growth uses: a SHiRA adapter trained with torch (:mod:`exporters.shira`).

:func:`edge.learn.growth.grow` (device core) takes any object with ``train(arch, x, y, name)``
and, for the ``snip`` proxy, ``saliency(x, y, params)``. This one trains every layer the
architecture names, with torch, on the workstation or a device that has torch; the numpy
:class:`edge.learn.device_trainer.DeviceTrainer` is the torch-free alternative.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["HostTrainer"]


class HostTrainer:
    """Train a SHiRA adapter (SNIP mask) for the exported model ``info`` with torch.

    ``checkpoint`` is what the ONNX model was exported from; ``load(checkpoint)`` returns
    the ``nn.Module`` (it must be a module-level function, so a growth child process can
    receive it). The model is loaded on first use.
    """

    def __init__(
        self,
        checkpoint,
        info,
        *,
        load: Callable[[object], object],
        epochs: int = 30,
        lr: float = 1e-2,
        seed: int = 0,
        threads: int | None = 1,
    ) -> None:
        self.checkpoint, self.info, self.epochs, self.lr, self.seed = checkpoint, info, epochs, lr, seed
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
        from exporters import shira

        trained = shira.train_snip(
            self.model(),
            arch.targets(self.info),
            x,
            y,
            density=arch.density,
            epochs=self.epochs,
            lr=self.lr,
            seed=self.seed,
            threads=self.threads,
        )
        meta = {"mask": "snip", "density": arch.density, "layers": arch.layers, "grown": True, "samples": len(x)}
        return shira.shira_adapter(trained, self.info, name, meta)
