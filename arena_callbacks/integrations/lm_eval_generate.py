"""lm-eval ``generate_until`` tasks as generative probes, scored by lm-eval's own code.

A ``generate_until`` task becomes a ``kind="generate"`` :class:`~arena_callbacks.Probe`:

* ``prompt``: the context lm-eval builds for the document (``doc_to_text`` with its few-shot
  examples, ``gen_prefix``...), the request's first argument as it stands;
* ``stop``: the request's ``until`` (``generation_kwargs``; the few-shot delimiter when the task
  names none), ``max_new_tokens``: its ``max_gen_toks`` (or lm-eval's alias keys; 256, ``HFLM``'s
  default, when it has none), optionally capped;
* ``scorer``: a :class:`LmEvalScorer`, which passes the answer through the task's filter
  pipeline (``task._filters``, built by lm-eval's ``build_filter_ensemble``: ``regex``,
  ``take_first``, ``remove_whitespace``, custom filters...) and then the task's own
  ``process_results`` (its metric with its ``metric_list`` keyword arguments, e.g.
  ``exact_match`` with ``ignore_case``; a registered or custom function alike), as lm-eval's
  evaluator does after ``HFLM.generate_until``.

The probe decodes greedily with the project's batched decoder, which ends a row on its own stop
strings and end-of-sequence token; lm-eval's ``HFLM`` generates the whole batch until every row
is done and then cuts each answer at the first stop string. The texts are the same (tested token
for token, ``tests/test_lm_eval_generate.py``). One difference: ``HFLM`` also cuts at the end
of sequence token's *text* (``"</s>"``), which matters only when a model spells it out of
ordinary tokens; the probe stops on the end of sequence token itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from ..exceptions import ProbeDataError
from ..probes import Probe

__all__ = ["DEFAULT_MAX_GEN_TOKS", "LmEvalScorer", "generate_probe", "generation_settings"]

logger = logging.getLogger(__name__)

#: ``HFLM``'s default ``max_gen_toks``, used when a task's ``generation_kwargs`` set none.
DEFAULT_MAX_GEN_TOKS = 256
_MAX_ALIASES = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


class LmEvalScorer:
    """A generative probe's scorer that judges an answer as lm-eval does.

    ``scorer(prompt, generation, row)``: the row's lm-eval document (by its ``doc_id``) and the
    generation go through the task's filter pipeline ``filter_name``, then the task's
    ``process_results``; the value of ``metric`` is the row's score.

    Attributes:
        task: The built lm-eval ``Task``.
        metric: The per-row result key scored (``exact_match``...).
        filter_name: The filter pipeline applied (``"none"``: lm-eval's default ``take_first``).
    """

    def __init__(self, task: Any, docs: Mapping[int, Any], metric: str, filter_name: str) -> None:
        ensembles = {f.name: f for f in task._filters}
        if filter_name not in ensembles:
            raise ProbeDataError(f"lm-eval filter {filter_name!r} is not one of the task's {sorted(ensembles)}")
        self.task, self.metric, self.filter_name = task, metric, filter_name
        self._ensemble = ensembles[filter_name]
        self._docs = dict(docs)
        self.__qualname__ = f"lm_eval:{metric},{filter_name}"

    def filtered(self, generation: str, row: Mapping[str, Any]) -> Any:
        """The answer after the task's filters (what lm-eval logs as ``filtered_resps``)."""
        inst = _Instance(resps=[generation], doc=self._doc(row))
        self._ensemble.apply([inst])
        return inst.filtered_resps[self.filter_name]

    def results(self, generation: str, row: Mapping[str, Any]) -> dict[str, Any]:
        """Every per-row value of the task's ``process_results`` for this answer."""
        return dict(self.task.process_results(self._doc(row), [self.filtered(generation, row)]))

    def __call__(self, prompt: str, generation: str, row: Mapping[str, Any]) -> float:
        results = self.results(generation, row)
        if self.metric not in results:
            raise ProbeDataError(f"lm-eval metric {self.metric!r} is not among the task's per-row results "
                                 f"{sorted(results)}")
        return _number(self.metric, results[self.metric])

    def _doc(self, row: Mapping[str, Any]) -> Any:
        try:
            return self._docs[row["doc_id"]]
        except KeyError:
            raise ProbeDataError(f"lm-eval scorer: row {dict(row)!r:.80} has no known doc_id") from None

    def __repr__(self) -> str:
        return f"LmEvalScorer({self.metric!r}, filter={self.filter_name!r})"


class _Instance:
    """What ``FilterEnsemble.apply`` reads and writes of an lm-eval ``Instance``."""

    def __init__(self, resps: list[Any], doc: Any) -> None:
        self.resps, self.doc, self.filtered_resps = resps, doc, {}


def _number(metric: str, value: Any) -> float:
    number = math.nan
    if not isinstance(value, (str, bytes, list, tuple, dict)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            pass
    if not math.isfinite(number):
        raise ProbeDataError(f"lm-eval metric {metric!r} gives {value!r:.60} per row, not a finite number (a "
                             "corpus-level metric such as bleu has no per-row score); choose another with metric=")
    return number


def generation_settings(task: Any, name: str, gen_kwargs: Mapping[str, Any]) -> tuple[list[str], int]:
    """``(until, max_gen_toks)`` of a request's generation kwargs, read as ``HFLM`` reads them."""
    kwargs = dict(gen_kwargs or {})
    until = kwargs.get("until")
    until = [] if until is None else [until] if isinstance(until, str) else list(until)
    if not all(isinstance(u, str) for u in until):
        raise ProbeDataError(f"lm-eval task {name!r}: until {until!r} is not a list of strings")
    given = [kwargs[k] for k in _MAX_ALIASES if kwargs.get(k) is not None]  # lm-eval's order of precedence
    max_gen_toks = int(given[0]) if given else DEFAULT_MAX_GEN_TOKS
    sampled = kwargs.get("do_sample") is True or float(kwargs.get("temperature") or 0.0) > 0.0
    if sampled:
        logger.warning("lm-eval task %r samples (do_sample=%r, temperature=%r); its probe decodes greedily",
                       name, kwargs.get("do_sample"), kwargs.get("temperature"))
    repeats = getattr(task.config, "repeats", 1) or 1
    if repeats > 1:
        logger.warning("lm-eval task %r asks for %d answers per document; its probe writes one (greedy)",
                       name, repeats)
    # Empty strings are never stop strings (lm-eval skips them too).
    return [u for u in until if u], max_gen_toks


def _metric_and_filter(task: Any, name: str, metric: str | None) -> tuple[str, str]:
    """The scored (metric, filter pipeline): ``metric`` is ``"name"`` or ``"name,filter"``, as
    lm-eval writes its result keys; by default the task's first metric and first filter pipeline."""
    filters = [f.name for f in task._filters]
    metrics = list(task._metric_fn_list)
    if metric is None:
        if not metrics:
            raise ProbeDataError(f"lm-eval task {name!r}: no metric_list")
        return metrics[0], filters[0]
    base, _, filt = str(metric).partition(",")
    if filt and filt not in filters:
        raise ProbeDataError(f"lm-eval task {name!r}: metric {metric!r}: filter {filt!r} is not one of {filters}")
    return base, filt or filters[0]


def generate_probe(
    task: Any,
    name: str,
    rows: list[dict[str, Any]],
    docs: Mapping[int, Any],
    gen_kwargs: Mapping[str, Any],
    *,
    max_gen_toks: int | None = None,
    metric: str | None = None,
) -> Probe:
    """The ``generate`` probe of a built ``generate_until`` task, from its rows (``prompt``,
    ``doc_id``), its documents by ``doc_id`` and its requests' generation kwargs."""
    until, task_max = generation_settings(task, name, gen_kwargs)
    if max_gen_toks is not None:
        task_max = min(task_max, max_gen_toks)
    metric_name, filter_name = _metric_and_filter(task, name, metric)
    scorer = LmEvalScorer(task, docs, metric_name, filter_name)
    # A dry run on the first document: the metric must exist and give one number per row.
    first = rows[0]
    results = scorer.results("", first)
    if metric_name not in results:
        raise ProbeDataError(f"lm-eval task {name!r}: metric {metric_name!r} is not among its per-row results "
                             f"{sorted(results)}; choose one with metric=")
    try:
        _number(metric_name, results[metric_name])
    except ProbeDataError as e:
        raise ProbeDataError(f"lm-eval task {name!r}: {e}") from None
    return Probe(rows, kind="generate", scorer=scorer, max_new_tokens=task_max, stop=tuple(until))
