"""The monitor's own TensorBoard output (rank 0 only): a writer that never raises, and the sink
that turns records into scalars, limit lines, texts and the stability-plasticity image."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .budget import Decision, threshold
from .config import MonitorConfig
from .measurements import Snapshot
from .sinks import Sink
from .sp import trajectory

__all__ = ["ScalarWriter", "TensorBoardSink", "custom_scalars_layout", "resolve_tensorboard_dir"]

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


class TensorBoardSink(Sink):
    """The monitor's records as TensorBoard scalars, limit lines, texts and the stability-plasticity image.

    Per record: every finite metric under its key; each budget's limit in its key's units as
    ``budget/<label>`` (drawn beside the key's curve); fired budget messages under
    ``arena/decisions``; the image ``arena/sp_plane`` redrawn. At the start, a custom-scalars
    layout (:func:`custom_scalars_layout`).
    """

    def __init__(self, writer: ScalarWriter, config: MonitorConfig, measured_keys: Sequence[str]) -> None:
        self.writer = writer
        self.config = config
        writer.custom_scalars(custom_scalars_layout(config, measured_keys))

    def record(self, snapshot: Snapshot, decision: Decision | None, history: Sequence[Snapshot]) -> None:
        base = history[0].metrics if history else snapshot.metrics
        lines = {f"budget/{b.label}": threshold(b, base[b.key]) for b in self.config.budgets if b.key in base}
        self.writer.scalars({**snapshot.metrics, **lines}, snapshot.step)
        self._sp_image(snapshot.step, history)
        for outcome in decision.fired if decision else ():
            self.writer.text("arena/decisions", outcome.message, snapshot.step)
        self.writer.flush()

    def text(self, tag: str, message: str, step: int) -> None:
        self.writer.text(tag, message, step)
        self.writer.flush()

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.writer.scalars(values, step)

    def close(self) -> None:
        self.writer.close()

    def _sp_image(self, step: int, history: Sequence[Snapshot]) -> None:
        if not self.config.logging.sp_plane_image:
            return
        points = trajectory(history)
        if not points:
            return
        try:
            from .plots import rewound_indices, superseded_indices, trajectory_image

            image = trajectory_image(points, self.config.operating_point, f"stability-plasticity @ step {step}",
                                     rewound_indices(history), superseded_indices(history))
        except Exception as e:  # a plotting problem must not end training
            logger.warning("arena-callbacks: could not draw the stability-plasticity image (%s)", e)
            return
        self.writer.image("arena/sp_plane", image, step)


def custom_scalars_layout(config: MonitorConfig, keys: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """TensorBoard custom-scalars charts: retention, stability-plasticity, geometry, and each
    budgeted key with its limit line."""
    charts: dict[str, list[Any]] = {}
    if any(k.startswith("retention/") for k in keys):
        charts["retention"] = ["Multiline", [r"^retention/"]]
        charts["delta NLL"] = ["Multiline", [r"^delta_nll/"]]
    if "sp/stability" in keys:
        charts["stability & plasticity"] = ["Multiline", [r"^sp/(stability|plasticity)$"]]
    if "sp/operating_step" in keys:
        charts["operating point"] = ["Multiline", [r"^sp/operating_(plasticity|stability)$"]]
        charts["marginal rate & overshoot"] = ["Multiline", [r"^sp/(marginal_rate|overshoot)$"]]
    if config.geometry.enabled:
        for metric in ("procrustes", "cka", "gram"):
            charts[f"geometry: {metric}"] = ["Multiline", [rf"^geometry/{metric}/"]]
    if config.spectra.enabled:
        charts["spectra"] = ["Multiline", [r"^spectral/.*/mean$"]]
    budgets = {
        f"{b.label} ({b.action.value})": ["Multiline", [rf"^{re.escape(b.key)}$", rf"^budget/{re.escape(b.label)}$"]]
        for b in config.budgets
    }
    layout = {"arena": charts}
    if budgets:
        layout["arena budgets"] = budgets
    return layout
