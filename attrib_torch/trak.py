"""TRAK (Park et al., ICML 2023): projected gradients of the margin, a kernel inverse, and a reweighting."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import Tensor

from attrib_core import trak_kernel, trak_train_features, trak_weights

from .base import BaseInnerProductAttributor
from .checks import nonnegative
from .data import batch_size, batches, check_loader, explained, take
from .projection import projector_from_kwargs
from .solver_reports import record
from .task import AttributionTask

__all__ = ["TRAKAttributor"]


class TRAKAttributor(BaseInnerProductAttributor):
    """``τ = diag(Q̄) · mean_c[Φ_c (Φ_cᵀ Φ_c + λI)⁻¹ Φ_{test,c}ᵀ]``, ``(n_train, n_test)`` (:mod:`attrib_core.trak`).

    For each checkpoint ``c``: ``Φ_c`` are the projected per-example gradients of the
    task's ``loss_func`` on the training set and ``Φ_{test,c}`` those of its
    ``target_func`` on the test set, and ``Q_c = 1 - p`` with ``p`` from
    ``correct_probability_func`` on the training set. As in dattri, give TRAK's
    margin ``log(p / (1 - p))`` (the model output to explain) as ``loss_func`` and
    leave ``target_func`` to default to it; the paper uses the margin on both sides.
    As in the paper, the kernel products are averaged over checkpoints and multiplied
    by the checkpoint-averaged ``Q``.

    Args:
        task: the :class:`AttributionTask`; its ``loss_func`` (and ``target_func``) the margin.
        correct_probability_func: ``(params, batch) -> (B,)`` probabilities of the
            correct label, in ``[0, 1]`` (a function written for one example and
            returning a scalar is applied example by example).
        projector_kwargs: the projection (see :func:`projector_from_kwargs`); by
            default Rademacher to 512 dimensions (none when there are at most 512
            parameters).
        layer_name: parameters to take gradients with respect to.
        device: where to compute.
        regularization: ``λ >= 0`` added to the kernel's diagonal.

    Raises:
        ValueError: bad ``projector_kwargs``; probabilities outside ``[0, 1]`` (before
            any gradient of that checkpoint is computed).
    """

    def __init__(self, task: AttributionTask, correct_probability_func: Callable,
                 projector_kwargs: Optional[Dict[str, Any]] = None, layer_name: Union[None, str, List[str]] = None,
                 device: str = "cpu", regularization: float = 0.0, show_progress: bool = True) -> None:
        super().__init__(task, layer_name, device, show_progress)
        if not callable(correct_probability_func):
            raise TypeError("correct_probability_func: expected a callable (params, batch) -> probabilities")
        self.correct_probability_func = correct_probability_func
        self.regularization = nonnegative(regularization, "regularization")
        dim = sum(task.params(0)[n].numel() for n in self.names)
        self.projector = projector_from_kwargs(projector_kwargs, dim, default_dim=512)
        self._kernels: Dict[int, Any] = {}
        self._q: Dict[int, Tensor] = {}

    _cache_fields = BaseInnerProductAttributor._cache_fields + ("_kernels", "_q")

    def cache(self, full_train_dataloader: Any) -> None:
        """Features of the full training set, their kernel factor and ``Q``, per checkpoint.

        The probabilities of every checkpoint are checked before any gradient.
        """
        check_loader(full_train_dataloader, "full_train_dataloader")
        self.check_checkpoints()
        q = {c: self._weights(c, full_train_dataloader) for c in range(len(self.task))}
        super().cache(full_train_dataloader)
        self._q.update(q)

    def _prepare(self, ckpt_idx: int) -> None:
        features = self._features(ckpt_idx, self.full_train_dataloader)
        self._kernels[ckpt_idx] = trak_kernel(features, damping=self.regularization)
        # The cached set's training representations, from the features the kernel was built of.
        self._keep_train_reps(ckpt_idx, self.full_train_dataloader, self._kernel_solved(ckpt_idx, features))

    def _kernel_solved(self, ckpt_idx: int, features: Tensor) -> Tensor:
        solution = trak_train_features(self._kernels[ckpt_idx], features)
        record(self, solution, solver="TRAK's kernel solve", where=f"checkpoint {ckpt_idx}",
               advice=f"ΦᵀΦ + {self.regularization}·I is singular (fewer training examples than projected "
                      "dimensions); raise regularization or lower proj_dim.")
        return solution.x

    def _probabilities(self, ckpt_idx: int, loader: Any) -> Tensor:
        params = {k: v.to(self.device) for k, v in self.task.params(ckpt_idx).items()}
        parts = []
        for batch in batches(loader, self.device):
            with explained(self.correct_probability_func, params, batch, "correct_probability_func"):
                with torch.no_grad():
                    p = self.correct_probability_func(params, batch)
                    if p.dim() == 0:  # written for one example: apply it to each, as a batch of one
                        p = torch.stack([
                            self.correct_probability_func(params, take(batch, slice(i, i + 1)))
                            for i in range(batch_size(batch))
                        ])
                p = p.reshape(-1)
                if p.numel() != batch_size(batch):
                    raise ValueError(f"correct_probability_func: returned {p.numel()} probabilities for a batch "
                                     f"of {batch_size(batch)} examples; expected one per example")
            parts.append(p.double())
        return torch.cat(parts)

    def _weights(self, ckpt_idx: int, loader: Any) -> Tensor:
        """``Q = 1 - p`` of a loader's training examples at one checkpoint."""
        p = self._probabilities(ckpt_idx, loader)
        try:
            return trak_weights(p)
        except ValueError as error:
            raise ValueError(f"correct_probability_func: returned probabilities outside [0, 1] (or NaN) "
                             f"at checkpoint {ckpt_idx}") from error

    def _features(self, ckpt_idx: int, loader: Any) -> Tensor:
        """Projected training gradients ``Φ`` of a loader (of ``loss_func``: the margin), ``(n, k)``."""
        return torch.cat(list(self._grouped(loader, ckpt_idx, train=True, transform=self.transform_test_rep)))

    def _project(self, rep: Tensor) -> Tensor:
        return rep if self.projector is None else self.projector(rep)

    def transform_train_rep(self, ckpt_idx: int, train_rep: Tensor) -> Tensor:
        """``Φ (ΦᵀΦ + λI)⁻¹`` with the kernel of the cached training set."""
        return self._kernel_solved(ckpt_idx, self._project(train_rep))

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        return self._project(test_rep).double()

    def _row_scale(self, train_dataloader: Any) -> Tensor:
        """``Q̄``: ``1 - p`` of the training examples, averaged over checkpoints."""
        return sum(
            w * (self._q[c] if train_dataloader is self.full_train_dataloader else self._weights(c, train_dataloader))
            for c, w in enumerate(self.checkpoint_weights())
        )

    def attribute(self, test_dataloader: Any, train_dataloader: Any = None) -> Tensor:
        """Scores ``(n_train, n_test)``; the training set is the cached one unless ``train_dataloader`` is given.

        Note the argument order (test first), as in dattri.
        """
        check_loader(test_dataloader, "test_dataloader")
        loader = self._training_loader(train_dataloader)
        q = self._row_scale(loader)  # probabilities checked before any gradient
        return (self._scores(loader, test_dataloader) * q.unsqueeze(1)).to(torch.float32)

    def self_attribute(self, train_dataloader: Any = None) -> Tensor:
        """``(n_train,)``: the diagonal of ``attribute(train, train)``."""
        loader = self._training_loader(train_dataloader)
        q = self._row_scale(loader)  # probabilities checked before any gradient
        return (super().self_attribute(loader) * q).to(torch.float32)
