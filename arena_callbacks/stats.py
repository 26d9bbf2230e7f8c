"""Standard errors of the monitor's measurements, from row-wise paired differences.

The same probe rows are scored at the baseline and at every probe step, so the change of a
probe's NLL or score is estimated from the per-row changes ``d_i = x_i(t) - x_i(0)``: row
difficulty, which dominates the spread of either number alone, cancels. The rows are treated
as a sample from the capability's population of rows (independent, identically distributed);
the error is that of a mean over them.

``stderr/<key>`` is the standard error of the key's **change since the baseline** (for keys
defined against the baseline, ``delta_nll``, ``retention*``, ``sp/*``, that is the standard
error of the key itself):

* token-weighted NLL, ``Δ = Σ d_i / Σ t_i`` (``t_i`` scored tokens of row ``i``): the ratio
  estimator's linearised error, ``sqrt(n/(n-1) · Σ (d_i - Δ t_i)²) / Σ t_i``;
* score (accuracy, exact match), a mean of 0/1 per row: ``sd(c_i(t) - c_i(0)) / sqrt(n)``;
* ``retention_score = Σ c_i(t) / Σ c_i(0)``: ``sqrt(n/(n-1) · Σ (c_i(t) - R c_i(0))²) / Σ c_i(0)``;
* ``retention_nll = exp(-Δ)``: the delta method, ``exp(-Δ) · se(Δ)``;
* ``sp/stability`` as a mean over K probes (disjoint rows, taken as independent):
  ``sqrt(Σ se_k²) / K``. As a minimum it has no standard error and none is written.

With fewer than two rows the functions here return NaN and the snapshot has no ``stderr/`` key
for that probe's keys. At the baseline every error is 0.
``stderr/rows/<probe>`` holds the number of rows behind a probe's errors: a test on an error
estimated from ``n`` rows uses Student's t with ``n - 1`` degrees of freedom, not the normal
quantile (at 24 rows and 95%, 1.714 instead of 1.645: with the normal one, noise alone would
fire about 7% of the time instead of 5%).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist

__all__ = [
    "POWER", "Row", "STDERR_PREFIX", "degrees_of_freedom", "mean_se", "nll_change_se", "one_sided_z", "ratio_se",
    "rows_key", "rows_needed", "score_change_se", "spread", "stderr_key", "t_quantile",
]

#: ``(summed NLL, scored tokens, correct)`` of one probe row.
Row = tuple[float, float, float]

STDERR_PREFIX = "stderr/"
#: The chance that :func:`rows_needed` asks for of calling a change of twice the limit a breach.
POWER = 0.8


def stderr_key(key: str) -> str:
    return STDERR_PREFIX + key


def one_sided_z(confidence: float) -> float:
    """The standard normal quantile of a one-sided test at ``confidence`` (0.95 → 1.645)."""
    return NormalDist().inv_cdf(confidence)


def t_quantile(confidence: float, df: float | None) -> float:
    """Student's t quantile at ``confidence`` with ``df`` degrees of freedom (``None``: normal).

    Exact for 1 and 2 degrees of freedom; above, the Cornish-Fisher expansion in ``1/df`` to the
    fourth order (for confidences up to 0.99: within 0.5% at 3 and 4 degrees of freedom, 0.1% from 5 on).
    """
    if df is None or not math.isfinite(df):
        return one_sided_z(confidence)
    if df < 1:
        return math.inf
    if df == 1:
        return math.tan(math.pi * (confidence - 0.5))
    if df == 2:
        return (2 * confidence - 1) / math.sqrt(2 * confidence * (1 - confidence))
    z, v = one_sided_z(confidence), float(df)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4))


def rows_key(probe: str) -> str:
    """The key holding the number of rows behind a probe's errors."""
    return f"{STDERR_PREFIX}rows/{probe}"


def degrees_of_freedom(key: str, metrics: Mapping[str, float]) -> float | None:
    """Degrees of freedom of ``stderr/<key>`` in a record: rows of its probe less one (the target's
    for ``target/*`` and ``sp/plasticity``; the smallest capability probe's for ``sp/stability``)."""
    if key == "sp/stability":
        sizes = [v for k, v in metrics.items() if k.startswith(rows_key("")) and k != rows_key("target")]
        n = min(sizes) if sizes else None
    else:
        probe = "target" if key.startswith("target/") or key == "sp/plasticity" else key.rsplit("/", 1)[-1]
        n = metrics.get(rows_key(probe))
    return n - 1 if n is not None and math.isfinite(n) else None


def _check(now: Sequence[Row], base: Sequence[Row]) -> int:
    if len(now) != len(base):
        raise ValueError(f"paired rows: {len(now)} rows now but {len(base)} at the baseline")
    return len(now)


def nll_change_se(now: Sequence[Row], base: Sequence[Row]) -> float:
    """Standard error of the change of the token-weighted mean NLL, from paired rows."""
    n = _check(now, base)
    tokens = math.fsum(r[1] for r in now)
    if n < 2 or tokens <= 0:
        return math.nan
    d = [a[0] - b[0] for a, b in zip(now, base)]
    delta = math.fsum(d) / tokens
    ss = math.fsum((di - delta * r[1]) ** 2 for di, r in zip(d, now))
    return math.sqrt(ss * n / (n - 1)) / tokens


def score_change_se(now: Sequence[Row], base: Sequence[Row]) -> float:
    """Standard error of the change of the mean score (0/1 per row), from paired rows."""
    n = _check(now, base)
    if n < 2:
        return math.nan
    d = [a[2] - b[2] for a, b in zip(now, base)]
    mean = math.fsum(d) / n
    var = math.fsum((x - mean) ** 2 for x in d) / (n - 1)
    return math.sqrt(var / n)


def ratio_se(now: Sequence[Row], base: Sequence[Row], column: int = 2) -> float:
    """Standard error of ``Σ c_i(t) / Σ c_i(0)``, linearised, from paired rows: ``c`` is the score
    (``column=2``: score retention) or the NLL sum (``column=0``: the target's ``nll_reduction``,
    whose rows score the same tokens at both steps)."""
    n = _check(now, base)
    total0 = math.fsum(r[column] for r in base)
    if n < 2 or total0 <= 0:
        return math.nan
    ratio = math.fsum(r[column] for r in now) / total0
    ss = math.fsum((a[column] - ratio * b[column]) ** 2 for a, b in zip(now, base))
    return math.sqrt(ss * n / (n - 1)) / total0


def spread(rows: Sequence[Row], kind: str) -> float:
    """Per-row standard deviation of a probe's measure at one step, in the units of one row's
    contribution to the mean (the scale :func:`rows_needed` works from): token-weighted NLL for
    ``nll``, the 0/1 score relative to its mean for ``retention_score``, the 0/1 score for ``score``."""
    n = len(rows)
    if n < 2:
        return math.nan
    if kind == "nll":
        tokens = math.fsum(r[1] for r in rows)
        mean = math.fsum(r[0] for r in rows) / tokens
        t_bar = tokens / n
        return math.sqrt(math.fsum((r[0] - mean * r[1]) ** 2 for r in rows) / (n - 1)) / t_bar
    scores = [r[2] for r in rows]
    mean = math.fsum(scores) / n
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in scores) / (n - 1))
    if kind == "retention_score":
        return sd / mean if mean > 0 else math.nan
    return sd


def rows_needed(per_row_sd: float, limit: float, confidence: float, power: float = POWER) -> float:
    """Rows for a one-sided test at ``confidence`` to call a change of twice ``limit`` a breach
    with probability ``power``, when per-row changes spread like ``per_row_sd``: the usual
    ``n ≥ ((q_confidence + q_power) · sd / limit)²`` (the excess over the limit is ``limit``),
    with normal quantiles first and then Student's t at ``n - 1`` degrees of freedom, refined
    until ``n`` settles."""
    if not (per_row_sd >= 0) or limit <= 0:
        return math.nan
    n = math.ceil(((one_sided_z(confidence) + one_sided_z(power)) * per_row_sd / limit) ** 2)
    for _ in range(20):
        df = max(n, 2) - 1
        nxt = math.ceil(((t_quantile(confidence, df) + t_quantile(power, df)) * per_row_sd / limit) ** 2)
        if nxt == n:
            break
        n = nxt
    return float(max(n, 2))


def mean_se(errors: Mapping[str, float]) -> float:
    """Standard error of a mean over independent parts."""
    if not errors:
        return math.nan
    return math.sqrt(math.fsum(e * e for e in errors.values())) / len(errors)
