"""How the benchmark scripts measure: wall time (:func:`timed`), agreement of scores (:func:`pearson`),
and one configuration in a process of its own (:func:`in_fresh_process`), so its peak memory is its own."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, NamedTuple, Optional

import torch


class Timing(NamedTuple):
    seconds: float  # the median over the timed runs
    result: Any  # what the last timed run returned


def timed(fn: Callable[[], Any], repeats: int = 1, *, warmup: bool = True,
          sync: Optional[Callable[[], None]] = None) -> Timing:
    """The median wall time of ``repeats`` calls of ``fn``, and what the last one returned.

    With ``warmup`` (the default) one untimed call goes first, so one-off set-up
    (``torch.func``'s first call, kernel compilation, caches) is not in the figure;
    pass ``warmup=False`` to time from cold, e.g. construction through ``attribute``
    of an attributor, or a call too long to make twice. ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called after the warm-up and inside every timed
    run, after ``fn``, so each time includes the device work ``fn`` queued.

    The median, not the best run: what every benchmark script reported before they
    shared this helper, and less moved by one lucky or disturbed run.
    """
    if repeats < 1:
        raise ValueError(f"repeats: expected at least 1, got {repeats}")
    if warmup:
        fn()
        if sync is not None:
            sync()
    seconds, result = [], None
    for _ in range(repeats):
        result = None  # free the previous run's output before the next run allocates its own
        start = time.perf_counter()
        result = fn()
        if sync is not None:
            sync()
        seconds.append(time.perf_counter() - start)
    return Timing(statistics.median(seconds), result)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Pearson correlation of all entries of ``a`` and ``b`` (flattened, in float64).

    NaN when either holds a NaN or an infinity: a method whose scores are not finite
    agrees with nothing.
    """
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return float("nan")
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def in_fresh_process(module: str, *args: Any) -> dict:
    """Run ``python -m <module> --single <args>`` and return the JSON record it prints last.

    Raises:
        RuntimeError: the run failed; its message is the run's last line of stderr.
    """
    out = subprocess.run([sys.executable, "-m", module, "--single", *map(str, args)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit status {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])
