"""Capability probes: loading, validation, tokenisation and the batched probe pass.

Three kinds, told apart by their fields unless named explicitly (:mod:`.data`; the probes of
docs/design.md): ``text`` (mean token NLL), ``multiple_choice`` (accuracy of the log-likelihood
ranking of the choices; NLL of the correct one) and ``completion`` (teacher-forced exact match
of the answer span; its NLL).

Rows are tokenised once (:meth:`ProbeRunner.prepare`) and planned into length-sorted batches
once per rank; each pass only runs forwards. A multiple-choice row whose choices share a
context runs that context once: with all its choices in one tree row where the model takes a
4D attention mask, else its first choice in full and the others as continuations of the
cached keys and values (one-token choices need no forward of their own). With a 4D mask,
short sequences also share rows, each attending to itself. The vocabulary projection is
applied only at scored positions. Examples are split across ranks, and every
rank runs the same number of forwards so that sharded models never see a rank-0-only forward.

Modules, one per concern:

* :mod:`.data`: the kinds, :class:`Probe`, :func:`load_rows`, validation, :class:`ProbeSet`.
* :mod:`.tokenize`: rows to token sequences.
* :mod:`.plan`: which sequences each forward carries, and how (pure functions;
  :class:`PlanOptions` switches tree rows, packing and the shared-context threshold).
* :mod:`.forward`: running a planned forward (4D masks, KV caches, precision), log-probabilities
  at its scored positions.
* :mod:`.scoring`: per-sequence scores, per-probe sums and :class:`ProbeResult`.
* :mod:`.runner`: :class:`ProbeRunner`, :class:`ProbeFailure` and the agreement between ranks.
"""

from __future__ import annotations

from .data import KINDS, Probe, ProbeKind, ProbeSet, load_rows
from .plan import BatchObserver, PlanOptions
from .runner import ProbeFailure, ProbeRunner
from .scoring import ProbeResult

__all__ = [
    "KINDS",
    "BatchObserver",
    "PlanOptions",
    "Probe",
    "ProbeFailure",
    "ProbeKind",
    "ProbeResult",
    "ProbeRunner",
    "ProbeSet",
    "load_rows",
]
