"""Attribution scores from training and test representations, through the inner-product kernels.

Scores are ``(n_train, n_test)``: entry ``[i, j]`` is the score of training example
``i`` for test example ``j``. A positive score means the training example helps
the test prediction.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import kernels
from kernels import TopK

__all__ = ["inner_products", "cosine", "topk_scores", "self_scores", "TopK"]


def inner_products(train: Tensor, test: Tensor) -> Tensor:
    """``train (n_train, k)``, ``test (n_test, k)`` -> ``train @ testᵀ`` ``(n_train, n_test)``, float32 or wider."""
    return kernels.inner(train, test)


def cosine(train: Tensor, test: Tensor) -> Tensor:
    """Cosine similarities ``(n_train, n_test)`` (Grad-Cos), normalisation fused into the kernel."""
    return kernels.inner(train, test, normalize=True)


def topk_scores(
    train: Tensor, test: Tensor, k: int, *, largest: bool = True, normalize: bool = False
) -> TopK:
    """For each test example, the ``k`` training examples with the largest (``largest=False``: smallest) scores.

    Streams the training representations, never forming ``(n_train, n_test)``;
    ties go to the smaller training index. Returns ``TopK(values, indices)``, each
    ``(n_test, k)``: proponents with ``largest=True``, opponents with ``False``.
    """
    return kernels.topk_inner(train, test, k, largest=largest, normalize=normalize)


def self_scores(train: Tensor, transformed: Optional[Tensor] = None) -> Tensor:
    """``(n,)``: each example's score with itself, ``⟨g_i, T g_i⟩`` (``⟨g_i, g_i⟩`` without ``transformed``).

    The diagonal of the score matrix without computing the rest.
    """
    other = train if transformed is None else transformed
    if train.shape != other.shape:
        raise ValueError(f"transformed: expected shape {tuple(train.shape)} like train, got {tuple(other.shape)}")
    dtype = torch.promote_types(torch.promote_types(train.dtype, other.dtype), torch.float32)
    return (train.to(dtype) * other.to(dtype)).sum(dim=1)
