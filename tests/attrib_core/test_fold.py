from typing import NamedTuple

import pytest

from attrib_core import fold


class Counter(NamedTuple):
    value: int
    steps: int


def increment(s: Counter) -> Counter:
    return Counter(s.value + 3, s.steps + 1)


def test_runs_exactly_max_steps_without_done():
    assert fold(increment, Counter(0, 0), 5) == Counter(15, 5)


def test_done_is_checked_before_each_step():
    assert fold(increment, Counter(0, 0), 100, done=lambda s: s.value >= 7) == Counter(9, 3)
    already = Counter(50, 0)
    assert fold(increment, already, 100, done=lambda s: s.value >= 7) is already


def test_zero_steps_returns_the_state():
    start = Counter(1, 0)
    assert fold(increment, start, 0) is start


def test_bad_arguments():
    with pytest.raises(TypeError, match="step"):
        fold(None, Counter(0, 0), 3)
    with pytest.raises(TypeError, match="done"):
        fold(increment, Counter(0, 0), 3, done=True)
    with pytest.raises(ValueError, match="max_steps"):
        fold(increment, Counter(0, 0), -1)
    with pytest.raises(TypeError, match="max_steps"):
        fold(increment, Counter(0, 0), 2.5)
