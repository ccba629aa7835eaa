"""Choosing the fastest of equivalent schedules (kernels/tuning.py): the choice itself, with timings given."""

import pytest
from triton.runtime.errors import OutOfResources

from kernels import tuning


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv("ATTRIB_TUNE", raising=False)
    tuning.forget()
    yield
    tuning.forget()


def test_the_fastest_candidate_wins_and_the_first_among_equals():
    assert tuning.fastest(4, [3.0, 1.0, 2.0, 1.0].__getitem__) == 1
    assert tuning.fastest(1, lambda index: 5.0) == 0


def test_candidates_the_gpu_cannot_launch_are_passed_over():
    def seconds(index):
        if index in (0, 2):
            raise OutOfResources(300_000, 232_448, "shared memory")
        return 1.0 + index

    assert tuning.fastest(4, seconds) == 1


def test_with_no_candidate_launching_the_first_error_is_raised():
    errors = [OutOfResources(300_000 + index, 232_448, "shared memory") for index in range(3)]

    def seconds(index):
        raise errors[index]

    with pytest.raises(OutOfResources) as raised:
        tuning.fastest(3, seconds)
    assert raised.value is errors[0]


def test_other_errors_are_not_swallowed():
    def seconds(index):
        raise RuntimeError("a bug, not a GPU limit")

    with pytest.raises(RuntimeError, match="a bug"):
        tuning.fastest(2, seconds)
    with pytest.raises(ValueError, match="count: expected at least one"):
        tuning.fastest(0, lambda index: 1.0)


def test_each_key_is_timed_once_and_remembered():
    calls = []

    def seconds(index):
        calls.append(index)
        return [2.0, 1.0, 3.0][index]

    assert tuning.choose("a", 3, seconds) == 1 and calls == [0, 1, 2]
    assert tuning.choose("a", 3, seconds) == 1 and calls == [0, 1, 2]  # remembered
    assert tuning.choose("b", 3, seconds) == 1 and calls == [0, 1, 2] * 2  # another key: timed
    tuning.forget()
    assert tuning.choose("a", 3, seconds) == 1 and len(calls) == 9


def test_a_single_candidate_or_tuning_off_takes_the_first_untimed(monkeypatch):
    def seconds(index):
        raise AssertionError("timed")

    assert tuning.choose("a", 1, seconds) == 0
    monkeypatch.setenv("ATTRIB_TUNE", "0")
    assert not tuning.enabled() and tuning.choose("a", 3, seconds) == 0
    monkeypatch.setenv("ATTRIB_TUNE", "yes")
    with pytest.raises(ValueError, match="ATTRIB_TUNE: expected '0' or '1', got 'yes'"):
        tuning.enabled()


def test_cuda_seconds_times_after_a_compiling_run_and_takes_the_median(monkeypatch):
    import contextlib

    import torch

    elapsed = iter([5.0, 1.0, 3.0])  # milliseconds per timed run
    calls = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            calls.append("record")

        def synchronize(self):
            calls.append("sync")

        def elapsed_time(self, end):
            return next(elapsed)

    devices = []
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "device", lambda d: devices.append(d) or contextlib.nullcontext())
    seconds = tuning.cuda_seconds(lambda: calls.append("run"), "cuda:1", repeats=3)
    assert seconds == 3.0 / 1e3 and devices == ["cuda:1"]
    assert calls == ["run"] + ["record", "run", "record", "sync"] * 3  # untimed first run, then each timed
