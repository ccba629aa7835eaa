"""TracIn and its relatives (Pruthi et al., NeurIPS 2020): Grad-Dot, Grad-Cos, CosIn."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .base import BaseInnerProductAttributor
from .data import check_loader
from .projection import projector_from_kwargs
from .task import AttributionTask

__all__ = ["TracInAttributor"]


class TracInAttributor(BaseInnerProductAttributor):
    """``score[i, j] = Σ_c w_c ⟨P g_i^c, P g_j^c⟩`` over checkpoints ``c``.

    ``g_i^c`` is the gradient of ``loss_func`` on training example ``i`` at checkpoint
    ``c``, ``g_j^c`` that of ``target_func`` on test example ``j``, ``P`` an optional
    random projection. TracIn/TracInCP: the learning rates as ``weight_list``;
    Grad-Dot: one checkpoint, weight 1; with ``normalized_grad`` the gradients are
    unit-normalised (after projection): CosIn, Grad-Cos. Training gradients are
    computed once per checkpoint and kept.

    Args:
        task: the :class:`AttributionTask` (its checkpoints in training order).
        weight_list: one weight per checkpoint.
        normalized_grad: cosine instead of inner product.
        projector_kwargs: a random projection (see :func:`projector_from_kwargs`); None
            (the default) projects nothing, so the scores are exact (dattri always
            projects to 512 dimensions).
        layer_name: parameters to take gradients with respect to.
        device: where to compute.

    Raises:
        ValueError: ``weight_list`` does not have one entry per checkpoint, or bad
            ``projector_kwargs`` (before any gradient).
    """

    def __init__(self, task: AttributionTask, weight_list: Union[Tensor, Sequence[float]], normalized_grad: bool,
                 projector_kwargs: Optional[Dict[str, Any]] = None, layer_name: Union[None, str, List[str]] = None,
                 device: str = "cpu", show_progress: bool = True) -> None:
        super().__init__(task, layer_name, device, show_progress)
        weights = torch.as_tensor(weight_list, dtype=torch.float64).reshape(-1)
        if weights.numel() != len(task):
            raise ValueError(
                f"weight_list: expected one weight per checkpoint ({len(task)}), got {weights.numel()}"
            )
        if not bool(torch.isfinite(weights).all()):
            raise ValueError("weight_list: contains NaN or Inf")
        self.weight_list = weights
        self.normalized_grad = bool(normalized_grad)
        dim = sum(task.params(0)[n].numel() for n in self.names)
        self.projector = projector_from_kwargs(projector_kwargs, dim)

    def checkpoint_weights(self) -> List[float]:
        return self.weight_list.tolist()

    def cache(self, full_train_dataloader: Any = None) -> None:
        """Keep the training loader; nothing else needs precomputing (gradients are kept on first use)."""
        if full_train_dataloader is not None:
            check_loader(full_train_dataloader, "full_train_dataloader")
        self.full_train_dataloader = full_train_dataloader
        self._train_reps.clear()

    def _ensure_cached(self, train_dataloader: Any) -> None:
        if self.full_train_dataloader is None:
            self.full_train_dataloader = train_dataloader

    def _represent(self, rep: Tensor) -> Tensor:
        if self.projector is not None:
            rep = self.projector(rep)
        if self.normalized_grad:
            rep = rep / rep.norm(dim=1, keepdim=True).clamp(min=torch.finfo(rep.dtype).tiny)
        return rep

    def transform_train_rep(self, ckpt_idx: int, train_rep: Tensor) -> Tensor:
        return self._represent(train_rep)

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        return self._represent(test_rep)
