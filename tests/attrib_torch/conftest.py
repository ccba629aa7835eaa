"""A real, small attribution problem: L2-regularised softmax regression on scikit-learn digits.

Built here, not borrowed from ``benchmarks/`` (the library's tests do not import the benchmarks).
"""

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

L2 = 1e-2
N_TRAIN, N_TEST = 120, 25


class Problem:
    def __init__(self):
        digits = load_digits()
        order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(3))
        x = torch.tensor(digits.data, dtype=torch.float64)[order] / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)[order]
        self.x_train, self.y_train = x[:N_TRAIN], y[:N_TRAIN]
        self.x_test, self.y_test = x[N_TRAIN:N_TRAIN + N_TEST], y[N_TRAIN:N_TRAIN + N_TEST]
        torch.manual_seed(0)
        self.model = nn.Linear(64, 10).double()
        self.params = self._stationary_point()
        self.model.load_state_dict(self.params)
        self.state = {k: v.clone() for k, v in self.model.state_dict().items()}

    def _stationary_point(self):
        """The minimiser of the regularised training loss, by full-batch L-BFGS (influence assumes one)."""
        params = {k: v.detach().clone().requires_grad_(True) for k, v in self.model.named_parameters()}
        optimizer = torch.optim.LBFGS(list(params.values()), max_iter=500, tolerance_grad=1e-10,
                                      tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            value = self.loss_func(params, (self.x_train, self.y_train))
            value.backward()
            return value

        optimizer.step(closure)
        return {k: v.detach() for k, v in params.items()}

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
