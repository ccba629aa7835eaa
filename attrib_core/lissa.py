"""LiSSA: a stochastic Neumann-series estimate of an inverse Hessian applied to vectors."""

from __future__ import annotations

from typing import Callable, NamedTuple, Union

import torch
from torch import Tensor

from ._checks import as_block, block_width, check_callable, check_count, check_nonnegative, check_positive
from .fold import fold

__all__ = ["LissaState", "LissaSolution", "lissa"]

# An iterate whose update grew by this factor over the first update is diverging:
# the recursion contracts when the spectrum of H_batch / scale lies in
# (-damping, 2 - damping), and then its updates shrink geometrically.
_GROWTH_LIMIT = 10.0


class LissaState(NamedTuple):
    h: Tensor  # (k, P) current h_j
    first_update: Tensor  # (k,) ||h_1 - h_0||
    last_update: Tensor  # (k,) ||h_j - h_{j-1}||
    steps: int


class LissaSolution(NamedTuple):
    """``x`` (``k, P``) estimates ``(H + damping * scale * I)^{-1} b`` for each row ``b``.

    ``steps`` is the recursion depth run (per repeat), ``last_update`` (``k,``) the
    norm of the final update of ``h`` (largest over repeats; near zero once the
    series has converged, up to mini-batch noise), and ``diverged`` (``k,``) flags
    rows whose iterates became non-finite or whose updates grew more than
    tenfold over the first update in any repeat.
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
    repeats = check_count(repeats, "repeats")
    generator = _generator(seed)
    v = block.to(torch.promote_types(block.dtype, torch.float32))

    def step(s: LissaState) -> LissaState:
        hv = sample_mv(generator)(s.h)
        h = v + (1 - damping) * s.h - hv / scale
        update = (h - s.h).norm(dim=1)
        first = update if s.steps == 0 else s.first_update
        return LissaState(h, first, update, s.steps + 1)

    total = torch.zeros_like(v)
    last = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    diverged = torch.zeros(v.shape[0], dtype=torch.bool, device=v.device)
    for _ in range(repeats):
        start = LissaState(v, torch.zeros_like(last), torch.zeros_like(last), 0)
        final = fold(step, start, depth)
        total += final.h
        last = torch.maximum(last, final.last_update)
        finite = torch.isfinite(final.h).all(dim=1)
        growing = final.last_update > _GROWTH_LIMIT * final.first_update
        diverged |= ~finite | growing
    x = total / (repeats * scale)
    return LissaSolution(x[0] if single else x, depth, last, diverged)


def _generator(seed: Union[int, torch.Generator]) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    seed = check_count(seed, "seed", minimum=0)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator
