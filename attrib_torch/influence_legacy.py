"""dattri's earlier influence entry point, ``IFAttributor(target_func, params, ihvp_solver, ...)``.

Here ``target_func(params, dataloader)`` computes the loss over a whole loader.
The class is a thin front over the same solvers as the task-based attributors:
the Hessian (or its products) of ``target_func`` on the cached training loader,
and per-example gradients of ``target_func`` on one-example loaders.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import Tensor

from attrib_core import (
    arnoldi,
    cg,
    factor_explicit,
    hessian,
    lissa,
    make_hvp,
    ravel,
    spectral_projector,
)

from .base import BaseAttributor
from .data import batch_size, batches, check_loader, take
from .solver_reports import record

__all__ = ["IFAttributor"]

_SOLVERS = ("explicit", "cg", "arnoldi", "lissa")


class IFAttributor(BaseAttributor):
    """Influence ``g_iᵀ (H + λI)⁻¹ g_j`` with ``target_func(params, dataloader)`` as the training loss.

    Args:
        target_func: ``(params, dataloader) -> scalar``; ``params`` is a dict.
        params: the parameters to attribute with respect to.
        ihvp_solver: ``"explicit"``, ``"cg"``, ``"arnoldi"`` or ``"lissa"``.
        ihvp_kwargs: the solver's settings: ``regularization`` (all), ``max_iter``, ``tol``,
            ``mode`` (cg), ``proj_dim``, ``max_iter``, ``tol``, ``seed`` (arnoldi),
            ``recursion_depth``, ``scaling``, ``damping``, ``num_repeat``, ``seed`` (lissa).
        device: where to compute.
    """

    def __init__(self, target_func: Callable, params: Mapping[str, Tensor], ihvp_solver: str = "explicit",
                 ihvp_kwargs: Optional[Dict[str, Any]] = None, device: str = "cpu") -> None:
        if not callable(target_func):
            raise TypeError("target_func: expected a callable (params, dataloader) -> scalar")
        if ihvp_solver not in _SOLVERS:
            raise ValueError(f"ihvp_solver: expected one of {_SOLVERS}, got {ihvp_solver!r}")
        self.target_func = target_func
        self.device = torch.device(device)
        self.params = {k: v.detach().to(self.device) for k, v in params.items()}
        self.ihvp_solver = ihvp_solver
        self.ihvp_kwargs = dict(ihvp_kwargs or {})
        allowed = {
            "explicit": {"regularization"},
            "cg": {"regularization", "max_iter", "tol", "mode"},
            "arnoldi": {"regularization", "proj_dim", "max_iter", "tol", "seed"},
            "lissa": {"recursion_depth", "scaling", "damping", "num_repeat", "seed", "mode"},
        }[ihvp_solver]
        unknown = set(self.ihvp_kwargs) - allowed
        if unknown:
            raise ValueError(f"ihvp_kwargs: {sorted(unknown)} are not settings of {ihvp_solver!r}; allowed: {sorted(allowed)}")
        self._inverse: Optional[Callable[[Tensor], Tensor]] = None
        self.full_train_dataloader = None

    def cache(self, full_train_dataloader: Any) -> None:
        """Build ``(H + λI)⁻¹`` (or its action) from the full training loader."""
        check_loader(full_train_dataloader, "full_train_dataloader")
        self.full_train_dataloader = full_train_dataloader
        kw = self.ihvp_kwargs
        loader, f, params = full_train_dataloader, self.target_func, self.params
        dim = ravel(params)[0].numel()
        if self.ihvp_solver == "explicit":
            factor = factor_explicit(hessian(f, params, loader), damping=kw.get("regularization", 0.0))
            def solve_direct(V: Tensor) -> Tensor:
                solution = factor.solve(V)
                record(self, solution, solver="the explicit solve", where="IFAttributor",
                       advice="H + regularization·I is not positive definite; raise regularization.")
                return solution.x

            self._inverse = solve_direct
        elif self.ihvp_solver == "cg":
            mv = make_hvp(f, params, loader, mode=kw.get("mode", "rev-rev"))
            def solve_cg(V: Tensor) -> Tensor:
                solution = cg(mv, V, tol=0.0, atol=kw.get("tol", 1e-7), max_steps=kw.get("max_iter", 10),
                              damping=kw.get("regularization", 0.0))
                record(self, solution, solver="CG", where="IFAttributor",
                       advice="Raise max_iter or regularization.")
                return solution.x

            self._inverse = solve_cg
        elif self.ihvp_solver == "arnoldi":
            top = kw.get("proj_dim", 100)
            result = arnoldi(make_hvp(f, params, loader), dim, max_steps=max(kw.get("max_iter", 100), top),
                             top_k=min(top, dim), tol=kw.get("tol", 1e-7), seed=kw.get("seed", 0),
                             device=self.device)
            projector = spectral_projector(result.eigenvalues, result.eigenvectors,
                                           damping=kw.get("regularization", 0.0))
            self._inverse = lambda V: projector.solve(V).x
        else:
            parts = [[batch] for batch in batches(loader, self.device)]

            def sample_mv(generator: torch.Generator):
                index = int(torch.randint(0, len(parts), (1,), generator=generator))
                return make_hvp(f, params, parts[index], mode=kw.get("mode", "rev-rev"))

            def solve_lissa(V: Tensor) -> Tensor:
                scale = kw.get("scaling", 50.0)
                solution = lissa(sample_mv, V, max_steps=kw.get("recursion_depth", 5000), scale=scale,
                                 damping=kw.get("damping", 0.0) * scale, repeats=kw.get("num_repeat", 1),
                                 seed=kw.get("seed", 0))
                record(self, solution, solver="LiSSA", where="IFAttributor",
                       advice="Raise scaling, recursion_depth or damping.")
                return solution.x

            self._inverse = solve_lissa

    def clear_cache(self) -> None:
        """Forget the cached loader and the inverse built from it."""
        self.full_train_dataloader = None
        self._inverse = None

    def _gradients(self, loader: Any) -> Tensor:
        """Per-example gradients of ``target_func`` on one-example loaders, ``(n, P)``."""
        grad = torch.func.grad(self.target_func)
        rows = []
        for batch in batches(loader, self.device):
            for i in range(batch_size(batch)):
                single = [take(batch, slice(i, i + 1))]
                rows.append(ravel(grad(self.params, single))[0])
        return torch.stack(rows)

    def attribute(self, train_dataloader: Any, test_dataloader: Any) -> Tensor:
        """Scores ``(n_train, n_test)``; caches with ``train_dataloader`` if :meth:`cache` was not called."""
        check_loader(train_dataloader, "train_dataloader")
        check_loader(test_dataloader, "test_dataloader")
        if self._inverse is None:
            self.cache(train_dataloader)
        train, test = self._gradients(train_dataloader), self._gradients(test_dataloader)
        return train @ self._inverse(test).T

    def self_attribute(self, train_dataloader: Any = None) -> Tensor:
        """``(n_train,)``: each training example's influence on itself."""
        loader = train_dataloader if train_dataloader is not None else self.full_train_dataloader
        if loader is None:
            raise ValueError("train_dataloader: none given and cache() has not been called")
        if self._inverse is None:
            self.cache(loader)
        grads = self._gradients(loader)
        return (grads * self._inverse(grads)).sum(1)
