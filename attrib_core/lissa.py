"""LiSSA: a stochastic Neumann-series estimate of an inverse Hessian applied to vectors."""

from __future__ import annotations

from typing import Callable, NamedTuple, Union

import torch
from torch import Tensor

from ._checks import as_block, block_width, check_callable, check_count, check_nonnegative, check_positive
from .fold import fold
from .seeds import mix
from .solution import Solution, Status, solution

__all__ = ["LissaState", "lissa"]

# Divergence tests on the norms of the updates h_j - h_{j-1}. The recursion
# contracts when the spectrum of (H_batch + damping I) / scale lies in (0, 2);
# then its updates shrink geometrically to a noise floor set by the mini-batches.
# It diverges when an eigenvalue leaves that interval; then the updates grow
# geometrically, quickly or (an eigenvalue just outside) slowly. Two signs:
_GROWTH_LIMIT = 10.0  # the last update is ten times the first
_TREND_LIMIT = 1.2  # the mean update over the last quarter of the run is 20% above the third quarter's
_TREND_MIN_STEPS = 8
# Converged at the noise floor: the updates have stopped shrinking (the last quarter's
# mean at least half the third quarter's) and successive updates are far from parallel.
_LEVEL_LIMIT = 0.5
_NOISE_ALIGNMENT = 0.5


class LissaState(NamedTuple):
    """The carry of one run; the update norms are kept as the sums the status needs, not as a history.

    Every field with a row dimension has one entry per right-hand side; the run's
    length ``max_steps`` is fixed, so its quarters are known from the start.
    """

    h: Tensor  # (k, P) current h_j
    update: Tensor  # (k, P) h_j - h_{j-1}
    first: Tensor  # (k,) ||h_1 - h_0||
    last: Tensor  # (k,) ||h_j - h_{j-1}||
    third: Tensor  # (k,) sum of the update norms over the third quarter of the run
    fourth: Tensor  # (k,) sum of the update norms over the last quarter
    aligned: Tensor  # (k,) sum over the last quarter of the cosines between successive updates
    step: int  # j, the steps taken; with ``key`` it seeds step j + 1's mini-batch
    key: int  # this run's seed, from the caller's seed and the repeat


def lissa(
    sample_mv: Callable[[torch.Generator], Callable[[Tensor], Tensor]],
    B: Tensor,
    *,
    max_steps: int = 5000,
    scale: float = 50.0,
    damping: float = 0.0,
    repeats: int = 1,
    seed: Union[int, torch.Generator] = 0,
    tol: float = 1e-4,
) -> Solution:
    """Inverse-Hessian-vector products by LiSSA (Agarwal, Bullins & Hazan, 2017; Koh & Liang, 2017).

    For each right-hand side ``v`` (a row of ``B``) runs the recursion

        h_0 = v,   h_j = v + h_{j-1} - (H_j + damping I) h_{j-1} / scale,

    where ``H_j`` is the Hessian of a fresh mini-batch at step ``j``, and returns
    ``h / scale`` averaged over ``repeats`` independent runs. Its fixed point is
    ``h / scale = (H + damping I)^{-1} v``. ``scale`` must exceed the largest
    eigenvalue of ``H + damping I`` (roughly) for the series to converge.
    (The recursion of Koh & Liang writes ``(1 - d) h - H h / scale``: their ``d``
    is ``damping / scale`` here.)

    Every step is a pure function of its state: step ``j`` of repeat ``r`` draws its
    mini-batch from a generator seeded by ``(seed, r, j)``, so a run is the same
    whatever was run before it.

    Args:
        sample_mv: called once per recursion step with a ``torch.Generator`` (draw
            the mini-batch from it); returns that step's Hessian operator ``(k, P) -> (k, P)``.
        B: right-hand sides ``(k, P)`` or one ``(P,)``.
        max_steps: recursion steps per repeat, ``>= 1`` (all are run, as in dattri and Koh & Liang).
        scale: ``> 0``, divides the Hessian.
        damping: ``>= 0``, added to the Hessian; ``damping < 2 * scale``.
        repeats: independent runs averaged, ``>= 1``.
        seed: an integer seed, or a generator one seed is drawn from; torch's global
            RNG is neither read nor advanced.
        tol: ``>= 0``, the relative change of ``h`` still to come that counts as converged.

    Returns:
        :class:`Solution` with ``stats["last_update"]`` (``k,``), the norm of the final
        update of ``h`` (largest over repeats). ``status`` is the worst over repeats:
        ``DIVERGED`` for iterates that became non-finite, a last update more than ten
        times the first, or updates that grew over the last half of the run (mean over
        the last quarter more than 1.2 times the third quarter's); ``CONVERGED`` where
        the recursion sits at its mini-batch noise floor, where more steps do not help
        and more repeats do (at least 8 steps, the last quarter's mean update at least
        half the third quarter's, and successive updates in the last quarter at a mean
        cosine below 0.5: noise, not a slow contraction), or where the change still to
        come, the tail ``u ρ / (1 - ρ)`` of a geometric series through the last update
        ``u`` at the rate ``ρ`` the last two quarters show, is at most ``tol * ||h||``
        (with fewer than 8 steps: ``u`` itself); ``MAX_STEPS`` otherwise.
    """
    check_callable(sample_mv, "sample_mv")
    block, single = as_block(B, block_width(B, "B"), name="B")
    max_steps = check_count(max_steps, "max_steps")
    scale = check_positive(scale, "scale")
    damping = check_nonnegative(damping, "damping")
    if damping >= 2 * scale:
        raise ValueError(
            f"damping: must be < 2 * scale = {2 * scale:g}, got {damping:g}; the recursion cannot contract "
            "otherwise (|1 - (λ + damping) / scale| >= 1 for every λ >= 0)"
        )
    repeats = check_count(repeats, "repeats")
    tol = check_nonnegative(tol, "tol")
    seed = _seed(seed)
    v = block.to(torch.promote_types(block.dtype, torch.float32))

    def step(s: LissaState) -> LissaState:
        mv = sample_mv(torch.Generator().manual_seed(mix(s.key, s.step)))
        if not callable(mv):
            raise TypeError(
                f"sample_mv: must return the step's Hessian operator (a callable), got {type(mv).__name__}"
            )
        h = v + s.h - (mv(s.h) + damping * s.h) / scale
        update = h - s.h
        norm = update.norm(dim=1)
        third, fourth, aligned = s.third, s.fourth, s.aligned
        if max_steps - 2 * quarter <= s.step < max_steps - quarter:
            third = third + norm
        elif s.step >= max_steps - quarter:
            fourth = fourth + norm
            tiny = torch.finfo(norm.dtype).tiny
            aligned = aligned + (update * s.update).sum(1) / (norm * s.update.norm(dim=1)).clamp(min=tiny)
        first = norm if s.step == 0 else s.first
        return LissaState(h, update, first, norm, third, fourth, aligned, s.step + 1, s.key)

    quarter = max_steps // 4
    total = torch.zeros_like(v)
    last = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    status = torch.full((v.shape[0],), Status.CONVERGED, dtype=torch.long, device=v.device)
    steps = torch.zeros(v.shape[0], dtype=torch.long, device=v.device)
    for r in range(repeats):
        zeros = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
        start = LissaState(v, torch.zeros_like(v), zeros, zeros, zeros, zeros, zeros, 0, mix(seed, r))
        final = fold(step, start, max_steps)
        total += final.h
        last = torch.maximum(last, final.last)
        status = torch.maximum(status, _status(final, tol))
        steps = torch.maximum(steps, torch.full_like(steps, final.step))
    return solution(total / (repeats * scale), status, steps, single=single, per_row={"last_update": last})


def _status(final: LissaState, tol: float) -> Tensor:
    """Per row, the :class:`Status` of one run (see :func:`lissa`)."""
    last, bound = final.last, tol * final.h.norm(dim=1)
    quarter = final.step // 4
    jumped = last > _GROWTH_LIMIT * final.first
    if final.step < _TREND_MIN_STEPS:
        within, growing = last <= bound, jumped
    else:
        earlier, late = final.third / quarter, final.fourth / quarter
        rate = (late / earlier.clamp(min=torch.finfo(late.dtype).tiny)).pow(1.0 / quarter)
        tail = torch.where(rate < 1, last * rate / (1 - rate.clamp(max=1 - 1e-12)), torch.inf)
        # At the noise floor successive updates point in unrelated directions; while the
        # recursion still contracts they are nearly parallel (its slowest mode dominates).
        noise = (late >= _LEVEL_LIMIT * earlier) & (final.aligned / quarter < _NOISE_ALIGNMENT)
        within = noise | (tail <= bound) | (last == 0)
        growing = jumped | (late > _TREND_LIMIT * earlier)
    status = torch.where(within, Status.CONVERGED, Status.MAX_STEPS)
    diverged = ~torch.isfinite(final.h).all(dim=1) | growing
    return torch.where(diverged, Status.DIVERGED, status)


def _seed(seed: Union[int, torch.Generator]) -> int:
    if isinstance(seed, torch.Generator):
        return int(torch.randint(0, 2**62, (1,), generator=seed))
    return check_count(seed, "seed", minimum=0)
