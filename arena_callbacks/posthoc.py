"""Rewinding a finished run after the fact: ``arena-callbacks rewind <output_dir>``.

Reads the run (its ``history.jsonl``, ``summary.json``, the probe rows the monitor saved in
``probes.json``, the trainer's ``checkpoint-<step>`` folders and the final model in the output
folder), probes the pretrained model, every saved state and points on the path from the
pretrained weights to the last state (``W0 + α·ΔW``; OFT: generator scaling), picks the
operating point among the candidates within the run's stop/rewind budgets, and writes it as a
folder that ``PeftModel.from_pretrained`` (adapters) or ``AutoModelForCausalLM.from_pretrained``
(full finetuning) loads, with ``rewind.md``, ``rewind.json`` and ``rewind.png``.

Example:
    >>> from arena_callbacks.posthoc import rewind_run
    >>> rewind_run("out", alphas=(0.25, 0.5, 0.75))          # doctest: +SKIP
    PosixPath('out/rewound')
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .budget import in_budget
from .distributed import DistContext
from .exceptions import ArenaError
from .layout import PROBES_FILE
from .measurements import build_snapshot
from .probes import Probe, ProbeRunner, ProbeSet
from .rewind import alphas_for, interpolate, next_alpha, path_rules
from .runs import ADAPTER_FILES, Run, has_weights, load_run
from .sp import choose

__all__ = ["Candidate", "RewindError", "rewind_run"]

logger = logging.getLogger(__name__)

# Adapter tensors whose pretrained value is known without the training run: zero at init.
_ZERO_AT_INIT = ("lora_B", "lora_embedding_B", "oft_R", "oft_embedding_R")
_KEEP = ("lora_A", "lora_embedding_A")


class RewindError(ArenaError):
    """A saved run cannot be rewound (what is missing is in the message)."""


@dataclass
class Candidate:
    """One state probed: the pretrained model, a saved state, or a point on the path.

    ``rewind``: for a saved state at the step of a live rewind (a checkpoint the trainer saved
    right after it, or the final model of a run that ended there), that rewind's number: the
    state holds what the rewind loaded, not the breach recorded before it at the same step.
    """

    label: str
    source: str  # "pretrained", "checkpoint", "final", "path"
    step: int | None
    alpha: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    in_budget: bool = True
    chosen: bool = False
    rewind: int | None = None

    @property
    def plasticity(self) -> float:
        return self.metrics.get("sp/plasticity", math.nan)

    @property
    def stability(self) -> float:
        return self.metrics.get("sp/stability", math.nan)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label, "source": self.source, "step": self.step, "alpha": self.alpha,
            "plasticity": _j(self.plasticity), "stability": _j(self.stability), "in_budget": self.in_budget,
            "chosen": self.chosen, "rewind": self.rewind, "metrics": {k: _j(v) for k, v in self.metrics.items()},
        }


def _j(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)


def _saved_states(run: Run) -> list[tuple[str, str, int | None, Path]]:
    """(label, source, step, folder) of every saved state holding weights, by step, final last."""
    out = []
    for step, path in run.checkpoints():
        if has_weights(path):
            out.append((f"checkpoint-{step}", "checkpoint", step, path))
    if run.output_dir is not None and has_weights(run.output_dir):
        step = run.summary.get("final_step")  # the last record's step: a rewind's, when the run ended on one
        out.append(("final", "final", int(step) if step is not None else None, run.output_dir))
    return out


def _rewound_at(run: Run) -> dict[int, int]:
    """Step → number of the live rewind at that step: a state saved at that step holds what it loaded."""
    return {int(r["step"]): int(r.get("number", i + 1)) for i, r in enumerate(run.rewinds())}


def _load_probes(run: Run) -> dict[str, ProbeSet]:
    path = run.path / PROBES_FILE
    if not path.is_file():
        raise RewindError(
            f"{path} not found: the run was recorded without its probe rows (arena-callbacks < 0.1 or a failed "
            "write); rewinding needs the probes the run was measured with"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    probes = {}
    for name, d in data.items():
        gen = d.get("generation") or {}
        if isinstance(gen.get("scorer"), dict) and "callable" in gen["scorer"]:
            logger.warning("arena-callbacks: probe %r is left out of the post-hoc rewind: its scorer %r was a Python "
                           "function, which %s does not hold", name, gen["scorer"]["callable"], path)
            continue
        probes[name] = ProbeSet.build(name, Probe(d["rows"], kind=d["kind"], signal=d["signal"], **gen),
                                      run.config.probe)
    return probes


def rewind_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    base_model: str | Path | None = None,
    alphas: Sequence[float] | None = None,
    layerwise: bool = False,
    refine: int | None = None,
    device: str = "cpu",
) -> Path:
    """Rewind a saved run to its operating point; returns the output folder.

    Args:
        run_dir: Trainer ``output_dir`` (or its ``arena/`` folder).
        out: Where the rewound model goes (default ``<output_dir>/rewound``).
        base_model: The pretrained model's folder or hub id (default: from the adapter config
            or the run's ``summary.json``).
        alphas: Interior points of the path probed (default: the run's ``rewind.alphas``).
        layerwise: Scale layers separately, ``α_l = α + (1 − α)·depth``.
        refine: Extra probe passes refining ``α`` around a choice on the path (default: the
            run's ``rewind.refine``; see :func:`arena_callbacks.rewind.next_alpha`).
        device: Where the probes run.

    Raises:
        RewindError: no saved states, no probe rows, no base model, or a path that cannot be
            followed for these tensors.
    """
    run = load_run(run_dir)
    states = _saved_states(run)
    if not states:
        raise RewindError(
            f"no saved weights in {run.output_dir}: neither checkpoint-<step> folders with weights nor a final "
            "model (trainer.save_model); save checkpoints (save_strategy) to rewind after the fact"
        )
    probes = _load_probes(run)
    last = states[-1][3]
    is_adapter = any((last / f).is_file() for f in ADAPTER_FILES)
    base_path = _base_path(run, last, base_model, is_adapter)
    model, tokenizer = _load_pretrained(states, base_path, device)
    prober = _Prober(run, probes, tokenizer)
    base_metrics = prober.pretrained(model)
    candidates = [Candidate("pretrained", "pretrained", 0, 0.0, base_metrics)]
    weights = _adapter_weights(model, last, device) if is_adapter else _full_weights(model, last)

    saved, kept = _probe_saved_states(run, states, weights, prober)
    candidates += saved
    on_path, kept_on_path = _probe_path(run, weights, prober, saved[-1], alphas, layerwise)
    candidates += on_path
    kept.update(kept_on_path)
    chosen = _choose(run, candidates, base_metrics)
    for _ in range(run.config.rewind.refine if refine is None else refine):
        # Look closer around a choice on the path (the pretrained model, a point, or its end).
        ends = {"pretrained": 0.0, "path": chosen.alpha}
        at = 1.0 if chosen is saved[-1] else ends.get(chosen.source)
        a = None if at is None or weights.theta0 is None else next_alpha(
            [0.0, 1.0, *(c.alpha for c in candidates if c.source == "path")], at)
        if a is None:
            break
        more, kept_more = _probe_path(run, weights, prober, saved[-1], [a], layerwise)
        candidates += more
        kept.update(kept_more)
        chosen = _choose(run, candidates, base_metrics)

    out_dir = Path(out) if out is not None else (run.output_dir or run.path) / "rewound"
    out_dir.mkdir(parents=True, exist_ok=True)
    weights.apply(weights.pretrained() if chosen.source == "pretrained" else kept[chosen.label])
    weights.model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    _write_outputs(run, out_dir, candidates, chosen, base_path, is_adapter)
    return out_dir


_State = dict[str, torch.Tensor]


def _load_pretrained(states: list[tuple[str, str, int | None, Path]], base_path: str, device: str) -> tuple[Any, Any]:
    """The pretrained model (float32, eval mode, on ``device``) and the tokenizer of the newest saved state."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = next((p for *_, p in reversed(states) if (p / "tokenizer_config.json").is_file()), None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir or base_path))
        model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    except OSError as e:
        raise RewindError(f"could not load the pretrained model or tokenizer from {base_path!s} ({e}); "
                          "pass --base-model with a local folder") from e
    model.to(device).eval()
    return model, tokenizer


class _Prober:
    """The run's probes on the model being rewound, as snapshot metrics against the pretrained pass."""

    def __init__(self, run: Run, probes: dict[str, ProbeSet], tokenizer: Any) -> None:
        self.run, self.probes = run, probes
        self.runner = ProbeRunner(probes, run.config.probe)
        self.runner.prepare(tokenizer)
        self.ctx = DistContext()
        self.baseline: dict[str, Any] = {}

    def pretrained(self, model: Any) -> dict[str, float]:
        """Probe the pretrained model: the baseline of every later measurement (and its own metrics)."""
        self.baseline = self.runner.run(model, self.ctx, desc="arena rewind: pretrained")
        return self._snapshot(self.baseline)

    def measure(self, model: Any, desc: str) -> dict[str, float]:
        return self._snapshot(self.runner.run(model, self.ctx, desc=desc))

    def _snapshot(self, results: Any) -> dict[str, float]:
        config = self.run.config
        return build_snapshot(results, self.baseline, self.probes, stability=config.stability,
                              plasticity=config.plasticity)


@dataclass
class _Weights:
    """The probed model's weights: read from a saved folder, loaded into ``model``, and the path's ends.

    ``theta1`` is the newest saved state; ``theta0`` its pretrained counterpart, ``None`` where
    that is unknown (an adapter with tensors that do not start at zero).
    """

    model: Any
    read: Callable[[Path], _State]
    apply: Callable[[_State], None]
    theta0: _State | None
    theta1: _State
    adapter: bool

    def pretrained(self) -> _State:
        """A state that computes as the pretrained model: zero-initialised adapter tensors zeroed."""
        if self.adapter:
            return {k: v * 0 if _is_zero_at_init(k) else v for k, v in self.theta1.items()}
        assert self.theta0 is not None
        return self.theta0


def _adapter_weights(model: Any, last: Path, device: str) -> _Weights:
    """The saved adapter in ``last`` put on ``model`` (a PEFT model, eval mode), its tensors as states."""
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    peft_model = PeftModel.from_pretrained(model, str(last), is_trainable=False).to(device).eval()

    def read(folder: Path) -> _State:
        from peft.utils import load_peft_weights

        return {k: v.float() for k, v in load_peft_weights(str(folder), device="cpu").items()}

    def apply(state: _State) -> None:
        set_peft_model_state_dict(peft_model, state)

    theta1 = read(last)
    theta0 = _adapter_theta0(theta1)
    own = get_peft_model_state_dict(peft_model)
    if set(own) != set(theta1):
        logger.warning("arena-callbacks: adapter keys differ from the saved ones; using the saved ones")
    return _Weights(peft_model, read, apply, theta0, theta1, adapter=True)


def _full_weights(model: Any, last: Path) -> _Weights:
    """Full finetuning: whole state dicts, the pretrained one copied from ``model`` first."""
    from transformers import AutoModelForCausalLM

    def read(folder: Path) -> _State:
        m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        return {k: v.detach().clone() for k, v in m.state_dict().items()}

    def apply(state: _State) -> None:
        model.load_state_dict(state, strict=True)

    theta0 = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return _Weights(model, read, apply, theta0, read(last), adapter=False)


def _probe_saved_states(
    run: Run, states: list[tuple[str, str, int | None, Path]], weights: _Weights, prober: _Prober
) -> tuple[list[Candidate], dict[str, _State]]:
    """A candidate per saved state (in order, the final model last) and the states by label."""
    candidates: list[Candidate] = []
    kept: dict[str, _State] = {}
    rewound = _rewound_at(run)
    for label, source, step, folder in states:
        state = weights.theta1 if folder == states[-1][3] else weights.read(folder)
        weights.apply(state)
        kept[label] = state
        candidates.append(Candidate(label, source, step, 1.0, prober.measure(weights.model, f"arena rewind: {label}"),
                                    rewind=rewound.get(step) if step is not None else None))
    return candidates, kept


def _probe_path(
    run: Run, weights: _Weights, prober: _Prober, last: Candidate, alphas: Sequence[float] | None, layerwise: bool
) -> tuple[list[Candidate], dict[str, _State]]:
    """A candidate per ``α`` on the path from the pretrained weights to the newest state (none when
    ``theta0`` is unknown) and the states by label."""
    path_alphas = sorted(set(alphas if alphas is not None else run.config.rewind.alphas))
    theta0, theta1 = weights.theta0, weights.theta1
    if theta0 is None:
        logger.warning("arena-callbacks: this adapter holds tensors whose pretrained value is unknown "
                       "(e.g. DoRA magnitudes); choosing among saved states only")
        path_alphas = []
    rules = path_rules(theta0) if theta0 is not None else {}
    names = list(theta1)
    candidates: list[Candidate] = []
    kept: dict[str, _State] = {}
    for a in path_alphas:
        if not 0 <= a <= 1:
            raise RewindError(f"alphas: {a} is outside [0, 1]")
        assert theta0 is not None
        state = interpolate(theta0, theta1, alphas_for(names, a, layerwise), rules)
        weights.apply(state)
        label = f"{last.label} α={a:g}" + (" (layer-wise)" if layerwise else "")
        kept[label] = state
        metrics = prober.measure(weights.model, f"arena rewind: α={a:g}")
        candidates.append(Candidate(label, "path", last.step, a, metrics))
    return candidates, kept


def _choose(run: Run, candidates: list[Candidate], base_metrics: dict[str, float]) -> Candidate:
    """Mark each candidate in or out of the run's budgets; pick and mark the operating point among those in."""
    for c in candidates:
        c.in_budget = c.source == "pretrained" or in_budget(run.config.budgets, c.metrics, base_metrics)
        c.chosen = False
    ok = [c for c in candidates if c.in_budget]
    # No target probe: the last in-budget candidate.
    chosen = ok[choose([c.metrics for c in ok], run.config.operating_point)]
    chosen.chosen = True
    return chosen


def _is_zero_at_init(name: str) -> bool:
    return any(f".{t}." in name for t in _ZERO_AT_INIT)


def _adapter_theta0(theta1: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The adapter's pretrained-equivalent state, where it is known (zero-initialised factors)."""
    theta0 = {}
    for k, v in theta1.items():
        if _is_zero_at_init(k):
            theta0[k] = torch.zeros_like(v)
        elif any(t in k for t in _KEEP):
            theta0[k] = v.clone()  # kept at its trained value on the path ("keep" rule)
        else:
            return None
    return theta0


def _base_path(run: Run, last: Path, given: str | Path | None, is_adapter: bool) -> str:
    if given is not None:
        return str(given)
    found = run.base_model(last if is_adapter else None)
    if found is not None:
        return found
    raise RewindError("the pretrained model is not recorded in the run; pass --base-model <folder or hub id>")


def _write_outputs(run: Run, out: Path, cands: list[Candidate], chosen: Candidate, base: str, adapter: bool) -> None:
    from .plots import new_figure, save_figure
    from .report import format_value

    (out / "rewind.json").write_text(
        json.dumps({"run": str(run.path), "base_model": base, "adapter": adapter,
                    "operating_point": run.config.operating_point.model_dump(mode="json"),
                    "chosen": chosen.label, "candidates": [c.to_json() for c in cands]}, indent=2),
        encoding="utf-8",
    )
    fig = new_figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    for c in cands:
        style = "*" if c.chosen else ("o" if c.in_budget else "x")
        color = "tab:red" if c.chosen else ("tab:blue" if c.source != "path" else "tab:green")
        ax.plot([c.plasticity], [c.stability], style, ms=14 if c.chosen else 7, color=color)
        ax.annotate(c.label, (c.plasticity, c.stability), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("plasticity P (target gain)")
    ax.set_ylabel("stability S (retention)")
    ax.set_title(f"{run.name}: rewind candidates (★ chosen, × out of budget)")
    ax.grid(alpha=0.3)
    save_figure(fig, out / "rewind.png")
    load = ("PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)" if adapter
            else "AutoModelForCausalLM.from_pretrained(out)")
    md = [
        f"# Rewind of {run.name}", "",
        (f"Chosen: **{chosen.label}** (P = {format_value(chosen.plasticity)}, S = {format_value(chosen.stability)}), "
         f"by the `{run.config.operating_point.rule}` rule among the candidates within the run's stop/rewind budgets."),
        "", f"Written to `{out}` ({'adapter' if adapter else 'full model'}; load with `{load}`, base: `{base}`).", "",
        "| candidate | source | step | α | P | S | in budget |", "|---|---|---:|---:|---:|---:|---|",
    ]
    for c in cands:
        name = c.label + (f" (after rewind {c.rewind})" if c.rewind is not None else "")
        md.append(f"| {'**' + name + '**' if c.chosen else name} | {c.source} | "
                  f"{c.step if c.step is not None else 'n/a'} | {c.alpha if c.alpha is not None else 'n/a'} | "
                  f"{format_value(c.plasticity)} | {format_value(c.stability)} | {'yes' if c.in_budget else 'no'} |")
    if any(c.rewind is not None for c in cands):
        md += ["", ("A state marked *after rewind n* was saved at the step of the run's live rewind n: it holds "
                    "what that rewind loaded, not the breach recorded before it at the same step.")]
    md += ["", "![candidates](rewind.png)", ""]
    (out / "rewind.md").write_text("\n".join(md), encoding="utf-8")
