import json
import math

import pytest

from arena_callbacks import Probe, ProbeResult, ProbeSet, ProbeSettings, Snapshot
from arena_callbacks.history import History, read_history
from arena_callbacks.measurements import build_snapshot, expected_keys

S = ProbeSettings()


def probesets(signal="score"):
    return {
        "general": ProbeSet.build("general", [{"text": "some text here"}], S),
        "facts": ProbeSet.build(
            "facts", Probe([{"context": "q", "choices": ["a", "b"], "answer": 0}], signal=signal), S
        ),
        "target": ProbeSet.build("target", [{"prompt": "p", "completion": "c"}], S),
    }


def res(name, kind, nll, score=None):
    return ProbeResult(name, kind, nll, score, 10, 100)


BASE = {
    "general": res("general", "text", 3.0),
    "facts": res("facts", "multiple_choice", 1.0, 0.8),
    "target": res("target", "completion", 2.0, 0.1),
}
NOW = {
    "general": res("general", "text", 3.5),
    "facts": res("facts", "multiple_choice", 1.2, 0.6),
    "target": res("target", "completion", 0.5, 0.7),
}


def test_snapshot_formulas():
    m = build_snapshot(NOW, BASE, probesets())
    assert m["delta_nll/general"] == pytest.approx(0.5)
    assert m["retention/general"] == pytest.approx(math.exp(-0.5))
    assert m["retention_score/facts"] == pytest.approx(0.75)
    assert m["retention/facts"] == pytest.approx(0.75)  # score signal
    assert m["retention_nll/facts"] == pytest.approx(math.exp(-0.2))
    assert m["sp/stability"] == pytest.approx((math.exp(-0.5) + 0.75) / 2)
    assert m["target/score"] == 0.7 and m["target/delta_nll"] == pytest.approx(-1.5)
    assert m["sp/plasticity"] == pytest.approx(0.6)
    assert "retention/target" not in m
    from arena_callbacks.sp import SP_KEYS

    # The monitor adds probe/seconds and the sp/* estimate of the trajectory (arena_callbacks.sp).
    assert sorted(list(m) + ["probe/seconds", *SP_KEYS]) == expected_keys(probesets(), True)


def test_snapshot_options():
    m = build_snapshot(NOW, BASE, probesets("nll"), stability="min", plasticity="ratio")
    assert m["retention/facts"] == pytest.approx(math.exp(-0.2))
    assert m["sp/stability"] == pytest.approx(min(math.exp(-0.5), math.exp(-0.2)))
    assert m["sp/plasticity"] == pytest.approx(7.0)


def test_baseline_snapshot_is_neutral_and_zero_score_falls_back_to_nll():
    base = dict(BASE, facts=res("facts", "multiple_choice", 1.0, 0.0))
    m0 = build_snapshot(base, base, probesets())
    assert m0["retention/general"] == 1.0 and m0["sp/plasticity"] == 0.0
    assert math.isnan(m0["retention_score/facts"]) and m0["retention/facts"] == 1.0


def test_history_roundtrip_with_nan(tmp_path):
    h = History(tmp_path / "arena" / "history.jsonl")
    h.start_file()
    s0 = Snapshot(0, {"retention/general": 1.0}, epoch=0.0, trigger="baseline")
    s1 = Snapshot(10, {"retention/general": math.nan, "sp/stability": 0.5}, epoch=0.5)
    h.append(s0, None)
    h.append(s1, None)
    lines = (tmp_path / "arena" / "history.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 10]
    back = read_history(tmp_path / "arena")
    assert back[0] == s0
    assert back[1].step == 10 and math.isnan(back[1].metrics["retention/general"])
    assert back[1].metrics["sp/stability"] == 0.5 and back[1].epoch == 0.5


def test_history_write_failure_keeps_memory(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    h = History(blocker / "sub" / "history.jsonl")  # parent is a file: cannot be created
    h.start_file()
    h.append(Snapshot(0, {"a/b": 1.0}), None)
    assert len(h) == 1
    assert "could not write" in caplog.text


def test_history_file_kept_when_not_fresh(tmp_path):
    path = tmp_path / "history.jsonl"
    h = History(path)
    h.start_file()
    h.append(Snapshot(0, {"a/b": 1.0}), None)
    resumed = History(path)
    resumed.start_file(fresh=False)
    resumed.append(Snapshot(10, {"a/b": 0.5}), None)
    assert [s.step for s in read_history(path)] == [0, 10]
    History(path).start_file(fresh=True)
    assert read_history(path) == []
