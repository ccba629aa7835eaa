"""attrib_core: the functional core of the attribution library.

Pure functions in the style of JAX: per-sample gradients, curvature operators,
iterative solvers written as folds over NamedTuple state. Nothing here keeps
state between calls. See ``DESIGN.md`` for the conventions (parameters as
``dict[str, Tensor]``, operators as ``mv(V)`` on ``(k, P)`` blocks, explicit seeds).
"""

from .cg import CGSolution, CGState, cg
from .curvature import fvp, gnvp, hessian, hvp, make_fvp, make_gnvp, make_hvp
from .fold import fold
from .gradients import per_sample_grad, per_sample_grad_loop
from .lissa import LissaSolution, LissaState, lissa
from .solve_explicit import (
    ExplicitFactor,
    ExplicitSolution,
    factor_explicit,
    solve_explicit,
    solve_factored,
)
from .trees import ravel, select

__all__ = [
    "ravel",
    "select",
    "per_sample_grad",
    "per_sample_grad_loop",
    "hvp",
    "make_hvp",
    "gnvp",
    "make_gnvp",
    "fvp",
    "make_fvp",
    "hessian",
    "fold",
    "solve_explicit",
    "factor_explicit",
    "solve_factored",
    "ExplicitFactor",
    "ExplicitSolution",
    "cg",
    "CGState",
    "CGSolution",
    "lissa",
    "LissaState",
    "LissaSolution",
]
