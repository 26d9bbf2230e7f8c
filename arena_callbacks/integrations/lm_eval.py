"""lm-evaluation-harness tasks as capability probes.

lm-eval's own task machinery (``TaskManager`` / ``get_task_dict``, ``doc_to_text``,
``doc_to_choice``, ``doc_to_target``, ``target_delimiter``, few-shot contexts) builds each task's
requests once; their strings become the project's probe rows, which the monitor's
:class:`~arena_callbacks.ProbeRunner` then scores on the live model at every probe step (no
task rebuilding, no bootstrap, no second model).

The rows reproduce the exact (context, continuation) strings that lm-eval scores, so the
log-likelihoods agree with ``HFLM`` on the same model and tokenizer, and ``generate_until``
prompts are the contexts ``HFLM.generate_until`` writes from:

=========================  ==========================================  ============================
lm-eval ``output_type``    probe row                                   probe kind
=========================  ==========================================  ============================
``multiple_choice``        ``{"context": ctx, "choices": [delim + c],  ``multiple_choice`` (``acc``)
                           "answer": gold}``
``loglikelihood``          ``{"prompt": ctx, "completion": cont}``     ``completion``
``generate_until``         ``{"prompt": ctx, "answer": target}``       ``generate``: the task's
                                                                       ``until``, ``max_gen_toks``,
                                                                       filters and metric
                                                                       (:mod:`.lm_eval_generate`)
``generate_until``,        ``{"prompt": ctx, "completion": delim +     ``completion`` (teacher-forced
``generate_until=          target}`` (single target only)              exact match, not generation)
"teacher_forced"``
``loglikelihood_rolling``  ``{"text": doc}``                           ``text``
=========================  ==========================================  ============================

Example:
    >>> from arena_callbacks.integrations.lm_eval import lm_eval_probes
    >>> probes = lm_eval_probes(["arena_facts", "arena_general"],           # doctest: +SKIP
    ...                         include_path="integrations/lm_eval", limit=32)
    >>> monitor = ForgettingMonitor(config, probes=probes)                  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from ..exceptions import ProbeDataError
from ..probes import Probe
from .lm_eval_generate import generate_probe

__all__ = ["GENERATE_UNTIL_MODES", "LM_EVAL_FEWSHOT_SEED", "lm_eval_probes", "probe_from_task", "rows_from_task"]

logger = logging.getLogger(__name__)

# lm-eval's default ``fewshot_random_seed`` (``simple_evaluate`` and the CLI): the same seed
# draws the same few-shot examples, so the rows match an ``lm_eval --num_fewshot k`` run.
LM_EVAL_FEWSHOT_SEED = 1234

_KINDS = {
    "multiple_choice": "multiple_choice",
    "loglikelihood": "completion",
    "generate_until": "completion",
    "loglikelihood_rolling": "text",
}

#: How ``generate_until`` tasks become probes: written by the model, or teacher-forced.
GENERATE_UNTIL_MODES = ("generate", "teacher_forced")
GenerateUntil = Literal["generate", "teacher_forced"]

PathLike = str | Path


def lm_eval_probes(
    tasks: str | Sequence[str | Mapping[str, Any]] | None = None,
    *,
    include_path: PathLike | Sequence[PathLike] | None = None,
    limit: int | None = None,
    seed: int = LM_EVAL_FEWSHOT_SEED,
    num_fewshot: int | None = None,
    signal: Literal["score", "nll"] = "score",
    task_manager: Any = None,
    generate_until: GenerateUntil = "generate",
    max_gen_toks: int | None = None,
    metric: str | None = None,
) -> dict[str, Probe]:
    """Build lm-eval tasks once and turn their requests into probes, one per task.

    Args:
        tasks: lm-eval task, group or tag names (or task config dicts). ``None`` takes every
            task defined in ``include_path``.
        include_path: A folder (or folders) of task YAML files, as ``lm_eval --include_path``.
            When given, lm-eval's ~thousands of built-in tasks are indexed only if a requested
            name is not found there (indexing them takes seconds).
        limit: Rows per task: the first ``limit`` documents, as ``lm_eval --limit``.
        seed: Seed of the few-shot sampler (lm-eval's ``fewshot_random_seed``; its default).
        num_fewshot: Overrides the tasks' ``num_fewshot`` as ``lm_eval --num_fewshot`` does (a
            task that pins 0 keeps 0); ``None`` keeps each task's own (0 when it has none).
        signal: ``retention/<task>`` of scored kinds follows the score (``acc`` / exact match)
            or ``nll`` (``exp(-ΔNLL)``); text probes always follow the NLL.
        task_manager: An ``lm_eval.tasks.TaskManager`` to use instead of building one.
        generate_until: ``"generate"``: ``generate_until`` tasks are ``generate`` probes, the
            model writes each answer (greedy, the task's ``until`` and ``max_gen_toks``) and the
            task's own filters and metric judge it; ``"teacher_forced"``: ``completion`` probes
            of context + target_delimiter + target (exact match of the teacher-forced target and
            its NLL; no decoding, so cheaper, but not what lm-eval measures).
        max_gen_toks: Caps the tasks' ``max_gen_toks`` (lm-eval's default is 256 tokens, and
            prompt + answer must fit in ``probe.max_length``); answers the cap cuts short may
            score lower than under lm-eval. ``None`` keeps each task's.
        metric: For ``generate_until`` tasks, the per-row result scored, as lm-eval names its
            results: ``"exact_match"`` or ``"exact_match,strict-match"`` (metric, filter
            pipeline). ``None``: each task's first metric after its first filter pipeline.

    Returns:
        ``{task_name: Probe}``, ready for ``ForgettingMonitor(probes=...)``; rows keep their
        lm-eval ``doc_id``.

    Raises:
        ProbeDataError: A task's ``output_type`` (or its shape) has no probe form, a task is
            unknown, or a task yields no documents.
        ImportError: lm-eval is not installed.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: expected a positive integer number of rows per task or None, got {limit!r}")
    if tasks is None and include_path is None:
        raise ValueError(
            "tasks: give lm-eval task names, or include_path=<folder of task YAML files> to take all of them"
        )
    if generate_until not in GENERATE_UNTIL_MODES:
        raise ValueError(f"generate_until: expected one of {list(GENERATE_UNTIL_MODES)}, got {generate_until!r}")
    if max_gen_toks is not None and (isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int)
                                     or max_gen_toks < 1):
        raise ValueError(f"max_gen_toks: expected a positive integer or None, got {max_gen_toks!r}")
    built = _build_tasks(tasks, include_path, task_manager)
    probes: dict[str, Probe] = {}
    for name, task in built.items():
        _configure(task, seed=seed, num_fewshot=num_fewshot)
        probe_name = _probe_name(name)
        if probe_name in probes:
            raise ProbeDataError(f"lm-eval task {name!r}: two tasks map to the probe name {probe_name!r}")
        probes[probe_name] = probe_from_task(task, limit=limit, signal=signal, name=name,
                                             generate_until=generate_until, max_gen_toks=max_gen_toks, metric=metric)
    return probes


def probe_from_task(
    task: Any,
    *,
    limit: int | None = None,
    signal: Literal["score", "nll"] = "score",
    name: str | None = None,
    generate_until: GenerateUntil = "generate",
    max_gen_toks: int | None = None,
    metric: str | None = None,
) -> Probe:
    """One built lm-eval ``Task`` as a :class:`~arena_callbacks.Probe`: a ``generate`` probe for a
    ``generate_until`` task unless ``generate_until="teacher_forced"`` (see :func:`lm_eval_probes`),
    else the rows of :func:`rows_from_task`."""
    name = name or _task_name(task)
    if _output_type(task) == "generate_until" and generate_until == "generate":
        by_doc = _requests(task, name, limit)
        rows = [{**_generate_prompt_row(task, name, insts), "doc_id": doc_id} for doc_id, insts in by_doc.items()]
        docs = {doc_id: insts[0].doc for doc_id, insts in by_doc.items()}
        first = next(iter(by_doc.values()))[0]
        return generate_probe(task, name, rows, docs, first.args[1] if len(first.args) > 1 else {},
                              max_gen_toks=max_gen_toks, metric=metric)
    kind, rows = rows_from_task(task, limit=limit, name=name)
    return Probe(rows, kind=kind, signal=signal)  # type: ignore[arg-type]


def rows_from_task(task: Any, *, limit: int | None = None, name: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """The probe kind and rows of a built lm-eval ``Task``, from lm-eval's own requests; a
    ``generate_until`` task gives its teacher-forced ``completion`` rows here (its generative
    probe comes from :func:`probe_from_task`).

    The task's few-shot settings are used as they stand (set ``num_fewshot`` and the few-shot
    seed beforehand, as :func:`lm_eval_probes` does).
    """
    name = name or _task_name(task)
    output_type = _output_type(task)
    by_doc = _requests(task, name, limit)
    convert = {
        "multiple_choice": _mc_row,
        "loglikelihood": _loglikelihood_row,
        "generate_until": _generate_row,
        "loglikelihood_rolling": _rolling_row,
    }[output_type]
    rows = [{**convert(task, name, insts), "doc_id": doc_id} for doc_id, insts in by_doc.items()]
    return _KINDS[output_type], rows


# --------------------------------------------------------------------------------------
# Requests → rows
# --------------------------------------------------------------------------------------


def _output_type(task: Any) -> str:
    return getattr(task, "OUTPUT_TYPE", None) or task.config.output_type


def _requests(task: Any, name: str, limit: int | None) -> dict[int, list[Any]]:
    """lm-eval's requests of the task's first ``limit`` documents, by ``doc_id``."""
    output_type = _output_type(task)
    if output_type not in _KINDS:
        raise ProbeDataError(
            f"lm-eval task {name!r}: output_type {output_type!r} has no probe form; supported: {sorted(_KINDS)}"
        )
    if output_type == "multiple_choice" and getattr(task, "multiple_input", 0):
        raise ProbeDataError(
            f"lm-eval task {name!r} (multiple_choice): doc_to_text gives one context per choice (as in winogrande); "
            "multiple-choice probes score several continuations of one context"
        )
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    by_doc: dict[int, list[Any]] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    if not by_doc:
        raise ProbeDataError(f"lm-eval task {name!r}: no documents")
    return by_doc


def _context(name: str, doc_id: int, ctx: Any) -> str:
    if not isinstance(ctx, str):
        raise ProbeDataError(f"lm-eval task {name!r}, doc {doc_id}: the context is {type(ctx).__name__}, not a string "
                             "(chat-formatted requests have no probe form)")
    if not ctx.strip():
        raise ProbeDataError(
            f"lm-eval task {name!r}, doc {doc_id}: empty context; lm-eval conditions on the BOS/EOS token there, "
            "which probe rows cannot express: give the task a doc_to_text"
        )
    return ctx


def _mc_row(task: Any, name: str, insts: list[Any]) -> dict[str, Any]:
    doc, doc_id = insts[0].doc, insts[0].doc_id
    choices = list(task.doc_to_choice(doc))
    # With acc_mutual_info lm-eval appends ("", choice) requests after the real ones: skip them.
    requests = sorted((i for i in insts if i.idx < len(choices)), key=lambda i: i.idx)
    contexts = {i.args[0] for i in requests}
    if len(contexts) != 1:
        raise ProbeDataError(f"lm-eval task {name!r}, doc {doc_id}: choices have different contexts")
    ctx = _context(name, doc_id, contexts.pop())
    gold = task.doc_to_target(doc)
    if isinstance(gold, list):
        if len(gold) != 1:
            raise ProbeDataError(
                f"lm-eval task {name!r}, doc {doc_id}: {len(gold)} correct choices {gold}; multiple-choice probes "
                "take exactly one"
            )
        gold = gold[0]
    if isinstance(gold, str):  # lm-eval matches a string target against the choices
        if gold not in choices:
            raise ProbeDataError(f"lm-eval task {name!r}, doc {doc_id}: target {gold!r} is not one of {choices}")
        gold = choices.index(gold)
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ProbeDataError(
            f"lm-eval task {name!r}, doc {doc_id}: target {gold!r} is not an index into {len(choices)} choices"
        )
    # The continuations as lm-eval scores them: target_delimiter + choice.
    return {"context": ctx, "choices": [i.args[1] for i in requests], "answer": gold}


def _loglikelihood_row(task: Any, name: str, insts: list[Any]) -> dict[str, Any]:
    (inst,) = insts
    ctx, cont = inst.args[:2]
    return {"prompt": _context(name, inst.doc_id, ctx), "completion": cont}


def _generate_row(task: Any, name: str, insts: list[Any]) -> dict[str, Any]:
    inst = insts[0]
    doc, doc_id = inst.doc, inst.doc_id
    target = task.doc_to_target(doc)
    if isinstance(target, list):
        if len(target) != 1:
            raise ProbeDataError(
                f"lm-eval task {name!r} (generate_until), doc {doc_id}: {len(target)} reference answers; "
                "completion probes need a single target"
            )
        target = target[0]
    if isinstance(target, int) and not isinstance(target, bool) and task.config.doc_to_choice is not None:
        target = task.doc_to_choice(doc)[target]
    if not isinstance(target, str) or not target.strip():
        raise ProbeDataError(f"lm-eval task {name!r} (generate_until), doc {doc_id}: target {target!r} is not a string")
    # Teacher-forced as lm-eval writes a solved example: context + target_delimiter + target.
    return {"prompt": _context(name, doc_id, inst.args[0]), "completion": f"{task.config.target_delimiter}{target}"}


def _generate_prompt_row(task: Any, name: str, insts: list[Any]) -> dict[str, Any]:
    """A generative row: the context ``HFLM.generate_until`` writes from, and the target for the
    record (the scorer reads lm-eval's document, not this field)."""
    inst = insts[0]
    row: dict[str, Any] = {"prompt": _context(name, inst.doc_id, inst.args[0])}
    try:
        target = task.doc_to_target(inst.doc)
        if isinstance(target, int) and not isinstance(target, bool) and task.config.doc_to_choice is not None:
            target = task.doc_to_choice(inst.doc)[target]
    except Exception:  # noqa: BLE001 - a record only; lm-eval's own scoring reads the document
        return row
    if isinstance(target, (list, tuple)):
        row["answer"] = [str(t) for t in target]
    elif target is not None:
        row["answer"] = str(target)
    return row


def _rolling_row(task: Any, name: str, insts: list[Any]) -> dict[str, Any]:
    (inst,) = insts
    (text,) = inst.args[:1]
    if not isinstance(text, str) or not text.strip():
        raise ProbeDataError(f"lm-eval task {name!r}, doc {inst.doc_id}: empty text")
    return {"text": text}


# --------------------------------------------------------------------------------------
# Building the tasks with lm-eval
# --------------------------------------------------------------------------------------


def _import_lm_eval() -> Any:
    try:
        import lm_eval.tasks
    except ImportError as e:
        raise ImportError(
            "lm_eval_probes needs lm-evaluation-harness: pip install 'arena-callbacks[lm-eval]' "
            "(or pip install 'lm-eval>=0.4.8')"
        ) from e
    return lm_eval.tasks


def _paths(include_path: PathLike | Sequence[PathLike] | None) -> list[str]:
    if include_path is None:
        return []
    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"include_path: {p} does not exist")
    return [str(p) for p in paths]


def _manager(lm_tasks: Any, paths: list[str], defaults: bool) -> Any:
    if not paths:
        return lm_tasks.TaskManager()
    try:
        return lm_tasks.TaskManager(include_path=paths, include_defaults=defaults)
    except TypeError:  # lm-eval without include_defaults
        return lm_tasks.TaskManager(include_path=paths)


def _build_tasks(
    tasks: str | Sequence[str | Mapping[str, Any]] | None,
    include_path: PathLike | Sequence[PathLike] | None,
    task_manager: Any,
) -> dict[str, Any]:
    lm_tasks = _import_lm_eval()
    paths = _paths(include_path)
    names: list[Any] = [tasks] if isinstance(tasks, (str, Mapping)) else list(tasks or [])
    manager = task_manager
    if manager is None:
        # Only the user's folder first: indexing lm-eval's built-in tasks takes seconds.
        manager = _manager(lm_tasks, paths, defaults=not paths)
        if paths and any(isinstance(n, str) and n not in manager.all_tasks for n in names):
            manager = _manager(lm_tasks, paths, defaults=True)
    if not names:
        names = sorted(getattr(manager, "all_subtasks", None) or manager.all_tasks)
        if not names:
            raise ProbeDataError(f"include_path: no lm-eval tasks found in {paths}")
    unknown = [n for n in names if isinstance(n, str) and n not in manager.all_tasks]
    if unknown:
        where = f" (include_path: {paths})" if paths else ""
        raise ProbeDataError(f"lm-eval tasks {unknown} are not known to lm-eval{where}")
    load = getattr(manager, "load", None)
    if callable(load):  # lm-eval >= 0.4.10: flat dicts of leaf tasks
        return dict(load(names)["tasks"])
    return dict(_leaf_tasks(lm_tasks.get_task_dict(names, manager)))


def _leaf_tasks(tree: Mapping[Any, Any]) -> Iterable[tuple[str, Any]]:
    """Leaf tasks of lm-eval's nested ``{group: {task_name: Task}}`` dict (older versions)."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaf_tasks(value)
        elif isinstance(value, tuple):  # (group_config, task) pairs in some 0.4.x releases
            yield _task_name(value[-1]), value[-1]
        else:
            yield str(key), value


def _configure(task: Any, *, seed: int, num_fewshot: int | None) -> None:
    """Few-shot settings as ``simple_evaluate`` applies them."""
    current = task.get_config("num_fewshot")
    if num_fewshot is not None and current != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif current is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=seed)


def _task_name(task: Any) -> str:
    name = getattr(task, "task_name", None)
    name = name() if callable(name) else name
    return str(name or task.config.task)


def _probe_name(task_name: str) -> str:
    return task_name.replace("/", "_").strip()
