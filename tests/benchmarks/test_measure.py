"""The benchmarks' one timing helper and one correlation helper."""

import pytest
import torch

from benchmarks import measure
from benchmarks.measure import pearson, timed


def test_timed_reports_the_median_and_the_last_result(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(measure.time, "perf_counter", lambda: now[0])
    durations = iter([100.0, 3.0, 1.0, 2.0])  # the first call is the warm-up and is not timed
    calls = []

    def fn():
        calls.append(len(calls))
        now[0] += next(durations)
        return calls[-1]

    seconds, result = timed(fn, 3)
    assert seconds == 2.0 and result == 3 and len(calls) == 4


def test_timed_without_warmup_calls_once_per_repeat_and_syncs_inside_each_run():
    events = []
    timing = timed(lambda: events.append("fn") or len(events), 2, warmup=False, sync=lambda: events.append("sync"))
    assert events == ["fn", "sync", "fn", "sync"] and timing.result == 3 and timing.seconds >= 0
    events.clear()
    timed(lambda: events.append("fn"), 1, sync=lambda: events.append("sync"))
    assert events == ["fn", "sync", "fn", "sync"]  # the warm-up is synchronised too
    with pytest.raises(ValueError, match="repeats"):
        timed(lambda: None, 0)


def test_pearson_matches_corrcoef_and_is_nan_for_non_finite_scores():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 3, generator=g), torch.randn(20, 3, generator=g)
    b = b + a
    expected = torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1]
    assert pearson(a, b) == pytest.approx(float(expected), abs=1e-12)
    assert pearson(a, a.float()) == pytest.approx(1.0)
    for bad in (float("nan"), float("inf")):
        c = a.clone()
        c[0, 0] = bad
        assert pearson(c, b) != pearson(c, b) and pearson(b, c) != pearson(b, c)  # NaN either way round
