"""The one place where solvers' failures reach the user.

Attributors hand every :class:`attrib_core.Solution` they get to :func:`record`;
when the public call that made them returns, :func:`flush` warns once per solver
with the counts of right-hand sides that did not converge, by status, and the
worst diagnostic among them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, NamedTuple

from torch import Tensor

from attrib_core import Solution, Status

from .user_warning import warn

__all__ = ["record", "flush", "discard"]

_MEANING = {
    Status.MAX_STEPS: "reached the step cap before converging",
    Status.DIVERGED: "diverged",
    Status.INDEFINITE: "met a curvature that is not positive definite",
}


class _Tally(NamedTuple):
    counts: Counter  # Status -> right-hand sides
    worst: Dict[str, float]  # per-row diagnostic -> its largest value over unconverged rows
    facts: Dict[str, Any]  # whole-solve diagnostics of the last unconverged solve
    where: set  # checkpoints (or other places) the unconverged solves came from
    advice: str


def record(owner: Any, solution: Solution, *, solver: str, where: str, advice: str) -> None:
    """Count ``solution``'s statuses under ``solver`` for the warning :func:`flush` gives.

    Args:
        owner: the attributor making the public call.
        solution: any solver's result.
        solver: its name in the message (``"CG"``, ``"LiSSA"``).
        where: e.g. ``"checkpoint 0"``.
        advice: what the user can change, said once in the warning.
    """
    tallies = owner.__dict__.setdefault("_solver_tallies", {})
    tally = tallies.setdefault(solver, _Tally(Counter(), {}, {}, set(), advice))
    status = solution.status.reshape(-1)
    tally.counts.update(Status(code) for code in status.tolist())
    failed = status != Status.CONVERGED
    if not bool(failed.any()):
        return
    tally.where.add(where)
    for name, value in solution.stats.items():
        if isinstance(value, Tensor) and value.shape == solution.status.shape and value.is_floating_point():
            worst = float(value.reshape(-1)[failed].max())
            tally.worst[name] = max(worst, tally.worst.get(name, worst))
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
            tally.facts[name] = value


def flush(owner: Any) -> None:
    """Warn once per solver that left right-hand sides unconverged since the last flush, then forget them."""
    for solver, tally in owner.__dict__.pop("_solver_tallies", {}).items():
        total = sum(tally.counts.values())
        problems = [f"{n} of {total} {_MEANING[s]}" for s, n in sorted(tally.counts.items()) if s != Status.CONVERGED]
        if not problems:
            continue
        details = [f"largest {name} {value:.3g}" for name, value in tally.worst.items()]
        details += [f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}"
                    for name, value in tally.facts.items()]
        where = ", ".join(sorted(tally.where))
        warn(f"{solver} ({where}): of {total} right-hand sides solved, {'; '.join(problems)}"
             + (f" ({', '.join(details)})" if details else "")
             + f"; their scores are approximate. {tally.advice}")


def discard(owner: Any) -> None:
    """Forget what was recorded (a public call that failed reports its error instead)."""
    owner.__dict__.pop("_solver_tallies", None)
