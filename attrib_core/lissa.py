"""LiSSA: a stochastic Neumann-series estimate of an inverse Hessian applied to vectors."""

from __future__ import annotations

from typing import Callable, NamedTuple, Union

import torch
from torch import Tensor

from ._checks import as_block, block_width, check_callable, check_count, check_nonnegative, check_positive
from .fold import fold

__all__ = ["LissaState", "LissaSolution", "lissa"]

# Divergence tests on the norms of the updates h_j - h_{j-1}. The recursion
# contracts when the spectrum of H_batch / scale lies in (-damping, 2 - damping);
# then its updates shrink geometrically to a noise floor set by the mini-batches.
# It diverges when an eigenvalue leaves that interval; then the updates grow
# geometrically, quickly or (an eigenvalue just outside) slowly. Two signs:
_GROWTH_LIMIT = 10.0  # the last update is ten times the first
_TREND_LIMIT = 1.2  # the mean update over the last quarter of the run is 20% above the third quarter's
_TREND_MIN_STEPS = 8


class LissaState(NamedTuple):
    h: Tensor  # (k, P) current h_j
    updates: Tensor  # (j, k) ||h_i - h_{i-1}|| for i = 1..j


class LissaSolution(NamedTuple):
    """``x`` (``k, P``) estimates ``(H + damping * scale * I)^{-1} b`` for each row ``b``.

    ``steps`` is the recursion depth run (per repeat), ``last_update`` (``k,``) the
    norm of the final update of ``h`` (largest over repeats; near zero once the
    series has converged, up to mini-batch noise), and ``diverged`` (``k,``) flags
    rows whose iterates became non-finite, whose last update is more than ten
    times the first, or whose updates grew over the last half of the run (mean
    over the last quarter more than 1.2 times the third quarter's), in any
    repeat. For a single ``(P,)`` right-hand side the diagnostics are 0-d.
    """

    x: Tensor
    steps: int
    last_update: Tensor
    diverged: Tensor


def lissa(
    sample_mv: Callable[[torch.Generator], Callable[[Tensor], Tensor]],
    B: Tensor,
    *,
    depth: int = 5000,
    scale: float = 50.0,
    damping: float = 0.0,
    repeats: int = 1,
    seed: Union[int, torch.Generator] = 0,
) -> LissaSolution:
    """Inverse-Hessian-vector products by LiSSA (Agarwal, Bullins & Hazan, 2017; Koh & Liang, 2017).

    For each right-hand side ``v`` (a row of ``B``) runs the recursion

        h_0 = v,   h_j = v + (1 - damping) h_{j-1} - H_j h_{j-1} / scale,

    where ``H_j`` is the Hessian of a fresh mini-batch at step ``j``, and returns
    ``h_depth / scale`` averaged over ``repeats`` independent runs. Its fixed point
    is ``h / scale = (H + damping * scale * I)^{-1} v``. ``scale`` must exceed the
    largest eigenvalue of ``H`` (roughly) for the series to converge.

    Args:
        sample_mv: called once per recursion step with a ``torch.Generator`` (draw
            the mini-batch from it for reproducible runs); returns that step's
            Hessian operator ``(k, P) -> (k, P)``.
        B: right-hand sides ``(k, P)`` or one ``(P,)``.
        depth: recursion steps per repeat, ``>= 1``.
        scale: ``> 0``, divides the Hessian.
        damping: ``>= 0``.
        repeats: independent runs averaged, ``>= 1``.
        seed: integer seed (a CPU generator is made from it) or a generator, for
            the mini-batch draws; torch's global RNG is neither read nor advanced.

    Returns:
        :class:`LissaSolution`; divergence is reported in it, not raised.
    """
    check_callable(sample_mv, "sample_mv")
    block, single = as_block(B, block_width(B, "B"), name="B")
    depth = check_count(depth, "depth")
    scale = check_positive(scale, "scale")
    damping = check_nonnegative(damping, "damping")
    if damping >= 2:
        raise ValueError(
            f"damping: must be < 2, got {damping}; the recursion cannot contract otherwise "
            "(|1 - damping - λ/scale| >= 1 for every λ >= 0)"
        )
    repeats = check_count(repeats, "repeats")
    generator = _generator(seed)
    v = block.to(torch.promote_types(block.dtype, torch.float32))

    def step(s: LissaState) -> LissaState:
        mv = sample_mv(generator)
        if not callable(mv):
            raise TypeError(
                f"sample_mv: must return the step's Hessian operator (a callable), got {type(mv).__name__}"
            )
        h = v + (1 - damping) * s.h - mv(s.h) / scale
        update = (h - s.h).norm(dim=1)
        return LissaState(h, torch.cat([s.updates, update.unsqueeze(0)]))

    total = torch.zeros_like(v)
    last = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    diverged = torch.zeros(v.shape[0], dtype=torch.bool, device=v.device)
    for _ in range(repeats):
        start = LissaState(v, torch.zeros(0, v.shape[0], dtype=v.dtype, device=v.device))
        final = fold(step, start, depth)
        total += final.h
        last = torch.maximum(last, final.updates[-1])
        diverged |= ~torch.isfinite(final.h).all(dim=1) | _growing(final.updates)
    x = total / (repeats * scale)
    if single:
        return LissaSolution(x[0], depth, last[0], diverged[0])
    return LissaSolution(x, depth, last, diverged)


def _growing(updates: Tensor) -> Tensor:
    """Per row, whether the update norms ``(depth, k)`` show divergence (see the limits above)."""
    jumped = updates[-1] > _GROWTH_LIMIT * updates[0]
    depth = updates.shape[0]
    if depth < _TREND_MIN_STEPS:
        return jumped
    quarter = depth // 4
    late = updates[depth - quarter :].mean(0)
    earlier = updates[depth - 2 * quarter : depth - quarter].mean(0)
    return jumped | (late > _TREND_LIMIT * earlier)


def _generator(seed: Union[int, torch.Generator]) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    seed = check_count(seed, "seed", minimum=0)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator
