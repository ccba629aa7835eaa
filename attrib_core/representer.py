"""Representer points (Yeh, Kim, Yen & Ravikumar, NeurIPS 2018): the final layer's decomposition over training examples.

A final linear layer ``W`` (its bias the weight of an appended 1) fitted to a
stationary point of ``mean_i L(W f_i, t_i) + λ‖W‖²`` on the training features
``f_i`` satisfies ``W = Σ_i α_i f_iᵀ`` with ``α_i = -∂L_i/∂(W f_i) / (2λn)``: every
logit of a test feature ``f_t`` splits exactly over the training examples,
``W f_t = Σ_i α_i ⟨f_i, f_t⟩``. Training example ``i``'s score for test example
``t`` is its share ``α_i[y_t] ⟨f_i, f_t⟩`` of the logit of ``t``'s label.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._checks import check_count, check_positive

__all__ = ["fit_final_layer", "representer_weights", "representer_targets", "label_columns",
           "representer_scores", "representer_self_scores"]

Loss = Callable[[Tensor, Tensor], Tensor]  # loss(logits (n, C), targets) -> the mean over the n rows


def fit_final_layer(loss: Loss, features: Tensor, targets: Tensor, weight: Tensor, *, l2: float,
                    max_steps: int) -> Tensor:
    """``W`` ``(C, d)`` at a stationary point of ``loss(features Wᵀ, targets) + l2 ‖W‖²``, from ``weight``, by L-BFGS.

    Full-batch L-BFGS with a strong-Wolfe line search, at most ``max_steps`` iterations
    (in float64, tolerances near rounding): the decomposition is exact only at a
    stationary point.
    """
    l2 = check_positive(l2, "l2")
    max_steps = check_count(max_steps, "max_steps")
    W = weight.detach().double().clone().requires_grad_(True)
    F = features.double()
    optimizer = torch.optim.LBFGS([W], lr=1.0, max_iter=max_steps, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = loss(F @ W.T, targets) + l2 * W.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(closure)
    return W.detach()


def representer_weights(loss: Loss, features: Tensor, targets: Tensor, weight: Tensor, *, l2: float,
                        n: int) -> Tensor:
    """``α_i = -∂L_i/∂(W f_i) / (2 · l2 · n)`` ``(rows, C)`` for each row, ``n`` the training set's size.

    ``loss`` is a mean over its rows, so ``rows ·`` its gradient is each row's own.
    """
    l2 = check_positive(l2, "l2")
    logits = (features.double() @ weight.double().T).detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss(logits, targets) * logits.shape[0], logits)
    return -grad / (2 * l2 * n)


def representer_targets(labels: Tensor, outputs: Tensor, *, fit_to: str) -> Tensor:
    """What the final layer is fitted to: the ``labels``, or the distribution its original ``outputs`` predict.

    A binary head (one output) takes float labels shaped like its ``(n, 1)`` logits,
    and a sigmoid of its outputs; a multi-class head the labels, or a softmax.
    """
    binary = outputs.shape[1] == 1
    if fit_to == "labels":
        return labels.reshape(-1, 1).to(outputs.dtype) if binary else labels
    if fit_to == "predictions":
        return torch.sigmoid(outputs) if binary else torch.softmax(outputs, dim=1)
    raise ValueError(f"fit_to: expected 'labels' or 'predictions', got {fit_to!r}")


def label_columns(alpha: Tensor, labels: Tensor) -> Tensor:
    """``(n_train, len(labels))``: the representer weights of each label's logit.

    A binary head (``alpha`` ``(n, 1)``) has one logit ``s``, the evidence for label 1;
    the evidence for label 0 is ``-s``, so a label-0 example takes ``-α`` (a positive
    score always supports the example's own label).
    """
    labels = labels.reshape(-1).long()
    if alpha.shape[1] != 1:
        return alpha[:, labels]
    return alpha[:, :1] * _signs(labels).to(alpha.dtype)[None, :]


def _signs(labels: Tensor) -> Tensor:
    """``+1`` for label 1 and ``-1`` for label 0: a binary head's logit is the evidence for label 1."""
    if bool(((labels != 0) & (labels != 1)).any()):
        raise ValueError("labels: a binary head (one output) needs labels 0 or 1")
    return 2 * labels - 1


def representer_scores(train_features: Tensor, alpha: Tensor, test_features: Tensor, test_labels: Tensor) -> Tensor:
    """``score[i, t] = α_i[y_t] ⟨f_i, f_t⟩`` ``(n_train, n_test)``."""
    return (train_features @ test_features.T) * label_columns(alpha, test_labels)


def representer_self_scores(features: Tensor, alpha: Tensor, labels: Tensor) -> Tensor:
    """``α_i[y_i] ‖f_i‖²`` ``(n,)``: each training example's share of its own label's logit."""
    labels = labels.reshape(-1).long()
    if alpha.shape[1] == 1:
        own = alpha[:, 0] * _signs(labels).to(alpha.dtype)
    else:
        own = alpha.gather(1, labels[:, None]).squeeze(1)
    return (features * features).sum(1) * own
