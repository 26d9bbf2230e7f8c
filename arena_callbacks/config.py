"""Configuration of the forgetting monitor.

Everything a user sets lives here as frozen pydantic models with unknown fields forbidden.
Live objects (datasets, tokenizers, models) are passed to the monitor beside the config,
never inside it.

Example:
    >>> cfg = MonitorConfig(
    ...     cadence={"every_n_steps": 20},
    ...     budgets=[{"key": "retention/general", "max_drop": 0.1, "patience": 2}],
    ... )
    >>> cfg.cadence.every_n_steps
    20
"""

from __future__ import annotations

import json
import re
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "Action",
    "BudgetConfig",
    "CadenceConfig",
    "GeometryConfig",
    "LoggingConfig",
    "MonitorConfig",
    "OperatingPointConfig",
    "ProbeSettings",
    "SpectraConfig",
]

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-{},|*]+)+$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class Action(str, Enum):
    """What happens when a budget is exhausted."""

    LOG = "log"
    STOP = "stop"
    REWIND = "rewind"

    @property
    def severity(self) -> int:
        return {Action.LOG: 0, Action.STOP: 1, Action.REWIND: 2}[self]


#: Actions this version can carry out.
IMPLEMENTED_ACTIONS = frozenset({Action.LOG, Action.STOP, Action.REWIND})


class CadenceConfig(_Frozen):
    """When probes run.

    By default the monitor schedules its own probes so that they add at most
    ``overhead_budget`` to the wall time: from the measured cost of the last probe step and the
    measured time of a training step (all ranks' slowest), the next probe comes after
    ``ceil(cost / (b·step_time))`` steps, so a monitored run takes at most ``1 + b`` times the
    same run without the monitor (and the probes' share of it stays below ``b``) as long as a
    probe step costs what the last one did. A fixed ``every_n_steps``, when set, takes
    precedence.

    Attributes:
        every_n_steps: Probe after every N optimizer steps (``None``: use ``overhead_budget``).
        overhead_budget: Most wall time the probes may add, as a fraction of the training time
            (0 < b < 1; 0.03: a run takes at most 1.03 times as long), or ``None``.
        min_interval: Fewest steps between budget-scheduled probes.
        max_interval: Most steps between budget-scheduled probes (``None``: no limit); a cap
            can make the probes cost more than the budget.
        calibration_steps: Training steps timed after the baseline before the first probe is
            scheduled.
        on_evaluate: Probe each time the trainer evaluates.
        at_train_end: Probe once more at the end of training if the last step was not probed.
    """

    every_n_steps: int | None = Field(default=None, ge=1)
    overhead_budget: float | None = Field(default=0.03, gt=0, lt=1)
    min_interval: int = Field(default=1, ge=1)
    max_interval: int | None = Field(default=None, ge=1)
    calibration_steps: int = Field(default=5, ge=1)
    on_evaluate: bool = False
    at_train_end: bool = True

    @model_validator(mode="after")
    def _some_cadence(self) -> CadenceConfig:
        if self.every_n_steps is None and self.overhead_budget is None and not self.on_evaluate:
            raise ValueError(
                "cadence: every_n_steps and overhead_budget are None and on_evaluate is False, so probes would "
                "never run; set every_n_steps to a positive integer, overhead_budget to a fraction such as 0.03, "
                "or on_evaluate to true"
            )
        if self.max_interval is not None and self.max_interval < self.min_interval:
            raise ValueError(f"cadence.max_interval: {self.max_interval} is below min_interval {self.min_interval}")
        return self

    @property
    def budgeted(self) -> bool:
        """Probes scheduled by ``overhead_budget`` (no fixed ``every_n_steps``)."""
        return self.every_n_steps is None and self.overhead_budget is not None


class ProbeSettings(_Frozen):
    """How probes are tokenised and run.

    Attributes:
        batch_size: Rows per forward pass (per rank). A row holds one sequence, or, where the
            model takes a 4D attention mask (SDPA, eager), several short ones, never more
            tokens than the probe's longest sequence.
        max_length: Longest tokenised sequence allowed; longer rows are an error unless
            ``truncate`` is set.
        max_examples: Rows used per probe (a seeded sample when the set is larger);
            ``None`` uses every row.
        precision: ``fp32`` runs with autocast off, ``bf16``/``fp16`` under autocast in that
            dtype, ``auto`` in the model's own parameter dtype with autocast off. Never the
            trainer's ambient autocast.
        truncate: Cut long rows from the left (text: from the right) instead of failing.
        seed: Seed of the row sample.
        progress_bar: Show a progress bar: ``True``, ``False``, or ``None`` for "when a pass
            has more than ``progress_min_batches`` batches".
        progress_min_batches: Threshold for the automatic progress bar.
        samples: Answers kept per generative probe at each probe step, beside the baseline's
            (``generations.jsonl``, TensorBoard text): the same rows every time, drawn with
            ``seed``. ``0``: none.
    """

    batch_size: int = Field(default=8, ge=1)
    max_length: int = Field(default=256, ge=2)
    max_examples: int | None = Field(default=64, ge=1)
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    truncate: bool = False
    seed: int = 0
    progress_bar: bool | None = None
    progress_min_batches: int = Field(default=20, ge=1)
    samples: int = Field(default=3, ge=0)


class BudgetConfig(_Frozen):
    """A limit on one measured quantity.

    Exactly one limit is set:

    * ``max_drop``: ``baseline - value <= max_drop`` (absolute drop from the step-0 value),
    * ``max_relative_drop``: ``(baseline - value) / |baseline| <= max_relative_drop``,
    * ``max_rise``: ``value - baseline <= max_rise`` (for quantities where lower is better, e.g. NLL),
    * ``min_value``: ``value >= min_value`` (a floor),
    * ``max_value``: ``value <= max_value`` (a ceiling).

    Attributes:
        key: The snapshot key the budget watches, e.g. ``retention/facts`` or ``sp/stability``.
        name: Label used in messages (defaults to the key).
        patience: Consecutive probe steps in breach before the action fires.
        min_step: Breaches before this global step are ignored.
        action: ``log``, ``stop`` or ``rewind`` (what ``rewind`` does: the ``rewind`` section).
        confidence: With a level such as 0.95, the limit must be exceeded at that confidence: the
            breach test becomes one-sided on the key's paired standard error ``stderr/<key>``
            (the excess over the limit must be more than ``z·stderr``, z = 1.645 at 0.95), so
            probe noise alone fires it at most ``1 - confidence`` of the time. Only for keys that
            have an error: ``nll``, ``delta_nll``, ``score``, ``retention*`` of a probe, the
            ``target/`` keys, ``sp/plasticity``, and ``sp/stability`` as a mean. ``None``: the
            plain comparison with the limit.
    """

    key: str
    name: str | None = None
    max_drop: float | None = Field(default=None, ge=0)
    max_relative_drop: float | None = Field(default=None, ge=0)
    max_rise: float | None = Field(default=None, ge=0)
    min_value: float | None = None
    max_value: float | None = None
    patience: int = Field(default=1, ge=1)
    min_step: int = Field(default=0, ge=0)
    action: Action = Action.STOP
    confidence: float | None = Field(default=None, gt=0.5, lt=1)

    @model_validator(mode="after")
    def _check(self) -> BudgetConfig:
        if not _KEY_PATTERN.match(self.key):
            raise ValueError(
                f"key: {self.key!r} is not a namespaced metric key; expected something like "
                "'retention/<probe>', 'delta_nll/<probe>' or 'sp/stability'"
            )
        limits = {k: getattr(self, k) for k in _LIMIT_FIELDS if getattr(self, k) is not None}
        if len(limits) != 1:
            found = ", ".join(f"{k}={v}" for k, v in limits.items()) or "none"
            raise ValueError(
                f"budget for {self.key!r}: set exactly one of {', '.join(_LIMIT_FIELDS)} (found: {found})"
            )
        if self.confidence is not None and not _ERROR_KEYS.match(self.key):
            raise ValueError(
                f"confidence: {self.key!r} has no standard error, so a confidence level cannot apply to it; "
                "keys with one: nll/<probe>, delta_nll/<probe>, score/<probe>, retention/<probe>, "
                "retention_nll/<probe>, retention_score/<probe>, target/nll, target/delta_nll, target/score, "
                "sp/plasticity, sp/stability (stability: mean); or drop confidence for the plain comparison"
            )
        if self.action not in IMPLEMENTED_ACTIONS:
            raise ValueError(
                f"action: {self.action.value!r} is not available in this version; "
                f"use one of {sorted(a.value for a in IMPLEMENTED_ACTIONS)}"
            )
        return self

    @property
    def label(self) -> str:
        return self.name or self.key

    @property
    def limit(self) -> tuple[str, float]:
        """The one limit set, as ``(field name, value)``."""
        for k in _LIMIT_FIELDS:
            v = getattr(self, k)
            if v is not None:
                return k, float(v)
        raise AssertionError("validated budgets always have one limit")  # pragma: no cover


#: Keys with a paired standard error (``stderr/<key>``, :mod:`arena_callbacks.stats`).
_ERROR_KEYS = re.compile(
    r"^((nll|delta_nll|score|retention|retention_nll|retention_score)/[^/]+|target/(nll|delta_nll|score)"
    r"|sp/(plasticity|stability))$"
)
_LIMIT_FIELDS = ("max_drop", "max_relative_drop", "max_rise", "min_value", "max_value")


class SpectraConfig(_Frozen):
    """Weight-space spectra of adapted layers (docs/design.md §3), on their own cadence.

    Attributes:
        enabled: Compute ``spectral/*`` keys.
        every_n_steps: Compute them at probe steps that are multiples of this (and at baseline).
        modules: Name patterns of the layers to measure (a pattern selects the layers at or
            under the modules it matches); ``None``: every adapted (PEFT) layer, or for full
            finetuning every linear layer but the output head (a dense SVD each: narrow it on
            big models).
        top_k: Singular directions checked for intruder dimensions.
        intruder_threshold: A top singular vector of the finetuned weight whose best |cosine|
            with the pretrained ones is below this is an intruder.
        precision: Working precision, on the device the weights live on: ``fp32`` (fast, on
            a GPU too) or ``fp64`` (the reference; slow on most GPUs).
        exact: Full SVDs for the top of each spectrum too (W_ft's top singular vectors, a
            dense update's norm) instead of a randomized subspace iteration: the reference
            method, ``min(d_out, d_in)³`` per layer and pass.
        power_iterations: Subspace iterations of the randomized top-of-spectrum solver
            (docs/geometry.md states its error).
    """

    enabled: bool = False
    every_n_steps: int = Field(default=200, ge=1)
    modules: tuple[str, ...] | None = None
    top_k: int = Field(default=10, ge=1)
    intruder_threshold: float = Field(default=0.5, gt=0, lt=1)
    precision: Literal["fp32", "fp64"] = "fp32"
    exact: bool = False
    power_iterations: int = Field(default=8, ge=0, le=100)

    def solver(self) -> Any:
        """The :class:`~arena_callbacks.spectra.Solver` these settings describe."""
        import torch

        from .spectra import Solver

        dtype = torch.float32 if self.precision == "fp32" else torch.float64
        return Solver(dtype=dtype, randomized=not self.exact, power_iterations=self.power_iterations, on_host=False)


class GeometryConfig(_Frozen):
    """Activation geometry: how far tracked modules' outputs moved from the pretrained model.

    Attributes:
        enabled: Measure ``geometry/<metric>/<module>`` at every probe step.
        modules: Name patterns (``layers.{9,18}.mlp.down_proj``, ``*``, ``final_norm``) or
            ``["auto"]``: the final norm plus ``o_proj``/``down_proj`` at 1/6, 1/2, 5/6 depth.
        probes: Capability probes whose tokens are used; ``None``: every text probe (else every
            capability probe).
        tokens_per_module: Size of the fixed, seeded token sample.
        reference: ``auto`` (PEFT: adapters switched off with ``disable_adapter()``; otherwise
            cached), ``disable_adapter``, or ``cache`` (activations kept from the baseline).
        cache_dtype: Precision of cached reference activations.
        max_cache_mb: Largest cache allowed; a bigger one is refused at train start.
        seed: Seed of the token sample.
    """

    enabled: bool = False
    modules: tuple[str, ...] = ("auto",)
    probes: tuple[str, ...] | None = None
    tokens_per_module: int = Field(default=1024, ge=16)
    reference: Literal["auto", "disable_adapter", "cache"] = "auto"
    cache_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    max_cache_mb: float = Field(default=512.0, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _modules_given(self) -> GeometryConfig:
        if not self.modules or any(not m.strip() for m in self.modules):
            raise ValueError(f"modules: {list(self.modules)!r} must be non-empty name patterns, or ['auto']")
        return self


class OperatingPointConfig(_Frozen):
    """The stability-plasticity estimate: which point of the run is best, and overshoot.

    Attributes:
        rule: ``weighted`` picks the maximum of ``weight·P + S``; ``constrained`` the best ``P``
            with ``S >= min_stability``.
        weight: ``w`` of the weighted rule (LiNeS uses 2-5).
        min_stability: ``S_min`` of the constrained rule.
        exchange_rate: Overshoot when the marginal rate ``-ΔS/ΔP`` along the smoothed
            trajectory stays above this.
        overshoot_patience: For this many consecutive probe steps.
        smoothing: Moving-average window (probe points) applied before rates are taken.
    """

    rule: Literal["weighted", "constrained"] = "weighted"
    weight: float = Field(default=2.0, ge=0)
    min_stability: float = 0.9
    exchange_rate: float = Field(default=1.0, gt=0)
    overshoot_patience: int = Field(default=2, ge=1)
    smoothing: int = Field(default=3, ge=1)


class RewindConfig(_Frozen):
    """What a ``rewind`` action does (docs/design.md §4).

    Attributes:
        mode: ``checkpoint`` restores the best in-budget state seen so far (by the operating-point
            rule; without a target probe, the latest in-budget one); ``path`` moves back along the
            path from the pretrained weights, ``W0 + α·ΔW`` (OFT: generator scaling), picking ``α``
            from ``alphas`` by probing; ``layerwise`` does the same with ``α_l = α + (1 − α)·depth``
            per layer.
        then: After the rewind, ``stop`` training or ``continue`` it with the learning rate times
            ``lr_factor`` and fresh optimizer moments.
        max_rewinds: With ``then: continue``, the most rewinds in a run: rewinds before the
            ``max_rewinds``-th continue training, that one stops it.
        lr_factor: Learning-rate multiplier applied at each continued rewind.
        alphas: Interior ``α`` values probed by ``path``/``layerwise``, each strictly between 0
            and 1 (``0`` and ``1`` are known already: the baseline and the current point).
        refine: Extra probe passes spent refining ``α`` after the grid: each probes the midpoint
            of the wider interval next to the chosen ``α`` (so a choice at the grid's edge, or
            between very different neighbours, is looked at more closely), and the rule chooses
            again among all points. ``0``: the grid only. Each pass costs one probe pass.
        storage: Where the best in-budget state is kept: ``memory`` (CPU), ``disk`` (the monitor's
            own folder, out of reach of ``save_total_limit``), or ``auto``: memory up to
            ``max_memory_mb``, else disk.
        max_memory_mb: Largest state kept in memory with ``storage: auto``.
    """

    mode: Literal["checkpoint", "path", "layerwise"] = "checkpoint"
    then: Literal["stop", "continue"] = "stop"
    max_rewinds: int = Field(default=2, ge=1)
    lr_factor: float = Field(default=0.5, gt=0, le=1)
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    refine: int = Field(default=2, ge=0, le=10)
    storage: Literal["auto", "memory", "disk"] = "auto"
    max_memory_mb: float = Field(default=1024.0, ge=0)

    @model_validator(mode="after")
    def _check_alphas(self) -> RewindConfig:
        bad = [a for a in self.alphas if not 0.0 < a < 1.0]
        if bad or not self.alphas:
            raise ValueError(
                f"alphas: each must lie strictly between 0 and 1 (0 and 1 are measured anyway), got {list(self.alphas)}"
            )
        return self


class LoggingConfig(_Frozen):
    """Where results go.

    Attributes:
        output_dir: Folder for ``history.jsonl`` and the monitor's files; default
            ``<trainer output_dir>/arena``.
        tensorboard: Write scalars with the monitor's own writer (rank 0 only).
        tensorboard_dir: Folder for those events; default the trainer's TensorBoard folder
            (the one its TensorBoard callback uses, else ``$TENSORBOARD_LOGGING_DIR``, else
            ``<trainer output_dir>/runs/arena``).
        log_to_trainer: Also pass the scalars through ``Trainer.log`` so every ``report_to``
            backend and ``state.log_history`` receive them.
        sp_plane_image: With TensorBoard on, draw the stability-plasticity trajectory as the
            image ``arena/sp_plane`` at every probe step (about 0.1 s each).
    """

    output_dir: str | None = None
    tensorboard: bool = True
    tensorboard_dir: str | None = None
    log_to_trainer: bool = True
    sp_plane_image: bool = True


class MonitorConfig(_Frozen):
    """Complete configuration of a :class:`~arena_callbacks.ForgettingMonitor`.

    Attributes:
        cadence: When probes run.
        probe: How probes are tokenised and run.
        stability: How per-capability retentions aggregate into ``sp/stability``.
        plasticity: ``difference`` (``T(t) - T(0)``), ``ratio`` (``T(t) / T(0)``), with ``T``
            the target's score (or ``-NLL`` when it has none); or ``nll_reduction``
            (``1 - NLL(t) / NLL(0)``: the share of the target answers' NLL removed, graded where
            an exact-match score jumps from 0 to 1 in a few steps).
        budgets: Limits and the actions they trigger.
        operating_point: Operating-point rule and overshoot detection (``sp/*`` keys).
        geometry: Activation geometry (``geometry/*`` keys).
        spectra: Weight-space spectra (``spectral/*`` keys).
        rewind: What the ``rewind`` action does.
        logging: Output locations.

    Example:
        >>> MonitorConfig.from_dict({"cadence": {"every_n_steps": 10}}).cadence.every_n_steps
        10
    """

    cadence: CadenceConfig = CadenceConfig()
    probe: ProbeSettings = ProbeSettings()
    stability: Literal["mean", "min"] = "mean"
    plasticity: Literal["difference", "ratio", "nll_reduction"] = "difference"
    budgets: tuple[BudgetConfig, ...] = ()
    operating_point: OperatingPointConfig = OperatingPointConfig()
    geometry: GeometryConfig = GeometryConfig()
    spectra: SpectraConfig = SpectraConfig()
    rewind: RewindConfig = RewindConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _unique_budget_labels(self) -> MonitorConfig:
        labels = [b.label for b in self.budgets]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"budgets: labels must be unique, repeated: {dupes}; give each a distinct 'name'")
        for i, b in enumerate(self.budgets):
            if b.confidence is not None and b.key == "sp/stability" and self.stability != "mean":
                raise ValueError(
                    f"budgets[{i}].confidence: sp/stability with stability={self.stability!r} has no standard "
                    "error (a minimum over probes is not a smooth function of them); use stability: mean, a "
                    "budget per retention/<probe> with confidence, or no confidence"
                )
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MonitorConfig:
        return cls.model_validate(data)

    @classmethod
    def from_file(cls, path: str | Path) -> MonitorConfig:
        """Load from a ``.yaml``/``.yml`` or ``.json`` file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"monitor config file not found: {path}")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"monitor config file {path}: unknown suffix {path.suffix!r}; use .yaml, .yml or .json")
        if not isinstance(data, dict):
            raise ValueError(f"monitor config file {path}: top level must be a mapping, got {type(data).__name__}")
        return cls.model_validate(data)

    @classmethod
    def coerce(cls, value: MonitorConfig | dict[str, Any] | str | Path | None, **overrides: Any) -> MonitorConfig:
        """Accept a config, a dict, a file path or ``None`` plus keyword fields."""
        if value is None:
            return cls.model_validate(overrides)
        if isinstance(value, (str, Path)):
            value = cls.from_file(value)
        if isinstance(value, MonitorConfig):
            return value if not overrides else cls.model_validate({**value.model_dump(), **overrides})
        if isinstance(value, dict):
            return cls.model_validate({**value, **overrides})
        raise TypeError(
            f"config: expected MonitorConfig, dict, or a path to a YAML/JSON file, got {type(value).__name__}"
        )
