"""Small models and matrices shared by the tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def small_mlp(seed: int, sizes: tuple[int, ...], dtype=torch.float64, act=nn.Tanh) -> nn.Module:
    """An MLP with layers ``sizes[0] -> ... -> sizes[-1]`` and a smooth activation."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def cross_entropy_loss(model: nn.Module):
    """``f(params, (x, y))``: the mean cross-entropy of ``model`` on a batch."""

    def f(params, batch):
        x, y = batch
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return f


def classification_batch(seed: int, n: int, d: int, classes: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def random_spd(n: int, condition: float, seed: int, dtype=torch.float64) -> torch.Tensor:
    """A symmetric positive-definite matrix with eigenvalues log-spaced in ``[1, condition]``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    evals = torch.logspace(0, torch.log10(torch.tensor(float(condition))).item(), n, dtype=dtype)
    return (q * evals) @ q.T
