"""One place where solvers' failures reach the user: a warning per solve, with counts and the residual reached."""

from __future__ import annotations

from attrib_core import CGSolution, LissaSolution

from .user_warning import warn

__all__ = ["report_cg", "report_lissa"]


def report_cg(solution: CGSolution, where: str, *, max_iter: int, tol: float) -> None:
    """Warn when some right-hand sides did not reach the tolerance, naming how many and the largest residual."""
    unsolved = ~solution.converged.reshape(-1)
    if bool(unsolved.any()):
        residual = float(solution.residual_norm.reshape(-1)[unsolved].max())
        warn(f"{where}: CG did not converge for {int(unsolved.sum())} of {unsolved.numel()} examples solved in "
             f"max_iter={max_iter} steps (largest residual norm {residual:.3g}, tol {tol:g}); their scores are "
             "approximate. Raise max_iter or regularization")


def report_lissa(solution: LissaSolution, where: str) -> None:
    """Warn when some right-hand sides diverged, naming how many and the largest last update."""
    diverged = solution.diverged.reshape(-1)
    if bool(diverged.any()):
        update = float(solution.last_update.reshape(-1)[diverged].max())
        warn(f"{where}: LiSSA diverged for {int(diverged.sum())} of {diverged.numel()} examples solved (largest "
             f"last update norm {update:.3g} after {solution.steps} steps); raise scaling (above the largest "
             "Hessian eigenvalue) or damping")
