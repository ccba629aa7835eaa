"""Choosing among launch schedules that compute the same numbers, by timing each once per process.

A kernel's schedule (rows and columns per program, warps, pipeline stages) moves
its speed, which only the GPU at hand can tell, but must not move its result: the
callers offer only schedules whose every output element is summed in the same
order (:func:`kernels.triton_kernels.project_schedules`), so which one wins a
timing race changes how long a call takes, never what it returns. (For the
projection: the schedules keep the static plan's ``BLOCK_P``, chunks and splits, so
each output adds the same ``BLOCK_P``-wide tensor-core products in the same order;
the tests check that they compile to the same tensor-core instructions and project
bit for bit alike under the interpreter; ``benchmarks/kernels.py`` checks it on a
GPU, which has not been done yet.)

The first call with a given ``key`` times every candidate (:func:`cuda_seconds`),
remembers the fastest for the rest of the process, and later calls with that key
reuse it. A candidate the GPU cannot launch (too much shared memory for it,
Triton's ``OutOfResources``) is passed over. ``ATTRIB_TUNE=0`` turns timing off:
every call takes its first candidate, the static plan.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Hashable, Tuple, Type

import torch

__all__ = ["enabled", "fastest", "choose", "choices", "cuda_seconds", "forget"]

_CHOICES: Dict[Hashable, int] = {}


def enabled() -> bool:
    """Whether ``ATTRIB_TUNE`` (``1``, the default, or ``0``) lets calls time their candidates.

    Raises:
        ValueError: ``ATTRIB_TUNE`` holds something else.
    """
    value = os.environ.get("ATTRIB_TUNE", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"ATTRIB_TUNE: expected '0' or '1', got {value!r}")
    return value == "1"


def _skipped() -> Tuple[Type[BaseException], ...]:
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:  # pragma: no cover - triton is a dependency wherever this runs
        return ()
    return (OutOfResources,)


def fastest(count: int, seconds: Callable[[int], float]) -> int:
    """The index in ``range(count)`` whose ``seconds(index)`` is least, the lowest index among equals.

    Candidates that raise Triton's ``OutOfResources`` are passed over; if every one does, the first one's
    error is raised.

    Raises:
        ValueError: ``count`` is below 1.
    """
    if count < 1:
        raise ValueError(f"count: expected at least one candidate, got {count}")
    best, best_seconds, first_error = None, float("inf"), None
    for index in range(count):
        try:
            time = seconds(index)
        except _skipped() as error:
            first_error = first_error or error
            continue
        if time < best_seconds:
            best, best_seconds = index, time
    if best is None:
        raise first_error
    return best


def choose(key: Hashable, count: int, seconds: Callable[[int], float]) -> int:
    """:func:`fastest` of ``count`` candidates, timed on the first call with ``key`` and remembered; ``0`` without
    timing when :func:`enabled` is false or there is one candidate."""
    if count == 1 or not enabled():
        return 0
    if key not in _CHOICES:
        _CHOICES[key] = fastest(count, seconds)
    return _CHOICES[key]


def choices() -> Dict[Hashable, int]:
    """The choices remembered so far: key to the index of the candidate taken."""
    return dict(_CHOICES)


def forget() -> None:
    """Drop every remembered choice (the next call with each key times its candidates again)."""
    _CHOICES.clear()


def cuda_seconds(fn: Callable[[], None], device: torch.device, repeats: int = 3) -> float:
    """The median time on ``device`` of ``repeats`` runs of ``fn`` (which queues GPU work), after one untimed run
    that compiles it."""
    with torch.cuda.device(device):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeats):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]
