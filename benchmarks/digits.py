"""The scikit-learn digits data (1,797 8x8 images, shipped with the package) and models trained on it.

Everything here is deterministic given its seed, and nothing is downloaded.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call


class Split(NamedTuple):
    """Digits as float tensors: images ``(n, 64)`` scaled to ``[0, 1]``, labels ``(n,)``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits_split(n_train: int = 1000, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> Split:
    """A seeded random split of scikit-learn's digits into ``n_train`` training images and the rest."""
    from sklearn.datasets import load_digits

    data = load_digits()
    if not 1 <= n_train < len(data.target):
        raise ValueError(f"n_train: expected 1 <= n_train < {len(data.target)}, got {n_train}")
    x = torch.tensor(data.data, dtype=dtype) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = order[:n_train], order[n_train:]
    return Split(x[train], y[train], x[test], y[test])


def softmax_regression(*, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Multinomial logistic regression, 64 -> 10 (650 parameters)."""
    torch.manual_seed(seed)
    return nn.Linear(64, 10).to(dtype)


def mlp(hidden: int = 128, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A one-hidden-layer MLP 64 -> hidden -> 10 (9,610 parameters at hidden=128)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).to(dtype)


class SmallCNN(nn.Module):
    """Two 3x3 convolutions with average pooling on the 8x8 images, then a linear head (3,130 parameters)."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.head = nn.Linear(channels * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = x.reshape(-1, 1, 8, 8)
        h = nn.functional.avg_pool2d(torch.tanh(self.conv1(h)), 2)
        h = nn.functional.avg_pool2d(torch.tanh(self.conv2(h)), 2)
        return self.head(h.flatten(1))


def cnn(channels: int = 16, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """:class:`SmallCNN`, taking the flat ``(n, 64)`` images."""
    torch.manual_seed(seed)
    return SmallCNN(channels).to(dtype)


def cross_entropy(model: nn.Module) -> Callable[[Mapping[str, Tensor], tuple], Tensor]:
    """``f(params, (x, y))``: the mean cross-entropy of ``model`` on a batch."""

    def f(params: Mapping[str, Tensor], batch: tuple) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(functional_call(model, dict(params), (x,)), y)

    return f


def margin_and_probability(model, per_example: bool = False):
    """TRAK's margin and the correct-class probability; ``per_example`` for dattri (one example, no batch dimension)."""

    def logits_of(params, x):
        return functional_call(model, params, (x.unsqueeze(0) if per_example else x,))

    def margin(params, data):
        x, y = data
        y = y.reshape(-1)
        logits = logits_of(params, x)
        correct = logits.gather(1, y[:, None]).squeeze(1)
        return (correct - torch.logsumexp(logits.scatter(1, y[:, None], float("-inf")), dim=1)).sum()

    def probability(params, data):
        x, y = data
        y = y.reshape(-1)
        p = torch.softmax(logits_of(params, x), dim=1).gather(1, y[:, None]).squeeze(1)
        return p.squeeze(0) if per_example else p

    return margin, probability


def l2_objective(model: nn.Module, l2: float) -> Callable[[Mapping[str, Tensor], tuple], Tensor]:
    """``f(params, batch)``: mean cross-entropy plus ``l2 / 2 * |params|²``, the training objective."""
    loss = cross_entropy(model)

    def f(params: Mapping[str, Tensor], batch: tuple) -> Tensor:
        return loss(params, batch) + l2 / 2 * sum(p.pow(2).sum() for p in params.values())

    return f


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    l2: float,
    weights: Tensor | None = None,
    init: Mapping[str, Tensor] | None = None,
    max_iter: int = 500,
) -> dict[str, Tensor]:
    """Full-batch L-BFGS on the L2-regularised objective; returns the fitted parameters.

    ``weights`` (``n,``) multiplies each example's loss (0 removes it) while the
    mean still divides by ``n``, so leave-one-out refits change exactly one term.
    It starts from ``init`` (default: the model's own parameters, which are left
    untouched) and fits a copy.
    """
    start = dict(model.named_parameters()) if init is None else init
    params = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
    w = torch.ones(len(y), dtype=x.dtype) if weights is None else weights.to(x.dtype)
    optimizer = torch.optim.LBFGS(
        list(params.values()),
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = functional_call(model, params, (x,))
        per_example = nn.functional.cross_entropy(logits, y, reduction="none")
        objective = (w * per_example).mean() + l2 / 2 * sum(p.pow(2).sum() for p in params.values())
        objective.backward()
        return objective

    optimizer.step(closure)
    return {k: v.detach() for k, v in params.items()}


def fit_sgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    init: Mapping[str, Tensor],
    epochs: int,
    lr: float,
    batch_size: int = 32,
    l2: float = 0.0,
    seed: int = 1,
) -> list[dict[str, Tensor]]:
    """Mini-batch SGD on the (L2-regularised) cross-entropy from ``init``; the parameters after each epoch.

    Batches are drawn by a generator seeded with ``seed``, so a refit on the same
    data is the same run: retraining differs only by the data it is given.
    """
    params = {k: v.detach().clone().requires_grad_(True) for k, v in init.items()}
    optimizer = torch.optim.SGD(list(params.values()), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    after_epochs = []
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            rows = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(functional_call(model, params, (x[rows],)), y[rows])
            if l2:
                loss = loss + l2 / 2 * sum(p.pow(2).sum() for p in params.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        after_epochs.append({k: v.detach().clone() for k, v in params.items()})
    return after_epochs


def accuracy(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((functional_call(model, dict(params), (x,)).argmax(1) == y).double().mean())
