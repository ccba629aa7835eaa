"""A real, small attribution problem: L2-regularised softmax regression on scikit-learn digits."""

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.digits import fit, load_digits_split

L2 = 1e-2
N_TRAIN, N_TEST = 120, 25


class Problem:
    def __init__(self):
        split = load_digits_split(N_TRAIN + 200, seed=3)
        self.x_train, self.y_train = split.x_train[:N_TRAIN], split.y_train[:N_TRAIN]
        self.x_test, self.y_test = split.x_test[:N_TEST], split.y_test[:N_TEST]
        torch.manual_seed(0)
        self.model = nn.Linear(64, 10).double()
        self.params = fit(self.model, self.x_train, self.y_train, l2=L2)
        self.model.load_state_dict(self.params)
        self.state = {k: v.clone() for k, v in self.model.state_dict().items()}

    def loss_func(self, params, data):
        x, y = data
        out = functional_call(self.model, params, (x,))
        reg = L2 / 2 * sum(p.pow(2).sum() for p in params.values())
        return nn.functional.cross_entropy(out, y) + reg

    def loader(self, which="train", batch_size=32):
        x, y = (self.x_train, self.y_train) if which == "train" else (self.x_test, self.y_test)
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)

    def flat_objective(self, data):
        keys = list(self.params)
        shapes = [self.params[k].shape for k in keys]
        sizes = [self.params[k].numel() for k in keys]

        def f(theta):
            parts = torch.split(theta, sizes)
            return self.loss_func({k: p.reshape(s) for k, p, s in zip(keys, parts, shapes)}, data)

        return f, torch.cat([self.params[k].reshape(-1) for k in keys])

    def dense_influence(self, regularization=0.0):
        """The formula, computed independently: G_train (H + λI)⁻¹ G_testᵀ with autograd loops."""
        f, theta = self.flat_objective((self.x_train, self.y_train))
        H = torch.autograd.functional.hessian(f, theta)
        H = H + regularization * torch.eye(len(theta), dtype=H.dtype)
        return self.gradients(self.x_train, self.y_train) @ torch.linalg.solve(
            H, self.gradients(self.x_test, self.y_test).T
        )

    def gradients(self, x, y):
        rows = []
        for i in range(len(y)):
            f, theta = self.flat_objective((x[i : i + 1], y[i : i + 1]))
            theta = theta.clone().requires_grad_(True)
            rows.append(torch.autograd.grad(f(theta), theta)[0])
        return torch.stack(rows)


@pytest.fixture(scope="session")
def problem():
    return Problem()
