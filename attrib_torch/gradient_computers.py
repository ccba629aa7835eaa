"""TRAK's gradient-computer API: per-example gradients of a model output function, vectorised or looped.

Names and methods as TRAK users know them (``FunctionalGradientComputer``,
``IterativeGradientComputer``, ``load_model_params``, ``compute_per_sample_grad``,
``compute_loss_grad``), over a model-output abstraction with ``get_output`` and
``get_out_to_loss_grad``. One difference, the library's data convention: each
example reaches ``get_output`` as a batch of one (with its batch dimension).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from attrib_core import per_sample_grad, per_sample_grad_loop

__all__ = [
    "AbstractModelOutput",
    "ImageClassificationModelOutput",
    "AbstractGradientComputer",
    "FunctionalGradientComputer",
    "IterativeGradientComputer",
]


class AbstractModelOutput(ABC):
    """The function of the model that is attributed, and the gradient of the loss with respect to it."""

    @abstractmethod
    def get_output(self, model: nn.Module, weights: Dict[str, Tensor], buffers: Dict[str, Tensor],
                   *batch: Tensor) -> Tensor:
        """The output summed over the batch (for a batch of one: that example's output)."""

    @abstractmethod
    def get_out_to_loss_grad(self, model: nn.Module, weights: Dict[str, Tensor], buffers: Dict[str, Tensor],
                             batch: Iterable[Tensor]) -> Tensor:
        """``∂ loss / ∂ output`` for each example, ``(B, 1)``."""


class ImageClassificationModelOutput(AbstractModelOutput):
    """TRAK's classification margin ``log(p / (1 - p))`` and its out-to-loss gradient ``1 - p``.

    ``margin = logit_y - logsumexp_{c ≠ y} logit_c``; with cross-entropy loss,
    ``∂ loss / ∂ margin = -(1 - p_y)``, whose magnitude TRAK uses as ``Q``.
    """

    def get_output(self, model, weights, buffers, image, label) -> Tensor:
        logits = functional_call(model, (weights, buffers), (image,))
        correct = logits.gather(1, label.reshape(-1, 1)).squeeze(1)
        others = logits.scatter(1, label.reshape(-1, 1), float("-inf"))
        return (correct - torch.logsumexp(others, dim=1)).sum()

    def get_out_to_loss_grad(self, model, weights, buffers, batch) -> Tensor:
        image, label = batch
        with torch.no_grad():
            logits = functional_call(model, (weights, buffers), (image,))
            p = torch.softmax(logits, dim=1).gather(1, label.reshape(-1, 1))
        return (1 - p).clone()


class AbstractGradientComputer(ABC):
    """Per-example gradients of ``task.get_output`` with respect to the model's parameters."""

    def __init__(self, model: nn.Module, task: AbstractModelOutput, grad_dim: Optional[int] = None,
                 dtype: Optional[torch.dtype] = torch.float16, device: Optional[torch.device] = "cuda") -> None:
        self.model = model
        self.modelout_fn = task
        self.grad_dim = grad_dim
        self.dtype = dtype
        self.device = device

    @abstractmethod
    def load_model_params(self, model: nn.Module) -> None:
        """Take the (current) weights and buffers of ``model``."""

    @abstractmethod
    def compute_per_sample_grad(self, batch: Iterable[Tensor]):
        """Per-example gradients of the model output on ``batch``."""

    def compute_loss_grad(self, batch: Iterable[Tensor]) -> Tensor:
        """``∂ loss / ∂ output`` for each example of ``batch``, ``(B, 1)``."""
        return self.modelout_fn.get_out_to_loss_grad(self.model, self.func_weights, self.func_buffers, batch)

    def _check_grad_wrt(self, grad_wrt: Optional[Iterable[str]]) -> Optional[list]:
        if grad_wrt is None:
            return None
        names = [grad_wrt] if isinstance(grad_wrt, str) else list(grad_wrt)
        unknown = [n for n in names if n not in self.func_weights]
        if unknown:
            raise ValueError(f"grad_wrt: {unknown} are not parameters of the model; valid: {list(self.func_weights)}")
        return names

    def _output_of_chosen(self):
        chosen = self.grad_wrt if self.grad_wrt is not None else list(self.func_weights)
        fixed = {k: v for k, v in self.func_weights.items() if k not in chosen}

        def output(weights, batch):
            return self.modelout_fn.get_output(self.model, {**fixed, **weights}, self.func_buffers, *batch)

        return output, {k: self.func_weights[k] for k in chosen}


class _ParameterGradientComputer(AbstractGradientComputer):
    """Shared by the two computers: the model's weights and buffers, and ``grad_wrt``."""

    def __init__(self, model: nn.Module, task: AbstractModelOutput, grad_dim: int, dtype: torch.dtype,
                 device: torch.device, grad_wrt: Optional[Iterable[str]] = None) -> None:
        super().__init__(model, task, grad_dim, dtype, device)
        self.load_model_params(model)
        self.grad_wrt = self._check_grad_wrt(grad_wrt)

    def load_model_params(self, model: nn.Module) -> None:
        self.model = model
        self.func_weights = {k: v.detach() for k, v in model.named_parameters()}
        self.func_buffers = {k: v.detach() for k, v in model.named_buffers()}


class FunctionalGradientComputer(_ParameterGradientComputer):
    """Per-example gradients by ``torch.func.vmap``; returns ``{name: (B, *shape)}`` for ``grad_wrt`` (all by default)."""

    def compute_per_sample_grad(self, batch: Iterable[Tensor]) -> Dict[str, Tensor]:
        output, chosen = self._output_of_chosen()
        grads = per_sample_grad(output, flatten=False)(chosen, tuple(batch))
        return {k: v.to(self.dtype) for k, v in grads.items()}


class IterativeGradientComputer(_ParameterGradientComputer):
    """Per-example gradients by a loop of ``torch.autograd.grad``, for models ``vmap`` cannot trace.

    Returns a flat ``(B, grad_dim)`` tensor (as TRAK's does), restricted to ``grad_wrt``
    (which TRAK's ignores).
    """

    def compute_per_sample_grad(self, batch: Iterable[Tensor]) -> Tensor:
        output, chosen = self._output_of_chosen()
        return per_sample_grad_loop(output)(chosen, tuple(batch)).to(self.dtype)
