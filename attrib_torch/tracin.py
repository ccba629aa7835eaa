"""TracIn and its relatives (Pruthi et al., NeurIPS 2020): Grad-Dot, Grad-Cos, CosIn."""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from attrib_core import exact_factors, factored_dense, factored_plan, rep_normalized

from .base import BaseInnerProductAttributor
from .checks import flag
from .data import batch_size, batches, check_loader, take
from .guard import PUBLIC_METHODS, untouched
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

    Without a projection, when every chosen parameter belongs to an ``nn.Linear`` or
    ``nn.Conv2d`` layer and the factored products are cheaper, gradients are kept as
    their factors (layer inputs and the output gradients of each example's own loss,
    :func:`attrib_core.capture_per_example`) and inner products are exact without
    forming per-example gradients. The factors are those of presenting each example
    as a batch of one, for every batch and whatever the loss normalises by; a loss
    that reads a factored weight outside its layer (an L2 penalty, tied weights), a
    layer that runs twice, or a model ``vmap`` cannot trace keeps the ordinary path
    (also when only a later batch shows it: the call is then redone on that path).

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
        weights = _weights(weight_list)
        if weights.numel() != len(task):
            raise ValueError(
                f"weight_list: expected one weight per checkpoint ({len(task)}), got {weights.numel()}"
            )
        if not bool(torch.isfinite(weights).all()):
            raise ValueError("weight_list: contains NaN or Inf")
        self.weight_list = weights
        self.normalized_grad = flag(normalized_grad, "normalized_grad")
        dim = sum(task.params(0)[n].numel() for n in self.names)
        self.projector = projector_from_kwargs(projector_kwargs, dim)
        # None: not decided yet; False: ordinary gradients; else the factored layers.
        # (Forming projected gradients from factors measured no faster than vmap on a 1.1M-parameter MLP.)
        self._factored: Any = None if self.projector is None else False
        self._unfactored_for_stores = False  # _factored was set False because cache() was given stores

    def checkpoint_weights(self) -> List[float]:
        return self.weight_list.tolist()

    def cache(self, full_train_dataloader: Any = None, stores: Any = None, *, distributed: bool = False) -> None:
        """Keep the training loader; nothing else needs precomputing (gradients are kept on first use).

        ``stores``: one :class:`attrib_torch.FeatureStore` per checkpoint of this attributor's
        (projected) gradients over the loader's dataset (:meth:`build_store`), read in their place;
        ``distributed`` as the base's (:meth:`topk` over the stores shared out over the ranks).
        """
        if full_train_dataloader is not None:
            check_loader(full_train_dataloader, "full_train_dataloader")
        self.check_checkpoints()
        if stores is not None:
            if full_train_dataloader is None:
                raise ValueError("stores: give the training loader they were built over")
            self._check_stores(full_train_dataloader, stores)
        self.clear_cache()
        self.full_train_dataloader = full_train_dataloader
        self._stores = {} if stores is None else dict(enumerate(stores))
        self._distributed = bool(distributed)
        if stores is not None:
            self._factored = False  # the stored representations are explicit (projected) gradients
        elif self._unfactored_for_stores:
            self._factored = None  # decided again on first use: no store's explicit gradients to match
        self._unfactored_for_stores = stores is not None and self.projector is None

    @property
    def rep_width(self) -> int:
        return self._width if self.projector is None else self.projector.dim_out

    def store_description(self, ckpt_idx: int) -> Dict[str, Any]:
        """The base's, with the projection (kind, seed, nnz, output dims); stored gradients are never factored."""
        p = self.projector
        return {**super().store_description(ckpt_idx),
                "projection": None if p is None else {"kind": p.kind, "seed": p.seed, "nnz": p.nnz,
                                                      "dim": p.dim_out}}

    def stored_rep(self, ckpt_idx: int, data: Any) -> Tensor:
        """The projected gradients (before the unit normalisation of ``normalized_grad``)."""
        rep = self.generate_train_rep(ckpt_idx, data)
        return rep if self.projector is None else self.projector(rep)

    def transform_stored_rep(self, ckpt_idx: int, rows: Tensor) -> Tensor:
        return rep_normalized(rows) if self.normalized_grad else rows

    def build_store(self, path: Any, dataset: Any, **kwargs: Any) -> Any:
        """As the base's; the gradients are formed explicitly (a store holds rows, not factors)."""
        saved, self._factored = self._factored, False
        try:
            return super().build_store(path, dataset, **kwargs)
        finally:
            self._factored = saved

    def _ensure_cached(self, train_dataloader: Any) -> None:
        if self.full_train_dataloader is None:
            self.cache(train_dataloader)

    # -- factored gradients -----------------------------------------------------------------

    def _decide_factored(self, ckpt_idx: int, data: tuple) -> None:
        """Take the factored path where :func:`attrib_core.factored_plan` finds it exact and cheaper."""
        chosen, fixed = self._split_params(ckpt_idx)
        head = take(data, slice(0, min(8, batch_size(data))))
        plan = factored_plan(self.task.get_model(), (self.task.loss_func, self.task.target_func),
                             {**fixed, **chosen}, self.names, head)
        self._factored = plan if plan is not None else False

    def _generate(self, ckpt_idx: int, data: tuple, which: str) -> Any:
        if self._factored is None:
            self._decide_factored(ckpt_idx, data)
        if not self._factored:
            return None
        func = self.task.loss_func if which == "train" else self.task.target_func
        chosen, fixed = self._split_params(ckpt_idx)
        try:
            return exact_factors(self.task.get_model(), func, {**fixed, **chosen}, data, self._factored)
        except Exception as error:  # noqa: BLE001 - this batch cannot be factored exactly: redo the call unfactored
            raise _Unfactorable(error) from error

    def generate_train_rep(self, ckpt_idx: int, data: tuple) -> Any:
        """Per-example loss gradients ``(B, P)``, or their factors on the factored path."""
        rep = self._factors_or_none(ckpt_idx, data, "train")
        return super().generate_train_rep(ckpt_idx, data) if rep is None else rep

    def generate_test_rep(self, ckpt_idx: int, data: tuple) -> Any:
        """Per-example target gradients ``(B, P)``, or their factors on the factored path."""
        rep = self._factors_or_none(ckpt_idx, data, "test")
        return super().generate_test_rep(ckpt_idx, data) if rep is None else rep

    def _factors_or_none(self, ckpt_idx: int, data: tuple, which: str) -> Any:
        try:
            return self._generate(ckpt_idx, data, which)
        except _Unfactorable:
            if getattr(self, "_in_public_call", False):
                raise  # the public call is redone without factors, from its first batch
            self._factored = False  # called directly: this batch and later ones get explicit gradients
            self._train_reps.clear()
            return None

    def gradients(self, ckpt_idx: int, loader: Any) -> Tensor:
        """``(n, D)``: the explicit training-loss gradients of a loader's examples, as the scores use them.

        Projected (and unit-normalised with ``normalized_grad``) like the
        representations whose inner products are the scores; formed from the factors
        on the factored path.
        """
        check_loader(loader, "loader")
        parts = []
        with untouched(self.task):
            for batch in batches(loader, self.device):
                rep = self.generate_train_rep(ckpt_idx, batch)
                if self._factored:
                    rep = factored_dense(rep, self._factored, self.names)
                parts.append(self._represent(rep))
        return torch.cat(parts)

    def _represent(self, rep: Any) -> Any:
        """Projected (never on the factored path: it exists only without a projection), then unit rows for cosines."""
        if self.projector is not None:
            rep = self.projector(rep)
        return rep_normalized(rep) if self.normalized_grad else rep

    def transform_train_rep(self, ckpt_idx: int, train_rep: Tensor) -> Tensor:
        return self._represent(train_rep)

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        return self._represent(test_rep)



def _weights(weight_list: Any) -> Tensor:
    """``weight_list`` as a float64 vector, or a TypeError naming it."""
    if isinstance(weight_list, (str, bytes)) or not isinstance(weight_list, (Tensor, Sequence)):
        raise TypeError(f"weight_list: expected a tensor or a sequence of numbers, one per checkpoint, "
                        f"got {type(weight_list).__name__} {weight_list!r}")
    try:
        return torch.as_tensor(weight_list, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"weight_list: expected numbers, one per checkpoint, got {weight_list!r}") from error


class _Unfactorable(Exception):
    """A batch after the first could not be factored exactly; the public call is redone without factors."""


def _redone_unfactored(method):
    """Run a public method; if a batch could not be factored, drop the factors and run it again."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except _Unfactorable:
            self._factored = False
            self._train_reps.clear()
            return method(self, *args, **kwargs)

    return run


for _name in PUBLIC_METHODS + ("gradients",):
    if _name != "cache":
        setattr(TracInAttributor, _name, _redone_unfactored(getattr(TracInAttributor, _name)))
