"""The monitor's own TensorBoard writer (rank 0 only), imported lazily."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["ScalarWriter", "resolve_tensorboard_dir"]

logger = logging.getLogger(__name__)


def resolve_tensorboard_dir(configured: str | None, trainer: Any, output_dir: str) -> str:
    """The folder the trainer's TensorBoard events go to, so the monitor's curves sit beside them.

    Order: the configured folder; the folder of the trainer's own TensorBoard callback; the
    ``TENSORBOARD_LOGGING_DIR`` environment variable; ``<output_dir>/runs/arena``.
    """
    if configured:
        return os.path.expanduser(configured)
    if trainer is not None:
        for cb in getattr(getattr(trainer, "callback_handler", None), "callbacks", []):
            writer = getattr(cb, "tb_writer", None)
            log_dir = getattr(writer, "log_dir", None) or getattr(cb, "logging_dir", None)
            if type(cb).__name__ == "TensorBoardCallback" and log_dir:
                return str(log_dir)
    env = os.getenv("TENSORBOARD_LOGGING_DIR")
    if env:
        return os.path.expanduser(env)
    return os.path.join(output_dir, "runs", "arena")


class ScalarWriter:
    """Writes finite scalars and decision texts; failures are warned about once, never raised."""

    def __init__(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # pragma: no cover - tensorboard is a dependency
            raise RuntimeError(
                "logging.tensorboard=true needs the 'tensorboard' package: pip install tensorboard "
                "(or set logging.tensorboard=false)"
            ) from e
        self.log_dir = log_dir
        self._writer: Any = SummaryWriter(log_dir=log_dir)
        self._failed = False

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        self._guard(lambda w: [w.add_scalar(k, v, step) for k, v in metrics.items() if math.isfinite(v)])

    def text(self, tag: str, text: str, step: int) -> None:
        self._guard(lambda w: w.add_text(tag, text, step))

    def image(self, tag: str, image: Any, step: int) -> None:
        """An ``H × W × 3|4`` uint8 array."""
        self._guard(lambda w: w.add_image(tag, image, step, dataformats="HWC"))

    def custom_scalars(self, layout: dict[str, dict[str, list[Any]]]) -> None:
        """TensorBoard's custom-scalars layout: ``{category: {chart: ["Multiline", [tag regexes]]}}``."""
        self._guard(lambda w: w.add_custom_scalars(layout))

    def flush(self) -> None:
        self._guard(lambda w: w.flush())

    def close(self) -> None:
        if self._writer is not None:
            self._guard(lambda w: w.close())
            self._writer = None

    def _guard(self, fn: Any) -> None:
        if self._writer is None or self._failed:
            return
        try:
            fn(self._writer)
        except Exception as e:  # a full disk must not end training
            self._failed = True
            logger.warning("arena-callbacks: TensorBoard write to %s failed (%s); disabling it", self.log_dir, e)
