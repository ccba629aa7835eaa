"""Labels drawn from the model's own predictive distribution: the true Fisher instead of the empirical one."""

from __future__ import annotations

import torch
from torch import Tensor

from .seeds import Key, generator

__all__ = ["sample_labels"]


def sample_labels(logits: Tensor, *, seed: Key) -> Tensor:
    """``y_i ~ softmax(logits_i)`` ``(B,)`` int64, on ``logits``' device.

    With these labels in place of the data's, the outer products of loss gradients
    average to the Fisher information ``E_{y ~ p(y|x)}[∇ log p ∇ log pᵀ]`` (Martens,
    2020, "New insights and perspectives on the natural gradient method") rather
    than the empirical Fisher; K-FAC and EK-FAC are defined on either.

    Args:
        logits: ``(B, C)`` unnormalised class scores.
        seed: an integer ``>= 0`` or a tuple of them (e.g. ``(seed, checkpoint, batch)``):
            the same key draws the same labels on every device, whatever was drawn before.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected a (B, C) tensor, got {shape}")
    probs = torch.softmax(logits.detach().double(), dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator(seed)).reshape(-1).to(logits.device)
