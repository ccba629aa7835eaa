"""The one loop driver every iterative solver uses."""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

from ._checks import check_callable, check_count

State = TypeVar("State")

__all__ = ["fold"]


def fold(
    step: Callable[[State], State],
    state: State,
    max_steps: int,
    done: Optional[Callable[[State], bool]] = None,
) -> State:
    """Apply ``step`` to ``state`` until ``done(state)`` holds or ``max_steps`` steps are taken.

    The analogue of ``jax.lax.while_loop`` with a bound: ``done`` is checked before
    every step (so a state that is already done is returned unchanged), ``step`` is
    a pure function of the state, and the caller keeps anything it wants to count
    (steps taken, histories) in the state itself.

    Args:
        step: ``state -> state``.
        state: the initial state, usually a NamedTuple.
        max_steps: the most steps to take, ``>= 0``.
        done: ``state -> bool`` (a Python bool or a one-element tensor), or None to
            take exactly ``max_steps`` steps.

    Returns:
        The final state.
    """
    check_callable(step, "step")
    if done is not None:
        check_callable(done, "done")
    max_steps = check_count(max_steps, "max_steps", minimum=0)
    for _ in range(max_steps):
        if done is not None and bool(done(state)):
            break
        state = step(state)
    return state
