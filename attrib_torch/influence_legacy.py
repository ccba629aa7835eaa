"""dattri's earlier influence entry point, ``IFAttributor(target_func, params, ihvp_solver, ...)``.

Here ``target_func(params, dataloader)`` computes the loss over a whole loader.
The class is a thin front over the same code as the task-based attributors: the
same settings objects (:mod:`attrib_torch.inverses`: dattri's argument names,
defaults and checks), fitted on the same batch-by-batch training loss (here
``target_func`` on a loader of one batch), reporting through the same warning;
test and training gradients are those of ``target_func`` on one-example loaders.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import Tensor

from attrib_core import ravel

from .base import BaseAttributor
from .data import batch_size, batches, check_loader, take
from .inverses import INVERSES, settings_of, solved, training_loss

__all__ = ["IFAttributor"]

_SOLVERS = ("explicit", "cg", "arnoldi", "lissa")


class IFAttributor(BaseAttributor):
    """Influence ``g_iᵀ (H + λI)⁻¹ g_j`` with ``target_func(params, dataloader)`` as the training loss.

    Args:
        target_func: ``(params, dataloader) -> scalar``; ``params`` is a dict.
        params: the parameters to attribute with respect to.
        ihvp_solver: ``"explicit"``, ``"cg"``, ``"arnoldi"`` or ``"lissa"``.
        ihvp_kwargs: the solver's settings, named and defaulted as the arguments of
            ``IFAttributorExplicit`` / ``CG`` / ``Arnoldi`` / ``LiSSA``: ``regularization``;
            ``max_iter``, ``tol``, ``mode``, ``regularization`` (cg); ``proj_dim``, ``max_iter``,
            ``tol``, ``regularization``, ``seed``, ``precompute_data_ratio`` (arnoldi);
            ``batch_size``, ``num_repeat``, ``recursion_depth``, ``damping``, ``scaling``,
            ``mode``, ``seed`` (lissa).
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
        allowed = settings_of(INVERSES[ihvp_solver])
        unknown = set(self.ihvp_kwargs) - set(allowed)
        if unknown:
            raise ValueError(f"ihvp_kwargs: {sorted(unknown)} are not settings of {ihvp_solver!r}; "
                             f"allowed: {sorted(allowed)}")
        self.inverse = INVERSES[ihvp_solver](**self.ihvp_kwargs)  # the IFAttributor* classes' checks and defaults
        self._inverse: Optional[Callable[[Tensor], Tensor]] = None
        self.full_train_dataloader = None

    def cache(self, full_train_dataloader: Any) -> None:
        """Fit ``(H + λI)⁻¹`` (or its action) on the full training loader, as the ``IFAttributor*`` classes do."""
        check_loader(full_train_dataloader, "full_train_dataloader")
        self.full_train_dataloader = full_train_dataloader

        def loss(params: Mapping[str, Tensor], batch: Any) -> Tensor:
            return self.target_func(params, [batch])

        fitted = self.inverse.fit(training_loss(loss, self.params, full_train_dataloader, self.device))
        solve = getattr(fitted, "solve", fitted)  # Arnoldi's spectral projector, or a solve
        self._inverse = lambda V: solved(self, solve, V, self.inverse, "IFAttributor")

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
