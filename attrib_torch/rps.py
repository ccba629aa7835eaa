"""Representer point selection (Yeh, Kim, Yen & Ravikumar, NeurIPS 2018)."""

from __future__ import annotations

from typing import Any, Mapping, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

import kernels
from attrib_core import (
    fit_final_layer,
    label_columns,
    representer_scores,
    representer_self_scores,
    representer_targets,
    representer_weights,
)
from kernels import TopK

from .base import BaseAttributor
from .checks import flag, positive, positive_int
from .data import batches, check_loader, fingerprint
from .task import AttributionTask

__all__ = ["RPSAttributor"]

_FIT_TO = ("labels", "predictions")


class RPSAttributor(BaseAttributor):
    """Scores ``α_i[y_t] · ⟨f_i, f_t⟩``: the representer decomposition of the final layer (:mod:`attrib_core.representer`).

    The final linear layer (``W``, and its bias as the weight of an appended 1) is
    fine-tuned on the training features ``f_i`` (the layer's inputs) to a stationary
    point of ``mean_i L(W f_i, t_i) + l2_strength · ‖W‖²``, where the targets ``t_i`` are
    the labels ``y_i`` or (``fit_to="predictions"``, as in the RPS paper's code) the
    model's own predicted distribution. There
    ``W = Σ_i α_i f_iᵀ`` with ``α_i = -∂L_i/∂(W f_i) / (2 · l2_strength · n)``, so every
    test logit splits exactly over the training examples; ``score[i, t]`` is training
    example ``i``'s share of test example ``t``'s logit for its label ``y_t``.

    Args:
        task: the :class:`AttributionTask`; its ``target_func(logits, labels)`` is the loss
            of the final layer's outputs, a mean over examples (as in dattri:
            cross-entropy, say). Batches are ``(inputs, ..., labels)``.
        final_linear_layer_name: module name of the final ``nn.Linear`` (nested names work).
        normalize_preactivate: use unit-norm features.
        l2_strength: ``> 0``.
        epoch: L-BFGS iterations of the fine-tuning (at most).
        device: where to compute.
        fit_to: ``"labels"`` (the default) or ``"predictions"``: the softmax of the
            layer's original outputs (a sigmoid for a single output), so the surrogate
            explains the model rather than the data; ``target_func`` must then take
            probabilities as targets (``nn.functional.cross_entropy`` does).

    Raises:
        ValueError: the task has more than one checkpoint; the named module is missing or
            is not an ``nn.Linear``; ``l2_strength <= 0``; ``fit_to`` is neither choice.
    """

    def __init__(self, task: AttributionTask, final_linear_layer_name: str, normalize_preactivate: bool = False,
                 l2_strength: float = 0.003, epoch: int = 3000, device: str = "cpu",
                 fit_to: str = "labels") -> None:
        if len(task) != 1:
            raise ValueError(f"task: RPS explains one model, so it takes one checkpoint; got {len(task)} ; the "
                             "representer decomposition of an ensemble is not the mean of its members'")
        modules = dict(task.get_model().named_modules())
        if final_linear_layer_name not in modules:
            raise ValueError(
                f"final_linear_layer_name: {final_linear_layer_name!r} is not a module; modules: "
                f"{[n for n in modules if n]}"
            )
        layer = modules[final_linear_layer_name]
        if not isinstance(layer, nn.Linear):
            raise ValueError(
                f"final_linear_layer_name: {final_linear_layer_name!r} is a {type(layer).__name__}, not an nn.Linear"
            )
        positive(l2_strength, "l2_strength")
        positive_int(epoch, "epoch")
        if fit_to not in _FIT_TO:
            raise ValueError(f"fit_to: expected one of {_FIT_TO}, got {fit_to!r}")
        self.task = task
        self.layer_name = final_linear_layer_name
        self.has_bias = layer.bias is not None
        self.normalize_preactivate = flag(normalize_preactivate, "normalize_preactivate")
        self.l2_strength = float(l2_strength)
        self.epoch = epoch
        self.fit_to = fit_to
        self.device = torch.device(device)
        self.full_train_dataloader: Any = None
        self.weight: Tensor | None = None  # fine-tuned [W | b], (C, d + 1); W alone without a bias
        self.alpha: Tensor | None = None  # (n_train, C)
        self._train_features: Tensor | None = None
        self._cache_key: Any = None

    def clear_cache(self) -> None:
        """Forget the fine-tuned layer and the representer weights."""
        self.full_train_dataloader = None
        self.weight = self.alpha = self._train_features = self._cache_key = None

    def _features(self, loader: Any) -> Tuple[Tensor, Tensor]:
        """The final layer's inputs (with an appended 1 when it has a bias) and the labels, over a loader."""
        features, labels, _ = self._layer_io(loader)
        return features, labels

    def _layer_io(self, loader: Any) -> Tuple[Tensor, Tensor, Tensor]:
        """:meth:`_features` and the fine-tuning's targets (:meth:`_targets`) over a loader."""
        model = self.task.get_model().to(self.device)
        params = {k: v.to(self.device) for k, v in self.task.params(0).items()}
        layer = model.get_submodule(self.layer_name)
        feats, labels, outputs = [], [], []
        for batch in batches(loader, self.device):
            if isinstance(batch, Mapping):
                raise ValueError("RPSAttributor: batches must be tuples (inputs, ..., labels), the model taking "
                                 "the inputs; a dict batch names neither")
            seen = {}

            def keep(module, args, out):
                seen["x"], seen["out"] = args[0].detach(), out.detach()

            handle = layer.register_forward_hook(keep)
            try:
                with torch.no_grad():
                    functional_call(model, params, (batch[0],))
            finally:
                handle.remove()
            f = seen["x"].reshape(seen["x"].shape[0], -1).double()
            if self.normalize_preactivate:
                f = f / f.norm(dim=1, keepdim=True).clamp(min=torch.finfo(f.dtype).tiny)
            if self.has_bias:  # the bias is the weight of an appended constant 1
                f = torch.cat([f, torch.ones(f.shape[0], 1, dtype=f.dtype, device=f.device)], dim=1)
            feats.append(f)
            labels.append(batch[-1])
            outputs.append(seen["out"].reshape(f.shape[0], -1).double())
        labels = torch.cat(labels)
        return torch.cat(feats), labels, representer_targets(labels, torch.cat(outputs), fit_to=self.fit_to)

    def cache(self, full_train_dataloader: Any) -> None:
        """Fine-tune the final layer on the training features and compute the representer weights ``α``."""
        check_loader(full_train_dataloader, "full_train_dataloader")
        self.clear_cache()
        self.full_train_dataloader = full_train_dataloader
        self._cache_key = fingerprint(full_train_dataloader)
        features, labels, targets = self._layer_io(full_train_dataloader)
        layer_params = self.task.params(0)
        prefix = f"{self.layer_name}." if self.layer_name else ""  # "" : the model is the layer
        weight = layer_params[prefix + "weight"].to(self.device).double()
        if self.has_bias:
            bias = layer_params[prefix + "bias"].to(self.device).double()
            weight = torch.cat([weight, bias[:, None]], dim=1)
        self.weight = fit_final_layer(self.task.target_func, features, targets, weight, l2=self.l2_strength,
                                      max_steps=self.epoch)
        self._train_features = features
        self.alpha = self._alpha_for(features, targets)

    def _ensure_cached(self, train_dataloader: Any) -> None:
        if self.alpha is None:
            self.cache(train_dataloader)
        elif fingerprint(self.full_train_dataloader) != self._cache_key:  # the cached data changed in place
            self.cache(self.full_train_dataloader)

    def attribute(self, train_dataloader: Any, test_dataloader: Any) -> Tensor:
        """Scores ``(n_train, n_test)``: each training example's share of each test example's label logit."""
        check_loader(train_dataloader, "train_dataloader")
        check_loader(test_dataloader, "test_dataloader")
        self._ensure_cached(train_dataloader)
        train_features, alpha = self._train_side(train_dataloader)
        test_features, test_labels = self._features(test_dataloader)
        return representer_scores(train_features, alpha, test_features, test_labels).to(torch.float32)

    def _train_side(self, loader: Any) -> Tuple[Tensor, Tensor]:
        """Features and representer weights of a training loader (kept for the cached one)."""
        if loader is self.full_train_dataloader and fingerprint(loader) == self._cache_key:
            return self._train_features, self.alpha
        features, _, targets = self._layer_io(loader)
        return features, self._alpha_for(features, targets)

    def _alpha_for(self, features: Tensor, targets: Tensor) -> Tensor:
        """The representer weights of a loader's rows, ``n`` the cached training set's size."""
        return representer_weights(self.task.target_func, features, targets, self.weight, l2=self.l2_strength,
                                   n=self._train_features.shape[0])

    def self_attribute(self, train_dataloader: Any = None) -> Tensor:
        """``(n_train,)``: each training example's share of its own label logit."""
        loader = train_dataloader if train_dataloader is not None else self.full_train_dataloader
        if loader is None:
            raise ValueError("train_dataloader: none given and cache() has not been called")
        self._ensure_cached(loader)
        features, labels, targets = self._layer_io(loader)
        return representer_self_scores(features, self._alpha_for(features, targets), labels).to(torch.float32)

    def topk(self, test_dataloader: Any, k: int, proponents: bool = True, train_dataloader: Any = None) -> TopK:
        """For each test example, the ``k`` training examples with the largest (smallest) representer values.

        A test example of label ``c`` scores ``⟨α_{:,c} ⊙ f_i, f_t⟩``: the test set is split
        by label and each part streamed through :func:`kernels.topk_inner`, so the full
        matrix is never formed.
        """
        loader = train_dataloader if train_dataloader is not None else self.full_train_dataloader
        if loader is None:
            raise ValueError("train_dataloader: none given and cache() has not been called")
        check_loader(loader, "train_dataloader")
        check_loader(test_dataloader, "test_dataloader")
        self._ensure_cached(loader)
        train_features, alpha = self._train_side(loader)
        test_features, test_labels = self._features(test_dataloader)
        values = torch.empty(len(test_labels), k, dtype=train_features.dtype, device=train_features.device)
        indices = torch.empty(len(test_labels), k, dtype=torch.long, device=train_features.device)
        for label in test_labels.unique().tolist():
            rows = (test_labels == label).nonzero().flatten()
            weights = label_columns(alpha, torch.tensor([label]))
            top = kernels.topk_inner(train_features * weights, test_features[rows], k, largest=proponents)
            values[rows], indices[rows] = top.values, top.indices
        return TopK(values.to(torch.float32), indices)
