"""Paired standard errors (issue 20, part 1): the formulas against independent float64
references, their calibration on synthetic rows where the truth is known, and the ``stderr/*``
keys of a real probe pass against per-row NLLs computed by hand in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import corpus, make_model
from test_probes import ref_logprobs, runner

from arena_callbacks import stats
from arena_callbacks.measurements import build_snapshot


def rows_of(nll, tokens, correct):
    return [(float(a), float(b), float(c)) for a, b, c in zip(nll, tokens, correct)]


def delta_method_ratio_se(num: np.ndarray, den: np.ndarray) -> float:
    """se of mean(num)/mean(den) by the delta method on the sample covariance (an independent route)."""
    n = len(num)
    cov = np.cov(np.stack([num, den]), ddof=1)
    g = np.array([1 / den.mean(), -num.mean() / den.mean() ** 2])
    return float(np.sqrt(g @ cov @ g / n))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_nll_change_se_is_the_delta_method_on_the_paired_differences(rng):
    n = 40
    tokens = rng.integers(5, 60, n).astype(float)
    base = tokens * rng.uniform(2, 5, n)
    now = base + tokens * rng.normal(0.3, 0.5, n)
    got = stats.nll_change_se(rows_of(now, tokens, np.zeros(n)), rows_of(base, tokens, np.zeros(n)))
    assert got == pytest.approx(delta_method_ratio_se(now - base, tokens), rel=1e-12)
    # Equal token counts: the plain standard error of the mean per-token difference.
    tokens = np.full(n, 8.0)
    now = base + rng.normal(0.5, 1.0, n)
    got = stats.nll_change_se(rows_of(now, tokens, np.zeros(n)), rows_of(base, tokens, np.zeros(n)))
    d = (now - base) / 8.0
    assert got == pytest.approx(d.std(ddof=1) / math.sqrt(n), rel=1e-12)


def test_score_errors_against_numpy(rng):
    n = 50
    base = rng.random(n) < 0.7
    now = base & (rng.random(n) < 0.8)
    b, a = rows_of(np.zeros(n), np.ones(n), base), rows_of(np.zeros(n), np.ones(n), now)
    d = now.astype(float) - base
    assert stats.score_change_se(a, b) == pytest.approx(d.std(ddof=1) / math.sqrt(n), rel=1e-12)
    assert stats.ratio_se(a, b) == pytest.approx(delta_method_ratio_se(now.astype(float), base.astype(float)),
                                                 rel=1e-12)


def test_nll_reduction_plasticity_and_its_error_against_float64(rng):
    from types import SimpleNamespace

    from arena_callbacks.probes.scoring import ProbeSums, probe_result

    n = 30
    tokens = rng.integers(4, 20, n).astype(float)
    base_nll = tokens * rng.uniform(2, 4, n)
    now_nll = base_nll * rng.uniform(0.2, 0.9, n)

    def result(nll):
        rows = tuple(rows_of(nll, tokens, np.zeros(n)))
        return probe_result("target", "completion", ProbeSums(math.fsum(nll), math.fsum(tokens), 0.0, float(n)), rows)

    now, base = {"target": result(now_nll)}, {"target": result(base_nll)}
    probes = {"target": SimpleNamespace(kind="completion", signal="score")}
    m = build_snapshot(now, base, probes, plasticity="nll_reduction")
    want = 1 - (now_nll.sum() / tokens.sum()) / (base_nll.sum() / tokens.sum())
    assert m["sp/plasticity"] == pytest.approx(want, rel=1e-12)
    assert m["stderr/sp/plasticity"] == pytest.approx(delta_method_ratio_se(now_nll, base_nll), rel=1e-12)
    # Every row's NLL halved: exactly 0.5 of the NLL removed, with no spread at all.
    half = build_snapshot({"target": result(base_nll / 2)}, base, probes, plasticity="nll_reduction")
    assert half["sp/plasticity"] == pytest.approx(0.5) and half["stderr/sp/plasticity"] == pytest.approx(0, abs=1e-15)
    assert build_snapshot(base, base, probes, plasticity="nll_reduction")["sp/plasticity"] == 0.0


def test_no_change_has_zero_error_and_one_row_has_none():
    rows = [(3.0, 2.0, 1.0), (5.0, 4.0, 0.0), (1.0, 1.0, 1.0)]
    assert stats.nll_change_se(rows, rows) == stats.score_change_se(rows, rows) == stats.ratio_se(rows, rows) == 0
    assert math.isnan(stats.nll_change_se(rows[:1], rows[:1]))
    with pytest.raises(ValueError, match="3 rows now but 2 at the baseline"):
        stats.nll_change_se(rows, rows[:2])


def test_the_errors_are_calibrated_on_rows_where_the_truth_is_known(rng):
    """Over many draws of 32 rows from a known population, the stated error matches the actual
    spread of the estimate, and ±1.96 se covers the true change about 95% of the time."""
    n, draws, true_shift = 32, 3000, 0.2
    estimates, errors, covered = [], [], 0
    for _ in range(draws):
        tokens = rng.integers(10, 40, n).astype(float)
        base = tokens * rng.gamma(4.0, 1.0, n)  # rows differ a lot in difficulty...
        now = base + tokens * rng.normal(true_shift, 0.3, n)  # ...the change per token less
        a, b = rows_of(now, tokens, np.zeros(n)), rows_of(base, tokens, np.zeros(n))
        est = (now.sum() - base.sum()) / tokens.sum()
        se = stats.nll_change_se(a, b)
        estimates.append(est)
        errors.append(se)
        covered += abs(est - true_shift) <= 1.96 * se
    assert np.mean(errors) == pytest.approx(np.std(estimates), rel=0.08)
    assert 0.93 <= covered / draws <= 0.97


@pytest.mark.parametrize("df", [1, 2, 3, 5, 23, 63, 1000])
@pytest.mark.parametrize("confidence", [0.8, 0.9, 0.95, 0.99])
def test_t_quantile_against_scipy(df, confidence):
    scipy_stats = pytest.importorskip("scipy.stats")
    want = scipy_stats.t.ppf(confidence, df)
    assert stats.t_quantile(confidence, df) == pytest.approx(want, rel=1e-12 if df <= 2 else 5e-3 if df < 5 else 1e-3)


def test_rows_needed_is_the_textbook_sample_size():
    # ((t_0.95 + t_0.8) · sd / limit)² at n - 1 degrees of freedom, for a one-sided 95% test with 80% power:
    # at sd/limit = 4 the normal answer, 100 rows, becomes 102 with t at 101 degrees of freedom.
    n = stats.rows_needed(1.0, 0.25, 0.95)
    assert math.ceil((stats.t_quantile(0.95, n - 1) + stats.t_quantile(0.8, n - 1)) ** 2 * 16) == n
    assert math.ceil((1.6449 + 0.8416) ** 2 * 16) < n < 110
    assert stats.rows_needed(0.5, 0.25, 0.99) > stats.rows_needed(0.5, 0.25, 0.95)
    assert stats.one_sided_z(0.95) == pytest.approx(1.6448536, rel=1e-6)
    assert stats.t_quantile(0.95, None) == stats.one_sided_z(0.95)
    assert math.isnan(stats.rows_needed(math.nan, 0.1, 0.95))


def test_probe_rows_and_snapshot_errors_match_a_float64_reference(tokenizer):
    """A real pass: every row's NLL equals a float64 hand computation, and the snapshot's
    ``stderr/*`` keys equal the formulas on those hand-computed rows."""
    text = [{"text": s} for s in corpus(12, seed=5)]
    mc = [{"context": "the cat", "choices": [" runs.", " sings.", " is"], "answer": i % 3} for i in range(6)]
    r = runner(tokenizer, general=text, facts=mc)
    model = make_model(vocab_size=len(tokenizer))
    base = r.run(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    now = r.run(model)

    def hand(m):
        out = []
        for row in text:
            lp, _ = ref_logprobs(m, tokenizer(row["text"])["input_ids"], 1)
            out.append((-lp.sum().item(), float(lp.numel()), 0.0))
        return out

    assert [x[1:] for x in now["general"].rows] == [x[1:] for x in hand(model)]
    assert np.allclose([x[0] for x in now["general"].rows], [x[0] for x in hand(model)], rtol=1e-5)
    assert len(now["facts"].rows) == 6 and sum(x[2] for x in now["facts"].rows) == now["facts"].score * 6
    m = build_snapshot(now, base, r.probes)
    ref = stats.nll_change_se(now["general"].rows, base["general"].rows)
    assert m["stderr/delta_nll/general"] == m["stderr/nll/general"] == pytest.approx(ref, rel=1e-12) and ref > 0
    assert m["stderr/retention_nll/general"] == pytest.approx(m["retention_nll/general"] * ref, rel=1e-12)
    assert m["stderr/retention/general"] == m["stderr/retention_nll/general"]
    assert m["stderr/score/facts"] == pytest.approx(stats.score_change_se(now["facts"].rows, base["facts"].rows))
    assert m["stderr/retention/facts"] == m["stderr/retention_score/facts"]
    parts = [m["stderr/retention/general"], m["stderr/retention/facts"]]
    assert m["stderr/sp/stability"] == pytest.approx(math.sqrt(sum(e * e for e in parts)) / 2, rel=1e-12)
    assert m["stderr/rows/general"] == 12 and m["stderr/rows/facts"] == 6
    at_baseline = build_snapshot(base, base, r.probes)
    assert at_baseline["stderr/delta_nll/general"] == 0.0
    assert "stderr/sp/stability" not in build_snapshot(now, base, r.probes, stability="min")
    # One row: no error can be estimated, so no key (a confidence budget compares plainly).
    one = runner(tokenizer, general=text[:1])
    m1 = build_snapshot(one.run(model), one.run(make_model(vocab_size=len(tokenizer))), one.probes)
    assert "delta_nll/general" in m1 and not any(k.startswith("stderr/") and "rows" not in k for k in m1)
